//! `tern verify`: source disks against the replica (or a point), region by
//! region, by hash ([`crate::verify::compare`]).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tern_driver::units::Size;
use tern_driver::vm::VmPaths;
use tern_store::target::TargetDir;

use super::Cli;
use crate::verify::compare;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub vm: String,
    /// Compare with this recovery point instead of the replica.
    #[arg(long)]
    pub point: Option<String>,
    /// The target site (default: the one in vm.toml).
    #[arg(long)]
    pub target: Option<PathBuf>,
    /// Bytes per compared region.
    #[arg(long, default_value = "64KiB")]
    pub region: Size,
}

pub fn run(cli: &Cli, a: &Args) -> Result<()> {
    let config = VmPaths::new(&cli.state, &a.vm)?.load_config()?;
    let target = TargetDir::new(a.target.as_ref().unwrap_or(&config.target), &a.vm);
    let region = a.region.bytes();
    if !(4096..=64 << 20).contains(&region) || !region.is_power_of_two() {
        bail!("--region must be a power of two between 4KiB and 64MiB");
    }
    let (what, dir) = match &a.point {
        Some(id) => {
            let point = target
                .list_points()?
                .into_iter()
                .find(|p| &p.id == id)
                .with_context(|| format!("VM '{}' has no point '{id}'; `tern points {}` lists them", a.vm, a.vm))?;
            (format!("point {id} (seq {})", point.seq), target.point_dir(id))
        }
        None => ("the replica".to_string(), target.replica_dir()),
    };
    let sources: Vec<(String, PathBuf)> = config.disks.iter().map(|d| (d.name.clone(), d.path.clone())).collect();
    let mut differing = 0u64;
    for (disk, ranges) in compare(&sources, &dir, region).with_context(|| format!("comparing with {what}"))? {
        for (start, end) in &ranges {
            println!("disk {disk}: differs at {start}..{end} ({})", Size(end - start).approx());
            differing += end - start;
        }
        if ranges.is_empty() {
            println!("disk {disk}: identical (regions of {})", Size(region));
        }
    }
    if differing > 0 {
        bail!(
            "VM '{}': {} of the source differ from {what} (a replica behind the source differs until `tern ship` and `tern apply` catch up)",
            a.vm,
            Size(differing).approx()
        );
    }
    println!("VM '{}': source and {what} are identical", a.vm);
    Ok(())
}
