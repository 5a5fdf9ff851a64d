//! `tern ship`: its arguments, the signals that stop it, and how it
//! reports (progress bar or log lines, metrics file); the shipping itself
//! is [`crate::ship`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};
use tern_driver::units::RateLimit;
use tern_driver::vm::VmPaths;

use super::Cli;
use crate::ship::{self, ProgressMode, Reporting, ShipOptions};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The VM whose journal to ship.
    pub vm: String,
    /// Ship what is journaled or dirty now, then exit 0.
    #[arg(long)]
    pub once: bool,
    /// Compression threads (default: one per CPU).
    #[arg(long)]
    pub workers: Option<usize>,
    /// After a host crash, how long to wait for the target's block hashes
    /// before re-sending every region instead.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    pub checksum_timeout: std::time::Duration,
    /// Where to keep the Prometheus metrics file `tern-<vm>.prom`, rewritten
    /// twice a second (temporary file and rename). Point it at
    /// node_exporter's textfile directory (Debian:
    /// /var/lib/prometheus/node-exporter). Default: the VM's state
    /// directory, `<state>/<vm>/`.
    #[arg(long, env = "TERN_METRICS_DIR", value_name = "DIR")]
    pub metrics_dir: Option<PathBuf>,
    /// How often the progress of an initial sync or resync is logged when
    /// standard error is not a terminal (on a terminal: a progress bar).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub progress_interval: std::time::Duration,
    /// The most this run may send to the cache store, in bytes per second
    /// of segments as stored (e.g. 50MB/s, 100Mbit/s), or `unlimited`.
    /// Default: the VM's policy (`tern enable --max-rate`), else no limit.
    #[arg(long, value_name = "RATE")]
    pub max_rate: Option<RateLimit>,
}

pub fn run(cli: &Cli, a: &Args) -> Result<()> {
    let paths = VmPaths::new(&cli.state, &a.vm)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [SIGTERM, SIGINT] {
        // SIGTERM: finish the segment being written, then exit cleanly.
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("cannot install signal handlers")?;
    }
    let workers = a.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())).clamp(1, 64);
    if let Some(RateLimit(Some(rate))) = a.max_rate {
        tern_driver::vm::check_max_rate(rate).map_err(|e| anyhow::anyhow!("--max-rate: {e}"))?;
    }
    let options = ShipOptions { once: a.once, workers, checksum_timeout: a.checksum_timeout, max_rate: a.max_rate };
    let reporting = Reporting {
        metrics_dir: a.metrics_dir.clone(),
        progress: if std::io::stderr().is_terminal() {
            ProgressMode::Bar
        } else {
            ProgressMode::Log { interval: a.progress_interval }
        },
    };
    let stats =
        ship::run_with(&paths, &options, &reporting, stop).with_context(|| format!("cannot ship VM '{}'", a.vm))?;
    let r = stats.report(&paths.open_journal()?);
    log::info!(
        "VM '{}': shipped {} records in {} segments up to seq {}: {} in, {} out (ratio {:.2}), lag p50 {:.0} ms, p99 {:.0} ms",
        a.vm,
        r.records_shipped,
        r.segments_shipped,
        r.last_shipped_seq,
        tern_driver::units::Size(r.bytes_in).approx(),
        tern_driver::units::Size(r.bytes_out).approx(),
        r.compression_ratio,
        r.lag_p50_ms,
        r.lag_p99_ms
    );
    Ok(())
}
