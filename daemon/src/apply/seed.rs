//! A new stream's first steps at the target: the previous stream's
//! replicas and points retired to `history/<old-id>/` (nothing is lost),
//! and each replica seeded from the version of the disk already there (a
//! re-protect's old source image, a failback's failed-over disk) before
//! the checksum resync sends only what differs.

use super::*;

/// Moves a previous stream's replicas and points to `history/<old-id>/`
/// (renames: instant, and nothing is lost), so a new stream can start in
/// the VM's directory.
pub(super) fn retire_previous_stream(target: &TargetDir, old_id: &uuid::Uuid) -> Result<()> {
    let history = target.history_dir(old_id);
    tern_driver::fs::create_dir_durably(&history)?;
    // The replicas last: their checkpoint is what makes the next start
    // retire again, so a crash half-way through is finished then (a
    // directory already in history/ was moved before the crash).
    for (dir, name) in [(target.points_dir(), "points"), (target.replica_dir(), "replica")] {
        let to = history.join(name);
        if dir.exists() && !to.exists() {
            std::fs::rename(&dir, &to).with_context(|| format!("cannot move {} to {}", dir.display(), to.display()))?;
        }
        tern_driver::fs::create_dir_durably(&dir)?;
        tern_driver::clone::prefer_in_place_writes(&dir)?;
    }
    tern_driver::fs::sync_dir(target.root())?;
    log::warn!(
        "{}: a new replication stream starts here; the previous one's replicas and points were moved to {} (remove it when no longer needed)",
        target.root().display(),
        history.display()
    );
    Ok(())
}

/// After a failback, the new stream's replicas here were seeded from the
/// disks the VM ran on at this site (`failover/active/`): once every
/// replica exists, that directory is the old failover's, and moves to
/// `history/seeded-<stream id>/failover-active` (a rename: nothing is
/// lost; the operator removes history when done with it). Left where it is
/// while a process (a VM) still holds one of its disks.
pub(super) fn retire_seeding_failover(target: &TargetDir, manifest: &Manifest) -> Result<()> {
    let active = target.root().join("failover").join("active");
    let seeds_there = !manifest.disks.is_empty()
        && manifest.disks.iter().all(|d| d.seed.as_ref().is_some_and(|s| target.seed_path(s).starts_with(&active)));
    if !seeds_there || !active.is_dir() {
        return Ok(());
    }
    if manifest.disks.iter().any(|d| !target.replica_path(&d.name).exists()) {
        return Ok(());
    }
    if let Some((disk, holders)) = tern_driver::image_lock::first_in_use(&active) {
        log::warn!(
            "VM '{}': {} seeded the replicas but {} is still in use by {}: left in place; move it aside by hand once that VM is shut down",
            manifest.name,
            active.display(),
            disk.display(),
            tern_driver::image_lock::describe(&holders)
        );
        return Ok(());
    }
    let to = target.root().join("history").join(format!("seeded-{}", manifest.id));
    tern_driver::fs::create_dir_durably(&to)?;
    let to = to.join("failover-active");
    std::fs::rename(&active, &to).with_context(|| format!("cannot move {} to {}", active.display(), to.display()))?;
    tern_driver::fs::sync_dir(&target.root().join("failover"))?;
    log::info!(
        "VM '{}': the failed-back failover's disks in {} seeded the replicas; moved them to {} (remove it when no longer needed)",
        manifest.name,
        active.display(),
        to.display()
    );
    Ok(())
}

/// Starts a replica as a clone of `seed` (a re-protected stream: the old
/// version of the disk), published by rename only when complete.
pub(super) fn seed_replica(target: &TargetDir, disk: &str, seed: &Path, replica: &Path, size: u64) -> Result<()> {
    let seed_size = std::fs::metadata(seed)
        .with_context(|| {
            format!(
                "disk '{disk}': the replica's seed {} cannot be read at this target site ({}); make the disk's copy available at that path (the --seed of `tern enable` or `tern reprotect` named it), or protect the VM again without one (a full initial sync)",
                seed.display(),
                target.root().display()
            )
        })?
        .len();
    if seed_size != size {
        bail!("disk '{disk}': the seed {} is {seed_size} bytes, the disk {size}", seed.display());
    }
    let tmp = replica.with_extension("img.seeding");
    let _ = std::fs::remove_file(&tmp);
    let method = clone_file(seed, &tmp)?;
    std::fs::rename(&tmp, replica)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), replica.display()))?;
    if let Some(parent) = replica.parent() {
        tern_driver::fs::sync_dir(parent)?;
    }
    log::info!(
        "disk '{disk}': replica {} seeded from {} ({}); a checksum comparison decides what is sent",
        replica.display(),
        seed.display(),
        if method == CloneMethod::Reflink { "reflink" } else { "copy" }
    );
    Ok(())
}
