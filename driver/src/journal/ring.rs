//! The [`Journal`]: one VM's ring of records, shared by every producer and
//! its one consumer through a memory mapping. This file owns the ring's
//! shape — creating and opening it, the header's fields (head, tail, mode,
//! flags) and the overflow switch; its submodules own the producers'
//! side (`producer`, `in_place`), the consumer's (`consumer`), durability
//! (`durable`) and crash recovery (`recovery`).

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use memmap2::MmapRaw;
use portable_atomic::AtomicU128;

use super::format::*;
use super::RecordKind;
use crate::fs::{preallocate, FileLock};
use crate::{Error, Result};

mod barrier;
mod consumer;
mod durable;
mod in_place;
mod producer;
mod recovery;

use consumer::after;
pub use consumer::{Cursor, ReadOutcome, RecordError};
use in_place::InPlaceState;
pub use in_place::{BusyRecord, InPlaceRecord};
pub use producer::ReservedTag;

/// A place in the ring: a byte position and the sequence number of the
/// record that starts there (for the head: the next to be reserved; for the
/// tail: the next to be consumed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub pos: u64,
    pub seq: u64,
}

impl Position {
    fn pack(self) -> u128 {
        (self.seq as u128) << 64 | self.pos as u128
    }

    pub(super) fn unpack(v: u128) -> Self {
        Position { pos: v as u64, seq: (v >> 64) as u64 & !OVERFLOW_BIT }
    }
}

/// The top bit of the head's sequence number: the ring is in overflow mode.
/// Mode and head live in one atomic word so that no record can be reserved
/// after the switch to overflow (a write journaled after an earlier write
/// went only to the bitmap would let the replica pass through a state the
/// source never had), and so that leaving overflow and reserving the record
/// that opens the resync window are one step.
const OVERFLOW_BIT: u64 = 1 << 63;

/// How far sequence numbers jump when a host crash discards the journal.
pub const SEQ_JUMP_AFTER_DISCARD: u64 = 1 << 32;

fn in_overflow(head_word: u128) -> bool {
    (head_word >> 64) as u64 & OVERFLOW_BIT != 0
}

/// Whether writes are being journaled or only marked in the dirty bitmaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Journal,
    /// The ring filled up at `overflow_seq`; writes since then are in the
    /// dirty bitmaps until a resync has caught up.
    Overflow,
}

/// A record a producer wants to publish; its data is passed beside it.
#[derive(Debug, Clone, Copy)]
pub struct NewRecord {
    pub disk: u16,
    pub kind: RecordKind,
    pub offset: u64,
    pub length: u32,
    /// Zero but for resync window markers (`RESYNC_OPEN`, `RESYNC_CLOSE`).
    pub flags: u8,
}

impl NewRecord {
    /// The header of this record at sequence number `seq`, stamped now.
    fn header(&self, seq: u64, data_len: usize) -> RecordHeader {
        RecordHeader {
            seq,
            offset: self.offset,
            time_ns: now_ns(),
            length: self.length,
            data_len: data_len as u32,
            disk: self.disk,
            kind: self.kind,
            flags: self.flags,
        }
    }
}

/// What [`Journal::recover`] found between the tail and the head.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Published records handed to the re-apply callback.
    pub records: u64,
    /// Holes left by producers that crashed between reserving and
    /// publishing, now covered by pad records.
    pub holes: u64,
    /// Sequence numbers those holes stood for.
    pub lost_seqs: u64,
    /// Published records whose checksum failed (torn by a host crash);
    /// treated as holes.
    pub torn: u64,
}

/// An open journal: the live ring in memory (see [`super::live`]) and the
/// durable file it is made durable in. Cheap to share between threads
/// (`&Journal` is all a producer needs).
#[derive(Debug)]
pub struct Journal {
    /// The live ring, shared by every process that has the journal open
    /// (and, while it runs, by the thread that pre-faults it).
    map: Arc<MmapRaw>,
    ring: File,
    ring_path: PathBuf,
    /// The durable file in the state directory (`<state>/<vm>/journal`).
    durable: File,
    path: PathBuf,
    fields: HeaderFields,
    /// What this process's last [`Journal::sync`] made durable.
    synced: Mutex<Synced>,
}

