//! `tern-crashfs <mountpoint> --control <socket>`: mounts the power-cut
//! filesystem, serves it and its control socket until SIGTERM, SIGINT or the
//! `exit` command, then unmounts.
#![deny(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};

use anyhow::Context;
use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tern_crashfs::daemon::{serve_control, Daemon};

/// A FUSE filesystem that simulates power loss, for tern's torture tests.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Directory to mount on (must exist).
    mountpoint: PathBuf,
    /// Unix socket to take control commands on (replaced if it exists).
    #[arg(long)]
    control: PathBuf,
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let daemon =
        Arc::new(Daemon::new(&args.mountpoint).with_context(|| format!("mountpoint {}", args.mountpoint.display()))?);
    daemon.mount()?;
    let (exit_tx, exit_rx) = mpsc::channel();
    if let Err(e) = serve_control(Arc::clone(&daemon), &args.control, exit_tx.clone()) {
        daemon.shutdown();
        return Err(e).with_context(|| format!("control socket {}", args.control.display()));
    }
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("signal handlers")?;
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            log::info!("signal {signal}: exiting");
            let _ = exit_tx.send(());
        }
    });
    let mut stdout = std::io::stdout();
    writeln!(stdout, "ready {}", daemon.mountpoint().display())?;
    stdout.flush()?;

    // Every sender lives as long as the process, so this only returns on a message.
    let _ = exit_rx.recv();
    daemon.shutdown();
    let _ = std::fs::remove_file(&args.control);
    Ok(())
}
