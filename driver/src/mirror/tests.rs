//! Unit tests of the mirror: writes journaled before they reach the image,
//! overflow into the bitmaps, resync, and recovery after crashes.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use rand::{Rng, SeedableRng};

use super::*;
use crate::journal::Position;
use crate::units::Size;
use crate::vm::{enable_at, EnableSpec, JournalConfig, Policy};

struct Setup {
    _dir: tempfile::TempDir,
    paths: VmPaths,
    image: PathBuf,
    /// The image as it was at `enable`, for the journal oracle.
    original: PathBuf,
}

fn setup(disk_size: u64, journal: u64, region: u64) -> Setup {
    setup_in(&std::env::temp_dir(), disk_size, journal, region)
}

fn setup_in(base: &Path, disk_size: u64, journal: u64, region: u64) -> Setup {
    let dir = tempfile::tempdir_in(base).unwrap();
    let image = dir.path().join("disk0.img");
    // Enabled while empty (nothing to sync, no resync window), then filled
    // behind tern's back: the tests start from a replica that is "in sync"
    // with content, and the bitmap shows only what the test itself causes.
    fs::File::create(&image).unwrap().set_len(disk_size).unwrap();
    let state = dir.path().join("state");
    let paths = VmPaths::new(&state, "vm").unwrap().with_ring_dir(&dir.path().join("rings"));
    enable_at(
        &paths,
        &EnableSpec {
            name: "vm".into(),
            disks: vec![("disk0".into(), image.clone())],
            cache: dir.path().join("cache"),
            key: None,
            target: dir.path().join("target"),
            journal: JournalConfig { size: Size(journal), region_size: Size(region) },
            policy: Policy::default(),
            app_points: Default::default(),
            launch: Default::default(),
            initial_sync: Default::default(),
        },
    )
    .unwrap();
    let mut content = vec![0u8; disk_size as usize];
    rand::rngs::StdRng::seed_from_u64(7).fill(&mut content[..]);
    fs::write(&image, &content).unwrap();
    let original = dir.path().join("original.img");
    fs::copy(&image, &original).unwrap();
    Setup { _dir: dir, paths, image, original }
}

/// The journal oracle: replays every record from the first onto a copy of
/// the image as it was at enable.
fn replay_journal_onto(journal: &Journal, copy: &Path) -> u64 {
    let image = Image::open(copy).unwrap();
    let mut cursor = journal.cursor(Position { pos: 0, seq: 1 });
    let mut data = Vec::new();
    let mut n = 0;
    while let Some(h) = cursor.next(&mut data).unwrap() {
        apply_record(std::slice::from_ref(&image), &h, &data).unwrap();
        n += h.kind.changes_disk() as u64;
    }
    n
}

fn assert_same_file(a: &Path, b: &Path) {
    let (x, y) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    assert_eq!(x.len(), y.len());
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ first at byte {i}", a.display(), b.display());
    }
}

