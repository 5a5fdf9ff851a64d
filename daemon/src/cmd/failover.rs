//! `tern failover`, `tern commit` and `tern failover-cleanup`: their
//! arguments, the sites they act on, and what they print. The work is in
//! [`crate::failover`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use tern_driver::vm::{validate_name, VmPaths};
use tern_store::object::Store;
use tern_store::target::TargetDir;

use super::Cli;
use crate::failover::{make_failover, real_failover, Choice, Network};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(required_unless_present = "group")]
    pub vm: Option<String>,
    /// Every member of a group at one group point (`tern points --group`):
    /// --point names a group point, else the newest is used. With
    /// --planned: every member's source stopped, each with all it wrote.
    #[arg(long, conflicts_with = "vm")]
    pub group: Option<String>,
    /// A test failover: an isolated copy; replication is not touched.
    /// Without it: fence the source off (it stops shipping), and run the VM
    /// from the point until `tern commit`.
    #[arg(long)]
    pub test: bool,
    /// The recovery point (an id from `tern points`).
    #[arg(long, conflicts_with_all = ["latest", "latest_point"])]
    pub point: Option<String>,
    /// The newest data (the default): apply everything the cache holds
    /// (asking a running `tern apply` to), take a point there and use it.
    #[arg(long, conflicts_with = "latest_point")]
    pub latest: bool,
    /// The newest point already taken: no waiting, but up to a point
    /// interval older than --latest.
    #[arg(long)]
    pub latest_point: bool,
    /// A planned failover (a switchover), nothing lost: the source's `tern
    /// serve` is asked to stop taking writes and exit, its `tern ship`
    /// ships the rest, and the failover uses a point holding all of it.
    /// Shut the VM down first.
    #[arg(long, conflicts_with_all = ["test", "point", "latest_point"])]
    pub planned: bool,
    /// How long a planned failover waits for the source to stop and ship
    /// everything before it is called off.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration, requires = "planned")]
    pub timeout: Duration,
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
    /// Start the failed-over VM with qemu (its launch.sh; console in
    /// console.log). Every bridge its NICs go on must exist, else nothing
    /// is started (nor fenced). With --group: the members in their name
    /// order (or --boot-order's), each once all are failed over.
    #[arg(long)]
    pub boot: bool,
    /// With --group --boot: these members start first, in this order (a
    /// database before its application servers), then the rest in name
    /// order.
    #[arg(long, value_name = "VM,...", value_delimiter = ',', requires_all = ["group", "boot"])]
    pub boot_order: Vec<String>,
    /// With --group --boot: how long to wait after starting one member
    /// before starting the next (for a service to come up).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, requires_all = ["group", "boot"])]
    pub boot_wait: Option<Duration>,
    /// A test failover's network: every NIC of the VM on this bridge (an
    /// isolated one: it must not reach production). Default: none, no
    /// network at all. A real failover uses the policy's network map.
    #[arg(long, value_name = "BRIDGE", requires = "test", value_parser = parse_bridge)]
    pub test_network: Option<String>,
}

fn parse_bridge(s: &str) -> Result<String, String> {
    tern_driver::launch::validate_bridge(s).map(|()| s.to_owned())
}

#[derive(Debug, clap::Args)]
pub struct CommitArgs {
    pub vm: String,
    #[arg(long)]
    pub cache: Option<PathBuf>,
    #[arg(long)]
    pub target: Option<PathBuf>,
}

