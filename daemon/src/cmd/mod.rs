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

/// What to do about the system errors an operator meets most, found
/// anywhere in an error's chain of causes (the error itself names the file).
pub fn hint_for(e: &anyhow::Error) -> Option<&'static str> {
    let errno = e.chain().find_map(|c| c.downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error))?;
    match errno {
        nix::libc::ENOSPC | nix::libc::EDQUOT => Some(
            "the filesystem named above is full: free space there (at a target site, `tern points` shows what old points hold; retention removes expired ones) and run the command again",
        ),
        nix::libc::EROFS => Some("the filesystem named above is mounted read-only: remount it read-write"),
        nix::libc::EACCES | nix::libc::EPERM => {
            Some("permission denied on the path named above: run tern as the user that owns it (usually root)")
        }
        nix::libc::EIO => Some("the storage under the path named above reported an I/O error: check the device (dmesg)"),
        _ => None,
    }
}
