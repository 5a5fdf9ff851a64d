//! The journal's on-disk format, version 1 (also in `docs/FORMATS.md`).
//!
//! All integers are little-endian (the ring is shared memory between two
//! processes on one host, never sent over a network).
//!
//! ```text
//! file   = header (4096 bytes) | data area (capacity bytes, a multiple of 4096)
//!
//! header = { [u8;8] magic "TERNJRNL" | u32 version | u32 header_size
//!          | [u8;16] vm_id | u64 capacity | u32 record_align | u32 crc32c(0..44) }   immutable, bytes 0..48
//!          @64:  { u64 head_pos | u64 head_seq }        producers: one 16-byte atomic;
//!                                                      head_seq's top bit set = overflow mode
//!          @128: { u64 tail_pos | u64 tail_seq }        the consumer: one 16-byte atomic
//!          @192: { u32 window | u32 flags | [u8;16] boot_id | u64 overflow_seq | u64 recoveries }
//!          @256: { u64 barrier_pid | u64 barrier_deadline_ns }   the group barrier
//!
//! record = { u64 commit | u64 seq | u64 offset | u64 time_ns | u32 length
//!          | u32 data_len | u16 disk | u8 kind | u8 flags | u32 crc32c | data[data_len] }
//!          padded with garbage to a multiple of 64 bytes
//! ```
//!
//! - Positions (`head_pos`, `tail_pos`, a record's position) count bytes
//!   since the ring was created and never wrap; a position's place in the
//!   data area is `pos % capacity`.
//! - `commit` is written last, with release ordering, and equals
//!   `pos ^ COMMIT_KEY`: a record is published exactly when its commit word
//!   names its own position, so stale bytes from an earlier lap never look
//!   published, and a scan can find the next record after a torn hole.
//!   A write received in place (see `ring::InPlaceRecord`) has two more:
//!   `pos ^ RECEIVING_KEY` while its data arrives (not published; the
//!   header is written, its checksum not yet), and `pos ^ BUSY_KEY` once
//!   published while its producer still reads it (the tail waits).
//! - `crc32c` covers bytes 8..44 of the record header and the data.
//! - `seq` is dense over the records of a VM (all its disks share it). A
//!   `Pad` record fills space: at the end of the ring when a record would
//!   straddle the wrap (it takes no sequence number of its own), or over the
//!   hole a crashed producer left, when it stands for the `offset` sequence
//!   numbers that producer reserved and never published.

use crate::journal::RecordKind;

pub const MAGIC: [u8; 8] = *b"TERNJRNL";
pub const VERSION: u32 = 1;
pub const HEADER_SIZE: usize = 4096;
/// Records start on cache-line boundaries: producers on different cores
/// never share a line, and the tail of the ring always has room for a pad.
pub const RECORD_ALIGN: u64 = 64;
pub const RECORD_HEADER_SIZE: usize = 48;
pub const COMMIT_KEY: u64 = 0x5445_524e_434d_4954; // "TERNCMIT"
/// `commit = pos ^ BUSY_KEY`: published, but its producer is still reading
/// the record's data (writing the source image from it); the tail must not
/// pass it, so its space is not reused meanwhile.
pub const BUSY_KEY: u64 = 0x5445_524e_4255_5359; // "TERNBUSY"
/// `commit = pos ^ RECEIVING_KEY`: not published; the header (without its
/// checksum) is written and the data is being received into the record.
pub const RECEIVING_KEY: u64 = 0x5445_524e_5243_5647; // "TERNRCVG"
/// The largest ring: 1 TiB (also keeps every position computation far from
/// overflow).
pub const MAX_CAPACITY: u64 = 1 << 40;
/// The largest data a record carries (a write of the NBD maximum, 32 MiB)
/// and the largest range a record covers.
pub const MAX_RECORD_DATA: u32 = 32 << 20;

