//! Re-protect and failback: after a failover, replicate the VM back the
//! other way, and later return it to its original site.
//!
//! Both start a new replication stream (a new VM id) whose replica at the
//! far site is *seeded* with the version of the disks already there — the
//! old source images for a re-protect, the disks the VM ran on at the
//! failover site for a failback — and whose first step is the checksum
//! comparison a host crash uses: the target hashes its seeded replica, the
//! source re-sends only the regions that differ. One mechanism (resync)
//! again, so "only the changed blocks travel" is the same code as every
//! other catch-up. `tern reprotect` and `tern failback` drive it
//! (`crate::cmd::reprotect`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tern_driver::clone::clone_file;
use tern_driver::fail::{self, Failpoint};
use tern_driver::units::Size;
use tern_driver::vm::{self, EnableSpec, InitialSync, JournalConfig, Policy, VmConfig, VmPaths};
use tern_store::cache::{
    CacheDir, Manifest, APPLIED, APPLY_FAILURE, FENCE, MANIFEST, PLANNED_FAILOVER, SEGMENTS, SOURCE_STOPPED,
};
use tern_store::file::FileError;
use tern_store::object::Store;
use tern_store::target::{Point, TargetDir};

use crate::failover::{choose_point, write_fence, Choice, Fencer};

/// A re-protect: the failed-over VM (its disks in
/// `<from_target>/<vm>/failover/active/`, its fence and manifest in
/// `from_cache`) protected towards `target` through `cache`.
pub struct Reprotect<'a> {
    pub vm: &'a str,
    pub cache: &'a Path,
    pub target: &'a Path,
    pub from_target: &'a Path,
    pub from_cache: &'a Path,
    /// Seeds named by hand (disk name, old version of it at the target).
    pub seeds: &'a [(String, PathBuf)],
    /// No seeds at all: everything is sent.
    pub no_seed: bool,
    pub journal_size: Option<Size>,
    pub region_size: Size,
    pub interval: Option<Duration>,
    pub retention: Option<Duration>,
}

/// A failback, at the original site, from the re-protected direction's
/// `cache` and the `target` here it replicates to.
pub struct Failback<'a> {
    pub vm: &'a str,
    pub cache: &'a Path,
    pub target: &'a Path,
    /// The point to return to (default: everything in the cache applied).
    pub point: Option<&'a str>,
    pub force: bool,
    pub discard_source_changes: bool,
}

/// What a failback did.
pub enum FailedBack {
    /// The VM had failed back already; an interrupted run's clean-up was
    /// finished.
    CleanupFinished { point: String },
    /// The VM's disks here hold `point`, and it is protected again in the
    /// original direction (`config`), its replica seeded as `initial` says.
    Done { point: Box<Point>, config: Box<VmConfig>, initial: InitialSync },
}