/// `tern commit`: the failover stands; no other point may be chosen.
pub fn commit(cli: &Cli, a: &CommitArgs) -> Result<()> {
    let (target_root, cache_root) = sites(cli, &a.vm, a.target.as_deref(), a.cache.as_deref())?;
    let (fence, already) = crate::failover::commit(&target_root, &crate::cache::for_vm(&cache_root, &a.vm)?, &a.vm)?;
    if already {
        println!("VM '{}': the failover to point {} was already committed", a.vm, fence.point);
        return Ok(());
    }
    let dir = TargetDir::new(&target_root, &a.vm).root().join("failover").join("active");
    println!(
        "VM '{}': failover to point {} (seq {}) committed; it runs from {}; re-protect it to replicate it back",
        a.vm,
        fence.point,
        fence.seq,
        dir.display()
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct CleanupArgs {
    pub vm: String,
    /// The failover to remove (its directory name).
    pub name: String,
    #[arg(long)]
    pub target: Option<PathBuf>,
}
impl Args {
    fn network(&self) -> Network {
        if self.test {
            Network::Test(self.test_network.clone())
        } else {
            Network::Real
        }
    }

    fn choice(&self) -> Choice {
        match (&self.point, self.latest_point) {
            (Some(id), _) => Choice::Point(id.clone()),
            (None, true) => Choice::LatestPoint,
            (None, false) => Choice::Latest,
        }
    }
}

/// The target site and cache store: given, or from the VM's vm.toml.
fn sites(cli: &Cli, vm: &str, target: Option<&Path>, cache: Option<&Path>) -> Result<(PathBuf, Store)> {
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
    Ok((target, crate::cache::open_store(&cache)?))
}

pub fn run(cli: &Cli, a: &Args) -> Result<()> {
    if let Some(group) = &a.group {
        return run_group(cli, a, group);
    }
    let vm = a.vm.as_deref().expect("clap: a VM or --group");
    let (target_root, cache_root) = sites(cli, vm, a.target.as_deref(), a.cache.as_deref())?;
    let started = Instant::now();
    let plan = crate::failover::launch_plan(&cache_root, vm, &a.network())?;
    crate::failover::refuse_test_network_without_nics(&[vm], a.test_network.as_deref(), &[&plan])?;
    if a.boot {
        // Before anything is fenced or cloned.
        crate::failover::check_bridges(vm, &plan)?;
    }
    let f = if a.test {
        make_failover(&target_root, &cache_root, vm, &a.choice(), a.name.as_deref(), true, &plan)?
    } else {
        let planned = a.planned.then_some(crate::failover::Planned::Ask(a.timeout));
        real_failover(&target_root, &cache_root, vm, &a.choice(), planned, &plan)?
    };
    if a.boot {
        boot(vm, &f)?;
    }
    let time = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_nanos(f.point.time_ns));
    if a.json {
        let mut out = failover_json(&f);
        out.insert("time".into(), time.to_string().into());
        out.insert("test".into(), a.test.into());
        out.insert("planned".into(), a.planned.into());
        out.insert("ready_seconds".into(), started.elapsed().as_secs_f64().into());
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{} '{}' of VM '{}' from {} point {} (seq {}, {time}) ready in {:.2?}{}: {}",
            if a.test { "test failover" } else { "failover" },
            f.name,
            vm,
            f.point.kind.name(),
            f.point.id,
            f.point.seq,
            started.elapsed(),
            if f.copied { " (copied: the target cannot reflink)" } else { "" },
            f.dir.display()
        );
        for n in &f.nics {
            println!("NIC {} (MAC {}) on bridge {} (at the source: {})", n.index, n.mac, n.bridge, n.source_bridge);
        }
        if a.test {
            if f.nics.is_empty() {
                println!("start it with {} (no network: isolated from production)", f.dir.join("launch.sh").display());
            } else {
                println!("start it with {}", f.dir.join("launch.sh").display());
            }
            println!("remove it with `tern failover-cleanup {vm} {}`", f.name);
        } else {
            if a.planned {
                println!(
                    "planned failover: nothing lost (RPO 0): the point holds everything the source wrote, up to seq {}",
                    f.point.seq
                );
            }
            println!(
                "the source is fenced (it ships nothing more); check the VM, then `tern commit {}` — until then `tern failover {}` may pick another point",
                vm, vm
            );
        }
    }
    Ok(())
}

