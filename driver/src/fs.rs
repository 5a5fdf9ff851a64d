//! The filesystem primitives every durable file of tern's goes through:
//! small files written durably (temporary name, fsync, rename, directory
//! fsync), directories created durably, the lock files that name their
//! holder, the journal's `flock`, and preallocation. One place, so that
//! "durable" means the same thing for vm.toml, bitmaps, journals, the
//! cache's small files and the target's catalog.

use std::fs::{self, File};
use std::path::Path;

use crate::{Error, Result};

/// Writes a small file durably: temporary file, fsync, rename, fsync of the
/// directory.
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|source| Error::Create { path: tmp.clone(), source })?;
    f.write_all(bytes).map_err(|source| Error::Write { path: tmp.clone(), offset: 0, len: bytes.len(), source })?;
    f.sync_all().map_err(|source| Error::Sync { path: tmp.clone(), source })?;
    fs::rename(&tmp, path).map_err(|source| Error::Create { path: path.to_owned(), source })?;
    sync_parent_dir(path)
}

/// Whether another process holds the lock [`lock_exclusive`] takes on
/// `path` (a probe that changes nothing: a missing file is free).
pub fn held_by_another(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(file) = fs::File::open(path) else { return false };
    // A shared lock is refused while another holds the exclusive one; ours
    // goes when `file` closes.
    // SAFETY: flock on a descriptor `file` keeps open; no memory is involved.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 }
}

/// Takes an exclusive `flock` on `path` and writes our pid into it, so the
/// next process to try names the holder. `what` is the thing being locked
/// and `role` who normally holds it, for the error message.
pub fn lock_exclusive(path: &Path, what: &str, role: &str) -> Result<File> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| Error::Open { path: path.to_owned(), source })?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let holder = fs::read_to_string(path).unwrap_or_default();
        return Err(Error::Busy {
            what: format!("{what} ({})", path.display()),
            holder: format!("{role}, pid {}", holder.trim()),
        });
    }
    f.set_len(0).map_err(|source| Error::Write { path: path.to_owned(), offset: 0, len: 0, source })?;
    writeln!(f, "{}", std::process::id()).map_err(|source| Error::Write {
        path: path.to_owned(),
        offset: 0,
        len: 0,
        source,
    })?;
    Ok(f)
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|source| Error::Sync { path: dir.to_owned(), source })
}

/// Creates `dir` and whatever parents it lacks, each made durable in its
/// parent: files made durable inside a directory whose own entry a power
/// cut can take away are not durable. The parent of `dir` is fsynced even
/// when `dir` existed (a process that died between creating it and that
/// fsync left it visible but not durable); a clean directory's fsync costs
/// next to nothing.
pub fn create_dir_durably(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty() && !p.is_dir()) {
            create_dir_durably(parent)?;
        }
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(source) => return Err(Error::Create { path: dir.to_owned(), source }),
        }
    }
    sync_parent_dir(dir)
}

pub fn sync_parent_dir(path: &Path) -> Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
}

/// Allocates a file's blocks (`fallocate`), falling back to `set_len` on
/// filesystems that cannot (tmpfs before 5.x, some network filesystems).
pub(crate) fn preallocate(f: &File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    match nix::fcntl::fallocate(f.as_raw_fd(), nix::fcntl::FallocateFlags::empty(), 0, len as i64) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) => f.set_len(len),
        Err(e) => Err(e.into()),
    }
}

/// An exclusive `flock` on the durable file, held while syncing or
/// restoring the live ring; released on drop.
pub(crate) struct FileLock<'a>(&'a File);

impl<'a> FileLock<'a> {
    pub(crate) fn exclusive(f: &'a File, path: &Path) -> Result<Self> {
        use std::os::fd::AsRawFd;
        loop {
            // SAFETY: flock on a descriptor `f` keeps open; no memory is involved.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(FileLock(f));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::Invalid(format!(
                    "cannot lock the journal {} (flock: {e}); its filesystem must support flock",
                    path.display()
                )));
            }
        }
    }
}

impl Drop for FileLock<'_> {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: as in `exclusive`.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}
