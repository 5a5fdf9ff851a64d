//! Unit and property tests of the segment format: round trips, and every
//! kind of damage refused with the offset named.

use super::*;
use proptest::collection::vec;
use proptest::prelude::*;
use tern_driver::journal::{RESYNC_CLOSE, RESYNC_OPEN};

const VM: [u8; 16] = [0x42; 16];
const ZSTD1: Compression = Compression::Zstd { level: 1 };

fn write(seq: u64, disk: u16, offset: u64, data: &[u8]) -> RecordHeader {
    RecordHeader {
        seq,
        offset,
        time_ns: seq * 1000,
        length: data.len() as u32,
        data_len: data.len() as u32,
        disk,
        kind: RecordKind::Write,
        flags: 0,
    }
}

fn zero(seq: u64, offset: u64, length: u32) -> RecordHeader {
    RecordHeader { seq, offset, time_ns: 7, length, data_len: 0, disk: 1, kind: RecordKind::Zero, flags: 0 }
}

fn tag(seq: u64, label: &[u8]) -> RecordHeader {
    RecordHeader {
        seq,
        offset: 0,
        time_ns: 9,
        length: label.len() as u32,
        data_len: label.len() as u32,
        disk: 0,
        kind: RecordKind::Tag,
        flags: 0,
    }
}

/// Four records from seq 100: a write, a zero, a pad losing 3 sequence
/// numbers, a tag. Ends at seq 105.
fn small_records() -> Vec<(RecordHeader, Vec<u8>)> {
    let data: Vec<u8> = (0..4096u32).map(|i| (i / 7) as u8).collect();
    vec![
        (write(100, 0, 8192, &data), data),
        (zero(101, 1 << 20, 65536), Vec::new()),
        (RecordHeader::pad(102, 3, 128), Vec::new()),
        (tag(105, b"before-upgrade"), b"before-upgrade".to_vec()),
    ]
}

fn builder_of(first_seq: u64, records: &[(RecordHeader, Vec<u8>)]) -> SegmentBuilder {
    let mut b = SegmentBuilder::new(VM, 3, first_seq);
    for (h, data) in records {
        b.push(h, data).expect("push");
    }
    b
}

fn small_segment(compression: Compression) -> Vec<u8> {
    let b = builder_of(100, &small_records());
    Encoder::new(compression).unwrap().encode(&b).unwrap().1
}

/// Recomputes the header and trailer checksums after a test edited `bytes`.
fn reseal(bytes: &mut [u8]) {
    let crc = tern_driver::checksum::crc32c(&bytes[..OFF_HEADER_CRC]);
    put_u32(bytes, OFF_HEADER_CRC, crc);
    if bytes.len() >= HEADER_SIZE + TRAILER_SIZE {
        let trailer_at = bytes.len() - TRAILER_SIZE;
        let crc = tern_driver::checksum::crc32c(&bytes[..trailer_at]);
        put_u32(bytes, trailer_at + OFF_TRAILER_CRC, crc);
    }
}

/// A segment file assembled verbatim from `header`, the index of
/// `records` (with correct record checksums) and `stored`: lets a test
/// write what no builder would.
fn craft(header: &SegmentHeader, records: &[(RecordHeader, Vec<u8>)], stored: &[u8]) -> Vec<u8> {
    let mut out = header.encode().to_vec();
    for (h, data) in records {
        out.extend_from_slice(&h.encode_with_checksum(data));
    }
    out.extend_from_slice(stored);
    let crc = tern_driver::checksum::crc32c(&out);
    out.extend_from_slice(&TRAILER_MAGIC);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out
}

/// The honest header of an uncompressed segment of `records`.
fn plain_header(records: &[(RecordHeader, Vec<u8>)], first_seq: u64, last_seq: u64) -> SegmentHeader {
    let payload_len = records.iter().map(|(_, d)| d.len() as u64).sum();
    SegmentHeader {
        vm_id: VM,
        epoch: 3,
        first_seq,
        last_seq,
        record_count: records.len() as u32,
        window: 0,
        compression: Compression::None,
        payload_len,
        stored_len: payload_len,
        created_ns: 0,
    }
}

