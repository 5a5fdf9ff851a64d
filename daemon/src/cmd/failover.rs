//! `tern failover --test` and `tern failover-cleanup`: a VM's disks as of a
//! recovery point, cloned into their own directory with a launch script,
//! while replication goes on untouched.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use tern_driver::clone::{clone_file, CloneMethod};
use tern_driver::vm::{validate_name, VmPaths};
use tern_store::target::{Point, TargetDir};

use crate::Cli;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub vm: String,
    /// A test failover: an isolated copy; replication is not touched.
    #[arg(long)]
    pub test: bool,
    /// The recovery point (an id from `tern points`).
    #[arg(long, conflicts_with = "latest")]
    pub point: Option<String>,
    /// Apply everything already in the cache, take a point there and use
    /// it (the default).
    #[arg(long)]
    pub latest: bool,
    /// Name of the failover directory (default: test-N).
    #[arg(long)]
    pub name: Option<String>,
    /// The target site (default: the one in the VM's vm.toml).
    #[arg(long)]
    pub target: Option<PathBuf>,
    /// The cache store, for --latest (default: the one in vm.toml).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Print the failover's name, directory and disks as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct CleanupArgs {
    pub vm: String,
    /// The failover to remove (its directory name).
    pub name: String,
    #[arg(long)]
    pub target: Option<PathBuf>,
}

/// The target site and cache store: given, or from the VM's vm.toml.
fn sites(cli: &Cli, vm: &str, target: Option<&Path>, cache: Option<&Path>) -> Result<(PathBuf, PathBuf)> {
    validate_name("VM", vm)?;
    let config = || {
        VmPaths::new(&cli.state, vm)?
            .load_config()
            .map_err(|e| anyhow::anyhow!("{e}; on the target site, name the directories with --target (and --cache)"))
    };
    let target = match target {
        Some(t) => t.to_owned(),
        None => config()?.target,
    };
    let cache = match cache {
        Some(c) => c.to_owned(),
        None => config().map(|c| c.cache).unwrap_or_default(),
    };
    Ok((target, cache))
}

/// A test failover made by [`test_failover`].
pub struct TestFailover {
    pub name: String,
    pub dir: PathBuf,
    pub point: Point,
    /// Disk name → the failover's image of it.
    pub disks: Vec<(String, PathBuf)>,
    /// The target could not reflink: the disks are full copies.
    pub copied: bool,
}

pub fn run(cli: &Cli, a: &Args) -> Result<()> {
    if !a.test {
        bail!(
            "a real failover (fencing the source, then commit) is not in this build yet; `tern failover {} --test` gives you the VM's disks at a point without touching replication",
            a.vm
        );
    }
    let (target_root, cache_root) = sites(cli, &a.vm, a.target.as_deref(), a.cache.as_deref())?;
    let started = Instant::now();
    let f = test_failover(&target_root, &cache_root, &a.vm, a.point.as_deref(), a.name.as_deref())?;
    let time = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_nanos(f.point.time_ns));
    if a.json {
        let disks: serde_json::Map<String, serde_json::Value> =
            f.disks.iter().map(|(n, p)| (n.clone(), p.display().to_string().into())).collect();
        let out = serde_json::json!({
            "name": f.name, "directory": f.dir.display().to_string(), "point": f.point.id, "seq": f.point.seq,
            "time": time.to_string(), "test": true, "disks": disks,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "test failover '{}' of VM '{}' from {} point {} (seq {}, {time}) ready in {:.2?}{}: {}",
            f.name,
            a.vm,
            f.point.kind.name(),
            f.point.id,
            f.point.seq,
            started.elapsed(),
            if f.copied { " (copied: the target cannot reflink)" } else { "" },
            f.dir.display()
        );
        println!("start it with {} (no network: isolated from production)", f.dir.join("launch.sh").display());
        println!("remove it with `tern failover-cleanup {} {}`", a.vm, f.name);
    }
    Ok(())
}

