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
    pub vm: String,
    /// The target site (default: the one in the VM's vm.toml, when this
    /// host has it).
    #[arg(long)]
    pub target: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(cli: &Cli, a: &Args) -> Result<()> {
    tern_driver::vm::validate_name("VM", &a.vm)?;
    let target = match &a.target {
        Some(t) => t.clone(),
        None => {
            VmPaths::new(&cli.state, &a.vm)?
                .load_config()
                .map_err(|e| anyhow::anyhow!("{e}; on the target host, name the target site with --target"))?
                .target
        }
    };
    let dir = TargetDir::new(&target, &a.vm);
    if !dir.root().is_dir() {
        anyhow::bail!(
            "{} does not exist: VM '{}' has no replica at this target site (is `tern apply` running?)",
            dir.root().display(),
            a.vm
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
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if points.is_empty() {
        println!("VM '{}' has no recovery points yet", a.vm);
        return Ok(());
    }
    println!("{:<24} {:>12}  {:<5}  {:<29}  label", "id", "seq", "kind", "time (source)");
    for p in &points {
        println!(
            "{:<24} {:>12}  {:<5}  {:<29}  {}",
            p.id,
            p.seq,
            p.kind.name(),
            time(p.time_ns),
            p.label.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}
