//! Groups: VMs recovered together, from points cut across all of them at
//! one instant (a database and its application servers).
//!
//! A group is a name and its members, kept in `<state>/groups.toml`. A
//! group point is cut by [`cut`]: the group barrier of every member's
//! journal is closed (new writes wait; `journal/ring/barrier.rs` says why
//! that makes the cut consistent), a group tag — the same point id in
//! every member's journal — takes its place in each, the barriers open,
//! and the tags are made durable and published.
//! At the target each member's applier takes a point at its tag; the group
//! point exists once every member has its point.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tern_driver::journal::{self, Journal};
use tern_driver::vm::VmPaths;

/// `<state>/groups.toml`: every group of this site.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Groups {
    pub version: u32,
    #[serde(default, rename = "group")]
    pub groups: BTreeMap<String, Group>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// In the order given; a group point cuts them in name order.
    pub members: Vec<String>,
}

pub fn groups_file(state: &Path) -> PathBuf {
    state.join("groups.toml")
}

impl Groups {
    pub fn load(state: &Path) -> Result<Groups> {
        let path = groups_file(state);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let g: Groups = toml::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
                if g.version != 1 {
                    bail!("{} is version {}; this tern reads version 1", path.display(), g.version);
                }
                Ok(g)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Groups { version: 1, ..Default::default() }),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    pub fn save(&self, state: &Path) -> Result<()> {
        let path = groups_file(state);
        let text = toml::to_string_pretty(self)?;
        tern_driver::fs::write_durably(&path, text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))
    }

    pub fn get(&self, name: &str) -> Result<&Group> {
        self.groups.get(name).with_context(|| {
            let known: Vec<&str> = self.groups.keys().map(String::as_str).collect();
            format!(
                "no group '{name}' here (groups: {}); create it with `tern group create {name} VM...`",
                if known.is_empty() { "none".into() } else { known.join(", ") }
            )
        })
    }
}

/// A group tag's data (`TAG_GROUP`; docs/FORMATS.md): the same in every
/// member's journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupTag {
    pub version: u32,
    pub group: String,
    /// The group point's id: the coordinator's clock in ms at the cut.
    pub point: String,
    pub label: Option<String>,
    /// The coordinator's clock at the cut (ns since the Unix epoch): every
    /// member's point carries it, so retention ages them as one.
    pub time_ns: u64,
    pub members: Vec<String>,
    /// Each frozen member's freeze outcome (members with a freeze agent in
    /// their `[app-points]`); absent before guest freezes existed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub quiesce: BTreeMap<String, tern_store::target::Quiesce>,
}

impl GroupTag {
    pub fn parse(data: &[u8]) -> Result<GroupTag> {
        let t: GroupTag = serde_json::from_slice(data).context("a group tag that is not valid JSON")?;
        if t.version != 1 {
            bail!("a group tag of version {} (this tern reads version 1)", t.version);
        }
        Ok(t)
    }
}

/// A group point, as cut.
#[derive(Debug)]
pub struct Cut {
    pub tag: GroupTag,
    /// Each member's tag sequence number.
    pub seqs: Vec<(String, u64)>,
    /// How long new writes waited: from the first barrier closed to the last
    /// opened.
    pub held: Duration,
    /// The frozen members' thaws.
    pub thawed: Vec<(String, crate::freeze::Thawed)>,
}

/// The `agent` of a member's quiesce entry when none was asked (a
/// scheduled cut of a member without a freeze agent).
pub const NO_AGENT: &str = "none";

/// How long a barrier may stay closed before producers open it themselves:
/// far longer than a cut takes (milliseconds), short enough that a
/// coordinator frozen mid-cut stalls the VMs for seconds, not forever.
pub const BARRIER_DEADLINE: Duration = Duration::from_secs(5);

struct Member {
    name: String,
    paths: VmPaths,
    journal: Journal,
    quiescing: crate::freeze::Quiescing,
}

