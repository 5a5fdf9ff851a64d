//! What `tern ship` reports: counters kept while it runs, written to
//! `<state>/<vm>/ship.json` twice a second for `tern status`; and the
//! progress of a resync, as a bar on a terminal or a log line.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tern_driver::journal::Journal;
use tern_driver::units::{Rate, Size};
use tern_store::segment::SegmentHeader;

use crate::status::Report;

#[derive(Debug)]
pub struct Stats {
    path: PathBuf,
    started: Instant,
    segments: AtomicU64,
    records: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    last_shipped_seq: AtomicU64,
    last_shipped_ns: AtomicU64,
    cache_errors: AtomicU64,
    /// The bandwidth limit of the run, bytes per second.
    max_rate: Option<Rate>,
    /// Time the writer waited for the bandwidth limit, in microseconds.
    throttled_us: AtomicU64,
    /// The zstd level in use, and whether it follows the bottleneck.
    compression_level: std::sync::atomic::AtomicI32,
    adaptive: std::sync::atomic::AtomicBool,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Lag of each shipped segment (oldest record's journal time to
    /// durable in the cache), in microseconds; the last 100,000.
    lags_us: Vec<u64>,
    last_error: Option<String>,
    /// For the rates: bytes in and out at the last publish, and when.
    rate_mark: Option<(u64, u64, Instant)>,
    rate: f64,
    upload_rate: f64,
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

impl Stats {
    pub fn new(path: PathBuf, max_rate: Option<Rate>) -> Self {
        Stats {
            max_rate,
            throttled_us: AtomicU64::new(0),
            compression_level: Default::default(),
            adaptive: Default::default(),
            path,
            started: Instant::now(),
            segments: AtomicU64::new(0),
            records: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            last_shipped_seq: AtomicU64::new(0),
            last_shipped_ns: AtomicU64::new(0),
            cache_errors: AtomicU64::new(0),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest sequence number durable in the cache.
    pub fn last_shipped(&self) -> u64 {
        self.last_shipped_seq.load(Ordering::Acquire)
    }

    pub fn set_last_shipped(&self, seq: u64) {
        self.last_shipped_seq.store(seq, Ordering::Release);
    }

    pub fn segment_shipped(&self, h: &SegmentHeader, file_len: u64, oldest_ns: u64) {
        let now = now_ns();
        self.segments.fetch_add(1, Ordering::AcqRel);
        self.records.fetch_add(h.record_count as u64, Ordering::AcqRel);
        self.bytes_in.fetch_add(h.payload_len, Ordering::AcqRel);
        self.bytes_out.fetch_add(file_len, Ordering::AcqRel);
        self.last_shipped_seq.store(h.last_seq, Ordering::Release);
        self.last_shipped_ns.store(now, Ordering::Release);
        let mut inner = self.inner();
        if oldest_ns > 0 {
            if inner.lags_us.len() >= 100_000 {
                inner.lags_us.drain(..50_000);
            }
            inner.lags_us.push(now.saturating_sub(oldest_ns) / 1000);
        }
    }

    /// The zstd level in use, and whether it follows the bottleneck.
    pub fn set_compression(&self, level: i32, adaptive: bool) {
        self.compression_level.store(level, Ordering::Release);
        self.adaptive.store(adaptive, Ordering::Release);
    }

    /// The writer waited `d` for the bandwidth limit.
    pub fn throttled(&self, d: Duration) {
        self.throttled_us.fetch_add(d.as_micros() as u64, Ordering::AcqRel);
    }

    pub fn cache_error(&self, what: String) {
        self.cache_errors.fetch_add(1, Ordering::AcqRel);
        self.inner().last_error = Some(what);
    }

    pub fn cache_recovered(&self) {
        self.inner().last_error = None;
    }

    pub fn report(&self, journal: &Journal) -> Report {
        let (head, tail) = (journal.head(), journal.tail());
        let bytes_in = self.bytes_in.load(Ordering::Acquire);
        let bytes_out = self.bytes_out.load(Ordering::Acquire);
        let mut inner = self.inner();
        let now = Instant::now();
        match inner.rate_mark {
            Some((was_in, was_out, at)) if now.duration_since(at).as_secs_f64() >= 1.0 => {
                let secs = now.duration_since(at).as_secs_f64();
                inner.rate = (bytes_in - was_in) as f64 / secs / 1e6;
                inner.upload_rate = (bytes_out - was_out) as f64 / secs / 1e6;
                inner.rate_mark = Some((bytes_in, bytes_out, now));
            }
            Some(_) => {}
            None => inner.rate_mark = Some((bytes_in, bytes_out, now)),
        }
        let mut lags = inner.lags_us.clone();
        lags.sort_unstable();
        let pct = |p: f64| {
            lags.get(((lags.len() as f64 * p) as usize).min(lags.len().saturating_sub(1)))
                .map_or(0.0, |&us| us as f64 / 1000.0)
        };
        Report {
            pid: std::process::id(),
            updated_unix_ms: now_ns() / 1_000_000,
            running_secs: self.started.elapsed().as_secs_f64(),
            journal_fill: journal.fill(),
            pending_bytes: head.pos - tail.pos,
            pending_records: head.seq - tail.seq,
            segments_shipped: self.segments.load(Ordering::Acquire),
            records_shipped: self.records.load(Ordering::Acquire),
            bytes_in,
            bytes_out,
            compression_ratio: if bytes_out > 0 { bytes_in as f64 / bytes_out as f64 } else { 0.0 },
            ship_rate_mb_s: inner.rate,
            upload_rate_mb_s: inner.upload_rate,
            max_rate_bytes_per_second: self.max_rate.map(|r| r.bytes_per_second()),
            throttled_seconds: self.throttled_us.load(Ordering::Acquire) as f64 / 1e6,
            compression_level: self.compression_level.load(Ordering::Acquire),
            compression_adaptive: self.adaptive.load(Ordering::Acquire),
            last_shipped_seq: self.last_shipped_seq.load(Ordering::Acquire),
            last_shipped_unix_ms: self.last_shipped_ns.load(Ordering::Acquire) / 1_000_000,
            lag_p50_ms: pct(0.50),
            lag_p99_ms: pct(0.99),
            lag_max_ms: lags.last().map_or(0.0, |&us| us as f64 / 1000.0),
            cache_errors: self.cache_errors.load(Ordering::Acquire),
            cache_failing: inner.last_error.clone(),
        }
    }

    /// Writes `ship.json` (temporary file and rename: readers never see half
    /// of it; not fsynced, it is only a report) and returns what it wrote.
    pub fn publish(&self, journal: &Journal) -> Report {
        let report = self.report(journal);
        let tmp = self.path.with_extension("json.tmp");
        let ok = serde_json::to_vec_pretty(&report)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = ok {
            log::debug!("cannot write {}: {e}", self.path.display());
        }
        report
    }
}

/// How the progress of a resync is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A progress bar on standard error (a terminal): bytes, rate, ETA.
    Bar,
    /// A log line every `interval` (logs, the journal of systemd).
    Log { interval: Duration },
}

/// The progress of a resync: the initial sync after `tern enable`, or a
/// catch-up after the ring overflowed or the host crashed. Fed with the
/// dirty bytes ten times a second: the total is what was dirty when the sync
/// started (or when `tern ship` did) plus every later increase, and what
/// is sent is that total less what is dirty now. It ends when nothing is
/// dirty and the resync window is closed.
#[derive(Debug)]
pub struct SyncProgress {
    vm: String,
    mode: ProgressMode,
    current: Option<SyncRun>,
}

#[derive(Debug)]
struct SyncRun {
    /// "initial sync" or "resync", as `tern status` names the state.
    what: &'static str,
    total: u64,
    dirty: u64,
    started: Instant,
    last_line: Instant,
    bar: Option<indicatif::ProgressBar>,
}

impl SyncRun {
    fn sent(&self) -> u64 {
        self.total - self.dirty
    }

    /// Bytes per second since the sync started.
    fn rate(&self) -> f64 {
        let secs = self.started.elapsed().as_secs_f64();
        if secs > 0.0 {
            self.sent() as f64 / secs
        } else {
            0.0
        }
    }
}

impl SyncProgress {
    pub fn new(vm: &str, mode: ProgressMode) -> Self {
        SyncProgress { vm: vm.to_owned(), mode, current: None }
    }

    /// One observation: the bytes dirty now, whether a resync window is
    /// still open (or a checksum resync pending), and whether `tern status`
    /// calls this the initial sync (read only when a sync starts).
    pub fn update(&mut self, dirty: u64, window_open: bool, initial: bool) {
        let Some(run) = &mut self.current else {
            if dirty > 0 {
                self.start(dirty, initial);
            }
            return;
        };
        if dirty > run.dirty {
            // Marked since the last look: the VM wrote past a full ring, or
            // a checksum comparison found more that differs.
            run.total += dirty - run.dirty;
        }
        run.dirty = dirty;
        if dirty == 0 && !window_open {
            self.end("finished");
            return;
        }
        match (&run.bar, self.mode) {
            (Some(bar), _) => {
                bar.set_length(run.total);
                bar.set_position(run.sent());
            }
            (None, ProgressMode::Log { interval }) if run.last_line.elapsed() >= interval => {
                let rate = run.rate();
                let eta = if rate > 0.0 { eta(run.dirty as f64 / rate) } else { "unknown".into() };
                log::info!(
                    "VM '{}': {} {} of {} sent ({}, ETA {eta})",
                    self.vm,
                    run.what,
                    Size(run.sent()).approx(),
                    Size(run.total).approx(),
                    mb_per_s(rate)
                );
                run.last_line = Instant::now();
            }
            (None, _) => {}
        }
    }

    /// `tern ship` stops: a sync still going is reported where it stands.
    pub fn stop(&mut self) {
        self.end("stopped");
    }

    fn start(&mut self, dirty: u64, initial: bool) {
        let what = if initial { "initial sync" } else { "resync" };
        log::info!("VM '{}': {what} of {} started", self.vm, Size(dirty).approx());
        let bar = (self.mode == ProgressMode::Bar).then(|| {
            let style = indicatif::ProgressStyle::with_template(
                "{msg} [{wide_bar}] {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, ETA {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
            let bar = indicatif::ProgressBar::new(dirty)
                .with_style(style)
                .with_message(format!("{what} of VM '{}'", self.vm));
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let now = Instant::now();
        self.current = Some(SyncRun { what, total: dirty, dirty, started: now, last_line: now, bar });
    }

    fn end(&mut self, how: &str) {
        let Some(run) = self.current.take() else { return };
        if let Some(bar) = &run.bar {
            bar.finish_and_clear();
        }
        let secs = run.started.elapsed().as_secs_f64();
        if run.dirty == 0 {
            log::info!(
                "VM '{}': {} {how}: {} sent in {} ({})",
                self.vm,
                run.what,
                Size(run.total).approx(),
                eta(secs),
                mb_per_s(run.rate())
            );
        } else {
            log::info!(
                "VM '{}': {} {how} with {} of {} sent in {}; the {} still dirty stay marked for the next run",
                self.vm,
                run.what,
                Size(run.sent()).approx(),
                Size(run.total).approx(),
                eta(secs),
                Size(run.dirty).approx()
            );
        }
    }
}

/// "45 MB/s" (decimal megabytes, as `ship.json`'s rate).
fn mb_per_s(bytes_per_sec: f64) -> String {
    let mb = bytes_per_sec / 1e6;
    if mb >= 10.0 {
        format!("{mb:.0} MB/s")
    } else {
        format!("{mb:.1} MB/s")
    }
}

/// A duration for people: "1.5s", "16s", "4m05s", "2h03m".
fn eta(secs: f64) -> String {
    let secs = secs.max(0.0);
    if secs < 9.95 {
        return format!("{secs:.1}s");
    }
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_reads_as_seconds_minutes_or_hours() {
        assert_eq!(eta(0.24), "0.2s");
        assert_eq!(eta(9.94), "9.9s");
        assert_eq!(eta(16.4), "16s");
        assert_eq!(eta(245.0), "4m05s");
        assert_eq!(eta(7380.0), "2h03m");
    }

    #[test]
    fn progress_total_grows_with_later_marks_and_ends_when_clean_and_closed() {
        let mut p = SyncProgress::new("vm1", ProgressMode::Log { interval: Duration::from_secs(3600) });
        p.update(100, true, true);
        p.update(40, true, true);
        // 30 more marked while the sync runs: the total is 130, 70 sent.
        p.update(70, true, true);
        let run = p.current.as_ref().expect("a sync runs");
        assert_eq!((run.what, run.total, run.sent()), ("initial sync", 130, 60));
        // Nothing dirty but the window still open: not finished yet.
        p.update(0, true, true);
        assert_eq!(p.current.as_ref().map(SyncRun::sent), Some(130));
        p.update(0, false, true);
        assert!(p.current.is_none());
    }

    #[test]
    fn nothing_dirty_means_no_sync_to_report() {
        let mut p = SyncProgress::new("vm1", ProgressMode::Log { interval: Duration::ZERO });
        p.update(0, true, false);
        assert!(p.current.is_none());
        p.update(64, true, false);
        assert_eq!(p.current.as_ref().map(|r| r.what), Some("resync"));
    }
}