fn concat(records: &[(RecordHeader, Vec<u8>)]) -> Vec<u8> {
    records.iter().flat_map(|(_, d)| d.iter().copied()).collect()
}

#[derive(Debug, Clone)]
enum Spec {
    Write { disk: u16, offset: u64, data: Vec<u8> },
    Zero { disk: u16, offset: u64, length: u32 },
    Trim { disk: u16, offset: u64, length: u32 },
    Tag { label: Vec<u8> },
    Resync { disk: u16, offset: u64, data: Vec<u8> },
    Window { flags: u8 },
    Pad { lost: u64 },
}

fn data_strategy() -> impl Strategy<Value = Vec<u8>> {
    // Random bytes (zstd stores them raw) and a small alphabet (it
    // compresses them).
    prop_oneof![vec(any::<u8>(), 0..8192), vec(0u8..4, 0..8192)]
}

fn spec_strategy() -> impl Strategy<Value = Spec> {
    prop_oneof![
        (any::<u16>(), any::<u64>(), data_strategy()).prop_map(|(disk, offset, data)| Spec::Write {
            disk,
            offset,
            data
        }),
        (any::<u16>(), any::<u64>(), any::<u32>()).prop_map(|(disk, offset, length)| Spec::Zero {
            disk,
            offset,
            length
        }),
        (any::<u16>(), any::<u64>(), any::<u32>()).prop_map(|(disk, offset, length)| Spec::Trim {
            disk,
            offset,
            length
        }),
        vec(any::<u8>(), 0..=256).prop_map(|label| Spec::Tag { label }),
        (any::<u16>(), any::<u64>(), data_strategy()).prop_map(|(disk, offset, data)| Spec::Resync {
            disk,
            offset,
            data
        }),
        prop_oneof![Just(RESYNC_OPEN), Just(RESYNC_CLOSE)].prop_map(|flags| Spec::Window { flags }),
        (1u64..1000).prop_map(|lost| Spec::Pad { lost }),
    ]
}

