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
//! the group tag it will reserve, on a line of its own beside any
//! reservation. A shipper stopped at an unpublished tag of exactly that
//! description (at the seq it expects next), the lock free, knows the
//! tag's cutter died and pads it; nobody else resolves intents.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::journal::{Journal, Position};
use crate::{Error, Result};

/// A tag's label: 1 to 256 bytes of printable text (it lands in point
/// catalogs, logs and terminals). Every kind of tag checks it here.
pub fn check_label(label: &str) -> Result<()> {
    if label.is_empty() || label.len() > 256 || label.chars().any(char::is_control) {
        return Err(Error::Invalid(format!("a tag label must be 1 to 256 bytes of printable text, got {label:?}")));
    }
    Ok(())
}

/// What the tag lock file notes: the reservation of the tagger at work,
/// if any, and the intents of group cuts whose cutter may have died (each
/// the length and crc32c of the group tag it was to reserve, wherever the
/// ring put it). One line each: `<pos> <seq>`, `group <len> <crc>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Notes {
    reserved: Option<Position>,
    intents: Vec<(u32, u32)>,
}

/// At most this many intents are kept: each is a cutter that died before
/// its tag was found, the oldest the least likely to be found.
const MAX_INTENTS: usize = 8;

impl Notes {
    fn parse(text: &str) -> Notes {
        let mut notes = Notes::default();
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["group", len, crc] => {
                    if let (Ok(len), Ok(crc)) = (len.parse(), crc.parse()) {
                        notes.intents.push((len, crc));
                    }
                }
                [pos, seq] => {
                    if let (Ok(pos), Ok(seq)) = (pos.parse(), seq.parse()) {
                        notes.reserved = Some(Position { pos, seq });
                    }
                }
                _ => {}
            }
        }
        notes
    }

    fn render(&self) -> String {
        let mut text = String::new();
        if let Some(p) = self.reserved {
            text += &format!("{} {}\n", p.pos, p.seq);
        }
        for (len, crc) in &self.intents {
            text += &format!("group {len} {crc}\n");
        }
        text
    }

    fn is_empty(&self) -> bool {
        self.reserved.is_none() && self.intents.is_empty()
    }
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

    /// What the file notes.
    fn notes(&mut self) -> Notes {
        let mut text = String::new();
        if self.file.rewind().is_err() || self.file.read_to_string(&mut text).is_err() {
            return Notes::default();
        }
        Notes::parse(&text)
    }

    /// Rewrites the notes. Not fsynced: they matter only while the ring in
    /// memory lives; after a reboot the next front-end pads every hole
    /// anyway.
    fn write_notes(&mut self, notes: &Notes, path: &Path) -> Result<()> {
        let text = notes.render();
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

    /// Notes (or, with `None`, clears) this tagger's reservation, keeping
    /// the intents.
    fn note_reserved(&mut self, at: Option<Position>, path: &Path) -> Result<()> {
        let mut notes = self.notes();
        notes.reserved = at;
        self.write_notes(&notes, path)
    }

    /// Adds (`true`) or removes a group cut's intent.
    fn note_intent(&mut self, intent: (u32, u32), add: bool, path: &Path) -> Result<()> {
        let mut notes = self.notes();
        if let Some(i) = notes.intents.iter().position(|&x| x == intent) {
            notes.intents.remove(i);
        }
        if add {
            notes.intents.push(intent);
            let excess = notes.intents.len().saturating_sub(MAX_INTENTS);
            notes.intents.drain(..excess);
        }
        self.write_notes(&notes, path)
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
    /// Length and crc32c of the group tag, noted before the barrier.
    intent: (u32, u32),
    reserved: Option<crate::journal::ReservedTag<'a>>,
}

impl<'a> GroupTagLock<'a> {
    /// Waits for the VM's tag lock (padding a dead tagger's hole first),
    /// and notes the intent to reserve a group tag of `description`.
    pub fn acquire(journal: &'a Journal, lock_path: &Path, description: &[u8]) -> Result<Self> {
        let mut lock = TagLock::acquire(lock_path)?;
        reclaim(journal, &mut lock, lock_path, None)?;
        let intent = (description.len() as u32, crate::checksum::crc32c(description));
        lock.note_intent(intent, true, lock_path)?;
        Ok(GroupTagLock { journal, lock, path: lock_path.to_owned(), intent, reserved: None })
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
        let _ = self.lock.note_intent(self.intent, false, &self.path);
    }

    /// Publishes the reserved tag and clears the intent. Killed before,
    /// the intent tells a shipper stopped at the tag that its cutter died.
    pub fn publish(&mut self) -> Result<()> {
        if let Some(tag) = self.reserved.take() {
            tag.publish()?;
        }
        self.lock.note_intent(self.intent, false, &self.path)
    }
}

impl Drop for GroupTagLock<'_> {
    /// A cut that ended before reserving: no intent stays behind.
    fn drop(&mut self) {
        if self.reserved.is_none() {
            let _ = self.lock.note_intent(self.intent, false, &self.path);
        }
    }
}

