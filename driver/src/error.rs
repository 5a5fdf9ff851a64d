//! The block layer's one error type, [`Error`], and the errno each variant
//! becomes at a front-end.

use std::io;
use std::path::PathBuf;

/// Everything the block layer can fail at. Each variant names the operation
/// and the file it failed on, so an operator reading the message knows which
/// disk or journal to look at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {path}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot create {path}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot remove {path}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("read of {len} bytes at offset {offset} from {path} failed")]
    Read { path: PathBuf, offset: u64, len: usize, source: io::Error },
    #[error("write of {len} bytes at offset {offset} to {path} failed")]
    Write { path: PathBuf, offset: u64, len: usize, source: io::Error },
    #[error("fdatasync of {path} failed")]
    Sync { path: PathBuf, source: io::Error },
    #[error("starting the writeback of {path} (sync_file_range) failed")]
    Writeback { path: PathBuf, source: io::Error },
    #[error("fallocate ({what}) of {len} bytes at offset {offset} on {path} failed")]
    Fallocate { path: PathBuf, what: &'static str, offset: u64, len: u64, source: io::Error },
    #[error("cannot map {path} into memory")]
    Map { path: PathBuf, source: io::Error },
    #[error("{path} is not a valid {what}: {reason}")]
    Format { path: PathBuf, what: &'static str, reason: String },
    #[error("range {offset}+{len} is outside disk '{disk}' of {size} bytes")]
    OutOfRange { disk: String, offset: u64, len: u64, size: u64 },
    #[error("zeroing {len} bytes at {offset} on {path} cannot be done quickly here")]
    SlowZero { path: PathBuf, offset: u64, len: u64 },
    #[error("invalid configuration in {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{what} is held by another process ({holder}); stop it first")]
    Busy { what: String, holder: String },
    #[error("disk '{disk}' was poisoned by an earlier failed fdatasync; its durability can no longer be trusted, restart `tern serve` after checking the storage")]
    Poisoned { disk: String },
    #[error("the mirror is shutting down")]
    ShuttingDown,
    /// The VM failed over at the target site: this source's writes would
    /// be lost, so none is taken.
    #[error("VM '{vm}' is fenced: {reason}; writes are refused")]
    Fenced { vm: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The message with every cause after it ("write of … to X failed: No
    /// space left on device"), for places that carry errors as text.
    pub fn with_causes(&self) -> String {
        let mut msg = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            msg.push_str(": ");
            msg.push_str(&c.to_string());
            cause = c.source();
        }
        msg
    }

    /// The errno a front-end reports for this error: NBD maps it onto its
    /// error codes, ublk returns it negated. The one place errors meet the
    /// wire.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Read { source, .. }
            | Error::Write { source, .. }
            | Error::Sync { source, .. }
            | Error::Writeback { source, .. }
            | Error::Fallocate { source, .. }
            | Error::Open { source, .. }
            | Error::Create { source, .. }
            | Error::Remove { source, .. }
            | Error::Map { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::OutOfRange { .. } | Error::Invalid(_) => libc::EINVAL,
            Error::SlowZero { .. } => libc::EOPNOTSUPP,
            Error::ShuttingDown => libc::ESHUTDOWN,
            Error::Fenced { .. } => libc::EPERM,
            Error::Format { .. } | Error::Config { .. } | Error::Busy { .. } | Error::Poisoned { .. } => libc::EIO,
        }
    }
}
