//! Where the live ring is kept: a file in memory (tmpfs), beside the
//! durable journal file in the VM's state directory.
//!
//! Producers and the consumer share the live ring through a mapping. Kept
//! in a disk filesystem's page cache, every page of it would be written
//! back and then write-faulted again on the next lap, and its writeback
//! competes with the source image's; in tmpfs it is plain memory that
//! survives the processes (a crashed `tern serve` is recovered from it) but
//! not the host. The durable file receives what invariant 3 asks for, at
//! each FLUSH ([`super::Journal::sync`]); after a reboot the live ring is
//! restored from it.
//!
//! `<state>/<vm>/journal.ring` is a symbolic link to the live ring, so every
//! process finds the same one whatever its environment says; the
//! environment (`TERN_RING_DIR`) only chooses where a missing ring is
//! restored.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::format::{FLAG_ATTACHED, HEADER_SIZE, OFF_BOOT_ID, OFF_FLAGS, OFF_HEAD, OFF_TAIL};
use super::ring::Position;
use crate::fs::{preallocate, FileLock};
use crate::{Error, Result};

/// The environment variable that chooses where live rings are restored.
pub const RING_DIR_ENV: &str = "TERN_RING_DIR";

/// `$TERN_RING_DIR`, or `/dev/shm/tern-<euid>` (one directory per user, so
/// a demo run as one user never meets another's directory).
pub fn default_ring_dir() -> PathBuf {
    match std::env::var_os(RING_DIR_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(format!("/dev/shm/tern-{}", nix::unistd::geteuid())),
    }
}

/// The link in the state directory that names the live ring of `durable`.
pub fn link_path(durable: &Path) -> PathBuf {
    durable.with_file_name(format!(
        "{}.ring",
        durable.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    ))
}

/// The live ring's file name: the VM id, and the durable file's device and
/// inode, so that a copy of a state directory never shares its original's
/// ring.
fn ring_name(vm_id: [u8; 16], durable: &File, path: &Path) -> Result<String> {
    let m = durable.metadata().map_err(|source| Error::Open { path: path.to_owned(), source })?;
    Ok(format!("{}-{:x}-{:x}.ring", uuid::Uuid::from_bytes(vm_id), m.dev(), m.ino()))
}