/// What a process last wrote to the durable file.
#[derive(Debug)]
struct Synced {
    /// Ring positions below this are in the durable file (or consumed,
    /// which is as good).
    to: u64,
    /// The header written.
    header: Vec<u8>,
}

impl Journal {
    /// Creates a journal file of `capacity` data bytes (a multiple of 4096),
    /// allocated (not sparse), and makes it durable. Fails if the file exists.
    pub fn create(path: &Path, vm_id: [u8; 16], capacity: u64) -> Result<()> {
        if !(16 * 1024..=MAX_CAPACITY).contains(&capacity) || !capacity.is_multiple_of(4096) {
            return Err(Error::Invalid(format!(
                "journal capacity {capacity} must be a multiple of 4096 between 16 KiB and 1 TiB"
            )));
        }
        let create_err = |source| Error::Create { path: path.to_owned(), source };
        let mut f = OpenOptions::new().read(true).write(true).create_new(true).open(path).map_err(create_err)?;
        // Allocated up front, not sparse: a store into a mapped hole on a
        // full filesystem is SIGBUS, which would take the VM's I/O down.
        preallocate(&f, HEADER_SIZE as u64 + capacity).map_err(create_err)?;
        let fields = HeaderFields { vm_id, capacity };
        f.write_all(&fields.encode()).map_err(create_err)?;
        // The head and tail start at position 0, sequence 1.
        let mut start = [0u8; 8];
        start.copy_from_slice(&1u64.to_le_bytes());
        use std::os::unix::fs::FileExt;
        f.write_all_at(&start, OFF_HEAD as u64 + 8).map_err(create_err)?;
        f.write_all_at(&start, OFF_TAIL as u64 + 8).map_err(create_err)?;
        f.sync_all().map_err(|source| Error::Sync { path: path.to_owned(), source })?;
        crate::fs::sync_parent_dir(path)?;
        Ok(())
    }

