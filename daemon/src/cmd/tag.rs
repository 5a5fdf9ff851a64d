//! `tern tag`: an application-consistent marker appended to a VM's
//! journal, which the target turns into a named point; with `--group`, a
//! group point cut across every member at one instant.

use anyhow::{bail, Result};
use tern_driver::vm::VmPaths;

use super::Cli;

#[derive(Debug, clap::Args)]
#[command(override_usage = "tern tag <VM> <LABEL>\n       tern tag --group <GROUP> <LABEL>")]
pub struct Args {
    /// The VM, then the point's label (1 to 256 bytes of printable text);
    /// with --group, the label alone.
    #[arg(required = true, num_args = 1..=2, value_name = "VM> <LABEL")]
    pub args: Vec<String>,
    /// A group point: every member of the group cut at one instant (new
    /// writes wait while the tags take their places: well under a
    /// millisecond).
    #[arg(long)]
    pub group: Option<String>,
}

/// Publishes a tag record straight into the VM's journal (producers in any
/// process may append). Every write acknowledged before this call precedes
/// it, so with the application quiesced the point taken there is
/// application-consistent.
pub fn run(cli: &Cli, a: &Args) -> Result<()> {
    if let Some(group) = &a.group {
        let [label] = a.args.as_slice() else {
            bail!("with --group, give the label alone: tern tag --group {group} LABEL");
        };
        return tag_group(cli, group, label);
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
    let Some(seq) = tern_driver::tag::append(&journal, &paths.tag_lock(), label)? else {
        bail!(
            "cannot tag VM '{vm}': its journal is full or catching up after an overflow, so no consistent point can be taken now; retry once `tern ship` has caught up"
        );
    };
    println!("tagged VM '{vm}' at seq {seq}: '{label}'");
    Ok(())
}

fn tag_group(cli: &Cli, group: &str, label: &str) -> Result<()> {
    let groups = crate::group::Groups::load(&cli.state)?;
    let cut = crate::group::cut(&cli.state, group, groups.get(group)?, Some(label))?;
    let seqs: Vec<String> = cut.seqs.iter().map(|(vm, seq)| format!("{vm} seq {seq}")).collect();
    println!(
        "group point {} of group '{group}': '{label}' ({}); writes held {:.2} ms",
        cut.tag.point,
        seqs.join(", "),
        cut.held.as_secs_f64() * 1000.0
    );
    Ok(())
}
