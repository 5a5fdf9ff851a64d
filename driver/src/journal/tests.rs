use super::*;

fn journal(capacity: u64) -> (tempfile::TempDir, Journal) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("journal");
    Journal::create(&p, [3; 16], capacity).unwrap();
    let j = Journal::open(&p).unwrap();
    (d, j)
}

fn write(offset: u64, len: usize) -> NewRecord {
    NewRecord { disk: 0, kind: RecordKind::Write, offset, length: len as u32, flags: 0 }
}

#[test]
fn small_and_large_records_read_back_verified_in_order() {
    let (_d, j) = journal(4 << 20);
    // Below and above the pwritev threshold.
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
    drop(j);
    let p = d.path().join("journal");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[format::HEADER_SIZE + format::RECORD_HEADER_SIZE + 10] ^= 1;
    std::fs::write(&p, bytes).unwrap();
    let j = Journal::open(&p).unwrap();
    let err = j.cursor(j.tail()).next(&mut Vec::new()).unwrap_err();
    assert!(err.contains("fails its checksum"), "{err}");
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
