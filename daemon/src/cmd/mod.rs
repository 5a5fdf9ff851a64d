//! The command line: [`Cli`], its global options and subcommands, and
//! one module per subcommand — its arguments, a call into the modules
//! beside `cmd/`, and what it prints.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub mod apply;
pub mod demo;
pub mod disable;
pub mod enable;
pub mod failover;
pub mod group;
pub mod journal;
pub mod points;
pub mod reprotect;
pub mod segment;
pub mod serve;
pub mod ship;
pub mod status;
pub mod tag;
pub mod verify;

/// `--onto NAME=PATH`: a disk copy a replay writes onto.
pub fn parse_onto(s: &str) -> Result<(String, std::path::PathBuf), String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok((name.to_owned(), path.into())),
        _ => Err(format!("{s:?}: expected NAME=PATH, as in disk0=/var/lib/images/vm1.img")),
    }
}

#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// Where to write the key (it must not exist).
    pub file: PathBuf,
}

fn keygen(a: &KeygenArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    tern_store::seal::Key::generate(&a.file).with_context(|| {
        format!("cannot write a new key to {} (it must not exist; its directory must)", a.file.display())
    })?;
    println!(
        "wrote a new key to {}: copy it to the target site over a channel you trust (never through the cache store)",
        a.file.display()
    );
    Ok(())
}

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
    /// The key file (`tern keygen`) segments and manifests are sealed
    /// with: `enable` records it for the VM's shipper; at the target site
    /// `apply`, `failover` and the rest open them with it.
    #[arg(long, global = true, env = "TERN_KEY", conflicts_with = "keys")]
    pub key: Option<PathBuf>,
    /// At the target site: a directory holding each sealed VM's key as
    /// <vm>.key.
    #[arg(long, global = true, env = "TERN_KEYS")]
    pub keys: Option<PathBuf>,
    /// Trust the CA certificates in this PEM file for HTTPS to the object
    /// store, besides the system's.
    #[arg(long, global = true, env = "TERN_CA")]
    pub ca: Option<PathBuf>,
    /// How long a request to an object store without a body (a listing,
    /// a look-up) may take, and the longest a read may receive nothing.
    #[arg(long, global = true, env = "TERN_STORE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub store_timeout: std::time::Duration,
    /// The slowest link to an object store that a transfer is given time
    /// for: a segment of N bytes may take N at this rate, plus
    /// --store-timeout. Set it below the link's speed if it is slower.
    #[arg(long, global = true, env = "TERN_STORE_MIN_RATE", default_value = "32KiB/s")]
    pub store_min_rate: tern_driver::units::Rate,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a new 256-bit sealing key to a file (mode 0600), for `tern
    /// enable --key` at the source and `tern apply --key` at the target.
    Keygen(KeygenArgs),
    /// Protect a VM: record its disks, create its journal and bitmaps, and
    /// mark all allocated data for the initial sync.
    Enable(enable::Args),
    /// Stop protecting a VM here: remove its state and journal ring (its
    /// disks, cache segments, replica and points stay).
    Disable(disable::Args),
    /// Present the VM's disks over NBD, journaling every write.
    Serve(serve::Args),
    /// Drain the VM's journal into compressed segments in the cache store.
    Ship(ship::Args),
    /// Insert an app-consistent marker: the target takes a named point there.
    Tag(tag::Args),
    /// Thaws a guest an app point's freeze may have left frozen (the agent
    /// did not confirm the thaw), through its qemu guest agent.
    Thaw(tag::ThawArgs),
    /// Groups of VMs recovered together, from points cut across all of them.
    Group(group::Args),
    /// At the target site: replay segments onto replicas, take recovery points.
    Apply(apply::Args),
    /// List a VM's recovery points at the target site.
    Points(points::Args),
    /// What each protected VM's replication is doing; exit 1 when one
    /// needs attention (warning), 2 when one is not protected (critical).
    Status(status::Args),
    /// Clone a VM's disks as of a recovery point into their own directory
    /// (`--test`: replication goes on untouched).
    Failover(failover::Args),
    /// Make a failover final: no other point may be chosen any more.
    Commit(failover::CommitArgs),
    /// Remove a test failover's directory.
    FailoverCleanup(failover::CleanupArgs),
    /// After a committed failover: replicate the failed-over VM back towards
    /// the original site, sending only what differs from the old disks.
    Reprotect(reprotect::ReprotectArgs),
    /// At the original site: return a re-protected VM here and protect it
    /// in the original direction again.
    Failback(reprotect::FailbackArgs),
    /// Compare source disks with the replica or a point, by block hashes.
    Verify(verify::Args),
    /// Inspect or check segment files of the cache store offline.
    #[command(subcommand)]
    Segment(segment::Command),
    /// The whole story in a temporary directory: protect a disk, write
    /// through NBD, and prove the journal rebuilds it.
    Demo(demo::Args),
    /// Inspect a VM's journal offline (support and testing).
    #[command(subcommand)]
    Journal(journal::Command),
    /// List the failpoints the crash tests can arm (TERN_FAILPOINTS), and
    /// whether this build has them.
    #[command(hide = true)]
    Failpoints,
}

/// Runs the subcommand `cli` names.
pub fn run(cli: &Cli) -> anyhow::Result<()> {
    if let Some(ca) = &cli.ca {
        tern_store::object::set_ca_file(ca);
    }
    let timeouts = tern_store::object::Timeouts { request: cli.store_timeout, min_rate: cli.store_min_rate };
    timeouts.check().map_err(|e| anyhow::anyhow!("--store-timeout / --store-min-rate: {e}"))?;
    tern_store::object::set_timeouts(timeouts);
    crate::cache::set_keys(match (&cli.key, &cli.keys) {
        (Some(file), _) => crate::cache::Keys::File(file.clone()),
        (None, Some(dir)) => crate::cache::Keys::Dir(dir.clone()),
        (None, None) => crate::cache::Keys::None,
    });
    match &cli.command {
        Command::Keygen(a) => keygen(a),
        Command::Enable(a) => enable::run(cli, a),
        Command::Disable(a) => disable::run(cli, a),
        Command::Serve(a) => serve::run(cli, a),
        Command::Journal(c) => journal::run(cli, c),
        Command::Ship(a) => ship::run(cli, a),
        Command::Segment(c) => segment::run(cli, c),
        Command::Tag(a) => tag::run(cli, a),
        Command::Thaw(a) => tag::thaw(cli, a),
        Command::Group(a) => group::run(cli, a),
        Command::Apply(a) => apply::run(cli, a),
        Command::Points(a) => points::run(cli, a),
        Command::Failover(a) => failover::run(cli, a),
        Command::FailoverCleanup(a) => failover::cleanup(cli, a),
        Command::Commit(a) => failover::commit(cli, a),
        Command::Reprotect(a) => reprotect::reprotect(cli, a),
        Command::Failback(a) => reprotect::failback(cli, a),
        Command::Verify(a) => verify::run(cli, a),
        Command::Status(a) => status::run(cli, a),
        Command::Demo(a) => demo::run(cli, a),
        Command::Failpoints => {
            println!("# failpoints {}", if tern_driver::fail::ENABLED { "compiled in" } else { "not in this build" });
            tern_driver::fail::Failpoint::ALL.iter().for_each(|p| println!("{}", p.name()));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_limits_default_to_the_stores_own() {
        let cli = Cli::try_parse_from(["tern", "failpoints"]).expect("parses");
        let timeouts = tern_store::object::Timeouts { request: cli.store_timeout, min_rate: cli.store_min_rate };
        assert_eq!(timeouts, tern_store::object::Timeouts::default());
    }
}
