//! The journal ring: a memory-mapped file that every write of a VM is
//! published in before it reaches the source image. The ring lives in
//! memory (tmpfs) and is made durable in the journal file of the VM's state
//! directory at each FLUSH; see [`live`].
//!
//! Many producers (the front-end's request threads, and `tern tag` from
//! another process) reserve space with one 16-byte compare-and-swap on the
//! head (position and sequence number together, so ring order and sequence
//! order are the same thing), copy their record in, and publish it by storing
//! its commit word last. One consumer (the shipper, in another process) reads
//! published records in order and moves the tail once they are safe
//! elsewhere. No lock is taken on either side.

pub mod format;
pub mod live;
mod ring;
#[cfg(test)]
mod tests;

pub use format::RecordHeader;
pub use format::{
    FLAG_ATTACHED, FLAG_BARRIER_AWARE, FLAG_CHECKSUM_RESYNC, MAX_RECORD_DATA, RESYNC_CLOSE, RESYNC_OPEN, TAG_GROUP,
    TAG_QUIESCE,
};
pub use ring::{
    BusyRecord, Cursor, InPlaceRecord, Journal, Mode, NewRecord, Position, ReadOutcome, RecordError, RecoveryReport,
    ReservedTag, SEQ_JUMP_AFTER_DISCARD,
};

/// What a record says happened to the source disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// `length` bytes of data written at `offset`.
    Write = 1,
    /// `[offset, offset + length)` now reads as zeroes.
    Zero = 2,
    /// `[offset, offset + length)` was discarded; the source reads zeroes
    /// there, so the replica punches the same range.
    Trim = 3,
    /// An application-consistent marker; the data is its label.
    Tag = 4,
    /// The current content of a dirty region, re-read under the range lock.
    Resync = 5,
    /// Filler: the end of the ring before a wrap, or a crashed producer's
    /// hole (see `format`).
    Pad = 6,
}

impl RecordKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Write,
            2 => Self::Zero,
            3 => Self::Trim,
            4 => Self::Tag,
            5 => Self::Resync,
            6 => Self::Pad,
            _ => return None,
        })
    }

    /// The kind's name in tools' output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Zero => "zero",
            Self::Trim => "trim",
            Self::Tag => "tag",
            Self::Resync => "resync",
            Self::Pad => "pad",
        }
    }

    /// Whether replaying this record changes a disk.
    pub fn changes_disk(self) -> bool {
        matches!(self, Self::Write | Self::Zero | Self::Trim | Self::Resync)
    }
}
