//! What a trial does, all of it drawn from its seed: the VM's shape, the
//! workload, the one disaster (a kill at a failpoint, an injected error, a
//! stall then a kill, a random kill, a power cut, a tagger killed), clock
//! skew between the sites, and the tags. The same seed replays the same
//! plan (the timing of threads and processes still varies).

use std::time::Duration;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tern_crashfs::CutMode;

/// A tern process of the trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Serve,
    Ship,
    Apply,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Serve => "serve",
            Role::Ship => "ship",
            Role::Apply => "apply",
        }
    }
}

/// Which site loses power.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// The source host: `tern serve`, `tern ship`, the state and images.
    Source,
    /// The cache and target host: `tern apply` (and `tern ship`'s writes).
    Remote,
    Both,
}

#[derive(Debug, Clone)]
pub enum Failure {
    /// `kill -9` at the `pass`-th pass of a failpoint.
    Kill { role: Role, point: &'static str, pass: u32 },
    /// An errno at a failpoint (from the `pass`-th pass on, if `onwards`).
    Fault { role: Role, point: &'static str, errno: &'static str, pass: u32, onwards: bool },
    /// The process stalls at a failpoint (everything around it goes on),
    /// and is killed `after` later.
    StallKill { role: Role, point: &'static str, pass: u32, after: Duration },
    /// `kill -9` at a random moment.
    RandomKill { role: Role, at: Duration },
    /// Power lost at a random moment.
    PowerCut { site: Site, at: Duration, mode: CutMode },
    /// A `tern tag` killed between reserving and publishing its record.
    TagKill { at: Duration },
}

impl Failure {
    /// The kind, for the summary.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Kill { .. } => "kill",
            Failure::Fault { .. } => "fault",
            Failure::StallKill { .. } => "stall-kill",
            Failure::RandomKill { .. } => "random-kill",
            Failure::PowerCut { .. } => "power-cut",
            Failure::TagKill { .. } => "tag-kill",
        }
    }

    /// `TERN_FAILPOINTS` for `role`, if this failure arms one there.
    pub fn armed(&self, role: Role) -> Option<String> {
        match *self {
            Failure::Kill { role: r, point, pass } if r == role => Some(format!("{point}=kill@{pass}")),
            Failure::Fault { role: r, point, errno, pass, onwards } if r == role => {
                Some(format!("{point}={errno}@{pass}{}", if onwards { ".." } else { "" }))
            }
            Failure::StallKill { role: r, point, pass, .. } if r == role => Some(format!("{point}=delay:60000@{pass}")),
            _ => None,
        }
    }
}

/// Failpoints a process passes while the workload runs, and how many
/// passes a trial's first phase sees of each (roughly: the pass to arm is
/// drawn below it).
const SERVE_POINTS: &[(&str, u32)] = &[
    ("serve:record-published", 200),
    ("serve:image-changed", 200),
    ("serve:journal-sync", 40),
    ("serve:bitmap-sync", 40),
    ("serve:image-sync", 40),
    ("serve:resync-published", 3),
    ("journal:records-written", 20),
];
const SHIP_POINTS: &[(&str, u32)] = &[
    ("ship:batch-read", 6),
    ("ship:segment-written", 6),
    ("ship:segment-sync", 6),
    ("ship:segment-synced", 6),
    ("ship:segment-linked", 3),
    ("ship:segment-renamed", 6),
    ("ship:manifest-write", 1),
    ("journal:records-written", 2),
];
const APPLY_POINTS: &[(&str, u32)] = &[
    ("apply:batch-written", 5),
    ("apply:replica-sync", 5),
    ("apply:batch-applied", 5),
    ("apply:checkpoint-write", 5),
    ("apply:point-cloned", 2),
];