/// The records `specs` describe, numbered from `first_seq`: the model a
/// decoded segment must equal.
fn model(first_seq: u64, specs: &[Spec], time_ns: u64) -> Vec<(RecordHeader, Vec<u8>)> {
    let mut seq = first_seq;
    let mut out = Vec::new();
    for s in specs {
        let base = RecordHeader {
            seq,
            offset: 0,
            time_ns,
            length: 0,
            data_len: 0,
            disk: 0,
            kind: RecordKind::Write,
            flags: 0,
        };
        let (h, data) = match s.clone() {
            Spec::Write { disk, offset, data } => {
                let n = data.len() as u32;
                (RecordHeader { disk, offset, length: n, data_len: n, ..base }, data)
            }
            Spec::Zero { disk, offset, length } => {
                (RecordHeader { disk, offset, length, kind: RecordKind::Zero, ..base }, Vec::new())
            }
            Spec::Trim { disk, offset, length } => {
                (RecordHeader { disk, offset, length, kind: RecordKind::Trim, ..base }, Vec::new())
            }
            Spec::Tag { label } => {
                let n = label.len() as u32;
                (RecordHeader { length: n, data_len: n, kind: RecordKind::Tag, ..base }, label)
            }
            Spec::Resync { disk, offset, data } => {
                let n = data.len() as u32;
                (RecordHeader { disk, offset, length: n, data_len: n, kind: RecordKind::Resync, ..base }, data)
            }
            Spec::Window { flags } => (RecordHeader { kind: RecordKind::Resync, flags, ..base }, Vec::new()),
            Spec::Pad { lost } => (RecordHeader::pad(seq, lost, 64), Vec::new()),
        };
        seq += if h.kind == RecordKind::Pad { h.offset } else { 1 };
        out.push((h, data));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn round_trip_preserves_header_and_records(
        vm_id: [u8; 16],
        epoch: u64,
        first_seq in 1u64..1 << 48,
        window in 0u32..4,
        time_ns: u64,
        specs in vec(spec_strategy(), 1..16),
    ) {
        // Arrange
        let records = model(first_seq, &specs, time_ns);
        let mut b = SegmentBuilder::new(vm_id, epoch, first_seq);
        b.set_window(window);
        for (h, data) in &records {
            prop_assert_eq!(b.push(h, data), Ok(()));
        }
        let last_seq = b.next_seq() - 1;
        let payload_len: u64 = records.iter().map(|(_, d)| d.len() as u64).sum();

        for compression in [Compression::None, ZSTD1] {
            // Act
            let (header, bytes) = Encoder::new(compression).unwrap().encode(&b).unwrap();
            let segment = Segment::decode(&bytes, Some(vm_id)).unwrap();

            // Assert
            prop_assert_eq!(&segment.header, &header);
            prop_assert_eq!(header.vm_id, vm_id);
            prop_assert_eq!(header.epoch, epoch);
            prop_assert_eq!(header.first_seq, first_seq);
            prop_assert_eq!(header.last_seq, last_seq);
            prop_assert_eq!(header.record_count as usize, records.len());
            prop_assert_eq!(header.window, window);
            // zstd is asked for, but a payload it cannot shrink is stored
            // as is.
            if header.compression != compression {
                prop_assert_eq!(compression, ZSTD1);
                prop_assert_eq!(header.compression, Compression::None);
                prop_assert_eq!(header.stored_len, payload_len);
            }
            prop_assert_eq!(header.payload_len, payload_len);
            prop_assert_eq!(header.file_len(), bytes.len() as u64);
            prop_assert_eq!(segment.len(), records.len());
            let decoded: Vec<(RecordHeader, Vec<u8>)> =
                segment.records().map(|(h, d)| (*h, d.to_vec())).collect();
            prop_assert_eq!(&decoded, &records);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..2048)) {
        let _ = Segment::decode(&bytes, None);
    }

    #[test]
    fn arbitrary_bytes_behind_a_valid_header_never_panic(tail in vec(any::<u8>(), 0..2048), count in 1u32..8) {
        // A header the decoder accepts, then junk: exercises index and
        // frame decoding rather than stopping at the header checksum.
        let stored_len = (tail.len() as u64).saturating_sub(count as u64 * 40 + 16);
        let header = SegmentHeader {
            first_seq: 1,
            last_seq: 1 << 20,
            record_count: count,
            compression: ZSTD1,
            payload_len: 1 << 16,
            stored_len,
            ..plain_header(&[], 1, 1)
        };
        let mut bytes = header.encode().to_vec();
        bytes.extend_from_slice(&tail);
        let _ = Segment::decode(&bytes, None);
        bytes.truncate(bytes.len().saturating_sub(TRAILER_SIZE));
        let crc = tern_driver::checksum::crc32c(&bytes);
        bytes.extend_from_slice(&TRAILER_MAGIC);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes.extend_from_slice(&[0; 4]);
        let _ = Segment::decode(&bytes, None);
    }
}

#[test]
fn small_segment_round_trips_through_both_compressions() {
    for compression in [Compression::None, ZSTD1] {
        let bytes = small_segment(compression);

        let segment = Segment::decode(&bytes, Some(VM)).unwrap();

        assert_eq!((segment.header.first_seq, segment.header.last_seq), (100, 105));
        let decoded: Vec<(RecordHeader, Vec<u8>)> = segment.records().map(|(h, d)| (*h, d.to_vec())).collect();
        assert_eq!(decoded, small_records());
    }
}

#[test]
fn every_flipped_byte_is_refused() {
    let bytes = small_segment(ZSTD1);
    assert!(bytes.len() < 1024, "the test wants a small segment, got {} bytes", bytes.len());
    let mut accepted = Vec::new();

    for i in 0..bytes.len() {
        for mask in [0xff, 0x01] {
            let mut bad = bytes.clone();
            bad[i] ^= mask;

            match Segment::decode(&bad, None) {
                Ok(_) => accepted.push((i, mask)),
                Err(e) => assert!(e.offset < bytes.len() as u64, "byte {i} ^ {mask:#x}: offset {} in {e}", e.offset),
            }
        }
    }

    assert_eq!(accepted, [], "flips (byte, mask) that decoded");
}

#[test]
fn flips_are_reported_where_they_are() {
    let bytes = small_segment(ZSTD1);
    let trailer_at = bytes.len() - TRAILER_SIZE;
    let cases = [
        (0, 0),
        (OFF_VERSION, OFF_VERSION),
        (OFF_FIRST_SEQ, OFF_HEADER_CRC),
        (OFF_HEADER_CRC + 1, OFF_HEADER_CRC),
        (HEADER_SIZE + 34, HEADER_SIZE), // record 0's kind
        (trailer_at + 3, trailer_at),
        (trailer_at + OFF_TRAILER_CRC, trailer_at + OFF_TRAILER_CRC),
        (bytes.len() - 1, trailer_at + OFF_TRAILER_ZERO),
        (bytes.len() - TRAILER_SIZE - 1, trailer_at + OFF_TRAILER_CRC), // the payload
    ];
    for (flip, offset) in cases {
        let mut bad = bytes.clone();
        bad[flip] ^= 0xff;

        let e = Segment::decode(&bad, None).unwrap_err();

        assert_eq!(e.offset, offset as u64, "flip at {flip}: {e}");
    }
}

#[test]
fn truncation_at_every_length_is_refused() {
    let bytes = small_segment(ZSTD1);

    for n in 0..bytes.len() {
        let e = Segment::decode(&bytes[..n], None).unwrap_err();

        assert!(e.reason.starts_with(&format!("file is {n} bytes")), "cut at {n}: {e}");
        assert_eq!(e.offset, n as u64, "cut at {n}: {e}");
    }
}

#[test]
fn truncation_at_record_boundaries_is_refused() {
    let records = small_records();
    let bytes = small_segment(Compression::None);
    let payload_at = HEADER_SIZE + records.len() * INDEX_ENTRY_SIZE;
    let mut cuts: Vec<usize> = (0..=records.len()).map(|i| HEADER_SIZE + i * INDEX_ENTRY_SIZE).collect();
    let mut at = payload_at;
    for (_, data) in &records {
        at += data.len();
        cuts.push(at);
    }
    cuts.push(bytes.len() - TRAILER_SIZE + OFF_TRAILER_CRC);

    for n in cuts {
        let e = Segment::decode(&bytes[..n], None).unwrap_err();

        assert_eq!(e.reason, format!("file is {n} bytes, header says {}", bytes.len()), "cut at {n}");
    }
}

#[test]
fn extra_bytes_after_the_trailer_are_refused() {
    let mut bytes = small_segment(ZSTD1);
    let len = bytes.len();
    bytes.extend_from_slice(&[0; 16]);

    let e = Segment::decode(&bytes, None).unwrap_err();

    assert_eq!(e.offset, len as u64);
    assert_eq!(e.reason, format!("file is {} bytes, header says {len}", len + 16));
}

#[test]
fn segment_of_another_vm_is_refused() {
    let bytes = small_segment(ZSTD1);

    let e = Segment::decode(&bytes, Some([0x43; 16])).unwrap_err();

    assert_eq!(e.offset, OFF_VM_ID as u64);
    assert!(e.reason.contains("expected VM 43434343-"), "{e}");
    assert!(Segment::decode(&bytes, None).is_ok());
}

#[test]
fn unknown_window_bits_are_refused() {
    let mut b = builder_of(100, &small_records());
    b.window = 4;
    let err = Encoder::new(ZSTD1).unwrap().encode(&b).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);

    let mut bytes = small_segment(ZSTD1);
    put_u32(&mut bytes, OFF_WINDOW, WINDOW_AT_START | 4);
    reseal(&mut bytes);

    let e = Segment::decode(&bytes, None).unwrap_err();

    assert_eq!(e.offset, OFF_WINDOW as u64);
    assert_eq!(e.reason, "unknown window flags 0x5");
}

