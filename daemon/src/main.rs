//! `tern`: the one command that drives replication of VM disks.
#![deny(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

use cmd::Cli;

mod apply;
mod cache;
mod cmd;
mod every;
mod failover;
mod freeze;
mod group;
mod hint;
mod metrics;
mod notify;
mod reprotect;
mod ship;
mod status;
mod verify;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => log::LevelFilter::Warn,
        (false, 0) => log::LevelFilter::Info,
        (false, 1) => log::LevelFilter::Debug,
        (false, _) => log::LevelFilter::Trace,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .parse_env("TERN_LOG")
        .format_target(false)
        .format_timestamp_millis()
        .init();
    let result = cmd::run(&cli);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: what happened, through every cause.
            eprintln!("tern: error: {e:#}");
            if let Some(hint) = hint::for_error(&e) {
                eprintln!("tern: {hint}");
            }
            if let Some(u) = e.downcast_ref::<cmd::status::Unhealthy>() {
                // Monitoring plugins' convention: 1 warning, 2 critical.
                return ExitCode::from(u.health as u8);
            }
            if e.chain().any(|c| c.downcast_ref::<ship::Fenced>().is_some()) {
                // systemd: RestartPreventExitStatus=3, a fenced shipper stays down.
                return ExitCode::from(3);
            }
            ExitCode::FAILURE
        }
    }
}
