//! `tern status`: what each protected VM's replication is doing, from the
//! files the services keep (journal header, bitmaps, ship.json, the
//! target's applied.toml and point catalog). Reads only; never takes a
//! service's lock.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use serde::Serialize;
use tern_driver::bitmap::DirtyBitmap;
use tern_driver::journal::{self, Journal, Mode};
use tern_driver::units::Size;
use tern_driver::vm::{VmConfig, VmPaths};
use tern_store::cache::{Applied, CacheDir};
use tern_store::target::TargetDir;

use crate::Cli;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this VM (default: every VM in the state directory).
    pub vm: Option<String>,
    #[arg(long)]
    pub json: bool,
    /// Unhealthy (non-zero exit) when the RPO is above this.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    pub max_rpo: Duration,
}

#[derive(Debug, Serialize)]
pub struct VmStatus {
    pub name: String,
    /// initial-sync, protected, test-failover, resyncing, paused, error,
    /// failed-over(-uncommitted).
    pub state: String,
    /// Source time of the newest journaled write minus that of the newest
    /// applied one; 0 when everything journaled is applied. An upper bound
    /// while writes are in the journal.
    pub rpo_seconds: Option<f64>,
    pub journal_fill: f64,
    pub journal_mode: String,
    pub pending_bytes: u64,
    pub dirty_bytes: u64,
    pub last_point_age_seconds: Option<f64>,
    pub points: usize,
    pub test_failovers: usize,
    pub serve_running: bool,
    pub ship_running: bool,
    pub ship_rate_mb_s: Option<f64>,
    pub ship_lag_p99_ms: Option<f64>,
    pub compression_ratio: Option<f64>,
    pub head_seq: u64,
    pub shipped_seq: Option<u64>,
    pub applied_seq: Option<u64>,
    pub last_error: Option<String>,
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

pub fn vm_status(paths: &VmPaths, config: &VmConfig) -> Result<VmStatus> {
    let journal = Journal::open(&paths.journal())?;
    let (head, tail) = (journal.head(), journal.tail());
    let dirty_bytes: u64 = config
        .disks
        .iter()
        .filter_map(|d| DirtyBitmap::open(&paths.dirty(&d.name), d.size).ok())
        .map(|b| b.dirty_count() * b.region_size())
        .sum();
    let serve_running = holder_alive(&paths.frontend_lock()) && journal.flags() & journal::FLAG_ATTACHED != 0;
    let ship: Option<serde_json::Value> =
        std::fs::read_to_string(paths.dir().join("ship.json")).ok().and_then(|t| serde_json::from_str(&t).ok());
    let ship_running = holder_alive(&paths.consumer_lock());
    let ship_field = |k: &str| ship.as_ref().and_then(|s| s[k].as_f64());
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
    let cache_failing = ship.as_ref().and_then(|s| s["cache_failing"].as_str().map(str::to_owned));
    let in_window = journal.window_open() || dirty_bytes > 0 || journal.flags() & journal::FLAG_CHECKSUM_RESYNC != 0;
    let fenced = cache.read_fence().ok().flatten().and_then(Result::ok);
    let state = if let Some(f) = &fenced {
        if f.committed {
            "failed-over"
        } else {
            "failed-over-uncommitted"
        }
    } else if cache_failing.is_some() {
        "error"
    } else if !ship_running && last_seq > tail.seq.saturating_sub(1) {
        "paused"
    } else if in_window && points.is_empty() {
        "initial-sync"
    } else if in_window || journal.mode() == Mode::Overflow {
        "resyncing"
    } else if test_failovers > 0 {
        "test-failover"
    } else {
        "protected"
    };
    Ok(VmStatus {
        name: config.name.clone(),
        state: state.into(),
        rpo_seconds,
        journal_fill: journal.fill(),
        journal_mode: match journal.mode() {
            Mode::Journal => "journal".into(),
            Mode::Overflow => "overflow".into(),
        },
        pending_bytes: head.pos - tail.pos,
        dirty_bytes,
        last_point_age_seconds: newest_point.map(|t| now_ns().saturating_sub(t) as f64 / 1e9),
        points: points.len(),
        test_failovers,
        serve_running,
        ship_running,
        ship_rate_mb_s: ship_field("ship_rate_mb_s").filter(|_| ship_running),
        ship_lag_p99_ms: ship_field("lag_p99_ms"),
        compression_ratio: ship_field("compression_ratio"),
        head_seq: last_seq,
        shipped_seq: ship.as_ref().and_then(|s| s["last_shipped_seq"].as_u64()),
        applied_seq: applied.as_ref().map(|a| a.applied_seq),
        last_error: cache_failing,
    })
}

pub fn run(cli: &Cli, a: &Args) -> Result<()> {
    let names: Vec<String> = match &a.vm {
        Some(v) => vec![v.clone()],
        None => {
            let mut v: Vec<String> = std::fs::read_dir(&cli.state)
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .filter(|e| e.path().join("vm.toml").is_file())
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
        all.push(vm_status(&paths, &config)?);
    }
    let unhealthy: Vec<&VmStatus> = all
        .iter()
        .filter(|s| {
            s.state == "error" || s.state == "paused" || s.rpo_seconds.is_some_and(|r| r > a.max_rpo.as_secs_f64())
        })
        .collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else if all.is_empty() {
        println!("no protected VMs in {}", cli.state.display());
    } else {
        for s in &all {
            let secs = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}s"));
            println!(
                "{}: {} · RPO {} · journal {:.1}% ({}, {} pending) · {} to resync · last point {} ago ({} points) · serve {} · ship {}{}",
                s.name,
                s.state,
                secs(s.rpo_seconds),
                s.journal_fill * 100.0,
                s.journal_mode,
                Size(s.pending_bytes).approx(),
                Size(s.dirty_bytes).approx(),
                secs(s.last_point_age_seconds),
                s.points,
                if s.serve_running { "running" } else { "stopped" },
                if s.ship_running { "running" } else { "stopped" },
                s.last_error.as_deref().map(|e| format!(" · error: {e}")).unwrap_or_default()
            );
        }
    }
    if !unhealthy.is_empty() {
        let names: Vec<String> = unhealthy.iter().map(|s| format!("{} ({})", s.name, s.state)).collect();
        bail!("unhealthy: {}", names.join(", "));
    }
    Ok(())
}