#[test]
fn payload_len_over_the_limit_is_refused_before_allocating() {
    // No test can watch the allocator here (the crate forbids unsafe code,
    // so no counting global allocator); the offsets show which check
    // refused: the header limits and the file length, both before any
    // allocation the header asks for.
    let mut bytes = small_segment(ZSTD1);
    put_u64(&mut bytes, OFF_PAYLOAD_LEN, MAX_PAYLOAD + 1);
    reseal(&mut bytes);

    let e = Segment::decode(&bytes, None).unwrap_err();

    assert_eq!(e.offset, OFF_PAYLOAD_LEN as u64, "{e}");
    assert!(e.reason.contains("exceeds the maximum"), "{e}");

    // At the limit the header is fine, and the file is too short for it.
    put_u64(&mut bytes, OFF_PAYLOAD_LEN, MAX_PAYLOAD);
    put_u64(&mut bytes, OFF_STORED_LEN, MAX_PAYLOAD);
    reseal(&mut bytes);
    let e = Segment::decode(&bytes, None).unwrap_err();
    assert!(e.reason.starts_with(&format!("file is {} bytes, header says", bytes.len())), "{e}");
}

#[test]
fn record_count_over_the_limit_is_refused_before_allocating() {
    let mut bytes = small_segment(ZSTD1);
    put_u64(&mut bytes, OFF_LAST_SEQ, u64::MAX);
    put_u32(&mut bytes, OFF_RECORD_COUNT, MAX_RECORDS + 1);
    reseal(&mut bytes);

    let e = Segment::decode(&bytes, None).unwrap_err();

    assert_eq!(e.offset, OFF_RECORD_COUNT as u64, "{e}");
    assert!(e.reason.contains("exceeds the maximum"), "{e}");

    put_u32(&mut bytes, OFF_RECORD_COUNT, MAX_RECORDS);
    reseal(&mut bytes);
    let e = Segment::decode(&bytes, None).unwrap_err();
    assert!(e.reason.starts_with(&format!("file is {} bytes, header says", bytes.len())), "{e}");
}