/// Opens the live ring of the durable journal `durable` (at `path`),
/// restoring it from the durable file into `ring_dir` when there is none
/// (after a reboot, or the first time). The caller holds the durable file's
/// lock, so two processes never restore two rings.
pub(super) fn open_or_restore(
    durable: &File,
    path: &Path,
    vm_id: [u8; 16],
    capacity: u64,
    ring_dir: &Path,
) -> Result<(File, PathBuf)> {
    let name = ring_name(vm_id, durable, path)?;
    let link = link_path(path);
    // A link to another journal's ring (a copied state directory) or to a
    // ring that is gone (a reboot) is replaced below.
    if let Some(target) = linked_ring(&link, &name) {
        match OpenOptions::new().read(true).write(true).open(&target) {
            Ok(f) => {
                // The state directory may have moved (enable builds it
                // under a temporary name): the owner follows.
                record_owner(&target, path)?;
                return Ok((f, target));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(Error::Open { path: target, source }),
        }
    }
    prepare_dir(ring_dir)?;
    let ring_path = ring_dir.join(&name);
    // Before the ring exists: a ring is never without its owner's name.
    record_owner(&ring_path, path)?;
    let restored = match OpenOptions::new().read(true).write(true).open(&ring_path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match restore(durable, path, capacity, &ring_path) {
            Ok(f) => f,
            Err(e) => {
                // No ring: no owner to name.
                let _ = fs::remove_file(owner_file(&ring_path));
                return Err(e);
            }
        },
        Err(source) => return Err(Error::Open { path: ring_path, source }),
    };
    // Point the link at it: a new link, then rename over the old one.
    let tmp_link = link.with_extension(format!("ring.{}", std::process::id()));
    let _ = fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(&ring_path, &tmp_link)
        .and_then(|()| fs::rename(&tmp_link, &link))
        .map_err(|source| Error::Create { path: link.clone(), source })?;
    crate::fs::sync_parent_dir(&link)?;
    Ok((restored, ring_path))
}

/// Creates the directory (mode 0700) if needed and checks that it is ours:
/// a ring in a directory another user can write is a ring they can forge.
fn prepare_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| Error::Create { path: dir.to_owned(), source })?;
    let m = fs::metadata(dir).map_err(|source| Error::Open { path: dir.to_owned(), source })?;
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != me || m.mode() & 0o022 != 0 {
        return Err(Error::Invalid(format!(
            "the journal ring directory {} belongs to uid {} (mode {:o}), not to this user (uid {me}) alone; set {RING_DIR_ENV} to a directory of your own",
            dir.display(),
            m.uid(),
            m.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Builds a live ring from the durable file: its header and the records
/// between its tail and head (nothing else in it is ever read), allocated
/// in full so that a store into the mapping never meets a hole (SIGBUS).
/// Built under a temporary name and linked into place, so no process ever
/// opens a half-restored ring.
fn restore(durable: &File, path: &Path, capacity: u64, ring_path: &Path) -> Result<File> {
    let tmp = ring_path.with_extension(format!("restoring.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let create_err = |source| Error::Create { path: tmp.clone(), source };
    let f = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&tmp).map_err(create_err)?;
    let built = (|| -> Result<()> {
        preallocate(&f, HEADER_SIZE as u64 + capacity).map_err(|e| {
            Error::Invalid(format!(
                "cannot allocate the journal's memory ring ({capacity} bytes) in {}: {e}; free memory there, give the VM a smaller journal (`tern enable --journal-size`), or set {RING_DIR_ENV} to a larger tmpfs",
                ring_path.parent().unwrap_or(Path::new("/")).display()
            ))
        })?;
        let read_err =
            |offset: u64, len: usize| move |source| Error::Read { path: path.to_owned(), offset, len, source };
        let mut header = vec![0u8; HEADER_SIZE];
        durable.read_exact_at(&mut header, 0).map_err(read_err(0, HEADER_SIZE))?;
        let flags = u32::from_le_bytes(header[OFF_FLAGS..OFF_FLAGS + 4].try_into().expect("4 bytes"));
        if flags & FLAG_ATTACHED != 0 {
            // The ring went while a front-end had it attached, without a
            // reboot (a container's /dev/shm gone with it, logind's
            // RemoveIPC, someone clearing it): the durable copy lacks
            // every record since its last sync, like after a host crash,
            // while the images hold them. Re-applying its stale records
            // as after a process crash would roll those writes back: a
            // boot id of no boot makes the next attach recover as from a
            // host crash (discard, sequence jump, checksum resync).
            header[OFF_BOOT_ID..OFF_BOOT_ID + 16].fill(0);
        }
        f.write_all_at(&header, 0).map_err(create_err)?;
        let word = |off: usize| {
            let mut b = [0u8; 16];
            b.copy_from_slice(&header[off..off + 16]);
            Position::unpack(u128::from_le_bytes(b))
        };
        let (head, tail) = (word(OFF_HEAD), word(OFF_TAIL));
        // Inconsistent positions are reported by `Journal::open`, which
        // validates the ring; copy nothing for them.
        if tail.pos <= head.pos && head.pos - tail.pos <= capacity {
            let mut buf = vec![0u8; 1 << 20];
            let mut pos = tail.pos;
            while pos < head.pos {
                let slot = pos % capacity;
                let n = (head.pos - pos).min(capacity - slot).min(buf.len() as u64) as usize;
                let at = HEADER_SIZE as u64 + slot;
                durable.read_exact_at(&mut buf[..n], at).map_err(read_err(at, n))?;
                f.write_all_at(&buf[..n], at).map_err(create_err)?;
                pos += n as u64;
            }
        }
        match fs::hard_link(&tmp, ring_path) {
            Ok(()) => Ok(()),
            // Another process restored it first (it cannot: the caller
            // holds the lock; but theirs is as good as ours).
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(source) => Err(Error::Create { path: ring_path.to_owned(), source }),
        }
    })();
    let _ = fs::remove_file(&tmp);
    built?;
    drop(f);
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(ring_path)
        .map_err(|source| Error::Open { path: ring_path.to_owned(), source })
}

/// Removes the journal at `path` for good: its live ring (memory), the link
/// to it, and the durable file, for a VM whose state is being removed. All
/// under the journal's lock: a process opening the journal at that moment
/// (`tern status`, `tern tag`) then finds it removed and fails, where it
/// would otherwise restore a ring that nobody would ever remove. A journal
/// already gone is not an error.
pub fn retire(path: &Path) -> Result<()> {
    let durable = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(Error::Open { path: path.to_owned(), source }),
    };
    let _lock = FileLock::exclusive(&durable, path)?;
    let mut id = [0u8; 16];
    let at = super::format::OFF_VM_ID as u64;
    durable.read_exact_at(&mut id, at).map_err(|source| Error::Read {
        path: path.to_owned(),
        offset: at,
        len: 16,
        source,
    })?;
    let link = link_path(path);
    // Only the ring that belongs to this very file.
    if let Some(ring) = linked_ring(&link, &ring_name(id, &durable, path)?) {
        match fs::remove_file(&ring) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::Remove { path: ring, source: e }),
            _ => {}
        }
        let _ = fs::remove_file(owner_file(&ring));
    }
    match fs::remove_file(&link) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::Remove { path: link, source: e }),
        _ => {}
    }
    fs::remove_file(path).map_err(|source| Error::Remove { path: path.to_owned(), source })
}