#[test]
fn journal_replay_equals_source_after_concurrent_overlapping_writes() {
    let s = setup(1 << 20, 64 << 20, 65536);
    let mirror = Arc::new(Mirror::open(&s.paths, MirrorOptions::default()).unwrap());
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let m = mirror.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                for i in 0..400u64 {
                    // A 64 KiB hot spot: nearly every request overlaps others.
                    let off = rng.gen_range(0..60_000u64);
                    let len = rng.gen_range(1..5000u64);
                    match rng.gen_range(0..10) {
                        0 => m.zero(0, off, len, ZeroMode { may_punch: i % 2 == 0, fast_only: false }, false).unwrap(),
                        1 => m.trim(0, off, len, false).unwrap(),
                        _ => {
                            let fill = (t * 1000 + i) as u8;
                            m.write(0, off, &vec![fill; len as usize], i % 50 == 0).unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    mirror.shutdown().unwrap();
    let records = replay_journal_onto(mirror.journal(), &s.original);
    assert_eq!(records, 8 * 400);
    assert_same_file(&s.image, &s.original);
}

#[test]
fn full_ring_marks_exactly_the_later_writes_in_the_bitmap() {
    let region = 4096;
    let s = setup(4 << 20, 64 * 1024, region);
    let mirror = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
    // Each 4 KiB write takes 4160 ring bytes; 64 KiB holds 15 of them.
    let writes: Vec<u64> = (0..200u64).map(|i| (i * 7 % 1000) * region).collect();
    for (i, &off) in writes.iter().enumerate() {
        mirror.write(0, off, &[i as u8; 4096], false).unwrap();
    }
    assert_eq!(mirror.journal().mode(), Mode::Overflow);
    let mut journaled = Vec::new();
    let mut cursor = mirror.journal().cursor(Position { pos: 0, seq: 1 });
    let mut data = Vec::new();
    while let Some(h) = cursor.next(&mut data).unwrap() {
        journaled.push(h.offset);
    }
    assert_eq!(journaled, writes[..journaled.len()].to_vec(), "the journal holds a prefix of the writes");
    assert_eq!(journaled.len(), 15);
    let mut expected: Vec<(u64, u64)> = writes[journaled.len()..].iter().map(|&o| (o, region)).collect();
    expected.sort();
    expected.dedup();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (o, l) in expected {
        match merged.last_mut() {
            Some((mo, ml)) if *mo + *ml == o => *ml += l,
            _ => merged.push((o, l)),
        }
    }
    assert_eq!(mirror.dirty_ranges(0), merged);
    // The writes themselves all reached the source.
    let mut buf = vec![0u8; 4096];
    mirror.read(0, writes[199], &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 199));
}

#[test]
fn crash_recovery_reapplies_the_tail_and_pads_abandoned_reservations() {
    let s = setup(1 << 20, 1 << 20, 65536);
    {
        let mirror = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
        mirror.write(0, 0, &[1; 8192], false).unwrap();
        // A producer that reserved and died before publishing.
        mirror.journal().reserve_and_abandon(4096).unwrap();
        mirror.write(0, 4096, &[2; 4096], false).unwrap();
        mirror.zero(0, 100_000, 5000, ZeroMode::default(), false).unwrap();
        // The process dies: no shutdown, the journal stays attached.
    }
    // Pretend the last image writes never reached the page cache: recovery
    // must put them back from the journal.
    let img = Image::open(&s.image).unwrap();
    img.write_at(&[0xee; 16384], 0).unwrap();
    img.write_at(&[0xee; 5000], 100_000).unwrap();

    let mirror = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
    let report = mirror.recovery().cloned().unwrap();
    assert_eq!(report.records, 3);
    assert_eq!(report.holes, 1);
    assert_eq!(report.lost_seqs, 1);
    let mut buf = vec![0u8; 12288];
    mirror.read(0, 0, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 1));
    assert!(buf[4096..8192].iter().all(|&b| b == 2));
    mirror.shutdown().unwrap();
    // The 0xee bytes at 8192..16384 were never journaled: the oracle
    // reproduces everything but them.
    img.write_at(&fs::read(&s.original).unwrap()[8192..16384], 8192).unwrap();
    let records = replay_journal_onto(mirror.journal(), &s.original);
    assert_eq!(records, 3);
    assert_same_file(&s.image, &s.original);
}

#[test]
fn in_place_and_ordinary_writes_from_many_threads_replay_exactly() {
    let s = setup(1 << 20, 64 << 20, 65536);
    let mirror = Arc::new(Mirror::open(&s.paths, MirrorOptions::default()).unwrap());
    let in_place = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (m, in_place) = (mirror.clone(), in_place.clone());
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(100 + t);
                for i in 0..400u64 {
                    // A 64 KiB hot spot: overlapping writes race for it.
                    let off = rng.gen_range(0..60_000u64);
                    let len = rng.gen_range(1..5000u64);
                    let fill = (t * 1000 + i) as u8;
                    match m.begin_write_in_place(0, off, len) {
                        Some(mut w) => {
                            w.buffer().fill(fill);
                            w.finish(i % 50 == 0).unwrap();
                            in_place.fetch_add(1, Ordering::Relaxed);
                        }
                        // An overlapping write holds the range: the
                        // ordinary path waits for it.
                        None => m.write(0, off, &vec![fill; len as usize], false).unwrap(),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    mirror.shutdown().unwrap();
    assert!(in_place.load(Ordering::Relaxed) > 1000, "most writes went in place");
    assert_eq!(replay_journal_onto(mirror.journal(), &s.original), 8 * 400);
    assert_same_file(&s.image, &s.original);
}

#[test]
fn an_in_place_write_never_waits_for_an_overlapping_one_nor_journals_when_off() {
    let s = setup(1 << 20, 1 << 20, 65536);
    let m = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
    let first = m.begin_write_in_place(0, 0, 8192).expect("in place");
    assert!(m.begin_write_in_place(0, 4096, 8192).is_none(), "overlaps a write in flight");
    assert!(m.begin_write_in_place(0, 1 << 20, 1).is_none(), "past the end: the ordinary path refuses it");
    drop(first);
    assert!(m.begin_write_in_place(0, 4096, 8192).is_some());
    m.shutdown().unwrap();
    drop(m);
    let options = MirrorOptions { journal: false, ..Default::default() };
    let m = Mirror::open(&s.paths, options).unwrap();
    assert!(m.begin_write_in_place(0, 0, 4096).is_none(), "journaling off");
}

#[test]
fn an_in_place_write_dropped_mid_payload_leaves_the_image_and_a_passable_pad() {
    let s = setup(1 << 20, 1 << 20, 65536);
    let m = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
    let mut w = m.begin_write_in_place(0, 0, 8192).unwrap();
    w.buffer()[..4096].fill(9); // the client hung up half way
    drop(w);
    m.write(0, 8192, &[3; 4096], false).unwrap();
    m.shutdown().unwrap();
    let mut c = m.journal().cursor(Position { pos: 0, seq: 1 });
    let mut data = Vec::new();
    let pad = c.next(&mut data).unwrap().unwrap();
    assert_eq!((pad.kind, pad.offset), (RecordKind::Pad, 1), "a pad standing for the write's seq");
    assert_eq!(c.next(&mut data).unwrap().unwrap().seq, 2);
    assert_eq!(replay_journal_onto(m.journal(), &s.original), 1);
    assert_same_file(&s.image, &s.original);
}

#[test]
fn crash_recovery_reapplies_a_busy_in_place_write_and_pads_a_hole_and_one_still_receiving_exactly() {
    let s = setup(1 << 20, 1 << 20, 65536);
    {
        let mirror = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
        // A producer that died between reserving and writing anything: a
        // hole whose end recovery must find by scanning.
        mirror.journal().reserve_and_abandon(4096).unwrap();
        // Dies receiving the payload: never published, image untouched.
        // The client had sent, inside it, bytes that look like a published
        // record at the next 64-byte boundary: neither recovery's scan for
        // the hole's end nor its handling of this record may take it.
        let mut receiving = mirror.begin_write_in_place(0, 0, 16384).unwrap();
        let forged_at = receiving.record.position() + 64;
        let forged = RecordHeader {
            seq: receiving.record.seq() + 1,
            offset: 300_000,
            time_ns: 0,
            length: 4096,
            data_len: 4096,
            disk: 0,
            kind: RecordKind::Write,
            flags: 0,
        };
        let buf = receiving.buffer();
        buf[16..24].copy_from_slice(&journal::format::commit_word(forged_at).to_le_bytes());
        buf[24..64].copy_from_slice(&forged.encode_with_checksum(&[0x66; 4096]));
        buf[64..64 + 4096].fill(0x66);
        // Dies after publishing, before writing the image.
        let mut writing = mirror.begin_write_in_place(0, 65536, 8192).unwrap();
        writing.buffer().fill(2);
        writing.record.publish();
        // Published after both.
        mirror.write(0, 131072, &[3; 4096], false).unwrap();
        std::mem::forget(receiving);
        std::mem::forget(writing);
        // The process dies: no shutdown, the journal stays attached.
    }
    let mirror = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
    let report = mirror.recovery().cloned().unwrap();
    assert_eq!(report.records, 2, "{report:?}");
    assert_eq!((report.holes, report.lost_seqs), (2, 2), "{report:?}");
    let mut buf = vec![0u8; 8192];
    mirror.read(0, 65536, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 2), "the published write is re-applied");
    let mut forged_target = vec![0u8; 4096];
    mirror.read(0, 300_000, &mut forged_target).unwrap();
    assert!(forged_target == fs::read(&s.original).unwrap()[300_000..304_096], "the forged record was applied");
    mirror.shutdown().unwrap();
    // The journal is the history of the image.
    assert_eq!(replay_journal_onto(mirror.journal(), &s.original), 2);
    assert_same_file(&s.image, &s.original);
}

#[test]
fn clean_shutdown_needs_no_recovery() {
    let s = setup(1 << 20, 1 << 20, 65536);
    let m = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
    m.write(0, 0, &[1; 512], true).unwrap();
    m.shutdown().unwrap();
    assert!(matches!(m.write(0, 0, &[1], false), Err(Error::ShuttingDown)));
    drop(m);
    let m = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
    assert!(m.recovery().is_none());
}

#[test]
fn a_clean_attach_pads_a_hole_another_process_left_so_the_consumer_passes_it() {
    let s = setup(1 << 20, 1 << 20, 65536);
    let m = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
    m.write(0, 0, &[1; 4096], false).unwrap();
    // A `tern tag` beside the front-end reserves, then dies unpublished
    // (and before it could note where).
    m.journal().reserve_and_abandon(16).unwrap();
    m.write(0, 4096, &[2; 4096], false).unwrap();
    m.shutdown().unwrap();
    drop(m);
    let m = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
    assert!(m.recovery().is_none(), "a clean attach, not a recovery");
    let (mut cursor, mut data, mut seqs) = (m.journal().cursor(m.journal().tail()), Vec::new(), Vec::new());
    while let Some(h) = cursor.next(&mut data).unwrap() {
        seqs.push((h.seq, h.kind));
    }
    assert_eq!(seqs, vec![(1, RecordKind::Write), (2, RecordKind::Pad), (3, RecordKind::Write)]);
    assert_eq!(cursor.position(), m.journal().head(), "the consumer reaches the head");
}

/// A front-end starting while a tagger of another process is between
/// reserving and publishing (`tern tag` in its sync, a group cut under
/// its barrier) padded the live tag as a dead producer's hole; the tagger
/// then "published" over the pad and reported the tag taken. It waits.
#[test]
fn an_attach_waits_for_a_tagger_at_work_instead_of_padding_its_tag() {
    let s = setup(1 << 20, 1 << 20, 65536);
    let journal = s.paths.open_journal().unwrap();
    let lock_path = s.paths.tag_lock();
    let mut cut = crate::tag::GroupTagLock::acquire(&journal, &lock_path, b"{}").unwrap();
    let seq = cut.reserve(b"{}").unwrap().expect("room in the ring");
    let paths = s.paths.clone();
    let opening = std::thread::spawn(move || Mirror::open(&paths, MirrorOptions::default()));
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!opening.is_finished(), "the front-end waits for the tagger");
    cut.publish().unwrap();
    drop(cut);
    let m = opening.join().unwrap().unwrap();
    let (mut cursor, mut data) = (m.journal().cursor(m.journal().tail()), Vec::new());
    let mut kinds = Vec::new();
    while let Some(h) = cursor.next(&mut data).unwrap() {
        kinds.push((h.seq, h.kind));
    }
    assert!(kinds.contains(&(seq, RecordKind::Tag)), "the tag is in the stream: {kinds:?}");
}

#[test]
fn a_second_frontend_is_refused_with_the_holders_pid() {
    let s = setup(1 << 20, 1 << 20, 65536);
    let _m = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
    let err = Mirror::open(&s.paths, MirrorOptions::default()).unwrap_err();
    assert!(err.to_string().contains(&std::process::id().to_string()), "{err}");
}

#[test]
fn out_of_range_and_overflowing_requests_are_refused_without_journaling() {
    let s = setup(1 << 20, 1 << 20, 65536);
    let m = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
    let head = m.journal().head();
    assert!(matches!(m.write(0, (1 << 20) - 1, &[0; 2], false), Err(Error::OutOfRange { .. })));
    assert!(matches!(m.zero(0, u64::MAX - 1, 4, ZeroMode::default(), false), Err(Error::OutOfRange { .. })));
    assert!(m.trim(3, 0, 1, false).is_err());
    assert_eq!(m.journal().head(), head);
}

#[test]
fn resized_disk_is_refused() {
    let s = setup(1 << 20, 1 << 20, 65536);
    fs::OpenOptions::new().write(true).open(&s.image).unwrap().set_len(2 << 20).unwrap();
    let err = Mirror::open(&s.paths, MirrorOptions::default()).unwrap_err();
    assert!(err.to_string().contains("resizing"), "{err}");
}

#[test]
fn crash_in_overflow_mode_never_rolls_back_a_later_unjournaled_write() {
    let region = 4096;
    let s = setup(4 << 20, 64 * 1024, region);
    {
        let m = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
        m.write(0, 0, &[0xaa; 4096], false).unwrap(); // journaled
        for i in 1..40u64 {
            m.write(0, i * region, &[1; 4096], false).unwrap(); // fills the ring
        }
        assert_eq!(m.journal().mode(), Mode::Overflow);
        m.write(0, 0, &[0xbb; 4096], true).unwrap(); // bitmap only, flushed
                                                     // The process dies.
    }
    let m = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
    let mut buf = vec![0u8; 4096];
    m.read(0, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xbb), "recovery rolled back an acknowledged write");
    assert!(m.dirty_ranges(0).iter().any(|&(o, _)| o == 0), "the region must await resync");
    assert!(m.recovery().unwrap().records > 0);
}

