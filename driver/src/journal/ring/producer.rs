//! The producers' side of the ring: reserving a place with one 16-byte
//! compare-and-swap on the head, filling it, and publishing it with its
//! commit word (release), which is what makes a record visible to the
//! consumer. Invariant 2 of docs/DESIGN.md (write-ahead: a write is in the
//! journal before it reaches the image or is acknowledged) rests on
//! `append` returning only once the record is published.

use std::sync::atomic::{AtomicU64, Ordering};

use super::*;

impl Journal {
    /// Publishes an application-consistent marker (any process may: `tern
    /// tag` does, beside the front-end, or with none running). Returns its
    /// sequence number, or `None` if the ring takes no record now (full, or
    /// in overflow: no consistent point exists there).
    ///
    /// The tag's sequence number is durable before the tag can be read: it
    /// is reserved and filled, the journal synced (the durable head passes
    /// it), and only then published, and synced again. A tag published in
    /// the ring alone could be shipped and then lost with the ring (a
    /// reboot while no front-end ran to sync it), and the next write would
    /// get its number, which the shipper skips as shipped. Killed between
    /// the two, the tag is a hole the next front-end pads.
    ///
    /// `note` hears where the tag is reserved before it is published, so a
    /// process that outlives a killed tagger can pad its hole (see
    /// [`Journal::pad_abandoned_tag`]).
    pub fn append_tag(&self, label: &str, note: impl FnOnce(Position)) -> Result<Option<u64>> {
        crate::tag::check_label(label)?;
        self.append_marker(0, label.as_bytes(), note)
    }

    /// [`Journal::append_tag`] for a point taken through a guest freeze:
    /// its description (JSON, docs/FORMATS.md: the label and whether the
    /// guest was frozen) is flagged `TAG_QUIESCE`.
    pub fn append_quiesced_tag(&self, description: &[u8], note: impl FnOnce(Position)) -> Result<Option<u64>> {
        if description.is_empty() || description.len() > 64 << 10 {
            return Err(Error::Invalid(format!("a tag description is 1 byte to 64 KiB, got {}", description.len())));
        }
        self.append_marker(TAG_QUIESCE, description, note)
    }

