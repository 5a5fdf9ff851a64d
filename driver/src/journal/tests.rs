//! Unit tests of the journal ring: producers and the consumer, overflow,
//! durability and recovery on small rings.

use super::*;
use std::path::Path;

fn journal(capacity: u64) -> (tempfile::TempDir, Journal) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("journal");
    Journal::create(&p, [3; 16], capacity).unwrap();
    let j = Journal::open(&p, &d.path().join("rings")).unwrap();
    (d, j)
}

fn write(offset: u64, len: usize) -> NewRecord {
    NewRecord { disk: 0, kind: RecordKind::Write, offset, length: len as u32, flags: 0 }
}

#[test]
fn small_and_large_records_read_back_verified_in_order() {
    let (_d, j) = journal(4 << 20);
    let sizes = [1usize, 4096, 16 * 1024 - 1, 16 * 1024, 1 << 20];
    for (i, &n) in sizes.iter().enumerate() {
        let data: Vec<u8> = (0..n).map(|b| (b * 7 + i) as u8).collect();
        assert_eq!(j.append(&write(i as u64 * 4096, n), &data), Some(i as u64 + 1));
    }
    let mut c = j.cursor(j.tail());
    let mut data = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let h = c.next(&mut data).unwrap().unwrap();
        assert_eq!((h.seq, h.offset, h.length as usize), (i as u64 + 1, i as u64 * 4096, n));
        assert!(data.iter().enumerate().all(|(b, &v)| v == (b * 7 + i) as u8));
    }
    assert!(c.next(&mut data).unwrap().is_none());
}

#[test]
fn records_wrap_with_a_pad_and_keep_dense_sequence_numbers() {
    let (_d, j) = journal(64 * 1024);
    let data = vec![9u8; 20_000];
    let mut consumed = j.tail();
    let mut buf = Vec::new();
    for seq in 1..=20 {
        assert_eq!(j.append(&write(0, data.len()), &data), Some(seq));
        let mut c = j.cursor(consumed);
        let h = c.next(&mut buf).unwrap().unwrap();
        assert_eq!(h.seq, seq);
        assert_eq!(buf, data);
        consumed = c.position();
        j.set_tail(consumed);
    }
    assert!(j.head().pos > 4 * 64 * 1024, "the ring wrapped several times");
}

#[test]
fn full_ring_refuses_without_reserving_anything() {
    let (_d, j) = journal(64 * 1024);
    let data = vec![1u8; 30_000];
    assert!(j.append(&write(0, data.len()), &data).is_some());
    assert!(j.append(&write(0, data.len()), &data).is_some());
    let head = j.head();
    assert!(j.append(&write(0, data.len()), &data).is_none());
    assert_eq!(j.head(), head);
}

#[test]
fn a_flipped_data_byte_fails_the_checksum() {
    let (d, j) = journal(64 * 1024);
    j.append(&write(0, 100), &[5u8; 100]).unwrap();
    let ring = j.ring_path().to_owned();
    drop(j);
    let mut bytes = std::fs::read(&ring).unwrap();
    bytes[format::HEADER_SIZE + format::RECORD_HEADER_SIZE + 10] ^= 1;
    std::fs::write(&ring, bytes).unwrap();
    let j = Journal::open(&d.path().join("journal"), &d.path().join("rings")).unwrap();
    let err = j.cursor(j.tail()).next(&mut Vec::new()).unwrap_err();
    assert!(matches!(err, RecordError::Checksum { pos: 0, .. }), "{err:?}");
    assert!(err.to_string().contains("fails its checksum"), "{err}");
}

