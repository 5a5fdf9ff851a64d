//! The cache store's untrusted input: segment files, block-hash files and
//! manifests, as `tern apply` and `tern ship` read them. Decoding must
//! never panic; what decodes must re-encode to a file that decodes the same
//! (a manifest: serialize to TOML that parses to the same manifest).
//!
//! Every input is tried as each of the three. Segments and hash files are
//! checksummed, which the fuzzer cannot get right by mutation: an input
//! that starts with their magic is tried a second time with its checksums
//! made right (a segment's header, trailer, and each record's over its
//! data, decompressed first for zstd), so the checks behind them are
//! fuzzed too. Manifests are TOML: seeds and `segment.dict` give the
//! fuzzer their shape.
//!
//! Seeds: `seeds/segment/seg0` and `seg1`, and what
//! `TERN_FUZZ_SEGMENT_SEEDS=DIR` makes the target write to DIR (and exit):
//! segments of every record kind, compressed and not, hash files and
//! manifests (scripts/fuzz-nbd.sh does this when seeds/segment/ has no
//! manifest seed).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tern_driver::checksum::{crc32c, crc32c_of};
use tern_driver::journal::{RecordHeader, RecordKind, RESYNC_CLOSE, RESYNC_OPEN};
use tern_store::cache::Manifest;
use tern_store::hashes::{self, BlockHashes};
use tern_store::segment::{self, Compression, Encoder, Segment, SegmentBuilder};

fuzz_target!(
    init: {
        if let Some(dir) = std::env::var_os("TERN_FUZZ_SEGMENT_SEEDS") {
            write_seeds(Path::new(&dir));
            std::process::exit(0);
        }
    },
    |data: &[u8]| {
        check_segment(data);
        check_hashes(data);
        check_manifest(data);
        if data.starts_with(&segment::MAGIC) {
            let mut b = data.to_vec();
            reseal_segment(&mut b);
            check_segment(&b);
        }
        if data.starts_with(&hashes::MAGIC) && data.len() >= 4 {
            let mut b = data.to_vec();
            let body = b.len() - 4;
            let crc = crc32c(&b[..body]);
            b[body..].copy_from_slice(&crc.to_le_bytes());
            check_hashes(&b);
        }
    }
);

fn check_segment(data: &[u8]) {
    let Ok(seg) = Segment::decode(data, None) else { return };
    let h = &seg.header;
    let mut b = SegmentBuilder::new(h.vm_id, h.epoch, h.first_seq);
    for (r, d) in seg.records() {
        b.push(r, d).expect("a decoded record re-pushes");
    }
    b.set_window(h.window);
    let (_, bytes) = Encoder::new(h.compression).expect("level").encode(&b).expect("encode");
    let again = Segment::decode(&bytes, Some(h.vm_id)).expect("re-encoded segment decodes");
    assert_eq!(again.len(), seg.len());
    assert!(again.records().eq(seg.records()), "re-encoded segment holds other records");
    assert_eq!((again.header.first_seq, again.header.last_seq), (h.first_seq, h.last_seq));
}

fn check_hashes(data: &[u8]) {
    if let Ok(hashes) = BlockHashes::decode(data) {
        assert_eq!(BlockHashes::decode(&hashes.encode()).expect("round trip"), hashes);
    }
}

fn check_manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("manifest.toml");
    let Ok(m) = Manifest::parse(path, text) else { return };
    // `tern ship` writes the manifest back (a new epoch): what it read must
    // be writable, and read back the same.
    let written = toml::to_string(&m).expect("a parsed manifest serializes");
    assert_eq!(Manifest::parse(path, &written).expect("a written manifest parses"), m);
}

// Segment layout (store/src/segment.rs).
const HEADER_SIZE: usize = 128;
const INDEX_ENTRY_SIZE: usize = 40;
const TRAILER_SIZE: usize = 16;
const OFF_RECORD_COUNT: usize = 56;
const OFF_COMPRESSION: usize = 64;
const OFF_PAYLOAD_LEN: usize = 72;
const OFF_HEADER_CRC: usize = 124;