    /// [`Journal::append_tag`] for a group point, in two steps: this one
    /// reserves and fills the tag (its description, JSON, docs/FORMATS.md,
    /// flagged `TAG_GROUP`) and passes the group barrier its caller holds;
    /// [`ReservedTag::publish`] makes it durable and publishes it, after the
    /// caller opened the barriers. The tag's place in the stream is fixed
    /// here, and that is all the cut needs the barrier for: the syncs stay
    /// out of the time writes wait. Dropped unpublished, the tag is a hole
    /// ([`Journal::pad_abandoned_tag`]).
    pub fn reserve_group_tag(
        &self,
        description: &[u8],
        note: impl FnOnce(Position),
    ) -> Result<Option<ReservedTag<'_>>> {
        if description.is_empty() || description.len() > 64 << 10 {
            return Err(Error::Invalid(format!("a group tag is 1 byte to 64 KiB, got {}", description.len())));
        }
        self.reserve_marker(TAG_GROUP, description, note)
    }

    fn append_marker(&self, flags: u8, data: &[u8], note: impl FnOnce(Position)) -> Result<Option<u64>> {
        match self.reserve_marker(flags, data, note)? {
            Some(tag) => tag.publish().map(Some),
            None => Ok(None),
        }
    }

    fn reserve_marker(&self, flags: u8, data: &[u8], note: impl FnOnce(Position)) -> Result<Option<ReservedTag<'_>>> {
        let rec = NewRecord { disk: 0, kind: RecordKind::Tag, offset: 0, length: data.len() as u32, flags };
        let Some((at, pad)) = self.reserve_as(footprint(data.len()), false, true) else { return Ok(None) };
        if pad > 0 {
            self.write_record(at.pos, &RecordHeader::pad(at.seq, 0, pad), &[]);
        }
        let pos = at.pos + pad;
        let slot = self.slot(pos);
        self.copy_into_slot(slot, &rec.header(at.seq, data.len()).encode_with_checksum(data), data);
        note(Position { pos, seq: at.seq });
        Ok(Some(ReservedTag { journal: self, pos, seq: at.seq, footprint: footprint(data.len()) }))
    }

    /// Whether the record at `at` is an unpublished tag, wholly written,
    /// whose data has this length and crc32c: the group tag a dead
    /// cutter reserved there (`tag::GroupTagLock`'s intent).
    pub fn unpublished_tag_is(&self, at: Position, len: u32, crc: u32) -> bool {
        if at.pos < self.tail().pos || at.pos >= self.head().pos || !matches!(self.locate(at.pos), Ok(None)) {
            return false;
        }
        let Ok((h, stored, slot)) = self.header_at(at.pos) else { return false };
        if h.kind != RecordKind::Tag || h.flags != TAG_GROUP || h.seq != at.seq || h.data_len != len {
            return false;
        }
        let mut data = Vec::new();
        self.copy_checked(&h, stored, slot, &mut data) && crate::checksum::crc32c(&data) == crc
    }

    /// Pads the tag reserved at `at` if it is still unpublished: its
    /// producer died between reserving and publishing it (the caller knows
    /// it is dead), and the hole would stop the consumer for good. Whether
    /// it padded.
    pub fn pad_abandoned_tag(&self, at: Position) -> bool {
        if at.pos < self.tail().pos || at.pos >= self.head().pos || !matches!(self.locate(at.pos), Ok(None)) {
            return false;
        }
        match self.header_at(at.pos) {
            Ok((h, _, _)) if h.kind == RecordKind::Tag && h.seq == at.seq => {
                self.write_record(at.pos, &RecordHeader::pad(at.seq, 1, h.footprint()), &[]);
                log::warn!(
                    "journal {}: recovery mode skip-hole: the tag reserved at seq {} (position {}) was never published (its `tern tag` died); covering it with padding",
                    self.path.display(),
                    at.seq,
                    at.pos
                );
                true
            }
            _ => false,
        }
    }

    /// Publishes a record. Returns its sequence number, or `None` when the
    /// ring has no room for it (the caller marks the dirty bitmap instead).
    /// Never blocks: one compare-and-swap loop on the head, then copies.
    pub fn append(&self, rec: &NewRecord, data: &[u8]) -> Option<u64> {
        self.append_with(rec, data, false, commit_word).map(|(seq, _)| seq)
    }

    /// Publishes a record of a change its producer has yet to make to the
    /// source image: *busy* (see [`InPlaceRecord`]) until the returned
    /// [`BusyRecord`] is dropped, so the tail cannot pass it before the
    /// image has the change. Were it consumable at once, a shipper could
    /// ship it and move the tail past it, and a front-end that died before
    /// the image write would never re-apply it (recovery starts at the
    /// tail): the replica would hold a write the source lacks, forever.
    /// `None` when the ring has no room.
    pub fn append_busy(&self, rec: &NewRecord, data: &[u8]) -> Option<BusyRecord<'_>> {
        let (seq, pos) = self.append_with(rec, data, false, busy_word)?;
        Some(BusyRecord { journal: self, pos, seq })
    }

    /// Reserves, copies and publishes a record with `word(pos)` as its
    /// commit word; its sequence number and position.
    pub(super) fn append_with(
        &self,
        rec: &NewRecord,
        data: &[u8],
        leave_overflow: bool,
        word: fn(u64) -> u64,
    ) -> Option<(u64, u64)> {
        debug_assert!(data.len() <= MAX_RECORD_DATA as usize);
        let (at, pad) = self.reserve(footprint(data.len()), leave_overflow)?;
        // The reservation [at.pos, at.pos + pad + footprint) is ours alone
        // until we publish it and the consumer moves past it.
        if pad > 0 {
            // A wrap pad stands for no sequence number of its own.
            self.write_record(at.pos, &RecordHeader::pad(at.seq, 0, pad), &[]);
        }
        let h = rec.header(at.seq, data.len());
        self.write_record_as(at.pos + pad, &h, data, word);
        Some((at.seq, at.pos + pad))
    }

    /// Reserves a record whose data the caller writes straight into the
    /// ring (see [`InPlaceRecord`]): a WRITE of `rec.length` bytes. `None`
    /// when the ring has no room (or is in overflow).
    pub fn reserve_in_place(&self, rec: &NewRecord) -> Option<InPlaceRecord<'_>> {
        debug_assert!(rec.kind == RecordKind::Write && rec.length <= MAX_RECORD_DATA);
        let len = rec.length as usize;
        let (at, pad) = self.reserve(footprint(len), false)?;
        if pad > 0 {
            self.write_record(at.pos, &RecordHeader::pad(at.seq, 0, pad), &[]);
        }
        let pos = at.pos + pad;
        let slot = self.slot(pos);
        let header = rec.header(at.seq, len);
        // The header first (its checksum comes with the data), then the
        // mark that says so: recovery then knows this record's exact span
        // and never looks for records inside data a client is sending. The
        // mark also replaces whatever an earlier lap left in the commit word.
        let mut head = [0u8; RECORD_HEADER_SIZE - 8];
        head[..36].copy_from_slice(&header.encode_body());
        self.copy_into_slot(slot, &head, &[]);
        self.commit_word_at(slot).store(receiving_word(pos), Ordering::Release);
        Some(InPlaceRecord { journal: self, pos, slot, header, state: InPlaceState::Receiving })
    }

    /// Reserves `total` bytes (plus the pad to the wrap, if the record
    /// would straddle it) and a sequence number with one CAS on the head.
    /// Fails in overflow mode, unless this reservation is the one that
    /// leaves it. Waits while the group barrier is closed, unless this is
    /// a tag (`barrier.rs`).
    pub(super) fn reserve(&self, total: u64, leave_overflow: bool) -> Option<(Position, u64)> {
        self.reserve_as(total, leave_overflow, false)
    }

    pub(super) fn reserve_as(&self, total: u64, leave_overflow: bool, tag: bool) -> Option<(Position, u64)> {
        let cap = self.fields.capacity;
        if total > cap {
            return None;
        }
        let word = self.head_word();
        let mut cur = word.load(Ordering::Acquire);
        loop {
            if in_overflow(cur) && !leave_overflow {
                return None;
            }
            // After reading the head: see barrier.rs for why here.
            if !tag && self.barrier_holder().is_some() {
                self.pass_barrier();
                cur = word.load(Ordering::Acquire);
                continue;
            }
            let head = Position::unpack(cur);
            let slot = head.pos % cap;
            let pad = if slot + total > cap { cap - slot } else { 0 };
            let end = head.pos + pad + total;
            if end - self.tail().pos > cap {
                return None;
            }
            let next = Position { pos: end, seq: head.seq + 1 };
            match word.compare_exchange_weak(cur, next.pack(), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some((head, pad)),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Test hook: a producer that crashes between reserving and publishing.
    #[doc(hidden)]
    pub fn reserve_and_abandon(&self, data_len: usize) -> Option<Position> {
        self.reserve(footprint(data_len), false).map(|(at, _)| at)
    }

    /// Test hook: reserves and fills a record's slot but publishes it
    /// only when the returned function is called (a producer that is slow
    /// between the two).
    #[doc(hidden)]
    pub fn append_published_later(&self, rec: &NewRecord, data: &[u8]) -> impl FnOnce() + '_ {
        let (at, pad) = self.reserve(footprint(data.len()), false).expect("room in the ring");
        assert_eq!(pad, 0, "the test record must not wrap");
        let h = rec.header(at.seq, data.len());
        let slot = self.slot(at.pos);
        self.copy_into_slot(slot, &h.encode_with_checksum(data), data);
        move || self.commit_word_at(slot).store(commit_word(at.pos), Ordering::Release)
    }

    /// Test hook: the resync that leaves overflow mode crashes between
    /// reserving the window's opener and publishing it.
    #[doc(hidden)]
    pub fn leave_overflow_and_abandon(&self) -> Option<Position> {
        self.reserve(footprint(0), true).map(|(at, pad)| Position { pos: at.pos + pad, seq: at.seq })
    }

    /// Copies a record into its reserved slot and publishes it.
    pub(super) fn write_record(&self, pos: u64, h: &RecordHeader, data: &[u8]) {
        self.write_record_as(pos, h, data, commit_word)
    }

    /// [`Journal::write_record`] with `word(pos)` as the commit word (busy,
    /// for [`Journal::append_busy`]).
    pub(super) fn write_record_as(&self, pos: u64, h: &RecordHeader, data: &[u8], word: fn(u64) -> u64) {
        let slot = self.slot(pos);
        debug_assert!(slot as u64 + footprint(data.len()) <= self.fields.capacity);
        self.copy_into_slot(slot, &h.encode_with_checksum(data), data);
        self.commit_word_at(slot).store(word(pos), Ordering::Release);
    }

    /// Copies header bytes 8..48 and the data into a slot through the
    /// mapping. The ring is allocated memory (tmpfs, allocated in full), so
    /// this is a plain copy: no fault, no writeback.
    pub(super) fn copy_into_slot(&self, slot: usize, head: &[u8; RECORD_HEADER_SIZE - 8], data: &[u8]) {
        // SAFETY: the slot lies inside the data area with room for the data
        // (a record never straddles the wrap) and was reserved by the caller
        // through the head CAS, so no other producer writes it and the
        // consumer does not read it before the commit store that follows.
        // The mapping outlives this call because `self` owns it.
        unsafe {
            let base = self.map.as_mut_ptr().add(HEADER_SIZE + slot);
            std::ptr::copy_nonoverlapping(head.as_ptr(), base.add(8), head.len());
            std::ptr::copy_nonoverlapping(data.as_ptr(), base.add(RECORD_HEADER_SIZE), data.len());
        }
    }

    pub(super) fn commit_word_at(&self, slot: usize) -> &AtomicU64 {
        // SAFETY: slots are 64-byte aligned inside the data area, which is
        // page-aligned; the mapping lives as long as `self`.
        unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(HEADER_SIZE + slot).cast()) }
    }
}

