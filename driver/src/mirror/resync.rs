//! Resync: the one mechanism behind the initial sync, ring overflow and
//! recovery after an unclean host shutdown (invariant 4).
//!
//! Dirty regions are re-read under the range lock and published as
//! `Resync` records, ordered with the writes around them. The stretch of
//! the journal during which the replica lacks some region is bracketed by
//! two markers, `RESYNC_OPEN` and `RESYNC_CLOSE`, so the applier knows where
//! it may take recovery points (invariant 6):
//!
//! - a window opens when resync work appears: on attach with dirty regions
//!   or a checksum resync due, and when the ring leaves overflow (the open
//!   marker is reserved in the same step that leaves it, so it precedes
//!   every write journaled after the overflow);
//! - it closes once no region is dirty, the ring journals, and no checksum
//!   comparison is due.
//!
//! The journal header remembers whether the last marker opened a window, so
//! a front-end that starts after a crash still closes it. (A crash between
//! publishing a marker and noting it costs at most a redundant marker; the
//! applier ignores an open inside a window and a close outside one.)

use std::sync::atomic::Ordering;

use super::Mirror;
use crate::journal::{self, Mode, NewRecord, RecordKind};
use crate::Result;

/// The resync only runs while the ring is less full than this, so the VM's
/// own writes always find room (a resync never pushes the ring into
/// overflow by itself).
pub const RESYNC_MAX_FILL: f64 = 0.5;
/// Largest resync record: big enough to stream, small enough that a write
/// to the same region waits only briefly for the range.
pub const RESYNC_RECORD: u64 = 1 << 20;

/// What one call of [`Mirror::resync_step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncStep {
    /// Nothing dirty and no window open.
    Idle,
    /// Re-sent this many bytes of dirty regions; there may be more.
    Progress { bytes: u64 },
    /// The ring is too full (or still in overflow): wait for the shipper to
    /// drain it.
    WaitingForRoom,
    /// Every dirty region is re-sent, but a checksum comparison of source
    /// and replica is due (the host went down): the window stays open
    /// until it has marked what differs and that is re-sent.
    AwaitingChecksum,
}

fn marker(flags: u8) -> NewRecord {
    NewRecord { disk: 0, kind: RecordKind::Resync, offset: 0, length: 0, flags }
}

impl Mirror {
    /// Bytes of all disks still marked dirty.
    pub fn dirty_bytes(&self) -> u64 {
        self.disks.iter().map(|d| d.bitmap.dirty_count() * d.bitmap.region_size()).sum()
    }

    /// Marks a range for resync (the checksum comparison found it differs).
    pub fn mark_dirty(&self, disk: usize, offset: u64, len: u64) -> Result<()> {
        let d = self.check_range(disk, offset, len)?;
        d.bitmap.mark(offset, len);
        d.bitmap.sync()
    }

    /// The checksum comparison is done: its differences are marked dirty,
    /// so the window may close once they are re-sent.
    pub fn checksum_resync_done(&self) -> Result<()> {
        for d in &self.disks {
            d.bitmap.sync()?;
        }
        self.journal.clear_flags(journal::FLAG_CHECKSUM_RESYNC);
        self.journal.sync()
    }

    /// Records whether the stream is inside a window, here and in the
    /// journal header (for the next front-end, should this one die).
    pub(super) fn set_window_open(&self, open: bool) {
        self.window_open.store(open, Ordering::Release);
        self.journal.set_window_open(open);
    }

    /// Does a bounded piece of resync work: leaves overflow if there is
    /// room, opens or closes the window, and re-sends up to `max_bytes` of
    /// dirty regions. Call it again until it returns `Idle`; a front-end
    /// calls it from a background thread, `tern ship` when no front-end
    /// runs.
    pub fn resync_step(&self, max_bytes: u64) -> Result<ResyncStep> {
        let _gate = self.enter(0)?;
        if !self.journaling {
            return Ok(ResyncStep::Idle);
        }
        let j = &self.journal;
        if j.fill() >= RESYNC_MAX_FILL {
            return Ok(ResyncStep::WaitingForRoom);
        }
        if j.mode() == Mode::Overflow {
            let Some(seq) = j.leave_overflow(&marker(journal::RESYNC_OPEN)) else {
                return Ok(ResyncStep::WaitingForRoom);
            };
            self.set_window_open(true);
            // A write that saw overflow mode before the switch marks its
            // bitmap while holding its range: wait for every such write, so
            // the scan below sees its mark.
            for d in &self.disks {
                drop(d.lock.lock(0, d.image.size()));
            }
            *self.resync_from.lock().unwrap_or_else(|p| p.into_inner()) = (0, 0);
            log::info!(
                "VM '{}': the journal has room again; journaling resumes, resync window opened at seq {seq} ({} dirty)",
                self.config.name,
                crate::units::Size(self.dirty_bytes()).approx()
            );
        }
        let checksum_due = j.checksum_resync_due();
        if self.dirty_bytes() == 0 && !checksum_due {
            if self.window_open.load(Ordering::Acquire) {
                let Some(seq) = j.append(&marker(journal::RESYNC_CLOSE), &[]) else {
                    return Ok(ResyncStep::WaitingForRoom);
                };
                self.set_window_open(false);
                log::info!("VM '{}': resync complete; window closed at seq {seq}", self.config.name);
                if j.checksum_resync_due() {
                    // A comparison was made due between the check above and
                    // the close (`tern ship` found records lost from the
                    // cache): its window opens again at once.
                    return Ok(ResyncStep::Progress { bytes: 0 });
                }
            }
            return Ok(ResyncStep::Idle);
        }
        if !self.window_open.load(Ordering::Acquire) {
            let Some(seq) = j.append(&marker(journal::RESYNC_OPEN), &[]) else {
                return Ok(ResyncStep::WaitingForRoom);
            };
            self.set_window_open(true);
            log::info!(
                "VM '{}': resync window opened at seq {seq} ({} dirty)",
                self.config.name,
                crate::units::Size(self.dirty_bytes()).approx()
            );
        }
        let mut sent = 0;
        let mut buf = Vec::new();
        while sent < max_bytes {
            if j.fill() >= RESYNC_MAX_FILL {
                return Ok(if sent > 0 { ResyncStep::Progress { bytes: sent } } else { ResyncStep::WaitingForRoom });
            }
            let Some((disk, offset, len)) = self.next_dirty_run() else {
                break;
            };
            if !self.resend(disk, offset, len, &mut buf)? {
                return Ok(ResyncStep::WaitingForRoom);
            }
            sent += len;
        }
        if sent == 0 {
            return Ok(if self.dirty_bytes() == 0 {
                ResyncStep::AwaitingChecksum
            } else {
                ResyncStep::Progress { bytes: 0 }
            });
        }
        Ok(ResyncStep::Progress { bytes: sent })
    }

