//! `tern points`: the recovery points of a VM at the target site, from its
//! catalog, as text or JSON.

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Result;
use tern_driver::vm::VmPaths;
use tern_store::target::TargetDir;

use super::Cli;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(required_unless_present = "group")]
    pub vm: Option<String>,
    /// The group points of a group (`tern tag --group`): only those every
    /// member has its point of.
    #[arg(long, conflicts_with = "vm")]
    pub group: Option<String>,
    /// The target site (default: the one in the VM's vm.toml, when this
    /// host has it).
    #[arg(long)]
    pub target: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(cli: &Cli, a: &Args) -> Result<()> {
    if let Some(group) = &a.group {
        return group_points(cli, a, group);
    }
    let vm = a.vm.as_deref().expect("clap: a VM or --group");
    tern_driver::vm::validate_name("VM", vm)?;
    let target = match &a.target {
        Some(t) => t.clone(),
        None => {
            VmPaths::new(&cli.state, vm)?
                .load_config()
                .map_err(|e| anyhow::anyhow!("{e}; on the target host, name the target site with --target"))?
                .target
        }
    };
    let dir = TargetDir::new(&target, vm);
    if !dir.root().is_dir() {
        anyhow::bail!(
            "{} does not exist: VM '{}' has no replica at this target site (is `tern apply` running?)",
            dir.root().display(),
            vm
        );
    }
    let points = dir.list_points()?;
    let time = |ns: u64| humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_nanos(ns)).to_string();
    if a.json {
        let list: Vec<serde_json::Value> = points
            .iter()
            .map(|p| {
                let disks: serde_json::Map<String, serde_json::Value> = p
                    .disks
                    .iter()
                    .map(|(name, file)| (name.clone(), dir.point_dir(&p.id).join(file).display().to_string().into()))
                    .collect();
                serde_json::json!({
                    "id": p.id, "seq": p.seq, "epoch": p.epoch, "time": time(p.time_ns), "kind": p.kind.name(),
                    "label": p.label, "clone": p.clone, "disks": disks,
                    "consistency": p.consistency(), "quiesce": p.quiesce,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if points.is_empty() {
        println!("VM '{vm}' has no recovery points yet");
        return Ok(());
    }
    println!("{:<24} {:>12}  {:<5}  {:<29}  label", "id", "seq", "kind", "time (source)");
    for p in &points {
        println!("{:<24} {:>12}  {:<5}  {:<29}  {}", p.id, p.seq, p.kind.name(), time(p.time_ns), label_of(p));
    }
    Ok(())
}

/// The label, and how the guest was quiesced if an agent was asked.
fn label_of(p: &tern_store::target::Point) -> String {
    let label = p.label.as_deref().unwrap_or("-");
    match &p.quiesce {
        Some(q) if q.frozen => format!("{label} (guest frozen: {} filesystems)", q.filesystems.unwrap_or(0)),
        Some(q) => format!("{label} (CRASH-CONSISTENT: {})", q.reason.as_deref().unwrap_or("the guest was not frozen")),
        None => label.to_owned(),
    }
}

fn group_points(cli: &Cli, a: &Args, group: &str) -> Result<()> {
    tern_driver::vm::validate_name("group", group)?;
    let target = crate::group::target_of(&cli.state, group, a.target.as_deref())?;
    let points = crate::group::group_points(&target, group)?;
    let time = |ns: u64| humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_nanos(ns)).to_string();
    if a.json {
        let list: Vec<serde_json::Value> = points
            .iter()
            .map(|g| {
                let members: Vec<serde_json::Value> = g
                    .members
                    .iter()
                    .map(|(vm, p)| {
                        serde_json::json!({ "vm": vm, "point": p.id, "seq": p.seq, "consistency": p.consistency() })
                    })
                    .collect();
                serde_json::json!({ "id": g.id, "label": g.label, "time": time(g.time_ns), "members": members })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if points.is_empty() {
        println!("group '{group}' has no group points at {} yet", target.display());
        return Ok(());
    }
    println!("{:<16} {:<29}  {:<24}  members", "id", "time (source)", "label");
    for g in &points {
        let members: Vec<String> = g.members.iter().map(|(vm, p)| format!("{vm}@{}", p.seq)).collect();
        println!(
            "{:<16} {:<29}  {:<24}  {}",
            g.id,
            time(g.time_ns),
            g.label.as_deref().unwrap_or("-"),
            members.join(" ")
        );
    }
    Ok(())
}
