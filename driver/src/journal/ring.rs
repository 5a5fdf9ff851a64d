use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use memmap2::MmapRaw;
use portable_atomic::AtomicU128;

use super::format::*;
use super::RecordKind;
use crate::fs::{preallocate, FileLock};
use crate::{Error, Result};

mod in_place;
mod recovery;

use in_place::InPlaceState;
pub use in_place::{BusyRecord, InPlaceRecord};

/// A place in the ring: a byte position and the sequence number of the
/// record that starts there (for the head: the next to be reserved; for the
/// tail: the next to be consumed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub pos: u64,
    pub seq: u64,
}

impl Position {
    fn pack(self) -> u128 {
        (self.seq as u128) << 64 | self.pos as u128
    }

    pub(super) fn unpack(v: u128) -> Self {
        Position { pos: v as u64, seq: (v >> 64) as u64 & !OVERFLOW_BIT }
    }
}

/// The top bit of the head's sequence number: the ring is in overflow mode.
/// Mode and head live in one atomic word so that no record can be reserved
/// after the switch to overflow (a write journaled after an earlier write
/// went only to the bitmap would let the replica pass through a state the
/// source never had), and so that leaving overflow and reserving the record
/// that opens the resync window are one step.
const OVERFLOW_BIT: u64 = 1 << 63;

/// How far sequence numbers jump when a host crash discards the journal.
pub const SEQ_JUMP_AFTER_DISCARD: u64 = 1 << 32;

fn in_overflow(head_word: u128) -> bool {
    (head_word >> 64) as u64 & OVERFLOW_BIT != 0
}

/// Whether writes are being journaled or only marked in the dirty bitmaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Journal,
    /// The ring filled up at `overflow_seq`; writes since then are in the
    /// dirty bitmaps until a resync has caught up.
    Overflow,
}

/// A record a producer wants to publish; its data is passed beside it.
#[derive(Debug, Clone, Copy)]
pub struct NewRecord {
    pub disk: u16,
    pub kind: RecordKind,
    pub offset: u64,
    pub length: u32,
    /// Zero but for resync window markers (`RESYNC_OPEN`, `RESYNC_CLOSE`).
    pub flags: u8,
}

impl NewRecord {
    /// The header of this record at sequence number `seq`, stamped now.
    fn header(&self, seq: u64, data_len: usize) -> RecordHeader {
        RecordHeader {
            seq,
            offset: self.offset,
            time_ns: now_ns(),
            length: self.length,
            data_len: data_len as u32,
            disk: self.disk,
            kind: self.kind,
            flags: self.flags,
        }
    }
}

/// What a consumer finds at a position.
#[derive(Debug)]
pub enum ReadOutcome {
    /// A published record; its data was copied into the caller's buffer and
    /// checked against its checksum.
    Record(RecordHeader),
    /// Nothing published there (yet).
    NotPublished,
}

/// What [`Journal::recover`] found between the tail and the head.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Published records handed to the re-apply callback.
    pub records: u64,
    /// Holes left by producers that crashed between reserving and
    /// publishing, now covered by pad records.
    pub holes: u64,
    /// Sequence numbers those holes stood for.
    pub lost_seqs: u64,
    /// Published records whose checksum failed (torn by a host crash);
    /// treated as holes.
    pub torn: u64,
}

/// An open journal: the live ring in memory (see [`super::live`]) and the
/// durable file it is made durable in. Cheap to share between threads
/// (`&Journal` is all a producer needs).
#[derive(Debug)]
pub struct Journal {
    /// The live ring, shared by every process that has the journal open
    /// (and, while it runs, by the thread that pre-faults it).
    map: Arc<MmapRaw>,
    ring: File,
    ring_path: PathBuf,
    /// The durable file in the state directory (`<state>/<vm>/journal`).
    durable: File,
    path: PathBuf,
    fields: HeaderFields,
    /// What this process's last [`Journal::sync`] made durable.
    synced: Mutex<Synced>,
}

/// What a process last wrote to the durable file.
#[derive(Debug)]
struct Synced {
    /// Ring positions below this are in the durable file (or consumed,
    /// which is as good).
    to: u64,
    /// The header written.
    header: Vec<u8>,
}

impl Journal {
    /// Creates a journal file of `capacity` data bytes (a multiple of 4096),
    /// allocated (not sparse), and makes it durable. Fails if the file exists.
    pub fn create(path: &Path, vm_id: [u8; 16], capacity: u64) -> Result<()> {
        if !(16 * 1024..=MAX_CAPACITY).contains(&capacity) || !capacity.is_multiple_of(4096) {
            return Err(Error::Invalid(format!(
                "journal capacity {capacity} must be a multiple of 4096 between 16 KiB and 1 TiB"
            )));
        }
        let create_err = |source| Error::Create { path: path.to_owned(), source };
        let mut f = OpenOptions::new().read(true).write(true).create_new(true).open(path).map_err(create_err)?;
        // Allocated up front, not sparse: a store into a mapped hole on a
        // full filesystem is SIGBUS, which would take the VM's I/O down.
        preallocate(&f, HEADER_SIZE as u64 + capacity).map_err(create_err)?;
        let fields = HeaderFields { vm_id, capacity };
        f.write_all(&fields.encode()).map_err(create_err)?;
        // The head and tail start at position 0, sequence 1.
        let mut start = [0u8; 8];
        start.copy_from_slice(&1u64.to_le_bytes());
        use std::os::unix::fs::FileExt;
        f.write_all_at(&start, OFF_HEAD as u64 + 8).map_err(create_err)?;
        f.write_all_at(&start, OFF_TAIL as u64 + 8).map_err(create_err)?;
        f.sync_all().map_err(|source| Error::Sync { path: path.to_owned(), source })?;
        crate::fs::sync_parent_dir(path)?;
        Ok(())
    }