#[test]
fn zero_records_are_refused() {
    let mut bytes = small_segment(ZSTD1);
    put_u32(&mut bytes, OFF_RECORD_COUNT, 0);
    reseal(&mut bytes);

    let e = Segment::decode(&bytes, None).unwrap_err();

    assert_eq!(e.offset, OFF_RECORD_COUNT as u64, "{e}");
}

#[test]
fn stored_len_beyond_the_zstd_bound_is_refused() {
    let mut bytes = small_segment(ZSTD1);
    let payload_len = u64_at(&bytes, OFF_PAYLOAD_LEN);
    put_u64(&mut bytes, OFF_STORED_LEN, zstd_bound(payload_len) + 1);
    reseal(&mut bytes);

    let e = Segment::decode(&bytes, None).unwrap_err();

    assert_eq!(e.offset, OFF_STORED_LEN as u64, "{e}");
}

/// A zstd segment of `small_records()` whose payload is `stored`.
fn with_frame(stored: &[u8]) -> Vec<u8> {
    let records = small_records();
    let header =
        SegmentHeader { compression: ZSTD1, stored_len: stored.len() as u64, ..plain_header(&records, 100, 105) };
    craft(&header, &records, stored)
}

fn frame(data: &[u8], content_size: bool) -> Vec<u8> {
    let mut c = zstd::bulk::Compressor::new(1).unwrap();
    c.include_contentsize(content_size).unwrap();
    c.compress(data).unwrap()
}

#[test]
fn crafted_segment_matches_the_encoder() {
    // The helpers the next tests rely on build what the encoder builds.
    let payload = concat(&small_records());
    let segment = Segment::decode(&with_frame(&frame(&payload, true)), None).unwrap();
    assert_eq!(segment.len(), 4);
    assert!(Segment::decode(&with_frame(&frame(&payload, false)), None).is_ok());
}

#[test]
fn frame_larger_than_payload_len_is_refused() {
    let mut payload = concat(&small_records());
    payload.extend_from_slice(&[0xaa; 100]);

    for content_size in [true, false] {
        let bytes = with_frame(&frame(&payload, content_size));
        let payload_at = HEADER_SIZE + 4 * INDEX_ENTRY_SIZE;

        let e = Segment::decode(&bytes, None).unwrap_err();

        assert_eq!(e.offset, payload_at as u64, "{e}");
        let expected = if content_size { "zstd frame holds" } else { "does not decompress into payload length" };
        assert!(e.reason.contains(expected), "content size {content_size}: {e}");
    }
}

#[test]
fn frame_smaller_than_payload_len_is_refused() {
    let payload = concat(&small_records());

    for content_size in [true, false] {
        let bytes = with_frame(&frame(&payload[..payload.len() - 1], content_size));

        let e = Segment::decode(&bytes, None).unwrap_err();

        let expected = if content_size { "zstd frame holds" } else { "decompresses to" };
        assert!(e.reason.contains(expected), "content size {content_size}: {e}");
    }
}