#[test]
fn after_a_host_crash_the_unconsumed_journal_is_discarded_and_a_checksum_resync_flagged() {
    let s = setup(1 << 20, 1 << 20, 65536);
    {
        let m = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
        m.write(0, 0, &[3; 8192], false).unwrap();
        // Pretend this ran in an earlier boot.
        m.journal().set_boot_id([0x42; 16]);
    }
    let m = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
    let j = m.journal();
    assert_ne!(j.flags() & journal::FLAG_CHECKSUM_RESYNC, 0);
    let jump = crate::journal::SEQ_JUMP_AFTER_DISCARD;
    assert_eq!(j.tail().seq, 2 + jump, "the discarded records are consumed, and numbers jump ahead");
    assert!(
        j.cursor(Position { pos: 0, seq: 1 }).next(&mut Vec::new()).unwrap().is_none(),
        "no stale record may look published"
    );
    // A resync window opens before anything else is journaled (the replica
    // is not known to be consistent until the checksum comparison), and
    // new writes follow the discarded ones.
    m.write(0, 0, &[4; 512], false).unwrap();
    let mut cursor = j.cursor(j.tail());
    let opener = cursor.next(&mut Vec::new()).unwrap().unwrap();
    assert_eq!((opener.seq, opener.kind, opener.flags), (2 + jump, RecordKind::Resync, journal::RESYNC_OPEN));
    let h = cursor.next(&mut Vec::new()).unwrap().unwrap();
    assert_eq!((h.seq, h.kind), (3 + jump, RecordKind::Write));
}

