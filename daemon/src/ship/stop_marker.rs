//! The cache's clean-stop marker, `source-stopped.toml`: the shipper's
//! word that the source's front-end detached and everything it journaled
//! is in the cache — what a failback and a planned failover wait for
//! before they fence the source.

use super::*;
use tern_store::cache::SOURCE_STOPPED;

/// The cache's clean-stop marker (`source-stopped.toml`), kept true by the
/// reader: written once the source's front-end has detached and all it
/// journaled is shipped, removed as soon as it runs again.
pub(super) struct SourceStopMarker {
    cache: CacheDir,
    vm_id: uuid::Uuid,
    /// The seq the marker in the cache says, if there is one, and the
    /// planned failover request it answers.
    noted: std::cell::Cell<Option<(u64, Option<u64>)>>,
    /// Removing the marker failed and was logged; not logged again until
    /// it succeeds.
    remove_failing: std::cell::Cell<bool>,
    /// After a failed update from the idle loop: when to try again, and
    /// the pause that led there.
    idle_retry: std::cell::Cell<Option<(Instant, Duration)>>,
}

/// The first pause after a failed update from the idle loop; it doubles
/// up to [`IDLE_RETRY_MAX`].
const IDLE_RETRY_FIRST: Duration = Duration::from_secs(1);
const IDLE_RETRY_MAX: Duration = Duration::from_secs(30);

impl SourceStopMarker {
    pub(super) fn new(cache: CacheDir, vm_id: uuid::Uuid) -> Self {
        // Unreadable counts as present: the first word on it rewrites or
        // removes it.
        let noted = match cache.read_source_stopped() {
            Ok(None) => None,
            Ok(Some(m)) => Some((m.seq, m.planned_request)),
            _ => Some((0, None)),
        };
        SourceStopMarker {
            cache,
            vm_id,
            noted: std::cell::Cell::new(noted),
            remove_failing: Default::default(),
            idle_retry: Default::default(),
        }
    }

    /// [`SourceStopMarker::update`] from the shipper's idle loop, which
    /// comes round every few milliseconds: after a failure it is tried
    /// again after a pause (1 s, doubling to 30 s), not at every turn (a
    /// store down was sent hundreds of writes a second, and the log a
    /// warning for each), and the outage is logged once.
    pub(super) fn update_when_idle(&self, journal: &Journal, bitmaps: &[DirtyBitmap], stats: &Stats) {
        let retry = self.idle_retry.get();
        if retry.is_some_and(|(at, _)| Instant::now() < at) {
            return;
        }
        match self.update(journal, bitmaps, stats) {
            Ok(()) => {
                if retry.is_some() {
                    log::info!("VM '{}': the cache's clean-stop marker is up to date again", self.name());
                }
                self.idle_retry.set(None);
            }
            Err(e) => {
                let pause = retry.map_or(IDLE_RETRY_FIRST, |(_, p)| (p * 2).min(IDLE_RETRY_MAX));
                if retry.is_none() {
                    log::warn!(
                        "VM '{}': {e:#}; trying again after a pause (up to {}) until it succeeds",
                        self.name(),
                        humantime::format_duration(IDLE_RETRY_MAX)
                    );
                }
                self.idle_retry.set(Some((Instant::now() + pause, pause)));
            }
        }
    }

    /// Writes or removes the marker as the journal says: detached, every
    /// sequence number it handed out durable in the cache, nothing dirty,
    /// no window open (the replica consistent there).
    pub(super) fn update(&self, journal: &Journal, bitmaps: &[DirtyBitmap], stats: &Stats) -> Result<()> {
        let flags = journal.flags();
        if flags & journal::FLAG_ATTACHED != 0 {
            self.source_runs();
            return Ok(());
        }
        let shipped = stats.last_shipped();
        if shipped + 1 == journal.head().seq
            && flags & journal::FLAG_CHECKSUM_RESYNC == 0
            && !journal.window_open()
            && bitmaps.iter().all(|b| b.dirty_count() == 0)
        {
            self.source_stopped(shipped)?;
        }
        Ok(())
    }

    pub(super) fn source_stopped(&self, seq: u64) -> Result<()> {
        // A planned failover waits for a marker that answers its request.
        let planned = self.cache.read_planned_failover().ok().flatten().map(|p| p.requested_unix_ms);
        if self.noted.get() == Some((seq, planned)) {
            return Ok(());
        }
        let marker = tern_store::cache::SourceStopped {
            version: 1,
            vm_id: self.vm_id,
            seq,
            unix_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis())
                as u64,
            planned_request: planned,
        };
        let written = (|| -> Result<()> {
            self.cache.write_toml(
                SOURCE_STOPPED,
                &marker,
                "tern ship: the source stopped cleanly, everything shipped",
            )?;
            tern_driver::fail::hit(tern_driver::fail::Failpoint::ShipStopMarkerWritten)
                .with_context(|| format!("writing {}", self.cache.location(SOURCE_STOPPED)))
        })();
        if let Err(e) = written {
            // A write that failed may have landed all the same (an object
            // store's answer lost after the PUT): noted as present, so the
            // source running again removes it. Left there, a failback would
            // take the source for stopped and discard what it writes.
            self.noted.set(Some((0, None)));
            return Err(e);
        }
        log::info!("VM '{}': the source stopped cleanly and everything up to seq {seq} is shipped", self.name());
        self.noted.set(Some((seq, planned)));
        Ok(())
    }

    /// The source writes again: its stop marker goes. A store that fails
    /// now is tried again at the next record (the marker stays noted);
    /// meanwhile a marker left behind cannot mislead a failback, which
    /// finds newer segments than its seq and takes the source as running.
    pub(super) fn source_runs(&self) {
        if self.noted.get().is_none() {
            return;
        }
        match self.cache.remove(SOURCE_STOPPED) {
            Ok(()) => {
                self.noted.set(None);
                self.remove_failing.set(false);
            }
            // Once per outage: it is tried at every record meanwhile.
            Err(e) if !self.remove_failing.replace(true) => {
                log::warn!("VM '{}': {e:#}; trying again at each write", self.name())
            }
            Err(_) => {}
        }
    }

    pub(super) fn name(&self) -> String {
        self.cache.vm().to_string()
    }
}
