//! `tern group`: groups of VMs recovered together (see [`crate::group`]).

use anyhow::{bail, Result};
use tern_driver::vm::VmPaths;

use super::Cli;
use crate::group::{Group, Groups};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: GroupCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum GroupCommand {
    /// A new group of enabled VMs.
    Create {
        group: String,
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Add VMs to a group.
    Add {
        group: String,
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Remove VMs from a group (the group goes with its last member).
    Remove {
        group: String,
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// The groups and their members.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Cut a group point every interval until stopped (tern-group@GROUP):
    /// crash-consistent across the members, labelled "scheduled".
    Run {
        group: String,
        /// Between two cuts.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// Do not freeze the members whose `[app-points]` name a freeze
        /// agent (the points are then as consistent as a crash).
        #[arg(long)]
        no_freeze: bool,
    },
}

/// Each VM must be enabled here.
fn check_vms(cli: &Cli, vms: &[String]) -> Result<()> {
    for vm in vms {
        let paths = VmPaths::new(&cli.state, vm)?;
        if !paths.config().exists() {
            bail!("VM '{vm}' is not enabled in {}: run `tern enable {vm} …` first", cli.state.display());
        }
    }
    Ok(())
}

pub fn run(cli: &Cli, a: &Args) -> Result<()> {
    let mut groups = Groups::load(&cli.state)?;
    match &a.command {
        GroupCommand::Create { group, vms } => {
            tern_driver::vm::validate_name("group", group)?;
            if groups.groups.contains_key(group) {
                bail!("group '{group}' exists already; add VMs with `tern group add {group} VM...`");
            }
            check_vms(cli, vms)?;
            let mut members: Vec<String> = Vec::new();
            for vm in vms {
                if !members.contains(vm) {
                    members.push(vm.clone());
                }
            }
            println!("created group '{group}': {}", members.join(", "));
            groups.groups.insert(group.clone(), Group { members });
            groups.save(&cli.state)?;
        }
        GroupCommand::Add { group, vms } => {
            check_vms(cli, vms)?;
            groups.get(group)?;
            let g = groups.groups.get_mut(group).expect("checked");
            for vm in vms {
                if !g.members.contains(vm) {
                    g.members.push(vm.clone());
                }
            }
            let members = g.members.join(", ");
            groups.save(&cli.state)?;
            println!("group '{group}': {members}");
        }
        GroupCommand::Remove { group, vms } => {
            let g = groups.get(group)?;
            if let Some(vm) = vms.iter().find(|vm| !g.members.contains(vm)) {
                bail!("VM '{vm}' is not in group '{group}' (members: {})", g.members.join(", "));
            }
            let g = groups.groups.get_mut(group).expect("checked");
            g.members.retain(|m| !vms.contains(m));
            if g.members.is_empty() {
                groups.groups.remove(group);
                println!("removed group '{group}' with its last member");
            } else {
                println!("group '{group}': {}", g.members.join(", "));
            }
            groups.save(&cli.state)?;
        }
        GroupCommand::Run { group, interval, no_freeze } => return run_schedule(cli, group, *interval, !no_freeze),
        GroupCommand::List { json } => {
            if *json {
                let list: Vec<serde_json::Value> = groups
                    .groups
                    .iter()
                    .map(|(name, g)| serde_json::json!({ "group": name, "members": g.members }))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if groups.groups.is_empty() {
                println!("no groups (create one with `tern group create GROUP VM...`)");
            } else {
                for (name, g) in &groups.groups {
                    println!("{name}: {}", g.members.join(", "));
                }
            }
        }
    }
    Ok(())
}

/// The longest a scheduled cut may take before the watchdog hears no more:
/// the longest freeze (60 s), two thaw waits (10 s each) and the cut.
const CUT_BUDGET: std::time::Duration = std::time::Duration::from_secs(100);

/// `tern group run`: a cut every `interval`; one that fails is logged with
/// its reason (a member down, in overflow) and the next is tried on time.
fn run_schedule(cli: &Cli, group: &str, interval: std::time::Duration, freeze: bool) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    if interval < std::time::Duration::from_secs(1) {
        bail!("--interval {interval:?} is too short: give 1s or more");
    }
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, std::sync::Arc::clone(&stop))?;
    }
    Groups::load(&cli.state)?.get(group)?;
    log::info!("group '{group}': a group point every {}", humantime::format_duration(interval));
    crate::notify::ready(&format!("cutting group '{group}' every {}", humantime::format_duration(interval)));
    let mut every = crate::every::Every::starting(std::time::Instant::now(), interval);
    while !stop.load(Ordering::Acquire) {
        crate::notify::watchdog();
        if !every.due() {
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        // Members may have changed since the last cut. The cut runs on a
        // thread of its own so that the watchdog hears from this one while
        // guests freeze (up to 60 s, then the thaws), but no longer: a cut
        // hung past that gets the service restarted.
        let started = std::time::Instant::now();
        let result = std::thread::scope(|s| {
            let cutting = s.spawn(|| {
                Groups::load(&cli.state)
                    .and_then(|g| crate::group::cut(&cli.state, group, g.get(group)?, Some("scheduled"), freeze, false))
            });
            while !cutting.is_finished() {
                if started.elapsed() < CUT_BUDGET {
                    crate::notify::watchdog();
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            cutting.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the cut panicked")))
        });
        match result {
            Ok(cut) => {
                let seqs: Vec<String> = cut.seqs.iter().map(|(vm, seq)| format!("{vm} seq {seq}")).collect();
                log::info!(
                    "group '{group}': group point {} ({}); writes held {:.2} ms{}",
                    cut.tag.point,
                    seqs.join(", "),
                    cut.held.as_secs_f64() * 1000.0,
                    crate::freeze::describe_group(&cut)
                );
                crate::notify::status(&format!("group '{group}': last group point {}", cut.tag.point));
            }
            Err(e) => {
                log::error!("{e:#}; trying again in {}", humantime::format_duration(interval));
                crate::notify::status(&format!("group '{group}': the last cut failed: {e:#}"));
            }
        }
    }
    Ok(())
}
