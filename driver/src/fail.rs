//! Failpoints: named places at tern's I/O edges where a crash test stops
//! the process (`kill -9`) or makes the I/O fail (EIO, ENOSPC, a failed
//! fsync), to prove that every order of "make durable, then publish" holds.
//!
//! Compiled only with the `failpoints` cargo feature, never into release
//! builds: without it [`hit`] is an inline `Ok(())`. The crash tests build
//! `tern` with the feature (`scripts/build-failpoints.sh`) and set, per
//! process:
//!
//! ```text
//! TERN_FAILPOINTS="ship:segment-synced=kill@2;apply:replica-sync=eio@1.."
//! TERN_FAILPOINTS_LOG=/path/to/log   # one line per firing, for the harness
//! ```
//!
//! Each entry is `<point>=<action>[@<pass>]`: `action` is `kill`, `eio`,
//! `enospc`, `edquot` or `delay:<ms>` (the thread sleeps there, so a test
//! can act while it is caught between two steps); `@N` fires at the Nth pass only (default 1),
//! `@N..` at every pass from the Nth on. [`Failpoint::ALL`] lists every point;
//! `tern failpoints` prints them (in builds with the feature).
//!
//! Hand-written rather than the `fail` crate: the actions tern needs (a
//! real SIGKILL, an errno returned as the syscall would) are not `fail`'s,
//! and a closed enum of points lets the torture suite enumerate them.

use std::io;

/// Every failpoint, one per I/O edge. The name says the process role and
/// what has just happened (or is about to) when it is passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failpoint {
    /// serve: a write-type record is published (busy), the image not yet
    /// changed.
    ServeRecordPublished,
    /// serve: the image is changed, the record not yet released.
    ServeImageChanged,
    /// serve: a FLUSH/FUA: before the journal's group commit.
    ServeJournalSync,
    /// serve: a FLUSH/FUA: before the dirty bitmaps' msync.
    ServeBitmapSync,
    /// serve: a FLUSH/FUA: before the source image's fdatasync.
    ServeImageSync,
    /// serve: a resync record is published for a dirty region, the
    /// region not yet cleared.
    ServeResyncPublished,
    /// journal: the unsynced records are written to the durable file,
    /// before its header and fdatasync.
    JournalRecordsWritten,
    /// tag: the tag is reserved, filled and its number made durable, not
    /// yet published.
    TagReserved,
    /// tag --group: every member's group barrier is closed (their writes
    /// wait), no group tag appended yet.
    TagGroupBarrierClosed,
    /// tag --group: one member's group tag has its place reserved (no
    /// I/O), writes still held.
    TagGroupReserved,
    /// ship: a batch of records is read from the ring.
    ShipBatchRead,
    /// ship: a segment's bytes are written to its temporary file.
    ShipSegmentWritten,
    /// ship: before the segment's fsync.
    ShipSegmentSync,
    /// ship: the segment is fsynced, not yet renamed.
    ShipSegmentSynced,
    /// ship: the segment is under its name in a directory store, the
    /// directory not yet fsynced.
    ShipSegmentLinked,
    /// ship: the segment is renamed and its directory fsynced, the ring's
    /// tail not yet moved.
    ShipSegmentRenamed,
    /// ship: before the manifest is written.
    ShipManifestWrite,
    /// ship: the clean-stop marker is written to the cache, its write not
    /// yet counted done (an object store's answer lost after the PUT).
    ShipStopMarkerWritten,
    /// apply: a batch is written to the replicas, not yet fsynced.
    ApplyBatchWritten,
    /// apply: before the replicas' fdatasync.
    ApplyReplicaSync,
    /// apply: the replicas are fsynced, the checkpoint not yet written.
    ApplyBatchApplied,
    /// apply: before the checkpoint is written.
    ApplyCheckpointWrite,
    /// apply: a point's clones are made, its `point.toml` not yet.
    ApplyPointCloned,
    /// apply: before an expired point is removed.
    ApplyPointExpire,
    /// failover: the point's disks are cloned into the failover directory.
    FailoverDisksCloned,
    /// failover: before the fence is written into the cache.
    FailoverFenceWrite,
    /// reprotect: before the new direction's VM is enabled.
    ReprotectEnable,
    /// failback: the old disks are restored from the failed-over ones.
    FailbackDisksRestored,
    /// failback: the old state is moved aside, the new direction not yet
    /// enabled.
    FailbackStateMoved,
    /// failback: before the old direction's cache directory (with its
    /// fence) is retired.
    FailbackCacheRetire,
    /// failback: the old direction's cache directory is retired (its
    /// fence gone), the new direction not yet enabled.
    FailbackCacheRetired,
    /// failback: the new direction is enabled, the old state and ring not
    /// yet removed.
    FailbackEnabled,
}

