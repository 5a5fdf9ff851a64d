//! Failing a VM over: choosing its point (a catalog point, the newest one,
//! or the newest data, applied on request), fencing its stream in the cache
//! so the source ships and the applier applies nothing more, and cloning
//! the point's disks into `<target>/<vm>/failover/<name>/` with a launch
//! script. `tern failover`, `tern commit` and `tern failover-cleanup` drive
//! it (`crate::cmd::failover`); re-protect and failback reuse its fence
//! and point choice. A failover or commit holds the VM's failover lock
//! ([`lock`]) from its first check to its last write.

mod lock;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use tern_driver::clone::{clone_file, CloneMethod};
use tern_driver::fail::{self, Failpoint};
use tern_driver::vm::{validate_name, LaunchConfig};
use tern_store::cache::{CacheDir, Fence, FENCE, PLANNED_FAILOVER};
use tern_store::file::FileError;
use tern_store::object::Store;
use tern_store::target::{Point, TargetDir};

/// Which point a failover uses.
#[derive(Debug, Clone)]
pub enum Choice {
    /// A point of the catalog, by id.
    Point(String),
    /// The newest data: everything the cache holds applied, a point there.
    Latest,
    /// The newest point of the catalog.
    LatestPoint,
}

/// A failover's directory, made by [`make_failover`].
pub struct Failover {
    pub name: String,
    pub dir: PathBuf,
    pub point: Point,
    /// Disk name → the failover's image of it.
    pub disks: Vec<(String, PathBuf)>,
    /// The target could not reflink: the disks are full copies.
    pub copied: bool,
    /// The NICs launch.sh gives the VM, each on its bridge here.
    pub nics: Vec<PlannedNic>,
}

/// Which bridges a failover puts the VM's NICs on.
#[derive(Debug, Clone)]
pub enum Network {
    /// A test failover: every NIC on this (isolated) bridge, or, without
    /// one, no network at all.
    Test(Option<String>),
    /// A real failover: each NIC on the bridge the policy's network map
    /// gives its source bridge, or on a bridge of the same name.
    Real,
}

/// A NIC as a failover starts it.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedNic {
    pub index: usize,
    /// The bridge it is on at the source site.
    pub source_bridge: String,
    /// The bridge it is on here.
    pub bridge: String,
    pub mac: String,
    pub model: String,
}

/// How a failover starts the VM: its launch settings and the bridge of
/// each NIC, chosen when the failover is made (so launch.sh runs by hand).
#[derive(Debug, Clone, Default)]
pub struct LaunchPlan {
    pub launch: LaunchConfig,
    pub nics: Vec<PlannedNic>,
    /// The VM's disks in its order (the manifest's, as `tern enable
    /// --disk` gave them): launch.sh attaches them so, the first the one
    /// it boots from. Empty (no manifest): in name order.
    pub disks: Vec<String>,
}

/// The launch plan of `vm` from its manifest in the cache (the target
/// knows the VM only from it). A test failover with no network whose cache
/// cannot be read gets the defaults (2 GiB, 2 CPUs, no NIC), with a
/// warning; one asked for a test network cannot know the NICs to put on
/// it, so it stops with the cache's error.
pub fn launch_plan(cache_root: &Store, vm: &str, network: &Network) -> Result<LaunchPlan> {
    let manifest = crate::cache::for_vm(cache_root, vm).and_then(|c| {
        let m = c.read_manifest()?;
        Ok((c, m))
    });
    let (launch, map, disks) = match (manifest, network) {
        (Ok((_, Some(m))), _) => (m.launch(), m.policy.network.clone(), m.disks.iter().map(|d| d.name.clone()).collect()),
        (Ok((cache, None)), Network::Test(_)) => {
            log::warn!(
                "VM '{vm}': {} has no manifest: the failover starts it with the default launch settings (2 GiB, 2 CPUs, no NIC)",
                cache.describe()
            );
            Default::default()
        }
        (Err(e), Network::Test(Some(bridge))) => {
            return Err(e.context(format!(
                "VM '{vm}': --test-network {bridge}: its NICs are in its launch settings, which cannot be read from the cache; make the cache readable, or leave --test-network out to start it with no network"
            )))
        }
        (Err(e), Network::Test(None)) => {
            log::warn!(
                "VM '{vm}': its launch settings cannot be read from the cache ({e:#}): the failover starts it with the defaults (2 GiB, 2 CPUs, no NIC)"
            );
            Default::default()
        }
        // real_failover says why it cannot go on.
        (Ok((_, None)), Network::Real) => Default::default(),
        (Err(e), Network::Real) => return Err(e),
    };
    Ok(LaunchPlan { disks, ..plan_from(vm, launch, &map, network)? })
}

