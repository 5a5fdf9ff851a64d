//! `tern-crashfs`: a FUSE filesystem that forgets, on demand, everything a
//! power cut could take from a strict POSIX filesystem.
//!
//! tern's torture tests put every file tern writes on it, kill every tern
//! process, and call [`Control::power_cut`]: the filesystem is unmounted, each
//! file and directory goes back to a state a real power loss could leave
//! (only what was fsynced, or a seeded prefix or subset of what was not, writes
//! torn at 512-byte sectors), and it is mounted again with the kernel's caches
//! empty, which is a reboot. A missing fsync of a file or of the directory
//! that names it then shows up as lost data, not as a test that happens to pass
//! because the page cache survived.
//!
//! Layout: [`content`] holds sparse file bytes, [`model`] the durability
//! rules (tested without FUSE), `fuse` maps kernel requests onto the model,
//! [`daemon`] mounts and answers the control socket, [`control`] is the
//! harness's client.
//!
//! The binary: `tern-crashfs <mountpoint> --control <socket>` prints
//! `ready <mountpoint>` once mounted and takes one command per line on the
//! socket (`mount`, `unmount`, `powercut <seed> <drop|prefix|subset>`, `sync`,
//! `stats`, `fail <op> <errno> <path-substring> <count>`, `fail clear`,
//! `capacity <bytes|none>`, `exit`), replying one `ok …` or `error <code> …`
//! line each.
#![deny(unsafe_code)]

pub mod content;
pub mod control;
pub mod daemon;
mod fuse;
pub mod model;
pub mod protocol;

pub use control::{Control, Error, Process};
pub use daemon::Daemon;
pub use model::{CutMode, CutStats, FaultOp, PendingFile, Stats};
