//! Segments: the files of the cache store, version 1 (also in
//! `docs/FORMATS.md`).
//!
//! A segment holds a run of consecutive journal records of one VM. `tern
//! ship` writes them as `<cache>/<vm>/segments/<first-seq>-<last-seq>`
//! (tmp file, fsync, rename); the applier at the target site verifies and
//! replays them. Segments cross a network and sit in a cache nobody vouches
//! for, so [`Segment::decode`] treats its input as hostile: it never panics,
//! allocates nothing a length field asks for before the file has been shown
//! to be that long (the decompressed payload, at most [`MAX_PAYLOAD`], is
//! the one exception), and names the byte offset of every problem it finds.
//!
//! All integers are little-endian.
//!
//! ```text
//! file    = header (128 bytes) | index (record_count × 40 bytes) | payload (stored_len bytes) | trailer (16 bytes)
//!
//! header  = { [u8;8] magic "TERNSEGM" | u32 version (1) | u32 header_size (128)
//!           | [u8;16] vm_id | u64 epoch | u64 first_seq | u64 last_seq
//!           | u32 record_count | u32 window | u8 compression | i8 level | u16 0
//!           | u32 0 | u64 payload_len | u64 stored_len | u64 created_ns
//!           | [u8;28] 0 | u32 crc32c(bytes 0..124) }
//! index   = record_count × { bytes 8..48 of the record's journal header:
//!           u64 seq | u64 offset | u64 time_ns | u32 length | u32 data_len
//!           | u16 disk | u8 kind | u8 flags | u32 crc32c(body, data) }
//! payload = the records' data, concatenated in index order; one zstd frame
//!           (compression 1) or as is (compression 0)
//! trailer = { [u8;8] magic "TERNSEND" | u32 crc32c(every byte before the trailer) | u32 0 }
//! ```
//!
//! - The per-record checksum is the journal's own, computed over the data
//!   as it left the ring and checked again after decompression at the
//!   target: it is carried end to end.
//! - Records are dense: the first has `seq == first_seq`, each next one the
//!   previous `seq` + its count, where a record counts 1 except a pad, which
//!   counts its `offset` (the sequence numbers a crashed producer lost; a
//!   pad that counts 0 — the journal's wrap filler — never appears in a
//!   segment). `last_seq` is the last record's `seq` + its count − 1.
//! - `window`: [`WINDOW_AT_START`], [`WINDOW_AT_END`]; other bits are an
//!   error.
//! - Reserved header bytes are written zero and ignored by readers (they
//!   are under the header checksum), as `docs/FORMATS.md` promises for every
//!   format; the trailer's last u32, which no checksum covers, must be zero.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use tern_driver::journal::format::RECORD_HEADER_SIZE;
use tern_driver::journal::{RecordHeader, RecordKind};

pub const MAGIC: [u8; 8] = *b"TERNSEGM";
pub const TRAILER_MAGIC: [u8; 8] = *b"TERNSEND";
pub const VERSION: u32 = 1;
pub const HEADER_SIZE: usize = 128;
/// An index entry: a journal record header without its commit word.
pub const INDEX_ENTRY_SIZE: usize = 40;
pub const TRAILER_SIZE: usize = 16;
/// The most records a segment holds.
pub const MAX_RECORDS: u32 = 1 << 20;
/// The most data (uncompressed) a segment holds: 256 MiB.
pub const MAX_PAYLOAD: u64 = 256 << 20;
/// `window`: the segment begins inside a resync window.
pub const WINDOW_AT_START: u32 = 1;
/// `window`: the segment ends inside a resync window.
pub const WINDOW_AT_END: u32 = 2;
const WINDOW_KNOWN: u32 = WINDOW_AT_START | WINDOW_AT_END;
/// The zstd levels a segment may record (and an [`Encoder`] accepts).
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = -7..=22;

const _: () = assert!(INDEX_ENTRY_SIZE == RECORD_HEADER_SIZE - 8);

// Header field offsets.
const OFF_VERSION: usize = 8;
const OFF_HEADER_SIZE: usize = 12;
const OFF_VM_ID: usize = 16;
const OFF_EPOCH: usize = 32;
const OFF_FIRST_SEQ: usize = 40;
const OFF_LAST_SEQ: usize = 48;
const OFF_RECORD_COUNT: usize = 56;
const OFF_WINDOW: usize = 60;
const OFF_COMPRESSION: usize = 64;
const OFF_LEVEL: usize = 65;
const OFF_PAYLOAD_LEN: usize = 72;
const OFF_STORED_LEN: usize = 80;
const OFF_CREATED_NS: usize = 88;
const OFF_HEADER_CRC: usize = 124;
// Trailer field offsets, from the trailer's start.
const OFF_TRAILER_CRC: usize = 8;
const OFF_TRAILER_ZERO: usize = 12;
// Index entry field offsets.
const OFF_ENTRY_CRC: usize = 36;

