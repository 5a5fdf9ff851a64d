//! What a VM's replication is doing, from the files the services keep
//! (journal header, bitmaps, `ship.json`, the cache's `applied.toml`,
//! fence and apply failure, the target's point catalog): one [`VmStatus`]
//! per VM at the source site and one [`TargetStatus`] per replica at the
//! target. Reads only; never takes a service's lock. `tern status` prints
//! these (`crate::cmd::status`); `tern ship` renders the same [`VmStatus`]
//! into its Prometheus file (`crate::metrics`).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tern_driver::bitmap::DirtyBitmap;
use tern_driver::journal::{self, Journal, Mode};
use tern_driver::vm::{self, VmConfig, VmPaths};
use tern_store::cache::{Applied, CacheDir};
use tern_store::object::Store;
use tern_store::target::TargetDir;

/// How a VM fares, as monitoring plugins count: the exit status of `tern
/// status` is the worst of its VMs'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    Ok = 0,
    Warning = 1,
    Critical = 2,
}

impl Health {
    pub fn name(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }
}

/// `<state>/<vm>/ship.json`: what `tern ship` reports twice a second (see
/// `crate::ship::Stats`), read back here. A field missing from an older
/// file reads as its default.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
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
    /// Journal data shipped per second (before compression), over the
    /// last second or so.
    pub ship_rate_mb_s: f64,
    /// Bytes sent to the cache store per second (segments as stored).
    pub upload_rate_mb_s: f64,
    /// The run's bandwidth limit, if any.
    pub max_rate_bytes_per_second: Option<u64>,
    /// Time the writer waited for the bandwidth limit, in all.
    pub throttled_seconds: f64,
    /// The zstd level segments are compressed with now.
    pub compression_level: i32,
    /// Whether that level follows the bottleneck (policy
    /// compression-min/-max).
    pub compression_adaptive: bool,
    pub last_shipped_seq: u64,
    pub last_shipped_unix_ms: u64,
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    pub lag_max_ms: f64,
    pub cache_errors: u64,
    pub cache_failing: Option<String>,
}

/// A VM's replication state, as `tern status` and the metrics file name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    InitialSync,
    /// Nothing recoverable at the target yet: no recovery point.
    Unprotected,
    Protected,
    TestFailover,
    Resyncing,
    Paused,
    Error,
    FailedOver,
    FailedOverUncommitted,
}