/// Whether a `tern serve` of the VM runs (it holds the front-end lock).
fn served(paths: &VmPaths) -> bool {
    tern_driver::fs::held_by_another(&paths.frontend_lock())
}

/// Why a member's journal cannot be cut now, if it cannot.
fn not_ready(m: &Member) -> Option<String> {
    let j = &m.journal;
    let flags = j.flags();
    let attached = flags & journal::FLAG_ATTACHED != 0 && j.boot_id() == tern_driver::mirror::boot_id();
    if !attached || !served(&m.paths) {
        return Some(format!(
            "VM '{}' is not being served (its `tern serve` is not running): a group point needs every member served; start it, or remove the VM from the group",
            m.name
        ));
    }
    if flags & journal::FLAG_BARRIER_AWARE == 0 {
        return Some(format!(
            "VM '{}' is served by a `tern serve` from before groups, which does not honour the group barrier; restart it with this tern",
            m.name
        ));
    }
    if j.overflowed() {
        return Some(format!(
            "VM '{}' is in overflow (its journal filled; writes go to the dirty bitmaps until `tern ship` catches up): no consistent point exists there now",
            m.name
        ));
    }
    if j.window_open() {
        return Some(format!(
            "VM '{}' is resyncing (a resync window is open): no consistent point exists there until it closes",
            m.name
        ));
    }
    None
}

