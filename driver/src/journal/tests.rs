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
