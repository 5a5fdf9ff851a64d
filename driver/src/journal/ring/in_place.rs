//! Records a producer holds while it works: an [`InPlaceRecord`] receives
//! a WRITE's payload straight into the ring and stays *busy* while the
//! image is written from it; a [`BusyRecord`] is published but held until
//! its image change is done (invariant 2: the consumer's tail never passes
//! a record whose change has not reached the image).

use std::sync::atomic::Ordering;

use super::*;

/// A record whose data its producer writes straight into the ring: a
/// front-end receives a WRITE's payload from the socket into it, saving a
/// copy, then writes the source image from it.
///
/// Its commit word tells its state:
/// - *receiving* (`pos ^ RECEIVING_KEY`): the header is written, without
///   its checksum; the data is arriving. Recovery pads exactly this record
///   (the write reached neither image nor client).
/// - *busy* (`pos ^ BUSY_KEY`): published (the consumer reads it, recovery
///   re-applies it), but the producer is still writing the image from its
///   data, so the tail does not pass it and its space is not reused.
/// - *published* (`pos ^ COMMIT_KEY`), like any record.
///
/// Dropped while receiving (the client hung up or was too slow), it
/// becomes a pad standing for its sequence number; dropped busy, it is
/// released.
#[derive(Debug)]
pub struct InPlaceRecord<'a> {
    pub(super) journal: &'a Journal,
    pub(super) pos: u64,
    pub(super) slot: usize,
    pub(super) header: RecordHeader,
    pub(super) state: InPlaceState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum InPlaceState {
    Receiving,
    Busy,
    Released,
}

impl InPlaceRecord<'_> {
    pub fn seq(&self) -> u64 {
        self.header.seq
    }

    /// Where the record starts in the ring.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The record's data in the ring, to be filled before publishing.
    pub fn data_mut(&mut self) -> &mut [u8] {
        assert_eq!(self.state, InPlaceState::Receiving, "a published record's data is fixed");
        // SAFETY: the slot was reserved by this record through the head CAS
        // and lies inside the data area with room for the data (a record
        // never straddles the wrap); no other producer writes it, the
        // consumer does not read it before it is published, and the only
        // other reader (a FLUSH's copy to the durable file, made by the
        // kernel) trusts nothing unpublished. `&mut self` makes this the
        // only reference; the mapping outlives `'_` through `journal`.
        unsafe {
            std::slice::from_raw_parts_mut(self.journal.data_ptr(self.slot).cast_mut(), self.header.data_len as usize)
        }
    }

    /// The record's data in the ring.
    pub fn data(&self) -> &[u8] {
        // SAFETY: as in `data_mut`; once published, the data is only read
        // (by the consumer, and by this producer), and the tail does not
        // pass the record, so no producer reuses the space, until it is
        // released.
        unsafe { std::slice::from_raw_parts(self.journal.data_ptr(self.slot), self.header.data_len as usize) }
    }

    /// Writes the header's checksum and publishes the record, busy: from
    /// now on it is in the history, and its data stays put until
    /// [`InPlaceRecord::release`].
    pub fn publish(&mut self) -> u64 {
        if self.state == InPlaceState::Receiving {
            let head = self.header.encode_with_checksum(self.data());
            self.journal.copy_into_slot(self.slot, &head, &[]);
            self.journal.commit_word_at(self.slot).store(busy_word(self.pos), Ordering::Release);
            self.state = InPlaceState::Busy;
        }
        self.header.seq
    }

    /// Publishes (if not yet) and lets the tail pass the record.
    pub fn release(mut self) {
        self.publish();
        self.set_released();
    }

    fn set_released(&mut self) {
        self.journal.release_if_busy(self.pos);
        self.state = InPlaceState::Released;
    }
}

impl Drop for InPlaceRecord<'_> {
    fn drop(&mut self) {
        match self.state {
            InPlaceState::Released => {}
            InPlaceState::Busy => self.set_released(),
            InPlaceState::Receiving => {
                let span = footprint(self.header.data_len as usize);
                self.journal.write_record(self.pos, &RecordHeader::pad(self.header.seq, 1, span), &[]);
            }
        }
    }
}

/// A test's way into [`Journal::head_and_tail`]: something to run, once,
/// between its two loads (another thread moving tail and head there).
/// A published record whose change is not in the source image yet; see
/// [`Journal::append_busy`]. Dropping it releases the record: the tail may
/// pass it from then on.
#[derive(Debug)]
#[must_use = "the record is released when this is dropped: hold it until the image has the change"]
pub struct BusyRecord<'a> {
    pub(super) journal: &'a Journal,
    pub(super) pos: u64,
    pub(super) seq: u64,
}

impl BusyRecord<'_> {
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

impl Drop for BusyRecord<'_> {
    fn drop(&mut self) {
        // Only from busy: were the slot ever someone else's by now (it
        // cannot be, the tail never passes a busy record), a plain store
        // would write into that record's bytes.
        self.journal.release_if_busy(self.pos);
    }
}