/// The live ring gone while a front-end had it attached, without a
/// reboot: it is restored from the durable journal, which lacks what came
/// after its last sync. Recovered as after a process crash, its stale
/// records were re-applied over newer acknowledged writes in the image.
#[test]
fn a_ring_lost_without_a_reboot_is_recovered_as_after_a_host_crash() {
    let s = setup(1 << 20, 1 << 20, 65536);
    let head_before;
    {
        let m = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
        m.write(0, 0, &[0xaa; 4096], true).unwrap(); // FUA: the journal synced
        m.write(0, 0, &[0xbb; 4096], false).unwrap(); // acknowledged, not synced
        head_before = m.journal().head().seq;
        fs::remove_file(m.journal().ring_path()).unwrap();
        // The process dies.
    }
    let m = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
    let mut buf = vec![0u8; 4096];
    m.read(0, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xbb), "recovery rolled back an acknowledged write");
    let j = m.journal();
    assert_ne!(j.flags() & journal::FLAG_CHECKSUM_RESYNC, 0, "a checksum resync compares with the replica");
    assert!(j.head().seq > head_before + 1, "sequence numbers jump past every one the lost ring used");
}

#[test]
fn a_failed_image_change_is_followed_in_the_journal_by_what_the_image_really_holds() {
    // tmpfs has no FALLOC_FL_ZERO_RANGE: a fast, allocating zero fails there
    // after its record was published.
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        panic!("this test needs /dev/shm (tmpfs)");
    }
    let s = setup_in(shm, 1 << 20, 1 << 20, 65536);
    let m = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
    m.write(0, 0, &[7; 8192], false).unwrap();
    let err = m.zero(0, 0, 8192, ZeroMode { may_punch: false, fast_only: true }, false).unwrap_err();
    assert!(matches!(err, Error::SlowZero { .. }), "{err}");
    // Known now: the next one is refused before anything is journaled.
    let head = m.journal().head();
    let err = m.zero(0, 65536, 8192, ZeroMode { may_punch: false, fast_only: true }, false).unwrap_err();
    assert!(matches!(err, Error::SlowZero { .. }), "{err}");
    assert_eq!(m.journal().head(), head, "a refused fast zeroing was journaled");
    m.shutdown().unwrap();
    let mut kinds = Vec::new();
    let mut c = m.journal().cursor(Position { pos: 0, seq: 1 });
    let mut data = Vec::new();
    while let Some(h) = c.next(&mut data).unwrap() {
        kinds.push(h.kind);
    }
    assert_eq!(kinds, vec![RecordKind::Write, RecordKind::Zero, RecordKind::Resync]);
    // The journal still replays to exactly the source.
    replay_journal_onto(m.journal(), &s.original);
    assert_same_file(&s.image, &s.original);
}

