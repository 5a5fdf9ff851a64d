//! Opening the mirror after a crash: attaching to the journal, and when the
//! last front-end died with it attached, re-applying the published tail to
//! the images (a process crash) or discarding the ring and marking every
//! disk for a checksum resync (a host crash, told apart by the boot id).
//! [`apply_record`] is the one replay of a journal record onto images,
//! shared with the offline tools.

use super::*;

/// How long a front-end attaching waits for a tagger at work: a frozen
/// guest's tag or a group cut holds the tag lock for milliseconds to a few
/// seconds (a sync of the ring); minutes means one hung.
const TAGGER_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

impl Mirror {
    /// Marks the journal attached, recovering first if it already was (the
    /// previous front-end died).
    pub(super) fn attach(&mut self) -> Result<()> {
        // Taggers of other processes are kept out while the ring is walked:
        // one between reserving and publishing is alive, not a hole.
        let _taggers = crate::tag::keep_out(&self.tag_lock, TAGGER_PATIENCE)?;
        let boot = boot_id();
        if self.journal.flags() & journal::FLAG_ATTACHED != 0 {
            if self.journal.boot_id() != boot {
                self.recover_after_host_crash()?;
            } else {
                self.recover_after_process_crash()?;
            }
        } else {
            // A clean stop leaves no record busy and no hole of its own; but
            // a `tern tag` killed between reserving and publishing leaves a
            // hole (and a record saved busy could never be passed either).
            let report = self.journal.pad_holes()?;
            if report.holes > 0 {
                log::warn!(
                    "VM '{}': padded {} hole(s) ({} sequence numbers) a producer of another process left unpublished",
                    self.config.name,
                    report.holes,
                    report.lost_seqs
                );
            }
        }
        self.journal.set_boot_id(boot);
        self.journal.set_flags(journal::FLAG_ATTACHED | journal::FLAG_BARRIER_AWARE);
        self.journal.sync()?;
        Ok(())
    }

    /// Before serving: if regions are dirty (the initial sync, an overflow)
    /// or a checksum comparison is due, the replica is not consistent, so
    /// the window must open before any write is journaled.
    pub(super) fn open_resync_window_if_due(&self) {
        let due = self.dirty_bytes() > 0 || self.journal.checksum_resync_due();
        if !due || self.window_open.load(Ordering::Acquire) {
            return;
        }
        let opener = NewRecord { disk: 0, kind: RecordKind::Resync, offset: 0, length: 0, flags: journal::RESYNC_OPEN };
        // In overflow mode nothing is journaled until the resync leaves it,
        // publishing the opener then.
        if self.journal.mode() == Mode::Journal {
            match self.journal.append(&opener, &[]) {
                Some(seq) => {
                    self.set_window_open(true);
                    log::info!(
                        "VM '{}': resync window opened at seq {seq} ({} to re-send{})",
                        self.config.name,
                        crate::units::Size(self.dirty_bytes()).approx(),
                        if self.journal.checksum_resync_due() { ", and a checksum comparison" } else { "" }
                    );
                }
                None => {
                    self.journal.enter_overflow();
                }
            }
        }
    }

    /// The previous front-end process died; the page cache, shared by the
    /// journal and the images, survived it. Re-apply the published tail to
    /// the images, in order, so every record is in the image.
    pub(super) fn recover_after_process_crash(&mut self) -> Result<()> {
        let (head, tail) = (self.journal.head(), self.journal.tail());
        // Records published before the last overflow may be older than
        // writes that then went to the images and the bitmaps only (the
        // ring may have left overflow since, with those records still
        // unconsumed): replaying them would roll such writes back. Mark
        // their ranges dirty instead; the resync re-reads the images, which
        // are the truth there. Records from the overflow's end on are newer
        // than every bitmap-only write and are re-applied.
        let mark_below = match self.journal.mode() {
            Mode::Overflow => u64::MAX,
            Mode::Journal if self.journal.overflow_seq() > tail.seq => self.journal.overflow_seq(),
            Mode::Journal => 0,
        };
        log::info!(
            "VM '{}': recovering after an unclean stop: journal positions {}..{} (seqs {}..{}); re-applying to the source images{}",
            self.config.name,
            tail.pos,
            head.pos,
            tail.seq,
            head.seq,
            if mark_below > tail.seq {
                format!(" from seq {}, marking dirty the ranges of older records (an overflow came after them)", mark_below.min(head.seq))
            } else {
                String::new()
            }
        );
        let disks = &self.disks;
        let report = self.journal.recover(|h, data| {
            if h.seq >= mark_below {
                return apply_record(disks, h, data);
            }
            if h.kind.changes_disk() {
                disk_of(disks, h)?.bitmap.mark(h.offset, h.length as u64);
            }
            Ok(())
        })?;
        for d in &self.disks {
            d.bitmap.sync()?;
            d.image.sync_data()?;
        }
        log::info!(
            "VM '{}': recovery done: {} records re-applied or marked dirty, {} holes padded ({} sequence numbers never published), {} torn records",
            self.config.name,
            report.records,
            report.holes,
            report.lost_seqs,
            report.torn
        );
        if report.torn > 0 {
            self.journal.set_flags(journal::FLAG_CHECKSUM_RESYNC);
        }
        self.recovery = Some(report);
        Ok(())
    }