/// Protects the failed-over VM towards `a.target`, seeding the replicas
/// there from the old source images. Returns the new direction's config
/// and how its initial sync goes.
pub fn reprotect(state: &Path, a: &Reprotect<'_>) -> Result<(VmConfig, InitialSync)> {
    vm::validate_name("VM", a.vm)?;
    let from_cache = crate::cache::for_vm(&crate::cache::open_store(a.from_cache)?, a.vm)?;
    let fence = from_cache.read_fence()?.with_context(|| {
        format!(
            "VM '{}' has not failed over (no {}): `tern failover {}` and `tern commit {}` come before a re-protect",
            a.vm,
            from_cache.location(FENCE),
            a.vm,
            a.vm
        )
    })?;
    if !fence.committed {
        bail!(
            "VM '{}' failed over to point {} but that is not committed: check the VM, run `tern commit {}`, then re-protect",
            a.vm,
            fence.point,
            a.vm
        );
    }
    let manifest = read_manifest(&from_cache, a.vm)?;
    let active = TargetDir::new(a.from_target, a.vm).root().join("failover").join("active");
    refuse_running_qemu(&active, a.vm)?;
    let mut disks = Vec::new();
    for d in &manifest.disks {
        let path = active.join(format!("{}.img", d.name));
        if !path.is_file() {
            bail!(
                "disk '{}' of the failed-over VM is not at {} (is --from-target the site it failed over at?)",
                d.name,
                path.display()
            );
        }
        disks.push((d.name.clone(), path));
    }
    let mut seeds = BTreeMap::new();
    if !a.no_seed {
        for d in &manifest.disks {
            if let Some(source) = &d.source {
                seeds.insert(d.name.clone(), source.clone());
            }
        }
        for (name, path) in a.seeds {
            if !manifest.disks.iter().any(|d| &d.name == name) {
                bail!("--seed {name}={}: VM '{}' has no disk '{name}'", path.display(), a.vm);
            }
            seeds.insert(name.clone(), path.clone());
        }
    }
    // The reverse direction's source bridges are those the VM runs on
    // here; its map leads back to the original ones.
    let (launch, network) = manifest.launch.clone().unwrap_or_default().reversed(&manifest.policy.network);
    let policy = Policy {
        interval: a.interval.unwrap_or(manifest.policy.interval),
        retention: a.retention.unwrap_or(manifest.policy.retention),
        network,
        ..manifest.policy.clone()
    };
    let spec = EnableSpec {
        name: a.vm.to_owned(),
        disks,
        cache: a.cache.to_owned(),
        key: crate::cache::key_file_for(a.vm),
        target: a.target.to_owned(),
        journal: JournalConfig {
            size: a.journal_size.or(manifest.journal_size.map(Size)).unwrap_or(Size::gib(1)),
            region_size: a.region_size,
        },
        policy,
        // The agent's socket is the other site's: freezes are set up here
        // anew (`[app-points]` in the new vm.toml).
        app_points: Default::default(),
        launch,
        initial_sync: initial_sync(seeds),
    };
    fail::hit(Failpoint::ReprotectEnable)?;
    let enabled = vm::enable(state, &spec).with_context(|| {
        format!("cannot re-protect VM '{}' (at the failed-over site, use a --state of its own)", a.vm)
    })?;
    Ok((enabled.config, spec.initial_sync))
}

