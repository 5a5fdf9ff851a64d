//! The checksum resync after an unclean host shutdown, source side: ask
//! the target for its replica's block hashes (through the cache), compare
//! them with the source's, and mark only the regions that differ dirty. If
//! no answer comes in time, every region is marked (a full resync).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use tern_driver::bitmap::DirtyBitmap;
use tern_driver::image::Image;
use tern_driver::journal::{self, Journal};
use tern_driver::units::Size;
use tern_store::cache::CacheDir;
use tern_store::file::FileError;
use tern_store::hashes::{hashes_name, region_hashes, HashRequest, HASH_REQUEST, REQUEST_VERSION};

pub struct ChecksumResync {
    pub cache: CacheDir,
    pub vm_id: [u8; 16],
    pub epoch: u64,
    /// (name, source image path), in the VM's disk order.
    pub disks: Vec<(String, PathBuf)>,
    pub timeout: Duration,
    /// Why the comparison runs, for the operator (see [`ChecksumResync::why`]).
    pub why: &'static str,
    /// When the wait was last reported (ms since the Unix epoch).
    pub told_ms: std::sync::atomic::AtomicU64,
}

/// How often a wait for the target's answer is reported.
const TELL_EVERY: Duration = Duration::from_secs(30);

impl ChecksumResync {
    /// The reason a stream compares checksums: its replica was seeded (a
    /// re-protected or failed-back direction, in its first epoch), shipped
    /// records went missing from the cache, or the host went down while
    /// the VM was served.
    pub fn why(seeded_start: bool, lost_from_cache: bool) -> &'static str {
        if seeded_start {
            "the replica at the target starts from a seed (a re-protected or failed-back direction)"
        } else if lost_from_cache {
            "records shipped earlier are missing from the cache store"
        } else {
            "the host went down while the VM was served"
        }
    }
}

impl ChecksumResync {
    /// Called while the journal's `CHECKSUM_RESYNC` flag is set: asks, or
    /// compares once answered, or gives up into a full resync. Clears the
    /// flag when the differences are marked (marks first, durable, then
    /// the flag: the resync window stays open until then).
    pub fn poll(&self, journal: &Journal, bitmaps: &[DirtyBitmap]) -> Result<()> {
        let region_size = bitmaps[0].region_size();
        let request = match self.cache.read_hash_request().or_else(FileError::damaged_as_none)? {
            // This comparison's, asked before a restart: a finished one's
            // request is removed before its flag is cleared (`done`).
            Some(r) if r.epoch == self.epoch && r.region_size == region_size => r,
            _ => {
                // 63 random bits: TOML integers are signed.
                let id = rand::random::<u64>() >> 1;
                let request = HashRequest { version: REQUEST_VERSION, epoch: self.epoch, region_size, id };
                self.cache.write_toml(
                    HASH_REQUEST,
                    &request,
                    "tern ship asks the target for its replica's block hashes",
                )?;
                log::warn!(
                    "{}: asked the target for its replica's block hashes ({}), to send only the regions that differ; waiting up to {} for the answer, then a full resync",
                    self.why,
                    self.cache.location(HASH_REQUEST),
                    humantime::format_duration(self.timeout)
                );
                request
            }
        };
        let mut answers = Vec::new();
        for (name, _) in &self.disks {
            match self.cache.read_hashes(&request, name)? {
                Some(h) if h.vm_id == self.vm_id && h.epoch == self.epoch && h.region_size == region_size => {
                    answers.push(h)
                }
                Some(_) => anyhow::bail!(
                    "{}: the answer is for another VM, epoch or region size",
                    self.cache.location(&hashes_name(&request, name))
                ),
                None => break,
            }
        }
        if answers.len() < self.disks.len() {
            if self.asked_for() >= self.timeout {
                log::warn!(
                    "no block hashes from the target after {}; re-sending every region (full resync)",
                    humantime::format_duration(self.timeout)
                );
                for b in bitmaps {
                    b.mark(0, u64::MAX / 2);
                }
                return self.done(&request, journal, bitmaps);
            }
            self.tell_waiting();
            return Ok(());
        }
        let (mut differ, mut total) = (0u64, 0u64);
        for ((name, path), (answer, bitmap)) in self.disks.iter().zip(answers.iter().zip(bitmaps)) {
            let image = Image::open_read_only(path)?;
            if answer.disk_size != image.size() {
                anyhow::bail!(
                    "the target's replica of disk '{name}' is {} bytes, the source {}",
                    answer.disk_size,
                    image.size()
                );
            }
            let ours = region_hashes(&image, region_size).with_context(|| format!("hashing disk '{name}'"))?;
            for (i, (a, b)) in ours.iter().zip(&answer.hashes).enumerate() {
                if a != b {
                    bitmap.mark(i as u64 * region_size, region_size);
                    differ += 1;
                }
            }
            total += ours.len() as u64;
        }
        log::warn!(
            "checksum comparison with the replica (applied up to seq {}): {differ} of {total} regions differ; re-sending {}",
            answers[0].applied_seq,
            Size(differ * region_size).approx()
        );
        self.done(&request, journal, bitmaps)
    }

    /// The differences are marked: makes them durable, removes the request
    /// and its answers, then clears the flag. In that order: a request
    /// still there when the next comparison of the epoch starts would be
    /// taken for its own.
    fn done(&self, request: &HashRequest, journal: &Journal, bitmaps: &[DirtyBitmap]) -> Result<()> {
        for b in bitmaps {
            b.sync()?;
        }
        for (name, _) in &self.disks {
            self.cache.remove(&hashes_name(request, name))?;
        }
        self.cache.remove(HASH_REQUEST)?;
        journal.clear_flags(journal::FLAG_CHECKSUM_RESYNC);
        journal.sync()?;
        Ok(())
    }