/// [`launch_plan`] from the launch settings and the network map.
pub fn plan_from(
    vm: &str,
    launch: LaunchConfig,
    map: &std::collections::BTreeMap<String, String>,
    network: &Network,
) -> Result<LaunchPlan> {
    let mut nics = Vec::new();
    for (index, nic) in launch.nics.iter().enumerate() {
        let bridge = match network {
            Network::Test(None) => continue,
            Network::Test(Some(b)) => b.clone(),
            Network::Real => match map.get(&nic.bridge) {
                Some(b) => b.clone(),
                None => {
                    log::info!(
                        "VM '{vm}': NIC {index} was on bridge '{}' and the policy's network map does not map it: it goes on the bridge of the same name here",
                        nic.bridge
                    );
                    nic.bridge.clone()
                }
            },
        };
        let mac = nic.mac.clone().with_context(|| format!("VM '{vm}': NIC {index} has no MAC address"))?;
        nics.push(PlannedNic { index, source_bridge: nic.bridge.clone(), bridge, mac, model: nic.model.clone() });
    }
    Ok(LaunchPlan { launch, nics, disks: Vec::new() })
}

/// Refuses `--test-network` when none of `vms` has a NIC to put on it.
pub fn refuse_test_network_without_nics(vms: &[&str], bridge: Option<&str>, plans: &[&LaunchPlan]) -> Result<()> {
    if let Some(bridge) = bridge {
        if plans.iter().all(|p| p.launch.nics.is_empty()) {
            let which = if vms.len() == 1 {
                format!("VM '{}' has no NIC", vms[0])
            } else {
                format!("none of VMs {} has a NIC", vms.join(", "))
            };
            bail!(
                "--test-network {bridge}: {which} in its launch settings, so nothing would be on it; add one at the source (`--nic` at `tern enable`, or `[[launch.nic]]` in vm.toml: the next start of `tern ship` carries it here), or leave --test-network out"
            );
        }
    }
    Ok(())
}

/// Refuses, naming them, the bridges of `plan` this host does not have:
/// checked before anything is started (or fenced).
pub fn check_bridges(vm: &str, plan: &LaunchPlan) -> Result<()> {
    let mut missing: Vec<(&str, Vec<String>)> = Vec::new();
    for n in plan.nics.iter().filter(|n| !bridge_exists(&n.bridge)) {
        let nic = format!("NIC {}, MAC {}", n.index, n.mac);
        match missing.iter_mut().find(|(b, _)| *b == n.bridge) {
            Some((_, nics)) => nics.push(nic),
            None => missing.push((&n.bridge, vec![nic])),
        }
    }
    if let Some((first, _)) = missing.first() {
        let list: Vec<String> = missing.iter().map(|(b, nics)| format!("'{b}' ({})", nics.join("; "))).collect();
        bail!(
            "VM '{vm}': no bridge {} on this host (/sys/class/net/{first}/bridge does not exist): nothing was started; create it (`ip link add {first} type bridge && ip link set {first} up`) or choose another (--test-network, or the policy's network map at the source)",
            list.join(", ")
        );
    }
    Ok(())
}

fn bridge_exists(bridge: &str) -> bool {
    Path::new("/sys/class/net").join(bridge).join("bridge").is_dir()
}

