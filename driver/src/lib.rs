//! tern's block layer, shared by both front-ends (the NBD server in
//! `nbd-shim` and the ublk server).
//!
//! The pieces, in the order a write meets them:
//!
//! - [`range_lock`]: overlapping writes are never in flight together
//!   (invariant 1, order).
//! - [`journal`]: the memory-mapped, multi-producer journal ring every write is
//!   published in before it reaches the source image (invariant 2,
//!   write-ahead).
//! - [`bitmap`]: the persistent dirty-region bitmap a write is marked in when
//!   the ring is full (invariant 4, never block the VM).
//! - [`image`]: the source image backend: positional I/O, `fdatasync`,
//!   hole punching and allocation status.
//! - [`mirror`]: ties the above together for one VM, and recovers the
//!   published tail after a crash.
//! - [`vm`]: the protected VM's configuration (`vm.toml`) and where its files
//!   live.
//!
//! Unsafe code lives here (and only here) because the journal and the bitmap
//! are shared memory: atomics and raw copies into a `MAP_SHARED` mapping.

pub mod bitmap;
pub mod checksum;
pub mod clone;
mod error;
pub mod image;
pub mod journal;
pub mod mirror;
pub mod range_lock;
pub mod units;
pub mod vm;

pub use error::{Error, Result};
pub use mirror::{InPlaceWrite, Mirror, MirrorOptions, ResyncStep, ZeroMode};

/// Kills the process at a named point when `TERN_FAILPOINT` names it: the
/// crash tests' way of stopping a tern process exactly there (`ship:…`,
/// `apply:…`, `failback:…`, `serve:…`). `name@N` kills at the Nth time the
/// point is passed (default: the first).
pub fn failpoint(name: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static POINT: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();
    static PASSED: AtomicU64 = AtomicU64::new(0);
    let point = POINT.get_or_init(|| {
        let v = std::env::var("TERN_FAILPOINT").ok()?;
        Some(match v.split_once('@') {
            Some((p, n)) => match n.parse() {
                Ok(n) if n > 0 => (p.to_owned(), n),
                _ => panic!("TERN_FAILPOINT={v}: the pass after '@' must be a number from 1"),
            },
            None => (v, 1),
        })
    });
    if let Some((p, n)) = point {
        if p == name && PASSED.fetch_add(1, Ordering::Relaxed) + 1 == *n {
            log::warn!("failpoint {name} (pass {n}): killing this process");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }
}