/// Cuts a group point across every member of `group` (see the module
/// doc). Fails, naming the member and why, rather than cut part of them:
/// a member not served, in overflow or resyncing; another cut under way.
/// A cut that fails before the barriers open leaves pads, no tags; one
/// whose tag cannot be published in some member leaves an incomplete
/// group point, which the target never offers.
///
/// With `freeze`, every member whose `[app-points]` names a freeze agent is
/// frozen first (all at once), and thawed after the cut; a member whose
/// freeze fails is cut all the same, its point crash-consistent with the
/// reason ([`GroupTag::quiesce`]). Unless `caller_quiesced` (a cut by hand,
/// whose caller vouches for the applications, as for `tern tag`), a member
/// not frozen is recorded crash-consistent too: a scheduled cut is
/// consistent across the members, no more within each.
pub fn cut(
    state: &Path,
    name: &str,
    group: &Group,
    label: Option<&str>,
    freeze: bool,
    caller_quiesced: bool,
) -> Result<Cut> {
    if let Some(l) = label {
        tern_driver::tag::check_label(l)?;
    }
    let mut names = group.members.clone();
    names.sort();
    names.dedup(); // one barrier and one tag lock per VM
    let mut members = Vec::new();
    for vm in &names {
        let paths = VmPaths::new(state, vm)?;
        let config = paths.load_config().with_context(|| {
            format!(
                "group '{name}': member VM '{vm}' (if it is no longer protected here: `tern group remove {name} {vm}`)"
            )
        })?;
        let journal = paths.open_journal().with_context(|| format!("group '{name}': member VM '{vm}'"))?;
        if journal.vm_id() != *config.id.as_bytes() {
            bail!("journal {} belongs to another VM than '{vm}'", journal.path().display());
        }
        let quiescing = crate::freeze::Quiescing::of(&config, None, !freeze, None)?;
        members.push(Member { name: vm.clone(), paths, journal, quiescing });
    }
    for m in &members {
        if let Some(why) = not_ready(m) {
            bail!("cannot cut a point of group '{name}': {why}");
        }
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let tag = GroupTag {
        version: 1,
        group: name.to_owned(),
        point: format!("{}", now.as_millis()),
        label: label.map(str::to_owned),
        time_ns: now.as_nanos() as u64,
        members: names.clone(),
        quiesce: BTreeMap::new(),
    };
    // The guests frozen, all at once; thawed after the cut, even those
    // whose freeze failed (one not answered may yet be carried out).
    let freezes: Vec<(String, crate::freeze::Freeze)> = std::thread::scope(|s| {
        let handles: Vec<_> = members
            .iter()
            .filter_map(|m| match &m.quiescing {
                crate::freeze::Quiescing::Freeze(agent, timeout) => {
                    Some((m.name.clone(), s.spawn(move || crate::freeze::freeze(agent, *timeout))))
                }
                crate::freeze::Quiescing::None => None,
            })
            .collect();
        handles.into_iter().map(|(vm, h)| (vm, h.join().expect("a freezing thread panicked"))).collect()
    });
    let mut tag = tag;
    tag.quiesce = freezes.iter().map(|(vm, f)| (vm.clone(), f.quiesce.clone())).collect();
    if !caller_quiesced {
        for m in &members {
            tag.quiesce.entry(m.name.clone()).or_insert_with(|| tern_store::target::Quiesce {
                agent: NO_AGENT.into(),
                frozen: false,
                filesystems: None,
                reason: Some(
                    "a scheduled group point: nothing quiesced the guest (its [app-points] name no freeze agent)"
                        .into(),
                ),
            });
        }
    }
    let cut = cut_members(name, &members, tag);
    let thawed = std::thread::scope(|s| {
        let handles: Vec<_> = freezes.into_iter().map(|(vm, f)| (vm, s.spawn(move || f.thaw()))).collect();
        handles.into_iter().map(|(vm, h)| (vm, h.join().expect("a thawing thread panicked"))).collect()
    });
    let mut cut = cut?;
    cut.thawed = thawed;
    for (m, (_, seq)) in members.iter().zip(&cut.seqs) {
        let quiesce = cut.tag.quiesce.get(&m.name);
        if quiesce.is_some_and(|q| q.agent == NO_AGENT) {
            continue; // nothing asked to freeze: no freeze to report
        }
        let label = cut.tag.label.as_deref().unwrap_or("");
        let thawed = cut.thawed.iter().find(|(vm, _)| *vm == m.name).map(|(_, t)| t);
        crate::freeze::LastAppPoint::now(label, *seq, quiesce, thawed).record(&m.paths);
    }
    Ok(cut)
}

/// The cut itself, the guests frozen or not: barriers, tags, barriers open,
/// tags published.
fn cut_members(name: &str, members: &[Member], tag: GroupTag) -> Result<Cut> {
    let description = serde_json::to_vec(&tag)?;
    // Each member's tag lock first, so no cut waits on one with writes held.
    let mut locks = Vec::new();
    for m in members {
        locks.push(tern_driver::tag::GroupTagLock::acquire(&m.journal, &m.paths.tag_lock(), &description)?);
    }
    let me = std::process::id();
    let started = Instant::now();
    let mut closed: Vec<&Member> = Vec::new();
    let result = (|| -> Result<Vec<(String, u64)>> {
        for m in members {
            if let Err(holder) = m.journal.close_barrier(me, BARRIER_DEADLINE) {
                bail!(
                    "VM '{}' is held by another group point under way (process {holder}); try again in a moment",
                    m.name
                );
            }
            closed.push(m);
        }
        tern_driver::fail::hit(tern_driver::fail::Failpoint::TagGroupBarrierClosed)?;
        // Writes wait now: what was true before may have changed since.
        for m in members {
            if let Some(why) = not_ready(m) {
                bail!("{why}");
            }
        }
        // Only the tags' places in the streams are fixed with writes held;
        // they are made durable and published once the barriers open.
        let mut seqs = Vec::new();
        for (m, lock) in members.iter().zip(&mut locks) {
            let seq = lock.reserve(&description)?.with_context(|| {
                format!(
                    "VM '{}': its journal has no room for the tag now; cut again once `tern ship` has caught up",
                    m.name
                )
            })?;
            seqs.push((m.name.clone(), seq));
            tern_driver::fail::hit(tern_driver::fail::Failpoint::TagGroupReserved)?;
        }
        // Every barrier still ours, now that every tag has its place? A
        // holder goes from us only to open (a writer that found the cut
        // past its deadline), never back: so they were closed throughout.
        if let Some(o) = members.iter().find(|o| o.journal.barrier_holder() != Some(me)) {
            bail!(
                "the barrier of VM '{}' was opened by its writers (this cut took over {BARRIER_DEADLINE:?}: was the machine stalled?); cut again",
                o.name
            );
        }
        Ok(seqs)
    })();
    for m in &closed {
        m.journal.open_barrier(me);
    }
    let held = started.elapsed();
    let seqs = match result {
        Ok(seqs) => seqs,
        Err(e) => {
            // No tag of a failed cut stays: pads take the places reserved.
            locks.iter_mut().for_each(tern_driver::tag::GroupTagLock::abandon);
            return Err(e.context(format!("cannot cut a point of group '{name}' (no group point was made)")));
        }
    };
    // Each member's tag made durable and published at once (two journal
    // syncs each); all of them, even after one fails: an unpublished tag
    // is a hole.
    let published: Vec<tern_driver::Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = locks.iter_mut().map(|l| s.spawn(move || l.publish())).collect();
        handles.into_iter().map(|h| h.join().expect("a publishing thread panicked")).collect()
    });
    for ((vm, _), r) in seqs.iter().zip(published) {
        r.with_context(|| format!("group '{name}': cannot publish the group tag of VM '{vm}' (the group point is incomplete and is not offered; cut another)"))?;
    }
    Ok(Cut { tag, seqs, held, thawed: Vec::new() })
}

