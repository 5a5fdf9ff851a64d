//! `tern`: the one command that drives replication of VM disks.
#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod apply;
mod cmd;
mod failover;
mod hint;
mod metrics;
mod reprotect;
mod ship;
mod status;
mod verify;

/// The state directory without --state or TERN_STATE.
pub const DEFAULT_STATE: &str = "/var/lib/tern";

/// tern replicates the disks of running VMs to a target site and fails them
/// over to any recovery point.
#[derive(Debug, Parser)]
#[command(name = "tern", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// State directory holding every protected VM's vm.toml, journal and
    /// bitmaps.
    #[arg(long, global = true, env = "TERN_STATE", default_value = DEFAULT_STATE)]
    pub state: PathBuf,
    /// More log output (-v: debug, -vv: trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Protect a VM: record its disks, create its journal and bitmaps, and
    /// mark all allocated data for the initial sync.
    Enable(cmd::enable::Args),
    /// Stop protecting a VM here: remove its state and journal ring (its
    /// disks, cache segments, replica and points stay).
    Disable(cmd::disable::Args),
    /// Present the VM's disks over NBD, journaling every write.
    Serve(cmd::serve::Args),
    /// Drain the VM's journal into compressed segments in the cache store.
    Ship(cmd::ship::Args),
    /// Insert an app-consistent marker: the target takes a named point there.
    Tag(cmd::tag::Args),
    /// At the target site: replay segments onto replicas, take recovery points.
    Apply(cmd::apply::Args),
    /// List a VM's recovery points at the target site.
    Points(cmd::points::Args),
    /// What each protected VM's replication is doing; exit 1 when one
    /// needs attention (warning), 2 when one is not protected (critical).
    Status(cmd::status::Args),
    /// Clone a VM's disks as of a recovery point into their own directory
    /// (`--test`: replication goes on untouched).
    Failover(cmd::failover::Args),
    /// Make a failover final: no other point may be chosen any more.
    Commit(cmd::failover::CommitArgs),
    /// Remove a test failover's directory.
    FailoverCleanup(cmd::failover::CleanupArgs),
    /// After a committed failover: replicate the failed-over VM back towards
    /// the original site, sending only what differs from the old disks.
    Reprotect(cmd::reprotect::ReprotectArgs),
    /// At the original site: return a re-protected VM here and protect it
    /// in the original direction again.
    Failback(cmd::reprotect::FailbackArgs),
    /// Compare source disks with the replica or a point, by block hashes.
    Verify(cmd::verify::Args),
    /// Inspect or check segment files of the cache store offline.
    #[command(subcommand)]
    Segment(cmd::segment::Command),
    /// The whole story in a temporary directory: protect a disk, write
    /// through NBD, and prove the journal rebuilds it.
    Demo(cmd::demo::Args),
    /// Inspect a VM's journal offline (support and testing).
    #[command(subcommand)]
    Journal(cmd::journal::Command),
    /// List the failpoints the crash tests can arm (TERN_FAILPOINTS), and
    /// whether this build has them.
    #[command(hide = true)]
    Failpoints,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => log::LevelFilter::Warn,
        (false, 0) => log::LevelFilter::Info,
        (false, 1) => log::LevelFilter::Debug,
        (false, _) => log::LevelFilter::Trace,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .parse_env("TERN_LOG")
        .format_target(false)
        .format_timestamp_millis()
        .init();
    let result = match &cli.command {
        Command::Enable(a) => cmd::enable::run(&cli, a),
        Command::Disable(a) => cmd::disable::run(&cli, a),
        Command::Serve(a) => cmd::serve::run(&cli, a),
        Command::Journal(c) => cmd::journal::run(&cli, c),
        Command::Ship(a) => cmd::ship::run(&cli, a),
        Command::Segment(c) => cmd::segment::run(&cli, c),
        Command::Tag(a) => cmd::tag::run(&cli, a),
        Command::Apply(a) => cmd::apply::run(&cli, a),
        Command::Points(a) => cmd::points::run(&cli, a),
        Command::Failover(a) => cmd::failover::run(&cli, a),
        Command::FailoverCleanup(a) => cmd::failover::cleanup(&cli, a),
        Command::Commit(a) => cmd::failover::commit(&cli, a),
        Command::Reprotect(a) => cmd::reprotect::reprotect(&cli, a),
        Command::Failback(a) => cmd::reprotect::failback(&cli, a),
        Command::Verify(a) => cmd::verify::run(&cli, a),
        Command::Status(a) => cmd::status::run(&cli, a),
        Command::Demo(a) => cmd::demo::run(&cli, a),
        Command::Failpoints => {
            println!("# failpoints {}", if tern_driver::fail::ENABLED { "compiled in" } else { "not in this build" });
            tern_driver::fail::Failpoint::ALL.iter().for_each(|p| println!("{}", p.name()));
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: what happened, through every cause.
            eprintln!("tern: error: {e:#}");
            if let Some(hint) = hint::for_error(&e) {
                eprintln!("tern: {hint}");
            }
            if let Some(u) = e.downcast_ref::<cmd::status::Unhealthy>() {
                // Monitoring plugins' convention: 1 warning, 2 critical.
                return ExitCode::from(u.health as u8);
            }
            if e.chain().any(|c| c.downcast_ref::<ship::Fenced>().is_some()) {
                // systemd: RestartPreventExitStatus=3, a fenced shipper stays down.
                return ExitCode::from(3);
            }
            ExitCode::FAILURE
        }
    }
}
