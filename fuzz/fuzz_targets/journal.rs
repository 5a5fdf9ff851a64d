//! Journal recovery from a damaged durable file. The fuzzer's bytes become
//! `<state>/<vm>/journal` of an enabled VM whose live ring is gone (a
//! reboot), and the target opens the VM as `tern serve` does: `Mirror::open`
//! restores the ring from the durable file, then recovers (re-applies the
//! published tail after a process crash, discards it after a host crash, or
//! pads holes a detached journal may have).
//!
//! Input: byte 0 is a mode, the rest the file.
//! - bit 0, the layout: clear, the rest is the whole file (raw); set
//!   (compact), a valid immutable header for this VM with a 16 KiB ring
//!   (so the fuzzer gets past its checksum), then bytes 48..256 of the
//!   header (positions, window, flags, boot id, overflow seq) from the
//!   next 208 input bytes, then the data area from the rest (zero-filled
//!   to 16 KiB, what is longer is cut).
//! - bit 1, reseal: every record header that decodes between the tail and
//!   the head gets the checksum its body and data call for, so the fuzzer
//!   reaches what lies behind the checksum.
//! - bits 2–3, the header's attach state: 0 as in the file; 1 attached in
//!   this boot (a process crash: `Journal::recover`); 2 attached in another
//!   boot (a host crash: the ring is discarded); 3 detached (a clean stop:
//!   `Journal::pad_holes`).
//!
//! What must hold besides "no panic": open fails with an error, or yields a
//! journal whose cursor walk from the tail ends within a bound and returns
//! only records that are published in the ring and match their checksum.
//! After a recovery (process or host crash) the walk must reach the head
//! without an error: recovery promises the shipper a passable journal. A
//! write then, a clean shutdown, a reboot and a second open must work, and
//! the walk hold again.
//!
//! Seeds: `TERN_FUZZ_JOURNAL_SEEDS=DIR` makes the target write real journal
//! files (a mirror writing records; crashed, clean, wrapped, overflowed,
//! with holes, busy and half-received records) to DIR as inputs, and exit
//! (scripts/fuzz-nbd.sh does this when seeds/journal/ is empty).
#![no_main]

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

#[path = "scratch.rs"]
mod scratch;
use tern_driver::journal::format::{
    busy_word, commit_word, HeaderFields, HEADER_SIZE, OFF_BOOT_ID, OFF_FLAGS, OFF_HEAD, OFF_TAIL, RECORD_ALIGN,
    RECORD_HEADER_SIZE,
};
use tern_driver::journal::{Journal, NewRecord, Position, RecordHeader, RecordKind, FLAG_ATTACHED};
use tern_driver::units::Size;
use tern_driver::vm::{self, EnableSpec, JournalConfig, VmPaths};
use tern_driver::{Mirror, MirrorOptions, ResyncStep};

const PREFIX: &str = "tern-journal-fuzz-";
/// The VM's id, fixed (`enable` draws one at random) so that seed files
/// written by one process open in another.
const VM_ID: [u8; 16] = *b"tern-fuzz-jrnl-1";
/// The ring the compact layout describes: the smallest `enable` makes.
const CAPACITY: u64 = 16 << 10;
const DISK_SIZE: u64 = 1 << 20;
/// Header bytes the compact layout takes from the input: 48..256.
const MUTABLE: std::ops::Range<usize> = 48..256;

static VM: OnceLock<Vm> = OnceLock::new();

struct Vm {
    dir: PathBuf,
    paths: VmPaths,
    /// The dirty bitmap as `enable` made it, restored before each input.
    bitmap: Vec<u8>,
}

fuzz_target!(
    init: {
        if let Some(dir) = std::env::var_os("TERN_FUZZ_JOURNAL_SEEDS") {
            write_seeds(Path::new(&dir));
            std::process::exit(0);
        }
    },
    |data: &[u8]| {
        let vm = VM.get_or_init(|| {
            let vm = Vm::new("vm");
            scratch::remove_at_exit(&vm.dir);
            vm
        });
        let Some((&mode, rest)) = data.split_first() else { return };
        let file = build_file(mode, rest);
        let before = scratch::threads();
        vm.reboot_with(&file);
        check_open(vm, expected_recovery(&file));
        scratch::wait_for_threads(before);
    }
);