/// A failover as `--json` prints it: name, directory, point, seq, disks
/// (name → image) and whether they were reflinked or copied.
fn failover_json(f: &crate::failover::Failover) -> serde_json::Map<String, serde_json::Value> {
    let disks: serde_json::Map<String, serde_json::Value> =
        f.disks.iter().map(|(n, p)| (n.clone(), p.display().to_string().into())).collect();
    let mut out = serde_json::Map::new();
    out.insert("name".into(), f.name.clone().into());
    out.insert("directory".into(), f.dir.display().to_string().into());
    out.insert("point".into(), f.point.id.clone().into());
    out.insert("seq".into(), f.point.seq.into());
    out.insert("disks".into(), disks.into());
    out.insert("clone".into(), if f.copied { "copy" } else { "reflink" }.into());
    let network: Vec<serde_json::Value> = f
        .nics
        .iter()
        .map(|n| {
            serde_json::json!({
                "nic": n.index, "mac": n.mac, "model": n.model, "bridge": n.bridge, "source_bridge": n.source_bridge,
            })
        })
        .collect();
    out.insert("network".into(), network.into());
    out
}

/// Starts the failed-over VM (its launch.sh), console in console.log;
/// qemu's pid.
fn boot(vm: &str, f: &crate::failover::Failover) -> Result<u32> {
    let log = f.dir.join("console.log");
    let console = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let child = std::process::Command::new(f.dir.join("launch.sh"))
        .stdin(std::process::Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        .spawn()
        .with_context(|| format!("cannot start {}", f.dir.join("launch.sh").display()))?;
    std::fs::write(f.dir.join("qemu.pid"), format!("{}\n", child.id()))?;
    // A qemu that cannot start (a tap it may not create, a bridge that
    // went away) exits at once: say so, not "booting".
    let mut child = child;
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            let console = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = console.lines().rev().take(5).collect();
            anyhow::bail!(
                "VM '{vm}': qemu exited at once ({status}) from {}: {}; the failover is made: fix that and run its launch.sh",
                f.dir.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    log::info!("VM '{vm}' booting from {} (qemu pid {}, console in {})", f.dir.display(), child.id(), log.display());
    Ok(child.id())
}

/// One member of a group failover, as prepared before any is failed over.
struct GroupMember<'a> {
    vm: &'a str,
    /// Its share of the group point; none: its newest data (planned).
    point: Option<String>,
    cache: tern_store::object::Store,
    plan: crate::failover::LaunchPlan,
}

/// The members of a group for a planned failover (no group point is
/// used): the newest group point's, else this site's `groups.toml`.
fn planned_members(cli: &Cli, group: &str, points: &[crate::group::GroupPoint]) -> Result<Vec<String>> {
    let newest: Option<Vec<String>> = points.last().map(|g| g.members.iter().map(|(vm, _)| vm.clone()).collect());
    let defined = crate::group::Groups::load(&cli.state)?.groups.get(group).map(|g| {
        let mut members = g.members.clone();
        members.sort();
        members.dedup();
        members
    });
    match (defined, newest) {
        // Here where the group is defined: it must be the group the target
        // knows, or some member would keep running at the source.
        (Some(defined), Some(newest)) if defined != newest => bail!(
            "group '{group}' has members {} here but {} in its newest group point at the target: cut a group point (`tern tag --group {group} LABEL`) and let it be applied, so both sites agree, then fail over",
            defined.join(", "),
            newest.join(", ")
        ),
        (Some(members), _) | (None, Some(members)) => Ok(members),
        (None, None) => bail!(
            "group '{group}' is not defined here ({}) and has no group point at the target to learn its members from",
            crate::group::groups_file(&cli.state).display()
        ),
    }
}

/// The order a group's members boot in: `first` (each a member, once),
/// then the others in name order.
fn boot_order<'a>(group: &str, members: &'a [String], first: &[String]) -> Result<Vec<&'a String>> {
    let mut order: Vec<&String> = Vec::new();
    for vm in first {
        let m = members.iter().find(|m| *m == vm).with_context(|| {
            format!(
                "--boot-order names '{vm}', which is not a member of group '{group}' ({}); nothing is failed over",
                members.join(", ")
            )
        })?;
        if order.contains(&m) {
            bail!("--boot-order names '{vm}' twice; nothing is failed over");
        }
        order.push(m);
    }
    order.extend(members.iter().filter(|m| !first.contains(m)));
    Ok(order)
}