#[test]
fn a_window_opener_reserved_when_leaving_overflow_but_never_published_is_published_by_recovery() {
    let (_d, j) = journal(64 * 1024);
    assert_eq!(j.append(&write(0, 100), &[1; 100]), Some(1));
    assert!(j.enter_overflow());
    let overflow_seq = j.overflow_seq();
    let at = j.leave_overflow_and_abandon().expect("room for the opener");
    assert_eq!(at.seq, overflow_seq, "the opener takes the overflow's sequence number");
    assert_eq!(j.mode(), Mode::Journal);
    // Another producer publishes after it before the crash.
    assert_eq!(j.append(&write(8192, 10), &[2; 10]), Some(overflow_seq + 1));
    j.set_window_open(false);
    let report = j.recover(|_, _| Ok(())).unwrap();
    assert_eq!(report.holes, 1);
    assert!(j.window_open(), "the window is open again");
    let mut c = j.cursor(j.tail());
    let mut data = Vec::new();
    let kinds: Vec<(u64, RecordKind, u8)> =
        std::iter::from_fn(|| c.next(&mut data).unwrap()).map(|h| (h.seq, h.kind, h.flags)).collect();
    assert_eq!(
        kinds,
        vec![
            (1, RecordKind::Write, 0),
            (overflow_seq, RecordKind::Resync, RESYNC_OPEN),
            (overflow_seq + 1, RecordKind::Write, 0)
        ]
    );
}

/// Reads every record from the tail: (seq, first data byte).
fn records(j: &Journal) -> Vec<(u64, u8)> {
    let mut c = j.cursor(j.tail());
    let mut data = Vec::new();
    std::iter::from_fn(|| c.next(&mut data).unwrap().map(|h| (h.seq, data.first().copied().unwrap_or(0)))).collect()
}

#[test]
fn the_live_ring_is_in_the_ring_directory_and_shared_through_the_link() {
    let (d, j) = journal(64 * 1024);
    let rings = d.path().join("rings");
    assert!(j.ring_path().starts_with(&rings), "{}", j.ring_path().display());
    assert_eq!(std::fs::read_link(d.path().join("journal.ring")).unwrap(), j.ring_path());
    j.append(&write(0, 10), &[7; 10]).unwrap();
    // Another process told to restore rings elsewhere finds this one.
    let other = Journal::open(&d.path().join("journal"), &d.path().join("elsewhere")).unwrap();
    assert_eq!(other.ring_path(), j.ring_path());
    assert_eq!(records(&other), vec![(1, 7)]);
    assert!(!d.path().join("elsewhere").exists());
}

#[test]
fn a_flush_makes_unconsumed_records_durable_and_a_lost_ring_is_restored_from_them() {
    let (d, j) = journal(64 * 1024);
    for (i, b) in [1u8, 2, 3].into_iter().enumerate() {
        assert_eq!(j.append(&write(i as u64 * 4096, 5000), &[b; 5000]), Some(i as u64 + 1));
    }
    // The consumer took the first record; the others wait.
    let mut c = j.cursor(j.tail());
    c.next(&mut Vec::new()).unwrap().unwrap();
    j.set_tail(c.position());
    j.set_flags(FLAG_ATTACHED);
    j.sync().unwrap();
    // Published after the flush: not durable, and lost with the host.
    j.append(&write(0, 5000), &[4; 5000]).unwrap();
    let ring = j.ring_path().to_owned();
    drop(j);
    std::fs::remove_file(&ring).unwrap();

    let j = Journal::open(&d.path().join("journal"), &d.path().join("rings")).unwrap();
    assert_eq!(j.ring_path(), ring, "restored under the same name");
    assert_eq!(records(&j), vec![(2, 2), (3, 3)], "exactly the unconsumed records the flush covered");
    assert_eq!(j.head().seq, 4);
    assert_eq!(j.flags() & FLAG_ATTACHED, FLAG_ATTACHED, "the header came along");
}

#[test]
fn records_consumed_before_a_flush_are_never_written_to_the_durable_file() {
    let (d, j) = journal(64 * 1024);
    j.append(&write(0, 5000), &[1; 5000]).unwrap();
    let mut c = j.cursor(j.tail());
    c.next(&mut Vec::new()).unwrap().unwrap();
    j.set_tail(c.position());
    j.append(&write(0, 5000), &[2; 5000]).unwrap();
    j.sync().unwrap();
    let durable = std::fs::read(d.path().join("journal")).unwrap();
    let first = format::HEADER_SIZE;
    let second = format::HEADER_SIZE + format::footprint(5000) as usize;
    assert!(durable[first..second].iter().all(|&b| b == 0), "the consumed record was written");
    assert_eq!(durable[second + format::RECORD_HEADER_SIZE], 2, "the waiting record is durable");
}

