//! The mirror: the write path of one VM, shared by both front-ends.
//!
//! For every write-type request, in this order:
//!
//! 1. hold the request's byte range (overlapping writes never in flight
//!    together — invariant 1);
//! 2. publish a record in the journal, or, once the ring is full, mark the
//!    dirty bitmap (invariants 2 and 4);
//! 3. change the source image;
//! 4. release the range; the front-end acknowledges.
//!
//! FLUSH and FUA make the journal, the bitmaps and the image durable
//! (invariant 3). Opening the mirror after a crash re-applies the published
//! tail to the images before any request is served.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use crate::bitmap::DirtyBitmap;
use crate::fail::{self, Failpoint};
use crate::image::{Extent, Image};
use crate::journal::{self, Journal, Mode, NewRecord, RecordHeader, RecordKind, RecoveryReport};
use crate::range_lock::RangeLock;
use crate::vm::{VmConfig, VmPaths};
use crate::{Error, Result};

/// How a front-end opens the mirror.
#[derive(Debug, Clone, Copy)]
pub struct MirrorOptions {
    /// Publish writes in the journal. Off only to measure what journaling
    /// costs (`tern serve --no-journal`); nothing is replicated then.
    pub journal: bool,
    /// How many requests may change one image at once (see
    /// `ChangeSlots`); reads are not limited.
    pub image_writers: usize,
}

impl MirrorOptions {
    /// Twice the CPUs: enough to keep every CPU busy while some wait for
    /// the disk. With no limit, 4 connections of 16 request threads on 2
    /// CPUs measured the same IOPS at 3–5 times the p99 latency
    /// (docs/BENCHMARKS.md).
    pub fn default_image_writers() -> usize {
        2 * std::thread::available_parallelism().map_or(2, |n| n.get())
    }
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions { journal: true, image_writers: MirrorOptions::default_image_writers() }
    }
}

/// How a zeroing request may be carried out.
#[derive(Debug, Clone, Copy, Default)]
pub struct ZeroMode {
    /// The range may be deallocated (NBD: no `NO_HOLE` flag).
    pub may_punch: bool,
    /// Fail instead of writing zero bytes (NBD: `FAST_ZERO`).
    pub fast_only: bool,
}

#[derive(Debug)]
struct Disk {
    name: String,
    index: u16,
    image: Image,
    bitmap: DirtyBitmap,
    lock: RangeLock,
    /// Bounds how many requests change the image at once (see
    /// [`ChangeSlots`]).
    changing: ChangeSlots,
    /// FLUSHes and FUAs of this disk, one at a time (see
    /// [`Mirror::make_durable`]).
    durable: Durable,
}

/// The group commit of one disk's FLUSHes. Linux reports a failed
/// write-back to one `fsync` of an open file, not to every one running: of
/// two concurrent FLUSHes one would fail (and poison the mirror) while the
/// other returned success over the lost pages. So the syncs run one at a
/// time, the poison is checked and set under the same lock, and a FLUSH
/// that arrived before a sync started is answered by that sync's outcome
/// instead of syncing again.
#[derive(Debug, Default)]
struct Durable {
    /// Numbers the FLUSHes as they arrive.
    arrived: AtomicU64,
    /// Every FLUSH numbered up to this is durable: the arrivals counted
    /// when the last successful sync started.
    covered: Mutex<u64>,
}

/// Counters a front-end reports.
#[derive(Debug, Default)]
pub struct MirrorStats {
    pub journaled: AtomicU64,
    /// Write-type requests that went to the dirty bitmap instead.
    pub overflowed: AtomicU64,
}

