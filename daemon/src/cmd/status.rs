//! `tern status`: what each protected VM's replication is doing, from the
//! files the services keep (journal header, bitmaps, ship.json, the
//! target's applied.toml and point catalog). Reads only; never takes a
//! service's lock. `tern ship` builds the same [`VmStatus`] for its
//! Prometheus metrics file (`crate::metrics`).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use serde::Serialize;
use tern_driver::bitmap::DirtyBitmap;
use tern_driver::journal::{self, Journal, Mode};
use tern_driver::units::Size;
use tern_driver::vm::{self, VmConfig, VmPaths};
use tern_store::cache::{Applied, CacheDir};
use tern_store::target::TargetDir;

use crate::ship::Report;
use crate::Cli;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this VM (default: every VM in the state directory).
    pub vm: Option<String>,
    #[arg(long)]
    pub json: bool,
    /// Critical (exit 2) when the RPO is above this.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    pub max_rpo: Duration,
    /// A warning (exit 1) when the RPO is above this.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub warn_rpo: Duration,
    /// The target site's view instead: per VM replicated into DIR, the
    /// applied sequence, what waits in the cache, the last point and the
    /// applier's last error.
    #[arg(long, value_name = "DIR")]
    pub target: Option<std::path::PathBuf>,
    /// With --target: the cache store the VMs are applied from (for what
    /// waits, fences and the applier's errors).
    #[arg(long, value_name = "DIR", requires = "target")]
    pub cache: Option<std::path::PathBuf>,
}

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

/// A duration in whole seconds for the text output ("-" when unknown).
fn seconds(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.0}s"))
}

/// `tern status` found a VM in a warning or critical state: its exit
/// status is the health's number.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct Unhealthy {
    pub health: Health,
    pub what: String,
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
    journal.window_open() || journal.flags() & journal::FLAG_CHECKSUM_RESYNC != 0
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
    let cache = CacheDir::new(&config.cache, &config.name);
    let applied: Option<Applied> =
        std::fs::read_to_string(cache.applied_path()).ok().and_then(|t| toml::from_str(&t).ok());
    let target = TargetDir::new(&config.target, &config.name);
    let points = target.list_points().unwrap_or_default();
    let newest_point = points.iter().map(|p| p.time_ns).max();
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
    let cache_failing = ship.as_ref().and_then(|s| s.cache_failing.clone());
    let apply_failing = cache.read_apply_failure().ok().flatten().and_then(Result::ok).map(|f| {
        let retry = match f.retry_unix_ms.checked_sub(now_ns() / 1_000_000) {
            _ if f.retry_unix_ms == 0 => "not retried (`tern apply --once`)".to_string(),
            Some(ms) => format!("retrying in {}s", ms.div_ceil(1000)),
            None => "retrying now".to_string(),
        };
        format!("the target's applier failed {} time(s) in a row, {retry}: {}", f.attempts, f.error)
    });
    let resync_window_open = resync_window_open(&journal);
    let in_window = resync_window_open || dirty_bytes > 0;
    let fenced = cache.read_fence().ok().flatten().and_then(Result::ok);
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
    } else if in_window && points.is_empty() {
        State::InitialSync
    } else if in_window || journal.mode() == Mode::Overflow {
        State::Resyncing
    } else if points.is_empty() {
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
        points: points.len(),
        test_failovers,
        serve_running,
        ship_running,
        ship_rate_mb_s: ship.as_ref().map(|s| s.ship_rate_mb_s).filter(|_| ship_running),
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
    })
}

impl VmStatus {
    /// Its health, and why when not ok.
    pub fn health(&self, warn_rpo: Duration, max_rpo: Duration) -> (Health, Option<String>) {
        let rpo = self.rpo_seconds;
        match self.state {
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
            State::Protected | State::TestFailover => (Health::Ok, None),
        }
    }
}

/// The worst health of `verdicts` (VM, health, why) as an error, if not ok.
fn verdict(verdicts: Vec<(String, Health, Option<String>)>) -> Result<()> {
    let worst = verdicts.iter().map(|v| v.1).max().unwrap_or(Health::Ok);
    if worst == Health::Ok {
        return Ok(());
    }
    let named: Vec<String> = verdicts
        .into_iter()
        .filter(|v| v.1 != Health::Ok)
        .map(|(vm, h, why)| format!("{vm} ({}: {})", h.name(), why.unwrap_or_default()))
        .collect();
    Err(Unhealthy { health: worst, what: format!("not healthy: {}", named.join(", ")) }.into())
}

