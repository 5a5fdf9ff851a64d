//! `tern verify`: source disks against the replica (or a point), region by
//! region, by hash.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tern_driver::image::Image;
use tern_driver::units::Size;
use tern_driver::vm::VmPaths;
use tern_store::hashes::region_hashes;
use tern_store::target::TargetDir;

use crate::Cli;

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

/// A disk's name and its differing byte ranges `[start, end)`, merged.
pub type DiskDifferences = (String, Vec<(u64, u64)>);

/// Compares each source disk with `<dir>/<disk>.img`, region by region, by
/// XXH3-128.
pub fn compare(sources: &[(String, PathBuf)], dir: &Path, region: u64) -> Result<Vec<DiskDifferences>> {
    let mut out = Vec::new();
    for (name, path) in sources {
        let source = Image::open_read_only(path)?;
        let copy_path = dir.join(format!("{name}.img"));
        let copy = Image::open_read_only(&copy_path)?;
        if copy.size() != source.size() {
            bail!("disk '{name}': {} is {} bytes, the source {}", copy_path.display(), copy.size(), source.size());
        }
        let (a, b) = (region_hashes(&source, region)?, region_hashes(&copy, region)?);
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (i, _) in a.iter().zip(&b).enumerate().filter(|(_, (x, y))| x != y) {
            let (start, end) = (i as u64 * region, ((i as u64 + 1) * region).min(source.size()));
            match ranges.last_mut() {
                Some(r) if r.1 == start => r.1 = end,
                _ => ranges.push((start, end)),
            }
        }
        out.push((name.clone(), ranges));
    }
    Ok(out)
}