/// The real failover: fence the source off through the cache (it stops
/// shipping, and the applier applies nothing more for the VM), then clone
/// the point into `failover/active/`. Before `tern commit`, running it again
/// replaces that directory with another point's disks.
pub fn real_failover(
    target_root: &Path,
    cache_root: &Store,
    vm: &str,
    choice: &Choice,
    planned: Option<Planned>,
    plan: &LaunchPlan,
) -> Result<Failover> {
    let root = replica_site(target_root, vm, choice)?;
    let _lock = lock::lock(&root, vm, "`tern failover`")?;
    let Ready { cache, manifest, target, active, .. } = ready_for_real_failover(target_root, cache_root, vm)?;
    // Choose (for --latest: catch up and point) before fencing, so the
    // point holds everything the cache had.
    let stopped_at = match planned {
        Some(Planned::Ask(timeout)) => Some(stop_source(&cache, &manifest, vm, timeout)?),
        Some(Planned::Stopped(seq)) => Some(seq),
        None => None,
    };
    let point = choose_point(&target, cache_root, target_root, vm, choice)?;
    if let Some(seq) = stopped_at {
        if point.seq < seq {
            bail!(
                "VM '{vm}': the point taken ({}, seq {}) lacks what the source wrote up to seq {seq}: nothing is fenced; the source stays stopped ({} remains): run the planned failover again",
                point.id,
                point.seq,
                cache.location(PLANNED_FAILOVER)
            );
        }
    }
    // Checked again before the fence, which must go on naming the point
    // the VM runs if this is refused: it may have started on it while the
    // point was made.
    refuse_if_in_use(vm, &active)?;
    // Read again: a `tern commit` at another target site on this cache
    // holds no lock of ours.
    let previous = cache.read_fence()?;
    refuse_if_committed(vm, previous.as_ref())?;
    write_fence(&cache, &manifest, previous.as_ref(), &point, Fencer::Failover)?;
    if planned.is_some() {
        // The fence stops the source for good now.
        let _ = cache.remove(PLANNED_FAILOVER);
    }
    // And once more, the VM having had the time the fence took to start.
    if let Err(e) = refuse_if_in_use(vm, &active) {
        if let Some(previous) = &previous {
            cache
                .write_toml(FENCE, previous, "the VM failed over at the target site: the source ships nothing more")
                .with_context(|| {
                    format!(
                        "{e:#}; and the fence could not be put back to point {}: run `tern failover {vm} --point {}` once the VM is shut down",
                        previous.point, previous.point
                    )
                })?;
        }
        return Err(e);
    }
    if active.exists() {
        log::warn!(
            "VM '{vm}': replacing the uncommitted failover in {} (its disks' changes are discarded)",
            active.display()
        );
        std::fs::remove_dir_all(&active).with_context(|| format!("cannot remove {}", active.display()))?;
    }
    clone_failover(target_root, cache_root, vm, &Choice::Point(point.id.clone()), Some("active"), false, plan)
}

/// `<target>/<vm>/`, refused unless it exists or `choice` (--latest)
/// applies the cache there first.
fn replica_site(target_root: &Path, vm: &str, choice: &Choice) -> Result<PathBuf> {
    let root = TargetDir::new(target_root, vm).root().to_owned();
    if !matches!(choice, Choice::Latest) && !root.is_dir() {
        bail!("{} does not exist: VM '{vm}' has no replica at this target site", root.display());
    }
    Ok(root)
}

/// A planned failover's source stop.
#[derive(Debug, Clone, Copy)]
pub enum Planned {
    /// Ask the source to stop and ship the rest, waiting this long.
    Ask(Duration),
    /// It did, up to this sequence number ([`stop_sources`]).
    Stopped(u64),
}

