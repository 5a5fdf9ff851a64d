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
//!
//! A group cut reserves its tags with writes held, where no file write
//! belongs, so it notes its *intent* before: the length and checksum of
//! the group tag it will reserve. A shipper stopped at an unpublished tag
//! of exactly that description, the lock free, knows the tag's cutter died
//! and pads it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::journal::{Journal, Position};
use crate::{Error, Result};

/// What the tag lock file says a tagger is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Noted {
    /// A tag reserved there, not yet published.
    Reserved(Position),
    /// A group tag of this description (length, crc32c) about to be
    /// reserved, wherever the ring puts it.
    GroupIntent { len: u32, crc: u32 },
}

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

    /// What a tagger noted, if anything.
    fn noted(&mut self) -> Option<Noted> {
        let mut text = String::new();
        self.file.rewind().ok()?;
        self.file.read_to_string(&mut text).ok()?;
        let words: Vec<&str> = text.split_whitespace().collect();
        match words.as_slice() {
            ["group", len, crc] => Some(Noted::GroupIntent { len: len.parse().ok()?, crc: crc.parse().ok()? }),
            [pos, seq] => Some(Noted::Reserved(Position { pos: pos.parse().ok()?, seq: seq.parse().ok()? })),
            _ => None,
        }
    }

    /// Notes (or, with `None`, clears) a reservation or an intent. Not
    /// fsynced: it matters only while the ring in memory lives; after a
    /// reboot the next front-end pads every hole anyway.
    fn note(&mut self, what: Option<Noted>, path: &Path) -> Result<()> {
        let text = match what {
            None => String::new(),
            Some(Noted::Reserved(p)) => format!("{} {}\n", p.pos, p.seq),
            Some(Noted::GroupIntent { len, crc }) => format!("group {len} {crc}\n"),
        };
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
    /// Waits for the VM's tag lock (padding a dead tagger's hole first),
    /// and notes the intent to reserve a group tag of `description`.
    pub fn acquire(journal: &'a Journal, lock_path: &Path, description: &[u8]) -> Result<Self> {
        let mut lock = TagLock::acquire(lock_path)?;
        reclaim(journal, &mut lock, lock_path, None)?;
        let intent = Noted::GroupIntent { len: description.len() as u32, crc: crate::checksum::crc32c(description) };
        lock.note(Some(intent), lock_path)?;
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
        let _ = self.lock.note(None, &self.path);
    }

    /// Publishes the reserved tag and clears the intent. Killed before,
    /// the intent tells a shipper stopped at the tag that its cutter died.
    pub fn publish(&mut self) -> Result<()> {
        if let Some(tag) = self.reserved.take() {
            tag.publish()?;
        }
        self.lock.note(None, &self.path)
    }
}

impl Drop for GroupTagLock<'_> {
    /// A cut that ended before reserving: no intent stays behind.
    fn drop(&mut self) {
        if self.reserved.is_none() {
            let _ = self.lock.note(None, &self.path);
        }
    }
}

fn append_locked(
    journal: &Journal,
    lock_path: &Path,
    append: impl FnOnce(&mut dyn FnMut(crate::journal::Position)) -> Result<Option<u64>>,
) -> Result<Option<u64>> {
    let mut lock = TagLock::acquire(lock_path)?;
    // A reservation still noted is a dead tagger's: pad it first.
    reclaim(journal, &mut lock, lock_path, None)?;
    let mut noted = Ok(());
    let seq = append(&mut |at| noted = lock.note(Some(Noted::Reserved(at)), lock_path))?;
    noted?;
    lock.note(None, lock_path)?;
    Ok(seq)
}

/// Pads the hole of a tagger that died before publishing, if the tag lock
/// is free and notes a reservation — or the intent of a group cut whose
/// tag is the unpublished record the consumer waits at, `waiting_at`.
/// Whether it padded one.
pub fn reclaim_abandoned(journal: &Journal, lock_path: &Path, waiting_at: Position) -> Result<bool> {
    if std::fs::metadata(lock_path).map_or(true, |m| m.len() == 0) {
        return Ok(false); // nothing noted: the common case, one stat
    }
    match TagLock::try_acquire(lock_path)? {
        Some(mut lock) => reclaim(journal, &mut lock, lock_path, Some(waiting_at)),
        None => Ok(false), // a tagger is at work
    }
}

fn reclaim(journal: &Journal, lock: &mut TagLock, lock_path: &Path, waiting_at: Option<Position>) -> Result<bool> {
    let padded = match lock.noted() {
        None => return Ok(false),
        Some(Noted::Reserved(at)) => journal.pad_abandoned_tag(at),
        // The dead cutter's tag, if it reserved one, is where the consumer
        // stops, once what was reserved before it is published: the
        // shipper knows where it waits; a tagger looks (a write reserved
        // before it is published within microseconds).
        Some(Noted::GroupIntent { len, crc }) => match waiting_at {
            Some(at) if journal.unpublished_tag_is(at, len, crc) => journal.pad_abandoned_tag(at),
            Some(_) => return Ok(false), // not (yet) where the consumer waits: keep the intent
            None => {
                let mut padded = false;
                for _ in 0..50 {
                    match journal.first_unpublished() {
                        Some(at) if journal.unpublished_tag_is(at, len, crc) => {
                            padded = journal.pad_abandoned_tag(at);
                            break;
                        }
                        Some(_) => std::thread::sleep(std::time::Duration::from_millis(2)),
                        None => break, // nothing unpublished: the cutter reserved nothing
                    }
                }
                padded
            }
        },
    };
    lock.note(None, lock_path)?;
    Ok(padded)
}
