//! One trial: a VM of two disks protected on this host, the workload
//! against `tern serve`, `tern ship` and `tern apply` running beside it
//! like services (restarted when they die), one disaster, recovery, more
//! writes and tags, the final catch-up, and every check.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_crashfs::{CutMode, Process as CrashFs};

use crate::history::{History, Kind, Outcome};
use crate::oracle::{self, Oracle};
use crate::plan::{Failure, Plan, Role, Site};
use crate::procs::{read_images, tail, Clock, Daemon, TernEnv};
use crate::sector::{decode_image, SECTOR};
use crate::workload::{Workload, WorkloadSpec};

/// What the suite needs besides the seed.
#[derive(Debug, Clone)]
pub struct Config {
    pub tern: PathBuf,
    pub crashfs: PathBuf,
    /// Trials' directories go here.
    pub base: PathBuf,
    /// Keep a failing trial's directory (logs, images, cache, target).
    pub keep_failed: bool,
}

/// What a trial did and found.
#[derive(Debug, Default)]
pub struct Outcome_ {
    pub violations: Vec<String>,
    /// Failpoint firings: point → kills, and "errno N" faults by point.
    pub kills: BTreeMap<String, u64>,
    pub faults: BTreeMap<String, u64>,
    pub power_cuts: u64,
    pub random_kills: u64,
    pub ops: usize,
    pub points_checked: usize,
    pub dir: Option<PathBuf>,
    /// How long each step took, for `--verbose`.
    pub steps: Vec<(&'static str, Duration)>,
}

pub use Outcome_ as TrialOutcome;

const DISKS: [&str; 2] = ["disk0", "disk1"];

struct Trial<'a> {
    plan: &'a Plan,
    env: TernEnv,
    images: PathBuf,
    serve: Option<Daemon>,
    ship: Option<Daemon>,
    apply: Option<Daemon>,
    source_fs: Option<CrashFs>,
    remote_fs: Option<CrashFs>,
    out: TrialOutcome,
    /// Every point id seen in the catalog: retention may not drop one.
    seen_points: BTreeSet<String>,
    boots: u64,
}

pub fn run(cfg: &Config, plan: &Plan) -> TrialOutcome {
    let dir = cfg.base.join(format!("trial-{}", plan.seed));
    let _ = std::fs::remove_dir_all(&dir);
    let ring_dir = PathBuf::from(format!("/dev/shm/tern-torture-{}-{}", std::process::id(), plan.seed));
    let _ = std::fs::remove_dir_all(&ring_dir);
    let mut out = match Trial::run(cfg, plan, &dir, &ring_dir) {
        Ok(out) => out,
        Err(e) => TrialOutcome { violations: vec![e], ..Default::default() },
    };
    let _ = std::fs::remove_dir_all(&ring_dir);
    if out.violations.is_empty() || !cfg.keep_failed {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        out.dir = Some(dir);
    }
    out
}

impl<'a> Trial<'a> {
    fn run(cfg: &Config, plan: &'a Plan, dir: &Path, ring_dir: &Path) -> Result<TrialOutcome, String> {
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
        let power = matches!(plan.failure, Failure::PowerCut { .. });
        // With a power cut, each site's files live on a crash filesystem.
        let (source_root, remote_root, source_fs, remote_fs) = if power {
            let mount = |name: &str| -> Result<(PathBuf, CrashFs), String> {
                let m = dir.join(name);
                std::fs::create_dir_all(&m).map_err(|e| e.to_string())?;
                let fs = CrashFs::spawn(&cfg.crashfs, &m, &dir.join(format!("{name}.ctl")))
                    .map_err(|e| format!("cannot start tern-crashfs at {}: {e}", m.display()))?;
                Ok((m, fs))
            };
            let (s, sfs) = mount("source")?;
            let (r, rfs) = mount("remote")?;
            (s, r, Some(sfs), Some(rfs))
        } else {
            (dir.join("source"), dir.join("remote"), None, None)
        };
        let images = source_root.join("images");
        let env = TernEnv {
            tern: cfg.tern.clone(),
            state: source_root.join("state"),
            ring_dir: ring_dir.to_owned(),
            cache: remote_root.join("cache"),
            target: remote_root.join("target"),
            socket: dir.join("nbd.sock"),
            logs,
            boot_id: boot_id(plan.seed, 0),
            source_clock: plan.skew.map(|s| s.0.to_string()),
            target_clock: plan.skew.map(|s| s.1.to_string()),
            failpoint_log: dir.join("failpoints.log"),
        };
        for d in [&images, &env.cache, &env.target] {
            std::fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        }
        let mut t = Trial {
            plan,
            env,
            images,
            serve: None,
            ship: None,
            apply: None,
            source_fs,
            remote_fs,
            out: TrialOutcome::default(),
            seen_points: BTreeSet::new(),
            boots: 0,
        };
        let result = t.body();
        if let Err(e) = result {
            t.out.violations.push(e);
        }
        t.count_failpoints();
        // Everything stops before the filesystems go.
        for d in [t.serve.take(), t.ship.take(), t.apply.take()].into_iter().flatten() {
            drop(d);
        }
        for fs in [t.source_fs.take(), t.remote_fs.take()].into_iter().flatten() {
            let _ = fs.shutdown();
        }
        Ok(std::mem::take(&mut t.out))
    }