/// The file beside a ring that names its owner: the durable journal's
/// absolute path.
fn owner_file(ring: &Path) -> PathBuf {
    ring.with_extension("owner")
}

/// Records (if it changed) that `durable` owns `ring`.
fn record_owner(ring: &Path, durable: &Path) -> Result<()> {
    let owner = std::path::absolute(durable).map_err(|source| Error::Open { path: durable.to_owned(), source })?;
    let file = owner_file(ring);
    let text = owner.to_string_lossy().into_owned();
    if fs::read_to_string(&file).is_ok_and(|t| t == text) {
        return Ok(());
    }
    let tmp = file.with_extension(format!("owner.{}", std::process::id()));
    fs::write(&tmp, &text)
        .and_then(|()| fs::rename(&tmp, &file))
        .map_err(|source| Error::Create { path: file.clone(), source })
}

/// A live ring in a ring directory, for `tern status` and the sweep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingFile {
    pub path: PathBuf,
    /// Memory it holds (allocated bytes).
    pub bytes: u64,
    /// The durable journal that owns it, if its owner file says.
    pub owner: Option<PathBuf>,
    /// Its owner is gone and no process holds it: memory nobody will free.
    pub orphaned: bool,
}

/// The rings in `dir` (none if it does not exist).
pub fn list_rings(dir: &Path) -> Vec<RingFile> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<RingFile> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "ring"))
        .filter_map(|path| {
            let bytes = fs::metadata(&path).ok()?.blocks() * 512;
            let owner = fs::read_to_string(owner_file(&path)).ok().map(PathBuf::from);
            // The owner's durable file gone (its state directory removed)
            // and no process with the ring open: nothing will open it again.
            let orphaned = owner.as_ref().is_some_and(|o| !o.exists()) && crate::image_lock::holders(&path).is_empty();
            Some(RingFile { path, bytes, owner, orphaned })
        })
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Removes the orphaned rings of `dir` (see [`RingFile::orphaned`]),
/// logging each, and returns them. A ring whose owner is unknown (made by
/// a tern before owners were recorded) is left alone.
pub fn sweep_orphans(dir: &Path) -> Vec<RingFile> {
    let mut freed = Vec::new();
    for ring in list_rings(dir).into_iter().filter(|r| r.orphaned) {
        match fs::remove_file(&ring.path) {
            Ok(()) => {
                let _ = fs::remove_file(owner_file(&ring.path));
                log::warn!(
                    "freed {} of memory: the journal ring {} of {}, whose state directory is gone",
                    crate::units::Size(ring.bytes).approx(),
                    ring.path.display(),
                    ring.owner.as_deref().unwrap_or(Path::new("?")).display()
                );
                freed.push(ring);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot remove the orphaned journal ring {}: {e}", ring.path.display()),
        }
    }
    freed
}

/// Where `link` points, if that is the ring named `name` (a ring of this
/// very journal file).
fn linked_ring(link: &Path, name: &str) -> Option<PathBuf> {
    let target = fs::read_link(link).ok()?;
    target.file_name().is_some_and(|n| n == name).then_some(target)
}
