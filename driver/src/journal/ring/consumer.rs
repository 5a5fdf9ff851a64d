//! The consumer's side of the ring: reading a published record (its data
//! copied out, then checked against its checksum, so nothing can change it
//! after the check) and walking records in order with a [`Cursor`], which
//! refuses gaps. Errors are [`RecordError`]s: where in the ring and what.

use std::sync::atomic::Ordering;

use super::*;

/// What a consumer finds at a position.
#[derive(Debug)]
pub enum ReadOutcome {
    /// A published record; its data was copied into the caller's buffer and
    /// checked against its checksum.
    Record(RecordHeader),
    /// Nothing published there (yet).
    NotPublished,
}

/// A published record that fails validation, or a cursor that finds the
/// history broken: where in the ring, and what is wrong. The consumer adds
/// which journal file it read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("position {pos} is not aligned")]
    Unaligned { pos: u64 },
    #[error("record at position {pos}: {reason}")]
    BadHeader { pos: u64, reason: String },
    #[error("record at position {pos} spans {span} bytes, past the end of the ring")]
    PastEnd { pos: u64, span: u64 },
    #[error("record at position {pos} (seq {seq}) fails its checksum")]
    Checksum { pos: u64, seq: u64 },
    #[error("record at position {pos} has an impossible seq")]
    ImpossibleSeq { pos: u64 },
    #[error("record at position {pos} has seq {seq}, expected {expected} (a gap in the journal)")]
    Gap { pos: u64, seq: u64, expected: u64 },
}

impl Journal {
    /// Reads the record at `pos`, copying its data into `data` (resized to
    /// fit). The copy is verified, so a producer (or another process)
    /// scribbling on the ring afterwards cannot change what was checked.
    /// `Err` describes a published record that fails validation.
    pub fn read(&self, pos: u64, data: &mut Vec<u8>) -> std::result::Result<ReadOutcome, RecordError> {
        let Some((h, crc, slot)) = self.locate(pos)? else { return Ok(ReadOutcome::NotPublished) };
        if !self.copy_checked(&h, crc, slot, data) {
            return Err(RecordError::Checksum { pos, seq: h.seq });
        }
        Ok(ReadOutcome::Record(h))
    }

    /// Finds the published record at `pos`: its header, stored checksum and
    /// slot, all bounds checked. `None` when nothing is published there.
    pub(super) fn locate(&self, pos: u64) -> std::result::Result<Option<(RecordHeader, u32, usize)>, RecordError> {
        if !pos.is_multiple_of(RECORD_ALIGN) {
            return Err(RecordError::Unaligned { pos });
        }
        let slot = self.slot(pos);
        let commit = self.commit_word_at(slot).load(Ordering::Acquire);
        if commit != commit_word(pos) && commit != busy_word(pos) {
            return Ok(None);
        }
        self.header_at(pos).map(Some)
    }

    /// Where a position lies in the data area.
    pub(super) fn slot(&self, pos: u64) -> usize {
        (pos % self.fields.capacity) as usize
    }

    /// Whether the record at `pos` is published and its producer still
    /// reads it (see [`InPlaceRecord`]).
    pub(super) fn is_busy(&self, pos: u64) -> bool {
        self.commit_word_at(self.slot(pos)).load(Ordering::Acquire) == busy_word(pos)
    }

    /// Releases the record at `pos` if it is busy: a front-end attaching
    /// or recovering, when no producer can still be reading it.
    pub(super) fn release_if_busy(&self, pos: u64) {
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
    pub(super) fn header_at(&self, pos: u64) -> std::result::Result<(RecordHeader, u32, usize), RecordError> {
        let cap = self.fields.capacity;
        let slot = self.slot(pos);
        let mut raw = [0u8; RECORD_HEADER_SIZE];
        // SAFETY: the slot and its 48-byte header lie inside the data area
        // (slot is aligned, capacity a multiple of 64); the mapping lives as
        // long as `self`. The bytes are copied out before being trusted.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_mut_ptr().add(HEADER_SIZE + slot), raw.as_mut_ptr(), raw.len());
        }
        let body: &[u8; 36] = raw[8..44].try_into().expect("a 36-byte slice");
        let h = RecordHeader::decode_body(body).map_err(|reason| RecordError::BadHeader { pos, reason })?;
        let span = h.footprint();
        if span == 0 || !span.is_multiple_of(RECORD_ALIGN) || slot as u64 + span > cap {
            return Err(RecordError::PastEnd { pos, span });
        }
        Ok((h, u32_at(&raw, 44), slot))
    }

    /// Copies a located record's data into `data`; whether it matches the
    /// record's checksum.
    pub(super) fn copy_checked(&self, h: &RecordHeader, crc: u32, slot: usize, data: &mut Vec<u8>) -> bool {
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

    pub(super) fn data_ptr(&self, slot: usize) -> *const u8 {
        // SAFETY: callers pass a slot inside the data area; the record data
        // follows its 48-byte header within the record's span.
        unsafe { self.map.as_mut_ptr().add(HEADER_SIZE + slot + RECORD_HEADER_SIZE) }
    }

    /// Reads published records in order from `start` (normally the tail),
    /// skipping pads and checking that sequence numbers are dense.
    pub fn cursor(&self, start: Position) -> Cursor<'_> {
        Cursor { journal: self, at: start }
    }

    pub(super) fn bad(&self, reason: impl ToString) -> Error {
        Error::Format { path: self.path.clone(), what: "journal", reason: reason.to_string() }
    }
}

/// Where the record after `h` (at `pos`) starts, and its sequence number.
pub(super) fn after(pos: u64, h: &RecordHeader) -> std::result::Result<Position, RecordError> {
    let count = if h.kind == RecordKind::Pad { h.offset } else { 1 };
    let seq = h.seq.checked_add(count).ok_or(RecordError::ImpossibleSeq { pos })?;
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
    pub fn next(&mut self, data: &mut Vec<u8>) -> std::result::Result<Option<RecordHeader>, RecordError> {
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
                return Err(RecordError::Gap { pos: self.at.pos, seq: h.seq, expected: self.at.seq });
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