/// A failed change longer than one record: each of its records is
/// followed by what the image really holds, or a process crash re-applies
/// the change the client was told did not happen (a FAST_ZERO refused
/// promises the disk unchanged).
#[test]
fn a_failed_change_longer_than_a_record_is_undone_in_the_journal_record_by_record() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        panic!("this test needs /dev/shm (tmpfs)");
    }
    let len = journal::MAX_RECORD_DATA as u64 + (8 << 20);
    let s = setup_in(shm, len + (1 << 20), 128 << 20, 65536);
    {
        let m = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
        let err = m.zero(0, 0, len, ZeroMode { may_punch: false, fast_only: true }, false).unwrap_err();
        assert!(matches!(err, Error::SlowZero { .. }), "{err}");
        assert_eq!(m.dirty_bytes(), 0, "undone in the journal, not left to a resync");
        // The process dies: no shutdown.
    }
    let m = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
    assert!(m.recovery().is_some(), "the reopen recovers the journal");
    drop(m);
    assert_same_file(&s.image, &s.original);
    let m = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
    m.shutdown().unwrap();
    let copy = s.original.with_extension("replay");
    std::fs::copy(&s.original, &copy).unwrap();
    replay_journal_onto(m.journal(), &copy);
    assert_same_file(&copy, &s.original);
}