#[test]
fn second_frame_after_the_payload_is_refused() {
    let payload = concat(&small_records());
    let (a, b) = payload.split_at(100);
    let mut stored = frame(a, false);
    let first = stored.len();
    stored.extend_from_slice(&frame(b, false));

    let e = Segment::decode(&with_frame(&stored), None).unwrap_err();

    assert_eq!(e.offset, (HEADER_SIZE + 4 * INDEX_ENTRY_SIZE + first) as u64, "{e}");
}

#[test]
fn skippable_frame_is_refused() {
    let payload = concat(&small_records());
    let mut stored = vec![0x50, 0x2a, 0x4d, 0x18, 4, 0, 0, 0, 1, 2, 3, 4];
    stored.extend_from_slice(&frame(&payload, true));

    let e = Segment::decode(&with_frame(&stored), None).unwrap_err();

    assert!(e.reason.contains("not a zstd frame"), "{e}");
}

#[test]
fn record_checksum_mismatch_names_the_record() {
    // Data corrupted before the segment was sealed: the trailer checksum
    // holds, the record's does not.
    let records = small_records();
    let mut bytes = craft(&plain_header(&records, 100, 105), &records, &concat(&records));
    let label_at = bytes.len() - TRAILER_SIZE - 3;
    bytes[label_at] ^= 1;
    reseal(&mut bytes);

    let e = Segment::decode(&bytes, None).unwrap_err();

    assert_eq!(e.reason, "record 3 (seq 105): checksum mismatch");
    assert_eq!(e.offset, (HEADER_SIZE + 3 * INDEX_ENTRY_SIZE + OFF_ENTRY_CRC) as u64);
}

#[test]
fn sequence_gap_is_refused() {
    let mut records = small_records();
    records[1].0.seq = 102;

    let e = Segment::decode(&craft(&plain_header(&records, 100, 105), &records, &concat(&records)), None).unwrap_err();

    assert_eq!(e.reason, "record 1: seq 102, expected 101");
    assert_eq!(e.offset, (HEADER_SIZE + INDEX_ENTRY_SIZE) as u64);
}

#[test]
fn first_seq_mismatch_is_refused() {
    let records = small_records();

    let e = Segment::decode(&craft(&plain_header(&records, 99, 105), &records, &concat(&records)), None).unwrap_err();

    assert_eq!(e.reason, "record 0: seq 100, expected 99");
}

#[test]
fn last_seq_mismatch_is_refused() {
    let records = small_records();

    let e = Segment::decode(&craft(&plain_header(&records, 100, 106), &records, &concat(&records)), None).unwrap_err();

    assert_eq!(e.offset, OFF_LAST_SEQ as u64);
    assert_eq!(e.reason, "last_seq 106, but the records end at seq 105");
}

#[test]
fn wrap_pad_is_refused() {
    let mut records = small_records();
    records[2].0 = RecordHeader::pad(102, 0, 128);
    records[3].0.seq = 102;

    let e = Segment::decode(&craft(&plain_header(&records, 100, 103), &records, &concat(&records)), None).unwrap_err();

    assert_eq!(e.offset, (HEADER_SIZE + 2 * INDEX_ENTRY_SIZE) as u64);
    assert!(e.reason.contains("wrap pad"), "{e}");
}

#[test]
fn sequence_overflow_is_refused() {
    let records = vec![(RecordHeader::pad(u64::MAX - 1, 2, 64), Vec::new())];

    let e = Segment::decode(&craft(&plain_header(&records, u64::MAX - 1, u64::MAX), &records, &[]), None).unwrap_err();

    assert!(e.reason.contains("overflow"), "{e}");
}

#[test]
fn invalid_record_kind_is_refused() {
    let records = small_records();
    let mut bytes = craft(&plain_header(&records, 100, 105), &records, &concat(&records));
    bytes[HEADER_SIZE + INDEX_ENTRY_SIZE + 34] = 9;
    reseal(&mut bytes);

    let e = Segment::decode(&bytes, None).unwrap_err();

    assert_eq!(e.offset, (HEADER_SIZE + INDEX_ENTRY_SIZE) as u64);
    assert_eq!(e.reason, "record 1: unknown record kind 9");
}