    /// The host went down with the journal attached: journal pages, the
    /// header and image pages reached the disk in no particular order, so
    /// the unconsumed records may be stale, torn or missing, and records
    /// past the saved head may look published. Trust none of them: empty
    /// the ring and have a checksum resync compare source and replica,
    /// which ships every difference whatever its cause.
    pub(super) fn recover_after_host_crash(&mut self) -> Result<()> {
        let (head, tail) = (self.journal.head(), self.journal.tail());
        log::warn!(
            "VM '{}': the host went down while `tern serve` was running; discarding the journal's unconsumed records (seqs {}..{}); a checksum resync will compare source and replica",
            self.config.name,
            tail.seq,
            head.seq
        );
        self.journal.discard_unconsumed()?;
        self.journal.set_flags(journal::FLAG_CHECKSUM_RESYNC);
        // An opener among the discarded records is gone: open anew.
        self.journal.set_window_open(false);
        self.recovery = Some(RecoveryReport::default());
        Ok(())
    }
}

/// Replays one journal record onto a set of images: recovery of the source
/// after a crash, and the oracle that rebuilds a disk from its journal.
pub fn apply_record(disks: &[impl AsImage], h: &RecordHeader, data: &[u8]) -> Result<()> {
    if !h.kind.changes_disk() {
        return Ok(());
    }
    let image = disk_of(disks, h)?.as_image();
    let len = h.length as u64;
    if h.offset.checked_add(len).is_none_or(|end| end > image.size()) {
        return Err(Error::Invalid(format!(
            "journal record seq {} covers {}+{len}, past the end of {} ({} bytes)",
            h.seq,
            h.offset,
            image.path().display(),
            image.size()
        )));
    }
    match h.kind {
        RecordKind::Write | RecordKind::Resync => image.write_at(data, h.offset),
        RecordKind::Zero | RecordKind::Trim => image.zero(h.offset, len, true, false),
        RecordKind::Tag | RecordKind::Pad => Ok(()),
    }
}

/// The disk a journal record names, or an error saying the journal and the
/// VM's disks do not match.
fn disk_of<'a, D>(disks: &'a [D], h: &RecordHeader) -> Result<&'a D> {
    disks.get(h.disk as usize).ok_or_else(|| {
        Error::Invalid(format!(
            "journal record seq {} names disk {}, but the VM has {} disk(s); the journal does not belong to this vm.toml",
            h.seq,
            h.disk,
            disks.len()
        ))
    })
}

/// Anything that holds an image (so `apply_record` takes the mirror's disks
/// and plain images alike).
pub trait AsImage {
    fn as_image(&self) -> &Image;
}

impl AsImage for Image {
    fn as_image(&self) -> &Image {
        self
    }
}

impl AsImage for Disk {
    fn as_image(&self) -> &Image {
        &self.image
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`): a front-end that
/// finds another boot's id in an attached journal knows the host crashed,
/// not just the process. Builds with
/// failpoints take `TERN_BOOT_ID` instead when it is set: the power-cut
/// tests reboot a simulated host, not this one.
pub fn boot_id() -> [u8; 16] {
    #[cfg(feature = "failpoints")]
    if let Some(id) = std::env::var("TERN_BOOT_ID").ok().and_then(|s| uuid::Uuid::parse_str(s.trim()).ok()) {
        return *id.as_bytes();
    }
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .and_then(|s| uuid::Uuid::parse_str(s.trim()).ok())
        .map(|u| *u.as_bytes())
        .unwrap_or([0; 16])
}
