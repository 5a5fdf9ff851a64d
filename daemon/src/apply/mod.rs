//! `tern apply`: the target side. Replays each VM's segments, in sequence
//! order, onto its replica images; takes recovery points as clones at
//! segment boundaries (crash-consistent, every policy interval) and at tag
//! records (app-consistent); keeps the catalog thinned to the retention.
//!
//! Invariants 6, 7 and 8: a segment is verified completely before any of it
//! is applied; a gap, a stale epoch or a damaged segment stops that VM with
//! an error naming the file, the replica staying at the last good sequence;
//! no point is taken inside a resync window; replaying from the checkpoint
//! after a crash gives the same replica and the same catalog.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use tern_driver::clone::{clone_file, CloneMethod};
use tern_driver::fs::write_durably;
use tern_driver::image::Image;
use tern_driver::journal::{self, RecordKind};
use tern_store::cache::{Applied, CacheDir, Manifest, ReadError};
use tern_store::file::FileError;
use tern_store::object::Store;
use tern_store::segment::Segment;
use tern_store::target::{
    expired_points, stream_now, Checkpoint, Point, PointAnswer, PointGroup, PointKind, PointRequest, Quiesce,
    TargetDir, TARGET_VERSION,
};

use tern_driver::fail::{self, Failpoint};

/// A segment the applier refuses (damaged, a gap, a stale epoch): the VM
/// stops at the last good sequence.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

/// A segment the store did not give (unreachable, timed out, gone since
/// it was listed): neither it nor the replica is at fault, and the VM is
/// tried again as after any failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Unreadable(String);

/// The cache's stream for a VM is not the one being applied any more.
#[derive(Debug, thiserror::Error)]
#[error("the cache's stream for this VM was replaced")]
struct StreamReplaced;

/// Decoded segment data read ahead of the applier at most: the next
/// segments are read, verified and decompressed while a batch is written
/// and fsynced, instead of after.
const READ_AHEAD: u64 = 128 << 20;

mod batch;
mod failing;
mod latest;
mod points;
use points::PointTag;
mod read_ahead;
mod seed;

use seed::{retire_previous_stream, retire_seeding_failover, seed_replica};

pub use latest::latest_applied_point;

#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Apply what the cache holds now, then return.
    pub once: bool,
    /// Leave applied segments in the cache (for audits and tests).
    pub keep_segments: bool,
    /// Record data a batch may hold before it is written out (the
    /// applier's memory, besides what is read ahead).
    pub batch_limit: usize,
    /// Record data written to the replicas before they are fsynced and the
    /// checkpoint moves (checked as each batch is written; points and a
    /// drained cache sync sooner). Fewer fsyncs let the filesystem
    /// allocate what the batches wrote all at once: on xfs, 1 GiB of
    /// random 4 KiB writes then lands in far fewer extents. A crash
    /// replays from the kept segments what was not synced: less than this
    /// plus a batch and a segment.
    pub sync_limit: usize,
}