const COMPRESSION_NONE: u8 = 0;
const COMPRESSION_ZSTD: u8 = 1;

/// How a segment's payload is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    /// One zstd frame; `level` is in [`ZSTD_LEVELS`] (stored as an i8).
    Zstd {
        level: i32,
    },
}

/// A segment's header, decoded and checked on its own (see
/// [`SegmentHeader::decode`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    pub vm_id: [u8; 16],
    pub epoch: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub record_count: u32,
    pub window: u32,
    pub compression: Compression,
    /// Uncompressed: the sum of the records' `data_len`.
    pub payload_len: u64,
    /// As stored in the file.
    pub stored_len: u64,
    /// When it was encoded, in nanoseconds since the Unix epoch.
    pub created_ns: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let (compression, level) = match self.compression {
            Compression::None => (COMPRESSION_NONE, 0i8),
            // Encoders only build headers with levels in ZSTD_LEVELS.
            Compression::Zstd { level } => (COMPRESSION_ZSTD, level.clamp(i8::MIN.into(), i8::MAX.into()) as i8),
        };
        let mut b = [0u8; HEADER_SIZE];
        b[..8].copy_from_slice(&MAGIC);
        put_u32(&mut b, OFF_VERSION, VERSION);
        put_u32(&mut b, OFF_HEADER_SIZE, HEADER_SIZE as u32);
        b[OFF_VM_ID..OFF_VM_ID + 16].copy_from_slice(&self.vm_id);
        put_u64(&mut b, OFF_EPOCH, self.epoch);
        put_u64(&mut b, OFF_FIRST_SEQ, self.first_seq);
        put_u64(&mut b, OFF_LAST_SEQ, self.last_seq);
        put_u32(&mut b, OFF_RECORD_COUNT, self.record_count);
        put_u32(&mut b, OFF_WINDOW, self.window);
        b[OFF_COMPRESSION] = compression;
        b[OFF_LEVEL] = level.to_le_bytes()[0];
        put_u64(&mut b, OFF_PAYLOAD_LEN, self.payload_len);
        put_u64(&mut b, OFF_STORED_LEN, self.stored_len);
        put_u64(&mut b, OFF_CREATED_NS, self.created_ns);
        let crc = tern_driver::checksum::crc32c(&b[..OFF_HEADER_CRC]);
        put_u32(&mut b, OFF_HEADER_CRC, crc);
        b
    }

    /// Decodes the header at the start of `b` (a whole file, or at least its
    /// first [`HEADER_SIZE`] bytes) and checks everything the header alone
    /// can show: magic, version, checksum, known values, limits, and that
    /// the sequence range can hold the records. It does not compare the
    /// file's length (see [`SegmentHeader::file_len`]).
    pub fn decode(b: &[u8]) -> Result<SegmentHeader, SegmentError> {
        if b.len() < HEADER_SIZE {
            return Err(SegmentError::at(
                b.len(),
                format!("file is {} bytes, shorter than the {HEADER_SIZE}-byte segment header", b.len()),
            ));
        }
        if b[..8] != MAGIC {
            return Err(SegmentError::at(0, "bad magic (not a tern segment)"));
        }
        let version = u32_at(b, OFF_VERSION);
        if version != VERSION {
            return Err(SegmentError::at(
                OFF_VERSION,
                format!("unsupported segment version {version} (this tern reads version {VERSION})"),
            ));
        }
        let stored_crc = u32_at(b, OFF_HEADER_CRC);
        let crc = tern_driver::checksum::crc32c(&b[..OFF_HEADER_CRC]);
        if stored_crc != crc {
            return Err(SegmentError::at(
                OFF_HEADER_CRC,
                format!("header checksum mismatch: stored {stored_crc:#010x}, computed {crc:#010x}"),
            ));
        }
        let header_size = u32_at(b, OFF_HEADER_SIZE);
        if header_size as usize != HEADER_SIZE {
            return Err(SegmentError::at(
                OFF_HEADER_SIZE,
                format!("header size {header_size}, expected {HEADER_SIZE}"),
            ));
        }
        let level = i8::from_le_bytes([b[OFF_LEVEL]]);
        let compression = match b[OFF_COMPRESSION] {
            COMPRESSION_NONE if level == 0 => Compression::None,
            COMPRESSION_NONE => {
                return Err(SegmentError::at(OFF_LEVEL, format!("level {level} with compression none, expected 0")))
            }
            COMPRESSION_ZSTD if ZSTD_LEVELS.contains(&level.into()) => Compression::Zstd { level: level.into() },
            COMPRESSION_ZSTD => {
                return Err(SegmentError::at(
                    OFF_LEVEL,
                    format!("zstd level {level} out of range {}..={}", ZSTD_LEVELS.start(), ZSTD_LEVELS.end()),
                ))
            }
            c => return Err(SegmentError::at(OFF_COMPRESSION, format!("unknown compression {c}"))),
        };
        let window = u32_at(b, OFF_WINDOW);
        if window & !WINDOW_KNOWN != 0 {
            return Err(SegmentError::at(OFF_WINDOW, format!("unknown window flags {window:#x}")));
        }
        let record_count = u32_at(b, OFF_RECORD_COUNT);
        if record_count == 0 {
            return Err(SegmentError::at(OFF_RECORD_COUNT, "record count 0 (a segment holds at least one record)"));
        }
        if record_count > MAX_RECORDS {
            return Err(SegmentError::at(
                OFF_RECORD_COUNT,
                format!("record count {record_count} exceeds the maximum {MAX_RECORDS}"),
            ));
        }
        let payload_len = u64_at(b, OFF_PAYLOAD_LEN);
        if payload_len > MAX_PAYLOAD {
            return Err(SegmentError::at(
                OFF_PAYLOAD_LEN,
                format!("payload length {payload_len} exceeds the maximum {MAX_PAYLOAD}"),
            ));
        }
        let stored_len = u64_at(b, OFF_STORED_LEN);
        match compression {
            Compression::None if stored_len != payload_len => {
                return Err(SegmentError::at(
                    OFF_STORED_LEN,
                    format!("stored length {stored_len} differs from payload length {payload_len} (not compressed)"),
                ))
            }
            Compression::Zstd { .. } if stored_len > zstd_bound(payload_len) => {
                return Err(SegmentError::at(
                    OFF_STORED_LEN,
                    format!(
                        "stored length {stored_len} exceeds zstd's bound {} for a payload of {payload_len} bytes",
                        zstd_bound(payload_len)
                    ),
                ))
            }
            _ => {}
        }
        let first_seq = u64_at(b, OFF_FIRST_SEQ);
        let last_seq = u64_at(b, OFF_LAST_SEQ);
        if last_seq < first_seq {
            return Err(SegmentError::at(OFF_LAST_SEQ, format!("last_seq {last_seq} is before first_seq {first_seq}")));
        }
        // Every record takes at least one sequence number.
        if last_seq - first_seq < u64::from(record_count) - 1 {
            return Err(SegmentError::at(
                OFF_RECORD_COUNT,
                format!("{record_count} records cannot fit in sequence numbers {first_seq}..={last_seq}"),
            ));
        }
        let mut vm_id = [0u8; 16];
        vm_id.copy_from_slice(&b[OFF_VM_ID..OFF_VM_ID + 16]);
        Ok(SegmentHeader {
            vm_id,
            epoch: u64_at(b, OFF_EPOCH),
            first_seq,
            last_seq,
            record_count,
            window,
            compression,
            payload_len,
            stored_len,
            created_ns: u64_at(b, OFF_CREATED_NS),
        })
    }

    /// The length of the file this header describes. No overflow: the
    /// limits keep it under 1 GiB for any header that decodes.
    pub fn file_len(&self) -> u64 {
        self.payload_offset() + self.stored_len + TRAILER_SIZE as u64
    }

    fn payload_offset(&self) -> u64 {
        HEADER_SIZE as u64 + u64::from(self.record_count) * INDEX_ENTRY_SIZE as u64
    }
}