    /// Opens and validates a journal: the durable file at `path` and its
    /// live ring, which is restored into `ring_dir` from the durable file
    /// when it does not exist (after a reboot, or the first time).
    pub fn open(path: &Path, ring_dir: &Path) -> Result<Self> {
        check_lock_free()?;
        let durable = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| Error::Open { path: path.to_owned(), source })?;
        let fields = read_fields(&durable, path)?;
        let (ring, ring_path) = {
            let _lock = FileLock::exclusive(&durable, path)?;
            // The journal was moved away or retired while this process
            // waited for the lock (`tern disable`, `tern failback`): a
            // ring restored now would outlive the VM.
            let opened = durable.metadata().map_err(|source| Error::Open { path: path.to_owned(), source })?;
            let still_there = std::fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == (opened.dev(), opened.ino()));
            if !still_there {
                return Err(Error::Invalid(format!(
                    "the journal {} was removed while it was being opened (the VM was disabled or failed back); check `tern status` for what is protected now",
                    path.display()
                )));
            }
            super::live::open_or_restore(&durable, path, fields.vm_id, fields.capacity, ring_dir)?
        };
        let ring_fields = read_fields(&ring, &ring_path)?;
        if ring_fields != fields {
            return Err(Error::Format {
                path: ring_path,
                what: "journal ring",
                reason: format!(
                    "it does not belong to {} (another VM id or capacity); remove it and its link {}",
                    path.display(),
                    super::live::link_path(path).display()
                ),
            });
        }
        let map = MmapRaw::map_raw(&ring).map_err(|source| Error::Map { path: ring_path.clone(), source })?;
        let map = Arc::new(map);
        // Nothing is known durable yet: the first sync writes the whole
        // unconsumed part (recovery may have padded holes in it).
        let synced = Mutex::new(Synced { to: 0, header: Vec::new() });
        let j = Journal { map, ring, ring_path, durable, path: path.to_owned(), fields, synced };
        let (head, tail) = (j.head(), j.tail());
        if tail.pos > head.pos
            || !head.pos.is_multiple_of(RECORD_ALIGN)
            || head.pos - tail.pos > fields.capacity
            || tail.seq > head.seq
            || tail.pos % RECORD_ALIGN != 0
        {
            return Err(Error::Format {
                path: j.ring_path.clone(),
                what: "journal",
                reason: format!("inconsistent positions: head {head:?}, tail {tail:?}"),
            });
        }
        Ok(j)
    }

    /// The durable journal file (what errors and logs name).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Maps every page of the ring writable, in the background, from the
    /// head on (where the producers write next), a chunk at a time.
    /// Otherwise the first store to each page faults, and tmpfs zeroes the
    /// page in the fault: on the first lap that doubled the cost of every
    /// journaled byte. Mapping takes long (on the test machines 0.2 s of
    /// kernel time per GiB of ring, 2.8 s when memory is short), so nobody
    /// waits for it; the pages a
    /// producer reaches first fault in as before. Pages stay mapped
    /// afterwards. The thread stops early once the journal is dropped.
    pub fn prefault_in_background(&self, vm: &str) -> std::io::Result<()> {
        const CHUNK: usize = 32 << 20;
        let map = Arc::clone(&self.map);
        let head_at = HEADER_SIZE + self.slot(self.head().pos);
        let (vm, ring) = (vm.to_owned(), self.ring_path.clone());
        std::thread::Builder::new().name("ring-prefault".into()).spawn(move || {
            let started = Instant::now();
            for (from, to) in [(head_at, map.len()), (0, head_at)] {
                for at in (from..to).step_by(CHUNK) {
                    if Arc::strong_count(&map) == 1 {
                        return; // the journal is closed
                    }
                    if let Err(e) = map.advise_range(memmap2::Advice::PopulateWrite, at, CHUNK.min(to - at)) {
                        // Only slower: the first lap faults its pages in.
                        return log::warn!("VM '{vm}': cannot pre-fault the journal ring {}: {e}", ring.display());
                    }
                }
            }
            // Until now the first writes into unmapped pages paid a fault.
            log::info!("VM '{vm}': journal ring mapped in {:.1?}", started.elapsed());
        })?;
        Ok(())
    }

    /// The live ring in memory.
    pub fn ring_path(&self) -> &Path {
        &self.ring_path
    }

    pub fn vm_id(&self) -> [u8; 16] {
        self.fields.vm_id
    }

    pub fn capacity(&self) -> u64 {
        self.fields.capacity
    }

    // ---- the header's mutable fields -------------------------------------

    fn atomic_u64(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off.is_multiple_of(8) && off + 8 <= HEADER_SIZE);
        // SAFETY: the mapping is page-aligned and at least HEADER_SIZE long,
        // so `off` (a multiple of 8 inside the header) is aligned and in
        // bounds; the mapping lives as long as `self`, which the reference
        // borrows. All access to these words, in this process and others,
        // is atomic.
        unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(off).cast()) }
    }

    fn atomic_u32(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off.is_multiple_of(4) && off + 4 <= HEADER_SIZE);
        // SAFETY: as in `atomic_u64`, with 4-byte alignment.
        unsafe { AtomicU32::from_ptr(self.map.as_mut_ptr().add(off).cast()) }
    }

    fn head_word(&self) -> &AtomicU128 {
        // SAFETY: OFF_HEAD is 64, so the word is 16-byte aligned and inside
        // the mapping, which `self` keeps alive. Producers in every process
        // only touch it with 16-byte atomics (cmpxchg16b on x86_64, which
        // `AtomicU128::is_lock_free` confirms at open).
        unsafe { AtomicU128::from_ptr(self.map.as_mut_ptr().add(OFF_HEAD).cast()) }
    }

    /// The next position and sequence number a producer will reserve.
    pub fn head(&self) -> Position {
        Position::unpack(self.head_word().load(Ordering::Acquire))
    }

    /// The next position and sequence number the consumer will read.
    pub fn tail(&self) -> Position {
        Position::unpack(self.tail_word().load(Ordering::Acquire))
    }

    /// Moves the tail (the consumer only, after what it read is safe
    /// elsewhere). Frees the space for producers.
    /// Never moves it backwards: a consumer that raced a discard (which
    /// jumped the tail ahead) must not undo it.
    ///
    /// Nor past a published record its producer still reads (see
    /// [`InPlaceRecord`]): the tail waits for it a little, then stops just
    /// before it if it is still busy (a later move takes it further).
    pub fn set_tail(&self, tail: Position) {
        let tail = self.not_past_busy(tail);
        let word = self.tail_word();
        let mut cur = word.load(Ordering::Acquire);
        while Position::unpack(cur).pos < tail.pos {
            match word.compare_exchange_weak(cur, tail.pack(), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// `tail`, or the first busy record between the current tail and it.
    fn not_past_busy(&self, tail: Position) -> Position {
        // An image write takes microseconds; a front-end that died in one
        // leaves its record busy until its recovery releases it.
        const PATIENCE: std::time::Duration = std::time::Duration::from_millis(100);
        let mut at = self.tail();
        let mut waited = None;
        while at.pos < tail.pos {
            if self.is_busy(at.pos) {
                let since = *waited.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() < PATIENCE {
                    std::thread::sleep(std::time::Duration::from_micros(50));
                    continue;
                }
                return at;
            }
            match self.locate(at.pos) {
                Ok(Some((h, _, _))) => match after(at.pos, &h) {
                    Ok(next) => at = next,
                    Err(_) => return tail,
                },
                // The consumer read these records; anything else here is
                // for it to report, not for the tail to judge.
                _ => return tail,
            }
        }
        tail
    }

    fn tail_word(&self) -> &AtomicU128 {
        // SAFETY: OFF_TAIL is 128, 16-byte aligned inside the mapping, which
        // `self` keeps alive; every process touches it only with 16-byte
        // atomics, so position and sequence number never tear.
        unsafe { AtomicU128::from_ptr(self.map.as_mut_ptr().add(OFF_TAIL).cast()) }
    }

    /// Bytes reserved but not yet consumed.
    pub fn unconsumed_bytes(&self) -> u64 {
        self.head().pos.saturating_sub(self.tail().pos)
    }

    /// [`Journal::unconsumed_bytes`] as a fraction of the capacity.
    pub fn fill(&self) -> f64 {
        self.unconsumed_bytes() as f64 / self.fields.capacity as f64
    }

    pub fn mode(&self) -> Mode {
        if in_overflow(self.head_word().load(Ordering::Acquire)) {
            Mode::Overflow
        } else {
            Mode::Journal
        }
    }

    /// Switches to overflow mode: from now on every reservation fails until
    /// [`Journal::leave_overflow`]. Returns true for the caller that did it.
    pub fn enter_overflow(&self) -> bool {
        let word = self.head_word();
        let mut cur = word.load(Ordering::Acquire);
        loop {
            if in_overflow(cur) {
                return false;
            }
            let next = cur | (OVERFLOW_BIT as u128) << 64;
            match word.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        self.atomic_u64(OFF_OVERFLOW_SEQ).store(Position::unpack(cur).seq, Ordering::Release);
        true
    }

    /// Leaves overflow mode by publishing `opener` (the record that opens
    /// the resync window) as the first record after it, in the same
    /// reservation. Returns its sequence number, or `None` if the ring has
    /// no room for it yet (the ring stays in overflow).
    pub fn leave_overflow(&self, opener: &NewRecord) -> Option<u64> {
        self.append_with(opener, &[], true, commit_word).map(|(seq, _)| seq)
    }

    /// The head sequence number when the ring last overflowed.
    pub fn overflow_seq(&self) -> u64 {
        self.atomic_u64(OFF_OVERFLOW_SEQ).load(Ordering::Acquire)
    }

    /// Whether the last resync window marker published was an opener (so
    /// a front-end that starts knows whether a close is owed).
    pub fn window_open(&self) -> bool {
        self.atomic_u32(OFF_WINDOW).load(Ordering::Acquire) != 0
    }

    pub fn set_window_open(&self, open: bool) {
        self.atomic_u32(OFF_WINDOW).store(open as u32, Ordering::Release);
    }

    pub fn flags(&self) -> u32 {
        self.atomic_u32(OFF_FLAGS).load(Ordering::Acquire)
    }

    pub fn set_flags(&self, flags: u32) {
        self.atomic_u32(OFF_FLAGS).fetch_or(flags, Ordering::AcqRel);
    }

    pub fn clear_flags(&self, flags: u32) {
        self.atomic_u32(OFF_FLAGS).fetch_and(!flags, Ordering::AcqRel);
    }

    /// The boot the last front-end attached in (`/proc/sys/kernel/random/boot_id`).
    pub fn boot_id(&self) -> [u8; 16] {
        let lo = self.atomic_u64(OFF_BOOT_ID).load(Ordering::Acquire);
        let hi = self.atomic_u64(OFF_BOOT_ID + 8).load(Ordering::Acquire);
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&lo.to_le_bytes());
        b[8..].copy_from_slice(&hi.to_le_bytes());
        b
    }

    pub fn set_boot_id(&self, id: [u8; 16]) {
        let (lo, hi) = id.split_at(8);
        self.atomic_u64(OFF_BOOT_ID).store(u64::from_le_bytes(lo.try_into().unwrap_or_default()), Ordering::Release);
        self.atomic_u64(OFF_BOOT_ID + 8)
            .store(u64::from_le_bytes(hi.try_into().unwrap_or_default()), Ordering::Release);
    }

    /// How many times a front-end recovered this journal after a crash.
    pub fn recoveries(&self) -> u64 {
        self.atomic_u64(OFF_RECOVERIES).load(Ordering::Acquire)
    }

    // ---- producers --------------------------------------------------------

    /// Publishes an application-consistent marker (any process may: `tern
    /// tag` does, beside the front-end, or with none running). Returns its
    /// sequence number, or `None` if the ring takes no record now (full, or
    /// in overflow: no consistent point exists there).
    ///
    /// The tag's sequence number is durable before the tag can be read: it
    /// is reserved and filled, the journal synced (the durable head passes
    /// it), and only then published, and synced again. A tag published in
    /// the ring alone could be shipped and then lost with the ring (a
    /// reboot while no front-end ran to sync it), and the next write would
    /// get its number, which the shipper skips as shipped. Killed between
    /// the two, the tag is a hole the next front-end pads.
    ///
    /// `note` hears where the tag is reserved before it is published, so a
    /// process that outlives a killed tagger can pad its hole (see
    /// [`Journal::pad_abandoned_tag`]).
    pub fn append_tag(&self, label: &str, note: impl FnOnce(Position)) -> Result<Option<u64>> {
        if label.is_empty() || label.len() > 256 || label.chars().any(char::is_control) {
            return Err(Error::Invalid(format!("a tag label must be 1 to 256 bytes of printable text, got {label:?}")));
        }
        let rec = NewRecord { disk: 0, kind: RecordKind::Tag, offset: 0, length: label.len() as u32, flags: 0 };
        let data = label.as_bytes();
        let Some((at, pad)) = self.reserve(footprint(data.len()), false) else { return Ok(None) };
        if pad > 0 {
            self.write_record(at.pos, &RecordHeader::pad(at.seq, 0, pad), &[]);
        }
        let pos = at.pos + pad;
        let slot = self.slot(pos);
        self.copy_into_slot(slot, &rec.header(at.seq, data.len()).encode_with_checksum(data), data);
        note(Position { pos, seq: at.seq });
        if let Err(e) = self.sync() {
            // Never published: a pad takes its place (and its number).
            self.write_record(pos, &RecordHeader::pad(at.seq, 1, footprint(data.len())), &[]);
            return Err(e);
        }
        crate::fail::hit(crate::fail::Failpoint::TagReserved)
            .map_err(|source| Error::Sync { path: self.path.clone(), source })?;
        self.commit_word_at(slot).store(commit_word(pos), Ordering::Release);
        self.sync()?;
        Ok(Some(at.seq))
    }

    /// Pads the tag reserved at `at` if it is still unpublished: its
    /// producer died between reserving and publishing it (the caller knows
    /// it is dead), and the hole would stop the consumer for good. Whether
    /// it padded.
    pub fn pad_abandoned_tag(&self, at: Position) -> bool {
        if at.pos < self.tail().pos || at.pos >= self.head().pos || !matches!(self.locate(at.pos), Ok(None)) {
            return false;
        }
        match self.header_at(at.pos) {
            Ok((h, _, _)) if h.kind == RecordKind::Tag && h.seq == at.seq => {
                self.write_record(at.pos, &RecordHeader::pad(at.seq, 1, h.footprint()), &[]);
                log::warn!(
                    "journal {}: recovery mode skip-hole: the tag reserved at seq {} (position {}) was never published (its `tern tag` died); covering it with padding",
                    self.path.display(),
                    at.seq,
                    at.pos
                );
                true
            }
            _ => false,
        }
    }

    /// Publishes a record. Returns its sequence number, or `None` when the
    /// ring has no room for it (the caller marks the dirty bitmap instead).
    /// Never blocks: one compare-and-swap loop on the head, then copies.
    pub fn append(&self, rec: &NewRecord, data: &[u8]) -> Option<u64> {
        self.append_with(rec, data, false, commit_word).map(|(seq, _)| seq)
    }

    /// Publishes a record of a change its producer has yet to make to the
    /// source image: *busy* (see [`InPlaceRecord`]) until the returned
    /// [`BusyRecord`] is dropped, so the tail cannot pass it before the
    /// image has the change. Were it consumable at once, a shipper could
    /// ship it and move the tail past it, and a front-end that died before
    /// the image write would never re-apply it (recovery starts at the
    /// tail): the replica would hold a write the source lacks, forever.
    /// `None` when the ring has no room.
    pub fn append_busy(&self, rec: &NewRecord, data: &[u8]) -> Option<BusyRecord<'_>> {
        let (seq, pos) = self.append_with(rec, data, false, busy_word)?;
        Some(BusyRecord { journal: self, pos, seq })
    }

    /// Reserves, copies and publishes a record with `word(pos)` as its
    /// commit word; its sequence number and position.
    fn append_with(
        &self,
        rec: &NewRecord,
        data: &[u8],
        leave_overflow: bool,
        word: fn(u64) -> u64,
    ) -> Option<(u64, u64)> {
        debug_assert!(data.len() <= MAX_RECORD_DATA as usize);
        let (at, pad) = self.reserve(footprint(data.len()), leave_overflow)?;
        // The reservation [at.pos, at.pos + pad + footprint) is ours alone
        // until we publish it and the consumer moves past it.
        if pad > 0 {
            // A wrap pad stands for no sequence number of its own.
            self.write_record(at.pos, &RecordHeader::pad(at.seq, 0, pad), &[]);
        }
        let h = rec.header(at.seq, data.len());
        self.write_record_as(at.pos + pad, &h, data, word);
        Some((at.seq, at.pos + pad))
    }

    /// Reserves a record whose data the caller writes straight into the
    /// ring (see [`InPlaceRecord`]): a WRITE of `rec.length` bytes. `None`
    /// when the ring has no room (or is in overflow).
    pub fn reserve_in_place(&self, rec: &NewRecord) -> Option<InPlaceRecord<'_>> {
        debug_assert!(rec.kind == RecordKind::Write && rec.length <= MAX_RECORD_DATA);
        let len = rec.length as usize;
        let (at, pad) = self.reserve(footprint(len), false)?;
        if pad > 0 {
            self.write_record(at.pos, &RecordHeader::pad(at.seq, 0, pad), &[]);
        }
        let pos = at.pos + pad;
        let slot = self.slot(pos);
        let header = rec.header(at.seq, len);
        // The header first (its checksum comes with the data), then the
        // mark that says so: recovery then knows this record's exact span
        // and never looks for records inside data a client is sending. The
        // mark also replaces whatever an earlier lap left in the commit word.
        let mut head = [0u8; RECORD_HEADER_SIZE - 8];
        head[..36].copy_from_slice(&header.encode_body());
        self.copy_into_slot(slot, &head, &[]);
        self.commit_word_at(slot).store(receiving_word(pos), Ordering::Release);
        Some(InPlaceRecord { journal: self, pos, slot, header, state: InPlaceState::Receiving })
    }

    /// Reserves `total` bytes (plus the pad to the wrap, if the record
    /// would straddle it) and a sequence number with one CAS on the head.
    /// Fails in overflow mode, unless this reservation is the one that
    /// leaves it.
    fn reserve(&self, total: u64, leave_overflow: bool) -> Option<(Position, u64)> {
        let cap = self.fields.capacity;
        if total > cap {
            return None;
        }
        let word = self.head_word();
        let mut cur = word.load(Ordering::Acquire);
        loop {
            if in_overflow(cur) && !leave_overflow {
                return None;
            }
            let head = Position::unpack(cur);
            let slot = head.pos % cap;
            let pad = if slot + total > cap { cap - slot } else { 0 };
            let end = head.pos + pad + total;
            if end - self.tail().pos > cap {
                return None;
            }
            let next = Position { pos: end, seq: head.seq + 1 };
            match word.compare_exchange_weak(cur, next.pack(), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some((head, pad)),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Test hook: a producer that crashes between reserving and publishing.
    #[doc(hidden)]
    pub fn reserve_and_abandon(&self, data_len: usize) -> Option<Position> {
        self.reserve(footprint(data_len), false).map(|(at, _)| at)
    }

    /// Test hook: reserves and fills a record's slot but publishes it
    /// only when the returned function is called (a producer that is slow
    /// between the two).
    #[doc(hidden)]
    pub fn append_published_later(&self, rec: &NewRecord, data: &[u8]) -> impl FnOnce() + '_ {
        let (at, pad) = self.reserve(footprint(data.len()), false).expect("room in the ring");
        assert_eq!(pad, 0, "the test record must not wrap");
        let h = rec.header(at.seq, data.len());
        let slot = self.slot(at.pos);
        self.copy_into_slot(slot, &h.encode_with_checksum(data), data);
        move || self.commit_word_at(slot).store(commit_word(at.pos), Ordering::Release)
    }

    /// Test hook: the resync that leaves overflow mode crashes between
    /// reserving the window's opener and publishing it.
    #[doc(hidden)]
    pub fn leave_overflow_and_abandon(&self) -> Option<Position> {
        self.reserve(footprint(0), true).map(|(at, pad)| Position { pos: at.pos + pad, seq: at.seq })
    }

    /// Copies a record into its reserved slot and publishes it.
    fn write_record(&self, pos: u64, h: &RecordHeader, data: &[u8]) {
        self.write_record_as(pos, h, data, commit_word)
    }

    /// [`Journal::write_record`] with `word(pos)` as the commit word (busy,
    /// for [`Journal::append_busy`]).
    fn write_record_as(&self, pos: u64, h: &RecordHeader, data: &[u8], word: fn(u64) -> u64) {
        let slot = self.slot(pos);
        debug_assert!(slot as u64 + footprint(data.len()) <= self.fields.capacity);
        self.copy_into_slot(slot, &h.encode_with_checksum(data), data);
        self.commit_word_at(slot).store(word(pos), Ordering::Release);
    }

    /// Copies header bytes 8..48 and the data into a slot through the
    /// mapping. The ring is allocated memory (tmpfs, allocated in full), so
    /// this is a plain copy: no fault, no writeback.
    fn copy_into_slot(&self, slot: usize, head: &[u8; RECORD_HEADER_SIZE - 8], data: &[u8]) {
        // SAFETY: the slot lies inside the data area with room for the data
        // (a record never straddles the wrap) and was reserved by the caller
        // through the head CAS, so no other producer writes it and the
        // consumer does not read it before the commit store that follows.
        // The mapping outlives this call because `self` owns it.
        unsafe {
            let base = self.map.as_mut_ptr().add(HEADER_SIZE + slot);
            std::ptr::copy_nonoverlapping(head.as_ptr(), base.add(8), head.len());
            std::ptr::copy_nonoverlapping(data.as_ptr(), base.add(RECORD_HEADER_SIZE), data.len());
        }
    }

    fn commit_word_at(&self, slot: usize) -> &AtomicU64 {
        // SAFETY: slots are 64-byte aligned inside the data area, which is
        // page-aligned; the mapping lives as long as `self`.
        unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(HEADER_SIZE + slot).cast()) }
    }

    // ---- the consumer -----------------------------------------------------

    /// Reads the record at `pos`, copying its data into `data` (resized to
    /// fit). The copy is verified, so a producer (or another process)
    /// scribbling on the ring afterwards cannot change what was checked.
    /// `Err` describes a published record that fails validation.
    pub fn read(&self, pos: u64, data: &mut Vec<u8>) -> std::result::Result<ReadOutcome, String> {
        let Some((h, crc, slot)) = self.locate(pos)? else { return Ok(ReadOutcome::NotPublished) };
        if !self.copy_checked(&h, crc, slot, data) {
            return Err(format!("record at position {pos} (seq {}) fails its checksum", h.seq));
        }
        Ok(ReadOutcome::Record(h))
    }

    /// Finds the published record at `pos`: its header, stored checksum and
    /// slot, all bounds checked. `None` when nothing is published there.
    fn locate(&self, pos: u64) -> std::result::Result<Option<(RecordHeader, u32, usize)>, String> {
        if !pos.is_multiple_of(RECORD_ALIGN) {
            return Err(format!("position {pos} is not aligned"));
        }
        let slot = self.slot(pos);
        let commit = self.commit_word_at(slot).load(Ordering::Acquire);
        if commit != commit_word(pos) && commit != busy_word(pos) {
            return Ok(None);
        }
        self.header_at(pos).map(Some)
    }

    /// Where a position lies in the data area.
    fn slot(&self, pos: u64) -> usize {
        (pos % self.fields.capacity) as usize
    }

    /// Whether the record at `pos` is published and its producer still
    /// reads it (see [`InPlaceRecord`]).
    fn is_busy(&self, pos: u64) -> bool {
        self.commit_word_at(self.slot(pos)).load(Ordering::Acquire) == busy_word(pos)
    }

    /// Releases the record at `pos` if it is busy: a front-end attaching
    /// or recovering, when no producer can still be reading it.
    fn release_if_busy(&self, pos: u64) {
        let _ = self.commit_word_at(self.slot(pos)).compare_exchange(
            busy_word(pos),
            commit_word(pos),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// The record header at `pos` (aligned), published or not: its header,
    /// stored checksum and slot, bounds checked. Bytes there are only
    /// trusted once the checksum over them and the data holds.
    fn header_at(&self, pos: u64) -> std::result::Result<(RecordHeader, u32, usize), String> {
        let cap = self.fields.capacity;
        let slot = self.slot(pos);
        let mut raw = [0u8; RECORD_HEADER_SIZE];
        // SAFETY: the slot and its 48-byte header lie inside the data area
        // (slot is aligned, capacity a multiple of 64); the mapping lives as
        // long as `self`. The bytes are copied out before being trusted.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_mut_ptr().add(HEADER_SIZE + slot), raw.as_mut_ptr(), raw.len());
        }
        let body: &[u8; 36] = raw[8..44].try_into().map_err(|_| "short header".to_string())?;
        let h = RecordHeader::decode_body(body).map_err(|e| format!("record at position {pos}: {e}"))?;
        let span = h.footprint();
        if span == 0 || !span.is_multiple_of(RECORD_ALIGN) || slot as u64 + span > cap {
            return Err(format!("record at position {pos} spans {span} bytes, past the end of the ring"));
        }
        Ok((h, u32_at(&raw, 44), slot))
    }

    /// Copies a located record's data into `data`; whether it matches the
    /// record's checksum.
    fn copy_checked(&self, h: &RecordHeader, crc: u32, slot: usize, data: &mut Vec<u8>) -> bool {
        let n = h.data_len as usize;
        data.clear();
        data.reserve(n);
        // SAFETY: `header_at` checked that the record, data included, lies
        // inside the data area; the mapping lives as long as `self`; `data`
        // has room for `n` bytes, which the copy initializes before
        // `set_len` exposes them.
        unsafe {
            std::ptr::copy_nonoverlapping(self.data_ptr(slot), data.as_mut_ptr(), n);
            data.set_len(n);
        }
        h.checksum(data) == crc
    }

    fn data_ptr(&self, slot: usize) -> *const u8 {
        // SAFETY: callers pass a slot inside the data area; the record data
        // follows its 48-byte header within the record's span.
        unsafe { self.map.as_mut_ptr().add(HEADER_SIZE + slot + RECORD_HEADER_SIZE) }
    }

    /// Reads published records in order from `start` (normally the tail),
    /// skipping pads and checking that sequence numbers are dense.
    pub fn cursor(&self, start: Position) -> Cursor<'_> {
        Cursor { journal: self, at: start }
    }

    fn bad(&self, reason: String) -> Error {
        Error::Format { path: self.path.clone(), what: "journal", reason }
    }

    /// Empties the ring after a host crash: zeroes the live ring's data area
    /// (no stale record can look published again), moves the tail to the
    /// head and makes it durable. Returns the position both are at.
    pub fn discard_unconsumed(&self) -> Result<Position> {
        use nix::fcntl::FallocateFlags as F;
        use std::os::fd::AsRawFd;
        let (start, len) = (HEADER_SIZE as i64, self.fields.capacity as i64);
        let fd = self.ring.as_raw_fd();
        let punched = nix::fcntl::fallocate(fd, F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE, start, len);
        let zeroed = match punched {
            // Allocate again, so a store into the mapping never meets a hole.
            Ok(()) => nix::fcntl::fallocate(fd, F::empty(), start, len).map_err(std::io::Error::from),
            Err(_) => {
                let zeroes = vec![0u8; 1 << 20];
                use std::os::unix::fs::FileExt;
                (0..self.fields.capacity).step_by(1 << 20).try_for_each(|off| {
                    let n = (1u64 << 20).min(self.fields.capacity - off) as usize;
                    self.ring.write_all_at(&zeroes[..n], HEADER_SIZE as u64 + off)
                })
            }
        };
        zeroed.map_err(|source| Error::Write {
            path: self.ring_path.clone(),
            offset: HEADER_SIZE as u64,
            len: len as usize,
            source,
        })?;
        // Sequence numbers jump ahead: the durable header may be older than
        // what the shipper already shipped (its tail moves are not synced),
        // so continuing from the saved head could reuse shipped numbers.
        // The jump makes the gap unmistakable: the shipper starts an epoch.
        let word = self.head_word();
        let mut cur = word.load(Ordering::Acquire);
        let jumped = loop {
            let h = Position::unpack(cur);
            let next = Position { pos: h.pos, seq: h.seq + SEQ_JUMP_AFTER_DISCARD };
            let flag = cur & ((OVERFLOW_BIT as u128) << 64);
            match word.compare_exchange(cur, next.pack() | flag, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break next,
                Err(actual) => cur = actual,
            }
        };
        self.tail_word().store(jumped.pack(), Ordering::Release);
        self.sync()?;
        Ok(jumped)
    }

    /// Bytes of the ring the next [`Journal::sync`] writes to the durable
    /// file: records neither consumed nor synced yet.
    pub fn unsynced_bytes(&self) -> u64 {
        let synced = self.synced.lock().unwrap_or_else(|p| p.into_inner()).to;
        self.head().pos.saturating_sub(synced.max(self.tail().pos))
    }

    /// Makes the header and every record published so far durable: the
    /// group commit behind FLUSH and FUA (invariant 3). Writes the records
    /// reserved since the last sync that the consumer has not taken yet
    /// (those it took are already durable in the cache store, invariant
    /// 5), then a snapshot of the header, then `fdatasync`. A shipper that
    /// keeps up leaves almost nothing to write; FLUSHes that find nothing
    /// changed since the last sync (another connection's, just before)
    /// write nothing.
    pub fn sync(&self) -> Result<()> {
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        // Other processes (`tern tag`, an offline resync) sync too; one at a
        // time, so the durable header only moves forward.
        let _lock = FileLock::exclusive(&self.durable, &self.path)?;
        let (tail, head) = self.head_and_tail();
        let to = Position::unpack(head).pos;
        let from = synced.to.max(Position::unpack(tail).pos);
        let header = self.header_snapshot(head, tail);
        if from >= to && header == synced.header {
            return Ok(());
        }
        // Where the published records from `from` end. A slot still being
        // filled may be copied unpublished or half-written now, so the next
        // sync copies it again, and everything after it: its write is
        // acknowledged only after it is published, and a FLUSH that must
        // cover it comes after that. Records published after such a slot
        // are copied now all the same: their writes may be acknowledged.
        // A busy record (published, its producer still writing the image
        // from it) ends it too: its copy carries the busy mark, which must
        // not be what the durable file keeps once it is released.
        let mut published_to = from;
        while published_to < to {
            match self.locate(published_to) {
                Ok(Some((h, _, _))) if !self.is_busy(published_to) => published_to += h.footprint(),
                _ => break,
            }
        }
        let cap = self.fields.capacity;
        let mut pos = from;
        while pos < to {
            let slot = pos % cap;
            let n = (to - pos).min(cap - slot);
            self.write_durable(HEADER_SIZE as u64 + slot, n as usize)?;
            pos += n;
        }
        crate::fail::hit(crate::fail::Failpoint::JournalRecordsWritten)
            .map_err(|source| Error::Sync { path: self.path.clone(), source })?;
        use std::os::unix::fs::FileExt;
        self.durable.write_all_at(&header, 0).map_err(|source| Error::Write {
            path: self.path.clone(),
            offset: 0,
            len: header.len(),
            source,
        })?;
        self.durable.sync_data().map_err(|source| Error::Sync { path: self.path.clone(), source })?;
        *synced = Synced { to: published_to, header };
        Ok(())
    }

    /// The head and tail words as they stood together at one instant. Read
    /// apart, the consumer could move the tail between the two loads and
    /// producers reserve into the space it freed: a tail read first would
    /// then lag the head by more than the capacity (a header
    /// `Journal::open` refuses after a reboot), a tail read last could pass
    /// the head. So the tail is read on both sides of the head, until it
    /// stood still (it only grows, so equal means unchanged).
    fn head_and_tail(&self) -> (u128, u128) {
        loop {
            let tail = self.tail_word().load(Ordering::Acquire);
            #[cfg(test)]
            tests_hook::between_tail_and_head();
            let head = self.head_word().load(Ordering::Acquire);
            if self.tail_word().load(Ordering::Acquire) == tail {
                return (tail, head);
            }
        }
    }

    /// Copies `len` bytes of the live ring at file offset `at` to the same
    /// offset of the durable file. Some of them may be slots producers are
    /// still filling: the kernel copies whatever is there (see `sync`).
    fn write_durable(&self, at: u64, len: usize) -> Result<()> {
        use std::os::fd::AsRawFd;
        let mut done = 0;
        while done < len {
            // SAFETY: `at + len` lies inside the mapping (the header plus a
            // range of the data area that does not cross the wrap); the
            // mapping lives as long as `self`. The kernel reads the bytes;
            // no Rust reference to memory other threads write is formed.
            let n = unsafe {
                libc::pwrite(
                    self.durable.as_raw_fd(),
                    self.map.as_ptr().add(at as usize + done).cast(),
                    len - done,
                    (at as usize + done) as libc::off_t,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => {
                    return Err(Error::Write {
                        path: self.path.clone(),
                        offset: at + done as u64,
                        len: len - done,
                        source: std::io::ErrorKind::WriteZero.into(),
                    })
                }
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(Error::Write {
                            path: self.path.clone(),
                            offset: at + done as u64,
                            len: len - done,
                            source: e,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The header as it is now, with the given head and tail words, each
    /// field read atomically.
    fn header_snapshot(&self, head: u128, tail: u128) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[..48].copy_from_slice(&self.fields.encode());
        b[OFF_HEAD..OFF_HEAD + 16].copy_from_slice(&head.to_le_bytes());
        b[OFF_TAIL..OFF_TAIL + 16].copy_from_slice(&tail.to_le_bytes());
        b[OFF_WINDOW..OFF_WINDOW + 4]
            .copy_from_slice(&self.atomic_u32(OFF_WINDOW).load(Ordering::Acquire).to_le_bytes());
        b[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&self.flags().to_le_bytes());
        for off in [OFF_BOOT_ID, OFF_BOOT_ID + 8, OFF_OVERFLOW_SEQ, OFF_RECOVERIES] {
            b[off..off + 8].copy_from_slice(&self.atomic_u64(off).load(Ordering::Acquire).to_le_bytes());
        }
        b
    }
}

/// Where the record after `h` (at `pos`) starts, and its sequence number.
fn after(pos: u64, h: &RecordHeader) -> std::result::Result<Position, String> {
    let count = if h.kind == RecordKind::Pad { h.offset } else { 1 };
    let seq = h.seq.checked_add(count).ok_or_else(|| format!("record at position {pos} has an impossible seq"))?;
    Ok(Position { pos: pos + h.footprint(), seq })
}

/// Iterates published records; see [`Journal::cursor`].
#[derive(Debug)]
pub struct Cursor<'a> {
    journal: &'a Journal,
    at: Position,
}

impl Cursor<'_> {
    /// Where the next record would start.
    pub fn position(&self) -> Position {
        self.at
    }

    /// The next published record (its data in `data`), `None` at the first
    /// unpublished position, or an error naming what is wrong.
    pub fn next(&mut self, data: &mut Vec<u8>) -> std::result::Result<Option<RecordHeader>, String> {
        loop {
            if self.at.pos >= self.journal.head().pos {
                return Ok(None);
            }
            let outcome = self.journal.read(self.at.pos, data)?;
            let h = match outcome {
                ReadOutcome::NotPublished => return Ok(None),
                ReadOutcome::Record(h) => h,
            };
            if h.seq != self.at.seq {
                return Err(format!(
                    "record at position {} has seq {}, expected {} (a gap in the journal)",
                    self.at.pos, h.seq, self.at.seq
                ));
            }
            self.at = after(self.at.pos, &h)?;
            // A pad at the wrap is only filler; a pad over a crashed
            // producer's hole stands for sequence numbers (its `offset`)
            // that a consumer must account for.
            if h.kind != RecordKind::Pad || h.offset > 0 {
                return Ok(Some(h));
            }
        }
    }
}

/// Reads and validates the immutable part of a journal header.
fn read_fields(f: &File, path: &Path) -> Result<HeaderFields> {
    use std::os::unix::fs::FileExt;
    let len = f.metadata().map_err(|source| Error::Open { path: path.to_owned(), source })?.len();
    let mut head = [0u8; 48];
    f.read_exact_at(&mut head, 0).map_err(|_| Error::Format {
        path: path.to_owned(),
        what: "journal",
        reason: format!("file is only {len} bytes"),
    })?;
    HeaderFields::decode(&head, len).map_err(|reason| Error::Format { path: path.to_owned(), what: "journal", reason })
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Lock-freedom of the 16-byte head is what lets producers in several
/// processes share it; refuse to run where it would be a process-local lock.
pub(crate) fn check_lock_free() -> Result<()> {
    if AtomicU128::is_lock_free() {
        Ok(())
    } else {
        Err(Error::Invalid(
            "this CPU has no lock-free 16-byte compare-and-swap (cmpxchg16b); tern's journal needs it".into(),
        ))
    }
}

#[cfg(test)]
pub(super) mod tests_hook {
    use std::sync::Mutex;

    pub type Hook = Box<dyn FnOnce() + Send>;
    pub static BETWEEN_TAIL_AND_HEAD: Mutex<Option<Hook>> = Mutex::new(None);

    pub fn between_tail_and_head() {
        let hook = BETWEEN_TAIL_AND_HEAD.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(hook) = hook {
            hook();
        }
    }
}