#[test]
fn data_past_payload_len_is_refused() {
    let records = small_records();
    let header = SegmentHeader { payload_len: 4096, stored_len: 4096, ..plain_header(&records, 100, 105) };
    let mut bytes = craft(&header, &records, &concat(&records));
    // Keep the file length consistent with the (lying) header.
    bytes.drain(bytes.len() - TRAILER_SIZE - 14..bytes.len() - TRAILER_SIZE);
    reseal(&mut bytes);

    let e = Segment::decode(&bytes, None).unwrap_err();

    assert_eq!(e.offset, (HEADER_SIZE + 3 * INDEX_ENTRY_SIZE) as u64, "{e}");
}

#[test]
fn builder_refuses_a_seq_gap_and_stays_usable() {
    let mut b = SegmentBuilder::new(VM, 1, 10);
    let data = [1u8; 16];

    assert!(b.push(&write(11, 0, 0, &data), &data).is_err());
    assert!(b.is_empty());
    assert_eq!(b.push(&write(10, 0, 0, &data), &data), Ok(()));
    assert_eq!((b.next_seq(), b.record_count(), b.payload_len()), (11, 1, 16));
}

#[test]
fn builder_refuses_a_wrap_pad_and_a_data_length_mismatch() {
    let mut b = SegmentBuilder::new(VM, 1, 10);

    assert!(b.push(&RecordHeader::pad(10, 0, 64), &[]).unwrap_err().contains("wrap pad"));
    assert!(b.push(&write(10, 0, 0, &[1; 16]), &[1; 15]).is_err());
    assert!(b.push(&zero(10, 0, 4096), &[0; 4096]).is_err());
    assert!(b.is_empty());
}

#[test]
fn pad_counts_the_sequence_numbers_it_stands_for() {
    let mut b = SegmentBuilder::new(VM, 1, 10);

    b.push(&RecordHeader::pad(10, 5, 64), &[]).unwrap();

    assert_eq!(b.next_seq(), 15);
    let (header, _) = Encoder::new(Compression::None).unwrap().encode(&b).unwrap();
    assert_eq!((header.first_seq, header.last_seq), (10, 14));
}

#[test]
fn builder_knows_when_it_is_full() {
    let b = SegmentBuilder::new(VM, 1, 10);

    assert!(b.has_room(32 << 20));
    assert!(!SegmentBuilder { data: vec![0; (MAX_PAYLOAD - 10) as usize], ..b.clone() }.has_room(11));
    assert!(!SegmentBuilder { record_count: MAX_RECORDS, ..b }.has_room(0));
}

#[test]
fn encoder_refuses_an_empty_builder_and_bad_levels() {
    let b = SegmentBuilder::new(VM, 1, 10);
    assert_eq!(Encoder::new(ZSTD1).unwrap().encode(&b).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    assert!(Encoder::new(Compression::Zstd { level: 23 }).is_err());
    assert!(Encoder::new(Compression::Zstd { level: -8 }).is_err());
    assert!(Encoder::new(Compression::Zstd { level: -7 }).is_ok());
}

#[test]
fn encoder_is_reusable() {
    let mut enc = Encoder::new(Compression::Zstd { level: 3 }).unwrap();
    let first = enc.encode(&builder_of(100, &small_records())).unwrap().1;

    let second = enc.encode(&builder_of(100, &small_records())).unwrap().1;

    let a = Segment::decode(&first, None).unwrap();
    let b = Segment::decode(&second, None).unwrap();
    assert!(a.records().eq(b.records()));
}

#[test]
fn header_level_out_of_range_is_refused() {
    let mut bytes = small_segment(ZSTD1);
    bytes[OFF_LEVEL] = 23;
    reseal(&mut bytes);

    let e = Segment::decode(&bytes, None).unwrap_err();

    assert_eq!(e.offset, OFF_LEVEL as u64);
}

#[test]
fn read_file_returns_the_segment_and_errors_carry_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = small_segment(ZSTD1);
    let good = dir.path().join(file_name(100, 105));
    std::fs::write(&good, &bytes).unwrap();
    let bad = dir.path().join("bad");
    let mut flipped = bytes.clone();
    flipped[bytes.len() - 20] ^= 1;
    std::fs::write(&bad, &flipped).unwrap();

    assert_eq!(Segment::read_file(&good, Some(VM)).unwrap().len(), 4);
    let e = Segment::read_file(&bad, None).unwrap_err();
    assert_eq!(e.path.as_deref(), Some(bad.as_path()));
    assert!(e.reason.starts_with("trailer checksum mismatch: stored 0x"), "{e}");
    assert_eq!(e.to_string(), format!("segment {}: at byte {}: {}", bad.display(), e.offset, e.reason));
}