#[test]
fn a_copied_journal_gets_a_ring_of_its_own() {
    let (d, j) = journal(64 * 1024);
    j.append(&write(0, 10), &[1; 10]).unwrap();
    j.sync().unwrap();
    let copy = d.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    std::fs::copy(d.path().join("journal"), copy.join("journal")).unwrap();
    std::os::unix::fs::symlink(j.ring_path(), copy.join("journal.ring")).unwrap();
    let c = Journal::open(&copy.join("journal"), &d.path().join("rings")).unwrap();
    assert_ne!(c.ring_path(), j.ring_path());
    c.append(&write(0, 10), &[2; 10]).unwrap();
    assert_eq!(records(&j), vec![(1, 1)]);
    assert_eq!(records(&c), vec![(1, 1), (2, 2)]);
}

#[test]
fn a_ring_directory_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("journal");
    Journal::create(&p, [3; 16], 64 * 1024).unwrap();
    let rings = d.path().join("rings");
    std::fs::create_dir(&rings).unwrap();
    std::fs::set_permissions(&rings, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = Journal::open(&p, &rings).unwrap_err().to_string();
    assert!(err.contains("TERN_RING_DIR") && err.contains(&rings.display().to_string()), "{err}");
}

#[test]
fn a_record_published_after_a_flush_copied_its_slot_is_copied_again_by_the_next_flush() {
    let (d, j) = journal(64 * 1024);
    // A slow producer: reserved and filled, not yet published, when a
    // FLUSH for another write comes.
    let publish_a = j.append_published_later(&write(0, 100), &[1; 100]);
    j.append(&write(4096, 100), &[2; 100]).unwrap();
    j.sync().unwrap();
    // It publishes, its write is acknowledged, and a FLUSH follows.
    publish_a();
    j.sync().unwrap();
    let ring = j.ring_path().to_owned();
    drop(j);
    std::fs::remove_file(&ring).unwrap();
    let j = Journal::open(&d.path().join("journal"), &d.path().join("rings")).unwrap();
    assert_eq!(records(&j), vec![(1, 1), (2, 2)], "both records are durable");
}

#[test]
fn a_flush_with_nothing_new_writes_nothing() {
    let (d, j) = journal(64 * 1024);
    let durable = d.path().join("journal");
    let written = || std::fs::metadata(&durable).unwrap().modified().unwrap();
    j.append(&write(0, 100), &[1; 100]).unwrap();
    j.sync().unwrap();
    let first = written();
    std::thread::sleep(std::time::Duration::from_millis(20));
    j.sync().unwrap();
    assert_eq!(written(), first, "nothing changed, nothing written");
    // A header change alone (a flag) is written.
    j.set_flags(FLAG_CHECKSUM_RESYNC);
    j.sync().unwrap();
    let second = written();
    assert!(second > first, "the flag was not written");
    std::thread::sleep(std::time::Duration::from_millis(20));
    j.append(&write(0, 100), &[2; 100]).unwrap();
    j.sync().unwrap();
    assert!(written() > second, "the new record was not written");
}

#[test]
fn the_tail_never_passes_a_record_its_producer_still_reads() {
    let (_d, j) = journal(64 * 1024);
    let mut r = j.reserve_in_place(&write(0, 4096)).unwrap();
    r.data_mut().fill(5);
    assert!(records(&j).is_empty(), "not published while its data arrives");
    r.publish();
    assert_eq!(records(&j), vec![(1, 5)], "published: the consumer reads it");
    let mut c = j.cursor(j.tail());
    c.next(&mut Vec::new()).unwrap().unwrap();
    let past = c.position();
    // The producer still writes the image from it: its space must not be
    // handed to another producer.
    j.set_tail(past);
    assert_eq!(j.tail(), Position { pos: 0, seq: 1 });
    r.release();
    j.set_tail(past);
    assert_eq!(j.tail(), past);
}

