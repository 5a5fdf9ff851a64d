//! What `tern ship` reports: counters kept while it runs, written to
//! `<state>/<vm>/ship.json` twice a second for `tern status`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tern_driver::journal::Journal;
use tern_store::segment::SegmentHeader;

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
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Lag of each shipped segment (oldest record's journal time to
    /// durable in the cache), in microseconds; the last 100,000.
    lags_us: Vec<u64>,
    last_error: Option<String>,
    /// For the rate: bytes in at the last publish, and when.
    rate_mark: Option<(u64, Instant)>,
    rate: f64,
}

/// `ship.json`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub pid: u32,
    pub updated_unix_ms: u64,
    pub running_secs: f64,
    pub journal_fill: f64,
    pub pending_bytes: u64,
    pub pending_records: u64,
    pub segments_shipped: u64,
    pub records_shipped: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub compression_ratio: f64,
    pub ship_rate_mb_s: f64,
    pub last_shipped_seq: u64,
    pub last_shipped_unix_ms: u64,
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    pub lag_max_ms: f64,
    pub cache_errors: u64,
    pub cache_failing: Option<String>,
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

impl Stats {
    pub fn new(path: PathBuf) -> Self {
        Stats {
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
            Some((bytes, at)) if now.duration_since(at).as_secs_f64() >= 1.0 => {
                inner.rate = (bytes_in - bytes) as f64 / now.duration_since(at).as_secs_f64() / 1e6;
                inner.rate_mark = Some((bytes_in, now));
            }
            Some(_) => {}
            None => inner.rate_mark = Some((bytes_in, now)),
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
    /// of it; not fsynced, it is only a report).
    pub fn publish(&self, journal: &Journal) {
        let report = self.report(journal);
        let tmp = self.path.with_extension("json.tmp");
        let ok = serde_json::to_vec_pretty(&report)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = ok {
            log::debug!("cannot write {}: {e}", self.path.display());
        }
    }
}