// Header field offsets.
pub const OFF_MAGIC: usize = 0;
pub const OFF_VERSION: usize = 8;
pub const OFF_HEADER_SIZE: usize = 12;
pub const OFF_VM_ID: usize = 16;
pub const OFF_CAPACITY: usize = 32;
pub const OFF_RECORD_ALIGN: usize = 40;
pub const OFF_HEADER_CRC: usize = 44;
pub const IMMUTABLE_LEN: usize = 44;
pub const OFF_HEAD: usize = 64;
pub const OFF_TAIL: usize = 128;
pub const OFF_WINDOW: usize = 192;
pub const OFF_FLAGS: usize = 196;
pub const OFF_BOOT_ID: usize = 200;
pub const OFF_OVERFLOW_SEQ: usize = 216;
pub const OFF_RECOVERIES: usize = 224;
/// The group barrier (see `ring/barrier.rs`): the pid holding it (0: open)
/// and the CLOCK_MONOTONIC time (ns) after which producers open it
/// themselves. Zero in journals from before groups, which is "open".
pub const OFF_BARRIER: usize = 256;
pub const OFF_BARRIER_DEADLINE: usize = 264;

/// Record `flags` of a zero-length `Resync` record that opens a resync
/// window: from here the replica is not consistent until the matching
/// close (the dirty regions it lacks are being re-sent).
pub const RESYNC_OPEN: u8 = 1;
/// Record `flags` of a zero-length `Resync` record that closes a resync
/// window: every region dirty at its open has been re-sent before it.
pub const RESYNC_CLOSE: u8 = 2;

/// `flags`: a front-end has the journal open (cleared on clean shutdown).
pub const FLAG_ATTACHED: u32 = 1;
/// `flags`: the host went down with a front-end attached: journal and image
/// may disagree on disk, so a checksum resync must compare source and
/// replica (invariant 4). Cleared by the shipper once that resync is done.
pub const FLAG_CHECKSUM_RESYNC: u32 = 2;
/// `flags`: the attached front-end honours the group barrier (set and
/// cleared with `FLAG_ATTACHED`; a front-end from before groups does not
/// set it, and a group point refuses such a member).
pub const FLAG_BARRIER_AWARE: u32 = 4;

/// Record `flags` of a `Tag` record whose data is a group point (JSON, see
/// docs/FORMATS.md), not a bare label.
pub const TAG_GROUP: u8 = 1;
/// Record `flags` of a `Tag` record whose data describes a point taken
/// with the guest frozen, or not (JSON: label and the freeze's outcome, see
/// docs/FORMATS.md), not a bare label.
pub const TAG_QUIESCE: u8 = 2;

/// The immutable part of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderFields {
    pub vm_id: [u8; 16],
    pub capacity: u64,
}