impl Failpoint {
    pub const ALL: &'static [Failpoint] = &[
        Failpoint::ServeRecordPublished,
        Failpoint::ServeImageChanged,
        Failpoint::ServeJournalSync,
        Failpoint::ServeBitmapSync,
        Failpoint::ServeImageSync,
        Failpoint::ServeResyncPublished,
        Failpoint::JournalRecordsWritten,
        Failpoint::TagReserved,
        Failpoint::TagGroupBarrierClosed,
        Failpoint::TagGroupReserved,
        Failpoint::ShipBatchRead,
        Failpoint::ShipSegmentWritten,
        Failpoint::ShipSegmentSync,
        Failpoint::ShipSegmentSynced,
        Failpoint::ShipSegmentLinked,
        Failpoint::ShipSegmentRenamed,
        Failpoint::ShipManifestWrite,
        Failpoint::ShipStopMarkerWritten,
        Failpoint::ApplyBatchWritten,
        Failpoint::ApplyReplicaSync,
        Failpoint::ApplyBatchApplied,
        Failpoint::ApplyCheckpointWrite,
        Failpoint::ApplyPointCloned,
        Failpoint::ApplyPointExpire,
        Failpoint::FailoverDisksCloned,
        Failpoint::FailoverFenceWrite,
        Failpoint::ReprotectEnable,
        Failpoint::FailbackDisksRestored,
        Failpoint::FailbackStateMoved,
        Failpoint::FailbackCacheRetire,
        Failpoint::FailbackCacheRetired,
        Failpoint::FailbackEnabled,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Failpoint::ServeRecordPublished => "serve:record-published",
            Failpoint::ServeImageChanged => "serve:image-changed",
            Failpoint::ServeJournalSync => "serve:journal-sync",
            Failpoint::ServeBitmapSync => "serve:bitmap-sync",
            Failpoint::ServeImageSync => "serve:image-sync",
            Failpoint::ServeResyncPublished => "serve:resync-published",
            Failpoint::JournalRecordsWritten => "journal:records-written",
            Failpoint::TagReserved => "tag:reserved",
            Failpoint::TagGroupBarrierClosed => "tag:group-barrier-closed",
            Failpoint::TagGroupReserved => "tag:group-reserved",
            Failpoint::ShipBatchRead => "ship:batch-read",
            Failpoint::ShipSegmentWritten => "ship:segment-written",
            Failpoint::ShipSegmentSync => "ship:segment-sync",
            Failpoint::ShipSegmentSynced => "ship:segment-synced",
            Failpoint::ShipSegmentLinked => "ship:segment-linked",
            Failpoint::ShipSegmentRenamed => "ship:segment-renamed",
            Failpoint::ShipManifestWrite => "ship:manifest-write",
            Failpoint::ShipStopMarkerWritten => "ship:stop-marker-written",
            Failpoint::ApplyBatchWritten => "apply:batch-written",
            Failpoint::ApplyReplicaSync => "apply:replica-sync",
            Failpoint::ApplyBatchApplied => "apply:batch-applied",
            Failpoint::ApplyCheckpointWrite => "apply:checkpoint-write",
            Failpoint::ApplyPointCloned => "apply:point-cloned",
            Failpoint::ApplyPointExpire => "apply:point-expire",
            Failpoint::FailoverDisksCloned => "failover:disks-cloned",
            Failpoint::FailoverFenceWrite => "failover:fence-write",
            Failpoint::ReprotectEnable => "reprotect:enable",
            Failpoint::FailbackDisksRestored => "failback:disks-restored",
            Failpoint::FailbackStateMoved => "failback:state-moved",
            Failpoint::FailbackCacheRetire => "failback:cache-retire",
            Failpoint::FailbackCacheRetired => "failback:cache-retired",
            Failpoint::FailbackEnabled => "failback:enabled",
        }
    }

    pub fn from_name(name: &str) -> Option<Failpoint> {
        Failpoint::ALL.iter().copied().find(|p| p.name() == name)
    }
}

/// Passes a failpoint: `Ok(())`, unless `TERN_FAILPOINTS` arms it for this
/// pass, when the process is killed or the injected error is returned (the
/// caller reports it as the failure of the I/O it was about to do).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_point: Failpoint) -> io::Result<()> {
    Ok(())
}

/// Passes a failpoint: see the module documentation.
#[cfg(feature = "failpoints")]
pub fn hit(point: Failpoint) -> io::Result<()> {
    armed::hit(point)
}

/// Whether this build has failpoints compiled in.
pub const ENABLED: bool = cfg!(feature = "failpoints");

/// What an armed failpoint does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Kill,
    Errno(i32),
    Delay(std::time::Duration),
}

/// One `TERN_FAILPOINTS` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Armed {
    pub point: Failpoint,
    pub action: Action,
    /// The first pass it fires at (1-based).
    pub from: u64,
    /// Fires at every pass from `from` on, not only at `from`.
    pub onwards: bool,
}

