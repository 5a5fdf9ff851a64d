//! `tern ship`: the source side of replication. Drains a VM's journal ring
//! in order into compressed, checksummed segments in the cache store, and
//! moves the ring's tail only once a segment is durable there (invariant 5).
//!
//! ```text
//!  reader (this thread)          workers (zstd, one context each)     writer
//!  ring → SegmentBuilder ──────▶ encode ─────────────────────────────▶ reorder by batch number,
//!  cut by size or age   bounded                              bounded   tmp, fsync, rename, fsync dir,
//!                                                                      then move the ring's tail
//! ```
//!
//! Beside them, the resync driver: when no front-end runs it opens the VM
//! itself and re-sends dirty regions (while `tern serve` runs, serve does).
//! Nothing here can stall or fail the VM's I/O: a slow or failing cache
//! only lets the ring fill, and the front-end falls back to its bitmaps.

mod adaptive;
mod checksum;
mod resync;
mod stats;
mod stop_marker;
mod throttle;
mod writer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crossbeam_channel::{bounded, Receiver, Sender};
use tern_driver::bitmap::DirtyBitmap;
use tern_driver::journal::{self, Journal, Position, RecordHeader};
use tern_driver::units::RateLimit;
use tern_driver::vm::{VmConfig, VmPaths};
use tern_driver::{Mirror, MirrorOptions, ResyncStep};
use tern_store::cache::{CacheDir, Epoch, Manifest};
use tern_store::segment::{self, Compression, Encoder, SegmentBuilder, SegmentHeader};

use resync::drive_resync;
use stop_marker::SourceStopMarker;

pub use stats::{ProgressMode, Stats};

use crate::status::Report;
pub use writer::Fenced;

/// How a ship run behaves.
#[derive(Debug, Clone)]
pub struct ShipOptions {
    /// Catch up with what is journaled or dirty now, then return.
    pub once: bool,
    /// Compression threads.
    pub workers: usize,
    /// After a host crash, how long to wait for the target's block hashes
    /// before falling back to a full resync.
    pub checksum_timeout: Duration,
    /// The bandwidth limit of this run; `None`: the VM's policy's.
    pub max_rate: Option<RateLimit>,
}

/// What a ship run shows besides `ship.json`.
#[derive(Debug, Clone)]
pub struct Reporting {
    /// The directory of the Prometheus metrics file `tern-<vm>.prom`
    /// (`None`: the VM's state directory).
    pub metrics_dir: Option<std::path::PathBuf>,
    /// How the progress of a resync is shown.
    pub progress: ProgressMode,
}

impl Default for Reporting {
    fn default() -> Self {
        Reporting { metrics_dir: None, progress: ProgressMode::Log { interval: Duration::from_secs(5) } }
    }
}

/// Feeds the metrics file with the VM's status (built as `tern status`
/// builds it) at each report, and the resync progress with the bitmaps'
/// dirty bytes ten times a second.
struct Observer<'a> {
    paths: &'a VmPaths,
    config: &'a VmConfig,
    journal: &'a Journal,
    bitmaps: &'a [DirtyBitmap],
    metrics: crate::metrics::MetricsFile,
    progress: std::sync::Mutex<stats::SyncProgress>,
    /// `tern status` calls the state initial-sync (as of the last report).
    initial: AtomicBool,
}

impl Observer<'_> {
    /// `running` is false for the last word as the run ends.
    fn report(&self, report: &Report, running: bool) {
        use crate::status::{vm_status, Shipper, State};
        match vm_status(self.paths, self.config, Shipper::Live { report, running }) {
            Ok(s) => {
                self.metrics.publish(&s, running);
                self.initial.store(s.state == State::InitialSync, Ordering::Release);
            }
            Err(e) => self.metrics.status_unreadable(format!("{e:#}")),
        }
    }

    fn progress(&self) {
        use crate::status::{dirty_bytes, resync_window_open};
        let mut progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        progress.update(
            dirty_bytes(self.bitmaps),
            resync_window_open(self.journal),
            self.initial.load(Ordering::Acquire),
        );
    }

    fn finish(&self, report: &Report) {
        self.report(report, false);
        self.progress();
        self.progress.lock().unwrap_or_else(|p| p.into_inner()).stop();
    }
}

/// A batch of records on its way from the reader to the writer.
struct Batch {
    number: u64,
    builder: SegmentBuilder,
    /// The ring position after its last record: the tail, once it is durable.
    end: Position,
    oldest_ns: u64,
}

