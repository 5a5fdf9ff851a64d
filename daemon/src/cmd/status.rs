//! `tern status`: prints what [`crate::status`] finds for each protected VM
//! (or, with `--target`, each replica at the target site) and turns the
//! worst health into the exit status.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use tern_driver::units::Size;
use tern_driver::vm::{self, VmPaths};

use super::Cli;
use crate::status::{target_statuses, vm_status, Health, Shipper};

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

/// "running, 12.3 MB/s to the cache (limit 50MB/s)", or "stopped".
fn ship_state(s: &crate::status::VmStatus) -> String {
    if !s.ship_running {
        return "stopped".into();
    }
    let mut out = "running".to_string();
    if let Some(up) = s.upload_rate_mb_s {
        out.push_str(&format!(", {up:.1} MB/s to the cache"));
    }
    if let Some(limit) = s.max_rate_bytes_per_second {
        out.push_str(&format!(" (limit {})", tern_driver::units::Rate(limit)));
    }
    if let Some(level) = s.compression_level {
        let how = if s.compression_adaptive == Some(true) { ", adaptive" } else { "" };
        out.push_str(&format!(", zstd level {level}{how}"));
    }
    out
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
                "{}: {} · RPO {} · journal {:.1}% ({}, {} pending, ring {} in memory) · {} to resync · backlog {}{} · last point {} ago ({} points) · serve {} · ship {}{}",
                s.name,
                s.state.name(),
                seconds(s.rpo_seconds),
                s.journal_fill * 100.0,
                s.journal_mode,
                Size(s.pending_bytes).approx(),
                s.ring_bytes.map_or("-".into(), |b| Size(b).approx()),
                Size(s.dirty_bytes).approx(),
                Size(s.backlog_bytes).approx(),
                match s.backlog_eta_seconds {
                    Some(eta) if s.backlog_bytes > 0 => format!(" (shipped in {})", seconds(Some(eta))),
                    _ => String::new(),
                },
                seconds(s.last_point_age_seconds),
                s.points,
                if s.serve_running { "running" } else { "stopped" },
                ship_state(s),
                s.last_error.as_deref().map(|e| format!(" · error: {e}")).unwrap_or_default()
            );
            if let Some(p) = &s.last_app_point {
                println!(
                    "  last app point '{}' at {} (seq {}): {}",
                    p.label,
                    p.time,
                    p.seq,
                    match (&p.agent, p.consistency.as_str()) {
                        (Some(agent), "crash") => format!(
                            "CRASH-CONSISTENT, the guest freeze through {agent} failed: {}",
                            p.reason.as_deref().unwrap_or("no reason recorded")
                        ),
                        (Some(agent), _) => format!("application-consistent, the guest frozen through {agent}"),
                        (None, _) => "tagged without a guest freeze".into(),
                    }
                );
                if let Some(why) = &p.thaw_unconfirmed {
                    println!("  THE THAW WAS NOT CONFIRMED: the guest may still be frozen ({why}); thaw it with `tern thaw {}`", s.name);
                }
            }
        }
    }
    verdict(verdicts)
}

fn target_site(target: &Path, cache: Option<&Path>, a: &Args) -> Result<()> {
    let store = cache.map(crate::cache::open_store).transpose()?;
    let all = target_statuses(target, store.as_ref(), a.vm.as_deref())?;
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