/// A tag reserved and filled, not yet published ([`Journal::reserve_group_tag`]).
pub struct ReservedTag<'a> {
    journal: &'a Journal,
    pos: u64,
    seq: u64,
    footprint: u64,
}

impl ReservedTag<'_> {
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Where it is reserved (for the tag lock's note).
    pub fn position(&self) -> Position {
        Position { pos: self.pos, seq: self.seq }
    }

    /// Gives the place up: a pad takes it (and its number), so the stream
    /// has no hole and no tag there.
    pub fn abandon(self) {
        self.journal.write_record(self.pos, &RecordHeader::pad(self.seq, 1, self.footprint), &[]);
    }

    /// Makes the tag's number durable, publishes it, syncs again (see
    /// [`Journal::append_tag`]). Its sequence number.
    pub fn publish(self) -> Result<u64> {
        let j = self.journal;
        if let Err(e) = j.sync() {
            // Never published: a pad takes its place (and its number).
            j.write_record(self.pos, &RecordHeader::pad(self.seq, 1, self.footprint), &[]);
            return Err(e);
        }
        crate::fail::hit(crate::fail::Failpoint::TagReserved)
            .map_err(|source| Error::Sync { path: j.path.clone(), source })?;
        j.commit_word_at(j.slot(self.pos)).store(commit_word(self.pos), Ordering::Release);
        j.sync()?;
        Ok(self.seq)
    }
}
