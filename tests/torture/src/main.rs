//! `tern-torture`: seeded trials of tern's whole data path (serve, ship,
//! apply) with a disaster in each, judged against the client's history.
//! See `scripts/torture.sh`, which builds what it needs and runs this.
//!
//! Prints one line per failing seed, with the command that replays it,
//! and ends with one line:
//! `torture: <trials> trials, <kills> kills, <faults> faults, <violations> violations`.
//! Exits non-zero on any violation.

mod history;
mod nbd;
mod oracle;
mod plan;
mod procs;
mod sector;
mod trial;
mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;

/// Seeded torture trials of tern.
#[derive(Debug, Parser)]
struct Args {
    /// Run this many seeds, from --first on.
    #[arg(long, default_value_t = 20)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// Run this one seed only (replays a failure).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop starting trials after this many minutes.
    #[arg(long)]
    minutes: Option<f64>,
    /// Trials at once.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// `tern` built with failpoints (scripts/build-failpoints.sh).
    #[arg(long)]
    tern: PathBuf,
    /// The `tern-crashfs` binary.
    #[arg(long)]
    crashfs: PathBuf,
    /// Where trials make their directories.
    #[arg(long, default_value = "/var/tmp/tern-torture")]
    dir: PathBuf,
    /// Keep a failing trial's directory.
    #[arg(long)]
    keep: bool,
    /// Print each trial's plan and result.
    #[arg(short, long)]
    verbose: bool,
    /// Write the totals as JSON here (for docs/BENCHMARKS.md).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Only the seeds whose plan has this: a disaster kind (kill, fault,
    /// stall-kill, random-kill, power-cut, tag-kill), `skew`, or
    /// `stopped-tag` (a tag on the stopped VM, then a reboot).
    #[arg(long)]
    only: Option<String>,
}

#[derive(Default)]
struct Totals {
    trials: u64,
    kills: BTreeMap<String, u64>,
    faults: BTreeMap<String, u64>,
    power_cuts: u64,
    random_kills: u64,
    failing_seeds: Vec<u64>,
    violations: u64,
    by_kind: BTreeMap<String, (u64, u64)>, // trials, failing
    ops: u64,
    points: u64,
}

fn main() {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir).expect("create the trials' directory");
    let cfg = trial::Config {
        tern: args.tern.clone(),
        crashfs: args.crashfs.clone(),
        base: args.dir.clone(),
        keep_failed: args.keep,
    };
    let seeds: Vec<u64> = match args.seed {
        Some(s) => vec![s],
        None => (args.first..args.first + args.seeds)
            .filter(|&s| {
                let p = plan::Plan::new(s);
                match args.only.as_deref() {
                    None => true,
                    Some("skew") => p.skew.is_some(),
                    Some("stopped-tag") => p.stopped_tag_then_reboot,
                    Some(kind) => p.failure.kind() == kind,
                }
            })
            .collect(),
    };
    let started = Instant::now();
    let deadline = args.minutes.map(|m| started + Duration::from_secs_f64(m * 60.0));
    let next = AtomicU64::new(0);
    let totals = Arc::new(Mutex::new(Totals::default()));
    std::thread::scope(|s| {
        for _ in 0..args.jobs.max(1) {
            s.spawn(|| loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(&seed) = seeds.get(i) else { return };
                let plan = plan::Plan::new(seed);
                let t0 = Instant::now();
                let out = trial::run(&cfg, &plan);
                let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                t.trials += 1;
                t.power_cuts += out.power_cuts;
                t.random_kills += out.random_kills;
                t.ops += out.ops as u64;
                t.points += out.points_checked as u64;
                for (k, n) in &out.kills {
                    *t.kills.entry(k.clone()).or_default() += n;
                }
                for (k, n) in &out.faults {
                    *t.faults.entry(k.clone()).or_default() += n;
                }
                let kind = t.by_kind.entry(plan.failure.kind().to_owned()).or_default();
                kind.0 += 1;
                if args.verbose {
                    let steps: Vec<String> = out.steps.iter().map(|(n, d)| format!("{n} {:.1?}", d)).collect();
                    println!(
                        "seed {seed}: {:?} skew {:?}, {} ops, {} points checked, {} violations, {:.1?} ({})",
                        plan.failure,
                        plan.skew,
                        out.ops,
                        out.points_checked,
                        out.violations.len(),
                        t0.elapsed(),
                        steps.join(", ")
                    );
                }
                if !out.violations.is_empty() {
                    kind.1 += 1;
                    t.violations += out.violations.len() as u64;
                    t.failing_seeds.push(seed);
                    println!(
                        "FAIL seed {seed} ({}): {} — replay: scripts/torture.sh --seed {seed}{}",
                        plan.failure.kind(),
                        out.violations[0].lines().next().unwrap_or_default(),
                        out.dir.as_ref().map(|d| format!(" (kept {})", d.display())).unwrap_or_default()
                    );
                    if args.verbose || args.seed.is_some() {
                        for v in &out.violations {
                            println!("  {}", v.replace('\n', "\n  "));
                        }
                    }
                }
            });
        }
    });
    let t = totals.lock().unwrap_or_else(|p| p.into_inner());
    let kills: u64 = t.kills.values().sum::<u64>() + t.random_kills;
    let faults: u64 = t.faults.values().sum();
    if let Some(path) = &args.report {
        let json = serde_json::json!({
            "trials": t.trials,
            "seeds": { "first": seeds.first(), "last": seeds.get(t.trials.saturating_sub(1) as usize) },
            "kills_by_failpoint": t.kills,
            "random_or_stall_kills": t.random_kills,
            "faults": t.faults,
            "power_cuts": t.power_cuts,
            "violations": t.violations,
            "failing_seeds": t.failing_seeds,
            "trials_by_kind": t.by_kind.iter().map(|(k, (n, f))| (k.clone(), serde_json::json!({"trials": n, "failing": f}))).collect::<BTreeMap<_, _>>(),
            "ops": t.ops,
            "points_checked": t.points,
            "failpoints_armable": plan::all_points(),
            "wall_seconds": started.elapsed().as_secs_f64(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json).unwrap_or_default()).expect("write the report");
    }
    println!(
        "torture: {} trials, {kills} kills, {faults} faults, {} violations ({} power cuts, {} ops, {} points checked, {:.0?})",
        t.trials,
        t.violations,
        t.power_cuts,
        t.ops,
        t.points,
        started.elapsed()
    );
    if t.violations > 0 {
        std::process::exit(1);
    }
}