pub fn run(cli: &Cli, a: &Args) -> Result<()> {
    if let Some(target) = &a.target {
        return target_site(target, a.cache.as_deref(), a);
    }
    let names: Vec<String> = match &a.vm {
        Some(v) => vec![v.clone()],
        None => {
            let mut v: Vec<String> = std::fs::read_dir(&cli.state)
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .filter(|e| e.path().join("vm.toml").is_file())
                        // Not a VM: what `tern disable` or a failback is
                        // still removing or restoring (".vm1.…").
                        .filter(|e| vm::validate_name("VM", &e.file_name().to_string_lossy()).is_ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v
        }
    };
    let mut all = Vec::new();
    for name in &names {
        let paths = VmPaths::new(&cli.state, name)?;
        let config = paths.load_config()?;
        all.push(vm_status(&paths, &config, Shipper::FromFiles)?);
    }
    let ring_dir = tern_driver::journal::live::default_ring_dir();
    for ring in tern_driver::journal::live::list_rings(&ring_dir).into_iter().filter(|r| r.orphaned) {
        eprintln!(
            "tern: warning: orphaned journal ring {} holds {} of memory: its VM's state ({}) is gone; `tern serve` or `tern enable` frees it",
            ring.path.display(),
            Size(ring.bytes).approx(),
            ring.owner.as_deref().unwrap_or(Path::new("?")).display()
        );
    }
    let verdicts: Vec<(String, Health, Option<String>)> = all
        .iter()
        .map(|s| {
            let (h, why) = s.health(a.warn_rpo, a.max_rpo);
            (s.name.clone(), h, why)
        })
        .collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else if all.is_empty() {
        println!("no protected VMs in {}", cli.state.display());
    } else {
        for s in &all {
            println!(
                "{}: {} · RPO {} · journal {:.1}% ({}, {} pending, ring {} in memory) · {} to resync · last point {} ago ({} points) · serve {} · ship {}{}",
                s.name,
                s.state.name(),
                seconds(s.rpo_seconds),
                s.journal_fill * 100.0,
                s.journal_mode,
                Size(s.pending_bytes).approx(),
                s.ring_bytes.map_or("-".into(), |b| Size(b).approx()),
                Size(s.dirty_bytes).approx(),
                seconds(s.last_point_age_seconds),
                s.points,
                if s.serve_running { "running" } else { "stopped" },
                if s.ship_running { "running" } else { "stopped" },
                s.last_error.as_deref().map(|e| format!(" · error: {e}")).unwrap_or_default()
            );
        }
    }
    verdict(verdicts)
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

fn target_site(target: &Path, cache: Option<&Path>, a: &Args) -> Result<()> {
    let mut names: Vec<String> = std::fs::read_dir(target)
        .map_err(|e| anyhow::anyhow!("cannot list the target site {}: {e}", target.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("replica").is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| vm::validate_name("VM", n).is_ok() && a.vm.as_ref().is_none_or(|v| v == n))
        .collect();
    names.sort();
    if let Some(vm) = &a.vm {
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
            .map(|s| s.iter().map(|(_, last, _)| *last).max().unwrap_or(0));
        let applied = checkpoint.as_ref().map(|c| c.applied_seq);
        let failure = cache_dir.as_ref().and_then(|c| c.read_apply_failure().ok().flatten()).and_then(Result::ok);
        let failed_over = cache_dir.as_ref().is_some_and(|c| c.fence_path().exists());
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
    if a.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else if all.is_empty() {
        println!("no replicas in {}", target.display());
    } else {
        for s in &all {
            println!(
                "{}: {} · applied seq {} (newest write {} old) · {} waiting in the cache · last point {} ago ({} points) · apply {}{}{}",
                s.name,
                s.health.name(),
                s.applied_seq.map_or("-".into(), |a| a.to_string()),
                seconds(s.applied_age_seconds),
                s.waiting_records.map_or("? (no --cache)".into(), |w| format!("{w} records")),
                seconds(s.last_point_age_seconds),
                s.points,
                if s.apply_running { "running" } else { "stopped" },
                if s.failed_over { " · failed over" } else { "" },
                s.last_error.as_deref().map(|e| format!(" · error: {e}")).unwrap_or_default()
            );
        }
    }
    verdict(
        all.into_iter()
            .map(|s| {
                let why = s.last_error.clone().or_else(|| (s.points == 0).then(|| "no recovery point".into()));
                (s.name, s.health, why.or(Some("records wait and `tern apply` is not running".into())))
            })
            .collect(),
    )
}
