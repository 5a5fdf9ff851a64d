//! `tern apply`: its arguments, the signals that stop it, and the start
//! of the applier ([`crate::apply::run`]) at the target site.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};

use tern_driver::units::Size;

use super::Cli;
use crate::apply::{self, ApplyOptions};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The cache store segments arrive in: a directory,
    /// s3://BUCKET/PREFIX or az://CONTAINER/PREFIX.
    #[arg(long)]
    pub cache: PathBuf,
    /// The target site: replicas and points go to <target>/<vm>/.
    #[arg(long)]
    pub target: PathBuf,
    /// Only this VM (default: every VM in the cache store).
    pub vm: Option<String>,
    /// Apply what the cache holds now, then exit.
    #[arg(long)]
    pub once: bool,
    /// Leave applied segments in the cache (they are deleted by default,
    /// all but the newest).
    #[arg(long)]
    pub keep_segments: bool,
    /// Record data gathered into one batch before it is written (each
    /// byte's last version, in offset order): the applier's memory, besides
    /// up to 128 MiB read ahead. Larger batches merge more writes.
    #[arg(long, default_value_t = Size(ApplyOptions::DEFAULT_BATCH_LIMIT as u64))]
    pub batch_size: Size,
    /// Record data written to the replicas between two fsyncs (checked as
    /// each batch is written; a point and an emptied cache sync sooner):
    /// a crash makes the applier replay from the kept segments less than
    /// this plus a batch.
    #[arg(long, default_value_t = Size(ApplyOptions::DEFAULT_SYNC_LIMIT as u64))]
    pub sync_every: Size,
}

pub fn run(_cli: &Cli, a: &Args) -> Result<()> {
    if let Some(vm) = &a.vm {
        tern_driver::vm::validate_name("VM", vm)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [SIGTERM, SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("cannot install signal handlers")?;
    }
    for (flag, size) in [("--batch-size", a.batch_size), ("--sync-every", a.sync_every)] {
        if !(4096..=1 << 40).contains(&size.0) {
            bail!("{flag} {size} is out of range: give 4KiB to 1TiB (e.g. 256MiB)");
        }
    }
    let options = ApplyOptions {
        once: a.once,
        keep_segments: a.keep_segments,
        batch_limit: a.batch_size.0 as usize,
        sync_limit: a.sync_every.0 as usize,
    };
    apply::run(&crate::cache::open_store(&a.cache)?, &a.target, a.vm.as_deref(), &options, stop)
}