impl State {
    pub const ALL: [State; 9] = [
        State::InitialSync,
        State::Unprotected,
        State::Protected,
        State::TestFailover,
        State::Resyncing,
        State::Paused,
        State::Error,
        State::FailedOver,
        State::FailedOverUncommitted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            State::InitialSync => "initial-sync",
            State::Unprotected => "unprotected",
            State::Protected => "protected",
            State::TestFailover => "test-failover",
            State::Resyncing => "resyncing",
            State::Paused => "paused",
            State::Error => "error",
            State::FailedOver => "failed-over",
            State::FailedOverUncommitted => "failed-over-uncommitted",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct VmStatus {
    pub name: String,
    pub state: State,
    /// Source time of the newest journaled write minus that of the newest
    /// applied one; 0 when everything journaled is applied. An upper bound
    /// while writes are in the journal.
    pub rpo_seconds: Option<f64>,
    pub journal_fill: f64,
    pub journal_mode: String,
    pub pending_bytes: u64,
    pub dirty_bytes: u64,
    /// A resync window is open in the journal, or a checksum resync waits
    /// for the target's block hashes.
    pub resync_window_open: bool,
    pub last_point_age_seconds: Option<f64>,
    pub points: usize,
    pub test_failovers: usize,
    pub serve_running: bool,
    pub ship_running: bool,
    pub ship_rate_mb_s: Option<f64>,
    /// Bytes per second sent to the cache store (segments as stored).
    pub upload_rate_mb_s: Option<f64>,
    /// The running shipper's bandwidth limit, bytes per second.
    pub max_rate_bytes_per_second: Option<u64>,
    /// The running shipper's zstd level, and whether it adapts.
    pub compression_level: Option<i32>,
    pub compression_adaptive: Option<bool>,
    /// What waits to be shipped: journaled and unshipped, plus dirty.
    pub backlog_bytes: u64,
    /// When the backlog is shipped at the current rate (0: nothing waits;
    /// none while nothing ships).
    pub backlog_eta_seconds: Option<f64>,
    pub ship_lag_p99_ms: Option<f64>,
    pub compression_ratio: Option<f64>,
    /// Counters of the newest `tern ship` run (they start at 0 with each).
    pub segments_shipped: Option<u64>,
    pub ship_bytes_in: Option<u64>,
    pub ship_bytes_out: Option<u64>,
    pub cache_errors: Option<u64>,
    pub head_seq: u64,
    pub shipped_seq: Option<u64>,
    pub applied_seq: Option<u64>,
    pub last_error: Option<String>,
    /// Memory the journal's live ring holds (allocated bytes).
    pub ring_bytes: Option<u64>,
    /// The newest app point tagged on this host, and whether its guest
    /// freeze worked.
    pub last_app_point: Option<crate::freeze::LastAppPoint>,
}

/// Where the shipper's part of a status comes from.
#[derive(Debug, Clone, Copy)]
pub enum Shipper<'a> {
    /// `ship.json` and the consumer lock file: what `tern status` sees.
    FromFiles,
    /// `tern ship` itself: its report in memory, and whether it goes on
    /// running (false for its last word as it exits).
    Live { report: &'a Report, running: bool },
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Whether the process whose pid a lock file names is alive and is tern.
fn holder_alive(lock: &Path) -> bool {
    let Ok(pid) = std::fs::read_to_string(lock) else { return false };
    let Ok(pid) = pid.trim().parse::<u32>() else { return false };
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains("tern"))
}

/// Bytes marked for resync: dirty regions times the region size.
pub fn dirty_bytes(bitmaps: &[DirtyBitmap]) -> u64 {
    bitmaps.iter().map(|b| b.dirty_count() * b.region_size()).sum()
}

/// A resync window is open in the journal, or a checksum resync waits for
/// the target's block hashes.
pub fn resync_window_open(journal: &Journal) -> bool {
    journal.window_open() || journal.checksum_resync_due()
}

/// One VM's status, from the files the services keep: what `tern status`
/// prints and `tern ship`'s metrics file renders.
pub fn vm_status(paths: &VmPaths, config: &VmConfig, shipper: Shipper<'_>) -> Result<VmStatus> {
    let journal = paths.open_journal()?;
    let (head, tail) = (journal.head(), journal.tail());
    let bitmaps: Vec<DirtyBitmap> =
        config.disks.iter().filter_map(|d| DirtyBitmap::open(&paths.dirty(&d.name), d.size).ok()).collect();
    let dirty_bytes = dirty_bytes(&bitmaps);
    let serve_running = holder_alive(&paths.frontend_lock()) && journal.flags() & journal::FLAG_ATTACHED != 0;
    let (ship, ship_running): (Option<Report>, bool) = match shipper {
        Shipper::FromFiles => (
            std::fs::read_to_string(paths.dir().join("ship.json")).ok().and_then(|t| serde_json::from_str(&t).ok()),
            holder_alive(&paths.consumer_lock()),
        ),
        Shipper::Live { report, running } => (Some(report.clone()), running),
    };
    let cache =
        crate::cache::for_source(config).unwrap_or_else(|_| CacheDir::new(&Store::dir(&config.cache), &config.name));
    // What the cache says of the target; a cache that cannot be read is
    // said, not taken for "nothing applied yet".
    let mut cache_unreadable = None;
    let applied: Option<Applied> = cache.read_applied().unwrap_or_else(|e| {
        cache_unreadable = Some(format!("cannot read the cache store: {e:#}"));
        None
    });
    let target = TargetDir::new(&config.target, &config.name);
    // The catalog itself when the target directory is on this host, else
    // what the applier published with its progress (two sites).
    let (point_count, newest_point) = if target.root().is_dir() {
        let points = target.list_points().unwrap_or_default();
        (points.len(), points.iter().map(|p| p.time_ns).max())
    } else {
        let a = applied.as_ref();
        (a.and_then(|a| a.points).unwrap_or(0) as usize, a.and_then(|a| a.newest_point_ns))
    };
    let test_failovers = std::fs::read_dir(target.root().join("failover"))
        .map(|d| {
            // `active` is the real failover's directory, not a test.
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    !name.starts_with('.') && name != "active"
                })
                .count()
        })
        .unwrap_or(0);
    let last_seq = head.seq.saturating_sub(1);
    let rpo_seconds = applied.as_ref().map(|a| {
        if a.applied_seq >= last_seq {
            0.0
        } else {
            now_ns().saturating_sub(a.source_time_ns) as f64 / 1e9
        }
    });
    let cache_failing = ship.as_ref().and_then(|s| s.cache_failing.clone()).or(cache_unreadable);
    let apply_failing = cache.read_apply_failure().ok().flatten().map(|f| {
        let retry = match f.retry_unix_ms.checked_sub(now_ns() / 1_000_000) {
            _ if f.retry_unix_ms == 0 => "not retried (`tern apply --once`)".to_string(),
            Some(ms) => format!("retrying in {}s", ms.div_ceil(1000)),
            None => "retrying now".to_string(),
        };
        format!("the target's applier failed {} time(s) in a row, {retry}: {}", f.attempts, f.error)
    });
    let backlog_bytes = (head.pos - tail.pos) + dirty_bytes;
    let resync_window_open = resync_window_open(&journal);
    let in_window = resync_window_open || dirty_bytes > 0;
    let fenced = cache.read_fence().ok().flatten();
    let state = if let Some(f) = &fenced {
        if f.committed {
            State::FailedOver
        } else {
            State::FailedOverUncommitted
        }
    } else if cache_failing.is_some() || apply_failing.is_some() {
        State::Error
    } else if !ship_running && last_seq > tail.seq.saturating_sub(1) {
        State::Paused
    } else if in_window && point_count == 0 {
        State::InitialSync
    } else if in_window || journal.mode() == Mode::Overflow {
        State::Resyncing
    } else if point_count == 0 {
        State::Unprotected
    } else if test_failovers > 0 {
        State::TestFailover
    } else {
        State::Protected
    };
    Ok(VmStatus {
        name: config.name.clone(),
        state,
        rpo_seconds,
        journal_fill: journal.fill(),
        journal_mode: match journal.mode() {
            Mode::Journal => "journal".into(),
            Mode::Overflow => "overflow".into(),
        },
        pending_bytes: head.pos - tail.pos,
        dirty_bytes,
        resync_window_open,
        last_point_age_seconds: newest_point.map(|t| now_ns().saturating_sub(t) as f64 / 1e9),
        points: point_count,
        test_failovers,
        serve_running,
        ship_running,
        ship_rate_mb_s: ship.as_ref().map(|s| s.ship_rate_mb_s).filter(|_| ship_running),
        upload_rate_mb_s: ship.as_ref().map(|s| s.upload_rate_mb_s).filter(|_| ship_running),
        max_rate_bytes_per_second: ship.as_ref().and_then(|s| s.max_rate_bytes_per_second).filter(|_| ship_running),
        compression_level: ship.as_ref().map(|s| s.compression_level).filter(|_| ship_running),
        compression_adaptive: ship.as_ref().map(|s| s.compression_adaptive).filter(|_| ship_running),
        backlog_bytes,
        backlog_eta_seconds: backlog_eta(
            backlog_bytes,
            ship.as_ref().map(|s| s.ship_rate_mb_s).filter(|_| ship_running),
        ),
        ship_lag_p99_ms: ship.as_ref().map(|s| s.lag_p99_ms),
        compression_ratio: ship.as_ref().map(|s| s.compression_ratio),
        segments_shipped: ship.as_ref().map(|s| s.segments_shipped),
        ship_bytes_in: ship.as_ref().map(|s| s.bytes_in),
        ship_bytes_out: ship.as_ref().map(|s| s.bytes_out),
        cache_errors: ship.as_ref().map(|s| s.cache_errors),
        head_seq: last_seq,
        shipped_seq: ship.as_ref().map(|s| s.last_shipped_seq),
        applied_seq: applied.as_ref().map(|a| a.applied_seq),
        last_error: cache_failing.or(apply_failing),
        ring_bytes: std::fs::metadata(journal.ring_path()).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        }),
        last_app_point: crate::freeze::LastAppPoint::load(paths),
    })
}

