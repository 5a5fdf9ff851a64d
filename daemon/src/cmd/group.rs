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
            let mut members = vms.clone();
            members.dedup();
            groups.groups.insert(group.clone(), Group { members });
            groups.save(&cli.state)?;
            println!("created group '{group}': {}", vms.join(", "));
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
