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
//!   hole punching and allocation status; [`image_lock`]: the locks that
//!   keep two writers off one image, in qemu's scheme.
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
pub mod fail;
pub mod fs;
pub mod image;
pub mod image_lock;
pub mod journal;
pub mod launch;
pub mod mirror;
pub mod range_lock;
pub mod tag;
pub mod ublk;
pub mod units;
pub mod vm;

pub use error::{Error, Result};
pub use mirror::{InPlaceWrite, Mirror, MirrorOptions, ResyncStep, ZeroMode};