impl HeaderFields {
    /// Encodes the immutable part of a fresh header (the rest is zero).
    pub fn encode(&self) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC);
        b[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&VERSION.to_le_bytes());
        b[OFF_HEADER_SIZE..OFF_HEADER_SIZE + 4].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
        b[OFF_VM_ID..OFF_VM_ID + 16].copy_from_slice(&self.vm_id);
        b[OFF_CAPACITY..OFF_CAPACITY + 8].copy_from_slice(&self.capacity.to_le_bytes());
        b[OFF_RECORD_ALIGN..OFF_RECORD_ALIGN + 4].copy_from_slice(&(RECORD_ALIGN as u32).to_le_bytes());
        let crc = crate::checksum::crc32c(&b[..IMMUTABLE_LEN]);
        b[OFF_HEADER_CRC..OFF_HEADER_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates the immutable part; `file_len` is the journal
    /// file's length, which must match the capacity.
    pub fn decode(b: &[u8], file_len: u64) -> Result<Self, String> {
        if b.len() < 48 {
            return Err(format!("file is {} bytes, shorter than a journal header", b.len()));
        }
        if b[..8] != MAGIC {
            return Err("bad magic (not a tern journal)".into());
        }
        let version = u32_at(b, OFF_VERSION);
        if version != VERSION {
            return Err(format!("unsupported journal version {version} (this tern reads version {VERSION})"));
        }
        let crc = u32_at(b, OFF_HEADER_CRC);
        if crc != crate::checksum::crc32c(&b[..IMMUTABLE_LEN]) {
            return Err("header checksum mismatch".into());
        }
        if u32_at(b, OFF_HEADER_SIZE) as usize != HEADER_SIZE || u32_at(b, OFF_RECORD_ALIGN) as u64 != RECORD_ALIGN {
            return Err("unexpected header size or record alignment".into());
        }
        let capacity = u64_at(b, OFF_CAPACITY);
        if capacity == 0 || !capacity.is_multiple_of(4096) || capacity > MAX_CAPACITY {
            return Err(format!("capacity {capacity} is not a positive multiple of 4096"));
        }
        if file_len != HEADER_SIZE as u64 + capacity {
            return Err(format!(
                "file is {file_len} bytes but the header says {} (header + capacity {capacity}); was it truncated?",
                HEADER_SIZE as u64 + capacity
            ));
        }
        let mut vm_id = [0u8; 16];
        vm_id.copy_from_slice(&b[OFF_VM_ID..OFF_VM_ID + 16]);
        Ok(HeaderFields { vm_id, capacity })
    }
}

/// A record header, without the commit word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub seq: u64,
    pub offset: u64,
    pub time_ns: u64,
    pub length: u32,
    pub data_len: u32,
    pub disk: u16,
    pub kind: RecordKind,
    pub flags: u8,
}

impl RecordHeader {
    /// Bytes 8..44 of the on-ring header (what the checksum covers, with the
    /// data).
    pub fn encode_body(&self) -> [u8; 36] {
        let mut b = [0u8; 36];
        b[0..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.time_ns.to_le_bytes());
        b[24..28].copy_from_slice(&self.length.to_le_bytes());
        b[28..32].copy_from_slice(&self.data_len.to_le_bytes());
        b[32..34].copy_from_slice(&self.disk.to_le_bytes());
        b[34] = self.kind as u8;
        b[35] = self.flags;
        b
    }

    /// Decodes bytes 8..44 and checks what can be checked without the data.
    pub fn decode_body(b: &[u8; 36]) -> Result<Self, String> {
        let kind = RecordKind::from_u8(b[34]).ok_or_else(|| format!("unknown record kind {}", b[34]))?;
        let h = RecordHeader {
            seq: u64_at(b, 0),
            offset: u64_at(b, 8),
            time_ns: u64_at(b, 16),
            length: u32_at(b, 24),
            data_len: u32_at(b, 28),
            disk: u16::from_le_bytes([b[32], b[33]]),
            kind,
            flags: b[35],
        };
        let expected_data = match kind {
            RecordKind::Write | RecordKind::Resync => Some(h.length),
            RecordKind::Zero | RecordKind::Trim | RecordKind::Pad => Some(0),
            RecordKind::Tag => None,
        };
        if let Some(n) = expected_data {
            if h.data_len != n {
                return Err(format!("{kind:?} record carries {} data bytes, expected {n}", h.data_len));
            }
        }
        if h.data_len > MAX_RECORD_DATA {
            return Err(format!("record data of {} bytes exceeds the maximum {MAX_RECORD_DATA}", h.data_len));
        }
        match (kind, h.flags) {
            (_, 0) => {}
            (RecordKind::Resync, RESYNC_OPEN | RESYNC_CLOSE) if h.length == 0 => {}
            (RecordKind::Tag, TAG_GROUP | TAG_QUIESCE) => {}
            (_, f) => return Err(format!("{} record with unknown flags {f:#x}", kind.name())),
        }
        Ok(h)
    }