    /// Notes the time since the last step.
    fn step(&mut self, name: &'static str, since: &mut Instant) {
        self.out.steps.push((name, since.elapsed()));
        *since = Instant::now();
    }

    fn violation(&mut self, what: String) {
        self.out.violations.push(what);
    }

    fn body(&mut self) -> Result<(), String> {
        let plan = self.plan;
        let mut t = Instant::now();
        for d in DISKS {
            let p = self.images.join(format!("{d}.img"));
            std::fs::File::create(&p)
                .and_then(|f| f.set_len(plan.disk_size))
                .map_err(|e| format!("cannot create {}: {e}", p.display()))?;
        }
        let mut enable = vec!["enable".to_string(), "vm".into()];
        for d in DISKS {
            enable.push("--disk".into());
            enable.push(format!("{d}={}", self.images.join(format!("{d}.img")).display()));
        }
        enable.extend([
            "--cache".into(),
            self.env.cache.display().to_string(),
            "--target".into(),
            self.env.target.display().to_string(),
            "--journal-size".into(),
            plan.journal_size.into(),
            "--interval".into(),
            "300ms".into(),
        ]);
        let args: Vec<&str> = enable.iter().map(String::as_str).collect();
        self.checked(Clock::Source, &args, Duration::from_secs(30))?;
        // The installed system is on disk before anything happens.
        for fs in [&mut self.source_fs, &mut self.remote_fs].into_iter().flatten() {
            fs.control.sync().map_err(|e| format!("crashfs sync: {e}"))?;
        }

        // An armed front-end may meet its failpoint while it attaches: the
        // disaster came early, and the service manager starts it again.
        self.serve = Some(match self.env.start(Role::Serve, plan.failure.armed(Role::Serve).as_deref()) {
            Ok(d) => d,
            Err(_) if plan.failure.armed(Role::Serve).is_some() => self.env.start(Role::Serve, None)?,
            Err(e) => return Err(e),
        });
        self.ship = Some(self.env.start(Role::Ship, plan.failure.armed(Role::Ship).as_deref())?);
        self.apply = Some(self.env.start(Role::Apply, plan.failure.armed(Role::Apply).as_deref())?);

        let history = Arc::new(History::new());
        let spec = WorkloadSpec {
            socket: self.env.socket.clone(),
            disks: DISKS.iter().map(|d| d.to_string()).collect(),
            disk_size: plan.disk_size,
            connections_per_disk: plan.connections_per_disk,
            mix: plan.mix,
            max_blocks: plan.max_blocks,
            hot_share: plan.hot_share,
            hot: 128 << 10,
            think: plan.think,
        };
        let workload = Workload::start(&spec, plan.seed, Arc::clone(&history));
        self.step("setup", &mut t);

        // ---- phase 1: the disaster ----
        workload.run();
        let crash = self.phase_one(&workload)?;
        // Before the clients are parked: one may wait on a stalled daemon.
        let crash = self.end_disaster(crash);
        workload.pause();
        history.lose_in_flight();
        self.step("disaster", &mut t);
        self.aftermath(crash, &history)?;
        self.step("recovery", &mut t);

        // Caught up before anything new is written: a divergence the
        // disaster left is seen before later writes can cover it.
        self.replica_catches_up("after the disaster and its recovery")?;
        self.step("catch-up", &mut t);

        // ---- phase 2: writes and tags after recovery ----
        let mut tags = Vec::new();
        let started = Instant::now();
        let tag_at: Vec<Duration> = (0..plan.tags).map(|i| plan.phase2 * (i + 1) / (plan.tags + 1)).collect();
        workload.run();
        for at in tag_at {
            self.supervise_until(started + at)?;
            workload.pause();
            tags.push(self.tag(&format!("tag-{}", tags.len()))?);
            workload.run();
        }
        self.supervise_until(started + plan.phase2)?;
        workload.pause();
        self.step("phase 2", &mut t);

        // ---- the end: flushed, checked, stopped, caught up ----
        self.flush_all(&history, &workload)?;
        self.check_source(&history, "at the end, after a flush of every disk", &|op| op.acked().is_some())?;
        if plan.stopped_tag_then_reboot {
            self.stop(Role::Serve)?;
            tags.push(self.tag("stopped")?);
            self.wait_shipped(Duration::from_secs(60))?;
            self.reboot_source_cleanly()?;
            workload.run();
            std::thread::sleep(Duration::from_millis(300));
            workload.pause();
            self.flush_all(&history, &workload)?;
            self.check_source(&history, "after a clean reboot, after a flush of every disk", &|op| {
                op.acked().is_some()
            })?;
        }
        for t in workload.stop() {
            self.violation(format!("hang: {t}"));
        }
        self.out.ops = history.snapshot().len();
        self.step("end", &mut t);
        for role in [Role::Serve, Role::Ship, Role::Apply] {
            self.stop(role)?;
        }
        self.step("stop", &mut t);
        self.checked(Clock::Source, &["ship", "vm", "--once", "--checksum-timeout", "30s"], Duration::from_secs(180))?;
        let cache = self.env.cache.display().to_string();
        let target = self.env.target.display().to_string();
        self.checked(
            Clock::Target,
            &["apply", "--once", "--cache", &cache, "--target", &target, "vm"],
            Duration::from_secs(180),
        )?;
        let result = self.final_checks(&history, &tags);
        self.keep_history(&history);
        result
    }