/// A consumer that applies every record onto `copy` as it reads it and
/// frees the ring behind itself (what `tern ship` + `tern apply` do), and
/// checks the window markers: returns (records applied, opens, closes).
fn drain_onto(journal: &Journal, copy: &Image, from: &mut Position, data: &mut Vec<u8>) -> (u64, u64, u64) {
    let mut cursor = journal.cursor(*from);
    let (mut n, mut opens, mut closes) = (0, 0, 0);
    while let Some(h) = cursor.next(data).unwrap() {
        apply_record(std::slice::from_ref(copy), &h, data).unwrap();
        n += h.kind.changes_disk() as u64;
        opens += (h.flags == journal::RESYNC_OPEN) as u64;
        closes += (h.flags == journal::RESYNC_CLOSE) as u64;
    }
    *from = cursor.position();
    journal.set_tail(*from);
    (n, opens, closes)
}

#[test]
fn resync_after_overflow_brings_the_replica_to_the_source_and_brackets_the_window() {
    let s = setup(4 << 20, 64 << 10, 16 << 10);
    let mirror = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
    let replica = Image::open(&s.original).unwrap();
    let (mut at, mut data) = (mirror.journal().tail(), Vec::new());
    assert_eq!(mirror.resync_step(1 << 30).unwrap(), ResyncStep::Idle, "nothing dirty: closes the unknown window");
    // Fill the ring with no consumer: it overflows, later writes go to the bitmap.
    for i in 0..64u64 {
        mirror.write(0, i * 20_000, &[i as u8 + 1; 8192], false).unwrap();
    }
    assert_eq!(mirror.journal().mode(), Mode::Overflow);
    let overflow_seq = mirror.journal().head().seq;
    let dirty = mirror.dirty_bytes();
    assert!(dirty > 0);
    // The ring is full: the resync must wait, not push it further.
    assert_eq!(mirror.resync_step(1 << 30).unwrap(), ResyncStep::WaitingForRoom);
    drain_onto(mirror.journal(), &replica, &mut at, &mut data);
    // Now it leaves overflow; the first record after the overflow is the opener.
    let mut steps = 0;
    let (mut opens, mut closes) = (0, 0);
    loop {
        let step = mirror.resync_step(32 << 10).unwrap();
        let first_after = mirror.journal().cursor(at).next(&mut data).unwrap();
        if let Some(h) = first_after.filter(|_| steps == 0) {
            assert_eq!((h.seq, h.flags), (overflow_seq, journal::RESYNC_OPEN), "the opener comes first");
        }
        let (_, o, c) = drain_onto(mirror.journal(), &replica, &mut at, &mut data);
        (opens, closes) = (opens + o, closes + c);
        steps += 1;
        if step == ResyncStep::Idle {
            break;
        }
        assert!(steps < 1000, "resync does not finish: {step:?}");
    }
    assert_eq!((opens, closes), (1, 1));
    assert_eq!(mirror.dirty_bytes(), 0);
    assert_eq!(mirror.journal().mode(), Mode::Journal);
    drop(replica);
    assert_same_file(&s.image, &s.original);
}