/// Why a segment was refused.
#[derive(Debug, thiserror::Error)]
#[error("segment {}: at byte {offset}: {reason}", PathDisplay(.path))]
pub struct SegmentError {
    /// The file, when the segment came from one.
    pub path: Option<PathBuf>,
    /// Where in the file the problem is.
    pub offset: u64,
    pub reason: String,
}

impl SegmentError {
    pub(crate) fn at(offset: usize, reason: impl Into<String>) -> Self {
        SegmentError { path: None, offset: offset as u64, reason: reason.into() }
    }

    fn io(path: &Path, what: &str, e: io::Error) -> Self {
        SegmentError { path: Some(path.to_owned()), offset: 0, reason: format!("{what}: {e}") }
    }

    pub(crate) fn with_path(mut self, path: &Path) -> Self {
        self.path = Some(path.to_owned());
        self
    }
}

struct PathDisplay<'a>(&'a Option<PathBuf>);

impl fmt::Display for PathDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(p) => p.display().fmt(f),
            None => f.write_str("(in memory)"),
        }
    }
}

/// A decoded, fully verified segment.
#[derive(Debug, Clone)]
pub struct Segment {
    pub header: SegmentHeader,
    records: Vec<RecordHeader>,
    /// The records' data, concatenated, uncompressed.
    payload: Vec<u8>,
}