/// Fails the re-protected VM over back here (fencing the failover site),
/// puts the point's disks where the VM's own disks are, and protects it
/// again in the original direction, seeding the replica there from the
/// disks it ran on.
pub fn failback(state: &Path, a: &Failback<'_>) -> Result<FailedBack> {
    let paths = VmPaths::new(state, a.vm)?;
    restore_interrupted_failback(state, a.vm, paths.dir())?;
    let config = paths.load_config()?;
    // Nothing may serve or ship the old disks while they are replaced.
    let _frontend = tern_driver::fs::lock_exclusive(&paths.frontend_lock(), &format!("VM '{}'", a.vm), "a front-end")
        .context("stop `tern serve` (and the VM) for this VM before failing back")?;
    let _consumer =
        tern_driver::fs::lock_exclusive(&paths.consumer_lock(), &format!("VM '{}'", a.vm), "a journal consumer")
            .context("stop `tern ship` for this VM before failing back")?;
    let reverse_store = crate::cache::open_store(a.cache)?;
    let reverse = crate::cache::for_vm(&reverse_store, a.vm)?;
    let manifest = read_manifest(&reverse, a.vm)?;
    for d in &config.disks {
        match manifest.disks.iter().find(|m| m.name == d.name) {
            Some(m) if m.size == d.size => {}
            _ => bail!(
                "{} does not hold disk '{}' of {} bytes: is --cache the re-protected direction of this VM?",
                reverse.location(MANIFEST),
                d.name,
                d.size
            ),
        }
        let meta = std::fs::metadata(&d.path).with_context(|| format!("cannot read {}", d.path.display()))?;
        if !meta.is_file() {
            bail!(
                "disk '{}' is {}, not an image file: failback writes image files only; copy the point onto the device yourself",
                d.name,
                d.path.display()
            );
        }
    }
    // The point: a failback that stopped half-way uses the point it fenced.
    let previous = reverse.read_fence()?;
    if let Some(f) = previous.as_ref().filter(|f| !f.by_failback) {
        // `tern failover` of the re-protected direction: the VM runs from
        // that failover's disks. Resuming from its fence would skip the
        // checks below and replace this site's disks with a point of that
        // direction, losing both the failover's writes and this site's.
        bail!(
            "VM '{}' failed over in the re-protected direction: `tern failover` fenced {} at point {} ({}), and its disks are in {}; a failback does not undo a failover. Carry on from that failover instead: {}",
            a.vm,
            reverse.location(FENCE),
            f.point,
            if f.committed { "committed" } else { "not committed" },
            TargetDir::new(a.target, a.vm).root().join("failover").join("active").display(),
            if f.committed { "`tern reprotect` replicates it back" } else { "`tern commit`, then `tern reprotect` to replicate it back" }
        );
    }
    if let Some(f) = &previous {
        // A finished failback enabled the VM afresh after fencing: running
        // it again would overwrite the disks, and every write since, with
        // the old point.
        let enabled_ms = std::fs::metadata(paths.config())
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        if enabled_ms > f.failed_over_unix_ms {
            if finish_failback_cleanup(state, &config.cache, a.vm, &config.id)? {
                return Ok(FailedBack::CleanupFinished { point: f.point.clone() });
            }
            bail!(
                "VM '{}' already failed back to point {} ({} was written after {}): its disks here hold that point and the original direction is protected again; nothing to do",
                a.vm,
                f.point,
                paths.config().display(),
                reverse.location(FENCE)
            );
        }
    }
    if previous.is_none() {
        // A failback's own fence means an earlier run made these checks.
        // The fence drops whatever the failover site ships after it.
        check_source_stopped(&reverse, &manifest, a.vm, a.force)?;
        // And the disks here are replaced: what this site wrote after it
        // failed over is lost.
        check_split_brain(&paths, &config, a.discard_source_changes)?;
    }
    let target = TargetDir::new(a.target, a.vm);
    let choice = match (&previous, a.point) {
        (Some(f), None) => Choice::Point(f.point.clone()),
        (_, Some(id)) => Choice::Point(id.to_owned()),
        (_, None) => Choice::Latest,
    };
    let point = choose_point(&target, &reverse_store, a.target, a.vm, &choice)?;
    write_fence(&reverse, &manifest, previous.as_ref(), &point, Fencer::Failback)?;
    log::info!("VM '{}': the failover site is fenced at point {} (seq {})", a.vm, point.id, point.seq);
    // Until the old direction's stream is retired below, its fence keeps
    // `tern serve` from this state; after, this marker does. A rerun skips
    // the split-brain check because of the fence above: nothing may write
    // these disks between the two runs.
    let marker = format!(
        "`tern failback {} --cache {} --target {}` puts point {} on the disks of this state and retires it\n",
        a.vm,
        a.cache.display(),
        a.target.display(),
        point.id
    );
    tern_driver::fs::write_durably(&paths.failing_back(), marker.as_bytes())?;
    restore_disks(&config, &target, &point)?;
    fail::hit(Failpoint::FailbackDisksRestored)?;
    // A new stream in the original direction. Its replica there starts as
    // the disks the VM ran on at the failover site.
    let seeds: BTreeMap<String, PathBuf> = config
        .disks
        .iter()
        .map(|d| (d.name.clone(), Path::new("failover/active").join(format!("{}.img", d.name))))
        .collect();
    let spec = EnableSpec {
        name: a.vm.to_owned(),
        disks: config.disks.iter().map(|d| (d.name.clone(), d.path.clone())).collect(),
        cache: config.cache.clone(),
        key: config.key.clone(),
        target: config.target.clone(),
        journal: config.journal.clone(),
        policy: config.policy.clone(),
        app_points: config.app_points.clone(),
        launch: config.launch.clone(),
        initial_sync: initial_sync(seeds),
    };
    // The old direction's stream in the cache ended with the failover (its
    // fence would stop the new one, which ships to the same place): retired
    // before the new direction exists.
    fail::hit(Failpoint::FailbackCacheRetire)?;
    retire_cache_dir(&crate::cache::open_store(&config.cache)?, a.vm, &config.id)?;
    fail::hit(Failpoint::FailbackCacheRetired)?;
    let retired = state.join(format!(".{}.failed-back-{}", a.vm, config.id));
    std::fs::rename(paths.dir(), &retired).with_context(|| format!("cannot move {} aside", paths.dir().display()))?;
    tern_driver::fs::sync_dir(state)?;
    fail::hit(Failpoint::FailbackStateMoved)?;
    let enabled = match vm::enable(state, &spec) {
        Ok(e) => e,
        Err(e) => {
            let _ = std::fs::rename(&retired, paths.dir());
            return Err(anyhow::Error::new(e).context(format!("cannot protect VM '{}' again", a.vm)));
        }
    };
    fail::hit(Failpoint::FailbackEnabled)?;
    finish_failback_cleanup(state, &config.cache, a.vm, &enabled.config.id)?;
    Ok(FailedBack::Done { point: Box::new(point), config: Box::new(enabled.config), initial: spec.initial_sync })
}