/// One VM's disks, journal and bitmaps, open for serving.
#[derive(Debug)]
pub struct Mirror {
    config: VmConfig,
    journal: Journal,
    journaling: bool,
    disks: Vec<Disk>,
    /// Held shared by every request, exclusively by `shutdown`; true once
    /// shutting down.
    gate: RwLock<bool>,
    /// Set by a failed fdatasync or msync: the page cache may have dropped
    /// dirty data, so nothing more is acknowledged.
    poisoned: AtomicBool,
    /// Why writes are refused: the VM failed over at the target site (see
    /// [`Mirror::fence`]).
    fenced: std::sync::OnceLock<String>,
    /// Writes refused since the fence.
    refused_writes: std::sync::atomic::AtomicU64,
    stats: MirrorStats,
    recovery: Option<RecoveryReport>,
    /// Whether a resync window may be open in the journal (see `resync`).
    window_open: AtomicBool,
    /// Where the resync scan goes on: (disk, byte offset).
    resync_from: Mutex<(usize, u64)>,
    /// Held until `shutdown`: one front-end per VM.
    frontend_lock: Mutex<Option<File>>,
    /// `<state>/<vm>/tag.lock` (see [`crate::tag`]).
    tag_lock: std::path::PathBuf,
}

impl Mirror {
    /// Opens a VM for serving: takes the front-end lock, validates the
    /// journal, images and bitmaps against `vm.toml`, and recovers the
    /// journal's published tail if the last front-end did not shut down
    /// cleanly.
    pub fn open(paths: &VmPaths, options: MirrorOptions) -> Result<Self> {
        let config = paths.load_config()?;
        let frontend_lock =
            crate::fs::lock_exclusive(&paths.frontend_lock(), &format!("VM '{}'", config.name), "`tern serve`")?;
        let journal = paths.open_journal()?;
        if journal.vm_id() != *config.id.as_bytes() {
            return Err(Error::Format {
                path: paths.journal(),
                what: "journal",
                reason: format!("it belongs to another VM than '{}' (id {})", config.name, config.id),
            });
        }
        let mut disks = Vec::new();
        for (i, d) in config.disks.iter().enumerate() {
            let image = Image::open(&d.path)?;
            crate::image_lock::lock_for_serving(image.file(), &d.path, &d.name)?;
            if image.size() != d.size {
                return Err(Error::Invalid(format!(
                    "disk '{}' ({}) is {} bytes but was {} bytes when enabled; resizing a protected disk is not supported",
                    d.name,
                    d.path.display(),
                    image.size(),
                    d.size
                )));
            }
            let bitmap = DirtyBitmap::open(&paths.dirty(&d.name), d.size)?;
            disks.push(Disk {
                name: d.name.clone(),
                index: i as u16,
                image,
                bitmap,
                lock: RangeLock::new(),
                changing: ChangeSlots::new(options.image_writers),
                durable: Durable::default(),
            });
        }
        let mut mirror = Mirror {
            config,
            journal,
            journaling: options.journal,
            disks,
            gate: RwLock::new(false),
            poisoned: AtomicBool::new(false),
            fenced: std::sync::OnceLock::new(),
            refused_writes: Default::default(),
            stats: MirrorStats::default(),
            recovery: None,
            window_open: AtomicBool::new(false),
            resync_from: Mutex::new((0, 0)),
            frontend_lock: Mutex::new(Some(frontend_lock)),
            tag_lock: paths.tag_lock(),
        };
        mirror.attach()?;
        // After attaching: recovery from a host crash punches the ring.
        if options.journal {
            if let Err(e) = mirror.journal.prefault_in_background(&mirror.config.name) {
                // Only slower: the first lap faults its pages in.
                log::warn!("VM '{}': cannot start pre-faulting the journal ring: {e}", mirror.config.name);
            }
        }
        mirror.window_open.store(mirror.journal.window_open(), Ordering::Release);
        if options.journal {
            mirror.open_resync_window_if_due();
        } else {
            // Nothing will be journaled: make the replica's resync cover
            // every region, now, so no write of this run is ever missed and
            // a later recovery never replays old records over them.
            mirror.journal.enter_overflow();
            for d in &mirror.disks {
                d.bitmap.mark(0, d.image.size());
                d.bitmap.sync()?;
            }
        }
        Ok(mirror)
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    pub fn stats(&self) -> &MirrorStats {
        &self.stats
    }

    /// What recovery found when this mirror was opened, if it ran.
    pub fn recovery(&self) -> Option<&RecoveryReport> {
        self.recovery.as_ref()
    }

    pub fn disk_count(&self) -> usize {
        self.disks.len()
    }

    pub fn disk_name(&self, disk: usize) -> &str {
        &self.disks[disk].name
    }

    pub fn disk_size(&self, disk: usize) -> u64 {
        self.disks[disk].image.size()
    }

    pub fn disk_index(&self, name: &str) -> Option<usize> {
        self.disks.iter().position(|d| d.name == name)
    }

    /// Regions of a disk marked dirty (awaiting resync).
    pub fn dirty_ranges(&self, disk: usize) -> Vec<(u64, u64)> {
        self.disks[disk].bitmap.dirty_ranges()
    }

    // ---- requests -----------------------------------------------------------

    /// Admits a request: not shutting down, not poisoned.
    fn enter(&self, disk: usize) -> Result<std::sync::RwLockReadGuard<'_, bool>> {
        let gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        if *gate {
            return Err(Error::ShuttingDown);
        }
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned { disk: self.disks[disk].name.clone() });
        }
        Ok(gate)
    }

    /// Admits a request that changes a disk (or the journal): as
    /// [`Mirror::enter`], and not fenced.
    fn enter_to_change(&self, disk: usize) -> Result<std::sync::RwLockReadGuard<'_, bool>> {
        let gate = self.enter(disk)?;
        if let Some(reason) = self.fenced.get() {
            self.refused_writes.fetch_add(1, Ordering::Relaxed);
            return Err(Error::Fenced { vm: self.config.name.clone(), reason: reason.clone() });
        }
        Ok(gate)
    }

    /// From now on every write, zeroing, trim and tag is refused (EPERM
    /// to the client): the VM failed over at the target, and anything
    /// written here would be lost without a word. Reads and flushes go on,
    /// so the VM can shut down. The first reason given stays.
    pub fn fence(&self, reason: String) {
        if self.fenced.set(reason.clone()).is_ok() {
            log::error!("VM '{}' is fenced: {reason}; refusing every write from now on", self.config.name);
        }
    }

    /// Whether [`Mirror::fence`] was called, and the writes refused since.
    pub fn fenced(&self) -> Option<u64> {
        self.fenced.get().map(|_| self.refused_writes.load(Ordering::Relaxed))
    }

    fn check_range(&self, disk: usize, offset: u64, len: u64) -> Result<&Disk> {
        let d = self.disks.get(disk).ok_or_else(|| Error::Invalid(format!("no disk with index {disk}")))?;
        let size = d.image.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(d),
            _ => Err(Error::OutOfRange { disk: d.name.clone(), offset, len, size }),
        }
    }

    pub fn read(&self, disk: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        let _gate = self.enter(disk)?;
        let d = self.check_range(disk, offset, buf.len() as u64)?;
        d.image.read_at(buf, offset)
    }

    /// [`Mirror::read`], but only from the page cache: `Ok(false)` (and
    /// nothing usable in `buf`) when the read would wait for the disk. See
    /// [`Image::read_at_if_cached`].
    pub fn read_if_cached(&self, disk: usize, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let _gate = self.enter(disk)?;
        let d = self.check_range(disk, offset, buf.len() as u64)?;
        d.image.read_at_if_cached(buf, offset)
    }

    pub fn write(&self, disk: usize, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let _gate = self.enter_to_change(disk)?;
        let d = self.check_range(disk, offset, data.len() as u64)?;
        let _range = d.lock.lock(offset, data.len() as u64);
        let published = self.publish(d, RecordKind::Write, offset, data.len() as u64, data);
        self.change_image(d, offset, data.len() as u64, || d.image.write_at(data, offset))?;
        drop(published);
        if fua {
            self.make_durable(d)?;
        }
        Ok(())
    }

    pub fn zero(&self, disk: usize, offset: u64, len: u64, mode: ZeroMode, fua: bool) -> Result<()> {
        let _gate = self.enter_to_change(disk)?;
        let d = self.check_range(disk, offset, len)?;
        if mode.fast_only && len > 0 && d.image.fast_zero_refused(mode.may_punch) {
            // Refused before it is journaled: the client is told nothing
            // changed (NBD's FAST_ZERO), so nothing may say otherwise.
            return Err(Error::SlowZero { path: d.image.path().to_owned(), offset, len });
        }
        let _range = d.lock.lock(offset, len);
        let published = self.publish(d, RecordKind::Zero, offset, len, &[]);
        self.change_image(d, offset, len, || d.image.zero(offset, len, mode.may_punch, mode.fast_only))?;
        drop(published);
        if fua {
            self.make_durable(d)?;
        }
        Ok(())
    }

    /// Discards a range. The source really deallocates it (or writes
    /// zeroes where it cannot), so the replica can do the same and both
    /// read zeroes there.
    pub fn trim(&self, disk: usize, offset: u64, len: u64, fua: bool) -> Result<()> {
        let _gate = self.enter_to_change(disk)?;
        let d = self.check_range(disk, offset, len)?;
        let _range = d.lock.lock(offset, len);
        let published = self.publish(d, RecordKind::Trim, offset, len, &[]);
        self.change_image(d, offset, len, || d.image.punch_hole(offset, len))?;
        drop(published);
        if fua {
            self.make_durable(d)?;
        }
        Ok(())
    }

    /// Makes every write acknowledged so far on any connection durable,
    /// together with the journal records published before it.
    pub fn flush(&self, disk: usize) -> Result<()> {
        let _gate = self.enter(disk)?;
        let d = self.check_range(disk, 0, 0)?;
        self.make_durable(d)
    }

    pub fn block_status(&self, disk: usize, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let _gate = self.enter(disk)?;
        let d = self.check_range(disk, offset, len)?;
        d.image.extents(offset, len)
    }

    pub fn prefetch(&self, disk: usize, offset: u64, len: u64) -> Result<()> {
        let _gate = self.enter(disk)?;
        let d = self.check_range(disk, offset, len)?;
        d.image.prefetch(offset, len)
    }

    /// Starts a WRITE whose payload the front-end receives straight into
    /// its journal record, saving a copy of every written byte: holds the
    /// range and reserves the record, in that order (so overlapping writes
    /// reach the journal in the order they reach the image). The caller
    /// fills [`InPlaceWrite::buffer`], then calls [`InPlaceWrite::finish`].
    ///
    /// `None` when the ordinary [`Mirror::write`] must take the request:
    /// journaling off, the ring full or in overflow, an overlapping write
    /// in flight (this never waits: the caller may be holding up its
    /// connection), or the request would fail anyway.
    pub fn begin_write_in_place(&self, disk: usize, offset: u64, len: u64) -> Option<InPlaceWrite<'_>> {
        if !self.journaling || len == 0 || len > journal::MAX_RECORD_DATA as u64 {
            return None;
        }
        if self.fenced.get().is_some() {
            return None; // refused (and counted) by `write`
        }
        let gate = self.enter(disk).ok()?;
        let d = self.check_range(disk, offset, len).ok()?;
        let range = d.lock.try_lock(offset, len)?;
        let rec = NewRecord { disk: d.index, kind: RecordKind::Write, offset, length: len as u32, flags: 0 };
        let record = self.journal.reserve_in_place(&rec)?;
        Some(InPlaceWrite { mirror: self, disk: d, offset, record, range, _gate: gate })
    }

    /// Inserts an application-consistent marker into the journal. Returns
    /// its sequence number, or `None` if the ring is in overflow (a tag
    /// inside a resync window could not become a consistent point).
    pub fn tag(&self, label: &str) -> Result<Option<u64>> {
        let _gate = self.enter_to_change(0)?;
        crate::tag::append(&self.journal, &self.tag_lock, label)
    }

    /// Journals a write-type request, or marks the bitmap when the ring has
    /// no room (and from then on, until a resync catches up). The records
    /// stay busy (the tail cannot pass them) until the returned guards are
    /// dropped, once the image has the change: see [`Journal::append_busy`].
    fn publish(&self, d: &Disk, kind: RecordKind, offset: u64, len: u64, data: &[u8]) -> Vec<journal::BusyRecord<'_>> {
        let mut published = Vec::new();
        if !self.journaling {
            return published;
        }
        if self.journal.mode() == Mode::Overflow {
            d.bitmap.mark(offset, len);
            self.stats.overflowed.fetch_add(1, Ordering::Relaxed);
            return published;
        }
        // Records carry at most MAX_RECORD_DATA bytes (or that much range,
        // for zeroes and trims); larger requests take several.
        let chunk = journal::MAX_RECORD_DATA as u64;
        let mut done = 0;
        while done < len {
            let n = chunk.min(len - done);
            let rec = NewRecord { disk: d.index, kind, offset: offset + done, length: n as u32, flags: 0 };
            let payload = if data.is_empty() { &[][..] } else { &data[done as usize..(done + n) as usize] };
            let Some(record) = self.journal.append_busy(&rec, payload) else {
                if self.journal.enter_overflow() {
                    log::warn!(
                        "VM '{}': journal {} took no more records (full: is `tern ship` running? or unwritable: see above); writes go on and are tracked in the dirty bitmaps until a resync catches up",
                        self.config.name,
                        self.journal.path().display()
                    );
                }
                d.bitmap.mark(offset + done, len - done);
                self.stats.overflowed.fetch_add(1, Ordering::Relaxed);
                return published;
            };
            published.push(record);
            done += n;
        }
        self.stats.journaled.fetch_add(1, Ordering::Relaxed);
        published
    }

    /// Runs the image change of a published request. If it fails, the
    /// journal already holds a record of a change the image may not have;
    /// `compensate` repairs the history.
    fn change_image(&self, d: &Disk, offset: u64, len: u64, change: impl FnOnce() -> Result<()>) -> Result<()> {
        let _slot = d.changing.take();
        let injected = |source| Error::Write { path: d.image.path().to_owned(), offset, len: len as usize, source };
        fail::hit(Failpoint::ServeRecordPublished)
            .map_err(injected)
            .and_then(|()| change())
            .and_then(|()| fail::hit(Failpoint::ServeImageChanged).map_err(injected))
            .inspect_err(|_| self.compensate(d, offset, len))
    }

    /// After a failed image change (still under the range lock): the
    /// journal holds a change the image may lack, wholly or partly. Publish
    /// what the image really holds there, so the journal stays a history of
    /// the disk; where that is not possible, the dirty bitmap has the
    /// resync do it.
    fn compensate(&self, d: &Disk, offset: u64, len: u64) {
        // Record by record, however long the request: a record left standing
        // for a change the image lacks would be re-applied to it by the
        // recovery after a process crash. Once the ring is full, the resync
        // re-sends the rest.
        let chunk = journal::MAX_RECORD_DATA as u64;
        let mut actual = Vec::new();
        let mut done = 0;
        while done < len && self.journaling && self.journal.mode() == Mode::Journal {
            let n = chunk.min(len - done);
            actual.resize(n as usize, 0);
            if d.image.read_at(&mut actual, offset + done).is_err() {
                break;
            }
            // The image holds it already: released at once.
            drop(self.publish(d, RecordKind::Resync, offset + done, n, &actual));
            done += n;
        }
        if done < len {
            d.bitmap.mark(offset + done, len - done);
        }
    }

    /// Journal first, then bitmap, then image: after a crash the journal
    /// never lacks a write the image has. One sync of a disk at a time, and
    /// none once one failed (see [`Durable`]).
    fn make_durable(&self, d: &Disk) -> Result<()> {
        fn injected(point: Failpoint, path: &std::path::Path) -> Result<()> {
            fail::hit(point).map_err(|source| Error::Sync { path: path.to_owned(), source })
        }
        let me = d.durable.arrived.fetch_add(1, Ordering::AcqRel) + 1;
        let mut covered = d.durable.covered.lock().unwrap_or_else(|p| p.into_inner());
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned { disk: d.name.clone() });
        }
        if *covered >= me {
            return Ok(()); // a sync that started after this FLUSH arrived
        }
        let covers = d.durable.arrived.load(Ordering::Acquire);
        let result = (|| {
            injected(Failpoint::ServeJournalSync, self.journal.path())?;
            self.journal.sync()?;
            injected(Failpoint::ServeBitmapSync, d.bitmap.path())?;
            d.bitmap.sync()?;
            injected(Failpoint::ServeImageSync, d.image.path())?;
            d.image.sync_data()
        })();
        match &result {
            Ok(()) => *covered = covers,
            Err(e) => {
                self.poisoned.store(true, Ordering::Release);
                log::error!("VM '{}': {e}; refusing further requests until restarted", self.config.name);
            }
        }
        result
    }

    /// Stops admitting requests, waits for those in flight, makes everything
    /// durable and marks the journal detached (a clean shutdown: the next
    /// start needs no recovery).
    pub fn shutdown(&self) -> Result<()> {
        let mut closing = self.gate.write().unwrap_or_else(|p| p.into_inner());
        if *closing {
            return Ok(());
        }
        *closing = true;
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned { disk: self.disks[0].name.clone() });
        }
        // Records nobody shipped are written to the durable journal at disk
        // speed: seconds per GiB, which an operator stopping the service
        // should hear about rather than guess at.
        let unsynced = self.journal.unsynced_bytes();
        let worth_saying = unsynced >= 64 << 20;
        let started = std::time::Instant::now();
        if worth_saying {
            log::info!(
                "VM '{}': writing {} of journal records not shipped yet to {} before stopping \
                 (a running `tern ship` keeps this small)",
                self.config.name,
                crate::units::Size(unsynced).approx(),
                self.journal.path().display()
            );
        }
        self.journal.sync()?;
        if worth_saying {
            log::info!("VM '{}': journal records written in {:.1?}", self.config.name, started.elapsed());
        }
        for d in &self.disks {
            d.bitmap.sync()?;
            d.image.sync_data()?;
        }
        self.journal.clear_flags(journal::FLAG_ATTACHED | journal::FLAG_BARRIER_AWARE);
        self.journal.sync()?;
        // Detached: another front-end (or `tern ship`'s offline resync) may
        // take the VM now, even while this object lives on.
        drop(self.frontend_lock.lock().unwrap_or_else(|p| p.into_inner()).take());
        log::info!("VM '{}': front-end detached cleanly", self.config.name);
        Ok(())
    }
}