    /// Every [`TELL_EVERY`]: what the wait is for, and whether the target
    /// answers at all (its applier's last report in the cache).
    fn tell_waiting(&self) {
        use std::sync::atomic::Ordering;
        let now_ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let told = self.told_ms.load(Ordering::Relaxed);
        if told == 0 {
            self.told_ms.store(now_ms, Ordering::Relaxed); // the request's own log line told
            return;
        }
        if now_ms.saturating_sub(told) < TELL_EVERY.as_millis() as u64 {
            return;
        }
        self.told_ms.store(now_ms, Ordering::Relaxed);
        let applied = self.cache.read_applied().ok().flatten();
        let target = match applied {
            Some(a) => {
                let ago = now_ms.saturating_sub(a.updated_unix_ms) / 1000;
                if ago < 60 {
                    format!("the target's `tern apply` is running (reported {ago}s ago, at seq {}); it answers once it has applied the segments before the request", a.applied_seq)
                } else {
                    format!("the target's `tern apply` last reported {ago}s ago: is it running there?")
                }
            }
            None => format!(
                "no `tern apply` has reported for this VM yet: start it at the target site on {}",
                self.cache.store().describe()
            ),
        };
        log::info!(
            "waiting for the target's block hashes ({}, asked {} ago; a full resync after {}): {target}",
            self.why,
            humantime::format_duration(Duration::from_secs(self.asked_for().as_secs())),
            humantime::format_duration(self.timeout)
        );
    }

    /// How long ago the request was made (its object's age survives
    /// restarts; by the store's clock against ours, so a store clock far
    /// ahead delays the full-resync fallback, one behind hastens it).
    fn asked_for(&self) -> Duration {
        let now_ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        self.cache
            .modified_unix_ms(HASH_REQUEST)
            .ok()
            .flatten()
            .map_or(Duration::ZERO, |t| Duration::from_millis(now_ms.saturating_sub(t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_store::object::Store;

    const DISK: u64 = 1 << 20;
    const REGION: u32 = 64 << 10;

    struct Setup {
        dir: tempfile::TempDir,
        resync: ChecksumResync,
        journal: Journal,
        bitmaps: Vec<DirtyBitmap>,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk0.img");
        std::fs::write(&image, vec![1u8; DISK as usize]).unwrap();
        Journal::create(&dir.path().join("journal"), [7; 16], 1 << 20).unwrap();
        let journal = Journal::open(&dir.path().join("journal"), dir.path()).unwrap();
        DirtyBitmap::create(&dir.path().join("dirty"), DISK, REGION).unwrap();
        let bitmaps = vec![DirtyBitmap::open(&dir.path().join("dirty"), DISK).unwrap()];
        std::fs::create_dir(dir.path().join("cache")).unwrap();
        let cache = CacheDir::new(&Store::dir(&dir.path().join("cache")), "vm");
        let resync = ChecksumResync {
            cache,
            vm_id: [7; 16],
            epoch: 2,
            disks: vec![("disk0".into(), image)],
            timeout: Duration::from_secs(600),
            why: "a test",
            told_ms: Default::default(),
        };
        Setup { dir, resync, journal, bitmaps }
    }

    /// What the target's applier does: hashes its replica for the pending
    /// request.
    fn answer_with(s: &Setup, replica: &[u8]) {
        let path = s.dir.path().join("replica.img");
        std::fs::write(&path, replica).unwrap();
        let image = Image::open_read_only(&path).unwrap();
        let answered = s.resync.cache.answer_hash_request([7; 16], &[("disk0", &image)], 1).unwrap();
        assert_eq!(answered, Some(2), "a request is pending");
    }

    /// One epoch may see two comparisons (a torn record found after a
    /// restart). An answer to the first that outlived it (written after the
    /// shipper had cleaned up, or its clean-up failed) hashes the replica
    /// as it was then; taken for the second's, a region the source has put
    /// back to that old content compares equal while the replica has moved
    /// on, and is never re-sent.
    #[test]
    fn an_answer_left_from_an_earlier_comparison_is_not_taken_for_the_next() {
        let s = setup();
        let answers_dir = s.dir.path().join("cache/vm/hashes");
        s.journal.set_flags(journal::FLAG_CHECKSUM_RESYNC);
        s.resync.poll(&s.journal, &s.bitmaps).unwrap();
        // The replica then held what the source holds (all 1s).
        answer_with(&s, &vec![1u8; DISK as usize]);
        let late_answer: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&answers_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
            .collect();
        s.resync.poll(&s.journal, &s.bitmaps).unwrap();
        assert!(!s.journal.checksum_resync_due(), "the first comparison is done");
        assert_eq!(s.bitmaps[0].dirty_count(), 0);
        // The first comparison's answer comes (again) after its clean-up.
        for (p, b) in &late_answer {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b).unwrap();
        }
        // Later: the replica's first region got 2s; the source's was put
        // back to 1s by a write the journal lost (torn), and a second
        // comparison of the same epoch is due.
        s.journal.set_flags(journal::FLAG_CHECKSUM_RESYNC);
        s.resync.poll(&s.journal, &s.bitmaps).unwrap();
        assert!(s.journal.checksum_resync_due(), "compared at once, against the earlier comparison's answer");
        let mut replica = vec![1u8; DISK as usize];
        replica[..REGION as usize].fill(2);
        answer_with(&s, &replica);
        s.resync.poll(&s.journal, &s.bitmaps).unwrap();
        assert!(!s.journal.checksum_resync_due());
        assert_eq!(s.bitmaps[0].dirty_ranges(), [(0, REGION as u64)], "the region the replica has moved on in");
    }
}