impl ApplyOptions {
    pub const DEFAULT_BATCH_LIMIT: usize = 256 << 20;
    pub const DEFAULT_SYNC_LIMIT: usize = 1 << 30;
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            once: false,
            keep_segments: false,
            batch_limit: Self::DEFAULT_BATCH_LIMIT,
            sync_limit: Self::DEFAULT_SYNC_LIMIT,
        }
    }
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Applies every VM in `cache` (or the one named) until stopped, or once.
pub fn run(
    cache: &Store,
    target: &Path,
    vm: Option<&str>,
    options: &ApplyOptions,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    if !target.is_dir() {
        bail!("the target site {} does not exist or is not a directory; create or mount it first", target.display());
    }
    cache.check().context("the cache store is not usable")?;
    if let Some(v) = vm {
        // Not there, or not readable yet (a share still mounting, a store
        // still starting): waited for below, as before, not fatal.
        if !CacheDir::new(cache, v).exists(tern_store::cache::MANIFEST).unwrap_or(false) {
            let there = vms_in(cache).unwrap_or_default();
            let there = if there.is_empty() { "none yet".to_string() } else { there.join(", ") };
            let what = format!("the cache store {} holds no VM '{v}' (it holds: {there})", cache.describe());
            if options.once {
                bail!("{what}");
            }
            log::warn!("{what}; waiting for it to be shipped");
        }
    }
    let mut appliers: BTreeMap<String, VmApplier> = BTreeMap::new();
    let mut failing = failing::FailingVms::default();
    crate::notify::ready(&format!("applying {} onto {}", cache.describe(), target.display()));
    loop {
        crate::notify::watchdog();
        let names = match vm {
            Some(v) => vec![v.to_owned()],
            None => vms_in(cache)?,
        };
        let mut progressed = false;
        for name in names {
            if failing.waiting(&name, std::time::Instant::now()) || stop.load(Ordering::Acquire) {
                continue;
            }
            let cache_dir = CacheDir::new(cache, &name);
            match apply_pass(&mut appliers, cache, target, &name, options, &stop) {
                Ok(n) => {
                    progressed |= n > 0;
                    failing.succeeded(&cache_dir, &name);
                }
                Err(e) => {
                    appliers.remove(&name);
                    let hint = crate::hint::for_error(&e).map(|h| format!(" ({h})")).unwrap_or_default();
                    let wait = failing.failed(&cache_dir, &name, format!("{e:#}"), !options.once);
                    if options.once {
                        log::error!("VM '{name}': {e:#}{hint}");
                    } else {
                        log::error!("VM '{name}': {e:#}; trying again in {}s{hint}", wait.as_secs());
                    }
                }
            }
        }
        if stop.load(Ordering::Acquire) || (options.once && !progressed) {
            break;
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    if let Some((name, e)) = failing.first() {
        bail!("VM '{name}': {e}");
    }
    Ok(())
}

/// One pass of the applier of VM `name` (opened first if need be):
/// records applied, 0 with nothing to do (or nothing shipped yet).
fn apply_pass(
    appliers: &mut BTreeMap<String, VmApplier>,
    cache: &Store,
    target: &Path,
    name: &str,
    options: &ApplyOptions,
    stop: &AtomicBool,
) -> Result<usize> {
    if !appliers.contains_key(name) {
        match VmApplier::open(cache, target, name, options)? {
            Some(a) => appliers.insert(name.to_owned(), a),
            None => return Ok(0), // no manifest yet: nothing shipped
        };
    }
    let applier = appliers.get_mut(name).expect("inserted above");
    match applier.step(stop) {
        Err(e) if e.is::<StreamReplaced>() => {
            log::info!("VM '{name}': the cache holds a new stream (re-protected or failed back); reopening");
            appliers.remove(name);
            Ok(1)
        }
        outcome => outcome,
    }
}

/// VMs of the cache store that have a manifest.
fn vms_in(cache: &Store) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for name in cache.list_dirs("")? {
        if tern_driver::vm::validate_name("VM", &name).is_ok()
            && CacheDir::new(cache, &name).exists(tern_store::cache::MANIFEST)?
        {
            out.push(name);
        }
    }
    Ok(out)
}

struct VmApplier {
    name: String,
    cache: CacheDir,
    target: TargetDir,
    manifest: Manifest,
    replicas: Vec<Image>,
    /// What the replicas durably hold.
    checkpoint: Checkpoint,
    /// Where applying stands in memory: segments read into `batch` but not
    /// yet written, fsynced and checkpointed.
    cur: Checkpoint,
    batch: batch::Batch,
    /// Record data written to the replicas since they were last fsynced.
    unsynced: usize,
    options: ApplyOptions,
    warned_copy: bool,
    /// The newest seq read into `batch`: recorded as the checkpoint's
    /// `written_seq` before the batch is written.
    batched_to: u64,
    /// A pass that stopped (an error, a kill) wrote the replicas up to
    /// this seq past their checkpoint: no point is taken below it, where
    /// they would mix two states, until applying has passed it again.
    mixed_until: u64,
    /// One applier per VM's replicas (a daemon, `tern failover --latest`).
    _lock: std::fs::File,
}

impl VmApplier {
    fn open(cache_root: &Store, target_root: &Path, name: &str, options: &ApplyOptions) -> Result<Option<Self>> {
        let cache = crate::cache::for_vm(cache_root, name)?;
        let Some(manifest) = cache.read_manifest()? else { return Ok(None) };
        let target = TargetDir::new(target_root, name);
        // Durable in their parents: a checkpoint in a directory a power cut
        // takes away lets pruned segments go missing for good.
        tern_driver::fs::create_dir_durably(target.root())?;
        let lock = tern_driver::fs::lock_exclusive(
            &target.root().join("apply.lock"),
            &format!("the replicas of VM '{name}'"),
            "`tern apply`",
        )?;
        for dir in [target.replica_dir(), target.points_dir()] {
            if !dir.exists() {
                tern_driver::fs::create_dir_durably(&dir)?;
                // Before any replica or point exists in it: new files inherit.
                tern_driver::clone::prefer_in_place_writes(&dir)?;
            }
        }
        let seeded = manifest.disks.iter().any(|d| d.seed.is_some());
        let checkpoint = match target.read_checkpoint().map_err(anyhow::Error::msg)? {
            Some(c) if c.vm_id != manifest.id && seeded => {
                // A re-protected stream takes over: the old direction's
                // replicas and points move aside, whole.
                retire_previous_stream(&target, &c.vm_id)?;
                None
            }
            Some(c) if c.vm_id != manifest.id => bail!(
                "{} belongs to VM id {}, but the cache's VM '{name}' is id {}: another VM of the same name; move the target directory away",
                target.checkpoint_path().display(),
                c.vm_id,
                manifest.id
            ),
            other => other,
        };
        let checkpoint = match checkpoint {
            Some(c) => c,
            None => Checkpoint {
                version: TARGET_VERSION,
                vm_id: manifest.id,
                epoch: manifest.epochs[0].number,
                applied_seq: manifest.epochs[0].first_seq.saturating_sub(1),
                // An initial sync's replica is not the VM until its window
                // closes (a seeded one is the other site's stale disk).
                in_window: manifest.starts_in_window,
                source_time_ns: 0,
                last_point_ns: 0,
                written_seq: 0,
            },
        };
        let mut replicas = Vec::new();
        for d in &manifest.disks {
            let path = target.replica_path(&d.name);
            if !path.exists() {
                match &d.seed {
                    Some(seed) => seed_replica(&target, &d.name, &target.seed_path(seed), &path, d.size)?,
                    None => {
                        // A new replica starts empty (sparse): the initial
                        // sync (resync records) fills in the source's data.
                        let f = std::fs::File::create(&path)
                            .with_context(|| format!("cannot create {}", path.display()))?;
                        f.set_len(d.size).with_context(|| format!("cannot size {}", path.display()))?;
                        f.sync_all()?;
                    }
                }
            }
            let image = Image::open(&path)?;
            if image.size() != d.size {
                bail!("replica {} is {} bytes, but disk '{}' is {}", path.display(), image.size(), d.name, d.size);
            }
            replicas.push(image);
        }
        retire_seeding_failover(&target, &manifest)?;
        let removed = target.remove_partial_points()?;
        if removed > 0 {
            log::info!("VM '{name}': removed {removed} half-taken point(s) a previous run left");
        }
        log::info!(
            "VM '{name}': applying {} onto {} from seq {} (epoch {})",
            cache.location(tern_store::cache::SEGMENTS),
            target.root().display(),
            checkpoint.applied_seq + 1,
            checkpoint.epoch
        );
        let mixed_until = if checkpoint.written_seq > checkpoint.applied_seq { checkpoint.written_seq } else { 0 };
        if mixed_until > 0 {
            log::warn!(
                "VM '{name}': a pass that stopped wrote the replicas past their checkpoint (seq {}) up to seq {mixed_until}: no point is taken until seqs up to {mixed_until} are applied again",
                checkpoint.applied_seq
            );
        }
        Ok(Some(VmApplier {
            name: name.to_owned(),
            cache,
            target,
            manifest,
            replicas,
            cur: checkpoint.clone(),
            checkpoint,
            batch: batch::Batch::default(),
            unsynced: 0,
            options: options.clone(),
            warned_copy: false,
            batched_to: 0,
            mixed_until,
            _lock: lock,
        }))
    }

    /// Applies every segment the cache holds past the checkpoint, answers a
    /// pending hash request, thins the catalog. Returns segments applied.
    ///
    /// Segments are read into one batch until it holds `batch_limit` bytes,
    /// a crash point is due, or the cache has no more: then the batch is
    /// written (each byte's last version, in offset order). The replicas
    /// are fsynced and checkpointed every `sync_limit` bytes written, at a
    /// crash point, and when the cache has no more. App points flush the
    /// batch first.
    fn step(&mut self, stop: &AtomicBool) -> Result<usize> {
        match self.cache.read_manifest().or_else(FileError::damaged_as_none)? {
            Some(m) if m.id == self.manifest.id => {}
            // Another stream took the VM's name over (after `tern failback`
            // the old one is removed from the cache, a new one starts):
            // applying stops here and restarts from its manifest.
            _ => return Err(StreamReplaced.into()),
        }
        // Read before the segments are listed: the point answering it then
        // holds every segment the cache had when it was asked for.
        let request = self.point_request();
        // A damaged fence is a fence still: applying past it could
        // overwrite what the failed-over VM runs on.
        let fenced = match self.cache.read_fence() {
            Ok(fence) => fence.is_some(),
            Err(FileError::Damaged { .. }) => true,
            Err(e) => return Err(e.into()),
        };
        if fenced {
            // Failed over: the failed-over disks are the VM now, and
            // whatever the old source still ships is not applied.
            if let Some(r) = request {
                self.answer_point_request(r)?;
            }
            return Ok(0);
        }
        let mut applied = 0;
        let todo = self.segments_to_apply()?;
        let vm_id = *self.manifest.id.as_bytes();
        let reader = self.cache.clone();
        std::thread::scope(|scope| -> Result<()> {
            // Dropped when this returns, which stops the reader.
            let segments = read_ahead::spawn(scope, reader, todo, vm_id, READ_AHEAD);
            for (first, last, path, segment) in segments {
                if last <= self.cur.applied_seq {
                    continue;
                }
                if stop.load(Ordering::Acquire) {
                    break;
                }
                crate::notify::watchdog();
                let read = if first > self.cur.applied_seq + 1 {
                    // The manifest grows epochs; re-read it for this one.
                    self.reread_manifest().and_then(|()| self.read_segment(first, last, &path, segment))
                } else {
                    self.read_segment(first, last, &path, segment)
                };
                if let Err(e) = read {
                    // A segment refused or not read: what was read before
                    // it is good, keep it. Any other error (I/O) commits
                    // nothing.
                    if e.is::<Refused>() || e.is::<Unreadable>() {
                        self.commit()?;
                    }
                    return Err(e);
                }
                applied += 1;
                let interval = self.manifest.policy.interval.as_nanos() as u64;
                if !self.cur.in_window
                    && self.cur.applied_seq >= self.mixed_until
                    && self.cur.source_time_ns.saturating_sub(self.cur.last_point_ns) >= interval
                {
                    // The point before the checkpoint that passes it: a
                    // crash in between takes it again after the restart.
                    self.flush()?;
                    let (seq, epoch, time) = (self.cur.applied_seq, self.cur.epoch, self.cur.source_time_ns);
                    self.take_point(seq, epoch, time, PointKind::Crash, PointTag::default())?;
                    self.cur.last_point_ns = time;
                    self.commit()?;
                } else if self.batch.data_len() >= self.options.batch_limit {
                    self.write_batch()?;
                    if self.unsynced >= self.options.sync_limit {
                        self.commit()?;
                    }
                }
            }
            Ok(())
        })?;
        self.commit()?;
        if applied > 0 {
            self.publish_applied();
        }
        if !self.options.keep_segments {
            self.prune_segments()?;
        }
        self.answer_hash_request()?;
        if applied > 0 {
            self.thin_points()?;
        }
        if let Some(r) = request {
            self.answer_point_request(r)?;
        }
        Ok(applied)
    }

    /// Takes the cache's manifest again, for the epochs it has grown. Its
    /// disks must be the ones the replicas were opened for: a protected
    /// VM's disks never change, and applying records checked against
    /// other sizes would extend a replica, or take points that miss disks.
    fn reread_manifest(&mut self) -> Result<()> {
        let Some(m) = self.cache.read_manifest().or_else(FileError::damaged_as_none)? else { return Ok(()) };
        if m.id != self.manifest.id {
            return Err(StreamReplaced.into());
        }
        let disks = |m: &Manifest| m.disks.iter().map(|d| (d.name.clone(), d.size)).collect::<Vec<_>>();
        if disks(&m) != disks(&self.manifest) {
            return Err(Refused(format!(
                "{} now lists disks {:?}, but the replicas are of disks {:?}: a protected VM's disks cannot change (a damaged or foreign manifest); the replica stays at seq {}; repair the manifest, then restart `tern apply`",
                self.cache.location(tern_store::cache::MANIFEST),
                disks(&m),
                disks(&self.manifest),
                self.cur.applied_seq
            ))
            .into());
        }
        self.manifest = m;
        Ok(())
    }

    /// Writes the batch to the replicas (not yet durable), after
    /// recording how far that takes them.
    fn write_batch(&mut self) -> Result<usize> {
        let written = self.batch.data_len();
        // (Also a batch of trims and zeroes only: no data, but changes.)
        if self.checkpoint.written_seq < self.batched_to {
            self.record_written(self.batched_to)?;
        }
        self.unsynced += written;
        let calls = self.batch.apply(&self.replicas).context("writing to the replicas")?;
        if written > 0 {
            fail::hit(Failpoint::ApplyBatchWritten)?;
        }
        Ok(calls)
    }

    /// Writes the batch and fsyncs the replicas.
    fn flush(&mut self) -> Result<usize> {
        let calls = self.write_batch()?;
        fail::hit(Failpoint::ApplyReplicaSync)?;
        for image in &self.replicas {
            image.sync_data()?;
        }
        fail::hit(Failpoint::ApplyBatchApplied)?;
        self.unsynced = 0;
        Ok(calls)
    }

    /// Records durably, in the checkpoint as it stands, that the replicas
    /// may hold records up to `seq`: a pass that stops after writing a
    /// batch leaves them past their checkpoint, and the next one must know
    /// (see [`VmApplier::mixed_until`]).
    fn record_written(&mut self, seq: u64) -> Result<()> {
        let recorded = Checkpoint { written_seq: seq, ..self.checkpoint.clone() };
        write_durably(&self.target.checkpoint_path(), toml::to_string(&recorded)?.as_bytes())?;
        self.checkpoint.written_seq = seq;
        self.cur.written_seq = seq;
        Ok(())
    }

    /// Flushes, then makes `cur` the durable checkpoint.
    fn commit(&mut self) -> Result<()> {
        if self.cur == self.checkpoint {
            return Ok(());
        }
        let calls = self.flush()?;
        let text = toml::to_string(&self.cur)?;
        fail::hit(Failpoint::ApplyCheckpointWrite)?;
        write_durably(&self.target.checkpoint_path(), text.as_bytes())?;
        log::debug!("VM '{}': applied up to seq {} ({calls} writes)", self.name, self.cur.applied_seq);
        self.checkpoint = self.cur.clone();
        Ok(())
    }

    /// Checks one segment (as read and verified by the read-ahead) and reads
    /// its records into the batch (taking the app points of its tags); `cur`
    /// moves to its end.
    fn read_segment(&mut self, first: u64, last: u64, path: &str, segment: Result<Segment, ReadError>) -> Result<()> {
        let at = self.cur.applied_seq;
        let refuse = |why: String| {
            anyhow::Error::new(Refused(format!(
                "{why}; the replica stays at seq {at}; repair or re-ship, then restart `tern apply`"
            )))
        };
        let seg = match segment {
            Ok(seg) => seg,
            Err(e) if e.is_damaged() => return Err(refuse(e.to_string())),
            Err(e) => {
                let why = format!("{:#}", anyhow::Error::new(e));
                return Err(Unreadable(format!("{why}; the replica stays at seq {at}")).into());
            }
        };
        let h = &seg.header;
        if (h.first_seq, h.last_seq) != (first, last) || h.last_seq <= at {
            return Err(refuse(format!(
                "{}: holds seqs {}..={}, which its name or the replica's position (seq {at}) contradicts",
                path, h.first_seq, h.last_seq
            )));
        }
        if h.epoch < self.cur.epoch {
            return Err(refuse(format!(
                "{}: segment of epoch {}, but the replica is already in epoch {} (a stale source shipped it)",
                path, h.epoch, self.cur.epoch
            )));
        }
        let mut in_window = self.cur.in_window;
        if h.first_seq > at + 1 {
            let starts_epoch = h.epoch > self.cur.epoch
                && self.manifest.epoch_numbered(h.epoch).is_some_and(|e| e.first_seq == h.first_seq);
            if !starts_epoch {
                return Err(refuse(format!(
                    "{}: starts at seq {}, but seqs {}..{} are missing from {} (a gap)",
                    path,
                    h.first_seq,
                    at + 1,
                    h.first_seq - 1,
                    self.cache.location(tern_store::cache::SEGMENTS)
                )));
            }
            let why = self.manifest.epoch_numbered(h.epoch).map_or("", |e| e.reason.as_str());
            log::warn!(
                "VM '{}': epoch {} starts at seq {} (records {}..{} will never come: {why}); the replica is inconsistent until its resync window closes",
                self.name,
                h.epoch,
                h.first_seq,
                at + 1,
                h.first_seq - 1
            );
        }
        if h.epoch > self.cur.epoch {
            in_window = true;
        }
        // Every record must fit the VM's disks before any is applied: a
        // segment goes onto the replica whole or not at all.
        for (r, _) in seg.records() {
            let size = self.replicas.get(r.disk as usize).map(Image::size);
            let fits = size.is_some_and(|size| r.offset.checked_add(r.length as u64).is_some_and(|end| end <= size));
            if r.kind.changes_disk() && !fits {
                return Err(refuse(format!(
                    "{}: record seq {} writes {}+{} on disk {}, outside the VM's disks",
                    path, r.seq, r.offset, r.length, r.disk
                )));
            }
        }
        let mut source_time = self.cur.source_time_ns;
        // The batch keeps the segment and points into it.
        let seg = Arc::new(seg);
        let payload: batch::Payload = Arc::clone(&seg) as batch::Payload;
        let h = &seg.header;
        for (r, span) in seg.record_spans() {
            if r.seq <= at {
                continue; // applied before a restart (the checkpoint fell inside this segment)
            }
            match r.kind {
                RecordKind::Resync if r.flags == journal::RESYNC_OPEN => in_window = true,
                RecordKind::Resync if r.flags == journal::RESYNC_CLOSE => {
                    let closes_from = self.manifest.epoch_numbered(h.epoch).map_or(0, |e| e.closes_from);
                    if r.seq >= closes_from {
                        in_window = false;
                    } else {
                        log::info!(
                            "VM '{}': the window close at seq {} predates epoch {}'s comparison; the window stays open",
                            self.name,
                            r.seq,
                            h.epoch
                        );
                    }
                }
                RecordKind::Tag => {
                    let data = &seg.payload()[span];
                    // A group tag's point carries the group point, and the
                    // cut's time so that retention ages its members as one.
                    let bad = || format!("{path}: the tag at seq {}", r.seq);
                    let (label, time_ns, group, quiesce) = match r.flags {
                        journal::TAG_GROUP => {
                            let mut tag = crate::group::GroupTag::parse(data).with_context(bad)?;
                            let quiesce = tag.quiesce.remove(&self.name);
                            let group = PointGroup { group: tag.group, point: tag.point, members: tag.members };
                            (tag.label, tag.time_ns, Some(group), quiesce)
                        }
                        journal::TAG_QUIESCE => {
                            let tag = crate::freeze::QuiescedTag::parse(data).with_context(bad)?;
                            (Some(tag.label), r.time_ns, None, Some(tag.quiesce))
                        }
                        _ => (Some(String::from_utf8_lossy(data).into_owned()), r.time_ns, None, None),
                    };
                    if in_window {
                        log::warn!(
                            "VM '{}': tag '{}' (seq {}) falls inside a resync window; no point can be taken there",
                            self.name,
                            label.as_deref().unwrap_or(""),
                            r.seq
                        );
                    } else if r.seq < self.mixed_until {
                        log::warn!(
                            "VM '{}': tag '{}' (seq {}) falls where a pass that stopped had already written later records (up to seq {}) to the replicas; no point can be taken there",
                            self.name,
                            label.as_deref().unwrap_or(""),
                            r.seq,
                            self.mixed_until
                        );
                    } else {
                        self.write_batch().with_context(|| format!("applying {}", path))?;
                        self.take_point(r.seq, h.epoch, time_ns, PointKind::App, PointTag { label, group, quiesce })?;
                    }
                }
                kind if kind.changes_disk() => {
                    self.batch.add(r, &payload, span);
                    self.batched_to = r.seq;
                }
                _ => {}
            }
            if r.time_ns > 0 {
                source_time = r.time_ns;
            }
        }
        self.cur.applied_seq = h.last_seq;
        self.cur.epoch = h.epoch;
        self.cur.in_window = in_window;
        self.cur.source_time_ns = source_time;
        Ok(())
    }

    /// The listed segments past the applied position. A listing that
    /// shows a gap is taken again before any segment is refused for it: a
    /// listing made while the shipper publishes may show a segment without
    /// the one before it (readdir in hash order, or a paged bucket list,
    /// returns names created during the listing or not, each on its own).
    /// Segments are published in order, so a second listing, begun after
    /// the first ended, holds every segment before the newest the first
    /// one saw.
    fn segments_to_apply(&self) -> Result<Vec<tern_store::cache::Listed>> {
        let list = || -> Result<Vec<_>> {
            Ok(self.cache.list_segments()?.into_iter().filter(|l| l.last_seq > self.cur.applied_seq).collect())
        };
        let todo = list()?;
        let mut expected = self.cur.applied_seq + 1;
        for l in &todo {
            let epoch_starts = self.manifest.epochs.iter().any(|e| e.first_seq == l.first_seq);
            if l.first_seq > expected && !epoch_starts {
                log::debug!(
                    "VM '{}': the listing shows seqs {expected}..{} missing; listing again",
                    self.name,
                    l.first_seq - 1
                );
                return list();
            }
            expected = expected.max(l.last_seq + 1);
        }
        Ok(todo)
    }

    /// Deletes applied segments (after the checkpoint is durable), always
    /// leaving the newest: the shipper resumes from it.
    fn prune_segments(&self) -> Result<()> {
        let list = self.cache.list_segments()?;
        for l in list.iter().take(list.len().saturating_sub(1)) {
            if l.last_seq <= self.checkpoint.applied_seq {
                self.cache.remove_segment(l.first_seq, l.last_seq).context("cannot remove an applied segment")?;
            }
        }
        Ok(())
    }

    fn publish_applied(&self) {
        let points = self.target.list_points().ok();
        let applied = Applied {
            version: 1,
            epoch: self.checkpoint.epoch,
            applied_seq: self.checkpoint.applied_seq,
            source_time_ns: self.checkpoint.source_time_ns,
            updated_unix_ms: now_ns() / 1_000_000,
            points: points.as_ref().map(|p| p.len() as u64),
            newest_point_ns: points.as_ref().and_then(|p| p.iter().map(|p| p.time_ns).max()),
        };
        if let Err(e) =
            self.cache.write_toml(tern_store::cache::APPLIED, &applied, "tern apply's progress, for the source's RPO")
        {
            log::warn!("VM '{}': {e:#}", self.name);
        }
    }

    /// After a host crash at the source: publish the replicas' block hashes
    /// once it asks.
    fn answer_hash_request(&self) -> Result<()> {
        let Some(request) = self.cache.read_hash_request().or_else(FileError::damaged_as_none)? else { return Ok(()) };
        // Only once the replica holds everything shipped before the crash
        // (it is in the crash's epoch): an answer from further back would
        // call a region equal that a later old-epoch segment then changes.
        if self.checkpoint.epoch < request.epoch {
            return Ok(());
        }
        let answered = |d: &tern_store::cache::ManifestDisk| {
            self.cache.exists(&tern_store::hashes::hashes_name(&request, &d.name))
        };
        if self.manifest.disks.iter().map(answered).collect::<Result<Vec<bool>, _>>()?.into_iter().all(|a| a) {
            return Ok(());
        }
        let disks: Vec<(&str, &Image)> =
            self.manifest.disks.iter().map(|d| d.name.as_str()).zip(self.replicas.iter()).collect();
        self.cache
            .answer_hash_request(*self.manifest.id.as_bytes(), &disks, self.checkpoint.applied_seq)
            .map_err(anyhow::Error::msg)?;
        log::info!(
            "VM '{}': answered the source's block-hash request (epoch {}) with the replica at seq {}",
            self.name,
            request.epoch,
            self.checkpoint.applied_seq
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests;