#[test]
fn resync_racing_writers_on_several_threads_converges_to_the_source() {
    let s = setup(8 << 20, 128 << 10, 16 << 10);
    let mirror = Arc::new(Mirror::open(&s.paths, MirrorOptions::default()).unwrap());
    let replica = Image::open(&s.original).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3u64)
        .map(|t| {
            let (m, stop) = (Arc::clone(&mirror), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) || n < 300 {
                    let len = rng.gen_range(1..=16) * 1024;
                    let off = rng.gen_range(0..(8 << 20) - len);
                    match rng.gen_range(0..10) {
                        0 => m.zero(0, off as u64, len as u64, ZeroMode::default(), false).unwrap(),
                        1 => m.trim(0, off as u64, len as u64, false).unwrap(),
                        _ => m.write(0, off as u64, &vec![rng.gen(); len], false).unwrap(),
                    }
                    n += 1;
                }
            })
        })
        .collect();
    let (mut at, mut data) = (mirror.journal().tail(), Vec::new());
    let mut saw_overflow = false;
    let started = std::time::Instant::now();
    let mut rounds_after_overflow = 0u64;
    loop {
        saw_overflow |= mirror.journal().mode() == Mode::Overflow;
        // No consumer until the ring overflowed under the writers; then a
        // slow one while they go on, then a fast one once they stop.
        if saw_overflow {
            rounds_after_overflow += 1;
        }
        if rounds_after_overflow == 400 {
            stop.store(true, Ordering::Relaxed);
        }
        // Read before the step: a write after an idle step (one that
        // overflowed the ring again) would be missed otherwise.
        let writers_done = stop.load(Ordering::Relaxed) && writers.iter().all(|w| w.is_finished());
        let step = mirror.resync_step(64 << 10).unwrap();
        if saw_overflow && (rounds_after_overflow.is_multiple_of(4) || stop.load(Ordering::Relaxed)) {
            drain_onto(mirror.journal(), &replica, &mut at, &mut data);
        }
        if writers_done && step == ResyncStep::Idle && mirror.journal().head() == at {
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "resync does not finish: {step:?}");
    }
    for w in writers {
        w.join().unwrap();
    }
    assert!(saw_overflow, "the test must exercise overflow");
    assert_eq!((mirror.dirty_bytes(), mirror.journal().mode()), (0, Mode::Journal));
    drop(replica);
    assert_same_file(&s.image, &s.original);
}