struct Sealed {
    number: u64,
    header: SegmentHeader,
    bytes: Vec<u8>,
    end: Position,
    oldest_ns: u64,
}

use tern_driver::fail::{self, Failpoint};

/// The reason recorded in the manifest for an epoch that starts after the
/// journal discarded unshipped records (a host crash).
const EPOCH_AFTER_DISCARD: &str = "journal discarded after a host crash";
/// The reason for an epoch that starts after shipped records went missing
/// from the cache store.
const EPOCH_AFTER_CACHE_LOSS: &str = "records missing from the cache store";

/// Where the stream stands in the cache, read at start.
struct Resume {
    manifest: Manifest,
    /// The newest shipped sequence number (0: none yet).
    last_shipped: u64,
    in_window: bool,
    /// Where reading starts: the first record not in the cache. The tail
    /// may lag behind it (it never passes a record a front-end still
    /// reads), so this is not always `journal.tail()`.
    start: Position,
}

/// [`run_with`] with the default [`Reporting`]: the metrics file in the
/// VM's state directory, progress as a log line every 5 s.
pub fn run(paths: &VmPaths, options: &ShipOptions, stop: Arc<AtomicBool>) -> Result<Arc<Stats>> {
    run_with(paths, options, &Reporting::default(), stop)
}