/// What `Mirror::open` will do with the file, as far as the target holds it
/// to a promise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recovery {
    /// Attached in this boot (a process crash): the published tail is
    /// re-applied and every hole padded, up to the head the file names.
    Process { head: Position },
    /// Attached in another boot (a host crash): the ring is emptied.
    Host,
    /// Detached: holes are padded, but a record damaged in place may stay.
    Clean,
}

impl Recovery {
    /// Whether the journal must be passable from the tail to the head.
    fn strict(self) -> bool {
        self != Recovery::Clean
    }
}

fn expected_recovery(file: &[u8]) -> Recovery {
    if file.len() < HEADER_SIZE {
        return Recovery::Clean; // open fails
    }
    let u64_at = |off: usize| u64::from_le_bytes(file[off..off + 8].try_into().unwrap());
    let flags = u32::from_le_bytes(file[OFF_FLAGS..OFF_FLAGS + 4].try_into().unwrap());
    if flags & FLAG_ATTACHED == 0 {
        Recovery::Clean
    } else if file[OFF_BOOT_ID..OFF_BOOT_ID + 16] == tern_driver::mirror::boot_id() {
        // The head as `Journal::open` reads it: without the overflow bit.
        Recovery::Process { head: Position { pos: u64_at(OFF_HEAD), seq: u64_at(OFF_HEAD + 8) & !(1 << 63) } }
    } else {
        Recovery::Host
    }
}

fn check_open(vm: &Vm, recovery: Recovery) {
    let Ok(mirror) = Mirror::open(&vm.paths, MirrorOptions::default()) else { return };
    let recovered_to = match recovery {
        Recovery::Process { head } => Some(head),
        _ => None,
    };
    walk(mirror.journal(), recovery.strict(), recovered_to);
    mirror.write(0, 0, &[0x5a; 4096], true).expect("a write after recovery");
    walk(mirror.journal(), recovery.strict(), None);
    mirror.shutdown().expect("a clean shutdown after recovery");
    drop(mirror);

    // Reboot: the ring is restored from what tern itself made durable.
    vm.forget_ring();
    let again = Mirror::open(&vm.paths, MirrorOptions::default())
        .unwrap_or_else(|e| panic!("the journal tern shut down cleanly does not open again: {e}"));
    walk(again.journal(), recovery.strict(), None);
    again.shutdown().expect("a second clean shutdown");
}

/// Walks the journal from its tail as the shipper would. Each record it
/// returns is checked against the ring's own bytes: published there, the
/// same header, the stored checksum that of its body and data. The walk
/// moves at least 64 bytes a record, so it ends within capacity / 64 steps
/// of the head. `strict` (after a crash recovery, or a clean shutdown that
/// followed one): it must end at the head, unbroken; and where recovery
/// stopped (`recovered_to`, the head the file named: records appended
/// since, such as a resync window's opener, follow it), the records must
/// have added up to it (recovery refuses a header the records do not add
/// up to: the seq-gap artifact).
fn walk(journal: &Journal, strict: bool, recovered_to: Option<Position>) {
    let (head, tail) = (journal.head(), journal.tail());
    let cap = journal.capacity();
    let ring = fs::File::open(journal.ring_path()).expect("open the live ring");
    let mut cursor = journal.cursor(tail);
    let mut data = Vec::new();
    let mut checkpoint = recovered_to.filter(|_| strict);
    // Whether the cursor passed where recovery stopped, and got there.
    let mut passed = |at: Position| {
        if let Some(to) = checkpoint.filter(|to| at.pos >= to.pos) {
            assert_eq!(at, to, "recovery from {tail:?} ended at {at:?}, not at the head");
            checkpoint = None;
        }
    };
    passed(tail);
    let mut steps = 0u64;
    let end = loop {
        steps += 1;
        assert!(steps <= cap / RECORD_ALIGN + 1, "the walk from {tail:?} to {head:?} does not end");
        match cursor.next(&mut data) {
            Ok(Some(h)) => {
                // Where the record starts: pads `next` skips (a wrap's, or a
                // hole's that stands for no sequence number) move the
                // cursor past more than the record.
                let start = cursor.position().pos - h.footprint();
                passed(Position { pos: start, seq: h.seq });
                check_record(&ring, cap, start, &h, &data);
            }
            Ok(None) => {
                passed(cursor.position());
                break Ok(cursor.position());
            }
            // A failing record at or past that point (wrap pads before it
            // are skipped inside `next`).
            Err(e) => {
                passed(cursor.position());
                break Err(e);
            }
        }
    };
    if strict {
        match end {
            Ok(at) => assert_eq!(at, head, "the walk from {tail:?} stops at {at:?}, not the head"),
            Err(e) => panic!("the journal is not passable from {tail:?}: {e}"),
        }
    }
}