    /// Opens and validates a journal: the durable file at `path` and its
    /// live ring, which is restored into `ring_dir` from the durable file
    /// when it does not exist (after a reboot, or the first time).
    pub fn open(path: &Path, ring_dir: &Path) -> Result<Self> {
        check_lock_free()?;
        let durable = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| Error::Open { path: path.to_owned(), source })?;
        let fields = read_fields(&durable, path)?;
        let (ring, ring_path) = {
            let _lock = FileLock::exclusive(&durable, path)?;
            // The journal was moved away or retired while this process
            // waited for the lock (`tern disable`, `tern failback`): a
            // ring restored now would outlive the VM.
            let opened = durable.metadata().map_err(|source| Error::Open { path: path.to_owned(), source })?;
            let still_there = std::fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == (opened.dev(), opened.ino()));
            if !still_there {
                return Err(Error::Invalid(format!(
                    "the journal {} was removed while it was being opened (the VM was disabled or failed back); check `tern status` for what is protected now",
                    path.display()
                )));
            }
            super::live::open_or_restore(&durable, path, fields.vm_id, fields.capacity, ring_dir)?
        };
        let ring_fields = read_fields(&ring, &ring_path)?;
        if ring_fields != fields {
            return Err(Error::Format {
                path: ring_path,
                what: "journal ring",
                reason: format!(
                    "it does not belong to {} (another VM id or capacity); remove it and its link {}",
                    path.display(),
                    super::live::link_path(path).display()
                ),
            });
        }
        let map = MmapRaw::map_raw(&ring).map_err(|source| Error::Map { path: ring_path.clone(), source })?;
        let map = Arc::new(map);
        // Nothing is known durable yet: the first sync writes the whole
        // unconsumed part (recovery may have padded holes in it).
        let synced = Mutex::new(Synced { to: 0, header: Vec::new() });
        let j = Journal { map, ring, ring_path, durable, path: path.to_owned(), fields, synced };
        let (head, tail) = (j.head(), j.tail());
        if tail.pos > head.pos
            || !head.pos.is_multiple_of(RECORD_ALIGN)
            || head.pos - tail.pos > fields.capacity
            || tail.seq > head.seq
            || tail.pos % RECORD_ALIGN != 0
        {
            return Err(Error::Format {
                path: j.ring_path.clone(),
                what: "journal",
                reason: format!("inconsistent positions: head {head:?}, tail {tail:?}"),
            });
        }
        Ok(j)
    }

    /// The durable journal file (what errors and logs name).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Maps every page of the ring writable, in the background, from the
    /// head on (where the producers write next), a chunk at a time.
    /// Otherwise the first store to each page faults, and tmpfs zeroes the
    /// page in the fault: on the first lap that doubled the cost of every
    /// journaled byte. Mapping takes long (on the test machines 0.2 s of
    /// kernel time per GiB of ring, 2.8 s when memory is short), so nobody
    /// waits for it; the pages a
    /// producer reaches first fault in as before. Pages stay mapped
    /// afterwards. The thread stops early once the journal is dropped.
    pub fn prefault_in_background(&self, vm: &str) -> std::io::Result<()> {
        const CHUNK: usize = 32 << 20;
        let map = Arc::clone(&self.map);
        let head_at = HEADER_SIZE + self.slot(self.head().pos);
        let (vm, ring) = (vm.to_owned(), self.ring_path.clone());
        std::thread::Builder::new().name("ring-prefault".into()).spawn(move || {
            let started = Instant::now();
            for (from, to) in [(head_at, map.len()), (0, head_at)] {
                for at in (from..to).step_by(CHUNK) {
                    if Arc::strong_count(&map) == 1 {
                        return; // the journal is closed
                    }
                    if let Err(e) = map.advise_range(memmap2::Advice::PopulateWrite, at, CHUNK.min(to - at)) {
                        // Only slower: the first lap faults its pages in.
                        return log::warn!("VM '{vm}': cannot pre-fault the journal ring {}: {e}", ring.display());
                    }
                }
            }
            // Until now the first writes into unmapped pages paid a fault.
            log::info!("VM '{vm}': journal ring mapped in {:.1?}", started.elapsed());
        })?;
        Ok(())
    }

    /// The live ring in memory.
    pub fn ring_path(&self) -> &Path {
        &self.ring_path
    }

    pub fn vm_id(&self) -> [u8; 16] {
        self.fields.vm_id
    }

    pub fn capacity(&self) -> u64 {
        self.fields.capacity
    }

    // ---- the header's mutable fields -------------------------------------

    fn atomic_u64(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off.is_multiple_of(8) && off + 8 <= HEADER_SIZE);
        // SAFETY: the mapping is page-aligned and at least HEADER_SIZE long,
        // so `off` (a multiple of 8 inside the header) is aligned and in
        // bounds; the mapping lives as long as `self`, which the reference
        // borrows. All access to these words, in this process and others,
        // is atomic.
        unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(off).cast()) }
    }

    fn atomic_u32(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off.is_multiple_of(4) && off + 4 <= HEADER_SIZE);
        // SAFETY: as in `atomic_u64`, with 4-byte alignment.
        unsafe { AtomicU32::from_ptr(self.map.as_mut_ptr().add(off).cast()) }
    }

    fn head_word(&self) -> &AtomicU128 {
        // SAFETY: OFF_HEAD is 64, so the word is 16-byte aligned and inside
        // the mapping, which `self` keeps alive. Producers in every process
        // only touch it with 16-byte atomics (cmpxchg16b on x86_64, which
        // `AtomicU128::is_lock_free` confirms at open).
        unsafe { AtomicU128::from_ptr(self.map.as_mut_ptr().add(OFF_HEAD).cast()) }
    }

    /// The next position and sequence number a producer will reserve.
    pub fn head(&self) -> Position {
        Position::unpack(self.head_word().load(Ordering::Acquire))
    }

    /// The next position and sequence number the consumer will read.
    pub fn tail(&self) -> Position {
        Position::unpack(self.tail_word().load(Ordering::Acquire))
    }

    /// Moves the tail (the consumer only, after what it read is safe
    /// elsewhere). Frees the space for producers.
    /// Never moves it backwards: a consumer that raced a discard (which
    /// jumped the tail ahead) must not undo it.
    ///
    /// Nor past a published record its producer still reads (see
    /// [`InPlaceRecord`]): the tail waits for it a little, then stops just
    /// before it if it is still busy (a later move takes it further).
    pub fn set_tail(&self, tail: Position) {
        let tail = self.not_past_busy(tail);
        let word = self.tail_word();
        let mut cur = word.load(Ordering::Acquire);
        while Position::unpack(cur).pos < tail.pos {
            match word.compare_exchange_weak(cur, tail.pack(), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// `tail`, or the first busy record between the current tail and it.
    fn not_past_busy(&self, tail: Position) -> Position {
        // An image write takes microseconds; a front-end that died in one
        // leaves its record busy until its recovery releases it.
        const PATIENCE: std::time::Duration = std::time::Duration::from_millis(100);
        let mut at = self.tail();
        let mut waited = None;
        while at.pos < tail.pos {
            if self.is_busy(at.pos) {
                let since = *waited.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() < PATIENCE {
                    std::thread::sleep(std::time::Duration::from_micros(50));
                    continue;
                }
                return at;
            }
            match self.locate(at.pos) {
                Ok(Some((h, _, _))) => match after(at.pos, &h) {
                    Ok(next) => at = next,
                    Err(_) => return tail,
                },
                // The consumer read these records; anything else here is
                // for it to report, not for the tail to judge.
                _ => return tail,
            }
        }
        tail
    }

    fn tail_word(&self) -> &AtomicU128 {
        // SAFETY: OFF_TAIL is 128, 16-byte aligned inside the mapping, which
        // `self` keeps alive; every process touches it only with 16-byte
        // atomics, so position and sequence number never tear.
        unsafe { AtomicU128::from_ptr(self.map.as_mut_ptr().add(OFF_TAIL).cast()) }
    }

    /// Bytes reserved but not yet consumed.
    pub fn unconsumed_bytes(&self) -> u64 {
        self.head().pos.saturating_sub(self.tail().pos)
    }

    /// [`Journal::unconsumed_bytes`] as a fraction of the capacity.
    pub fn fill(&self) -> f64 {
        self.unconsumed_bytes() as f64 / self.fields.capacity as f64
    }

    pub fn mode(&self) -> Mode {
        if in_overflow(self.head_word().load(Ordering::Acquire)) {
            Mode::Overflow
        } else {
            Mode::Journal
        }
    }

    /// Switches to overflow mode: from now on every reservation fails until
    /// [`Journal::leave_overflow`]. Returns true for the caller that did it.
    pub fn enter_overflow(&self) -> bool {
        let word = self.head_word();
        let mut cur = word.load(Ordering::Acquire);
        loop {
            if in_overflow(cur) {
                return false;
            }
            let next = cur | (OVERFLOW_BIT as u128) << 64;
            match word.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        self.atomic_u64(OFF_OVERFLOW_SEQ).store(Position::unpack(cur).seq, Ordering::Release);
        true
    }

    /// Leaves overflow mode by publishing `opener` (the record that opens
    /// the resync window) as the first record after it, in the same
    /// reservation. Returns its sequence number, or `None` if the ring has
    /// no room for it yet (the ring stays in overflow).
    pub fn leave_overflow(&self, opener: &NewRecord) -> Option<u64> {
        self.append_with(opener, &[], true, commit_word).map(|(seq, _)| seq)
    }

    /// Whether the ring is in overflow mode now (writes go to the dirty
    /// bitmaps; no consistent point can be cut until the resync is done).
    pub fn overflowed(&self) -> bool {
        in_overflow(self.head_word().load(Ordering::Acquire))
    }

    /// The head sequence number when the ring last overflowed.
    pub fn overflow_seq(&self) -> u64 {
        self.atomic_u64(OFF_OVERFLOW_SEQ).load(Ordering::Acquire)
    }

    /// Whether the last resync window marker published was an opener (so
    /// a front-end that starts knows whether a close is owed).
    pub fn window_open(&self) -> bool {
        self.atomic_u32(OFF_WINDOW).load(Ordering::Acquire) != 0
    }

    pub fn set_window_open(&self, open: bool) {
        self.atomic_u32(OFF_WINDOW).store(open as u32, Ordering::Release);
    }

    pub fn flags(&self) -> u32 {
        self.atomic_u32(OFF_FLAGS).load(Ordering::Acquire)
    }

    /// Whether a checksum comparison with the replica is due
    /// (`FLAG_CHECKSUM_RESYNC`): after a host crash, for a seeded replica,
    /// or for records lost from the cache.
    pub fn checksum_resync_due(&self) -> bool {
        self.flags() & FLAG_CHECKSUM_RESYNC != 0
    }

    pub fn set_flags(&self, flags: u32) {
        self.atomic_u32(OFF_FLAGS).fetch_or(flags, Ordering::AcqRel);
    }

    pub fn clear_flags(&self, flags: u32) {
        self.atomic_u32(OFF_FLAGS).fetch_and(!flags, Ordering::AcqRel);
    }

    /// The boot the last front-end attached in (`/proc/sys/kernel/random/boot_id`).
    pub fn boot_id(&self) -> [u8; 16] {
        let lo = self.atomic_u64(OFF_BOOT_ID).load(Ordering::Acquire);
        let hi = self.atomic_u64(OFF_BOOT_ID + 8).load(Ordering::Acquire);
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&lo.to_le_bytes());
        b[8..].copy_from_slice(&hi.to_le_bytes());
        b
    }

    pub fn set_boot_id(&self, id: [u8; 16]) {
        let (lo, hi) = id.split_at(8);
        self.atomic_u64(OFF_BOOT_ID).store(u64::from_le_bytes(lo.try_into().unwrap_or_default()), Ordering::Release);
        self.atomic_u64(OFF_BOOT_ID + 8)
            .store(u64::from_le_bytes(hi.try_into().unwrap_or_default()), Ordering::Release);
    }

    /// How many times a front-end recovered this journal after a crash.
    pub fn recoveries(&self) -> u64 {
        self.atomic_u64(OFF_RECOVERIES).load(Ordering::Acquire)
    }
}

/// Reads and validates the immutable part of a journal header.
fn read_fields(f: &File, path: &Path) -> Result<HeaderFields> {
    use std::os::unix::fs::FileExt;
    let len = f.metadata().map_err(|source| Error::Open { path: path.to_owned(), source })?.len();
    let mut head = [0u8; 48];
    f.read_exact_at(&mut head, 0).map_err(|_| Error::Format {
        path: path.to_owned(),
        what: "journal",
        reason: format!("file is only {len} bytes"),
    })?;
    HeaderFields::decode(&head, len).map_err(|reason| Error::Format { path: path.to_owned(), what: "journal", reason })
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Lock-freedom of the 16-byte head is what lets producers in several
/// processes share it; refuse to run where it would be a process-local lock.
pub(crate) fn check_lock_free() -> Result<()> {
    if AtomicU128::is_lock_free() {
        Ok(())
    } else {
        Err(Error::Invalid(
            "this CPU has no lock-free 16-byte compare-and-swap (cmpxchg16b); tern's journal needs it".into(),
        ))
    }
}

#[cfg(test)]
pub(super) mod tests_hook {
    use std::sync::Mutex;

    pub type Hook = Box<dyn FnOnce() + Send>;
    pub static BETWEEN_TAIL_AND_HEAD: Mutex<Option<Hook>> = Mutex::new(None);

    pub fn between_tail_and_head() {
        let hook = BETWEEN_TAIL_AND_HEAD.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(hook) = hook {
            hook();
        }
    }
}