/// Requires that the VM at the failover site stopped cleanly and shipped
/// everything (its `tern ship` says so in `source-stopped.toml`), unless
/// `force`: the fence drops whatever it ships later.
fn check_source_stopped(cache: &CacheDir, manifest: &Manifest, vm: &str, force: bool) -> Result<()> {
    let newest = match cache.newest_segment(Some(*manifest.id.as_bytes()))? {
        Some(h) => h?.last_seq,
        None => manifest.epoch().first_seq.saturating_sub(1),
    };
    let path = cache.location(SOURCE_STOPPED);
    let why = match cache.read_source_stopped() {
        Ok(Some(s)) if s.vm_id == manifest.id && s.seq >= newest => return Ok(()),
        Ok(Some(s)) if s.vm_id == manifest.id => format!(
            "it recorded a clean stop at seq {}, but the cache holds records up to seq {newest} shipped since: it runs again",
            s.seq
        ),
        Ok(Some(s)) => format!("{path} belongs to another stream (id {})", s.vm_id),
        Err(e @ FileError::Damaged { .. }) => e.to_string(),
        Err(e) => return Err(e.into()),
        Ok(None) => format!("it has recorded no clean stop in {path} (the cache holds records up to seq {newest})"),
    };
    if force {
        log::warn!(
            "VM '{vm}': --force: failing back to what the cache holds although {why}; any write made at the failover site after seq {newest} is lost"
        );
        return Ok(());
    }
    bail!(
        "VM '{vm}' may still run at the failover site: {why}. Shut the VM down there and stop its `tern serve`, let its `tern ship` finish (it then records the clean stop), and fail back again; or fail back with --force to what the cache holds, losing any later write there"
    )
}

/// What this site wrote after the failover point.
#[derive(Default)]
struct SourceChanges {
    /// Regions of each disk, merged: records after the fence's sequence
    /// number the old direction shipped to its cache (never applied),
    /// records still in the journal, and regions marked dirty (written,
    /// never shipped).
    regions: BTreeMap<String, Vec<(u64, u64)>>,
    /// Sequence numbers after the fence's (first, last, inclusive) whose
    /// records are in no segment any more: the applier at the failover site
    /// applied them before the failover and removed their segments, so
    /// which regions they changed cannot be told here.
    unknown: Vec<(u64, u64)>,
}

