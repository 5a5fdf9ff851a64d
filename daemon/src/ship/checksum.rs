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
use tern_store::hashes::{region_hashes, HashRequest};

pub struct ChecksumResync {
    pub cache: CacheDir,
    pub vm_id: [u8; 16],
    pub epoch: u64,
    /// (name, source image path), in the VM's disk order.
    pub disks: Vec<(String, PathBuf)>,
    pub timeout: Duration,
}

impl ChecksumResync {
    /// Called while the journal's `CHECKSUM_RESYNC` flag is set: asks, or
    /// compares once answered, or gives up into a full resync. Clears the
    /// flag when the differences are marked (marks first, durable, then
    /// the flag: the resync window stays open until then).
    pub fn poll(&self, journal: &Journal, bitmaps: &[DirtyBitmap]) -> Result<()> {
        let region_size = bitmaps[0].region_size();
        let request = HashRequest { version: 1, epoch: self.epoch, region_size };
        let asked = matches!(self.cache.read_hash_request()?, Some(Ok(r)) if r == request);
        if !asked {
            let text = toml::to_string(&request)?;
            let path = self.cache.hash_request_path();
            tern_driver::vm::write_durably(&path, text.as_bytes())?;
            log::warn!(
                "the host went down while the VM was served: asked the target for its replica's block hashes ({}); waiting up to {} for the answer, then a full resync",
                path.display(),
                humantime::format_duration(self.timeout)
            );
        }
        let mut answers = Vec::new();
        for (name, _) in &self.disks {
            match self.cache.read_hashes(self.epoch, name)? {
                Some(Ok(h)) if h.vm_id == self.vm_id && h.epoch == self.epoch && h.region_size == region_size => {
                    answers.push(h)
                }
                Some(Ok(_)) => anyhow::bail!(
                    "{}: the answer is for another VM, epoch or region size",
                    self.cache.hashes_path(self.epoch, name).display()
                ),
                Some(Err(e)) => anyhow::bail!("{e}"),
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
                return self.done(journal, bitmaps);
            }
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
        self.done(journal, bitmaps)
    }

    fn done(&self, journal: &Journal, bitmaps: &[DirtyBitmap]) -> Result<()> {
        for b in bitmaps {
            b.sync()?;
        }
        journal.clear_flags(journal::FLAG_CHECKSUM_RESYNC);
        journal.sync()?;
        let _ = std::fs::remove_file(self.cache.hash_request_path());
        for (name, _) in &self.disks {
            let _ = std::fs::remove_file(self.cache.hashes_path(self.epoch, name));
        }
        Ok(())
    }

    /// How long ago the request was made (its file's age survives restarts).
    fn asked_for(&self) -> Duration {
        std::fs::metadata(self.cache.hash_request_path())
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or(Duration::ZERO)
    }
}