    /// The next dirty run after where the last one ended, wrapping around
    /// the disks once.
    fn next_dirty_run(&self) -> Option<(usize, u64, u64)> {
        let mut from = self.resync_from.lock().unwrap_or_else(|p| p.into_inner());
        let (start_disk, start_offset) = *from;
        for step in 0..=self.disks.len() {
            let disk = (start_disk + step) % self.disks.len();
            let offset = if step == 0 { start_offset } else { 0 };
            // A run fits a quarter of the ring, so it goes out between two
            // drains of the shipper even on a small ring.
            let max_run = (self.journal.capacity() / 4).min(RESYNC_RECORD);
            if let Some((o, l)) = self.disks[disk].bitmap.next_dirty(offset, max_run) {
                *from = (disk, o + l);
                return Some((disk, o, l));
            }
        }
        None
    }

    /// Re-sends one dirty range: under the range lock (no write to it is in
    /// flight, and later ones are journaled after these records), read the
    /// image and publish its content, in pieces a quarter of the ring at
    /// most; then clear the bits. Returns false if the ring had no room
    /// (the range stays dirty).
    fn resend(&self, disk: usize, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<bool> {
        let d = &self.disks[disk];
        let piece_max = (self.journal.capacity() / 4 / 4096 * 4096).clamp(4096, RESYNC_RECORD);
        let _range = d.lock.lock(offset, len);
        let mut done = 0;
        while done < len {
            let n = piece_max.min(len - done);
            buf.resize(n as usize, 0);
            d.image.read_at(buf, offset + done)?;
            // Runs of zeroes go out as zero records, without their bytes.
            for (at, len, zero) in zero_runs(buf) {
                let rec = NewRecord {
                    disk: d.index,
                    kind: if zero { RecordKind::Zero } else { RecordKind::Resync },
                    offset: offset + done + at as u64,
                    length: len as u32,
                    flags: 0,
                };
                let data = if zero { &[][..] } else { &buf[at..at + len] };
                if !self.append_waiting(&rec, data) {
                    return Ok(false);
                }
            }
            done += n;
        }
        crate::fail::hit(crate::fail::Failpoint::ServeResyncPublished).map_err(|source| crate::Error::Read {
            path: d.image.path().to_owned(),
            offset,
            len: len as usize,
            source,
        })?;
        d.bitmap.clear_range(offset, len);
        Ok(true)
    }

    /// Appends, waiting up to a second for the shipper to make room (a
    /// region bigger than the free ring goes out in pieces while its range
    /// is held). False if there was none, or the ring went into overflow.
    fn append_waiting(&self, rec: &NewRecord, data: &[u8]) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            if self.journal.append(rec, data).is_some() {
                return true;
            }
            if self.journal.mode() == Mode::Overflow || std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// Granularity of zero detection in resync pieces.
const ZERO_BLOCK: usize = 64 * 1024;

/// Splits `buf` into maximal runs of whole `ZERO_BLOCK`s that are all zero
/// or not: `(start, len, zero)`.
fn zero_runs(buf: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    for (i, block) in buf.chunks(ZERO_BLOCK).enumerate() {
        let zero = is_zero(block);
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 += block.len(),
            _ => runs.push((i * ZERO_BLOCK, block.len(), zero)),
        }
    }
    runs
}

fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(16);
    words.all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0)
        && words.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod zero_tests {
    use super::*;

    #[test]
    fn zero_runs_cover_the_buffer_and_split_where_zeroes_start_and_end() {
        let mut buf = vec![0u8; 5 * ZERO_BLOCK + 100];
        buf[ZERO_BLOCK + 5] = 1;
        buf[2 * ZERO_BLOCK] = 1;
        buf[5 * ZERO_BLOCK + 99] = 7;
        let runs = zero_runs(&buf);
        assert_eq!(
            runs,
            vec![
                (0, ZERO_BLOCK, true),
                (ZERO_BLOCK, 2 * ZERO_BLOCK, false),
                (3 * ZERO_BLOCK, 2 * ZERO_BLOCK, true),
                (5 * ZERO_BLOCK, 100, false)
            ]
        );
        assert_eq!(zero_runs(&[]), vec![]);
        assert_eq!(zero_runs(&[0u8; 100]), vec![(0, 100, true)]);
    }
}