/// A planned failover's first half for several VMs at once (a group):
/// each source asked to stop and ship the rest, all waited for together.
/// Each one's last sequence number, in the order given; if any does not
/// stop in time, every request is called off (the sources may serve again)
/// and nothing is fenced.
pub fn stop_sources(target_root: &Path, cache_root: &[&Store], vms: &[&str], timeout: Duration) -> Result<Vec<u64>> {
    let stopped: Vec<Result<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = vms
            .iter()
            .zip(cache_root)
            .map(|(vm, store)| {
                s.spawn(move || {
                    let Ready { cache, manifest, .. } = ready_for_real_failover(target_root, store, vm)?;
                    stop_source(&cache, &manifest, vm, timeout)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a stopping thread panicked")).collect()
    });
    if stopped.iter().any(Result::is_err) {
        for (vm, store) in vms.iter().zip(cache_root) {
            if let Ok(cache) = crate::cache::for_vm(store, vm) {
                let _ = cache.remove(PLANNED_FAILOVER);
            }
        }
        let why: Vec<String> = stopped.iter().filter_map(|r| r.as_ref().err()).map(|e| format!("{e:#}")).collect();
        bail!(
            "the planned failover is called off for every member ({}), nothing is fenced, the sources may serve again: {}",
            vms.join(", "),
            why.join("; ")
        );
    }
    Ok(stopped.into_iter().map(|r| r.expect("checked")).collect())
}

/// What a real failover found true before it fences anything.
struct Ready {
    cache: CacheDir,
    previous: Option<Fence>,
    manifest: tern_store::cache::Manifest,
    target: TargetDir,
    active: PathBuf,
}

/// The checks a real failover makes before it fences: not committed
/// already, shipped here at all, its failed-over disks not in use.
fn ready_for_real_failover(target_root: &Path, cache_root: &Store, vm: &str) -> Result<Ready> {
    let cache = crate::cache::for_vm(cache_root, vm)?;
    let previous = cache.read_fence()?;
    refuse_if_committed(vm, previous.as_ref())?;
    let manifest = cache
        .read_manifest()?
        .with_context(|| format!("{} has no manifest: VM '{vm}' was never shipped here", cache.describe()))?;
    let target = TargetDir::new(target_root, vm);
    let active = target.root().join("failover").join("active");
    refuse_if_in_use(vm, &active)?;
    Ok(Ready { cache, previous, manifest, target, active })
}

fn refuse_if_committed(vm: &str, fence: Option<&Fence>) -> Result<()> {
    if let Some(f) = fence.filter(|f| f.committed) {
        bail!(
            "VM '{vm}' failed over to point {} and that was committed: it runs from the target now; re-protect it to replicate it back",
            f.point
        );
    }
    Ok(())
}

/// Whether `vm` can fail over to its catalog point `point` (a group
/// member's share of a group point; none: its newest data) — the checks each failover makes
/// before it fences or clones anything, so a group's failover finds a
/// member that cannot before any other member is failed over. A test
/// failover named `test_name` needs that directory free.
pub fn precheck(
    target_root: &Path,
    cache_root: &Store,
    vm: &str,
    point: Option<&str>,
    test: bool,
    planned: bool,
    test_name: Option<&str>,
) -> Result<()> {
    if let Some(name) = test_name {
        validate_name("failover", name)?;
    }
    let target = TargetDir::new(target_root, vm);
    if let Some(point) = point.filter(|p| !target.point_dir(p).join("point.toml").is_file()) {
        bail!("VM '{vm}' has no point {point} at {} (retention removed it?)", target.points_dir().display());
    }
    if !test {
        let ready = ready_for_real_failover(target_root, cache_root, vm)?;
        if let (true, Some(fence)) = (planned, &ready.previous) {
            bail!(
                "VM '{vm}' is already failed over (fenced at point {}), by an earlier run that stopped part way: its source cannot be stopped again; finish the members not failed over yet with `tern failover VM --latest` each (their sources stopped and shipped everything)",
                fence.point
            );
        }
    } else if let Some(name) = test_name {
        let dir = target.root().join("failover").join(name);
        if dir.exists() {
            bail!(
                "{} exists: pick another --name, or remove it with `tern failover-cleanup {vm} {name}`",
                dir.display()
            );
        }
    }
    Ok(())
}

/// A planned failover's first half: asks the source to stop (its `tern
/// serve` refuses writes and exits cleanly) and waits until its `tern ship`
/// records that everything it journaled is in the cache. Returns that last
/// sequence number. Called off (the request removed) if that does not
/// happen within `timeout`.
fn stop_source(cache: &CacheDir, manifest: &tern_store::cache::Manifest, vm: &str, timeout: Duration) -> Result<u64> {
    let request = tern_store::cache::PlannedFailover {
        version: 1,
        requested_unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
    };
    cache.write_toml(
        PLANNED_FAILOVER,
        &request,
        "tern failover --planned: the source is asked to stop and ship the rest",
    )?;
    log::info!(
        "VM '{vm}': planned failover: asked the source to stop ({}); waiting up to {} for it to ship everything",
        cache.location(PLANNED_FAILOVER),
        humantime::format_duration(timeout)
    );
    let started = Instant::now();
    let mut told = started;
    loop {
        let newest = match cache.newest_segment(Some(*manifest.id.as_bytes()))? {
            Some(h) => h?.last_seq,
            None => manifest.epoch().first_seq.saturating_sub(1),
        };
        if let Some(s) = cache.read_source_stopped().or_else(FileError::damaged_as_none)? {
            // Written for this request: a marker from before it may be
            // stale (a front-end attached since, with no shipper to see it).
            if s.vm_id == manifest.id && s.seq >= newest && s.planned_request == Some(request.requested_unix_ms) {
                log::info!("VM '{vm}': the source stopped and shipped everything, up to seq {}", s.seq);
                return Ok(s.seq);
            }
        }
        if started.elapsed() >= timeout {
            let _ = cache.remove(PLANNED_FAILOVER);
            bail!(
                "VM '{vm}': the source did not stop and ship everything within {} (the cache holds up to seq {newest}): is its `tern ship` running? The planned failover is called off and the source may serve again; or fail over unplanned with `tern failover {vm}`",
                humantime::format_duration(timeout)
            );
        }
        if told.elapsed() >= Duration::from_secs(5) {
            log::info!(
                "VM '{vm}': waiting {}s for the source: its `tern serve` stops within a second of the request, then its `tern ship` ships the rest and records the stop (the cache holds up to seq {newest})",
                started.elapsed().as_secs()
            );
            told = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Refuses to replace the uncommitted failover's disks while a process
/// (the failed-over VM) holds one open: it would go on writing to a
/// deleted file, its writes lost without a word.
fn refuse_if_in_use(vm: &str, active: &Path) -> Result<()> {
    if let Some((disk, holders)) = tern_driver::image_lock::first_in_use(active) {
        bail!(
            "VM '{vm}': the failover's disk {} is in use by {}: the failed-over VM runs on it; shut it down before failing over to another point (or `tern commit {vm}` to keep this one)",
            disk.display(),
            tern_driver::image_lock::describe(&holders)
        );
    }
    Ok(())
}

/// Who fences a stream, which says how the fence starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fencer {
    /// `tern failover`: uncommitted until `tern commit`.
    Failover,
    /// `tern failback`, of the re-protected direction: committed at once,
    /// and marked as a failback's, the only fence a failback resumes from.
    Failback,
}

/// Fences the VM's stream at `point`: the source ships nothing more (it
/// sees the fence) and no applier applies anything more for it.
pub fn write_fence(
    cache: &CacheDir,
    manifest: &tern_store::cache::Manifest,
    previous: Option<&Fence>,
    point: &Point,
    by: Fencer,
) -> Result<Fence> {
    let fence = Fence {
        version: 1,
        epoch: previous.map_or(manifest.epoch().number + 1, |f| f.epoch),
        point: point.id.clone(),
        seq: point.seq,
        failed_over_unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        committed: by == Fencer::Failback,
        by_failback: by == Fencer::Failback,
    };
    fail::hit(Failpoint::FailoverFenceWrite)?;
    cache.write_toml(FENCE, &fence, "the VM failed over at the target site: the source ships nothing more")?;
    Ok(fence)
}

pub fn choose_point(
    target: &TargetDir,
    cache_root: &Store,
    target_root: &Path,
    vm: &str,
    choice: &Choice,
) -> Result<Point> {
    match choice {
        Choice::Point(id) => target
            .list_points()?
            .into_iter()
            .find(|p| &p.id == id)
            .with_context(|| format!("VM '{vm}' has no point '{id}'; `tern points {vm}` lists them")),
        Choice::Latest => crate::apply::latest_applied_point(cache_root, target_root, vm),
        Choice::LatestPoint => target.list_points()?.into_iter().max_by_key(|p| p.seq).with_context(|| {
            format!(
                "VM '{vm}' has no point yet at {}; --latest applies what the cache holds and takes one",
                target.root().display()
            )
        }),
    }
}

/// Clones the disks of the point `choice` names into
/// `<target>/<vm>/failover/<name>/` with a launch script. A test failover
/// leaves replication untouched.
pub fn make_failover(
    target_root: &Path,
    cache_root: &Store,
    vm: &str,
    choice: &Choice,
    name: Option<&str>,
    test: bool,
    plan: &LaunchPlan,
) -> Result<Failover> {
    let root = replica_site(target_root, vm, choice)?;
    let _lock = lock::lock(&root, vm, "`tern failover`")?;
    clone_failover(target_root, cache_root, vm, choice, name, test, plan)
}

/// [`make_failover`] with the VM's failover lock held.
fn clone_failover(
    target_root: &Path,
    cache_root: &Store,
    vm: &str,
    choice: &Choice,
    name: Option<&str>,
    test: bool,
    plan: &LaunchPlan,
) -> Result<Failover> {
    let target = TargetDir::new(target_root, vm);
    let point = choose_point(&target, cache_root, target_root, vm, choice)?;
    let failovers = target.root().join("failover");
    tern_driver::fs::create_dir_durably(&failovers)?;
    let name = match name {
        Some(n) => {
            validate_name("failover", n)?;
            n.to_owned()
        }
        None => (1..).map(|i| format!("test-{i}")).find(|n| !failovers.join(n).exists()).expect("a free name"),
    };
    if test && name == "active" {
        bail!("'active' is the name of the real failover's directory; pick another --name");
    }
    let dir = failovers.join(&name);
    if dir.exists() {
        bail!("{} exists: pick another --name, or remove it with `tern failover-cleanup {vm} {name}`", dir.display());
    }
    let tmp = failovers.join(format!(".tmp-{name}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut disks = Vec::new();
    let mut copied = false;
    // The VM's order, not the catalog's (by name): the first disk is the
    // one it boots from.
    let mut in_order: Vec<(&String, &String)> = point.disks.iter().collect();
    in_order.sort_by_key(|(disk, _)| plan.disks.iter().position(|d| d == *disk).unwrap_or(usize::MAX));
    for (disk, file) in in_order {
        copied |= clone_file(&target.point_dir(&point.id).join(file), &tmp.join(file))? == CloneMethod::Copy;
        disks.push((disk.clone(), dir.join(file)));
    }
    fail::hit(Failpoint::FailoverDisksCloned)?;
    for nic in &plan.nics {
        let up = tmp.join(format!("nic{}-up", nic.index));
        tern_driver::fs::write_durably(&up, nic_up_script(vm, nic).as_bytes())?;
        set_executable(&up)?;
    }
    tern_driver::fs::write_durably(&tmp.join("launch.sh"), launch_script(vm, test, plan, &disks, &dir).as_bytes())?;
    set_executable(&tmp.join("launch.sh"))?;
    let mut info = format!(
        "version = 1\nvm = \"{vm}\"\npoint = \"{}\"\nseq = {}\nkind = \"{}\"\ntest = {test}\n",
        point.id,
        point.seq,
        point.kind.name()
    );
    for nic in &plan.nics {
        info.push_str(&format!(
            "\n[[nic]]\nindex = {}\nmac = {}\nmodel = {}\nsource-bridge = {}\nbridge = {}\n",
            nic.index,
            toml_str(&nic.mac),
            toml_str(&nic.model),
            toml_str(&nic.source_bridge),
            toml_str(&nic.bridge)
        ));
    }
    tern_driver::fs::write_durably(&tmp.join("failover.toml"), info.as_bytes())?;
    std::fs::rename(&tmp, &dir).with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
    tern_driver::fs::sync_dir(&failovers)?;
    Ok(Failover { name, dir, point, disks, copied, nics: plan.nics.clone() })
}

/// `launch.sh`: qemu with the VM's launch settings, its disks, and each NIC
/// a tap device that `nicN-up` joins to the NIC's bridge (no
/// /etc/qemu/bridge.conf to edit, as qemu-bridge-helper would need; it
/// runs as root, or with CAP_NET_ADMIN). Without NICs: `-nic none`.
fn launch_script(vm: &str, test: bool, plan: &LaunchPlan, disks: &[(String, PathBuf)], dir: &Path) -> String {
    let l = &plan.launch;
    let mut s = String::from("#!/bin/sh\n");
    if test {
        s.push_str(&format!("# Test failover of VM '{vm}', made by `tern failover --test`.\n"));
    } else {
        s.push_str(&format!("# Failover of VM '{vm}', made by `tern failover`.\n"));
    }
    s.push_str("# Memory, CPUs, kernel and NICs: the VM's launch settings (vm.toml [launch]).\n");
    if plan.nics.is_empty() {
        if test {
            s.push_str("# No network (-nic none): isolated from production (--test-network BRIDGE\n# puts its NICs on an isolated bridge).\n");
        } else {
            s.push_str("# No NIC in its launch settings: no network (-nic none).\n");
        }
    } else {
        s.push_str("# Each NIC is a tap device that nicN-up joins to its bridge: run as root.\n");
        for n in &plan.nics {
            s.push_str(&format!(
                "# NIC {}: MAC {} on bridge {} (at the source: {})\n",
                n.index, n.mac, n.bridge, n.source_bridge
            ));
        }
        for n in &plan.nics {
            let b = shell_quote(&n.bridge);
            let why = format!(
                "launch.sh: there is no bridge {} on this host (NIC {}, MAC {}): create it (ip link add {} type bridge && ip link set {} up), or make the failover again with another one",
                n.bridge, n.index, n.mac, n.bridge, n.bridge
            );
            s.push_str(&format!(
                "[ -d /sys/class/net/{b}/bridge ] || {{ printf '%s\\n' {} >&2; exit 1; }}\n",
                shell_quote(&why)
            ));
        }
    }
    let name = if test { format!("{vm}-test") } else { vm.to_owned() };
    s.push_str(&format!("exec qemu-system-x86_64 -name {name} -m {}M -smp {} \\\n", l.memory.bytes() >> 20, l.cpus));
    // Absolute, so it runs from anywhere.
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    for (_, p) in disks {
        let p = absolute(p);
        s.push_str(&format!(
            "    -drive {} \\\n",
            shell_quote(&format!("file={},format=raw,if=virtio,cache=none", qemu_value(&p.display().to_string())))
        ));
    }
    if let Some(k) = &l.kernel {
        s.push_str(&format!("    -kernel {} \\\n", shell_quote(&k.display().to_string())));
    }
    if let Some(i) = &l.initrd {
        s.push_str(&format!("    -initrd {} \\\n", shell_quote(&i.display().to_string())));
    }
    if let Some(a) = &l.append {
        s.push_str(&format!("    -append {} \\\n", shell_quote(a)));
    }
    if plan.nics.is_empty() {
        s.push_str("    -nic none \\\n");
    }
    for n in &plan.nics {
        let up = absolute(&dir.join(format!("nic{}-up", n.index)));
        s.push_str(&format!(
            "    -netdev {} -device {} \\\n",
            shell_quote(&format!(
                "tap,id=net{},script={},downscript=no",
                n.index,
                qemu_value(&up.display().to_string())
            )),
            shell_quote(&format!("{},netdev=net{},mac={}", n.model, n.index, n.mac))
        ));
    }
    s.push_str("    -display none -serial mon:stdio \"$@\"\n");
    s
}

/// `nicN-up`: qemu runs it with the NIC's tap device as `$1`.
fn nic_up_script(vm: &str, nic: &PlannedNic) -> String {
    let b = shell_quote(&nic.bridge);
    format!(
        "#!/bin/sh\n# qemu runs this with the tap device of NIC {} of VM '{vm}' (MAC {}): it joins it to bridge {}.\nip link set \"$1\" master {b} && ip link set \"$1\" up\n",
        nic.index, nic.mac, nic.bridge
    )
}

/// One shell word: in single quotes unless it is plainly safe.
fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:=,+@%".contains(&b)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A TOML string.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// A value inside a qemu option list: its commas doubled.
fn qemu_value(s: &str) -> String {
    s.replace(',', ",,")
}

fn set_executable(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Marks the VM's failover final in its fence: no other point may be
/// chosen any more. Returns the fence, and whether it was committed before.
/// Refused unless `<target>/<vm>/failover/active` holds the fence's point:
/// a failover stopped part way has fenced without it.
pub fn commit(target_root: &Path, cache: &CacheDir, vm: &str) -> Result<(Fence, bool)> {
    let root = TargetDir::new(target_root, vm).root().to_owned();
    // No directory: nothing failed over here, said below.
    let _lock = if root.is_dir() { Some(lock::lock(&root, vm, "`tern commit`")?) } else { None };
    let Some(mut fence) = cache.read_fence()? else {
        bail!("VM '{vm}' has not failed over: there is nothing to commit (`tern failover {vm}` first)");
    };
    if fence.committed {
        return Ok((fence, true));
    }
    refuse_unless_active_holds(&root.join("failover").join("active"), vm, &fence)?;
    fence.committed = true;
    cache.write_toml(FENCE, &fence, "the VM failed over at the target site: the source ships nothing more")?;
    Ok((fence, false))
}

/// Refuses a commit unless the real failover's directory `active` is there
/// and holds the point the fence names.
fn refuse_unless_active_holds(active: &Path, vm: &str, fence: &Fence) -> Result<()> {
    let info = active.join("failover.toml");
    let again = format!("run `tern failover {vm} --point {}` again", fence.point);
    let text = match std::fs::read_to_string(&info) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "VM '{vm}': its failover to point {} did not finish ({} does not exist: a `tern failover` stopped part way): nothing is committed; {again}, check the VM, then commit",
            fence.point,
            info.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("VM '{vm}': cannot read {}: nothing is committed", info.display())),
    };
    let held = text
        .parse::<toml::Table>()
        .ok()
        .and_then(|t| t.get("point").and_then(|p| p.as_str()).map(str::to_owned))
        .with_context(|| format!("VM '{vm}': {} names no point: nothing is committed; {again}", info.display()))?;
    if held != fence.point {
        bail!(
            "VM '{vm}': {} holds point {held}, but the fence names point {} (a `tern failover` to it stopped part way): nothing is committed; {again} (or with the point you mean), check the VM, then commit",
            active.display(),
            fence.point
        );
    }
    Ok(())
}

/// Removes the test failover `name` of `vm` from the target site (never the
/// real one). Returns its directory.
pub fn remove_test(target_root: &Path, vm: &str, name: &str) -> Result<PathBuf> {
    validate_name("failover", name)?;
    let failovers = TargetDir::new(target_root, vm).root().join("failover");
    let dir = failovers.join(name);
    if !dir.join("failover.toml").is_file() {
        let existing: Vec<String> = std::fs::read_dir(&failovers)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        bail!(
            "VM '{vm}' has no failover named '{name}' in {} (there: {})",
            failovers.display(),
            if existing.is_empty() { "none".to_string() } else { existing.join(", ") }
        );
    }
    let info = std::fs::read_to_string(dir.join("failover.toml")).unwrap_or_default();
    if info.lines().any(|l| l.trim() == "test = false") {
        bail!("'{name}' is VM '{vm}''s real failover, not a test: it is not removed by failover-cleanup");
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    Ok(dir)
}