    /// With a violation, the history goes beside the trial's files.
    fn keep_history(&self, history: &History) {
        if self.out.violations.is_empty() {
            return;
        }
        let text: String = history.snapshot().iter().map(|op| format!("{op:?}\n")).collect();
        let _ = std::fs::write(self.env.logs.join("history.txt"), text);
    }

    /// Runs a tern command that must succeed.
    fn checked(&self, clock: Clock, args: &[&str], limit: Duration) -> Result<std::process::Output, String> {
        let out = self.env.run(clock, None, args, limit)?;
        // Kept with the daemons' logs (the applier's says which tags fell
        // inside a resync window).
        let log = self.env.logs.join(format!("{}.log", args[0]));
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            use std::io::Write;
            let _ = f.write_all(&out.stderr);
        }
        if !out.status.success() {
            return Err(format!(
                "`tern {}` failed ({}):\n{}",
                args.join(" "),
                out.status,
                tail(&String::from_utf8_lossy(&out.stderr), 15)
            ));
        }
        Ok(out)
    }

    /// The first phase, until its time is up or `tern serve` died; the
    /// planned disaster happens in it. Returns how the source crashed, if
    /// it did.
    fn phase_one(&mut self, workload: &Workload) -> Result<Option<Crash>, String> {
        let plan = self.plan;
        let started = Instant::now();
        let mut stalled_since: Option<Instant> = None;
        while started.elapsed() < plan.phase1 {
            let now = started.elapsed();
            match plan.failure {
                Failure::RandomKill { role, at } if now >= at && self.out.random_kills == 0 => {
                    self.out.random_kills += 1;
                    self.daemon(role).kill();
                    if role == Role::Serve {
                        return Ok(Some(Crash::Process));
                    }
                }
                Failure::PowerCut { site, at, mode } if now >= at => {
                    return self.power_cut(site, mode, workload);
                }
                Failure::TagKill { at } if now >= at && !self.fired("tag:reserved") => {
                    let out = self.env.run(
                        Clock::Source,
                        Some("tag:reserved=kill"),
                        &["tag", "vm", "killed"],
                        Duration::from_secs(30),
                    )?;
                    use std::os::unix::process::ExitStatusExt;
                    if out.status.signal() != Some(9) && out.status.success() {
                        // A tagger that was not killed was not reached:
                        // the ring was full. Nothing happened.
                    }
                }
                Failure::StallKill { role, point, after, .. } => {
                    if stalled_since.is_none() && self.fired(point) {
                        stalled_since = Some(Instant::now());
                    }
                    if stalled_since.is_some_and(|s| s.elapsed() >= after) {
                        self.daemon(role).kill();
                        self.out.random_kills += 1;
                        if role == Role::Serve {
                            return Ok(Some(Crash::Process));
                        }
                        stalled_since = None;
                        self.restart(role)?;
                    }
                }
                _ => {}
            }
            if let Some(status) = self.serve.as_mut().and_then(Daemon::exited) {
                let _ = status;
                return Ok(Some(Crash::Process));
            }
            self.restart_dead(false)?;
            self.note_points();
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(None)
    }

    fn daemon(&mut self, role: Role) -> &mut Daemon {
        match role {
            Role::Serve => self.serve.as_mut(),
            Role::Ship => self.ship.as_mut(),
            Role::Apply => self.apply.as_mut(),
        }
        .expect("the daemon runs")
    }

    fn slot(&mut self, role: Role) -> &mut Option<Daemon> {
        match role {
            Role::Serve => &mut self.serve,
            Role::Ship => &mut self.ship,
            Role::Apply => &mut self.apply,
        }
    }

    /// Starts `role` again, disarmed (a restart by the service manager).
    fn restart(&mut self, role: Role) -> Result<(), String> {
        if let Some(mut d) = self.slot(role).take() {
            d.kill();
        }
        std::thread::sleep(Duration::from_millis(50));
        let d = self.env.start(role, None)?;
        *self.slot(role) = Some(d);
        Ok(())
    }

    /// Restarts `tern ship` and `tern apply` if they exited (and `tern
    /// serve` too when `serve` says so).
    fn restart_dead(&mut self, serve: bool) -> Result<(), String> {
        for role in [Role::Ship, Role::Apply].into_iter().chain(serve.then_some(Role::Serve)) {
            let dead = self.slot(role).as_mut().is_none_or(|d| d.exited().is_some());
            if dead {
                self.restart(role)?;
            }
        }
        Ok(())
    }

    fn supervise_until(&mut self, until: Instant) -> Result<(), String> {
        while Instant::now() < until {
            if let Some(status) = self.serve.as_mut().and_then(Daemon::exited) {
                return Err(format!(
                    "tern serve exited ({status}) with no failure planned:\n{}",
                    self.log_tail("serve")
                ));
            }
            self.restart_dead(false)?;
            self.note_points();
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn log_tail(&self, name: &str) -> String {
        tail(&std::fs::read_to_string(self.env.logs.join(format!("{name}.log"))).unwrap_or_default(), 15)
    }

    fn failpoint_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.env.failpoint_log).unwrap_or_default().lines().map(str::to_owned).collect()
    }

    fn fired(&self, point: &str) -> bool {
        self.failpoint_lines().iter().any(|l| l.split_whitespace().nth(1) == Some(point))
    }

    fn count_failpoints(&mut self) {
        for line in self.failpoint_lines() {
            // "<pid> <point> <pass> <what…>"
            let w: Vec<&str> = line.split_whitespace().collect();
            if w.len() < 4 {
                continue;
            }
            let what = w[3..].join(" ");
            if what == "kill" {
                *self.out.kills.entry(w[1].to_owned()).or_default() += 1;
            } else if what.starts_with("errno") {
                *self.out.faults.entry(format!("{} at {}", errno_name(&what), w[1])).or_default() += 1;
            }
        }
    }

    /// Power goes at `site`: every process there dies, the crash
    /// filesystem forgets what was not durable, the host reboots (a new
    /// boot id, the ring in memory gone).
    fn power_cut(&mut self, site: Site, mode: CutMode, workload: &Workload) -> Result<Option<Crash>, String> {
        let _ = workload;
        self.out.power_cuts += 1;
        let source = matches!(site, Site::Source | Site::Both);
        let remote = matches!(site, Site::Remote | Site::Both);
        // Everything that has files open on a cut filesystem dies with it:
        // at the source the front-end and the shipper, at the remote site
        // the applier (and the shipper, writing into the cache there).
        if source {
            if let Some(mut d) = self.serve.take() {
                d.kill();
            }
        }
        for role in [Role::Ship, Role::Apply] {
            if let Some(mut d) = self.slot(role).take() {
                d.kill();
            }
        }
        if source {
            // The clients' connections die with the server; let them notice
            // before the filesystem goes.
            std::thread::sleep(Duration::from_millis(20));
        }
        let seed = self.plan.seed;
        for (cut, fs) in [(source, &mut self.source_fs), (remote, &mut self.remote_fs)] {
            if cut {
                let fs = fs.as_mut().expect("a power-cut trial has crash filesystems");
                fs.control.power_cut(seed, mode).map_err(|e| format!("power cut: {e}"))?;
            }
        }
        if source {
            let _ = std::fs::remove_dir_all(&self.env.ring_dir);
            self.boots += 1;
            self.env.boot_id = boot_id(seed, self.boots);
            return Ok(Some(Crash::Power));
        }
        Ok(None)
    }

    /// The disaster is over: a daemon still armed is killed (a failpoint
    /// not reached yet could fire in its shutdown, a stall would hold it
    /// up and the clients waiting on it); for the front-end that is a
    /// crash like any other, checked as one.
    fn end_disaster(&mut self, crash: Option<Crash>) -> Option<Crash> {
        let mut crash = crash;
        for role in [Role::Serve, Role::Ship, Role::Apply] {
            let Some(mut d) = self.slot(role).take() else { continue };
            let crashed = role == Role::Serve && crash.is_some();
            if d.armed || crashed {
                d.kill();
                if role == Role::Serve {
                    crash.get_or_insert(Crash::Process);
                }
            } else {
                *self.slot(role) = Some(d);
            }
        }
        crash
    }

    /// After the first phase: what died is restarted, and the source is
    /// checked against what the clients saw acknowledged (and flushed).
    fn aftermath(&mut self, crash: Option<Crash>, history: &History) -> Result<(), String> {
        for role in [Role::Ship, Role::Apply] {
            if let Some(mut d) = self.slot(role).take() {
                if let Err(e) = d.stop(Duration::from_secs(30)) {
                    self.violation(format!("{e}:\n{}", self.log_tail(role.name())));
                }
            }
        }
        if self.serve.is_none() {
            self.serve =
                Some(self.env.start(Role::Serve, None).map_err(|e| format!("{e}:\n{}", self.log_tail("serve")))?);
        }
        self.restart_dead(false)?;
        match crash {
            Some(Crash::Process) => {
                self.check_source(
                    history,
                    "after `tern serve` was killed (every acknowledged write must be there)",
                    &|op| op.acked().is_some(),
                )?;
            }
            Some(Crash::Power) => {
                let ops = history.snapshot();
                let flushed = oracle::flushed(&ops);
                let durable: BTreeSet<u64> =
                    ops.iter().zip(&flushed).filter(|(_, f)| **f).map(|(op, _)| op.id).collect();
                self.check_source(
                    history,
                    "after a power cut at the source (every flushed write must be there)",
                    &|op| durable.contains(&op.id),
                )?;
                history.power_lost(&durable);
            }
            None => {}
        }
        Ok(())
    }

    /// Checks the source images against the history: `durable` ops must
    /// be there (or what definitely came after them).
    fn check_source(
        &mut self,
        history: &History,
        when: &str,
        durable: &dyn Fn(&crate::history::Op) -> bool,
    ) -> Result<(), String> {
        let ops = history.snapshot();
        let images = read_images(&self.images, &DISKS.map(String::from))?;
        let held: Vec<_> = images.iter().enumerate().map(|(d, b)| decode_image(d as u16, b)).collect();
        let o = Oracle::new(&ops, DISKS.len(), self.plan.disk_size / SECTOR);
        let v = o.check_after_crash(&held, durable, 5);
        if !v.is_empty() {
            self.violation(format!("the source {when}:\n  {}", v.join("\n  ")));
        }
        Ok(())
    }

    /// A FLUSH of every disk, recorded in the history.
    fn flush_all(&mut self, history: &History, workload: &Workload) -> Result<(), String> {
        for (i, d) in DISKS.iter().enumerate() {
            let mut c = crate::nbd::Client::connect(&self.env.socket, d, crate::workload::PATIENCE)
                .map_err(|e| format!("cannot connect to flush {d}: {e}"))?;
            let at = history.sent(workload.next_id(), i as u16, Kind::Flush, 0, 0);
            match c.request(crate::nbd::CMD_FLUSH, 0, 0, 0, &[]) {
                Ok((0, _)) => history.done(at, Outcome::Ok),
                Ok((e, _)) => return Err(format!("the final FLUSH of {d} failed with error {e}")),
                Err(e) => return Err(format!("the final FLUSH of {d}: {e}")),
            }
        }
        Ok(())
    }

    /// Tags the VM with nothing in flight; the source images then are
    /// what its app point must hold.
    fn tag(&mut self, label: &str) -> Result<Tag, String> {
        let snapshot = read_images(&self.images, &DISKS.map(String::from))?;
        let out = self.env.run(Clock::Source, None, &["tag", "vm", label], Duration::from_secs(30))?;
        Ok(Tag { label: label.to_owned(), snapshot, taken: out.status.success() })
    }

    fn stop(&mut self, role: Role) -> Result<(), String> {
        if let Some(mut d) = self.slot(role).take() {
            match d.stop(Duration::from_secs(60)) {
                Ok(s) if s.success() => {}
                Ok(s) => self.violation(format!(
                    "tern {} exited with {s} when stopped:\n{}",
                    role.name(),
                    self.log_tail(role.name())
                )),
                Err(e) => self.violation(e),
            }
        }
        Ok(())
    }

    /// Waits until the shipper has taken everything in the ring.
    fn wait_shipped(&mut self, limit: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let out = self.env.run(Clock::Source, None, &["status", "vm", "--json"], Duration::from_secs(30))?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let (head, shipped) = (v[0]["head_seq"].as_u64(), v[0]["shipped_seq"].as_u64());
            // head_seq is the newest sequence number handed out.
            if head.is_some() && shipped.is_some_and(|s| Some(s) >= head) {
                return Ok(());
            }
            if started.elapsed() > limit {
                return Err(format!("hang: the shipper took not all the ring within {limit:?}: {v}"));
            }
            self.restart_dead(false)?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A clean reboot of the source: the ring in memory is gone, the rest
    /// was made durable by the clean stop.
    fn reboot_source_cleanly(&mut self) -> Result<(), String> {
        for role in [Role::Serve, Role::Ship] {
            self.stop(role)?;
        }
        let _ = std::fs::remove_dir_all(&self.env.ring_dir);
        self.boots += 1;
        self.env.boot_id = boot_id(self.plan.seed, self.boots);
        self.serve = Some(self.env.start(Role::Serve, None)?);
        self.ship = Some(self.env.start(Role::Ship, None)?);
        Ok(())
    }

    /// With the clients parked: waits until replication has caught up
    /// (everything shipped and applied, nothing dirty, no resync window),
    /// then the replica must equal the source byte for byte.
    fn replica_catches_up(&mut self, when: &str) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let out = self.env.run(Clock::Source, None, &["status", "vm", "--json"], Duration::from_secs(30))?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let s = &v[0];
            let head = s["head_seq"].as_u64().unwrap_or(u64::MAX);
            let caught_up = s["dirty_bytes"].as_u64() == Some(0)
                && s["resync_window_open"] == false
                && s["journal_mode"] == "journal"
                && s["shipped_seq"].as_u64().is_some_and(|x| x >= head)
                // No applied.toml before the first segment is applied: with
                // nothing ever journaled (a disaster before the first
                // write), there is nothing to apply.
                && s["applied_seq"].as_u64().unwrap_or(0) >= head;
            if caught_up {
                break;
            }
            if std::env::var_os("TORTURE_DEBUG").is_some() && started.elapsed().as_millis() % 2000 < 100 {
                eprintln!("catch-up {when} at {:.1?}: {s}", started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(120) {
                self.violation(format!("hang: replication did not catch up {when} within 120 s: {s}"));
                return Ok(());
            }
            self.restart_dead(false)?;
            self.note_points();
            std::thread::sleep(Duration::from_millis(100));
        }
        let names = DISKS.map(String::from);
        let source = read_images(&self.images, &names)?;
        let replica = read_images(&self.env.target.join("vm").join("replica"), &names)?;
        for (d, (s, r)) in source.iter().zip(&replica).enumerate() {
            if let Some(i) = s.iter().zip(r).position(|(a, b)| a != b) {
                self.violation(format!(
                    "the replica of disk{d}, caught up {when}, differs from the source first at byte {i}"
                ));
            }
        }
        Ok(())
    }

    /// Remembers every point in the catalog now.
    fn note_points(&mut self) {
        let dir = self.env.target.join("vm").join("points");
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.starts_with('.') && e.path().join("point.toml").is_file() {
                    self.seen_points.insert(name);
                }
            }
        }
    }

    fn final_checks(&mut self, history: &History, tags: &[Tag]) -> Result<(), String> {
        let ops = history.snapshot();
        let sectors = self.plan.disk_size / SECTOR;
        let oracle = Oracle::new(&ops, DISKS.len(), sectors);
        let names = DISKS.map(String::from);
        // The replica is the source, byte for byte.
        let source = read_images(&self.images, &names)?;
        let replica = read_images(&self.env.target.join("vm").join("replica"), &names)?;
        for (d, (s, r)) in source.iter().zip(&replica).enumerate() {
            if let Some(i) = s.iter().zip(r).position(|(a, b)| a != b) {
                self.violation(format!("the replica of disk{d} differs from the source first at byte {i}"));
            }
        }
        // Every point is a state the source passed through.
        let out = self.env.run(
            Clock::Target,
            None,
            &["points", "vm", "--json", "--target", &self.env.target.display().to_string()],
            Duration::from_secs(30),
        )?;
        let points: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("`tern points --json`: {e}: {}", String::from_utf8_lossy(&out.stdout)))?;
        let listed: BTreeSet<String> = points.iter().filter_map(|p| p["id"].as_str().map(str::to_owned)).collect();
        let gone: Vec<String> = self.seen_points.difference(&listed).cloned().collect();
        for gone in gone {
            self.violation(format!(
                "point {gone} was in the catalog and is gone (retention keeps every point of a trial)"
            ));
        }
        for p in &points {
            let id = p["id"].as_str().unwrap_or("?").to_owned();
            let mut images = Vec::new();
            for d in DISKS {
                let Some(path) = p["disks"][d].as_str() else {
                    self.violation(format!("point {id} has no {d}"));
                    continue;
                };
                images.push(std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?);
            }
            if images.len() != DISKS.len() {
                continue;
            }
            let held: Vec<_> = images.iter().enumerate().map(|(d, b)| decode_image(d as u16, b)).collect();
            let v = oracle.check_point(&held, 5);
            if !v.is_empty() {
                self.violation(format!(
                    "point {id} (seq {}) is no state the source passed through:\n  {}",
                    p["seq"],
                    v.join("\n  ")
                ));
            }
            self.out.points_checked += 1;
            // An app point holds exactly what the source held at its tag.
            if let Some(label) = p["label"].as_str() {
                if let Some(tag) = tags.iter().find(|t| t.label == label) {
                    for (d, (got, want)) in images.iter().zip(&tag.snapshot).enumerate() {
                        if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
                            self.violation(format!(
                                "app point {id} ('{label}') differs from the source at its tag on disk{d} at byte {i}"
                            ));
                        }
                    }
                }
            }
        }
        // Every tag that was taken has its point, unless it fell inside a
        // resync window (the applier says so).
        let apply_logs = std::fs::read_to_string(self.env.logs.join("apply.log")).unwrap_or_default();
        for t in tags.iter().filter(|t| t.taken) {
            let has = points.iter().any(|p| p["label"].as_str() == Some(&t.label));
            if !has && !apply_logs.contains(&format!("tag '{}'", t.label)) {
                self.violation(format!("tag '{}' was taken but no app point has it", t.label));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Crash {
    /// `tern serve` died; the page cache survived.
    Process,
    /// The source host lost power.
    Power,
}

struct Tag {
    label: String,
    snapshot: Vec<Vec<u8>>,
    taken: bool,
}

fn boot_id(seed: u64, boot: u64) -> String {
    uuid::Uuid::from_u64_pair(seed, boot + 1).to_string()
}

fn errno_name(what: &str) -> String {
    match what.trim_start_matches("errno ").parse::<i32>() {
        Ok(libc::EIO) => "EIO".into(),
        Ok(libc::ENOSPC) => "ENOSPC".into(),
        Ok(libc::EDQUOT) => "EDQUOT".into(),
        _ => what.to_owned(),
    }
}
