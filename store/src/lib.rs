//! The cache store: what `tern ship` writes at the source site and `tern
//! apply` reads at the target — segment files and the VM's manifest.
#![forbid(unsafe_code)]

pub mod cache;
pub mod file;
pub mod hashes;
pub mod object;
pub mod seal;
pub mod segment;
pub mod target;

/// For `skip_serializing_if`: a count or sequence number left at 0 is not
/// written (files read as before by a tern that predates the field).
pub(crate) fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The entries of a directory; none if it does not exist (yet).
pub(crate) fn dir_entries(dir: &std::path::Path) -> std::io::Result<Vec<std::fs::DirEntry>> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}
