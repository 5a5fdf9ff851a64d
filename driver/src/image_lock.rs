//! Who else uses an image: the locks `tern serve` takes on the images it
//! serves, in qemu's scheme so that qemu, qemu-img and qemu-io see them
//! (and tern sees theirs), and the processes that hold a file open.
//!
//! qemu's scheme (its raw file driver): open file description (OFD) locks
//! of one byte each, shared (`F_RDLCK`), so they never conflict with each
//! other and only show through a test. Byte `100 + i` says "I hold
//! permission i", byte `200 + i` "I do not let others have permission i";
//! the permissions by bit index: 0 consistent read, 1 write, 2 write
//! without changing data, 3 resize. A process may take permission i only
//! while nobody holds byte `200 + i`, and may refuse to share it only while
//! nobody holds byte `100 + i`. tern, serving, holds consistent read and
//! write, and lets nobody else write or resize: `qemu-io` opening the image
//! read-write then fails with "Failed to get "write" lock", and `qemu-img
//! info` (which refuses to share writing) with "Failed to get shared
//! "write" lock", until given `-U` (force share, read only).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const CONSISTENT_READ: i64 = 0;
const WRITE: i64 = 1;
const RESIZE: i64 = 3;

/// Permissions tern holds while serving, and those it shares with nobody.
const HELD: [i64; 2] = [CONSISTENT_READ, WRITE];
const UNSHARED: [i64; 2] = [WRITE, RESIZE];

/// Takes the serving locks on `file` (the image at `path`, of disk
/// `disk`), then checks that nobody else holds what they exclude: another
/// writer, or a process that lets nobody write. Held until `file` closes.
/// Setting before checking means two processes racing both see the other.
pub fn lock_for_serving(file: &File, path: &Path, disk: &str) -> Result<()> {
    let io_err = |source: std::io::Error| Error::Open { path: path.to_owned(), source };
    let bytes: Vec<i64> = HELD.iter().map(|i| PERM_BASE + i).chain(UNSHARED.iter().map(|i| SHARED_BASE + i)).collect();
    for &byte in &bytes {
        ofd_lock(file, false, libc::F_RDLCK as i16, byte).map_err(io_err)?;
    }
    // Conflicts: someone refusing to share what tern holds, or holding
    // what tern refuses to share.
    let conflicts = HELD.iter().map(|i| SHARED_BASE + i).chain(UNSHARED.iter().map(|i| PERM_BASE + i));
    for byte in conflicts {
        if ofd_conflict(file, byte).map_err(io_err)? {
            for &b in &bytes {
                let _ = ofd_lock(file, false, libc::F_UNLCK as i16, b);
            }
            let holder = describe(&holders(path));
            return Err(Error::Busy {
                what: format!("disk '{disk}' ({})", path.display()),
                holder: format!("{holder} {}: a VM, qemu-io or another `tern serve`", what_conflicts(byte)),
            });
        }
    }
    Ok(())
}

/// What the holder of a conflicting lock on `byte` does.
fn what_conflicts(byte: i64) -> &'static str {
    match byte - SHARED_BASE {
        WRITE => "holds the write lock, writing to it and letting nobody else",
        CONSISTENT_READ => "holds a lock letting nobody else read it",
        _ if byte == PERM_BASE + WRITE => "holds the write lock, writing to it",
        _ => "holds the resize lock",
    }
}

/// One byte's OFD lock command (`F_OFD_SETLK`, or `F_OFD_GETLK` filling
/// in the conflicting lock's type).
fn ofd_lock(file: &File, get: bool, kind: i16, byte: i64) -> std::io::Result<i16> {
    use nix::fcntl::{fcntl, FcntlArg};
    let mut fl = libc::flock { l_type: kind, l_whence: libc::SEEK_SET as i16, l_start: byte, l_len: 1, l_pid: 0 };
    let arg = if get { FcntlArg::F_OFD_GETLK(&mut fl) } else { FcntlArg::F_OFD_SETLK(&fl) };
    fcntl(file.as_raw_fd(), arg).map_err(std::io::Error::from)?;
    Ok(fl.l_type)
}

/// Whether another open file description holds a lock on `byte` (an
/// exclusive lock there would conflict with it).
fn ofd_conflict(file: &File, byte: i64) -> std::io::Result<bool> {
    Ok(ofd_lock(file, true, libc::F_WRLCK as i16, byte)? != libc::F_UNLCK as i16)
}

/// A process holding a file open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// Its command name (`/proc/<pid>/comm`).
    pub command: String,
}

/// The other processes that hold `path` open (the same file: device and
/// inode), from `/proc/*/fd`. Processes this one may not inspect are
/// missed (run as root to see all).
pub fn holders(path: &Path) -> Vec<Holder> {
    let Ok(target) = std::fs::metadata(path) else { return Vec::new() };
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return out };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else { continue };
        let open = fds
            .flatten()
            .any(|fd| std::fs::metadata(fd.path()).is_ok_and(|m| m.dev() == target.dev() && m.ino() == target.ino()));
        if open {
            let command = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default().trim().to_owned();
            out.push(Holder { pid, command });
        }
    }
    out
}

/// The first file in `dir` a process holds open, with its holders: a VM
/// still running on a directory's disks. `None` when none is (or `dir`
/// cannot be read).
pub fn first_in_use(dir: &Path) -> Option<(PathBuf, Vec<Holder>)> {
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let holders = holders(&e.path());
        (!holders.is_empty()).then(|| (e.path(), holders))
    })
}

/// "pid 123 (qemu-system-x86)", joined; "another process" for none found.
pub fn describe(holders: &[Holder]) -> String {
    if holders.is_empty() {
        return "another process".into();
    }
    holders.iter().map(|h| format!("pid {} ({})", h.pid, h.command)).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_serving_lock_on_one_image_is_refused_and_names_the_holder() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let first = File::options().read(true).write(true).open(&path).unwrap();
        lock_for_serving(&first, &path, "disk0").expect("the first lock");
        // Another open file description: OFD locks conflict between them
        // even inside one process.
        let second = File::options().read(true).write(true).open(&path).unwrap();
        let e = lock_for_serving(&second, &path, "disk0").expect_err("a second writer is refused").to_string();
        assert!(e.contains("disk 'disk0'") && e.contains("write lock"), "{e}");
        drop(second);
        drop(first);
        let third = File::options().read(true).write(true).open(&path).unwrap();
        // Free again once the first closed — once every copy of its file
        // descriptor is: a test on another thread that spawns a process
        // forks a child holding a copy until its exec closes it
        // (O_CLOEXEC), a few milliseconds. Seen in scripts/test.sh.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while let Err(e) = lock_for_serving(&third, &path, "disk0") {
            assert!(std::time::Instant::now() < deadline, "not free 5 s after the first closed: {e}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn holders_finds_another_process_with_the_file_open() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("disk.img");
        std::fs::write(&path, b"x").unwrap();
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("exec 3<\"$0\"; read _")
            .arg(&path)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        let found = loop {
            let h = holders(&path);
            if !h.is_empty() || start.elapsed() > std::time::Duration::from_secs(10) {
                break h;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        drop(child.stdin.take());
        let _ = child.wait();
        assert_eq!(found, vec![Holder { pid: child.id(), command: "sh".into() }]);
        assert!(holders(&path).is_empty());
    }
}
