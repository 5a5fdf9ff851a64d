//! Tags from any process, and the clean-up after a tagger that died.
//!
//! `tern tag` appends its marker to the ring beside the front-end, or with
//! none running ([`Journal::append_tag`]). A tagger killed between
//! reserving its record and publishing it leaves a hole that stops the
//! consumer for good. So while it appends it holds the VM's tag lock
//! (`<state>/<vm>/tag.lock`, an `flock`), and the lock file names the
//! position and sequence number it reserved. Whoever finds the lock free
//! with a reservation still noted in it knows the tagger is dead, and pads
//! its hole ([`reclaim_abandoned`]; the shipper does, while it waits for
//! records). A tagger killed in the instant between reserving and noting
//! leaves a hole that only the next front-end's attach pads
//! ([`Journal::pad_holes`]).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::journal::{Journal, Position};
use crate::{Error, Result};

/// The tag lock, held by one tagger at a time (others wait).
struct TagLock {
    file: File,
}

impl TagLock {
    fn open(path: &Path) -> Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| Error::Open { path: path.to_owned(), source })
    }

    /// Waits for the lock.
    fn acquire(path: &Path) -> Result<Self> {
        let file = Self::open(path)?;
        flock(&file, path, libc::LOCK_EX)?;
        Ok(TagLock { file })
    }

    /// The lock if no tagger holds it now.
    fn try_acquire(path: &Path) -> Result<Option<Self>> {
        let file = Self::open(path)?;
        match flock(&file, path, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => Ok(Some(TagLock { file })),
            Err(Error::Busy { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The reservation a tagger noted, if any.
    fn noted(&mut self) -> Option<Position> {
        let mut text = String::new();
        self.file.rewind().ok()?;
        self.file.read_to_string(&mut text).ok()?;
        let (pos, seq) = text.trim().split_once(' ')?;
        Some(Position { pos: pos.parse().ok()?, seq: seq.parse().ok()? })
    }

    /// Notes (or, with `None`, clears) the reservation. Not fsynced: it
    /// matters only while the ring in memory lives; after a reboot the
    /// next front-end pads every hole anyway.
    fn note(&mut self, at: Option<Position>, path: &Path) -> Result<()> {
        let text = at.map(|p| format!("{} {}\n", p.pos, p.seq)).unwrap_or_default();
        let write = |f: &mut File| -> std::io::Result<()> {
            f.set_len(0)?;
            f.rewind()?;
            f.write_all(text.as_bytes())
        };
        write(&mut self.file).map_err(|source| Error::Write {
            path: path.to_owned(),
            offset: 0,
            len: text.len(),
            source,
        })
    }
}

fn flock(file: &File, path: &Path, how: i32) -> Result<()> {
    loop {
        // SAFETY: flock on a descriptor `file` keeps open; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), how) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => {
                return Err(Error::Busy { what: path.display().to_string(), holder: "a `tern tag`".into() })
            }
            _ => return Err(Error::Invalid(format!("cannot lock {} (flock: {e})", path.display()))),
        }
    }
}

/// Appends a tag (see [`Journal::append_tag`]) under the tag lock at
/// `lock_path`, noting its reservation there until it is published.
pub fn append(journal: &Journal, lock_path: &Path, label: &str) -> Result<Option<u64>> {
    append_locked(journal, lock_path, |note| journal.append_tag(label, note))
}

/// [`append`] of a tag described in JSON ([`Journal::append_quiesced_tag`]).
pub fn append_quiesced(journal: &Journal, lock_path: &Path, description: &[u8]) -> Result<Option<u64>> {
    append_locked(journal, lock_path, |note| journal.append_quiesced_tag(description, note))
}

/// The tag lock of one member of a group cut, held from before its
/// barrier closes until its tag is published: [`GroupTagLock::reserve`]
/// under the barrier, [`GroupTagLock::publish`] after it opened.
pub struct GroupTagLock<'a> {
    journal: &'a Journal,
    lock: TagLock,
    path: std::path::PathBuf,
    reserved: Option<crate::journal::ReservedTag<'a>>,
}

impl<'a> GroupTagLock<'a> {
    /// Waits for the VM's tag lock (padding a dead tagger's hole first).
    pub fn acquire(journal: &'a Journal, lock_path: &Path) -> Result<Self> {
        let mut lock = TagLock::acquire(lock_path)?;
        reclaim(journal, &mut lock, lock_path)?;
        Ok(GroupTagLock { journal, lock, path: lock_path.to_owned(), reserved: None })
    }

    /// Reserves the group tag ([`Journal::reserve_group_tag`]): no I/O, as
    /// the group's writes wait meanwhile. Its sequence number, or `None`
    /// if the ring has no room (full, or in overflow).
    pub fn reserve(&mut self, description: &[u8]) -> Result<Option<u64>> {
        let tag = self.journal.reserve_group_tag(description, |_| {})?;
        let seq = tag.as_ref().map(|t| t.seq());
        self.reserved = tag;
        Ok(seq)
    }

    /// Gives the reserved tag up ([`crate::journal::ReservedTag::abandon`]):
    /// a cut that failed leaves a pad in this member's stream, no tag.
    pub fn abandon(&mut self) {
        if let Some(tag) = self.reserved.take() {
            tag.abandon();
        }
    }

    /// Notes the reserved tag in the lock file (so a shipper pads it should
    /// this process die now), publishes it and clears the note. Killed
    /// between the reservation and the note, the hole waits for the next
    /// front-end's attach, as a `tern tag` killed in that instant does.
    pub fn publish(&mut self) -> Result<()> {
        if let Some(tag) = self.reserved.take() {
            self.lock.note(Some(tag.position()), &self.path)?;
            tag.publish()?;
            self.lock.note(None, &self.path)?;
        }
        Ok(())
    }
}

fn append_locked(
    journal: &Journal,
    lock_path: &Path,
    append: impl FnOnce(&mut dyn FnMut(crate::journal::Position)) -> Result<Option<u64>>,
) -> Result<Option<u64>> {
    let mut lock = TagLock::acquire(lock_path)?;
    // A reservation still noted is a dead tagger's: pad it first.
    reclaim(journal, &mut lock, lock_path)?;
    let mut noted = Ok(());
    let seq = append(&mut |at| noted = lock.note(Some(at), lock_path))?;
    noted?;
    lock.note(None, lock_path)?;
    Ok(seq)
}

/// Pads the hole of a tagger that died before publishing, if the tag lock
/// is free and notes a reservation. Whether it padded one.
pub fn reclaim_abandoned(journal: &Journal, lock_path: &Path) -> Result<bool> {
    if std::fs::metadata(lock_path).map_or(true, |m| m.len() == 0) {
        return Ok(false); // nothing noted: the common case, one stat
    }
    match TagLock::try_acquire(lock_path)? {
        Some(mut lock) => reclaim(journal, &mut lock, lock_path),
        None => Ok(false), // a tagger is at work
    }
}

fn reclaim(journal: &Journal, lock: &mut TagLock, lock_path: &Path) -> Result<bool> {
    let Some(at) = lock.noted() else { return Ok(false) };
    let padded = journal.pad_abandoned_tag(at);
    lock.note(None, lock_path)?;
    Ok(padded)
}