/// Clones a point's disks (`point`, or the latest: see `latest_point`) into
/// `<target>/<vm>/failover/<name>/` with a launch script. Replication is
/// not touched.
pub fn test_failover(
    target_root: &Path,
    cache_root: &Path,
    vm: &str,
    point: Option<&str>,
    name: Option<&str>,
) -> Result<TestFailover> {
    let target = TargetDir::new(target_root, vm);
    if point.is_some() && !target.root().is_dir() {
        bail!("{} does not exist: VM '{vm}' has no replica at this target site", target.root().display());
    }
    let point = match point {
        Some(id) => target
            .list_points()?
            .into_iter()
            .find(|p| p.id == id)
            .with_context(|| format!("VM '{vm}' has no point '{id}'; `tern points {vm}` lists them"))?,
        None => latest_point(cache_root, target_root, &target, vm)?,
    };
    let failovers = target.root().join("failover");
    std::fs::create_dir_all(&failovers).with_context(|| format!("cannot create {}", failovers.display()))?;
    let name = match name {
        Some(n) => {
            validate_name("failover", n)?;
            n.to_owned()
        }
        None => (1..).map(|i| format!("test-{i}")).find(|n| !failovers.join(n).exists()).expect("a free name"),
    };
    let dir = failovers.join(&name);
    if dir.exists() {
        bail!("{} exists: pick another --name, or remove it with `tern failover-cleanup {vm} {name}`", dir.display());
    }
    let tmp = failovers.join(format!(".tmp-{name}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut disks = Vec::new();
    let mut copied = false;
    for (disk, file) in &point.disks {
        copied |= clone_file(&target.point_dir(&point.id).join(file), &tmp.join(file))? == CloneMethod::Copy;
        disks.push((disk.clone(), dir.join(file)));
    }
    std::fs::write(tmp.join("launch.sh"), launch_script(vm, &disks))?;
    set_executable(&tmp.join("launch.sh"))?;
    let info = format!(
        "version = 1\nvm = \"{vm}\"\npoint = \"{}\"\nseq = {}\nkind = \"{}\"\ntest = true\n",
        point.id,
        point.seq,
        point.kind.name()
    );
    tern_driver::vm::write_durably(&tmp.join("failover.toml"), info.as_bytes())?;
    std::fs::rename(&tmp, &dir).with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
    tern_driver::vm::sync_dir(&failovers)?;
    Ok(TestFailover { name, dir, point, disks, copied })
}

/// `--latest`: catch up with the cache and point there; if `tern apply`
/// runs (it holds the replicas), its newest point instead.
fn latest_point(cache: &Path, target_root: &Path, target: &TargetDir, vm: &str) -> Result<Point> {
    match crate::apply::catch_up_and_point(cache, target_root, vm) {
        Ok(p) => Ok(p),
        Err(e)
            if e.downcast_ref::<tern_driver::Error>().is_some_and(|e| matches!(e, tern_driver::Error::Busy { .. })) =>
        {
            let newest = target.list_points()?.into_iter().max_by_key(|p| p.seq);
            let p = newest.with_context(|| format!("{e}; and VM '{vm}' has no point yet"))?;
            log::info!("`tern apply` is running for VM '{vm}'; using its newest point {} (seq {})", p.id, p.seq);
            Ok(p)
        }
        Err(e) => Err(e),
    }
}

fn launch_script(vm: &str, disks: &[(String, PathBuf)]) -> String {
    let drives: Vec<String> = disks
        .iter()
        .map(|(_, p)| format!("    -drive file={},format=raw,if=virtio,cache=none \\\n", p.display()))
        .collect();
    format!(
        "#!/bin/sh\n# Test failover of VM '{vm}', made by `tern failover --test`.\n# No network (-nic none): isolated from production. Adjust memory, CPUs and\n# firmware to the VM's own settings.\nexec qemu-system-x86_64 -name {vm}-test -m 2048 -smp 2 \\\n{}    -nic none -display none -serial mon:stdio \"$@\"\n",
        drives.concat()
    )
}

fn set_executable(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

pub fn cleanup(cli: &Cli, a: &CleanupArgs) -> Result<()> {
    let (target_root, _) = sites(cli, &a.vm, a.target.as_deref(), None)?;
    validate_name("failover", &a.name)?;
    let failovers = TargetDir::new(&target_root, &a.vm).root().join("failover");
    let dir = failovers.join(&a.name);
    if !dir.join("failover.toml").is_file() {
        let existing: Vec<String> = std::fs::read_dir(&failovers)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        bail!(
            "VM '{}' has no failover named '{}' in {} (there: {})",
            a.vm,
            a.name,
            failovers.display(),
            if existing.is_empty() { "none".to_string() } else { existing.join(", ") }
        );
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    println!("removed test failover '{}' of VM '{}' ({})", a.name, a.vm, dir.display());
    Ok(())
}
