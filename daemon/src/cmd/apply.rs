use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::apply::{self, ApplyOptions};
use crate::Cli;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The cache store segments arrive in.
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
}

pub fn run(_cli: &Cli, a: &Args) -> Result<()> {
    if let Some(vm) = &a.vm {
        tern_driver::vm::validate_name("VM", vm)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [SIGTERM, SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("cannot install signal handlers")?;
    }
    let options = ApplyOptions { once: a.once, keep_segments: a.keep_segments };
    apply::run(&a.cache, &a.target, a.vm.as_deref(), &options, stop)
}
