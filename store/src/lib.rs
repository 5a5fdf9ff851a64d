//! The cache store: what `tern ship` writes at the source site and `tern
//! apply` reads at the target — segment files and the VM's manifest.
#![forbid(unsafe_code)]

pub mod cache;
pub mod hashes;
pub mod segment;
pub mod target;