/// Gives a segment the checksums its bytes call for: each index entry's
/// over its body and its data (uncompressed, or decompressed when the
/// payload is a zstd frame; as far as the payload reaches), the header's,
/// and the trailer's. Whatever else is wrong stays wrong.
fn reseal_segment(b: &mut [u8]) {
    if b.len() < HEADER_SIZE + TRAILER_SIZE {
        return;
    }
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let trailer_at = b.len() - TRAILER_SIZE;
    let count = (u32_at(b, OFF_RECORD_COUNT) as usize).min((trailer_at - HEADER_SIZE) / INDEX_ENTRY_SIZE);
    let payload_at = HEADER_SIZE + count * INDEX_ENTRY_SIZE;
    let stored = &b[payload_at..trailer_at];
    let payload = match b[OFF_COMPRESSION] {
        0 => Some(stored.to_vec()),
        _ => {
            let len = u64::from_le_bytes(b[OFF_PAYLOAD_LEN..OFF_PAYLOAD_LEN + 8].try_into().unwrap());
            zstd::bulk::decompress(stored, len.min(1 << 20) as usize).ok()
        }
    };
    if let Some(payload) = payload {
        let mut at = 0usize;
        for i in 0..count {
            let entry = HEADER_SIZE + i * INDEX_ENTRY_SIZE;
            let len = u32_at(b, entry + 28) as usize;
            let Some(data) = payload.get(at..at.saturating_add(len)) else { break };
            let crc = crc32c_of(&[&b[entry..entry + 36], data]);
            b[entry + 36..entry + 40].copy_from_slice(&crc.to_le_bytes());
            at += len;
        }
    }
    let crc = crc32c(&b[..OFF_HEADER_CRC]);
    b[OFF_HEADER_CRC..OFF_HEADER_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    let crc = crc32c(&b[..trailer_at]);
    b[trailer_at + 8..trailer_at + 12].copy_from_slice(&crc.to_le_bytes());
}

// ---- seeds ------------------------------------------------------------------

const VM_ID: [u8; 16] = *b"tern-fuzz-segm-1";

/// Writes real store files to `out`: segments, hash files, manifests.
fn write_seeds(out: &Path) {
    std::fs::create_dir_all(out).expect("create the seed directory");
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, compression) in [("none", Compression::None), ("zstd", Compression::Zstd { level: 1 })] {
        let mut encoder = Encoder::new(compression).expect("encoder");
        seeds.push((format!("segment-all-kinds-{name}"), encoder.encode(&all_kinds()).expect("encode").1));
        let mut one = SegmentBuilder::new(VM_ID, 1, 1);
        one.push(&record(1, RecordKind::Write, 0, 512), &[0x42; 512]).expect("push");
        seeds.push((format!("segment-one-write-{name}"), encoder.encode(&one).expect("encode").1));
    }
    let hashes = BlockHashes {
        vm_id: VM_ID,
        epoch: 2,
        region_size: 65536,
        disk_size: (1 << 20) + 4096,
        applied_seq: 1234,
        hashes: (0..17u128).map(|i| i * 0x0101_0101_0101_0101_0101_0101_0101_0101).collect(),
    };
    seeds.push(("hashes-17-regions".into(), hashes.encode()));
    for (name, text) in MANIFESTS {
        Manifest::parse(Path::new(name), text).expect("a seed manifest parses");
        seeds.push((format!("manifest-{name}.toml"), text.trim_start().as_bytes().to_vec()));
    }
    for (name, bytes) in &seeds {
        std::fs::write(out.join(name), bytes).expect("write a seed");
    }
    println!("{}: {} seeds", out.display(), seeds.len());
}

/// A segment with a record of every kind: a resync window opened and
/// closed, data, zeroes, a trim, a tag, a pad standing for lost sequence
/// numbers.
fn all_kinds() -> SegmentBuilder {
    let mut b = SegmentBuilder::new(VM_ID, 3, 100);
    let mut push = |h: RecordHeader, data: &[u8]| b.push(&h, data).expect("push");
    push(RecordHeader { flags: RESYNC_OPEN, ..record(100, RecordKind::Resync, 0, 0) }, &[]);
    push(record(101, RecordKind::Resync, 65536, 300), &[0xaa; 300]);
    push(record(102, RecordKind::Write, 4096, 1000), &[0x11; 1000]);
    push(record(103, RecordKind::Zero, 8192, 65536), &[]);
    push(record(104, RecordKind::Trim, 1 << 20, 4096), &[]);
    push(RecordHeader { data_len: 6, ..record(105, RecordKind::Tag, 0, 6) }, b"backup");
    push(RecordHeader { offset: 3, length: 128, ..record(106, RecordKind::Pad, 0, 0) }, &[]);
    push(RecordHeader { flags: RESYNC_CLOSE, ..record(109, RecordKind::Resync, 0, 0) }, &[]);
    b.set_window(segment::WINDOW_AT_END);
    b
}

fn record(seq: u64, kind: RecordKind, offset: u64, length: u32) -> RecordHeader {
    let data_len = if matches!(kind, RecordKind::Write | RecordKind::Resync | RecordKind::Tag) { length } else { 0 };
    RecordHeader { seq, offset, time_ns: 1_800_000_000_000_000_000, length, data_len, disk: 0, kind, flags: 0 }
}

const MANIFESTS: [(&str, &str); 2] = [
    (
        "two-disks-two-epochs",
        r#"
version = 1
name = "vm1"
id = "7465726e-2d66-757a-7a2d-7365676d2d31"

[policy]
interval = "5m"
retention = "1day"
keep-all = "2h"
compression-level = 3
segment-size = "8MiB"
segment-age = "250ms"

[[disk]]
name = "root"
size = 21474836480
source = "/var/lib/images/vm1-root.img"

[[disk]]
name = "data"
size = 1073741824
seed = "failover/active/data.img"

[[epoch]]
number = 1
first-seq = 1
reason = "replication enabled"

[[epoch]]
number = 2
first-seq = 4294967500
reason = "journal discarded after a host crash"
"#,
    ),
    (
        "minimal",
        r#"
version = 1
name = "a"
id = "00000000-0000-0000-0000-000000000001"
policy = {}
disk = [{ name = "d", size = 1 }]
epoch = [{ number = 1, first-seq = 1, reason = "" }]
"#,
    ),
];