/// A segment's bytes are its records' data, concatenated: what the
/// applier's batch points into instead of copying.
impl AsRef<[u8]> for Segment {
    fn as_ref(&self) -> &[u8] {
        self.payload()
    }
}

impl Segment {
    /// Verifies everything: the header (as [`SegmentHeader::decode`]), the
    /// VM when `expect_vm` is given, the file's length, the trailer, each
    /// index entry and the sequence rules, the sum of the data lengths, the
    /// trailer checksum, that the payload is exactly one zstd frame of
    /// `payload_len` bytes (decompressed into a buffer of exactly that
    /// size), and each record's checksum.
    pub fn decode(bytes: &[u8], expect_vm: Option<[u8; 16]>) -> Result<Segment, SegmentError> {
        let header = SegmentHeader::decode(bytes)?;
        if let Some(vm) = expect_vm {
            if header.vm_id != vm {
                return Err(SegmentError::at(
                    OFF_VM_ID,
                    format!(
                        "segment of VM {}, expected VM {}",
                        uuid::Uuid::from_bytes(header.vm_id),
                        uuid::Uuid::from_bytes(vm)
                    ),
                ));
            }
        }
        let file_len = header.file_len();
        if bytes.len() as u64 != file_len {
            return Err(SegmentError {
                path: None,
                offset: file_len.min(bytes.len() as u64),
                reason: format!("file is {} bytes, header says {file_len}", bytes.len()),
            });
        }
        // From here every offset the header implies is inside `bytes`.
        let payload_at = header.payload_offset() as usize;
        let trailer_at = bytes.len() - TRAILER_SIZE;
        if bytes[trailer_at..trailer_at + 8] != TRAILER_MAGIC {
            return Err(SegmentError::at(trailer_at, "bad trailer magic (incomplete or overwritten file)"));
        }
        let zero = u32_at(bytes, trailer_at + OFF_TRAILER_ZERO);
        if zero != 0 {
            return Err(SegmentError::at(
                trailer_at + OFF_TRAILER_ZERO,
                format!("trailer reserved word is {zero:#x}, not 0"),
            ));
        }

        let records = decode_index(&header, &bytes[HEADER_SIZE..payload_at])?;

        let stored_crc = u32_at(bytes, trailer_at + OFF_TRAILER_CRC);
        let crc = tern_driver::checksum::crc32c(&bytes[..trailer_at]);
        if stored_crc != crc {
            return Err(SegmentError::at(
                trailer_at + OFF_TRAILER_CRC,
                format!("trailer checksum mismatch: stored {stored_crc:#010x}, computed {crc:#010x}"),
            ));
        }

        let stored = &bytes[payload_at..trailer_at];
        let payload = match header.compression {
            Compression::None => stored.to_vec(),
            Compression::Zstd { .. } => decompress(stored, header.payload_len, payload_at)?,
        };

        let mut data_at = 0;
        let mut headers = Vec::with_capacity(records.len());
        for (i, (h, crc)) in records.into_iter().enumerate() {
            let data = &payload[data_at..data_at + h.data_len as usize];
            if h.checksum(data) != crc {
                return Err(SegmentError::at(
                    HEADER_SIZE + i * INDEX_ENTRY_SIZE + OFF_ENTRY_CRC,
                    format!("record {i} (seq {}): checksum mismatch", h.seq),
                ));
            }
            data_at += data.len();
            headers.push(h);
        }
        Ok(Segment { header, records: headers, payload })
    }

