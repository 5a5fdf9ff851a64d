//! Durable writes into the cache store, retried until they succeed (and
//! the reads a shipper starts from, retried the same way).
//!
//! A segment is stored whole and create-only ([`CacheDir::write_segment`]:
//! in a directory `.<name>.tmp`, fsynced, linked, the directory fsynced;
//! in a bucket one conditional PUT): it appears complete and durable or
//! not at all (invariant 5), and never over another. Any failure — ENOSPC, EIO, a failed fsync, the directory
//! gone — throws the attempt away (after a failed fsync the page cache may
//! have dropped the data, so nothing written is trusted) and the whole
//! segment is written again after a backoff. The records stay in the ring
//! meanwhile; the VM's I/O never waits for this.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tern_driver::units::Rate;
use tern_store::cache::{CacheDir, Manifest, MANIFEST};
use tern_store::file::FileError;
use tern_store::object::{Put, Stage, StoreError};
use tern_store::segment::SegmentHeader;

use super::throttle::Throttle;
use super::Stats;
use tern_driver::fail::{self, Failpoint};

pub struct CacheWriter {
    cache: CacheDir,
    manifest: Manifest,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    /// The bandwidth limit, if any (only the writer thread sends).
    throttle: Option<Mutex<Throttle>>,
}

impl CacheWriter {
    pub fn new(
        cache: CacheDir,
        manifest: Manifest,
        stats: Arc<Stats>,
        stop: Arc<AtomicBool>,
        max_rate: Option<Rate>,
    ) -> Self {
        CacheWriter { cache, manifest, stats, stop, throttle: max_rate.map(|r| Mutex::new(Throttle::new(r))) }
    }

    /// Writes one segment durably, retrying with backoff until it is done
    /// or the process is asked to stop.
    pub fn write_segment(&self, header: &SegmentHeader, bytes: &[u8]) -> Result<()> {
        let what = format!("write segment {}", self.cache.segment_location(header.first_seq, header.last_seq));
        let mut fenced = None;
        retrying(&what, &self.stats, &self.stop, || {
            // The fence is read again at every attempt: a store that cannot
            // be read now (down, unreachable) is retried like a failed
            // write, never taken for "not fenced" nor allowed to stop the
            // writer.
            //
            // The manifest goes first: a cache emptied by an operator (or a
            // store that came back empty) must never hold segments without
            // it. Both are asked at once: on a bucket each question costs a
            // round trip, and across a WAN a second one in turn cost an
            // eighth of the link (scripts/bench-wan.sh).
            let (fence, manifest_exists) = std::thread::scope(|s| {
                let manifest = s.spawn(|| self.cache.exists(MANIFEST));
                (check_fence(&self.cache), manifest.join().expect("a store call does not panic"))
            });
            match fence {
                Ok(()) => {}
                Err(e) if e.is::<Fenced>() => {
                    fenced = Some(e);
                    return Ok(());
                }
                Err(e) => return Err(io::Error::other(format!("{e:#}"))),
            }
            if !manifest_exists.map_err(StoreError::into_io_error)? {
                write_manifest(&self.cache, &self.manifest, Put::Create)?;
            }
            write_segment_once(&self.cache, header, bytes)
        })?;
        fenced.map_or(Ok(()), Err)
    }

    /// After a segment of `bytes` whose write began at `started`: sleeps
    /// as long as the bandwidth limit asks before the next may be sent.
    pub fn pace(&self, bytes: usize, started: Instant) {
        if let Some(throttle) = &self.throttle {
            let waited = throttle.lock().unwrap_or_else(|p| p.into_inner()).pay(bytes as u64, started, &self.stop);
            self.stats.throttled(waited);
        }
    }
}

/// The error `tern ship` stops with when the VM failed over at the target.
#[derive(Debug, thiserror::Error)]
#[error("VM '{vm}' failed over at the target site to point {point} (seq {seq}): this source is fenced and ships nothing more; stop `tern serve {vm}` and `tern ship {vm}`, and re-protect from the target")]
pub struct Fenced {
    pub vm: String,
    pub point: String,
    pub seq: u64,
}

/// Fails with [`Fenced`] if the target fenced this VM off.
pub fn check_fence(cache: &CacheDir) -> Result<()> {
    if let Some(fence) = cache.read_fence()? {
        return Err(Fenced { vm: cache.vm().to_string(), point: fence.point, seq: fence.seq }.into());
    }
    Ok(())
}

/// [`check_fence`], an unreadable fence retried as [`retrying`] does: at
/// start, the store was just reached, and one lost answer (a pooled
/// connection the store closed) must not end the shipper.
pub fn check_fence_retrying(cache: &CacheDir, stats: &Stats, stop: &AtomicBool) -> Result<()> {
    // The fence found, or a damaged one: both stop the shipper.
    let mut found = None;
    retrying(&format!("read {}", cache.location(tern_store::cache::FENCE)), stats, stop, || {
        match cache.read_fence() {
            Ok(fence) => {
                found = fence
                    .map(|f| anyhow::Error::from(Fenced { vm: cache.vm().to_string(), point: f.point, seq: f.seq }));
                Ok(())
            }
            Err(e @ tern_store::file::FileError::Damaged { .. }) => {
                found = Some(e.into());
                Ok(())
            }
            Err(tern_store::file::FileError::Unreadable { source, .. }) => Err(source),
        }
    })?;
    found.map_or(Ok(()), Err)
}