#[test]
fn an_in_place_record_dropped_while_receiving_becomes_a_pad_for_its_seq() {
    let (_d, j) = journal(64 * 1024);
    let mut r = j.reserve_in_place(&write(0, 8192)).unwrap();
    r.data_mut()[..100].fill(1);
    drop(r);
    assert_eq!(j.append(&write(0, 10), &[2; 10]), Some(2));
    let mut c = j.cursor(j.tail());
    let mut data = Vec::new();
    let pad = c.next(&mut data).unwrap().unwrap();
    assert_eq!((pad.seq, pad.kind, pad.offset), (1, RecordKind::Pad, 1));
    assert_eq!(c.next(&mut data).unwrap().unwrap().seq, 2);
}

#[test]
fn a_flush_during_an_image_write_never_leaves_the_record_busy_in_the_durable_file() {
    let (d, j) = journal(64 * 1024);
    let mut r = j.reserve_in_place(&write(0, 4096)).unwrap();
    r.data_mut().fill(5);
    r.publish();
    j.sync().unwrap(); // another connection's FLUSH, during the image write
    r.release();
    j.sync().unwrap(); // the clean shutdown's
    let ring = j.ring_path().to_owned();
    drop(j);
    std::fs::remove_file(&ring).unwrap(); // a reboot
    let j = Journal::open(&d.path().join("journal"), &d.path().join("rings")).unwrap();
    let mut c = j.cursor(j.tail());
    assert_eq!(c.next(&mut Vec::new()).unwrap().unwrap().seq, 1);
    j.set_tail(c.position());
    assert_eq!(j.tail(), c.position(), "the restored record is still busy: the tail can never pass it");
}

#[test]
fn retiring_a_journal_removes_its_ring_link_and_file_and_a_second_retire_is_a_no_op() {
    let (d, j) = journal(64 * 1024);
    let ring = j.ring_path().to_owned();
    drop(j);
    let path = d.path().join("journal");
    live::retire(&path).unwrap();
    assert!(!ring.exists() && !path.exists() && std::fs::symlink_metadata(live::link_path(&path)).is_err());
    live::retire(&path).unwrap();
}

/// Opens the journal at `path` on another thread while this one holds its
/// lock (as `live::retire` does), runs `meanwhile` once that open waits for
/// the lock, then lets it in. Returns the open's error: "removed" when it
/// had opened the file before `meanwhile`, "cannot open" when it had not
/// got that far; anything else (an open that succeeds) fails the test.
fn open_failing_across(path: &Path, rings: &Path, meanwhile: impl FnOnce()) -> String {
    use std::os::fd::AsRawFd;
    let held = std::fs::File::open(path).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
    let opener = {
        let (path, rings) = (path.to_owned(), rings.to_owned());
        std::thread::spawn(move || Journal::open(&path, &rings).map(|_| ()))
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    meanwhile();
    drop(held);
    let err = opener.join().unwrap().unwrap_err().to_string();
    assert!(err.contains("was removed while it was being opened") || err.contains("cannot open"), "{err}");
    err
}

#[test]
fn an_open_waiting_for_the_lock_while_its_journal_is_retired_fails_and_restores_no_ring() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("journal");
    let rings = d.path().join("rings");
    Journal::create(&path, [3; 16], 64 * 1024).unwrap();
    let ring = Journal::open(&path, &rings).unwrap().ring_path().to_owned();
    // What retire does, under the lock.
    open_failing_across(&path, &rings, || {
        std::fs::remove_file(&ring).unwrap();
        std::fs::remove_file(ring.with_extension("owner")).unwrap();
        std::fs::remove_file(live::link_path(&path)).unwrap();
        std::fs::remove_file(&path).unwrap();
    });
    let left: Vec<_> = std::fs::read_dir(&rings).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "a ring was restored for a retired journal: {left:?}");
}

#[test]
fn an_open_waiting_for_the_lock_while_its_state_directory_is_moved_away_fails() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("vm");
    std::fs::create_dir(&dir).unwrap();
    let path = dir.join("journal");
    let rings = d.path().join("rings");
    Journal::create(&path, [3; 16], 64 * 1024).unwrap();
    drop(Journal::open(&path, &rings).unwrap());
    // What `tern disable` does first: the VM's directory goes aside whole.
    open_failing_across(&path, &rings, || std::fs::rename(&dir, d.path().join(".vm.disabled")).unwrap());
}