pub fn run_with(
    paths: &VmPaths,
    options: &ShipOptions,
    reporting: &Reporting,
    stop: Arc<AtomicBool>,
) -> Result<Arc<Stats>> {
    let config = paths.load_config()?;
    let vm = config.name.clone();
    let _consumer =
        tern_driver::fs::lock_exclusive(&paths.consumer_lock(), &format!("the journal of VM '{vm}'"), "`tern ship`")?;
    let journal = paths.open_journal()?;
    if journal.vm_id() != *config.id.as_bytes() {
        bail!("journal {} belongs to another VM than '{vm}'", journal.path().display());
    }
    let cache = crate::cache::for_source(&config)?;
    // The run's limit, else the policy's.
    let max_rate = options.max_rate.map_or(config.policy.max_rate, |RateLimit(r)| r);
    if let Some(rate) = max_rate {
        log::info!("VM '{vm}': sending at most {rate} to the cache store");
    }
    let stats = Arc::new(Stats::new(paths.dir().join("ship.json"), max_rate));
    wait_for_store(&cache, &stats, &stop)?;
    writer::check_fence_retrying(&cache, &stats, &stop)?;
    wait_for_host_crash_recovery(paths, &journal, &stop)?;
    let resume = resume(&config, &cache, &journal, &stats, &stop)?;
    let writer = writer::CacheWriter::new(
        cache.clone(),
        resume.manifest.clone(),
        Arc::clone(&stats),
        Arc::clone(&stop),
        max_rate,
    );
    let bitmaps: Vec<DirtyBitmap> =
        config.disks.iter().map(|d| DirtyBitmap::open(&paths.dirty(&d.name), d.size)).collect::<Result<_, _>>()?;
    let target = journal.head();
    let checksum = checksum::ChecksumResync {
        cache: cache.clone(),
        vm_id: *config.id.as_bytes(),
        epoch: resume.manifest.epoch().number,
        disks: config.disks.iter().map(|d| (d.name.clone(), d.path.clone())).collect(),
        timeout: options.checksum_timeout,
        why: checksum::ChecksumResync::why(
            resume.manifest.epoch().number == 1 && config.disks.iter().any(|d| d.seed.is_some()),
            resume.manifest.epoch().reason == EPOCH_AFTER_CACHE_LOSS,
        ),
        told_ms: Default::default(),
    };
    log::info!(
        "VM '{vm}': shipping journal {} to {} (epoch {}, from seq {}{})",
        journal.path().display(),
        cache.describe(),
        resume.manifest.epoch().number,
        journal.tail().seq,
        if options.once {
            format!(", until seq {} and every dirty region are shipped", target.seq)
        } else {
            String::new()
        }
    );

    let observer = Observer {
        paths,
        config: &config,
        journal: &journal,
        bitmaps: &bitmaps,
        metrics: crate::metrics::MetricsFile::new(reporting.metrics_dir.as_deref().unwrap_or(paths.dir()), &vm),
        progress: std::sync::Mutex::new(stats::SyncProgress::new(&vm, reporting.progress)),
        initial: AtomicBool::new(false),
    };
    log::info!("VM '{vm}': metrics in {}", observer.metrics.path().display());
    crate::notify::ready(&format!("shipping VM '{vm}' to {}", cache.describe()));
    observer.report(&stats.publish(&journal), true);
    // What is dirty now is the start of a resync's total.
    observer.progress();

    let workers = options.workers.max(1);
    let (to_workers, batches) = bounded::<Batch>(workers * 2);
    let (to_writer, sealed) = bounded::<Result<Sealed>>(workers * 2);
    let compression = Compression::Zstd { level: config.policy.compression_level };
    // The level in use: fixed, or following the bottleneck.
    let load = adaptive::Load::default();
    let adaptive = match (config.policy.compression_min, config.policy.compression_max) {
        (Some(min), Some(max)) => {
            log::info!(
                "VM '{vm}': compression follows the bottleneck between zstd levels {min} and {max}, from {}",
                config.policy.compression_level
            );
            Some(adaptive::Adaptive::new(
                config.policy.compression_level,
                min,
                max,
                workers,
                config.policy.segment_size.bytes(),
            ))
        }
        _ => None,
    };
    let fixed_level = std::sync::atomic::AtomicI32::new(config.policy.compression_level);
    let level = adaptive.as_ref().map_or(&fixed_level, |a| &a.level);
    stats.set_compression(config.policy.compression_level, adaptive.is_some());
    let reader_done = AtomicBool::new(false);
    let stop_marker = SourceStopMarker::new(cache.clone(), config.id);
    let resync_idle = AtomicBool::new(false);
    // The fence, as the status thread found it: a quiet source writes no
    // segment (where the writer checks), yet must stop within seconds.
    let fenced: std::sync::Mutex<Option<anyhow::Error>> = Default::default();
    let result = std::thread::scope(|s| -> Result<()> {
        for i in 0..workers {
            let (batches, to_writer, load) = (batches.clone(), to_writer.clone(), &load);
            std::thread::Builder::new()
                .name(format!("ship-zstd-{i}"))
                .spawn_scoped(s, move || compress(compression, level, load, batches, to_writer))?;
        }
        drop((batches, to_writer));
        let writing = std::thread::Builder::new()
            .name("ship-writer".into())
            .spawn_scoped(s, || write_in_order(&writer, &journal, sealed, &stats, &load))?;
        std::thread::Builder::new().name("ship-resync".into()).spawn_scoped(s, || {
            drive_resync(paths, &checksum, &journal, &bitmaps, &reader_done, &resync_idle, &stop)
        })?;
        std::thread::Builder::new().name("ship-status".into()).spawn_scoped(s, || {
            // ship.json and the metrics file twice a second, the progress
            // ten times.
            for tick in 0u64.. {
                if reader_done.load(Ordering::Acquire) {
                    break;
                }
                if tick % 10 == 0 {
                    if let Some(a) = adaptive.as_ref() {
                        let backlog = journal.unconsumed_bytes() + crate::status::dirty_bytes(&bitmaps);
                        stats.set_compression(a.tick(&load, backlog), true);
                    }
                }
                if tick % 5 == 0 {
                    let r = stats.publish(&journal);
                    observer.report(&r, true);
                    if tick % 50 == 0 {
                        crate::notify::status(&ship_status(&vm, &r));
                    }
                }
                // The watchdog: this loop (not the writer, which may wait
                // minutes for a store that is down) must keep turning.
                crate::notify::watchdog();
                if tick % 10 == 0 {
                    if let Err(e) = writer::check_fence(&cache) {
                        if e.is::<writer::Fenced>() {
                            *fenced.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                            stop.store(true, Ordering::Release);
                        }
                    }
                }
                observer.progress();
                std::thread::sleep(Duration::from_millis(100));
            }
        })?;
        let tag_lock = paths.tag_lock();
        let shared = ReaderShared {
            target,
            resync_idle: &resync_idle,
            stop: &stop,
            tag_lock: &tag_lock,
            stats: &stats,
            stop_marker: &stop_marker,
        };
        let reading = read_batches(&config, &journal, &bitmaps, &resume, options, &shared, to_workers);
        reader_done.store(true, Ordering::Release);
        let written = writing.join().map_err(|_| anyhow::anyhow!("the segment writer panicked"))?;
        // A writer that stopped (fenced, or asked to stop mid-retry) is the
        // cause of the reader's "workers stopped": report it first.
        written.and(reading)
    });
    let result = match fenced.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(fence) => Err(fence),
        None => result,
    };
    // The writer is done: a source that stopped is now wholly shipped.
    let result = result.and_then(|()| stop_marker.update(&journal, &bitmaps, &stats));
    let report = if result.is_ok() { stats.publish(&journal) } else { stats.report(&journal) };
    observer.finish(&report);
    result?;
    Ok(stats)
}

