//! `tern disable`: stop protecting a VM at this site. What replication
//! built elsewhere (the cache store's segments, the replica and its points
//! at the target) is kept: a recovery point is still worth having after
//! protection stops, and removing it is a decision of its own.

use anyhow::{bail, Context, Result};
use tern_driver::bitmap::DirtyBitmap;
use tern_driver::units::Size;
use tern_driver::vm::VmPaths;

use super::Cli;
use crate::status::{dirty_bytes, vm_status, Shipper};

#[derive(Debug, clap::Args)]
pub struct Args {
    pub vm: String,
    /// Disable even though writes are journaled and not shipped, or marked
    /// for a resync: the replica never gets them.
    #[arg(long)]
    pub force: bool,
}

/// Refuses while `tern serve` or `tern ship` has the VM, and (without
/// `--force`) while the replica lacks writes; then removes the journal's
/// ring from memory and the VM's state directory. The source images are
/// never touched.
pub fn run(cli: &Cli, a: &Args) -> Result<()> {
    let paths = VmPaths::new(&cli.state, &a.vm)?;
    let config = paths.load_config()?;
    let what = format!("VM '{}'", a.vm);
    // Held until the state is gone, so neither can start in between.
    let _frontend = tern_driver::fs::lock_exclusive(&paths.frontend_lock(), &what, "`tern serve`")
        .with_context(|| format!("stop `tern serve` for {what} (and the VM using its disks) before disabling it"))?;
    let _consumer = tern_driver::fs::lock_exclusive(&paths.consumer_lock(), &what, "`tern ship`")
        .with_context(|| format!("stop `tern ship` for {what} before disabling it"))?;
    let status = vm_status(&paths, &config, Shipper::FromFiles)?;
    // Not `status.dirty_bytes`: status skips a bitmap it cannot read, which
    // here would hide dirty data.
    let mut bitmaps = Vec::new();
    for d in &config.disks {
        match DirtyBitmap::open(&paths.dirty(&d.name), d.size) {
            Ok(b) => bitmaps.push(b),
            Err(e) if a.force => log::warn!("{what}: disk '{}': {}", d.name, e.with_causes()),
            Err(e) => bail!(
                "cannot tell what disk '{}' of {what} still has to resync: {}; pass --force to disable anyway",
                d.name,
                e.with_causes()
            ),
        }
    }
    let dirty = dirty_bytes(&bitmaps);
    let unreplicated = status.pending_bytes + dirty;
    if unreplicated > 0 && !a.force {
        bail!(
            "{what} has {} journaled and not shipped and {} marked for resync: its replica lacks them. \
             Run `tern ship {} --once` (and `tern apply` at the target) first, or pass --force to drop them",
            Size(status.pending_bytes).approx(),
            Size(dirty).approx(),
            a.vm
        );
    }
    // One rename takes the VM away at once: no command finds it after
    // that, and what is left of a removal that fails half-way is a hidden
    // directory no command takes for a VM. Then the journal is retired
    // (its ring is memory, outside the directory), under the journal's
    // lock, so a `tern status` opening it this moment cannot restore the
    // ring behind us.
    let tombstone = cli.state.join(format!(".{}.disabled-{}", a.vm, std::process::id()));
    std::fs::rename(paths.dir(), &tombstone)
        .with_context(|| format!("cannot move {} out of the way", paths.dir().display()))?;
    let cleaned = (|| -> Result<()> {
        tern_driver::fs::sync_parent_dir(paths.dir())?;
        tern_driver::journal::live::retire(&paths.moved_to(&tombstone).journal())?;
        std::fs::remove_dir_all(&tombstone).with_context(|| format!("cannot remove {}", tombstone.display()))
    })();
    if let Err(e) = cleaned {
        bail!(
            "{what} is disabled (its state was moved to {}), but cleaning up failed: {e:#}. If its journal.ring link is still there, remove the file it links to (the journal ring, in memory); then remove that directory",
            tombstone.display()
        );
    }
    if unreplicated > 0 {
        log::warn!("{what}: dropped {} the replica never got", Size(unreplicated).approx());
    }
    println!(
        "disabled {what}: removed {} and its journal ring; its disks are untouched. Kept: segments in {}, the replica and {} point(s) in {} (remove them there when no longer needed)",
        paths.dir().display(),
        config.cache.join(&a.vm).display(),
        status.points,
        config.target.join(&a.vm).display(),
    );
    Ok(())
}
