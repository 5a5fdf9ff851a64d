//! Crash recovery of the ring: after a front-end crash the published tail
//! is handed back to be re-applied and every hole a crashed producer left
//! is padded (skip-hole); a clean attach pads the holes another process's
//! producer (a `tern tag`) may have left. See docs/FORMATS.md, "Recovery".

use std::sync::atomic::Ordering;

use super::*;

impl Journal {
    /// Walks the unconsumed tail after a front-end crash: hands every
    /// published record to `reapply` in order, and covers every hole a
    /// crashed producer left with pad records, so the consumer can pass it.
    ///
    /// The caller must be the only producer (the front-end, before it
    /// serves). A write in a hole was never applied to the image nor
    /// acknowledged (publishing precedes both), so skipping it is exact.
    pub fn recover(&self, reapply: impl FnMut(&RecordHeader, &[u8]) -> Result<()>) -> Result<RecoveryReport> {
        let report = self.walk_unconsumed(self.tail(), reapply)?;
        self.atomic_u64(OFF_RECOVERIES).fetch_add(1, Ordering::AcqRel);
        Ok(report)
    }

    /// Pads every hole between the tail and the head: a front-end attaching
    /// to a journal the last one left cleanly, which a producer of another
    /// process (a `tern tag` killed between reserving and publishing) may
    /// still have left a hole in. Releases busy records on the way. Reads
    /// only headers unless it finds a hole.
    pub fn pad_holes(&self) -> Result<RecoveryReport> {
        let (mut at, head) = (self.tail(), self.head());
        while at.pos < head.pos {
            let Ok(Some((h, _, _))) = self.locate(at.pos) else {
                return self.walk_unconsumed(at, |_, _| Ok(()));
            };
            self.release_if_busy(at.pos);
            at = after(at.pos, &h).map_err(|e| self.bad(e))?;
        }
        self.check_reached_head(at, head)?;
        Ok(RecoveryReport::default())
    }

    /// The records from the tail must add up to the head exactly: past its
    /// position, or at it with another sequence number, the header lies
    /// (its positions carry no checksum) and the next record would get a
    /// sequence number the shipper refuses as a gap on every start.
    fn check_reached_head(&self, at: Position, head: Position) -> Result<()> {
        if at == head {
            return Ok(());
        }
        Err(self.bad(format!(
            "the records from the tail end at position {} seq {}, but the header's head is position {} seq {}: \
             the journal is damaged; to protect the VM again, `tern disable` it and `tern enable` it \
             (a full initial sync)",
            at.pos, at.seq, head.pos, head.seq
        )))
    }

