//! Durable writes into the cache store, retried until they succeed.
//!
//! A segment is written as `.<name>.tmp`, fsynced, renamed, and the
//! directory fsynced: it appears complete and durable or not at all
//! (invariant 5). Any failure — ENOSPC, EIO, a failed fsync, the directory
//! gone — throws the attempt away (after a failed fsync the page cache may
//! have dropped the data, so nothing written is trusted) and the whole
//! segment is written again after a backoff. The records stay in the ring
//! meanwhile; the VM's I/O never waits for this.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tern_driver::units::Rate;
use tern_store::cache::{CacheDir, Manifest};
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
        check_fence(&self.cache)?;
        let what = format!("write segment {}", self.cache.segment_path(header.first_seq, header.last_seq).display());
        retrying(&what, &self.stats, &self.stop, || {
            // The manifest goes first: a cache emptied by an operator (or a
            // store that came back empty) must never hold segments without it.
            if !self.cache.manifest_path().exists() {
                write_manifest(&self.cache, &self.manifest)?;
            }
            write_segment_once(&self.cache, header, bytes)
        })
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
        let vm = cache.root().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        return Err(Fenced { vm, point: fence.point, seq: fence.seq }.into());
    }
    Ok(())
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
                    "cache store: cannot {what}: {e}; retrying in {delay:?} (attempt {failures}; check the cache's space and mount; the journal holds the records meanwhile)"
                );
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

fn write_segment_once(cache: &CacheDir, header: &SegmentHeader, bytes: &[u8]) -> io::Result<()> {
    ensure_vm_dir(cache)?;
    let dir = cache.segments_dir();
    // Durable in its parent before any segment in it counts as shipped.
    tern_driver::fs::create_dir_durably(&dir).map_err(|e| io::Error::other(e.with_causes()))?;
    let tmp = cache.temp_path(header.first_seq, header.last_seq);
    let path = cache.segment_path(header.first_seq, header.last_seq);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        fail::hit(Failpoint::ShipSegmentWritten)?;
        fail::hit(Failpoint::ShipSegmentSync)?;
        f.sync_data()?;
        fail::hit(Failpoint::ShipSegmentSynced)?;
        fs::rename(&tmp, &path)?;
        sync_dir(&dir)?;
        fail::hit(Failpoint::ShipSegmentRenamed)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes `<cache>/<vm>/manifest.toml` durably.
pub fn write_manifest(cache: &CacheDir, manifest: &Manifest) -> io::Result<()> {
    ensure_vm_dir(cache)?;
    let text = toml::to_string(manifest).map_err(io::Error::other)?;
    let text = format!("# tern cache manifest: written by `tern ship`, read by `tern apply`\n{text}");
    fail::hit(Failpoint::ShipManifestWrite)?;
    tern_driver::fs::write_durably(&cache.manifest_path(), text.as_bytes())
        .map_err(|e| io::Error::other(e.with_causes()))
}

/// Creates `<cache>/<vm>/`, but never the cache store itself: if that is
/// gone (an unmounted share), writing into a fresh directory in its place
/// would hide segments from the real store.
fn ensure_vm_dir(cache: &CacheDir) -> io::Result<()> {
    let store = cache.root().parent().unwrap_or(Path::new("/"));
    if !store.is_dir() {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("the cache store {} is missing", store.display())));
    }
    match fs::create_dir(cache.root()) {
        Ok(()) => sync_dir(store),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