    /// A pad record spanning `span` bytes that stands for `lost` sequence
    /// numbers starting at `seq` (0 for a pad at the wrap).
    pub fn pad(seq: u64, lost: u64, span: u64) -> Self {
        RecordHeader {
            seq,
            offset: lost,
            time_ns: 0,
            length: span as u32,
            data_len: 0,
            disk: 0,
            kind: RecordKind::Pad,
            flags: 0,
        }
    }

    /// Bytes 8..48 of the on-ring header: the body and the checksum of
    /// body and `data`.
    pub fn encode_with_checksum(&self, data: &[u8]) -> [u8; RECORD_HEADER_SIZE - 8] {
        let mut b = [0u8; RECORD_HEADER_SIZE - 8];
        b[..36].copy_from_slice(&self.encode_body());
        b[36..].copy_from_slice(&self.checksum(data).to_le_bytes());
        b
    }

    /// Total bytes this record takes in the ring, alignment included.
    pub fn footprint(&self) -> u64 {
        if self.kind == RecordKind::Pad {
            return self.length as u64;
        }
        footprint(self.data_len as usize)
    }

    pub fn checksum(&self, data: &[u8]) -> u32 {
        crate::checksum::crc32c_of(&[&self.encode_body(), data])
    }
}

/// Ring bytes a record with `data_len` bytes of data occupies.
pub fn footprint(data_len: usize) -> u64 {
    (RECORD_HEADER_SIZE as u64 + data_len as u64).next_multiple_of(RECORD_ALIGN)
}

pub fn commit_word(pos: u64) -> u64 {
    pos ^ COMMIT_KEY
}

/// The commit word of a published record whose producer still reads it.
pub fn busy_word(pos: u64) -> u64 {
    pos ^ BUSY_KEY
}

/// The commit word of a record whose data is being received in place.
pub fn receiving_word(pos: u64) -> u64 {
    pos ^ RECEIVING_KEY
}

pub(crate) fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

pub(crate) fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind_strategy() -> impl Strategy<Value = RecordKind> {
        prop_oneof![
            Just(RecordKind::Write),
            Just(RecordKind::Zero),
            Just(RecordKind::Trim),
            Just(RecordKind::Tag),
            Just(RecordKind::Resync),
        ]
    }

    proptest! {
        #[test]
        fn record_header_round_trips(seq: u64, offset: u64, time_ns: u64, len in 0u32..1 << 20, disk: u16, kind in kind_strategy()) {
            let data_len = match kind { RecordKind::Write | RecordKind::Resync | RecordKind::Tag => len, _ => 0 };
            let h = RecordHeader { seq, offset, time_ns, length: len, data_len, disk, kind, flags: 0 };
            let decoded = RecordHeader::decode_body(&h.encode_body()).unwrap();
            prop_assert_eq!(decoded, h);
        }
    }

    #[test]
    fn header_round_trips_and_rejects_each_corruption() {
        let f = HeaderFields { vm_id: [7; 16], capacity: 1 << 20 };
        let b = f.encode();
        let len = HEADER_SIZE as u64 + (1 << 20);
        assert_eq!(HeaderFields::decode(&b, len).unwrap(), f);
        for i in 0..48 {
            let mut bad = b;
            bad[i] ^= 0x10;
            assert!(HeaderFields::decode(&bad, len).is_err(), "flip at byte {i} went unnoticed");
        }
        assert!(HeaderFields::decode(&b, len - 4096).unwrap_err().contains("truncated"));
    }

    #[test]
    fn zero_record_with_data_is_rejected() {
        let h = RecordHeader {
            seq: 1,
            offset: 0,
            time_ns: 0,
            length: 4096,
            data_len: 4096,
            disk: 0,
            kind: RecordKind::Zero,
            flags: 0,
        };
        assert!(RecordHeader::decode_body(&h.encode_body()).is_err());
    }

    #[test]
    fn footprint_is_aligned() {
        assert_eq!(footprint(0), 64);
        assert_eq!(footprint(16), 64);
        assert_eq!(footprint(17), 128);
        assert_eq!(footprint(4096), 4160);
    }
}