#[test]
fn crash_after_leaving_overflow_never_rolls_back_a_bitmap_only_write() {
    let s = setup(4 << 20, 64 << 10, 16 << 10);
    {
        let m = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
        // A, journaled; then a write too big for the free ring: overflow
        // with the ring nearly empty, A still unconsumed.
        m.write(0, 1 << 20, &[1; 4096], false).unwrap();
        m.write(0, 0, &vec![7; 62 << 10], false).unwrap();
        assert_eq!(m.journal().mode(), Mode::Overflow);
        // B over A, acknowledged and flushed: in the image and the bitmap only.
        m.write(0, 1 << 20, &[2; 4096], false).unwrap();
        m.flush(0).unwrap();
        // The resync leaves overflow (the ring is far from full) and
        // re-sends one run — not B's region — before the process dies.
        assert!(matches!(m.resync_step(1).unwrap(), ResyncStep::Progress { .. }));
        assert_eq!(m.journal().mode(), Mode::Journal);
        assert!(m.dirty_ranges(0).iter().any(|&(o, l)| o <= 1 << 20 && o + l > 1 << 20));
    }
    let m = Mirror::open(&s.paths, MirrorOptions::default()).unwrap();
    let mut buf = vec![0u8; 4096];
    m.read(0, 1 << 20, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 2), "recovery rolled back an acknowledged, flushed write");
    assert!(m.dirty_ranges(0).iter().any(|&(o, l)| o <= 1 << 20 && o + l > 1 << 20), "its region awaits resync");
}

#[test]
fn change_slots_bound_how_many_changes_run_at_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let slots = ChangeSlots::new(3);
    let (running, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        for _ in 0..12 {
            s.spawn(|| {
                for _ in 0..50 {
                    let _slot = slots.take();
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_micros(200));
                    running.fetch_sub(1, Ordering::SeqCst);
                }
            });
        }
    });
    assert_eq!(most.load(Ordering::SeqCst), 3, "at most 3 at once, and 3 were reached");
    assert_eq!(*slots.free.lock().unwrap(), 3, "every slot came back");
}