fn check_record(ring: &fs::File, cap: u64, pos: u64, h: &RecordHeader, data: &[u8]) {
    assert_eq!(data.len(), h.data_len as usize, "record at {pos}: {h:?}");
    let slot = pos % cap;
    assert!(slot + h.footprint() <= cap, "record at {pos} straddles the wrap: {h:?}");
    let mut raw = [0u8; RECORD_HEADER_SIZE];
    ring.read_exact_at(&mut raw, HEADER_SIZE as u64 + slot).expect("read the ring");
    let commit = u64::from_le_bytes(raw[..8].try_into().unwrap());
    assert!(commit == commit_word(pos) || commit == busy_word(pos), "record at {pos} handed out unpublished: {h:?}");
    let body: &[u8; 36] = raw[8..44].try_into().unwrap();
    assert_eq!(RecordHeader::decode_body(body).as_ref(), Ok(h), "record at {pos}: another header in the ring");
    let stored = u32::from_le_bytes(raw[44..48].try_into().unwrap());
    assert_eq!(h.checksum(data), stored, "record at {pos} handed out with a checksum that fails: {h:?}");
}

/// The durable file an input stands for (see the module's documentation).
fn build_file(mode: u8, rest: &[u8]) -> Vec<u8> {
    let compact = mode & 1 != 0;
    let mut file = if compact {
        let mut f = vec![0u8; HEADER_SIZE + CAPACITY as usize];
        f[..48].copy_from_slice(&HeaderFields { vm_id: VM_ID, capacity: CAPACITY }.encode());
        let (header, area) = rest.split_at(rest.len().min(MUTABLE.len()));
        f[MUTABLE.start..MUTABLE.start + header.len()].copy_from_slice(header);
        let n = area.len().min(CAPACITY as usize);
        f[HEADER_SIZE..HEADER_SIZE + n].copy_from_slice(&area[..n]);
        f
    } else {
        rest.to_vec()
    };
    if file.len() >= HEADER_SIZE {
        let boot = tern_driver::mirror::boot_id();
        let attach = |file: &mut Vec<u8>, attached: bool, boot: [u8; 16]| {
            let flags = u32::from_le_bytes(file[OFF_FLAGS..OFF_FLAGS + 4].try_into().unwrap());
            let flags = if attached { flags | FLAG_ATTACHED } else { flags & !FLAG_ATTACHED };
            file[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&flags.to_le_bytes());
            file[OFF_BOOT_ID..OFF_BOOT_ID + 16].copy_from_slice(&boot);
        };
        match (mode >> 2) & 3 {
            1 => attach(&mut file, true, boot),
            2 => attach(&mut file, true, boot.map(|b| !b)),
            3 => attach(&mut file, false, boot),
            _ => {}
        }
    }
    if mode & 2 != 0 {
        reseal(&mut file);
    }
    file
}

/// Gives every record header that decodes between the tail and the head
/// the checksum of its body and data (commit words are left alone).
fn reseal(file: &mut [u8]) {
    let Ok(fields) = HeaderFields::decode(file, file.len() as u64) else { return };
    let cap = fields.capacity;
    let word = |off: usize| u64::from_le_bytes(file[off..off + 8].try_into().unwrap());
    let (head, tail) = (word(OFF_HEAD), word(OFF_TAIL));
    if tail > head || head - tail > cap {
        return;
    }
    let mut pos = tail - tail % RECORD_ALIGN;
    while pos < head {
        let at = HEADER_SIZE + (pos % cap) as usize;
        let body: &[u8; 36] = file[at + 8..at + 44].try_into().unwrap();
        let span = match RecordHeader::decode_body(body) {
            Ok(h) if h.footprint() > 0 && h.footprint() % RECORD_ALIGN == 0 && pos % cap + h.footprint() <= cap => {
                let data = &file[at + RECORD_HEADER_SIZE..at + RECORD_HEADER_SIZE + h.data_len as usize];
                let crc = h.checksum(data);
                file[at + 44..at + 48].copy_from_slice(&crc.to_le_bytes());
                h.footprint()
            }
            _ => RECORD_ALIGN,
        };
        let Some(next) = pos.checked_add(span) else { return };
        pos = next;
    }
}

