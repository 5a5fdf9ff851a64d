//! Writing segments: a [`SegmentBuilder`] collects a run of journal
//! records on the shipper's reader thread, and an [`Encoder`] on a
//! compression worker seals it into the file format described in the
//! parent module (index, one zstd frame, checksums).

use super::*;

/// Collects records for one segment (uncompressed). Cheap; the reader
/// thread fills it, and an [`Encoder`] on a worker thread seals it.
#[derive(Debug, Clone)]
pub struct SegmentBuilder {
    pub(super) vm_id: [u8; 16],
    pub(super) epoch: u64,
    pub(super) first_seq: u64,
    pub(super) next_seq: u64,
    pub(super) window: u32,
    pub(super) record_count: u32,
    /// The index, entries complete with their checksums.
    pub(super) index: Vec<u8>,
    pub(super) data: Vec<u8>,
}

impl SegmentBuilder {
    pub fn new(vm_id: [u8; 16], epoch: u64, first_seq: u64) -> Self {
        SegmentBuilder {
            vm_id,
            epoch,
            first_seq,
            next_seq: first_seq,
            window: 0,
            record_count: 0,
            index: Vec::new(),
            data: Vec::new(),
        }
    }

    /// Appends a record. Refuses (and leaves the builder as it was) a
    /// record whose `seq` is not [`next_seq`](Self::next_seq), one that
    /// [`RecordHeader::decode_body`] would refuse, `data` that is not
    /// `data_len` bytes, a pad that counts no sequence numbers (the
    /// journal's wrap filler: skip it), and a record that does not fit (see
    /// [`has_room`](Self::has_room)).
    ///
    /// The record's checksum is computed here, over `data` as it left the
    /// ring, and checked again by the applier after decompression.
    pub fn push(&mut self, h: &RecordHeader, data: &[u8]) -> Result<(), String> {
        if h.seq != self.next_seq {
            return Err(format!("record seq {}, expected {}", h.seq, self.next_seq));
        }
        if data.len() != h.data_len as usize {
            return Err(format!("record seq {}: {} data bytes given, data_len is {}", h.seq, data.len(), h.data_len));
        }
        RecordHeader::decode_body(&h.encode_body()).map_err(|e| format!("record seq {}: {e}", h.seq))?;
        let next = next_seq_after(h).map_err(|e| format!("record seq {}: {e}", h.seq))?;
        if !self.has_room(h.data_len) {
            return Err(format!(
                "segment is full ({} records, {} data bytes; at most {MAX_RECORDS} and {MAX_PAYLOAD})",
                self.record_count,
                self.payload_len()
            ));
        }
        self.index.extend_from_slice(&h.encode_with_checksum(data));
        self.data.extend_from_slice(data);
        self.record_count += 1;
        self.next_seq = next;
        Ok(())
    }

    /// Whether one more record carrying `data_len` bytes fits the limits.
    pub fn has_room(&self, data_len: u32) -> bool {
        self.record_count < MAX_RECORDS && self.payload_len() + u64::from(data_len) <= MAX_PAYLOAD
    }

    /// The `seq` the next record must have.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn record_count(&self) -> u32 {
        self.record_count
    }

    pub fn payload_len(&self) -> u64 {
        self.data.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.record_count == 0
    }

    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Sets the window flags ([`WINDOW_AT_START`], [`WINDOW_AT_END`]);
    /// [`Encoder::encode`] refuses unknown bits.
    pub fn set_window(&mut self, flags: u32) {
        debug_assert_eq!(flags & !WINDOW_KNOWN, 0, "unknown window flags {flags:#x}");
        self.window = flags;
    }
}

/// Seals builders into segment files. One per compression worker thread:
/// it holds a reused zstd context.
pub struct Encoder {
    compression: Compression,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl Encoder {
    /// Fails with `InvalidInput` for a zstd level outside [`ZSTD_LEVELS`].
    pub fn new(compression: Compression) -> io::Result<Self> {
        let zstd = match compression {
            Compression::None => None,
            Compression::Zstd { level } => {
                if !ZSTD_LEVELS.contains(&level) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("zstd level {level} out of range {}..={}", ZSTD_LEVELS.start(), ZSTD_LEVELS.end()),
                    ));
                }
                let mut c = zstd::bulk::Compressor::new(level)?;
                // The reader checks the frame's content size before it
                // decompresses anything.
                c.include_contentsize(true)?;
                c.include_checksum(false)?;
                Some(c)
            }
        };
        Ok(Encoder { compression, zstd })
    }

    /// Changes the zstd level of the segments encoded next (an encoder
    /// made without compression stays so). Fails with `InvalidInput` for a
    /// level outside [`ZSTD_LEVELS`].
    pub fn set_level(&mut self, level: i32) -> io::Result<()> {
        let Some(c) = &mut self.zstd else { return Ok(()) };
        if !ZSTD_LEVELS.contains(&level) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("zstd level {level} out of range {}..={}", ZSTD_LEVELS.start(), ZSTD_LEVELS.end()),
            ));
        }
        if self.compression != (Compression::Zstd { level }) {
            c.set_compression_level(level)?;
            self.compression = Compression::Zstd { level };
        }
        Ok(())
    }

    /// The complete file bytes of the segment, and its header. A payload
    /// zstd cannot make smaller (random or already compressed data) is
    /// stored as is, so the target spends nothing decompressing it. Fails
    /// with `InvalidInput` for an empty builder or unknown window flags.
    pub fn encode(&mut self, b: &SegmentBuilder) -> io::Result<(SegmentHeader, Vec<u8>)> {
        if b.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "cannot encode a segment without records"));
        }
        if b.window & !WINDOW_KNOWN != 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("unknown window flags {:#x}", b.window)));
        }
        let payload_at = HEADER_SIZE + b.index.len();
        let stored_max = match self.zstd {
            Some(_) => zstd::zstd_safe::compress_bound(b.data.len()),
            None => b.data.len(),
        };
        let mut out = Vec::with_capacity(payload_at + stored_max + TRAILER_SIZE);
        out.resize(HEADER_SIZE, 0);
        out.extend_from_slice(&b.index);
        let mut compression = self.compression;
        match &mut self.zstd {
            None => out.extend_from_slice(&b.data),
            Some(c) => {
                out.resize(payload_at + stored_max, 0);
                let n = c.compress_to_buffer(&b.data, &mut out[payload_at..])?;
                out.truncate(payload_at + n);
                if n >= b.data.len() {
                    out.truncate(payload_at);
                    out.extend_from_slice(&b.data);
                    compression = Compression::None;
                }
            }
        }
        let header = SegmentHeader {
            vm_id: b.vm_id,
            epoch: b.epoch,
            first_seq: b.first_seq,
            last_seq: b.next_seq - 1,
            record_count: b.record_count,
            window: b.window,
            compression,
            payload_len: b.data.len() as u64,
            stored_len: (out.len() - payload_at) as u64,
            created_ns: now_ns(),
        };
        out[..HEADER_SIZE].copy_from_slice(&header.encode());
        let crc = tern_driver::checksum::crc32c(&out);
        out.extend_from_slice(&TRAILER_MAGIC);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        Ok((header, out))
    }
}