/// What this site wrote after it failed over (see [`SourceChanges`]).
fn source_changes_since_failover(paths: &VmPaths, config: &VmConfig) -> Result<SourceChanges> {
    let cache = crate::cache::for_source(config)?;
    let Some(fence) = cache.read_fence()? else {
        return Ok(SourceChanges::default()); // never failed over from here
    };
    let mut changed: Vec<Vec<(u64, u64)>> = vec![Vec::new(); config.disks.len()];
    let mut note = |h: &tern_driver::journal::RecordHeader| {
        if h.seq > fence.seq && h.kind.changes_disk() && (h.disk as usize) < changed.len() {
            changed[h.disk as usize].push((h.offset, h.length as u64));
        }
    };
    let mut segments = cache.list_segments()?;
    segments.retain(|l| l.last_seq > fence.seq);
    segments.sort_unstable_by_key(|l| l.first_seq);
    // Every record after the fence's seq up to the newest shipped must be
    // in a segment still: `tern apply` removes the segments it applied
    // (all but the newest), and it may have applied past the point failed
    // over to. No gap is let pass, not even at an epoch's start: the
    // records lost there were written here after the point too, and only
    // the resync records the epoch's comparison sent would say where.
    let mut unknown = Vec::new();
    let mut expected = fence.seq + 1;
    for l in &segments {
        if l.first_seq > expected {
            unknown.push((expected, l.first_seq - 1));
        }
        expected = expected.max(l.last_seq + 1);
        let segment = cache
            .read_segment(l.first_seq, l.last_seq, Some(*config.id.as_bytes()))
            .with_context(|| format!("cannot read {} for what this site wrote after the failover", l.location))?;
        segment.records().for_each(|(h, _)| note(h));
    }
    let journal = paths.open_journal()?;
    let mut cursor = journal.cursor(journal.tail());
    let mut data = Vec::new();
    while let Some(h) = cursor.next(&mut data).map_err(|e| {
        anyhow::anyhow!("cannot read {} for what this site wrote after the failover: {e}", journal.path().display())
    })? {
        note(&h);
    }
    for (i, d) in config.disks.iter().enumerate() {
        changed[i].extend(tern_driver::bitmap::DirtyBitmap::open(&paths.dirty(&d.name), d.size)?.dirty_ranges());
    }
    let regions = config.disks.iter().zip(changed).map(|(d, ranges)| (d.name.clone(), merge_ranges(ranges))).collect();
    Ok(SourceChanges { regions, unknown })
}

/// Sorted, overlapping and touching ranges joined.
fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|r| r.1 > 0);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (off, len) in ranges {
        match out.last_mut() {
            Some(last) if off <= last.0 + last.1 => last.1 = last.1.max(off + len - last.0),
            _ => out.push((off, len)),
        }
    }
    out
}