impl Vm {
    /// Enables a VM `name` with a 1 MiB sparse disk and a 16 KiB journal in
    /// a directory of its own (in /dev/shm), with the fixed id.
    fn new(name: &str) -> Vm {
        let dir = scratch::fresh_dir(PREFIX, &format!("-{name}"));
        let image = dir.join("disk0.img");
        fs::File::create(&image).and_then(|f| f.set_len(DISK_SIZE)).expect("create the image");
        let paths = VmPaths::new(&dir.join("state"), name).expect("VM paths").with_ring_dir(&dir.join("rings"));
        let enabled = vm::enable_at(
            &paths,
            &EnableSpec {
                name: name.into(),
                disks: vec![("disk0".into(), image)],
                cache: dir.join("cache"),
                key: None,
                target: dir.join("target"),
                journal: JournalConfig { size: Size(CAPACITY), region_size: Size::kib(4) },
                policy: Default::default(),
                app_points: Default::default(),
                launch: Default::default(),
                initial_sync: Default::default(),
            },
        )
        .expect("enable the VM");
        // The fixed id, in vm.toml and in a journal made for it. The policy
        // (the defaults) goes: parsing its durations was a fifth of the
        // time an input took.
        let config = fs::read_to_string(paths.config()).expect("read vm.toml");
        let fixed = config.replace(&enabled.config.id.to_string(), &uuid_text(VM_ID));
        assert_ne!(fixed, config, "the VM id is not in vm.toml");
        let fixed: Vec<&str> = fixed.split("\n\n").filter(|table| !table.starts_with("[policy]")).collect();
        fs::write(paths.config(), fixed.join("\n\n")).expect("write vm.toml");
        tern_driver::journal::live::retire(&paths.journal()).expect("retire the journal");
        Journal::create(&paths.journal(), VM_ID, CAPACITY).expect("create the journal");
        let bitmap = fs::read(paths.dirty("disk0")).expect("read the bitmap");
        Vm { dir, paths, bitmap }
    }

    /// The host rebooted, and `file` is what its journal file held: no live
    /// ring, the bitmap as enabled.
    fn reboot_with(&self, file: &[u8]) {
        fs::write(self.paths.journal(), file).expect("write the journal");
        fs::write(self.paths.dirty("disk0"), &self.bitmap).expect("restore the bitmap");
        self.forget_ring();
    }