    /// [`decode`](Self::decode)s the file at `path`; errors carry the path.
    /// Reads no more than the header promises.
    pub fn read_file(path: &Path, expect_vm: Option<[u8; 16]>) -> Result<Segment, SegmentError> {
        let (file, header, head) = open_checked(path)?;
        let len = header.file_len();
        // The header's limits bound `len`, and the file was just seen to be
        // that long. Reading one byte more tells a file that grew since.
        let mut bytes = Vec::with_capacity(len as usize + 1);
        bytes.extend_from_slice(&head);
        file.take(len + 1 - head.len() as u64)
            .read_to_end(&mut bytes)
            .map_err(|e| SegmentError::io(path, "cannot read", e))?;
        Segment::decode(&bytes, expect_vm).map_err(|e| e.with_path(path))
    }

    /// Whether two segments hold the same records (as their index says:
    /// each record's header and data checksum), however compressed.
    pub fn same_records(&self, other: &Segment) -> bool {
        self.records == other.records
    }

    /// The records in sequence order, each with its data.
    pub fn records(&self) -> impl Iterator<Item = (&RecordHeader, &[u8])> {
        self.record_spans().map(|(h, span)| (h, &self.payload[span]))
    }

    /// The records in sequence order, each with where its data is in
    /// [`Segment::payload`].
    pub fn record_spans(&self) -> impl Iterator<Item = (&RecordHeader, std::ops::Range<usize>)> {
        let mut at = 0;
        self.records.iter().map(move |h| {
            let span = at..at + h.data_len as usize;
            at = span.end;
            (h, span)
        })
    }