/// Every failpoint the suite arms, for the summary's table.
pub fn all_points() -> Vec<&'static str> {
    let mut v: Vec<&str> = [SERVE_POINTS, SHIP_POINTS, APPLY_POINTS].concat().iter().map(|p| p.0).collect();
    v.push("tag:reserved");
    v.sort();
    v.dedup();
    v
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub disk_size: u64,
    pub journal_size: &'static str,
    pub connections_per_disk: usize,
    pub mix: [u32; 4],
    pub max_blocks: u64,
    pub hot_share: u32,
    pub think: Duration,
    pub phase1: Duration,
    pub phase2: Duration,
    pub failure: Failure,
    /// `faketime` offsets of the source and the target clocks.
    pub skew: Option<(&'static str, &'static str)>,
    /// Tags (each with the clients quiesced) during the second phase.
    pub tags: u32,
    /// At the end: stop the front-end, tag the stopped VM, and reboot (the
    /// ring in memory is lost), then write again.
    pub stopped_tag_then_reboot: bool,
}

impl Plan {
    pub fn new(seed: u64) -> Plan {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x7465_726e_746f_7274);
        let phase1 = Duration::from_millis(rng.gen_range(600..1500));
        let at = |rng: &mut rand::rngs::StdRng| Duration::from_millis(rng.gen_range(100..phase1.as_millis() as u64));
        let role = *[Role::Serve, Role::Serve, Role::Ship, Role::Apply].choose(&mut rng).expect("roles");
        let points = match role {
            Role::Serve => SERVE_POINTS,
            Role::Ship => SHIP_POINTS,
            Role::Apply => APPLY_POINTS,
        };
        let &(point, passes) = points.choose(&mut rng).expect("points");
        let pass = rng.gen_range(1..=passes.max(1));
        let failure = match rng.gen_range(0..100) {
            0..=29 => Failure::Kill { role, point, pass },
            30..=44 => Failure::Fault {
                role,
                point,
                errno: ["eio", "enospc"].choose(&mut rng).expect("errno"),
                pass,
                onwards: rng.gen_bool(0.3),
            },
            // Long enough, mostly, for the shipper to ship around the stall.
            45..=59 => Failure::StallKill { role, point, pass, after: Duration::from_millis(rng.gen_range(50..1200)) },
            60..=71 => Failure::RandomKill { role, at: at(&mut rng) },
            72..=91 => Failure::PowerCut {
                site: *[Site::Source, Site::Source, Site::Remote, Site::Both].choose(&mut rng).expect("site"),
                at: at(&mut rng),
                mode: *[CutMode::Drop, CutMode::Prefix, CutMode::Subset].choose(&mut rng).expect("mode"),
            },
            _ => Failure::TagKill { at: at(&mut rng) },
        };
        const OFFSETS: &[&str] = &["-25h", "-3h", "+3h", "+25h", "+3d"];
        let skew = rng
            .gen_bool(0.3)
            .then(|| (*OFFSETS.choose(&mut rng).expect("offset"), *OFFSETS.choose(&mut rng).expect("offset")));
        Plan {
            seed,
            disk_size: *[1u64 << 20, 2 << 20].choose(&mut rng).expect("size"),
            // Small rings overflow, and the resync catches up.
            journal_size: ["128KiB", "512KiB", "4MiB", "4MiB"].choose(&mut rng).expect("journal"),
            connections_per_disk: rng.gen_range(1..=3),
            // Zeroings and trims take the ordinary (not in-place) path.
            mix: [rng.gen_range(35..55), rng.gen_range(3..12), rng.gen_range(5..20), rng.gen_range(4..14)],
            max_blocks: *[1u64, 4, 16].choose(&mut rng).expect("blocks"),
            hot_share: rng.gen_range(20..80),
            think: Duration::from_micros(rng.gen_range(200..3000)),
            phase1,
            phase2: Duration::from_millis(rng.gen_range(600..1500)),
            failure,
            skew,
            tags: rng.gen_range(0..=3),
            stopped_tag_then_reboot: rng.gen_bool(0.2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_gives_the_same_plan_and_seeds_cover_every_kind() {
        assert_eq!(format!("{:?}", Plan::new(7)), format!("{:?}", Plan::new(7)));
        let kinds: std::collections::BTreeSet<&str> = (0..500).map(|s| Plan::new(s).failure.kind()).collect();
        assert_eq!(kinds.len(), 6, "{kinds:?}");
    }
}