    /// Removes the live ring and its link, as a reboot does.
    fn forget_ring(&self) {
        let _ = fs::remove_file(tern_driver::journal::live::link_path(&self.paths.journal()));
        if let Ok(entries) = fs::read_dir(self.dir.join("rings")) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

fn uuid_text(id: [u8; 16]) -> String {
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

// ---- seeds ------------------------------------------------------------------

/// Writes real journal files, each under several modes, to `out`.
fn write_seeds(out: &Path) {
    fs::create_dir_all(out).expect("create the seed directory");
    let mut n = 0;
    for (name, file) in journals() {
        let header = &file[MUTABLE];
        let area = &file[HEADER_SIZE..];
        let used = area.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        let compact = [header, &area[..used]].concat();
        // Compact (1), resealed (2), after a process crash (4), a host
        // crash (8) and a clean stop (12); the crashed one raw (0) too.
        let mut inputs = vec![(format!("{name}-crash"), [&[0x05u8][..], &compact].concat())];
        inputs.push((format!("{name}-crash-resealed"), [&[0x07u8][..], &compact].concat()));
        inputs.push((format!("{name}-host-crash"), [&[0x09u8][..], &compact].concat()));
        inputs.push((format!("{name}-clean"), [&[0x0du8][..], &compact].concat()));
        if name == "crashed" {
            inputs.push((format!("{name}-raw"), [&[0x04u8][..], &file].concat()));
        }
        for (seed, bytes) in inputs {
            fs::write(out.join(format!("{seed}.bin")), bytes).expect("write a seed");
            n += 1;
        }
    }
    println!("{}: {n} seeds", out.display());
}

/// The durable journal file after each scenario (synced, never shut down
/// unless the scenario says so).
fn journals() -> Vec<(&'static str, Vec<u8>)> {
    type Scenario = fn(&Mirror);
    let scenarios: [(&str, Scenario); 9] = [
        ("crashed", |m| {
            write_some(m, 0);
            m.tag("before-upgrade").expect("tag");
        }),
        ("clean", |m| {
            write_some(m, 0);
            m.shutdown().expect("shutdown");
        }),
        ("wrapped", |m| {
            // Two laps, the shipper keeping up but for the last 5 KiB of
            // records, which straddle the wrap (at 32 KiB).
            for i in 0..26 {
                write_some(m, i * 8192);
                if i < 22 {
                    consume(m.journal());
                }
            }
        }),
        ("overflowed", |m| {
            for i in 0..5u64 {
                m.write(0, i * 4096, &[i as u8 + 1; 4096], false).expect("write");
            }
        }),
        ("resyncing", |m| {
            for i in 0..5u64 {
                m.write(0, i * 4096, &[i as u8 + 1; 4096], false).expect("write");
            }
            consume(m.journal());
            // Out of overflow, a window open, part of the dirty range re-sent.
            assert!(matches!(m.resync_step(4096).expect("resync"), ResyncStep::Progress { .. }));
            m.write(0, 65536, b"after the overflow", false).expect("write");
        }),
        ("receiving", |m| {
            write_some(m, 0);
            let mut w = m.begin_write_in_place(0, 8192, 2048).expect("in place");
            w.buffer()[..1000].fill(0xab);
            m.journal().sync().expect("sync");
            save(m);
            drop(w);
        }),
        ("holes", |m| {
            write_some(m, 0);
            let j = m.journal();
            j.reserve_and_abandon(512).expect("room");
            let publish = j.append_published_later(&rec(RecordKind::Write, 4096, 100), &[7; 100]);
            m.write(0, 12288, &[9; 300], false).expect("write");
            j.sync().expect("sync");
            save(m);
            publish();
        }),
        ("busy", |m| {
            write_some(m, 0);
            let busy = m.journal().append_busy(&rec(RecordKind::Write, 20480, 512), &[3; 512]).expect("room");
            m.journal().sync().expect("sync");
            save(m);
            drop(busy);
        }),
        ("opener-lost", |m| {
            let j = m.journal();
            for i in 0..5u64 {
                m.write(0, i * 4096, &[i as u8 + 1; 4096], false).expect("write");
            }
            consume(j);
            j.leave_overflow_and_abandon().expect("room");
        }),
    ];
    let mut out = Vec::new();
    for (i, (name, scenario)) in scenarios.into_iter().enumerate() {
        let vm = Vm::new(&format!("seed{i}"));
        let mirror = Mirror::open(&vm.paths, MirrorOptions::default()).expect("open the seed mirror");
        scenario(&mirror);
        let file = SAVED.with(|s| s.borrow_mut().take()).unwrap_or_else(|| {
            let _ = mirror.journal().sync();
            fs::read(vm.paths.journal()).expect("read the journal")
        });
        drop(mirror);
        let _ = fs::remove_dir_all(&vm.dir);
        out.push((name, file));
    }
    out
}

thread_local! {
    /// A scenario's journal file, saved at the moment it chose.
    static SAVED: std::cell::RefCell<Option<Vec<u8>>> = const { std::cell::RefCell::new(None) };
}

fn save(m: &Mirror) {
    let file = fs::read(m.journal().path()).expect("read the journal");
    SAVED.with(|s| *s.borrow_mut() = Some(file));
}

fn rec(kind: RecordKind, offset: u64, length: u32) -> NewRecord {
    NewRecord { disk: 0, kind, offset, length, flags: 0 }
}

/// A write, a zeroing, a trim, a FUA write: four records (and a sync).
fn write_some(m: &Mirror, at: u64) {
    let at = at % (DISK_SIZE - 16384);
    m.write(0, at, &[0x11; 1000], false).expect("write");
    m.zero(0, at + 4096, 4096, Default::default(), false).expect("zero");
    m.trim(0, at + 8192, 4096, false).expect("trim");
    m.write(0, at + 12288, b"durable", true).expect("FUA write");
}

/// Takes every published record off the ring, as the shipper would.
fn consume(j: &Journal) {
    let mut c = j.cursor(j.tail());
    let mut data = Vec::new();
    while let Ok(Some(_)) = c.next(&mut data) {}
    j.set_tail(c.position());
}