/// The split-brain report: refuses the failback while this site's disks
/// changed after the failover point, or may have, unless `discard`.
fn check_split_brain(paths: &VmPaths, config: &VmConfig, discard: bool) -> Result<()> {
    let changes = source_changes_since_failover(paths, config)?;
    let total: u64 = changes.regions.values().flatten().map(|r| r.1).sum();
    if total == 0 && changes.unknown.is_empty() {
        return Ok(());
    }
    let mut report = String::new();
    for (disk, ranges) in &changes.regions {
        if ranges.is_empty() {
            continue;
        }
        let bytes: u64 = ranges.iter().map(|r| r.1).sum();
        let shown: Vec<String> = ranges.iter().take(8).map(|(o, l)| format!("{o}+{l}")).collect();
        report.push_str(&format!(
            "\n  disk '{disk}': {} in {} region(s): {}{}",
            Size(bytes).approx(),
            ranges.len(),
            shown.join(", "),
            if ranges.len() > shown.len() { ", …" } else { "" }
        ));
    }
    if !changes.unknown.is_empty() {
        let old_cache = crate::cache::for_source(config)?.describe();
        for (first, last) in &changes.unknown {
            let records =
                if first == last { format!("record seq {first}") } else { format!("records seq {first}..{last}") };
            report.push_str(&format!(
                "\n  {records}: shipped after the failover point, applied at the failover site and removed from {old_cache}; which regions they changed is not known here, and the failback discards them too"
            ));
        }
    }
    if discard {
        log::warn!(
            "VM '{}': --discard-source-changes: this site's writes after the failover point are discarded:{report}",
            config.name
        );
        return Ok(());
    }
    let amount = match (total, changes.unknown.is_empty()) {
        (_, true) => Size(total).approx(),
        (0, false) => "writes of unknown extent".to_owned(),
        (_, false) => format!("{} and writes of unknown extent", Size(total).approx()),
    };
    bail!(
        "VM '{}' was written at this site after it failed over (a split brain): {amount} the failback would discard:{report}\nThe failback replaces these disks with the failover site's point. If those writes matter, copy the disks aside first (cp --sparse=always); then fail back with --discard-source-changes, which discards every write made here after the failover point",
        config.name,
    )
}

/// Moves the old direction's stream out of `<cache>/<vm>` and removes it,
/// if it is there (its manifest names `old_id`, or it has none).
fn retire_cache_dir(store: &Store, vm: &str, old_id: &uuid::Uuid) -> Result<()> {
    let old = CacheDir::new(store, vm);
    match old.read_manifest().or_else(|e| match e {
        // Sealed with a key not at hand here: whose stream it is cannot be
        // told; the fence says it is the old one's to retire.
        FileError::Damaged { .. } => Ok(None),
        e => Err(e),
    })? {
        Some(m) if m.id != *old_id => return Ok(()), // a newer stream's already
        _ => {}
    }
    let Some(cache_root) = store.as_dir() else {
        // An object store has no rename: the objects go one by one, the
        // fence last (a rerun finds it and finishes).
        let removed = store.delete_all(&format!("{vm}/{SEGMENTS}"))?;
        for name in [MANIFEST, SOURCE_STOPPED, PLANNED_FAILOVER, APPLIED, APPLY_FAILURE] {
            old.remove(name)?;
        }
        store.delete_all(vm)?;
        log::info!("retired the old direction's stream in {} ({removed} segment(s))", old.describe());
        return Ok(());
    };
    let dir = cache_root.join(vm);
    if !dir.exists() {
        return Ok(());
    }
    let gone = cache_root.join(format!(".{vm}.retired-{old_id}"));
    std::fs::rename(&dir, &gone).with_context(|| format!("cannot retire {}", dir.display()))?;
    tern_driver::fs::sync_dir(cache_root)?;
    std::fs::remove_dir_all(&gone).with_context(|| format!("cannot remove {}", gone.display()))?;
    Ok(())
}

