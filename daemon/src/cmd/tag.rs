//! `tern tag`: an application-consistent marker appended to a VM's
//! journal, which the target turns into a named point.

use anyhow::{bail, Result};
use tern_driver::vm::VmPaths;

use super::Cli;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub vm: String,
    /// The point's label: 1 to 256 bytes of printable text.
    pub label: String,
}

/// Publishes a tag record straight into the VM's journal (producers in any
/// process may append). Every write acknowledged before this call precedes
/// it, so with the application quiesced the point taken there is
/// application-consistent.
pub fn run(cli: &Cli, a: &Args) -> Result<()> {
    let label = a.label.as_str();
    let paths = VmPaths::new(&cli.state, &a.vm)?;
    let config = paths.load_config()?;
    let journal = paths.open_journal()?;
    if journal.vm_id() != *config.id.as_bytes() {
        bail!("journal {} belongs to another VM than '{}'", journal.path().display(), a.vm);
    }
    let Some(seq) = tern_driver::tag::append(&journal, &paths.tag_lock(), label)? else {
        bail!(
            "cannot tag VM '{}': its journal is full or catching up after an overflow, so no consistent point can be taken now; retry once `tern ship` has caught up",
            a.vm
        );
    };
    println!("tagged VM '{}' at seq {seq}: '{label}'", a.vm);
    Ok(())
}