    /// The walk behind [`Journal::recover`] and [`Journal::pad_holes`],
    /// from `start` to the head.
    fn walk_unconsumed(
        &self,
        start: Position,
        mut reapply: impl FnMut(&RecordHeader, &[u8]) -> Result<()>,
    ) -> Result<RecoveryReport> {
        let head = self.head();
        let mut at = start;
        let mut report = RecoveryReport::default();
        let mut data = Vec::new();
        while at.pos < head.pos {
            let outcome = self.read(at.pos, &mut data);
            if let Ok(ReadOutcome::NotPublished) = outcome {
                if let Some(span) = self.receiving_span(at) {
                    // A client was sending this write's data: it never
                    // reached the image nor was acknowledged.
                    log::warn!(
                        "journal {}: recovery mode skip-hole: seq {} at position {} was still being received; covering it with padding",
                        self.path.display(),
                        at.seq,
                        at.pos
                    );
                    self.write_pads(at.pos, at.pos + span, at.seq, 1);
                    report.holes += 1;
                    report.lost_seqs += 1;
                    at = Position { pos: at.pos + span, seq: at.seq + 1 };
                    continue;
                }
            }
            match outcome {
                Ok(ReadOutcome::Record(h)) => {
                    if h.seq != at.seq {
                        return Err(self.bad(format!(
                            "record at position {} has seq {}, expected {}: the journal is not a valid history",
                            at.pos, h.seq, at.seq
                        )));
                    }
                    if h.kind != RecordKind::Pad {
                        reapply(&h, &data)?;
                        report.records += 1;
                    }
                    // A busy one's producer died writing the image, which
                    // has it now: release it, so the tail may pass.
                    self.release_if_busy(at.pos);
                    at = after(at.pos, &h).map_err(|e| self.bad(e))?;
                }
                unpublished_or_torn => {
                    if let Err(why) = unpublished_or_torn {
                        report.torn += 1;
                        log::warn!("journal {}: {why}; treating it as a hole", self.path.display());
                    }
                    // Find the next published record, or one still
                    // receiving (never step into the data a client was
                    // sending), or the head.
                    let mut next = at.pos + RECORD_ALIGN;
                    let mut next_seq = head.seq;
                    while next < head.pos {
                        if let Ok(ReadOutcome::Record(h)) = self.read(next, &mut data) {
                            next_seq = h.seq;
                            break;
                        }
                        if let Some((seq, _)) = self.receiving_at(next) {
                            if seq > at.seq && seq < head.seq {
                                next_seq = seq;
                                break;
                            }
                        }
                        next += RECORD_ALIGN;
                    }
                    let lost = next_seq.saturating_sub(at.seq);
                    let opener_at = next.saturating_sub(footprint(0));
                    if lost == 1 && at.seq == self.overflow_seq() && opener_at >= at.pos {
                        // The producer that left overflow mode reserved the
                        // window's opener and died before publishing it.
                        // Padding it would lose the window (points could be
                        // taken before the dirty regions are re-sent):
                        // publish the opener it was writing instead.
                        if opener_at > at.pos {
                            self.write_pads(at.pos, opener_at, at.seq, 0);
                        }
                        let opener =
                            NewRecord { disk: 0, kind: RecordKind::Resync, offset: 0, length: 0, flags: RESYNC_OPEN };
                        self.write_record(opener_at, &opener.header(at.seq, 0), &[]);
                        self.set_window_open(true);
                        log::warn!(
                            "journal {}: the resync window's opener (seq {}) was reserved but not published; published it",
                            self.path.display(),
                            at.seq
                        );
                        report.holes += 1;
                        at = Position { pos: next, seq: at.seq + 1 };
                        continue;
                    }
                    log::warn!(
                        "journal {}: recovery mode skip-hole: positions {}..{} (seqs {}..{}) were reserved by a producer that crashed before publishing; covering them with padding",
                        self.path.display(),
                        at.pos,
                        next,
                        at.seq,
                        at.seq + lost
                    );
                    self.write_pads(at.pos, next, at.seq, lost);
                    report.holes += 1;
                    report.lost_seqs += lost;
                    at = Position { pos: next, seq: at.seq + lost };
                }
            }
        }
        self.check_reached_head(at, head)?;
        Ok(report)
    }

    /// The span of the record being received in place at `at` (see
    /// [`InPlaceRecord`]), if its mark and header say so: a write record of
    /// exactly `at`'s sequence number, inside the head.
    fn receiving_span(&self, at: Position) -> Option<u64> {
        let (seq, span) = self.receiving_at(at.pos)?;
        (seq == at.seq && at.pos + span <= self.head().pos).then_some(span)
    }

    /// The sequence number and span of a record marked as receiving at
    /// `pos`: its write header, or the pad that was replacing it when its
    /// producer died (header written, commit word not yet).
    fn receiving_at(&self, pos: u64) -> Option<(u64, u64)> {
        let slot = self.slot(pos);
        if self.commit_word_at(slot).load(Ordering::Acquire) != receiving_word(pos) {
            return None;
        }
        let (h, _, _) = self.header_at(pos).ok()?;
        match h.kind {
            RecordKind::Write => Some((h.seq, h.footprint())),
            RecordKind::Pad if h.offset == 1 => Some((h.seq, h.footprint())),
            _ => None,
        }
    }

    /// Covers `[from, to)` with pad records that never straddle the wrap;
    /// the first stands for `lost` sequence numbers starting at `seq`.
    fn write_pads(&self, from: u64, to: u64, seq: u64, lost: u64) {
        let cap = self.fields.capacity;
        let mut pos = from;
        let (mut seq, mut lost) = (seq, lost);
        while pos < to {
            let slot = pos % cap;
            let span = (to - pos).min(cap - slot).min(1 << 30);
            self.write_record(pos, &RecordHeader::pad(seq, lost, span), &[]);
            pos += span;
            seq += lost;
            lost = 0;
        }
    }
}