/// The tag lock held by a front-end while it attaches (see [`keep_out`]).
pub struct KeptOut {
    _lock: TagLock,
}

/// Waits, `patience` at most, until no tagger of another process is at
/// work, and keeps them out until dropped: a front-end attaching pads
/// every record it finds unpublished, and a tag between its reservation
/// and its publication (`tern tag` syncing, a group cut's barrier) is not
/// a dead producer's hole. Its tagger would publish over the pad, report
/// the tag taken, and the point would never come.
pub fn keep_out(lock_path: &Path, patience: std::time::Duration) -> Result<KeptOut> {
    let until = std::time::Instant::now() + patience;
    loop {
        if let Some(lock) = TagLock::try_acquire(lock_path)? {
            return Ok(KeptOut { _lock: lock });
        }
        if std::time::Instant::now() >= until {
            // Reads: "the tag lock … (for over 60s) is held by another
            // process (…); stop it first".
            return Err(Error::Busy {
                what: format!("the tag lock {} (for over {}s)", lock_path.display(), patience.as_secs()),
                holder: "a `tern tag` or group cut of this VM, at work or hung: attaching now would pad its tag; let it finish".into(),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
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
    let seq = append(&mut |at| noted = lock.note_reserved(Some(at), lock_path))?;
    noted?;
    lock.note_reserved(None, lock_path)?;
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
    let mut notes = lock.notes();
    if notes.is_empty() {
        return Ok(false);
    }
    let mut padded = false;
    if let Some(at) = notes.reserved.take() {
        padded |= journal.pad_abandoned_tag(at);
    }
    // A dead cutter's tag, if it reserved one, is where the consumer
    // stops once what was reserved before it is published; only the
    // consumer knows that place for sure (its expected seq included), so
    // only it resolves intents. An intent whose tag is not there yet stays.
    if let Some(at) = waiting_at {
        if let Some(i) = notes.intents.iter().position(|&(len, crc)| journal.unpublished_tag_is(at, len, crc)) {
            padded |= journal.pad_abandoned_tag(at);
            notes.intents.remove(i);
        }
    }
    lock.write_notes(&notes, lock_path)?;
    Ok(padded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_keep_a_reservation_and_the_newest_intents_apart() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("tag.lock");
        let mut lock = TagLock::acquire(&path).unwrap();
        for i in 0..10u32 {
            lock.note_intent((100 + i, i), true, &path).unwrap();
        }
        lock.note_reserved(Some(Position { pos: 4096, seq: 7 }), &path).unwrap();
        let notes = lock.notes();
        assert_eq!(notes.reserved, Some(Position { pos: 4096, seq: 7 }));
        // The oldest two dropped, the newest eight kept in order.
        assert_eq!(notes.intents, (2..10u32).map(|i| (100 + i, i)).collect::<Vec<_>>());
        // A tagger's reservation cleared leaves the intents; an intent
        // removed leaves the rest.
        lock.note_reserved(None, &path).unwrap();
        lock.note_intent((105, 5), false, &path).unwrap();
        let notes = lock.notes();
        assert_eq!(notes.reserved, None);
        assert_eq!(notes.intents.len(), 7);
        assert!(!notes.intents.contains(&(105, 5)));
        assert_eq!(Notes::parse(&notes.render()), notes);
        assert_eq!(Notes::parse("garbage\n1 2 3 4\n"), Notes::default());
    }
}