#[test]
fn read_file_of_a_missing_file_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing");

    let e = Segment::read_file(&path, None).unwrap_err();

    assert_eq!(e.path.as_deref(), Some(path.as_path()));
    assert_eq!(e.offset, 0);
    assert!(e.reason.starts_with("cannot open: "), "{e}");
}

#[test]
fn read_header_checks_the_header_and_the_file_length() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = small_segment(ZSTD1);
    let path = dir.path().join("seg");
    std::fs::write(&path, &bytes).unwrap();

    let header = read_header(&path).unwrap();
    assert_eq!(header, Segment::decode(&bytes, None).unwrap().header);

    std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    let e = read_header(&path).unwrap_err();
    assert_eq!(e.reason, format!("file is {} bytes, header says {}", bytes.len() - 1, bytes.len()));
    assert_eq!(e.path.as_deref(), Some(path.as_path()));

    std::fs::write(&path, &bytes[..50]).unwrap();
    let e = read_header(&path).unwrap_err();
    assert!(e.reason.starts_with("file is 50 bytes, shorter"), "{e}");
}

#[test]
fn in_memory_errors_say_so() {
    let e = Segment::decode(b"junk", None).unwrap_err();

    assert_eq!(
        e.to_string(),
        "segment (in memory): at byte 4: file is 4 bytes, shorter than the 128-byte segment header"
    );
}

#[test]
fn file_name_round_trips_and_sorts() {
    for (first, last) in [(0, 0), (1, 2), (100, 105), (u64::MAX, u64::MAX)] {
        assert_eq!(parse_file_name(&file_name(first, last)), Some((first, last)));
    }
    assert_eq!(file_name(1, 2), "00000000000000000001-00000000000000000002");
    assert!(file_name(9, 10) < file_name(10, 10));
}

#[test]
fn junk_file_names_are_none() {
    let long = format!("{}-{}", "9".repeat(20), "9".repeat(20)); // > u64::MAX
    let plus = format!("+{}-{}", "0".repeat(19), "1".repeat(20));
    let tmp = format!("{}.tmp", file_name(1, 2));
    let backwards = file_name(2, 1);
    for name in ["x", "1-2.tmp", "0001-", "", "-", "1-2", &long, &plus, &tmp, &backwards] {
        assert_eq!(parse_file_name(name), None, "{name:?}");
    }
}

#[test]
fn a_payload_zstd_cannot_shrink_is_stored_as_is_and_levels_change_between_segments() {
    // xorshift: bytes zstd cannot shrink.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let random: Vec<u8> = (0..64 << 10)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let text = b"tern tern tern ".repeat(4096);
    let mut encoder = Encoder::new(ZSTD1).unwrap();
    let segment = |data: &[u8]| {
        let mut b = SegmentBuilder::new(VM, 1, 1);
        b.push(&write(1, 0, 0, data), data).unwrap();
        b
    };
    let (h, bytes) = encoder.encode(&segment(&random)).unwrap();
    assert_eq!(h.compression, Compression::None);
    assert_eq!(h.stored_len, random.len() as u64);
    assert_eq!(Segment::decode(&bytes, Some(VM)).unwrap().payload(), &random[..]);
    let (h, _) = encoder.encode(&segment(&text)).unwrap();
    assert_eq!(h.compression, ZSTD1);
    encoder.set_level(-5).unwrap();
    let (h, bytes) = encoder.encode(&segment(&text)).unwrap();
    assert_eq!(h.compression, Compression::Zstd { level: -5 });
    assert_eq!(Segment::decode(&bytes, Some(VM)).unwrap().payload(), &text[..]);
    assert!(encoder.set_level(23).is_err());
}
