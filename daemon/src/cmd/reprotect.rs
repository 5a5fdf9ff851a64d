//! `tern reprotect` and `tern failback`: their arguments and what they
//! print; the work is [`crate::reprotect`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;
use tern_driver::units::Size;
use tern_driver::vm::{InitialSync, VmConfig, VmPaths};

use super::Cli;
use crate::reprotect::{Failback, FailedBack, Reprotect};

#[derive(Debug, clap::Args)]
pub struct ReprotectArgs {
    /// The failed-over VM (failover committed with `tern commit`).
    pub vm: String,
    /// The cache store the new direction ships to.
    #[arg(long)]
    pub cache: PathBuf,
    /// The target site the new direction replicates to: usually the
    /// original site, where the old source disks are.
    #[arg(long)]
    pub target: PathBuf,
    /// The target site the VM failed over at (its disks are in
    /// `<from-target>/<vm>/failover/active/`).
    #[arg(long)]
    pub from_target: PathBuf,
    /// The cache store of the direction that failed over (its fence and
    /// manifest).
    #[arg(long)]
    pub from_cache: PathBuf,
    /// The old version of a disk at the new target site, to seed its
    /// replica from (NAME=PATH; default: the old source image recorded in
    /// the failed-over direction's manifest).
    #[arg(long = "seed", value_name = "NAME=PATH", value_parser = crate::cmd::parse_onto)]
    pub seeds: Vec<(String, PathBuf)>,
    /// No seeds: the new replicas start empty and everything is sent.
    #[arg(long, conflicts_with = "seeds")]
    pub no_seed: bool,
    /// Size of the new direction's journal ring (default: the failed-over
    /// direction's, from its manifest; 1GiB if it does not say).
    #[arg(long)]
    pub journal_size: Option<Size>,
    /// Bytes of disk one dirty-bitmap bit (and one compared hash) stands
    /// for: the granularity of what the first sync re-sends. Smaller finds
    /// small scattered changes more exactly, for a larger hash exchange
    /// (16 bytes per region).
    #[arg(long, default_value = "64KiB")]
    pub region_size: Size,
    /// Time between crash-consistent points (default: the old direction's).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub interval: Option<Duration>,
    /// How long points are kept (default: the old direction's).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub retention: Option<Duration>,
}

/// `tern reprotect`: protect the failed-over VM (its disks in
/// `failover/active/`) towards `--target`, seeding the replicas there from
/// the old source images.
pub fn reprotect(cli: &Cli, a: &ReprotectArgs) -> Result<()> {
    let (config, initial) = crate::reprotect::reprotect(
        &cli.state,
        &Reprotect {
            vm: &a.vm,
            cache: &a.cache,
            target: &a.target,
            from_target: &a.from_target,
            from_cache: &a.from_cache,
            seeds: &a.seeds,
            no_seed: a.no_seed,
            journal_size: a.journal_size,
            region_size: a.region_size,
            interval: a.interval,
            retention: a.retention,
        },
    )?;
    report_enabled(cli, &config, &initial);
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct FailbackArgs {
    /// The VM, as enabled at this (its original) site.
    pub vm: String,
    /// The cache store the re-protected direction ships to (the
    /// re-protect's --cache).
    #[arg(long)]
    pub cache: PathBuf,
    /// The target site here that the re-protected direction replicates to
    /// (the re-protect's --target).
    #[arg(long)]
    pub target: PathBuf,
    /// Return to this point (default: apply everything in the cache and
    /// take a point there).
    #[arg(long)]
    pub point: Option<String>,
    /// Fail back even though the VM at the failover site has not recorded
    /// a clean stop with everything shipped: any write it made after what
    /// the cache holds is lost.
    #[arg(long)]
    pub force: bool,
    /// Fail back even though this site's disks changed after the failover
    /// point (a split brain: the VM ran here too): those writes, which the
    /// failback reports, are lost.
    #[arg(long)]
    pub discard_source_changes: bool,
}

/// `tern failback`, at the original site: fail the re-protected VM over
/// back here (fencing the failover site), put the point's disks where the
/// VM's own disks are, and protect it again in the original direction,
/// seeding the replica there from the disks it ran on.
pub fn failback(cli: &Cli, a: &FailbackArgs) -> Result<()> {
    let started = Instant::now();
    let request = Failback {
        vm: &a.vm,
        cache: &a.cache,
        target: &a.target,
        point: a.point.as_deref(),
        force: a.force,
        discard_source_changes: a.discard_source_changes,
    };
    match crate::reprotect::failback(&cli.state, &request)? {
        FailedBack::CleanupFinished { point } => println!(
            "VM '{}' already failed back to point {point}; finished the clean-up an interrupted run left",
            a.vm
        ),
        FailedBack::Done { point, config, initial } => {
            println!(
                "VM '{}' failed back to point {} (seq {}) in {:.2?}: its disks at this site hold that point",
                a.vm,
                point.id,
                point.seq,
                started.elapsed()
            );
            report_enabled(cli, &config, &initial);
            println!(
                "at the failover site: stop the VM and its `tern serve`/`tern ship` (they are fenced) and remove its state there"
            );
        }
    }
    Ok(())
}

fn report_enabled(cli: &Cli, config: &VmConfig, initial: &InitialSync) {
    let how = match initial {
        InitialSync::Compare { seeds } => format!(
            "the replicas at {} start from {} and only the regions that differ are sent",
            config.target.display(),
            seeds.values().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ),
        InitialSync::Allocated => "the replicas start empty: all allocated data is sent".to_string(),
    };
    println!("VM '{}' protected towards {} (id {}): {how}", config.name, config.target.display(), config.id);
    let socket = VmPaths::new(&cli.state, &config.name).map(|p| p.nbd_socket()).unwrap_or_default();
    // Pasted as shown, a command without this site's --state would act on
    // the VM of the default state directory.
    let tern = if cli.state == Path::new(super::DEFAULT_STATE) {
        "tern".to_string()
    } else {
        format!("tern --state {}", cli.state.display())
    };
    println!(
        "next: `{tern} serve {0}` and start the VM on {1}; `{tern} ship {0}`; at the target site, `tern apply --cache {2} --target {3}`",
        config.name,
        socket.display(),
        config.cache.display(),
        config.target.display()
    );
}