/// Seconds until `backlog` bytes are shipped at `rate_mb_s` (journal data
/// per second): 0 with nothing waiting, none while nothing ships.
fn backlog_eta(backlog: u64, rate_mb_s: Option<f64>) -> Option<f64> {
    match rate_mb_s {
        _ if backlog == 0 => Some(0.0),
        Some(r) if r > 0.0 => Some(backlog as f64 / (r * 1e6)),
        _ => None,
    }
}

impl VmStatus {
    /// Its health, and why when not ok.
    pub fn health(&self, warn_rpo: Duration, max_rpo: Duration) -> (Health, Option<String>) {
        let rpo = self.rpo_seconds;
        match self.state {
            // A guest that may be frozen first: it is the VM down, not its copy.
            _ if self.last_app_point.as_ref().is_some_and(|p| p.thaw_unconfirmed.is_some()) => {
                let p = self.last_app_point.as_ref().expect("checked");
                (
                    Health::Critical,
                    Some(format!(
                        "the guest agent did not confirm the thaw after app point '{}' ({}): the guest may still be frozen: thaw it with `tern thaw {}` (or check it with guest-fsfreeze-status; the next app point clears this): {}",
                        p.label,
                        p.time,
                        self.name,
                        p.thaw_unconfirmed.as_deref().unwrap_or("")
                    )),
                )
            }
            State::Error | State::Paused => (Health::Critical, Some(self.state.name().into())),
            State::Unprotected => (Health::Critical, Some("no recovery point at the target yet".into())),
            _ if rpo.is_some_and(|r| r > max_rpo.as_secs_f64()) => (
                Health::Critical,
                Some(format!("RPO {:.0}s over {}", rpo.unwrap_or(0.0), humantime::format_duration(max_rpo))),
            ),
            State::InitialSync | State::Resyncing | State::FailedOver | State::FailedOverUncommitted => {
                (Health::Warning, Some(self.state.name().into()))
            }
            _ if rpo.is_some_and(|r| r > warn_rpo.as_secs_f64()) => (
                Health::Warning,
                Some(format!("RPO {:.0}s over {}", rpo.unwrap_or(0.0), humantime::format_duration(warn_rpo))),
            ),
            _ if self.last_app_point.as_ref().is_some_and(|p| p.consistency == "crash") => {
                let p = self.last_app_point.as_ref().expect("checked");
                (
                    Health::Warning,
                    Some(format!(
                        "the guest freeze of the last app point ('{}', {}) failed: {}",
                        p.label,
                        p.time,
                        p.reason.as_deref().unwrap_or("no reason recorded")
                    )),
                )
            }
            State::Protected | State::TestFailover => (Health::Ok, None),
        }
    }
}