/// Parses `TERN_FAILPOINTS`; an error names the bad entry.
pub fn parse(spec: &str) -> Result<Vec<Armed>, String> {
    let mut out = Vec::new();
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = |why: &str| format!("TERN_FAILPOINTS entry '{entry}': {why}");
        let (name, rest) = entry.split_once('=').ok_or_else(|| bad("expected <point>=<action>[@<pass>]"))?;
        let point =
            Failpoint::from_name(name.trim()).ok_or_else(|| bad("no such failpoint (see `tern failpoints`)"))?;
        let (action, pass) = match rest.split_once('@') {
            Some((a, p)) => (a, Some(p)),
            None => (rest, None),
        };
        let action = match action.trim() {
            "kill" => Action::Kill,
            "eio" => Action::Errno(libc::EIO),
            "enospc" => Action::Errno(libc::ENOSPC),
            "edquot" => Action::Errno(libc::EDQUOT),
            a => match a.strip_prefix("delay:").map(str::parse::<u64>) {
                Some(Ok(ms)) => Action::Delay(std::time::Duration::from_millis(ms)),
                _ => return Err(bad("the action must be kill, eio, enospc, edquot or delay:<ms>")),
            },
        };
        let (from, onwards) = match pass.map(str::trim) {
            None => (1, false),
            Some(p) => {
                let (n, onwards) = match p.strip_suffix("..") {
                    Some(n) => (n, true),
                    None => (p, false),
                };
                match n.parse::<u64>() {
                    Ok(n) if n > 0 => (n, onwards),
                    _ => return Err(bad("the pass after '@' must be a number from 1, optionally followed by '..'")),
                }
            }
        };
        out.push(Armed { point, action, from, onwards });
    }
    Ok(out)
}

#[cfg(feature = "failpoints")]
mod armed {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    struct State {
        armed: Vec<Armed>,
        passes: Vec<AtomicU64>,
        log: Option<std::path::PathBuf>,
    }

    fn state() -> &'static State {
        static STATE: OnceLock<State> = OnceLock::new();
        STATE.get_or_init(|| {
            let spec = std::env::var("TERN_FAILPOINTS").unwrap_or_default();
            // A typo must not turn a crash test into one that crashes nothing.
            let armed = parse(&spec).unwrap_or_else(|e| panic!("{e}"));
            State {
                armed,
                passes: Failpoint::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
                log: std::env::var_os("TERN_FAILPOINTS_LOG").map(Into::into),
            }
        })
    }

    pub(super) fn hit(point: Failpoint) -> io::Result<()> {
        let state = state();
        if state.armed.is_empty() {
            return Ok(());
        }
        let index = Failpoint::ALL.iter().position(|p| *p == point).expect("every point is in ALL");
        let pass = state.passes[index].fetch_add(1, Ordering::Relaxed) + 1;
        let Some(armed) =
            state.armed.iter().find(|a| a.point == point && (pass == a.from || a.onwards && pass > a.from))
        else {
            return Ok(());
        };
        let what = match armed.action {
            Action::Kill => "kill".to_string(),
            Action::Errno(e) => format!("errno {e}"),
            Action::Delay(d) => format!("delay {d:?}"),
        };
        log::warn!("failpoint {} (pass {pass}): {what}", point.name());
        if let Some(path) = &state.log {
            use std::io::Write;
            let line = format!("{} {} {} {what}\n", std::process::id(), point.name(), pass);
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
                let _ = f.write_all(line.as_bytes());
            }
        }
        match armed.action {
            Action::Kill => {
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
                unreachable!("SIGKILL returned");
            }
            Action::Errno(e) => Err(io::Error::from_raw_os_error(e)),
            Action::Delay(d) => {
                std::thread::sleep(d);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_point_has_a_unique_name_that_parses_back() {
        let mut names = std::collections::HashSet::new();
        for p in Failpoint::ALL {
            assert!(names.insert(p.name()), "{} twice", p.name());
            assert_eq!(Failpoint::from_name(p.name()), Some(*p));
        }
    }

    #[test]
    fn entries_parse_with_action_and_pass() {
        let armed = parse(
            "ship:segment-synced=kill@2; apply:replica-sync=eio@1.. ;serve:image-sync=enospc;ship:batch-read=delay:250",
        )
        .unwrap();
        assert_eq!(
            armed,
            vec![
                Armed { point: Failpoint::ShipSegmentSynced, action: Action::Kill, from: 2, onwards: false },
                Armed { point: Failpoint::ApplyReplicaSync, action: Action::Errno(libc::EIO), from: 1, onwards: true },
                Armed {
                    point: Failpoint::ServeImageSync,
                    action: Action::Errno(libc::ENOSPC),
                    from: 1,
                    onwards: false
                },
                Armed {
                    point: Failpoint::ShipBatchRead,
                    action: Action::Delay(std::time::Duration::from_millis(250)),
                    from: 1,
                    onwards: false
                },
            ]
        );
    }

    #[test]
    fn a_bad_entry_is_refused_with_its_text() {
        for bad in ["nosuch=kill", "ship:batch-read", "ship:batch-read=explode", "ship:batch-read=kill@0"] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }
}