/// The clean-up after the new direction is enabled, idempotent, so a rerun
/// finishes what a killed failback left: the old direction's stream in the
/// cache (a fence there would stop the new one for good), a half-removed
/// one, and the old state and its journal ring. Whether it found anything
/// to do.
fn finish_failback_cleanup(state: &Path, cache_location: &Path, vm: &str, current_id: &uuid::Uuid) -> Result<bool> {
    let mut did = false;
    let cache_root = &crate::cache::open_store(cache_location)?;
    let cache = CacheDir::new(cache_root, vm);
    if cache.exists(FENCE)? {
        match cache.read_manifest().or_else(FileError::damaged_as_none)? {
            Some(m) if m.id == *current_id => {}
            Some(m) => {
                retire_cache_dir(cache_root, vm, &m.id)?;
                did = true;
            }
            _ => {
                retire_cache_dir(cache_root, vm, &uuid::Uuid::nil())?;
                did = true;
            }
        }
    }
    let local_cache = cache_root.as_dir().map(|d| (d, format!(".{vm}.retired-")));
    for (dir, prefix) in local_cache.into_iter().chain([(state, format!(".{vm}.failed-back-"))]) {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for e in entries.flatten() {
            if !e.file_name().to_string_lossy().starts_with(&prefix) {
                continue;
            }
            did = true;
            let retired = e.path();
            // The old direction's journal ring is in memory, outside its
            // state directory; kept when that fails: its journal.ring link
            // is what names the ring.
            let journal = retired.join("journal");
            if journal.exists() {
                if let Err(e) = tern_driver::journal::live::retire(&journal) {
                    log::warn!(
                        "cannot remove the old direction's journal: {}; kept {}: remove the file its link {} names (in memory), then that directory",
                        e.with_causes(),
                        retired.display(),
                        tern_driver::journal::live::link_path(&journal).display()
                    );
                    continue;
                }
            }
            std::fs::remove_dir_all(&retired).with_context(|| format!("cannot remove {}", retired.display()))?;
        }
    }
    Ok(did)
}

/// A failback that stopped between moving the VM's state aside and
/// enabling it again left it under a hidden name: put it back, so running
/// `tern failback` again finishes the job.
fn restore_interrupted_failback(state: &Path, vm: &str, dir: &Path) -> Result<()> {
    if dir.exists() {
        return Ok(());
    }
    let prefix = format!(".{vm}.failed-back-");
    let Ok(entries) = std::fs::read_dir(state) else { return Ok(()) };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) && e.path().join("vm.toml").is_file() {
            std::fs::rename(e.path(), dir).with_context(|| format!("cannot restore {}", e.path().display()))?;
            log::warn!("VM '{vm}': an interrupted failback left its state in {}; restored", e.path().display());
            break;
        }
    }
    Ok(())
}

fn initial_sync(seeds: BTreeMap<String, PathBuf>) -> InitialSync {
    if seeds.is_empty() {
        InitialSync::Allocated
    } else {
        InitialSync::Compare { seeds }
    }
}

fn read_manifest(cache: &CacheDir, vm: &str) -> Result<Manifest> {
    cache
        .read_manifest()?
        .with_context(|| format!("{} has no manifest: VM '{vm}' was never shipped there", cache.describe()))
}

/// A VM started by `tern failover --boot` writes to its disks directly,
/// past any journal: protecting them then would miss its writes.
fn refuse_running_qemu(active: &Path, vm: &str) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(active.join("qemu.pid")) else { return Ok(()) };
    let Ok(pid) = text.trim().parse::<i32>() else { return Ok(()) };
    // A live qemu: a zombie has an empty command line, and a reused pid
    // another program's.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains("qemu") {
        bail!(
            "VM '{vm}' runs from {} directly (qemu pid {pid}): its writes would bypass the journal; shut it down, re-protect, then start it on `tern serve`'s export",
            active.display()
        );
    }
    Ok(())
}

/// Puts the point's disks where the VM's own disks are: each a clone,
/// made beside the image and renamed over it only when complete.
fn restore_disks(config: &VmConfig, target: &TargetDir, point: &Point) -> Result<()> {
    for d in &config.disks {
        let file = point.disks.get(&d.name).with_context(|| format!("point {} has no disk '{}'", point.id, d.name))?;
        let from = target.point_dir(&point.id).join(file);
        let tmp = d.path.with_extension("tern-failback");
        let _ = std::fs::remove_file(&tmp);
        let method = clone_file(&from, &tmp)?;
        std::fs::rename(&tmp, &d.path)
            .with_context(|| format!("cannot rename {} over {}", tmp.display(), d.path.display()))?;
        if let Some(dir) = d.path.parent() {
            tern_driver::fs::sync_dir(dir)?;
        }
        log::info!("disk '{}': {} now holds point {} ({})", d.name, d.path.display(), point.id, method.name());
    }
    Ok(())
}
