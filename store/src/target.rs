//! The target site's layout for one VM: replica images, the apply
//! checkpoint, and the recovery-point catalog.
//!
//! ```text
//! <target>/<vm>/replica/<disk>.img          the replicas, written only by `tern apply`
//! <target>/<vm>/replica/checkpoint.toml     how far they are applied (atomic rewrite)
//! <target>/<vm>/points/<id>/<disk>.img      a point: one clone per disk
//! <target>/<vm>/points/<id>/point.toml      written last, before the directory is renamed into place
//! <target>/<vm>/points/.tmp-<id>/           a point being taken (never listed; removed on restart)
//! <target>/<vm>/history/<old-vm-id>/        replica/ and points/ of a previous direction (re-protect)
//! <target>/<vm>/point-request.toml          `tern failover --latest` asks the running applier for a point
//! <target>/<vm>/point-answer.toml           ... and it answers (the point, or why there is none)
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Version of `checkpoint.toml` and `point.toml`.
pub const TARGET_VERSION: u32 = 1;

/// `point-request.toml`: `tern failover --latest` (or a failback) asks the
/// `tern apply` that holds the replicas to apply everything the cache holds
/// and take a point there. The applier answers a request it saw before it
/// listed the cache's segments, so the point holds every segment that was
/// there when the request was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PointRequest {
    pub version: u32,
    /// Chosen by the asker; the answer carries it back.
    pub id: String,
    pub requested_unix_ms: u64,
}

/// `point-answer.toml`: the applier's answer to the request `id`: the point
/// at the newest applied state, or why there is none (inside a resync
/// window, a failure).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PointAnswer {
    pub version: u32,
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `replica/checkpoint.toml`: the replicas hold exactly the records up to
/// `applied_seq`, and those after it up to `written_seq` may be partly
/// there (a pass writes batches before it checkpoints; a restart applies
/// them again, in order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Checkpoint {
    pub version: u32,
    pub vm_id: uuid::Uuid,
    pub epoch: u64,
    pub applied_seq: u64,
    /// The stream is inside a resync window after `applied_seq`.
    pub in_window: bool,
    /// Source time (ns since the Unix epoch) of the newest applied record.
    pub source_time_ns: u64,
    /// Source time of the newest crash-consistent point.
    pub last_point_ns: u64,
    /// The newest seq a pass may have written to the replicas, recorded
    /// before it writes past `applied_seq`. While `applied_seq` is below
    /// it the replicas mix two states (a pass failed or was killed after
    /// writing a batch), and no point is taken until a pass has applied up
    /// to it again. Absent: 0.
    #[serde(default, skip_serializing_if = "crate::is_zero")]
    pub written_seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PointKind {
    /// Crash-consistent, taken every policy interval.
    Crash,
    /// Application-consistent, at a `tern tag` marker.
    App,
}

impl PointKind {
    pub fn name(self) -> &'static str {
        match self {
            PointKind::Crash => "crash",
            PointKind::App => "app",
        }
    }
}

/// `points/<id>/point.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Point {
    pub version: u32,
    pub id: String,
    /// The point equals the source after exactly the records up to here.
    pub seq: u64,
    pub epoch: u64,
    /// Source time of the record at `seq`, ns since the Unix epoch.
    pub time_ns: u64,
    pub kind: PointKind,
    pub label: Option<String>,
    /// "reflink" or "copy".
    pub clone: String,
    /// Disk name → file name inside the point's directory.
    pub disks: BTreeMap<String, String>,
    /// The group point this point is one member's part of (a `tern tag
    /// --group` cut). Absent in points of no group, which read as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<PointGroup>,
    /// How the guest was quiesced for this app point, when an agent was
    /// asked (`tern tag --freeze`, the VM's freeze policy). Absent: none
    /// was (a crash point, or a tag whose caller quiesced the application).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiesce: Option<Quiesce>,
}

/// A guest freeze's outcome, carried by the tag into the point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Quiesce {
    /// The agent asked, as configured: `qga:<socket>`.
    pub agent: String,
    /// Whether the guest's filesystems were frozen when the tag took its
    /// place. If not, the point is crash-consistent only; `reason` says why.
    pub frozen: bool,
    /// How many filesystems the agent froze.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystems: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One member's share of a group point: the group point exists once every
/// member has its point with the same `point` id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PointGroup {
    pub group: String,
    /// The group point's id, the same in every member.
    pub point: String,
    pub members: Vec<String>,
}

