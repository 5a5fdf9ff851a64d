//! One module per subcommand: its arguments and what it does.

pub mod apply;
pub mod demo;
pub mod disable;
pub mod enable;
pub mod failover;
pub mod journal;
pub mod points;
pub mod reprotect;
pub mod segment;
pub mod serve;
pub mod ship;
pub mod status;
pub mod tag;
pub mod verify;

/// `--onto NAME=PATH`: a disk copy a replay writes onto.
pub fn parse_onto(s: &str) -> Result<(String, std::path::PathBuf), String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok((name.to_owned(), path.into())),
        _ => Err(format!("{s:?}: expected NAME=PATH, as in disk0=/var/lib/images/vm1.img")),
    }
}