/// A WRITE received straight into its journal record; see
/// [`Mirror::begin_write_in_place`]. Dropped unfinished (the client hung up
/// mid-payload, or sent it too slowly), the record becomes a pad and the
/// image is untouched.
#[derive(Debug)]
pub struct InPlaceWrite<'a> {
    mirror: &'a Mirror,
    disk: &'a Disk,
    offset: u64,
    // Fields drop in order: the record is padded or published while the
    // range is still held.
    record: journal::InPlaceRecord<'a>,
    range: crate::range_lock::RangeGuard<'a>,
    _gate: std::sync::RwLockReadGuard<'a, bool>,
}

impl InPlaceWrite<'_> {
    /// Where the payload goes: the record's data in the ring.
    pub fn buffer(&mut self) -> &mut [u8] {
        self.record.data_mut()
    }

    /// Publishes the record, writes the image from it, releases it, then,
    /// for FUA, makes everything durable. Published before the image
    /// changes, as every write (invariant 2).
    pub fn finish(self, fua: bool) -> Result<()> {
        let InPlaceWrite { mirror, disk: d, offset, mut record, range, _gate } = self;
        let len = record.data().len() as u64;
        record.publish();
        mirror.stats.journaled.fetch_add(1, Ordering::Relaxed);
        let changed = mirror.change_image(d, offset, len, || d.image.write_at(record.data(), offset));
        record.release();
        changed?;
        drop(range);
        if fua {
            mirror.make_durable(d)?;
        }
        Ok(())
    }
}

/// A counting semaphore on image changes. A buffered write, zeroing or
/// punch takes the image inode's lock exclusively in the kernel, so the
/// changes of one image run one at a time there anyway; dozens of request
/// threads queued on that lock spin on it (and are switched in and out),
/// which on a small machine takes the CPU the one holding it needs. Waiting
/// here, they sleep.
#[derive(Debug)]
struct ChangeSlots {
    free: Mutex<usize>,
    freed: std::sync::Condvar,
}

struct ChangeSlot<'a>(&'a ChangeSlots);

impl ChangeSlots {
    fn new(n: usize) -> Self {
        ChangeSlots { free: Mutex::new(n.max(1)), freed: std::sync::Condvar::new() }
    }

    fn take(&self) -> ChangeSlot<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        ChangeSlot(self)
    }
}

impl Drop for ChangeSlot<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

mod recovery;
mod resync;

pub use recovery::{apply_record, boot_id, AsImage};
pub use resync::{ResyncStep, RESYNC_MAX_FILL};
#[cfg(test)]
mod tests;