impl Point {
    /// The id of a point: its sequence number, and the kind for app points
    /// (a tag and a crash point may fall on the same record).
    pub fn make_id(seq: u64, kind: PointKind) -> String {
        match kind {
            PointKind::Crash => format!("{seq}"),
            PointKind::App => format!("{seq}-app"),
        }
    }

    /// "application" or "crash": an app point whose guest freeze failed is
    /// crash-consistent only.
    pub fn consistency(&self) -> &'static str {
        match self.kind {
            PointKind::Crash => "crash",
            PointKind::App => Quiesce::consistency(self.quiesce.as_ref()),
        }
    }
}

impl Quiesce {
    /// What an app point tagged with this outcome is: "crash" if its
    /// guest freeze failed, else "application" (frozen, or no agent asked:
    /// whoever tagged quiesced the application).
    pub fn consistency(outcome: Option<&Quiesce>) -> &'static str {
        if outcome.is_some_and(|q| !q.frozen) {
            "crash"
        } else {
            "application"
        }
    }
}

/// One VM's directory at the target site.
#[derive(Debug, Clone)]
pub struct TargetDir {
    root: PathBuf,
}

impl TargetDir {
    pub fn new(target: &Path, vm: &str) -> Self {
        TargetDir { root: target.join(vm) }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn replica_dir(&self) -> PathBuf {
        self.root.join("replica")
    }

    pub fn replica_path(&self, disk: &str) -> PathBuf {
        self.replica_dir().join(format!("{disk}.img"))
    }

    pub fn checkpoint_path(&self) -> PathBuf {
        self.root.join("replica").join("checkpoint.toml")
    }

    pub fn points_dir(&self) -> PathBuf {
        self.root.join("points")
    }

    pub fn point_dir(&self, id: &str) -> PathBuf {
        self.points_dir().join(id)
    }

    /// Where a replica seed named in the manifest lives: absolute as given,
    /// relative to this VM's directory otherwise (validated: no `..`).
    pub fn seed_path(&self, seed: &Path) -> PathBuf {
        self.root.join(seed)
    }

    /// A previous protection direction's replicas and points, kept when a
    /// new stream (another VM id, after `tern reprotect` or `tern
    /// failback`) takes over this directory.
    pub fn history_dir(&self, old_id: &uuid::Uuid) -> PathBuf {
        self.root.join("history").join(old_id.to_string())
    }

    pub fn point_tmp_dir(&self, id: &str) -> PathBuf {
        self.points_dir().join(format!(".tmp-{id}"))
    }

    pub fn point_request_path(&self) -> PathBuf {
        self.root.join("point-request.toml")
    }

    pub fn point_answer_path(&self) -> PathBuf {
        self.root.join("point-answer.toml")
    }

    /// The pending request for a point at the newest applied state, if any.
    pub fn read_point_request(&self) -> Result<Option<PointRequest>, crate::file::FileError> {
        crate::file::read_toml(&self.point_request_path())
    }

    /// The running applier's answer to a point request, if any.
    pub fn read_point_answer(&self) -> Result<Option<PointAnswer>, crate::file::FileError> {
        crate::file::read_toml(&self.point_answer_path())
    }

    pub fn read_checkpoint(&self) -> Result<Option<Checkpoint>, String> {
        let path = self.checkpoint_path();
        match fs::read_to_string(&path) {
            Ok(text) => {
                let c: Checkpoint = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
                if c.version != TARGET_VERSION {
                    return Err(format!("{}: version {} is not supported", path.display(), c.version));
                }
                Ok(Some(c))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// The catalog: every complete point, oldest first. Directories being
    /// taken (`.tmp-*`) and ones without a valid `point.toml` are not
    /// points.
    pub fn list_points(&self) -> io::Result<Vec<Point>> {
        let mut out = Vec::new();
        for entry in crate::dir_entries(&self.points_dir())? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let Ok(text) = fs::read_to_string(entry.path().join("point.toml")) else { continue };
            match toml::from_str::<Point>(&text) {
                Ok(p) if p.id == name && p.version == TARGET_VERSION => out.push(p),
                _ => log::warn!("{}: not a valid point; ignored", entry.path().display()),
            }
        }
        out.sort_by_key(|p| (p.seq, p.kind == PointKind::App));
        Ok(out)
    }

    /// Removes points a crashed applier left half-taken.
    pub fn remove_partial_points(&self) -> io::Result<usize> {
        let mut n = 0;
        for entry in crate::dir_entries(&self.points_dir())? {
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                fs::remove_dir_all(entry.path())?;
                n += 1;
            }
        }
        Ok(n)
    }
}

/// Retention with thinning: which points to delete once the stream has
/// reached `stream_now_ns` (see [`stream_now`]). Every point younger than
/// `keep_all` stays; between that and `retention`, the oldest point of each
/// hour stays; older ones go. App points are thinned like crash points but
/// never share an hour's slot with them (each kind keeps its own hourly
/// point). The newest point of each kind is never deleted, however old:
/// after a disaster the last good point is what the operator fails over to.
///
/// A member's point of a group point is aged as the group point: on the
/// cut's time (which every member's point carries), in an hourly slot of
/// its group's own, and the newest group point of each group is kept — so
/// every member, deciding alone, keeps and drops the same group points.
/// Pure, so tests give it any clock.
pub fn expired_points(points: &[Point], stream_now_ns: u64, keep_all: Duration, retention: Duration) -> Vec<String> {
    let hour = 3600 * 1_000_000_000u64;
    // The hourly slot a point competes for: crash, app, or its group.
    let slot = |p: &Point| match (&p.group, p.kind) {
        (Some(g), _) => format!("group:{}", g.group),
        (None, kind) => kind.name().to_owned(),
    };
    let mut kept_hours: std::collections::HashSet<(u64, String)> = Default::default();
    let mut sorted: Vec<&Point> = points.iter().collect();
    sorted.sort_by_key(|p| (p.time_ns, p.seq));
    let mut keep_newest: std::collections::HashSet<String> = Default::default();
    let mut seen_slots: std::collections::HashSet<String> = Default::default();
    for p in sorted.iter().rev() {
        if seen_slots.insert(slot(p)) {
            keep_newest.insert(p.id.clone());
        }
    }
    // The newest of each kind, group points counted as app points too.
    for kind in [PointKind::Crash, PointKind::App] {
        if let Some(p) = sorted.iter().rev().find(|p| p.kind == kind && p.group.is_none()) {
            keep_newest.insert(p.id.clone());
        }
    }
    let mut out = Vec::new();
    for p in sorted.iter().copied() {
        if keep_newest.contains(&p.id) {
            continue;
        }
        let age = stream_now_ns.saturating_sub(p.time_ns);
        if age < keep_all.as_nanos() as u64 {
            continue;
        }
        if age >= retention.as_nanos() as u64 {
            out.push(p.id.clone());
            continue;
        }
        if !kept_hours.insert((p.time_ns / hour, slot(p))) {
            out.push(p.id.clone());
        }
    }
    out
}

/// The ids of `mine` (VM `me`'s points) to keep beyond [`expired_points`]:
/// for each of its groups, its part of the newest group point that every
/// other member also holds. Members thin on their own clocks, so one that
/// has applied a newer group point would otherwise drop the last one a
/// lagging member can still join, and the group would have no point to
/// fail over to together until the laggard caught up (never, if its
/// source is gone). `catalog` gives another member's points; a member it
/// cannot give (its replicas under another target) keeps nothing more for
/// that group.
pub fn newest_complete_group_points(
    mine: &[Point],
    me: &str,
    catalog: impl Fn(&str) -> Option<Vec<Point>>,
) -> std::collections::HashSet<String> {
    let mut groups: BTreeMap<&str, Vec<&Point>> = BTreeMap::new();
    for p in mine {
        if let Some(g) = &p.group {
            groups.entry(g.group.as_str()).or_default().push(p);
        }
    }
    let mut keep = std::collections::HashSet::new();
    for (group, mut ps) in groups {
        ps.sort_by_key(|p| std::cmp::Reverse((p.time_ns, p.seq)));
        let members = &ps[0].group.as_ref().expect("grouped").members;
        let Some(others) = members.iter().filter(|m| *m != me).map(|m| catalog(m)).collect::<Option<Vec<_>>>() else {
            continue;
        };
        let holds = |catalog: &Vec<Point>, point: &str| {
            catalog.iter().any(|q| q.group.as_ref().is_some_and(|g| g.group == group && g.point == point))
        };
        if let Some(p) = ps.iter().find(|p| {
            let point = &p.group.as_ref().expect("grouped").point;
            others.iter().all(|c| holds(c, point))
        }) {
            keep.insert(p.id.clone());
        }
    }
    keep
}

/// The clock retention measures age on: the stream's own, the source time
/// of the newest record applied (or of the newest point, should the source
/// clock have stepped back since). Neither the target's clock nor the
/// skew between the sites moves it, and a source that has gone silent
/// (the disaster tern exists for) stops it: nothing expires while no new
/// data arrives.
pub fn stream_now(checkpoint: &Checkpoint, points: &[Point]) -> u64 {
    points.iter().map(|p| p.time_ns).fold(checkpoint.source_time_ns, u64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_group_point_every_member_holds_is_kept_while_a_member_lags() {
        let now = 100 * 3600 * 1_000_000_000u64;
        let grouped = |seq: u64, minutes_ago: u64, gp: &str| {
            let mut p = point(seq, minutes_ago, now, PointKind::App);
            p.group =
                Some(PointGroup { group: "shop".into(), point: gp.into(), members: vec!["db".into(), "app".into()] });
            p
        };
        // db has applied g2 and g3; app lags at g1 and g2 (g3 not yet).
        let db = vec![grouped(10, 300, "g1"), grouped(20, 200, "g2"), grouped(30, 1, "g3")];
        let app = vec![grouped(7, 300, "g1"), grouped(9, 200, "g2")];
        // Past retention, g2 would go at db on its own clock: the group's
        // newest complete point would be gone.
        let expired = expired_points(&db, now, Duration::from_secs(3600), Duration::from_secs(3 * 3600));
        assert!(expired.contains(&"20-app".to_string()), "{expired:?}");
        let keep = newest_complete_group_points(&db, "db", |m| (m == "app").then(|| app.clone()));
        assert_eq!(keep, ["20-app".to_string()].into_iter().collect());
        // Once app holds g3, g3 is the one kept.
        let mut app3 = app.clone();
        app3.push(grouped(11, 1, "g3"));
        let keep = newest_complete_group_points(&db, "db", |m| (m == "app").then(|| app3.clone()));
        assert_eq!(keep, ["30-app".to_string()].into_iter().collect());
        // A member whose catalog cannot be read keeps nothing more.
        assert!(newest_complete_group_points(&db, "db", |_| None).is_empty());
    }

    #[test]
    fn group_points_keep_their_own_hourly_slot_and_the_newest_stays() {
        let now = 100 * 3600 * 1_000_000_000u64;
        let grouped = |seq: u64, minutes_ago: u64| {
            let mut p = point(seq, minutes_ago, now, PointKind::App);
            p.group = Some(PointGroup { group: "shop".into(), point: format!("g{seq}"), members: vec![] });
            p
        };
        // 5 h ago: a solo app point and a group point in the same hour; 4 h
        // ago a second group point in another hour; then a newer solo app
        // point and crash points that would otherwise make the group points
        // expendable.
        let points = vec![
            point(1, 300, now, PointKind::App),
            grouped(2, 299),
            grouped(3, 240),
            grouped(4, 239),
            point(5, 10, now, PointKind::App),
            point(6, 5, now, PointKind::Crash),
        ];
        let expired = expired_points(&points, now, Duration::from_secs(2 * 3600), Duration::from_secs(24 * 3600));
        // The solo app point of hour -5 keeps its slot, the group point of
        // that hour keeps its own; in hour -4 the older group point stays,
        // the newer one (seq 4) goes — unless it is the newest group point,
        // which it is: so nothing goes.
        assert!(expired.is_empty(), "{expired:?}");
        // With a newer group point, seq 4 shares hour -4 with seq 3 and goes.
        let mut more = points.clone();
        more.push(grouped(7, 1));
        let expired = expired_points(&more, now, Duration::from_secs(2 * 3600), Duration::from_secs(24 * 3600));
        assert_eq!(expired, vec!["4-app".to_string()]);
    }

    fn point(seq: u64, minutes_ago: u64, now: u64, kind: PointKind) -> Point {
        Point {
            version: 1,
            id: Point::make_id(seq, kind),
            seq,
            epoch: 1,
            time_ns: now - minutes_ago * 60 * 1_000_000_000,
            kind,
            label: None,
            clone: "reflink".into(),
            disks: BTreeMap::new(),
            group: None,
            quiesce: None,
        }
    }

    #[test]
    fn thinning_keeps_everything_recent_one_per_hour_after_and_nothing_past_retention() {
        // An injected clock: 100 hours after the epoch, on an hour boundary.
        let now = 100 * 3600 * 1_000_000_000u64;
        // A point every 5 minutes for the last 30 hours.
        let points: Vec<Point> = (0..360).map(|i| point(1000 - i, i * 5, now, PointKind::Crash)).collect();
        let expired = expired_points(&points, now, Duration::from_secs(2 * 3600), Duration::from_secs(24 * 3600));
        let kept: Vec<&Point> = points.iter().filter(|p| !expired.contains(&p.id)).collect();
        let age_min = |p: &Point| (now - p.time_ns) / 60_000_000_000;
        // Younger than 2 h: all 24 of them.
        assert_eq!(kept.iter().filter(|p| age_min(p) < 120).count(), 24);
        // 2 h .. 24 h: exactly one per clock hour that had points there.
        let hour = |p: &Point| p.time_ns / (3600 * 1_000_000_000);
        let in_band = |p: &&Point| (120..1440).contains(&age_min(p));
        let hours_with_points: std::collections::BTreeSet<u64> = points.iter().filter(in_band).map(hour).collect();
        let kept_hours: Vec<u64> = kept.iter().copied().filter(in_band).map(hour).collect();
        assert_eq!(kept_hours.len(), hours_with_points.len(), "{kept_hours:?}");
        assert_eq!(kept_hours.iter().copied().collect::<std::collections::BTreeSet<_>>(), hours_with_points);
        // Past 24 h: none, but the newest of each kind (here, of the only
        // kind) is the youngest point and among the kept.
        assert!(kept.iter().all(|p| age_min(p) < 1440));
        // The same clock a minute later deletes nothing younger than before.
        let later =
            expired_points(&points, now + 60_000_000_000, Duration::from_secs(7200), Duration::from_secs(86400));
        assert!(expired.iter().all(|id| later.contains(id)), "a point expired once stays expired");
    }

    #[test]
    fn the_newest_point_of_each_kind_outlives_retention() {
        let now = 100 * 3600 * 1_000_000_000u64;
        let points = vec![
            point(1, 3000, now, PointKind::App),
            point(2, 2990, now, PointKind::Crash),
            point(3, 2980, now, PointKind::Crash),
        ];
        let expired = expired_points(&points, now, Duration::from_secs(7200), Duration::from_secs(86400));
        assert_eq!(expired, vec!["2".to_string()], "only the older crash point goes");
    }

    #[test]
    fn the_stream_clock_is_the_newest_applied_source_time_not_the_target_clock() {
        let now = 100 * 3600 * 1_000_000_000u64;
        let points = vec![point(1, 30, now, PointKind::Crash), point(2, 20, now, PointKind::App)];
        let checkpoint = Checkpoint {
            version: TARGET_VERSION,
            vm_id: uuid::Uuid::nil(),
            epoch: 1,
            applied_seq: 2,
            in_window: false,
            source_time_ns: now - 10 * 60 * 1_000_000_000,
            last_point_ns: 0,
            written_seq: 0,
        };
        assert_eq!(stream_now(&checkpoint, &points), checkpoint.source_time_ns);
        // The source clock stepped back after the newest point.
        let stepped_back = Checkpoint { source_time_ns: now - 3600 * 1_000_000_000, ..checkpoint };
        assert_eq!(stream_now(&stepped_back, &points), points[1].time_ns);
    }

    #[test]
    fn app_points_keep_their_own_hourly_slot() {
        let now = 100 * 3600 * 1_000_000_000u64;
        let points = vec![point(1, 200, now, PointKind::Crash), point(2, 199, now, PointKind::App)];
        assert!(expired_points(&points, now, Duration::from_secs(7200), Duration::from_secs(86400)).is_empty());
    }

    #[test]
    fn the_catalog_lists_complete_points_only() {
        let dir = tempfile::tempdir().unwrap();
        let t = TargetDir::new(dir.path(), "vm1");
        let p = point(42, 1, 10u64.pow(12), PointKind::App);
        fs::create_dir_all(t.point_dir(&p.id)).unwrap();
        fs::write(t.point_dir(&p.id).join("point.toml"), toml::to_string(&p).unwrap()).unwrap();
        fs::create_dir_all(t.point_tmp_dir("43")).unwrap();
        fs::create_dir_all(t.point_dir("44")).unwrap(); // no point.toml: half a point
        assert_eq!(t.list_points().unwrap(), vec![p]);
        assert_eq!(t.remove_partial_points().unwrap(), 1);
    }
}
