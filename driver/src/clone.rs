//! Whole-file clones for recovery points and failover disks: a reflink
//! (`FICLONE`) where the filesystem shares extents (btrfs, xfs), a
//! sparse-aware copy elsewhere.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::image::Image;
use crate::{Error, Result};

/// How a clone was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMethod {
    /// Extents shared, copy-on-write: instant, no space until written.
    Reflink,
    /// The filesystem cannot share extents: data ranges copied, holes kept.
    Copy,
}

impl CloneMethod {
    pub fn name(self) -> &'static str {
        match self {
            CloneMethod::Reflink => "reflink",
            CloneMethod::Copy => "copy",
        }
    }
}

/// Clones `src` into a new file `dst` (which must not exist) and makes it
/// durable. The source must not change meanwhile (the applier holds it).
pub fn clone_file(src: &Path, dst: &Path) -> Result<CloneMethod> {
    let source = File::open(src).map_err(|source| Error::Open { path: src.to_owned(), source })?;
    let target = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|source| Error::Create { path: dst.to_owned(), source })?;
    let result = reflink_or_copy(&source, src, &target, dst);
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

fn reflink_or_copy(source: &File, src: &Path, target: &File, dst: &Path) -> Result<CloneMethod> {
    // btrfs refuses to share extents between a copy-on-write file and a
    // `chattr +C` one (EINVAL): the still-empty destination takes the
    // source's setting, whatever its directory would have given it.
    match_nocow(source, target);
    // SAFETY: FICLONE takes the source descriptor as its argument and
    // touches no memory of ours; both descriptors are open for the call.
    let rc = unsafe { libc::ioctl(target.as_raw_fd(), libc::FICLONE, source.as_raw_fd()) };
    let method = if rc == 0 {
        CloneMethod::Reflink
    } else {
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY) => {
                sparse_copy(source, src, target, dst)?;
                CloneMethod::Copy
            }
            _ => return Err(Error::Write { path: dst.to_owned(), offset: 0, len: 0, source: err }),
        }
    };
    target.sync_all().map_err(|source| Error::Sync { path: dst.to_owned(), source })?;
    Ok(method)
}

/// `FS_NOCOW_FL` (`chattr +C`), not in the libc crate.
const FS_NOCOW_FL: libc::c_int = 0x0080_0000;

/// Asks the filesystem to write files created in `dir` from now on in
/// place instead of copy-on-write (btrfs `chattr +C`; new files inherit it).
/// Replicas take many small random writes; on btrfs each would otherwise
/// allocate a new extent and update the checksum tree. Clones still share
/// extents, and a write to a shared extent is still copied once, so points
/// stay independent. Returns whether the flag is set; filesystems without
/// it (xfs, ext4) are left alone.
pub fn prefer_in_place_writes(dir: &Path) -> Result<bool> {
    let d = File::open(dir).map_err(|source| Error::Open { path: dir.to_owned(), source })?;
    let Some(flags) = nocow_flags(&d) else { return Ok(false) };
    if flags & FS_NOCOW_FL != 0 {
        return Ok(true);
    }
    let flags = flags | FS_NOCOW_FL;
    // SAFETY: FS_IOC_SETFLAGS reads one int through the pointer.
    let rc = unsafe { libc::ioctl(d.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) };
    Ok(rc == 0)
}

fn nocow_flags(f: &File) -> Option<libc::c_int> {
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int through the pointer, which
    // points at a live local.
    (unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) } == 0).then_some(flags)
}

/// Gives the empty `target` the source's `FS_NOCOW_FL` (best effort: on
/// filesystems without the flag nothing changes, and a mismatch left
/// behind only means a copy instead of a reflink).
fn match_nocow(source: &File, target: &File) {
    let (Some(src), Some(mut dst)) = (nocow_flags(source), nocow_flags(target)) else { return };
    if src & FS_NOCOW_FL == dst & FS_NOCOW_FL {
        return;
    }
    dst = (dst & !FS_NOCOW_FL) | (src & FS_NOCOW_FL);
    // SAFETY: FS_IOC_SETFLAGS reads one int through the pointer.
    let _ = unsafe { libc::ioctl(target.as_raw_fd(), libc::FS_IOC_SETFLAGS, &dst) };
}

/// Copies the data ranges of `source` (SEEK_DATA/SEEK_HOLE) with
/// `copy_file_range`, or with reads and writes where the kernel will not
/// copy between the two files (EXDEV: another filesystem, as with source
/// images on ext4 and the target on btrfs); holes stay holes.
fn sparse_copy(source: &File, src: &Path, target: &File, dst: &Path) -> Result<()> {
    let image = Image::open_read_only(src)?;
    target.set_len(image.size()).map_err(|source| Error::Write { path: dst.to_owned(), offset: 0, len: 0, source })?;
    let mut in_kernel = true;
    let mut buf = Vec::new();
    for (offset, len) in image.data_ranges()? {
        let mut done = 0u64;
        while done < len {
            let at = offset + done;
            let want = (len - done) as usize;
            let write_err = |source: io::Error| Error::Write { path: dst.to_owned(), offset: at, len: want, source };
            if !in_kernel {
                buf.resize(want.min(1 << 20), 0);
                image.read_at(&mut buf, at)?;
                target.write_all_at(&buf, at).map_err(write_err)?;
                done += buf.len() as u64;
                continue;
            }
            let (mut from, mut to) = (at as i64, at as i64);
            let n = match nix::fcntl::copy_file_range(source, Some(&mut from), target, Some(&mut to), want) {
                Ok(n) => n,
                Err(nix::errno::Errno::EXDEV | nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::ENOSYS) => {
                    in_kernel = false;
                    continue;
                }
                Err(e) => return Err(write_err(e.into())),
            };
            if n == 0 {
                return Err(Error::Read {
                    path: src.to_owned(),
                    offset: offset + done,
                    len: (len - done) as usize,
                    source: io::Error::from(io::ErrorKind::UnexpectedEof),
                });
            }
            done += n as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clone_across_filesystems_is_a_sparse_copy() {
        // /dev/shm (tmpfs) to the test directory (another filesystem):
        // copy_file_range refuses with EXDEV there.
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (shm.path().join("a.img"), dir.path().join("b.img"));
        let f = File::create(&a).unwrap();
        f.set_len(4 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[5u8; 12288], 2 << 20).unwrap();
        assert_eq!(clone_file(&a, &b).expect("a clone to another filesystem"), CloneMethod::Copy);
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let data = Image::open_read_only(&b).unwrap().data_ranges().unwrap();
        assert!(data.iter().map(|&(_, l)| l).sum::<u64>() < 1 << 20, "holes stay holes: {data:?}");
    }

    #[test]
    fn a_clone_has_the_same_bytes_keeps_holes_and_is_independent() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
        let f = File::create(&a).unwrap();
        f.set_len(8 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 65536], 1 << 20).unwrap();
        let method = clone_file(&a, &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        if method == CloneMethod::Copy {
            let data = Image::open_read_only(&b).unwrap().data_ranges().unwrap();
            assert!(data.iter().all(|&(o, l)| o <= 1 << 20 && o + l >= (1 << 20) + 65536 && l < 8 << 20), "{data:?}");
        }
        std::os::unix::fs::FileExt::write_all_at(&f, &[9u8; 4096], 1 << 20).unwrap();
        assert_eq!(std::fs::read(&b).unwrap()[1 << 20], 7, "the clone must not change with its source");
        assert!(clone_file(&a, &b).is_err(), "an existing destination is never overwritten");
    }
}