/// The cache's manifest, if any; one that cannot be read now is retried
/// as [`retrying`] does, a damaged one stops the shipper.
pub fn read_manifest_retrying(cache: &CacheDir, stats: &Stats, stop: &AtomicBool) -> Result<Option<Manifest>> {
    let (mut manifest, mut damaged) = (None, None);
    retrying(&format!("read {}", cache.location(MANIFEST)), stats, stop, || {
        match cache.read_manifest() {
            Ok(m) => manifest = m,
            Err(e @ FileError::Damaged { .. }) => damaged = Some(e),
            Err(FileError::Unreadable { source, .. }) => return Err(source),
        }
        Ok(())
    })?;
    damaged.map_or(Ok(manifest), |e| Err(e.into()))
}

/// The header of the newest segment in the cache, if any. A store that
/// cannot be read now (down, unreachable, a lost answer) is retried as
/// [`retrying`] does: only a segment that was read and is bad stops the
/// shipper, telling the operator to move it away (which costs a new
/// epoch and a checksum comparison).
pub fn newest_segment_retrying(
    cache: &CacheDir,
    vm_id: &[u8; 16],
    stats: &Stats,
    stop: &AtomicBool,
) -> Result<Option<SegmentHeader>> {
    let segments = cache.location(tern_store::cache::SEGMENTS);
    let (mut newest, mut damaged) = (None, None);
    retrying(&format!("read the newest segment in {segments}"), stats, stop, || {
        match cache.newest_segment(Some(*vm_id)) {
            Ok(None) => newest = None,
            Ok(Some(Ok(h))) => newest = Some(h),
            Ok(Some(Err(e))) if e.is_damaged() => damaged = Some(e),
            Ok(Some(Err(e))) => return Err(e.into_io_error()),
            Err(e) => return Err(e.into_io_error()),
        }
        Ok(())
    })?;
    match damaged {
        Some(e) => Err(anyhow::Error::new(e).context(
            "the newest segment in the cache is damaged; move it away: what it held is shipped again (from the journal, or by a checksum comparison with the replica)",
        )),
        None => Ok(newest),
    }
}

/// Runs `attempt` until it succeeds, backing off from 100 ms to 10 s,
/// logging every failure with what to check. Gives up only when asked to
/// stop.
pub fn retrying(
    what: &str,
    stats: &Stats,
    stop: &AtomicBool,
    mut attempt: impl FnMut() -> io::Result<()>,
) -> Result<()> {
    let mut delay = Duration::from_millis(100);
    let mut failures = 0u32;
    loop {
        match attempt() {
            Ok(()) => {
                if failures > 0 {
                    log::info!("cache store: {what}: succeeded after {failures} failed attempt(s)");
                    stats.cache_recovered();
                }
                return Ok(());
            }
            Err(e) => {
                failures += 1;
                stats.cache_error(format!("{what}: {e}"));
                if stop.load(Ordering::Acquire) {
                    bail!("cannot {what}: {e}; stopping with it unshipped (the journal keeps the records)");
                }
                log::warn!(
                    "cache store: cannot {what}: {e}; retrying in {delay:?} (attempt {failures}; check the cache store: a directory's space and mount, a bucket's endpoint, credentials and link; the journal holds the records meanwhile)"
                );
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

fn write_segment_once(cache: &CacheDir, header: &SegmentHeader, bytes: &[u8]) -> io::Result<()> {
    cache
        .write_segment(header, bytes, &mut |stage| match stage {
            Stage::Written => {
                fail::hit(Failpoint::ShipSegmentWritten)?;
                fail::hit(Failpoint::ShipSegmentSync)
            }
            Stage::Synced => fail::hit(Failpoint::ShipSegmentSynced),
            Stage::Linked => fail::hit(Failpoint::ShipSegmentLinked),
            Stage::Published => fail::hit(Failpoint::ShipSegmentRenamed),
        })
        .map_err(StoreError::into_io_error)
}

/// Writes `<cache>/<vm>/manifest.toml` durably: created for a new stream
/// (never over another's), replaced only over the version read.
pub fn write_manifest(cache: &CacheDir, manifest: &Manifest, mode: Put) -> io::Result<()> {
    fail::hit(Failpoint::ShipManifestWrite)?;
    cache.write_manifest(manifest, mode).map_err(StoreError::into_io_error)
}

/// Makes the cache's manifest `manifest`: created if there is none,
/// replaced by compare-and-swap over the version just read (another
/// writer in between makes the attempt fail and the next one re-read),
/// left alone if it already says the same. Never replaces another VM's.
pub fn publish_manifest(cache: &CacheDir, manifest: &Manifest) -> io::Result<()> {
    let current = cache.read_manifest_versioned().map_err(io::Error::other)?;
    match current {
        None => write_manifest(cache, manifest, Put::Create),
        Some((m, _)) if m == *manifest => Ok(()),
        Some((m, _)) if m.id != manifest.id => Err(io::Error::other(format!(
            "{} now belongs to VM id {}, not this VM's {}: another stream took the name",
            cache.location(MANIFEST),
            m.id,
            manifest.id
        ))),
        Some((_, version)) => write_manifest(cache, manifest, Put::Replace(version)),
    }
}