#[test]
fn a_busy_record_is_read_but_the_tail_stops_before_it_until_it_is_released() {
    let (_d, j) = journal(64 * 1024);
    assert_eq!(j.append(&write(0, 10), &[1; 10]), Some(1));
    let busy = j.append_busy(&write(4096, 10), &[2; 10]).expect("room");
    assert_eq!(busy.seq(), 2);
    // The consumer reads both, and asks to move past both.
    let mut c = j.cursor(j.tail());
    let mut data = Vec::new();
    assert_eq!(c.next(&mut data).unwrap().map(|h| h.seq), Some(1));
    let before_busy = c.position();
    assert_eq!(c.next(&mut data).unwrap().map(|h| h.seq), Some(2));
    j.set_tail(c.position());
    assert_eq!(j.tail(), before_busy, "the tail passed a record whose image change is not done");
    drop(busy);
    j.set_tail(c.position());
    assert_eq!(j.tail(), c.position());
}

#[test]
fn a_sync_racing_the_consumer_saves_a_header_a_reboot_can_open() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("journal");
    let rings = d.path().join("rings");
    Journal::create(&p, [3; 16], 16 * 1024).unwrap();
    let j = std::sync::Arc::new(Journal::open(&p, &rings).unwrap());
    let data = [7u8; 4000];
    while j.append(&write(0, data.len()), &data).is_some() {}
    // Between the sync's loads of tail and head, the consumer takes
    // everything and the producers fill the ring again.
    let other = std::sync::Arc::clone(&j);
    *ring::tests_hook::BETWEEN_TAIL_AND_HEAD.lock().unwrap() = Some(Box::new(move || {
        other.set_tail(other.head());
        while other.append(&write(0, data.len()), &data).is_some() {}
    }));
    j.sync().unwrap();
    let (head, tail) = (j.head(), j.tail());
    drop(j);
    // A reboot: the ring in memory is gone, restored from the durable file.
    std::fs::remove_dir_all(&rings).unwrap();
    let j = Journal::open(&p, &rings).expect("the saved header must be consistent");
    assert_eq!((j.head(), j.tail()), (head, tail));
}

/// A durable file whose header's head sequence number is off (its
/// positions carry no checksum: one flipped bit) must not open into a
/// journal whose next record the shipper refuses as a gap on every start.
/// Found by the `journal` fuzz target (seq-gap artifact).
#[test]
fn recovery_refuses_a_header_whose_head_the_records_do_not_add_up_to() {
    for bump in [5u64, 0] {
        let (d, j) = journal(64 * 1024);
        for i in 0..3u64 {
            j.append(&write(i * 4096, 100), &[i as u8; 100]).unwrap();
        }
        j.set_flags(FLAG_ATTACHED);
        j.sync().unwrap();
        let ring = j.ring_path().to_owned();
        drop(j);
        std::fs::remove_file(&ring).unwrap();
        let path = d.path().join("journal");
        let mut file = std::fs::read(&path).unwrap();
        let seq_at = format::OFF_HEAD + 8;
        let seq = u64::from_le_bytes(file[seq_at..seq_at + 8].try_into().unwrap());
        assert_eq!(seq, 4);
        file[seq_at..seq_at + 8].copy_from_slice(&(seq + bump).to_le_bytes());
        std::fs::write(&path, &file).unwrap();

        let j = Journal::open(&path, &d.path().join("rings")).unwrap();
        for outcome in [j.recover(|_, _| Ok(())).map(|_| ()), j.pad_holes().map(|_| ())] {
            if bump == 0 {
                outcome.expect("an intact journal recovers");
            } else {
                let e = outcome.expect_err("a head the records do not reach is refused").to_string();
                assert!(e.contains("end at position") && e.contains("seq 4") && e.contains("seq 9"), "{e}");
                assert!(e.contains("tern disable"), "says what to do next: {e}");
            }
        }
    }
}