/// `tern failover --group`: every member at one group point, test or real,
/// in the members' name order (booted in that order with --boot).
fn run_group(cli: &Cli, a: &Args, group: &str) -> Result<()> {
    validate_name("group", group)?;
    let target = crate::group::target_of(&cli.state, group, a.target.as_deref())?;
    let points = crate::group::group_points(&target, group)?;
    // A planned failover stops every source and fails each over with all
    // it wrote (no acknowledged write is lost anywhere, so no member holds
    // a consequence without its cause): no group point is needed.
    let chosen = if a.planned {
        None
    } else {
        Some(match &a.point {
        Some(id) => points.iter().find(|g| &g.id == id).with_context(|| {
            let ids: Vec<&str> = points.iter().map(|g| g.id.as_str()).collect();
            format!(
                "group '{group}' has no complete group point '{id}' at {} (it has: {})",
                target.display(),
                if ids.is_empty() { "none".into() } else { ids.join(", ") }
            )
        })?,
        // Each member's newest data would not be one instant: the newest
        // group point is the newest consistent one.
        None => points.last().with_context(|| {
            format!(
                "group '{group}' has no complete group point at {} yet: cut one with `tern tag --group {group} LABEL` and let `tern apply` take it",
                target.display()
            )
        })?,
        })
    };
    let started = Instant::now();
    let names: Vec<String> = match &chosen {
        Some(g) => g.members.iter().map(|(vm, _)| vm.clone()).collect(),
        None => planned_members(cli, group, &points)?,
    };
    let order = boot_order(group, &names, &a.boot_order)?;
    // Each member with its point (the group point's share, or, planned, its
    // newest data once its source stopped), cache and launch plan; every
    // member's bridges checked before any is failed over.
    let refused = || format!("group '{group}': nothing is failed over");
    let mut members = Vec::new();
    for vm in &names {
        let (_, cache) = sites(cli, vm, Some(&target), a.cache.as_deref())?;
        let plan = crate::failover::launch_plan(&cache, vm, &a.network()).with_context(refused)?;
        if a.boot {
            crate::failover::check_bridges(vm, &plan).with_context(refused)?;
        }
        let point = chosen.and_then(|g| g.members.iter().find(|(m, _)| m == vm)).map(|(_, p)| p.id.clone());
        members.push(GroupMember { vm: vm.as_str(), point, cache, plan });
    }
    let vms: Vec<&str> = names.iter().map(String::as_str).collect();
    let each: Vec<&crate::failover::LaunchPlan> = members.iter().map(|m| &m.plan).collect();
    crate::failover::refuse_test_network_without_nics(&vms, a.test_network.as_deref(), &each)?;
    // Every member able to fail over before any is: a member that cannot
    // must not leave the others fenced (the application half failed over).
    for m in &members {
        crate::failover::precheck(&target, &m.cache, m.vm, m.point.as_deref(), a.test, a.planned, a.name.as_deref())
            .with_context(refused)?;
    }
    let stopped: Vec<Option<crate::failover::Planned>> = if a.planned {
        let stores: Vec<&tern_store::object::Store> = members.iter().map(|m| &m.cache).collect();
        crate::failover::stop_sources(&target, &stores, &vms, a.timeout)
            .with_context(|| format!("group '{group}'"))?
            .into_iter()
            .map(|seq| Some(crate::failover::Planned::Stopped(seq)))
            .collect()
    } else {
        names.iter().map(|_| None).collect()
    };
    let mut done = Vec::new();
    for (m, planned) in members.iter().zip(stopped) {
        let vm = m.vm;
        let choice = m.point.clone().map_or(Choice::Latest, Choice::Point);
        let f = if a.test {
            make_failover(&target, &m.cache, vm, &choice, a.name.as_deref(), true, &m.plan)
        } else {
            real_failover(&target, &m.cache, vm, &choice, planned, &m.plan)
        };
        let f = f.with_context(|| {
            let before: Vec<&str> =
                done.iter().map(|(vm, _): &(String, crate::failover::Failover)| vm.as_str()).collect();
            let rest: Vec<&str> = names.iter().map(String::as_str).filter(|m| !before.contains(m)).collect();
            let next = if before.is_empty() {
                String::new()
            } else if a.planned {
                format!(
                    " (already failed over: {}); the sources of {} are stopped and shipped everything: finish with `tern failover VM --latest` for each of them",
                    before.join(", "),
                    rest.join(", ")
                )
            } else {
                format!(
                    " (already failed over: {}); run the same command again to finish: those are redone at the same group point",
                    before.join(", ")
                )
            };
            format!("group '{group}': the failover of VM '{vm}' failed{next}")
        })?;
        done.push((vm.to_owned(), f));
    }
    let mut booted = Vec::new();
    if a.boot {
        for (i, vm) in order.iter().enumerate() {
            if i > 0 {
                if let Some(wait) = a.boot_wait {
                    log::info!(
                        "group '{group}': waiting {} before starting VM '{vm}'",
                        humantime::format_duration(wait)
                    );
                    std::thread::sleep(wait);
                }
            }
            let (_, f) = done.iter().find(|(d, _)| d == *vm).expect("every member failed over");
            let pid = boot(vm, f).with_context(|| {
                let started: Vec<&str> = booted.iter().filter_map(|b: &serde_json::Value| b["vm"].as_str()).collect();
                format!(
                    "group '{group}': every member is failed over; started: {}; not started: the rest, in order from VM '{vm}' (start each with its launch.sh)",
                    if started.is_empty() { "none".into() } else { started.join(", ") }
                )
            })?;
            booted.push(serde_json::json!({
                "vm": vm, "pid": pid,
                "started": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            }));
        }
    }
    let time =
        chosen.map(|g| humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_nanos(g.time_ns)).to_string());
    if a.json {
        let members: Vec<serde_json::Value> = done
            .iter()
            .map(|(vm, f)| {
                let mut m = failover_json(f);
                m.insert("vm".into(), vm.as_str().into());
                m.into()
            })
            .collect();
        let out = serde_json::json!({
            "group": group, "point": chosen.map(|g| &g.id), "label": chosen.and_then(|g| g.label.as_ref()),
            "time": time, "test": a.test, "planned": a.planned,
            "members": members, "ready_seconds": started.elapsed().as_secs_f64(), "booted": booted,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        match (chosen, &time) {
            (Some(g), Some(time)) => println!(
                "{} of group '{group}' from group point {} ({time}) ready in {:.2?}:",
                if a.test { "test failover" } else { "failover" },
                g.id,
                started.elapsed()
            ),
            _ => println!(
                "planned failover of group '{group}' ready in {:.2?}: every source stopped and shipped everything (RPO 0):",
                started.elapsed()
            ),
        }
        for (vm, f) in &done {
            println!("  VM '{vm}': '{}' from point {} (seq {}): {}", f.name, f.point.id, f.point.seq, f.dir.display());
        }
        if !booted.is_empty() {
            let started: Vec<String> = order.iter().map(|vm| format!("'{vm}'")).collect();
            println!("started, in this order: {} (consoles in each failover's console.log)", started.join(", "));
        }
        if !a.test {
            let commits: Vec<String> = done.iter().map(|(vm, _)| format!("`tern commit {vm}`")).collect();
            println!("the sources are fenced; check the VMs, then {}", commits.join(", "));
        }
    }
    Ok(())
}

pub fn cleanup(cli: &Cli, a: &CleanupArgs) -> Result<()> {
    let (target_root, _) = sites(cli, &a.vm, a.target.as_deref(), None)?;
    let dir = crate::failover::remove_test(&target_root, &a.vm, &a.name)?;
    println!("removed test failover '{}' of VM '{}' ({})", a.name, a.vm, dir.display());
    Ok(())
}