/// One VM as the target site sees it (`tern status --target`).
#[derive(Debug, Serialize)]
pub struct TargetStatus {
    pub name: String,
    pub health: Health,
    /// The replicas hold every record up to this one.
    pub applied_seq: Option<u64>,
    /// Age of the newest applied write (source time).
    pub applied_age_seconds: Option<f64>,
    /// Records in the cache not applied yet (with --cache).
    pub waiting_records: Option<u64>,
    pub points: usize,
    pub last_point_age_seconds: Option<f64>,
    pub apply_running: bool,
    /// The cache holds a fence: the VM failed over here (with --cache).
    pub failed_over: bool,
    /// The applier's failure on this VM, if it is failing (with --cache).
    pub last_error: Option<String>,
}

/// Every replica in the target site `target` (only `only` when given), with
/// what waits for it in `cache` when given.
pub fn target_statuses(target: &Path, cache: Option<&Store>, only: Option<&str>) -> Result<Vec<TargetStatus>> {
    let mut names: Vec<String> = std::fs::read_dir(target)
        .map_err(|e| anyhow::anyhow!("cannot list the target site {}: {e}", target.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("replica").is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| vm::validate_name("VM", n).is_ok() && only.is_none_or(|v| v == n))
        .collect();
    names.sort();
    if let Some(vm) = only {
        if names.is_empty() {
            bail!("{} holds no replica of VM '{vm}'", target.display());
        }
    }
    let now = now_ns();
    let mut all = Vec::new();
    for name in names {
        let dir = TargetDir::new(target, &name);
        let checkpoint = dir.read_checkpoint().ok().flatten();
        let points = dir.list_points().unwrap_or_default();
        let cache_dir = cache.map(|c| CacheDir::new(c, &name));
        let newest = cache_dir
            .as_ref()
            .and_then(|c| c.list_segments().ok())
            .map(|s| s.iter().map(|l| l.last_seq).max().unwrap_or(0));
        let applied = checkpoint.as_ref().map(|c| c.applied_seq);
        let failure = cache_dir.as_ref().and_then(|c| c.read_apply_failure().ok().flatten());
        let failed_over = cache_dir.as_ref().is_some_and(|c| c.exists(tern_store::cache::FENCE).unwrap_or(false));
        let apply_running = holder_alive(&dir.root().join("apply.lock"));
        let waiting = newest.map(|n| n.saturating_sub(applied.unwrap_or(0)));
        let health = if failure.is_some() || points.is_empty() && !failed_over {
            Health::Critical
        } else if waiting.is_some_and(|w| w > 0) && !apply_running && !failed_over {
            Health::Warning
        } else {
            Health::Ok
        };
        all.push(TargetStatus {
            name,
            health,
            applied_seq: applied,
            applied_age_seconds: checkpoint.as_ref().map(|c| now.saturating_sub(c.source_time_ns) as f64 / 1e9),
            waiting_records: waiting,
            points: points.len(),
            last_point_age_seconds: points.iter().map(|p| p.time_ns).max().map(|t| now.saturating_sub(t) as f64 / 1e9),
            apply_running,
            failed_over,
            last_error: failure.map(|f| format!("failed {} time(s) in a row: {}", f.attempts, f.error)),
        });
    }
    Ok(all)
}