    /// The records' data, concatenated.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Always false for a decoded segment (it holds at least one record).
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// Reads and checks only the header, for listing a directory cheaply: as
/// [`SegmentHeader::decode`], and that the file has the length the header
/// implies.
pub fn read_header(path: &Path) -> Result<SegmentHeader, SegmentError> {
    open_checked(path).map(|(_, header, _)| header)
}

/// Opens `path`, decodes its header and checks the file's length; returns
/// the file positioned after the header, and the header's bytes.
fn open_checked(path: &Path) -> Result<(File, SegmentHeader, Vec<u8>), SegmentError> {
    let mut file = File::open(path).map_err(|e| SegmentError::io(path, "cannot open", e))?;
    let len = file.metadata().map_err(|e| SegmentError::io(path, "cannot stat", e))?.len();
    let mut head = Vec::with_capacity(HEADER_SIZE);
    (&mut file)
        .take(HEADER_SIZE as u64)
        .read_to_end(&mut head)
        .map_err(|e| SegmentError::io(path, "cannot read", e))?;
    let header = header_of_file(&head, len).map_err(|e| e.with_path(path))?;
    Ok((file, header, head))
}

/// The header of a file of `len` bytes that starts with `head`: as
/// [`SegmentHeader::decode`], and the file has the length it implies.
pub(crate) fn header_of_file(head: &[u8], len: u64) -> Result<SegmentHeader, SegmentError> {
    let header = SegmentHeader::decode(head)?;
    if len != header.file_len() {
        return Err(SegmentError {
            path: None,
            offset: len.min(header.file_len()),
            reason: format!("file is {len} bytes, header says {}", header.file_len()),
        });
    }
    Ok(header)
}

/// Decodes the index and checks the sequence rules and the data lengths
/// against `header`. Returns each record with its stored checksum.
fn decode_index(header: &SegmentHeader, index: &[u8]) -> Result<Vec<(RecordHeader, u32)>, SegmentError> {
    // `index` is record_count entries long (the file's length was checked),
    // so this allocation is bounded by the input.
    let mut records = Vec::with_capacity(header.record_count as usize);
    let mut expect_seq = header.first_seq;
    let mut data_len = 0u64;
    for (i, entry) in index.chunks_exact(INDEX_ENTRY_SIZE).enumerate() {
        let at = HEADER_SIZE + i * INDEX_ENTRY_SIZE;
        let mut body = [0u8; 36];
        body.copy_from_slice(&entry[..OFF_ENTRY_CRC]);
        let h = RecordHeader::decode_body(&body).map_err(|e| SegmentError::at(at, format!("record {i}: {e}")))?;
        if h.seq != expect_seq {
            return Err(SegmentError::at(at, format!("record {i}: seq {}, expected {expect_seq}", h.seq)));
        }
        expect_seq =
            next_seq_after(&h).map_err(|e| SegmentError::at(at, format!("record {i} (seq {}): {e}", h.seq)))?;
        data_len += u64::from(h.data_len);
        if data_len > header.payload_len {
            return Err(SegmentError::at(
                at,
                format!(
                    "record {i} (seq {}): data runs to byte {data_len}, past payload length {}",
                    h.seq, header.payload_len
                ),
            ));
        }
        records.push((h, u32_at(entry, OFF_ENTRY_CRC)));
    }
    let last = expect_seq - 1;
    if last != header.last_seq {
        return Err(SegmentError::at(
            OFF_LAST_SEQ,
            format!("last_seq {}, but the records end at seq {last}", header.last_seq),
        ));
    }
    if data_len != header.payload_len {
        return Err(SegmentError::at(
            OFF_PAYLOAD_LEN,
            format!("payload length {}, but the records carry {data_len} bytes", header.payload_len),
        ));
    }
    Ok(records)
}

/// Decompresses `stored` (at file offset `at`), which must be exactly one
/// zstd frame of exactly `payload_len` bytes.
fn decompress(stored: &[u8], payload_len: u64, at: usize) -> Result<Vec<u8>, SegmentError> {
    let magic = stored.first_chunk::<4>().map(|m| u32::from_le_bytes(*m));
    if magic != Some(zstd::zstd_safe::MAGICNUMBER) {
        return Err(SegmentError::at(at, "payload is not a zstd frame (bad frame magic)"));
    }
    match zstd::zstd_safe::find_frame_compressed_size(stored) {
        Ok(n) if n == stored.len() => {}
        Ok(n) => {
            return Err(SegmentError::at(
                at + n,
                format!("{} bytes follow the payload's zstd frame", stored.len().saturating_sub(n)),
            ))
        }
        Err(code) => {
            return Err(SegmentError::at(
                at,
                format!("payload is not a valid zstd frame: {}", zstd::zstd_safe::get_error_name(code)),
            ))
        }
    }
    match zstd::zstd_safe::get_frame_content_size(stored) {
        Ok(Some(n)) if n != payload_len => {
            return Err(SegmentError::at(
                at,
                format!("zstd frame holds {n} bytes, header says payload length {payload_len}"),
            ))
        }
        Ok(_) => {}
        Err(_) => return Err(SegmentError::at(at, "zstd frame header is invalid")),
    }
    // Bounded by MAX_PAYLOAD (the header was checked); zeroed pages come
    // from the allocator lazily.
    let mut payload = vec![0u8; payload_len as usize];
    let mut d = zstd::bulk::Decompressor::new()
        .map_err(|e| SegmentError::at(at, format!("cannot create a zstd decompressor: {e}")))?;
    let n = d.decompress_to_buffer(stored, payload.as_mut_slice()).map_err(|e| {
        SegmentError::at(at, format!("payload does not decompress into payload length {payload_len}: {e}"))
    })?;
    if n as u64 != payload_len {
        return Err(SegmentError::at(
            at,
            format!("zstd frame decompresses to {n} bytes, header says payload length {payload_len}"),
        ));
    }
    Ok(payload)
}

/// The seq of the record after `h` in a segment: `h` counts 1, a pad its
/// `offset` (which may not be 0).
fn next_seq_after(h: &RecordHeader) -> Result<u64, String> {
    let count = match h.kind {
        RecordKind::Pad if h.offset == 0 => {
            return Err("pad that stands for no sequence numbers (a wrap pad) in a segment".into())
        }
        RecordKind::Pad => h.offset,
        _ => 1,
    };
    h.seq.checked_add(count).ok_or_else(|| format!("sequence numbers overflow ({} + {count})", h.seq))
}

/// "{first:020}-{last:020}": the name of the segment file holding
/// `first_seq..=last_seq`. Names sort in sequence order.
pub fn file_name(first_seq: u64, last_seq: u64) -> String {
    format!("{first_seq:020}-{last_seq:020}")
}

/// The inverse of [`file_name`]: `None` for anything else (tmp files, junk,
/// a range that ends before it starts).
pub fn parse_file_name(name: &str) -> Option<(u64, u64)> {
    let (first, last) = name.split_once('-')?;
    let parse = |s: &str| {
        if s.len() == 20 && s.bytes().all(|c| c.is_ascii_digit()) {
            s.parse::<u64>().ok()
        } else {
            None
        }
    };
    let (first, last) = (parse(first)?, parse(last)?);
    (first <= last).then_some((first, last))
}

fn zstd_bound(payload_len: u64) -> u64 {
    // payload_len ≤ MAX_PAYLOAD, far below usize::MAX on any platform tern
    // runs on.
    zstd::zstd_safe::compress_bound(payload_len as usize) as u64
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

mod build;

pub use build::{Encoder, SegmentBuilder};

#[cfg(test)]
mod tests;