/// A group point at the target site: every member's point of one cut.
#[derive(Debug)]
pub struct GroupPoint {
    pub id: String,
    pub label: Option<String>,
    pub time_ns: u64,
    /// Each member and its point, in name order.
    pub members: Vec<(String, tern_store::target::Point)>,
}

/// The group points of `group` at the target site `target`, oldest first:
/// only those whose every member has its point (a member still applying
/// its tag, or a cut that failed part way, has none).
pub fn group_points(target: &Path, group: &str) -> Result<Vec<GroupPoint>> {
    let entries =
        std::fs::read_dir(target).with_context(|| format!("cannot read the target site {}", target.display()))?;
    let mut by_id: BTreeMap<String, Vec<(String, tern_store::target::Point)>> = BTreeMap::new();
    for entry in entries.flatten() {
        let vm = entry.file_name().to_string_lossy().into_owned();
        let dir = tern_store::target::TargetDir::new(target, &vm);
        if !dir.points_dir().is_dir() {
            continue;
        }
        for p in dir.list_points().with_context(|| format!("VM '{vm}': cannot list its points"))? {
            if let Some(g) = p.group.as_ref().filter(|g| g.group == group) {
                by_id.entry(g.point.clone()).or_default().push((vm.clone(), p));
            }
        }
    }
    let mut out: Vec<GroupPoint> = by_id
        .into_iter()
        .filter_map(|(id, mut members)| {
            members.sort_by(|a, b| a.0.cmp(&b.0));
            let first = members.first()?.1.clone();
            let mut wanted = first.group.as_ref()?.members.clone();
            wanted.sort();
            let have: Vec<String> = members.iter().map(|(vm, _)| vm.clone()).collect();
            (have == wanted).then_some(GroupPoint { id, label: first.label, time_ns: first.time_ns, members })
        })
        .collect();
    out.sort_by_key(|g| (g.time_ns, g.id.clone()));
    Ok(out)
}

/// The target site of a group's members, from their vm.toml (on the
/// source host, where the group is defined), unless given.
pub fn target_of(state: &Path, group: &str, given: Option<&Path>) -> Result<PathBuf> {
    if let Some(t) = given {
        return Ok(t.to_owned());
    }
    let groups = Groups::load(state)?;
    let first = groups
        .get(group)
        .map_err(|e| anyhow::anyhow!("{e}; on the target host, name the target site with --target"))?
        .members
        .first()
        .cloned()
        .with_context(|| format!("group '{group}' has no members"))?;
    Ok(VmPaths::new(state, &first)?.load_config()?.target)
}
