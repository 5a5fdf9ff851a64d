//! `tern tag`: an application-consistent marker appended to a VM's
//! journal, which the target turns into a named point — with the guest's
//! filesystems frozen through its agent when asked (`--freeze`, or the
//! VM's `[app-points]`); with `--group`, a group point cut across every
//! member at one instant.

use std::time::Duration;

use anyhow::{bail, Result};
use tern_driver::vm::VmPaths;

use super::Cli;
use crate::freeze::{Agent, Quiescing};

#[derive(Debug, clap::Args)]
#[command(override_usage = "tern tag <VM> <LABEL> [--freeze qga:SOCKET]\n       tern tag --group <GROUP> <LABEL>")]
pub struct Args {
    /// The VM, then the point's label (1 to 256 bytes of printable text);
    /// with --group, the label alone.
    #[arg(required = true, num_args = 1..=2, value_name = "VM> <LABEL")]
    pub args: Vec<String>,
    /// A group point: every member of the group cut at one instant (new
    /// writes wait while the tags take their places: well under a
    /// millisecond). Members with a freeze agent in their `[app-points]`
    /// are frozen first.
    #[arg(long)]
    pub group: Option<String>,
    /// Freeze the guest's filesystems through its qemu guest agent for the
    /// point (guest-fsfreeze-freeze, the tag, guest-fsfreeze-thaw); the
    /// default is the VM's `[app-points] freeze`.
    #[arg(long, value_name = "qga:SOCKET", conflicts_with_all = ["group", "no_freeze"])]
    pub freeze: Option<Agent>,
    /// Do not freeze, even if the VM's `[app-points]` say to.
    #[arg(long)]
    pub no_freeze: bool,
    /// How long the freeze may take before the point is taken
    /// crash-consistent (the guest is thawed regardless). Default: the
    /// VM's `[app-points] freeze-timeout`, 10s.
    #[arg(long, value_parser = parse_freeze_timeout, conflicts_with = "group")]
    pub freeze_timeout: Option<Duration>,
    /// Print the tag as JSON: vm, seq, label, consistency, and the freeze.
    #[arg(long, conflicts_with = "group")]
    pub json: bool,
}

fn parse_freeze_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    tern_driver::vm::check_freeze_timeout(d).map(|()| d)
}

/// Publishes a tag record straight into the VM's journal (producers in any
/// process may append). Every write acknowledged before this call precedes
/// it, so with the application quiesced — or the guest frozen — the point
/// taken there is application-consistent.
pub fn run(cli: &Cli, a: &Args) -> Result<()> {
    // A guest frozen for the tag must be thawed: a first SIGINT or SIGTERM
    // waits for the tag and the thaw (a few seconds, a minute at most), a
    // second one ends the process at once.
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, std::sync::Arc::clone(&interrupted))?;
        signal_hook::flag::register(sig, std::sync::Arc::clone(&interrupted))?;
    }
    tag(cli, a)?;
    if interrupted.load(std::sync::atomic::Ordering::Acquire) {
        bail!("interrupted: the tag was finished first (and any guest frozen for it thawed)");
    }
    Ok(())
}

fn tag(cli: &Cli, a: &Args) -> Result<()> {
    if let Some(group) = &a.group {
        let [label] = a.args.as_slice() else {
            bail!("with --group, give the label alone: tern tag --group {group} LABEL");
        };
        return tag_group(cli, group, label, !a.no_freeze);
    }
    let [vm, label] = a.args.as_slice() else {
        bail!("give the VM and the label: tern tag VM LABEL (or tern tag --group GROUP LABEL)");
    };
    let paths = VmPaths::new(&cli.state, vm)?;
    let config = paths.load_config()?;
    let journal = paths.open_journal()?;
    if journal.vm_id() != *config.id.as_bytes() {
        bail!("journal {} belongs to another VM than '{vm}'", journal.path().display());
    }
    let quiescing = Quiescing::of(&config, a.freeze.as_ref(), a.no_freeze, a.freeze_timeout)?;
    let Some(t) = crate::freeze::tag(&journal, &paths, label, &quiescing)? else {
        bail!(
            "cannot tag VM '{vm}': its journal is full or catching up after an overflow, so no consistent point can be taken now; retry once `tern ship` has caught up"
        );
    };
    if a.json {
        let out = serde_json::json!({
            "vm": vm, "seq": t.seq, "label": label,
            "consistency": tern_store::target::Quiesce::consistency(t.quiesce.as_ref()),
            "freeze": t.quiesce.as_ref().map(|q| serde_json::json!({
                "agent": q.agent, "frozen": q.frozen, "filesystems": q.filesystems, "reason": q.reason,
                "freeze_seconds": t.freeze_answered.map(|d| d.as_secs_f64()),
                "frozen_seconds": t.thawed.as_ref().filter(|_| q.frozen).map(|th| th.frozen_for.as_secs_f64()),
                "thaw_confirmed": t.thawed.as_ref().map(|th| th.result.is_ok()),
            })),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        match &t.quiesce {
            Some(q) => println!(
                "tagged VM '{vm}' at seq {}: '{label}', {}",
                t.seq,
                crate::freeze::describe(q, t.freeze_answered, t.thawed.as_ref())
            ),
            None => println!("tagged VM '{vm}' at seq {}: '{label}'", t.seq),
        }
    }
    Ok(())
}

fn tag_group(cli: &Cli, group: &str, label: &str, freeze: bool) -> Result<()> {
    let groups = crate::group::Groups::load(&cli.state)?;
    let cut = crate::group::cut(&cli.state, group, groups.get(group)?, Some(label), freeze, true)?;
    let seqs: Vec<String> = cut.seqs.iter().map(|(vm, seq)| format!("{vm} seq {seq}")).collect();
    println!(
        "group point {} of group '{group}': '{label}' ({}); writes held {:.2} ms{}",
        cut.tag.point,
        seqs.join(", "),
        cut.held.as_secs_f64() * 1000.0,
        crate::freeze::describe_group(&cut)
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct ThawArgs {
    pub vm: String,
    /// The agent (default: the one the last app point asked, else the
    /// VM's `[app-points] freeze`).
    #[arg(long, value_name = "qga:SOCKET")]
    pub freeze: Option<Agent>,
}

/// `tern thaw`: `guest-fsfreeze-thaw`, then `guest-fsfreeze-status` must
/// say thawed; the unconfirmed thaw `tern status` reports is cleared.
pub fn thaw(cli: &Cli, a: &ThawArgs) -> Result<()> {
    let paths = VmPaths::new(&cli.state, &a.vm)?;
    let config = paths.load_config()?;
    let last = crate::freeze::LastAppPoint::load(&paths);
    let recorded = last.as_ref().and_then(|l| l.agent.clone()).or_else(|| config.app_points.freeze.clone());
    let agent = match (&a.freeze, recorded) {
        (Some(agent), _) => agent.clone(),
        (None, Some(spec)) => spec.parse().map_err(anyhow::Error::msg)?,
        (None, None) => bail!("VM '{}' has no freeze agent on record: name it with --freeze qga:SOCKET", a.vm),
    };
    let status = crate::freeze::thaw_now(&agent)?;
    if status != "thawed" {
        bail!("VM '{}': the agent at {agent} thawed, yet says the guest is {status}: check the guest", a.vm);
    }
    if let Some(mut last) = last.filter(|l| l.thaw_unconfirmed.is_some()) {
        last.thaw_unconfirmed = None;
        last.record(&paths);
    }
    println!("VM '{}': thawed through {agent} (the agent says: {status})", a.vm);
    Ok(())
}