/// The shipper's line in `systemctl status`.
fn ship_status(vm: &str, r: &crate::status::Report) -> String {
    let size = |b: u64| tern_driver::units::Size(b).approx();
    match &r.cache_failing {
        Some(e) => format!("VM '{vm}': the cache store fails ({e}); {} pending", size(r.pending_bytes)),
        None => format!(
            "VM '{vm}': shipped up to seq {}, {} pending, lag p99 {:.0} ms, {:.1} MB/s to the store",
            r.last_shipped_seq,
            size(r.pending_bytes),
            r.lag_p99_ms,
            r.upload_rate_mb_s
        ),
    }
}

/// After a host crash the journal is still marked attached by the previous
/// boot until a front-end recovers it, which empties it. Reading it before
/// that would follow records about to vanish: recover it here when no
/// front-end runs, or wait for the one that is starting. (A ring rebuilt
/// after it vanished under a running front-end is marked the same way;
/// that front-end writes to the ring it still maps, and only its restart
/// recovers: said, and waited for.)
fn wait_for_host_crash_recovery(paths: &VmPaths, journal: &Journal, stop: &AtomicBool) -> Result<()> {
    let pending =
        || journal.flags() & journal::FLAG_ATTACHED != 0 && journal.boot_id() != tern_driver::mirror::boot_id();
    let started = Instant::now();
    let mut told = false;
    while pending() && !stop.load(Ordering::Acquire) {
        match Mirror::open(paths, MirrorOptions::default()) {
            Ok(mirror) => mirror.shutdown()?,
            Err(tern_driver::Error::Busy { what, holder }) => {
                if !told && started.elapsed() > Duration::from_secs(10) {
                    log::error!(
                        "{what}: the journal {} must be recovered (after a host crash, or its ring vanished from memory while served) and {holder} holds the VM without recovering it: restart it; shipping waits until then",
                        journal.path().display()
                    );
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => return Err(e).context("recovering the journal after a host crash"),
        }
    }
    Ok(())
}

/// Waits until the cache store answers: a store down or unreachable at
/// start (a restart during an outage) is waited out with backoff, as a
/// failed write is later; one that cannot work (missing, credentials
/// refused) fails at once, saying what to fix.
fn wait_for_store(cache: &CacheDir, stats: &Stats, stop: &AtomicBool) -> Result<()> {
    let vm = cache.vm();
    let mut permanent = None;
    writer::retrying(&format!("reach the cache store {}", cache.store().describe()), stats, stop, || {
        match cache.store().check() {
            Ok(()) => Ok(()),
            Err(e) if e.is_permanent() => {
                permanent = Some(e);
                Ok(())
            }
            Err(e) => Err(e.into_io_error()),
        }
    })?;
    match permanent {
        Some(e) => {
            Err(anyhow::Error::new(e).context(format!("cannot ship VM '{vm}'; then start `tern ship {vm}` again")))
        }
        None => Ok(()),
    }
}

/// Reads the manifest and the newest segment, reconciles them with the
/// ring's tail, and writes the manifest when it is new or a new epoch
/// starts.
fn resume(config: &VmConfig, cache: &CacheDir, journal: &Journal, stats: &Stats, stop: &AtomicBool) -> Result<Resume> {
    let vm = &config.name;
    let segments = cache.location(tern_store::cache::SEGMENTS);
    let removed = cache.remove_temporaries().with_context(|| format!("cannot clean {segments}"))?;
    if removed > 0 {
        log::info!("VM '{vm}': removed {removed} half-written segment(s) a previous run left in {segments}");
    }
    let mut tail = journal.tail();
    let mut manifest = match writer::read_manifest_retrying(cache, stats, stop)? {
        Some(m) => m,
        None => {
            let mut m = Manifest::for_vm(config, tail.seq);
            // Nothing is consumed before the first manifest: the stream's
            // first record is at the tail (`tern enable` puts an initial
            // sync's opener there, before anything else). A ring emptied
            // since (a host crash while the store was unreachable) or in
            // overflow holds no opener yet, but its window or comparison
            // is due all the same.
            let mut data = Vec::new();
            let opens = matches!(
                journal.cursor(tail).next(&mut data),
                Ok(Some(h)) if h.kind == journal::RecordKind::Resync && h.flags == journal::RESYNC_OPEN
            );
            m.starts_in_window =
                opens || journal.window_open() || journal.overflowed() || journal.checksum_resync_due();
            m
        }
    };
    if manifest.id != config.id {
        bail!(
            "{} belongs to VM id {}, but VM '{vm}' is id {}: the cache holds another VM of the same name; move it away or point --cache elsewhere",
            cache.location(tern_store::cache::MANIFEST),
            manifest.id,
            config.id
        );
    }
    if manifest.refresh_from(config) {
        // vm.toml changed since the manifest was written (a new policy, or
        // launch settings): the target learns it only from the manifest.
        log::info!(
            "VM '{vm}': {} takes the policy and launch settings of vm.toml",
            cache.location(tern_store::cache::MANIFEST)
        );
    }
    let newest = writer::newest_segment_retrying(cache, config.id.as_bytes(), stats, stop)?;
    let current = manifest.epoch();
    let (mut last_shipped, mut in_window) = match &newest {
        Some(h) if h.last_seq + 1 >= current.first_seq => (h.last_seq, h.window & segment::WINDOW_AT_END != 0),
        // Nothing of the current epoch shipped yet: it continues from where
        // the epoch starts, not from wherever the tail is now (a discard
        // jumped it: that gap needs an epoch, or the applier refuses it;
        // one a previous run started is not started twice). An epoch
        // after the first starts inside a resync window.
        _ => (current.first_seq.saturating_sub(1), current.number > 1),
    };
    if tail.seq > last_shipped + 1 {
        // Records between are in neither the cache nor the journal. After
        // a host crash the journal discarded them and a checksum resync is
        // due. Otherwise the cache lost them after they were shipped (a
        // segment removed or damaged and moved away, a store rolled back):
        // the replica lacks them and nothing else would say so, so the
        // same comparison is made due here. A new epoch lets the applier
        // accept the gap, inside a resync window until the comparison's
        // differences are sent.
        let number = current.number + 1;
        let (first, last) = (last_shipped + 1, tail.seq - 1);
        let mut closes_from = 0;
        let reason = if journal.checksum_resync_due() {
            log::warn!(
                "VM '{vm}': journal records {first}..={last} were discarded before they were shipped (host crash); starting epoch {number} at seq {}",
                tail.seq
            );
            EPOCH_AFTER_DISCARD
        } else {
            log::error!(
                "VM '{vm}': records {first}..={last} were shipped but are missing from {segments}, and the journal no longer holds them (a segment removed or lost from the cache store); starting epoch {number} at seq {} and a checksum comparison of the replica with the source, which re-sends whatever it lacks",
                tail.seq
            );
            journal.set_flags(journal::FLAG_CHECKSUM_RESYNC);
            journal.sync().context("marking the journal for a checksum resync")?;
            // The ring was not emptied: a window close already in it (an
            // initial sync that ended while this shipper was away) must not
            // end the window this epoch starts in. Closes from here on come
            // after the comparison (a front-end closes only with none due).
            closes_from = journal.head().seq;
            EPOCH_AFTER_CACHE_LOSS
        };
        manifest.epochs.push(Epoch { number, first_seq: tail.seq, reason: reason.into(), closes_from });
        last_shipped = tail.seq - 1;
        in_window = true;
    }
    writer::retrying("write the manifest", stats, stop, || writer::publish_manifest(cache, &manifest))?;
    if tail.seq <= last_shipped {
        // The previous run died after a segment became durable and before
        // it moved the tail: skip what the cache already has.
        let mut cursor = journal.cursor(tail);
        let mut data = Vec::new();
        while cursor.position().seq <= last_shipped {
            if cursor.next(&mut data).map_err(anyhow::Error::msg)?.is_none() {
                bail!(
                    "the cache has records up to seq {last_shipped} but the journal ends at seq {}: the cache is ahead of this journal (was it re-created?)",
                    cursor.position().seq
                );
            }
        }
        if let Some(h) = &newest {
            // (Every earlier segment's directory entry was synced when
            // the next one was written.)
            writer::retrying("sync the newest segment", stats, stop, || {
                cache.make_segment_durable(h.first_seq, h.last_seq).map_err(|e| e.into_io_error())
            })?;
        }
        log::info!(
            "VM '{vm}': seqs {}..={last_shipped} are already in the cache; moving the ring's tail past them",
            tail.seq
        );
        tail = cursor.position();
        journal.set_tail(tail);
    }
    stats.set_last_shipped(last_shipped);
    Ok(Resume { manifest, last_shipped, in_window, start: tail })
}

/// What the reader shares with the resync driver.
#[derive(Clone, Copy)]
struct ReaderShared<'a> {
    /// With `--once`: the head when the run started.
    target: Position,
    resync_idle: &'a AtomicBool,
    stop: &'a AtomicBool,
    /// The VM's tag lock (see `tern_driver::tag`).
    tag_lock: &'a std::path::Path,
    stats: &'a Stats,
    /// Where the clean-stop marker goes (see [`SourceStopped`]).
    stop_marker: &'a SourceStopMarker,
}

/// The reader: records into batches, cut by size and age.
fn read_batches(
    config: &VmConfig,
    journal: &Journal,
    bitmaps: &[DirtyBitmap],
    resume: &Resume,
    options: &ShipOptions,
    shared: &ReaderShared<'_>,
    to_workers: Sender<Batch>,
) -> Result<()> {
    let ReaderShared { target, resync_idle, stop, tag_lock, stats, stop_marker } = *shared;
    let vm_id = *config.id.as_bytes();
    let epoch = resume.manifest.epoch().number;
    // A segment is cut by size at a quarter of the ring at most: records
    // held for a segment keep the tail where it is, and a ring smaller than
    // a few segments would otherwise fill (and stop the resync, which runs
    // only while the ring is half empty) while the segment waits for its
    // age: a 128 KiB ring resynced at 0.26 MB/s.
    let max_size = config.policy.segment_size.bytes().min(journal.capacity() / 4).max(1);
    let max_age = config.policy.segment_age;
    let mut cursor = journal.cursor(resume.start);
    let mut in_window = resume.in_window;
    let mut data = Vec::new();
    let mut number = 0u64;
    let mut builder = SegmentBuilder::new(vm_id, epoch, cursor.position().seq);
    let mut window_at_start = in_window;
    let mut oldest: Option<(u64, Instant)> = None;
    let mut last_progress_log = Instant::now();
    let mut last_reclaim = Instant::now();
    // A record read but held back for the next segment, and the ring
    // position before it (where this segment ends).
    let mut pending: Option<RecordHeader> = None;
    let mut before_pending = cursor.position();
    debug_assert!(resume.last_shipped < cursor.position().seq);
    loop {
        let stopping = stop.load(Ordering::Acquire);
        let record = match pending.take() {
            Some(h) => Some(h),
            None if stopping => None,
            None => {
                before_pending = cursor.position();
                cursor.next(&mut data).map_err(|e| anyhow::anyhow!("journal {}: {e}", journal.path().display()))?
            }
        };
        let full = record.as_ref().is_some_and(|h| !builder.has_room(h.data_len) || builder.payload_len() >= max_size);
        let old = oldest.is_some_and(|(_, at)| at.elapsed() >= max_age);
        if !builder.is_empty()
            && (full || old || record.is_none() && (stopping || options.once && caught_up(&cursor, target)))
        {
            let end = if record.is_some() { before_pending } else { cursor.position() };
            builder.set_window(
                if window_at_start { segment::WINDOW_AT_START } else { 0 }
                    | if in_window { segment::WINDOW_AT_END } else { 0 },
            );
            let next = SegmentBuilder::new(vm_id, epoch, builder.next_seq());
            let batch = Batch {
                number,
                builder: std::mem::replace(&mut builder, next),
                end,
                oldest_ns: oldest.map_or(0, |o| o.0),
            };
            fail::hit(Failpoint::ShipBatchRead)?;
            if to_workers.send(batch).is_err() {
                bail!("the compression workers stopped");
            }
            number += 1;
            window_at_start = in_window;
            oldest = None;
        }
        if record.is_some() {
            stop_marker.source_runs();
        }
        match record {
            Some(h) if full || (old && !builder.is_empty()) => pending = Some(h),
            Some(h) => {
                if h.kind == journal::RecordKind::Resync && h.length == 0 {
                    in_window = h.flags == journal::RESYNC_OPEN;
                }
                if oldest.is_none() {
                    oldest = Some((h.time_ns, Instant::now()));
                }
                builder.push(&h, &data).map_err(|e| anyhow::anyhow!("journal record seq {}: {e}", h.seq))?;
            }
            None if stopping => return Ok(()),
            None => {
                // While running, a store that fails now is tried again
                // after a pause; the run's last update (after the writer)
                // reports a failure.
                stop_marker.update_when_idle(journal, bitmaps, stats);
                if options.once
                    && caught_up(&cursor, target)
                    && !in_window
                    && resync_idle.load(Ordering::Acquire)
                    && bitmaps.iter().all(|b| b.dirty_count() == 0)
                    && !journal.checksum_resync_due()
                {
                    return Ok(());
                }
                if options.once && last_progress_log.elapsed() > Duration::from_secs(5) {
                    let dirty = crate::status::dirty_bytes(bitmaps);
                    log::info!(
                        "waiting: shipped up to seq {}, {} still dirty, resync window {}",
                        cursor.position().seq - 1,
                        tern_driver::units::Size(dirty).approx(),
                        if in_window { "open" } else { "closed" }
                    );
                    last_progress_log = Instant::now();
                }
                if journal.head().pos > cursor.position().pos && last_reclaim.elapsed() > Duration::from_secs(1) {
                    // Stopped at a hole: a dead `tern tag`'s (or group
                    // cut's), if the tag lock says so; it is padded and the
                    // stream goes on.
                    last_reclaim = Instant::now();
                    if tern_driver::tag::reclaim_abandoned(journal, tag_lock, cursor.position())? {
                        log::warn!(
                            "VM '{}': padded the hole a killed `tern tag` left in the journal at seq {}",
                            config.name,
                            cursor.position().seq
                        );
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// Whether the cursor has passed the head as it was when `--once` started.
fn caught_up(cursor: &tern_driver::journal::Cursor<'_>, target: Position) -> bool {
    cursor.position().seq >= target.seq
}

/// A compression worker. A failure goes to the writer, which stops the
/// run with it (it would otherwise wait forever for that batch).
fn compress(
    compression: Compression,
    level: &std::sync::atomic::AtomicI32,
    load: &adaptive::Load,
    batches: Receiver<Batch>,
    to_writer: Sender<Result<Sealed>>,
) {
    let mut encoder = match Encoder::new(compression) {
        Ok(e) => e,
        Err(e) => {
            let _ = to_writer.send(Err(anyhow::Error::new(e).context("cannot set up zstd")));
            return;
        }
    };
    for b in batches {
        let started = Instant::now();
        let cpu_before = adaptive::thread_cpu_time();
        let sealed = encoder
            .set_level(level.load(Ordering::Acquire))
            .and_then(|()| encoder.encode(&b.builder))
            .map(|(header, bytes)| Sealed { number: b.number, header, bytes, end: b.end, oldest_ns: b.oldest_ns })
            .with_context(|| format!("cannot encode the segment of seqs from {}", b.builder.first_seq()));
        load.compressed(started.elapsed(), adaptive::thread_cpu_time().saturating_sub(cpu_before));
        let failed = sealed.is_err();
        if to_writer.send(sealed).is_err() || failed {
            return;
        }
    }
}

/// The writer: segments in batch order, each durable before the tail moves.
fn write_in_order(
    writer: &writer::CacheWriter,
    journal: &Journal,
    sealed: Receiver<Result<Sealed>>,
    stats: &Stats,
    load: &adaptive::Load,
) -> Result<()> {
    let mut waiting = std::collections::BTreeMap::new();
    let mut next = 0u64;
    for s in sealed {
        let s = s?;
        waiting.insert(s.number, s);
        while let Some(s) = waiting.remove(&next) {
            let started = Instant::now();
            load.send_begins();
            writer.write_segment(&s.header, &s.bytes)?;
            journal.set_tail(s.end);
            stats.segment_shipped(&s.header, s.bytes.len() as u64, s.oldest_ns);
            // Shipped: the bandwidth limit holds back the next one only.
            writer.pace(s.bytes.len(), started);
            load.send_ends();
            next += 1;
        }
    }
    if !waiting.is_empty() {
        bail!("segments {:?} were encoded but an earlier one never arrived", waiting.keys().collect::<Vec<_>>());
    }
    Ok(())
}
