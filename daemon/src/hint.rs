//! What to do about the system errors an operator meets most: one line of
//! advice, printed after an error (`main`) or logged with it (the applier's
//! retries), next to the error that names the file.

/// The advice for the first system error found anywhere in `e`'s chain of
/// causes, if it is one of those.
pub fn for_error(e: &anyhow::Error) -> Option<&'static str> {
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
