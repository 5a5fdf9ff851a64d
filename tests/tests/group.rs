//! Groups: points cut across several VMs at one instant (`tern tag
//! --group`), judged against what the client saw acknowledged.
//!
//! The causal workload: a client writes record N to VM `db`, waits for the
//! acknowledgement, then writes "commit N" to VM `web`. A point of the two
//! that holds commit N without record N is one no application could have
//! produced. Per-VM points taken at the same wall time do hold such pairs
//! (shown, so the check can fail); group points never may. `db` sorts
//! before `web`, so a cut that appended its tags without the barrier (db's
//! first) would let such a commit in too.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_system_tests::*;

const BLOCK: u64 = 4096;
const DISK: u64 = 16 << 20;

/// One state directory with several VMs (a group's members must share
/// one), one cache store and one target site.
struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new(vms: &[&str], journal: &str) -> Site {
        let dir = tempfile::Builder::new().prefix("tern-group-").tempdir_in(test_root()).expect("tempdir");
        let site = Site { dir };
        for d in ["cache", "target"] {
            std::fs::create_dir(site.path(d)).unwrap();
        }
        for vm in vms {
            let img = site.path(&format!("{vm}.img"));
            std::fs::File::create(&img).unwrap().set_len(DISK).unwrap();
            run(site
                .tern()
                .args(["enable", vm, "--cache"])
                .arg(site.path("cache"))
                .arg("--target")
                .arg(site.path("target"))
                .arg("--disk")
                .arg(format!("disk0={}", img.display()))
                .args(["--journal-size", journal]));
        }
        site
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn state(&self) -> PathBuf {
        self.path("state")
    }

    fn tern(&self) -> Command {
        tern_with_state(&self.state())
    }

    /// `tern` with failpoints armed (`TERN_FAILPOINTS`).
    fn tern_armed(&self, failpoints: &str) -> Command {
        let mut c = tern_command(&[("TERN_FAILPOINTS", failpoints)]);
        c.arg("--state").arg(self.state()).env("TERN_RING_DIR", ring_dir_of(&self.state()));
        c
    }

    fn socket(&self, vm: &str) -> PathBuf {
        self.path(&format!("{vm}.sock"))
    }

    /// `tern serve VM` in a process of its own, accepting.
    fn serve(&self, vm: &str) -> Served {
        let log = self.path(&format!("serve-{vm}.log"));
        let child = self
            .tern()
            .args(["serve", vm, "--listen"])
            .arg(format!("unix:{}", self.socket(vm).display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn tern serve");
        let mut served = Served::adopt(child, log.clone(), "tern serve");
        wait_listening(&self.socket(vm), &mut served.child, || std::fs::read_to_string(&log).unwrap_or_default());
        served
    }

    /// `tern ship VM`, running until stopped.
    fn ship(&self, vm: &str) -> Served {
        let log = self.path(&format!("ship-{vm}.log"));
        let child = self
            .tern()
            .args(["ship", vm])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn tern ship");
        Served::adopt(child, log, "tern ship")
    }

    /// Ships every VM and applies the cache: points for every tag.
    fn ship_and_apply(&self, vms: &[&str]) {
        for vm in vms {
            run(self.tern().args(["ship", vm, "--once"]));
        }
        run(self
            .tern()
            .args(["apply", "--once", "--cache"])
            .arg(self.path("cache"))
            .arg("--target")
            .arg(self.path("target")));
    }

    /// `count` blocks of `fill` written to VM `vm` from its start, each
    /// acknowledged.
    fn write_blocks(&self, vm: &str, count: u64, fill: u8) {
        let mut c = RawClient::connect(&self.socket(vm), "disk0");
        for i in 0..count {
            assert_eq!(c.call(CMD_WRITE, 0, i * BLOCK, BLOCK as u32, &[fill; BLOCK as usize]).error, 0);
        }
    }

    /// Every VM's replica at the target equals its image: nothing lost.
    fn assert_replicas_are_images(&self, vms: &[&str]) {
        for vm in vms {
            assert_files_equal(
                &self.path("target").join(vm).join("replica/disk0.img"),
                &self.path(&format!("{vm}.img")),
            );
        }
    }

    /// `tern points --group GROUP --json` at the target site.
    fn group_points(&self, group: &str) -> Vec<serde_json::Value> {
        let out = run(self.tern().args(["points", "--group", group, "--json", "--target"]).arg(self.path("target")));
        json(&out).as_array().expect("a JSON array").clone()
    }

    fn point_image(&self, vm: &str, point: &str) -> PathBuf {
        self.path("target").join(vm).join("points").join(point).join("disk0.img")
    }
}

const BLOCKS: u64 = DISK / BLOCK;

/// Block `n` of a record or commit of generation `generation` (the client
/// wraps around the disk, one generation a lap).
fn block(kind: &str, n: u64, generation: u64) -> Vec<u8> {
    let mut b = format!("{kind} {n} {generation}\n").into_bytes();
    b.resize(BLOCK as usize, 0);
    b
}

/// The generation of the `kind` block at `n` in `image`, if it holds one.
fn generation(image: &[u8], kind: &str, n: u64) -> Option<u64> {
    let at = (n * BLOCK) as usize;
    let text = std::str::from_utf8(&image[at..at + 64]).ok()?;
    let line = text.split('\n').next()?;
    let mut words = line.split(' ');
    (words.next()? == kind && words.next()?.parse::<u64>().ok()? == n).then_some(())?;
    words.next()?.parse().ok()
}

/// Commits in `web` whose record (of that generation or a later one) is
/// not in `db` (both images of one point).
fn violations(db: &Path, web: &Path) -> Vec<u64> {
    let (db, web) = (std::fs::read(db).unwrap(), std::fs::read(web).unwrap());
    (1..BLOCKS)
        .filter(|&n| match generation(&web, "commit", n) {
            Some(g) => generation(&db, "record", n).is_none_or(|r| r < g),
            None => false,
        })
        .collect()
}

/// The causal client: record N to db, acknowledged, then commit N to web,
/// round the disks until stopped. Returns how many pairs it wrote.
fn causal_client(site: &Site, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let (db, web) = (site.socket("db"), site.socket("web"));
    std::thread::spawn(move || {
        let mut db = RawClient::connect(&db, "disk0");
        let mut web = RawClient::connect(&web, "disk0");
        let mut pairs = 0;
        while !stop.load(Ordering::Relaxed) {
            let (n, g) = (1 + pairs % (BLOCKS - 1), pairs / (BLOCKS - 1));
            assert_eq!(db.call(CMD_WRITE, 0, n * BLOCK, BLOCK as u32, &block("record", n, g)).error, 0);
            // Acknowledged: only now may the commit be written.
            assert_eq!(web.call(CMD_WRITE, 0, n * BLOCK, BLOCK as u32, &block("commit", n, g)).error, 0);
            pairs += 1;
        }
        pairs
    })
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[test]
fn group_points_never_hold_a_commit_without_its_record_per_vm_points_do() {
    let site = Site::new(&["db", "web"], "64MiB");
    run(site.tern().args(["group", "create", "shop", "db", "web"]));
    let (db, web) = (site.serve("db"), site.serve("web"));
    let shippers = [site.ship("db"), site.ship("web")];
    let stop = Arc::new(AtomicBool::new(false));
    let client = causal_client(&site, Arc::clone(&stop));
    let rounds = 12;
    for k in 0..rounds {
        std::thread::sleep(Duration::from_millis(30));
        // Per-VM points at the same wall time, one right after the other.
        run(site.tern().args(["tag", "db", &format!("solo-{k}")]));
        run(site.tern().args(["tag", "web", &format!("solo-{k}")]));
        let out = run(site.tern().args(["tag", "--group", "shop", &format!("group-{k}")]));
        assert!(out.contains("group point") && out.contains("db seq") && out.contains("web seq"), "{out}");
    }
    stop.store(true, Ordering::Relaxed);
    let pairs = client.join().expect("the causal client");
    assert!(pairs > 100, "the client wrote only {pairs} pairs");
    db.stop();
    web.stop();
    for s in shippers {
        s.stop();
    }
    site.ship_and_apply(&["db", "web"]);

    // Per-VM points: the pairs taken at one wall time.
    let target = site.path("target");
    let points = |vm: &str| json(&run(site.tern().args(["points", vm, "--json", "--target"]).arg(&target)));
    let (db_points, web_points) = (points("db"), points("web"));
    let mut solo_violations = 0;
    for k in 0..rounds {
        let label = format!("solo-{k}");
        let id = |list: &serde_json::Value| {
            list.as_array().unwrap().iter().find(|p| p["label"] == label.as_str()).expect("the solo point")["id"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let v = violations(&site.point_image("db", &id(&db_points)), &site.point_image("web", &id(&web_points)));
        solo_violations += v.len();
    }
    assert!(
        solo_violations > 0,
        "per-VM points taken at one wall time never held a commit without its record ({pairs} pairs): the check cannot fail"
    );

    // Group points: every one complete, none violating.
    let group = site.group_points("shop");
    assert_eq!(group.len(), rounds, "a group point per cut: {group:?}");
    for g in &group {
        let members = g["members"].as_array().unwrap();
        assert_eq!(members.len(), 2, "{g}");
        let member = |vm: &str| {
            let m = members.iter().find(|m| m["vm"] == vm).unwrap_or_else(|| panic!("{vm} in {g}"));
            site.point_image(vm, m["point"].as_str().unwrap())
        };
        let v = violations(&member("db"), &member("web"));
        assert!(v.is_empty(), "group point {} holds commits without their records: {v:?}", g["id"]);
    }
    eprintln!("{pairs} pairs; per-VM points: {solo_violations} commits without their record; group points: none");

    // A test failover of the whole group at its newest group point.
    let out =
        json(&run(site.tern().args(["failover", "--group", "shop", "--test", "--json", "--target"]).arg(&target)));
    assert_eq!(out["group"], "shop");
    assert_eq!(out["point"], group.last().unwrap()["id"]);
    let members = out["members"].as_array().unwrap();
    assert_eq!(members.len(), 2, "{out}");
    let disk = |vm: &str| {
        let m = members.iter().find(|m| m["vm"] == vm).unwrap();
        PathBuf::from(m["disks"]["disk0"].as_str().unwrap())
    };
    assert!(violations(&disk("db"), &disk("web")).is_empty());
}

#[test]
fn a_group_point_fails_whole_when_a_member_is_not_served_or_in_overflow() {
    let site = Site::new(&["a", "b"], "128KiB");
    run(site.tern().args(["group", "create", "g", "a", "b"]));
    let a = site.serve("a");
    // b is not served.
    let out = site.tern().args(["tag", "--group", "g", "x"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("VM 'b' is not being served"), "{err}");
    // b served, but its journal overflowed: 1 MiB into a 128 KiB ring, no shipper.
    let b = site.serve("b");
    let mut c = RawClient::connect(&site.socket("b"), "disk0");
    for i in 0..16 {
        assert_eq!(c.call(CMD_WRITE, 0, i * 65536, 65536, &[7u8; 65536]).error, 0);
    }
    let out = site.tern().args(["tag", "--group", "g", "y"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("VM 'b' is in overflow"), "{err}");
    drop(c);
    a.stop();
    b.stop();
    // Nothing was cut: a's journal holds no group tag, so no group point.
    site.ship_and_apply(&["a", "b"]);
    let target = site.path("target");
    let group = site.group_points("g");
    assert_eq!(group.len(), 0, "{group:?}");
    let a_points = json(&run(site.tern().args(["points", "a", "--json", "--target"]).arg(&target)));
    assert!(a_points.as_array().unwrap().iter().all(|p| p["kind"] != "app"), "a tag in a: {a_points}");
}

#[test]
fn a_coordinator_killed_holding_the_barrier_never_leaves_writes_waiting() {
    let site = Site::new(&["a", "b"], "64MiB");
    run(site.tern().args(["group", "create", "g", "a", "b"]));
    let (a, b) = (site.serve("a"), site.serve("b"));
    let out = site.tern_armed("tag:group-barrier-closed=kill").args(["tag", "--group", "g", "x"]).output().unwrap();
    assert!(!out.status.success(), "the coordinator was to die at the barrier");
    // Both barriers are closed, their holder dead: the next writes open
    // them and go through.
    for vm in ["a", "b"] {
        let mut c = RawClient::connect(&site.socket(vm), "disk0");
        let started = Instant::now();
        assert_eq!(c.call(CMD_WRITE, 0, 0, 4096, &[1u8; 4096]).error, 0);
        assert!(started.elapsed() < Duration::from_secs(30), "VM {vm}: a write waited {:?}", started.elapsed());
    }
    let logs = [a.stop(), b.stop()];
    for log in &logs {
        assert!(
            log.contains("opened the group barrier that process") && log.contains("left closed when it died"),
            "{log}"
        );
    }
    // And a group point is cut afterwards as ever.
    let (_a, _b) = (site.serve("a"), site.serve("b"));
    let out = run(site.tern().args(["tag", "--group", "g", "after"]));
    assert!(out.contains("group point"), "{out}");
}

#[test]
fn a_member_killed_during_the_barrier_fails_the_group_point() {
    let site = Site::new(&["a", "b"], "64MiB");
    run(site.tern().args(["group", "create", "g", "a", "b"]));
    let (a, b) = (site.serve("a"), site.serve("b"));
    // The coordinator pauses with both barriers closed; b's front-end dies.
    let coordinator = site
        .tern_armed("tag:group-barrier-closed=delay:1500")
        .args(["tag", "--group", "g", "x"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    b.kill9();
    let out = coordinator.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("VM 'b' is not being served"), "{err}");
    // a's barrier is open again: its writes go on.
    let mut c = RawClient::connect(&site.socket("a"), "disk0");
    assert_eq!(c.call(CMD_WRITE, 0, 0, 4096, &[1u8; 4096]).error, 0);
    drop(c);
    a.stop();
}

#[test]
fn group_run_cuts_on_schedule_and_goes_on_past_a_failed_cut() {
    let site = Site::new(&["a", "b"], "64MiB");
    run(site.tern().args(["group", "create", "g", "a", "b"]));
    let a = site.serve("a");
    let log = site.path("group-run.log");
    let child = site
        .tern()
        .args(["group", "run", "g", "--interval", "1s"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let runner = Served::adopt(child, log, "tern group run");
    // b is down for the first cuts: they fail, saying why, and the run goes on.
    std::thread::sleep(Duration::from_millis(2500));
    let b = site.serve("b");
    std::thread::sleep(Duration::from_millis(3500));
    let log = runner.stop();
    assert!(log.contains("VM 'b' is not being served") && log.contains("trying again in 1s"), "{log}");
    let cut = log.matches("writes held").count();
    assert!(cut >= 2, "{cut} cuts in 3.5 s with b served: {log}");
    a.stop();
    b.stop();
    site.ship_and_apply(&["a", "b"]);
    let group = site.group_points("g");
    assert_eq!(group.len(), cut, "every cut a group point: {group:?}");
    assert!(group.iter().all(|g| g["label"] == "scheduled"), "{group:?}");
    // Nobody quiesced the guests of a scheduled cut (no freeze agent):
    // consistent across the members, crash-consistent within each.
    for g in &group {
        for m in g["members"].as_array().unwrap() {
            assert_eq!(m["consistency"], "crash", "{g}");
        }
    }
}

#[test]
fn a_real_group_failover_fences_every_member_at_one_group_point() {
    let site = Site::new(&["a", "b"], "64MiB");
    // A VM named twice is one member (one barrier, one tag lock).
    run(site.tern().args(["group", "create", "g", "a", "b", "a"]));
    let list = json(&run(site.tern().args(["group", "list", "--json"])));
    assert_eq!(list[0]["members"], serde_json::json!(["a", "b"]), "{list}");
    let (a, b) = (site.serve("a"), site.serve("b"));
    for (i, vm) in ["a", "b"].iter().enumerate() {
        let mut c = RawClient::connect(&site.socket(vm), "disk0");
        assert_eq!(c.call(CMD_WRITE, 0, 0, 4096, &[i as u8 + 1; 4096]).error, 0);
    }
    run(site.tern().args(["tag", "--group", "g", "first"]));
    // Written after the group point: not in the failover.
    let mut c = RawClient::connect(&site.socket("a"), "disk0");
    assert_eq!(c.call(CMD_WRITE, 0, 0, 4096, &[9u8; 4096]).error, 0);
    drop(c);
    a.stop();
    b.stop();
    site.ship_and_apply(&["a", "b"]);
    let target = site.path("target");
    let out = json(&run(site.tern().args(["failover", "--group", "g", "--json", "--target"]).arg(&target)));
    let members = out["members"].as_array().unwrap();
    assert_eq!(members.len(), 2, "{out}");
    for (i, vm) in ["a", "b"].iter().enumerate() {
        let m = members.iter().find(|m| m["vm"] == *vm).unwrap();
        let disk = std::fs::read(m["disks"]["disk0"].as_str().unwrap()).unwrap();
        assert_eq!(disk[..4096], [i as u8 + 1; 4096], "VM {vm} at the group point");
        // Fenced: its source ships no more (exit 3).
        let shipped = site.tern().args(["ship", vm, "--once"]).output().unwrap();
        assert_eq!(shipped.status.code(), Some(3), "VM {vm}: a fenced source refuses to ship");
    }
    let status = json(&String::from_utf8_lossy(&site.tern().args(["status", "--json"]).output().unwrap().stdout));
    let states: Vec<&str> = status.as_array().unwrap().iter().map(|s| s["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["failed-over-uncommitted", "failed-over-uncommitted"], "{status}");
}

/// Retention thins each member on its own stream clock. A member a day
/// ahead of a lagging one (whose source went silent before it shipped the
/// newest cut) must keep its part of the last group point the laggard
/// also holds, or the group has no point to fail over to together.
#[test]
fn a_member_ahead_keeps_the_last_group_point_a_lagging_member_holds() {
    require("faketime");
    let site = Site::new(&["a", "b"], "64MiB");
    run(site.tern().args(["group", "create", "g", "a", "b"]));
    let (a, b) = (site.serve("a"), site.serve("b"));
    site.write_blocks("a", 4, 1);
    site.write_blocks("b", 4, 2);
    run(site.tern().args(["tag", "--group", "g", "first"]));
    site.ship_and_apply(&["a", "b"]);
    // A day and an hour later by the sources' clock (retention: 24 h).
    let out = Command::new("faketime")
        .args(["-f", "+25h"])
        .arg(tern_bin())
        .arg("--state")
        .arg(site.state())
        .env("TERN_RING_DIR", ring_dir_of(&site.state()))
        .args(["tag", "--group", "g", "second"])
        .output()
        .expect("run faketime");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    a.stop();
    b.stop();
    // Only a ships the second cut; b's source is gone.
    site.ship_and_apply(&["a"]);
    let labels = |vm: &str| -> Vec<String> {
        let out = run(site.tern().args(["points", vm, "--json", "--target"]).arg(site.path("target")));
        json(&out).as_array().unwrap().iter().filter_map(|p| p["label"].as_str().map(str::to_owned)).collect()
    };
    assert!(labels("a").contains(&"second".to_owned()), "a applied the second cut: {:?}", labels("a"));
    assert!(labels("a").contains(&"first".to_owned()), "a expired the last group point b can join: {:?}", labels("a"));
    let group: Vec<String> =
        site.group_points("g").iter().map(|g| g["label"].as_str().unwrap_or_default().to_owned()).collect();
    assert_eq!(group, ["first"], "the group can still fail over together");
}

/// A group point freezes each member whose `[app-points]` name an agent
/// (all before the cut, thawed after it), records each member's outcome
/// in its own point, and is cut even when one member's agent is silent.
#[test]
fn a_group_point_freezes_the_members_with_an_agent() {
    use tern_system_tests::qga::{Agent, Behaviour};
    let site = Site::new(&["a", "b", "c"], "4MiB");
    std::fs::create_dir(site.path("qa")).unwrap();
    std::fs::create_dir(site.path("qc")).unwrap();
    let agent_a = Agent::start(&site.path("qa"), Behaviour::Answer);
    let agent_c = Agent::start(&site.path("qc"), Behaviour::Silent);
    for (vm, agent) in [("a", &agent_a), ("c", &agent_c)] {
        let path = site.state().join(vm).join("vm.toml");
        let config = std::fs::read_to_string(&path).unwrap();
        let config = format!("{config}\n[app-points]\nfreeze = \"{}\"\nfreeze-timeout = \"2s\"\n", agent.spec());
        std::fs::write(&path, config).unwrap();
    }
    run(site.tern().args(["group", "create", "g", "a", "b", "c"]));
    let served: Vec<Served> = ["a", "b", "c"].iter().map(|vm| site.serve(vm)).collect();
    let out = run(site.tern().args(["tag", "--group", "g", "frozen"]));
    assert!(out.contains("VM 'a' application-consistent") && out.contains("VM 'c' crash-consistent only"), "{out}");
    assert_eq!(agent_a.commands(), ["guest-sync-delimited", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]);
    // --no-freeze asks no agent.
    run(site.tern().args(["tag", "--group", "g", "plain", "--no-freeze"]));
    assert_eq!(agent_a.commands().len(), 3);
    served.into_iter().for_each(|s| drop(s.stop()));
    site.ship_and_apply(&["a", "b", "c"]);
    let group = site.group_points("g");
    assert_eq!(group.len(), 2, "{group:?}");
    let frozen = group.iter().find(|g| g["label"] == "frozen").unwrap();
    let consistency =
        |vm: &str| frozen["members"].as_array().unwrap().iter().find(|m| m["vm"] == vm).unwrap()["consistency"].clone();
    assert_eq!(consistency("a"), "application", "{frozen}");
    assert_eq!(consistency("b"), "application", "no agent: as the caller quiesced it; {frozen}");
    assert_eq!(consistency("c"), "crash", "{frozen}");
    let c_points = json(&run(site.tern().args(["points", "c", "--json", "--target"]).arg(site.path("target"))));
    let c_frozen = c_points.as_array().unwrap().iter().find(|p| p["label"] == "frozen").unwrap();
    assert!(c_frozen["quiesce"]["reason"].as_str().unwrap().contains("did not answer"), "{c_frozen}");
}

/// A cut that fails after one member's tag has its place (failpoint after
/// the first reservation): that place becomes a pad, no tag; the stream
/// goes on past it, and the target has no group point and no member point.
#[test]
fn a_cut_failing_after_a_reservation_leaves_a_pad_not_a_tag() {
    let site = Site::new(&["a", "b"], "64MiB");
    run(site.tern().args(["group", "create", "g", "a", "b"]));
    let (a, b) = (site.serve("a"), site.serve("b"));
    let out = site.tern_armed("tag:group-reserved=eio").args(["tag", "--group", "g", "x"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no group point was made"), "{err}");
    for vm in ["a", "b"] {
        site.write_blocks(vm, 8, 9);
    }
    a.stop();
    b.stop();
    site.ship_and_apply(&["a", "b"]);
    assert!(site.group_points("g").is_empty());
    for vm in ["a", "b"] {
        let points = json(&run(site.tern().args(["points", vm, "--json", "--target"]).arg(site.path("target"))));
        assert!(points.as_array().unwrap().iter().all(|p| p["kind"] != "app"), "VM {vm}: {points}");
    }
    // Everything after the pad arrived: the replicas are the images.
    site.assert_replicas_are_images(&["a", "b"]);
}

/// A coordinator killed after one member's tag has its place, before it
/// was published: that member's stream stops at the unpublished tag. The
/// cut's intent, noted in the tag lock before the barrier, lets the
/// member's shipper find the dead cutter's tag there and pad it: the
/// stream goes on without a restart of `tern serve`.
#[test]
fn a_coordinator_killed_after_a_reservation_does_not_stop_the_stream() {
    let site = Site::new(&["a", "b"], "64MiB");
    run(site.tern().args(["group", "create", "g", "a", "b"]));
    let (a, b) = (site.serve("a"), site.serve("b"));
    let out = site.tern_armed("tag:group-reserved=kill").args(["tag", "--group", "g", "x"]).output().unwrap();
    assert!(!out.status.success(), "the coordinator was to die after a's reservation");
    for vm in ["a", "b"] {
        site.write_blocks(vm, 8, 5);
    }
    // `tern ship --once` with `tern serve` still running: the hole is not
    // padded by an attach; only the intent lets the shipper past it.
    for vm in ["a", "b"] {
        let out = Command::new("timeout")
            .arg("60")
            .arg(tern_bin())
            .arg("--state")
            .arg(site.state())
            .env("TERN_RING_DIR", ring_dir_of(&site.state()))
            .args(["ship", vm, "--once"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "VM {vm}: tern ship --once did not get past the dead cut's tag: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if vm == "a" {
            let log = String::from_utf8_lossy(&out.stderr);
            assert!(log.contains("padded the hole"), "{log}");
        }
    }
    a.stop();
    b.stop();
    site.ship_and_apply(&["a", "b"]);
    assert!(site.group_points("g").is_empty());
    site.assert_replicas_are_images(&["a", "b"]);
}

/// A member that cannot fail over (here: committed to a failover of its
/// own already) is found before any member is fenced: the application is
/// never left half failed over by a refusal.
#[test]
fn a_group_failover_refused_for_one_member_fences_none() {
    let site = Site::new(&["a", "b"], "64MiB");
    run(site.tern().args(["group", "create", "g", "a", "b"]));
    let (a, b) = (site.serve("a"), site.serve("b"));
    run(site.tern().args(["tag", "--group", "g", "first"]));
    a.stop();
    b.stop();
    site.ship_and_apply(&["a", "b"]);
    let target = site.path("target");
    run(site.tern().args(["failover", "b", "--latest-point", "--target"]).arg(&target));
    run(site.tern().args(["commit", "b", "--target"]).arg(&target));
    let out = site.tern().args(["failover", "--group", "g", "--target"]).arg(&target).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("nothing is failed over") && err.contains("VM 'b'"), "{err}");
    // a was not fenced: its source still ships.
    let shipped = site.tern().args(["ship", "a", "--once"]).output().unwrap();
    assert!(shipped.status.success(), "VM a was fenced: {}", String::from_utf8_lossy(&shipped.stderr));
    assert!(!target.join("a/failover/active").exists(), "VM a was failed over");
}

/// `failover --group --boot --boot-order`: the members named start first,
/// in that order, `--boot-wait` apart, the rest after; a name that is no
/// member is refused before anything is failed over.
#[test]
fn a_group_boots_in_the_order_given() {
    require("qemu-system-x86_64");
    let site = Site::new(&["a", "b", "c"], "64MiB");
    run(site.tern().args(["group", "create", "g", "a", "b", "c"]));
    let served: Vec<Served> = ["a", "b", "c"].iter().map(|vm| site.serve(vm)).collect();
    run(site.tern().args(["tag", "--group", "g", "first"]));
    served.into_iter().for_each(|s| drop(s.stop()));
    site.ship_and_apply(&["a", "b", "c"]);
    let target = site.path("target");
    let failover = |args: &[&str]| {
        site.tern()
            .args(["failover", "--group", "g", "--test", "--boot", "--json", "--target"])
            .arg(&target)
            .args(args)
            .output()
            .unwrap()
    };
    let out = failover(&["--boot-order", "c,x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("'x', which is not a member of group 'g'"), "{err}");
    assert!(!target.join("a/failover").exists(), "failed over despite the refusal");
    let out = failover(&["--boot-order", "c,b", "--boot-wait", "1s", "--name", "drill"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = json(&String::from_utf8_lossy(&out.stdout));
    let booted = v["booted"].as_array().unwrap().clone();
    // Stop every qemu before judging.
    for b in &booted {
        let pid = b["pid"].as_i64().unwrap() as i32;
        kill_qemu(pid);
    }
    let order: Vec<&str> = booted.iter().map(|b| b["vm"].as_str().unwrap()).collect();
    assert_eq!(order, ["c", "b", "a"], "{v}");
    let at = |i: usize| humantime_ms(booted[i]["started"].as_str().unwrap());
    assert!(at(1) - at(0) >= 1000 && at(2) - at(1) >= 1000, "--boot-wait 1s not kept: {v}");
}

/// SIGKILL to a qemu the test started (its launch.sh execs qemu).
fn kill_qemu(pid: i32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

/// Milliseconds since the epoch of an RFC 3339 time with milliseconds.
fn humantime_ms(t: &str) -> i64 {
    let out = Command::new("date").args(["-d", t, "+%s%3N"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// `failover --group --planned`: every member's source stops and ships
/// the rest, all waited for together, then each fails over with all it
/// wrote (nothing acknowledged is lost anywhere, so the members agree).
/// One source that does not stop in time calls it off for all: nothing
/// fenced, no request left, every source may serve again.
#[test]
fn a_planned_group_failover_loses_nothing_or_is_called_off_for_all() {
    let site = Site::new(&["a", "b"], "64MiB");
    run(site.tern().args(["group", "create", "g", "a", "b"]));
    let target = site.path("target");
    let write = |vm: &str, fill: u8| site.write_blocks(vm, 16, fill);
    // b has no shipper: its source never reports the stop.
    let (a, b) = (site.serve("a"), site.serve("b"));
    let ship_a = site.ship("a");
    write("a", 1);
    write("b", 2);
    run(site.tern().args(["ship", "b", "--once"]));
    let out = site
        .tern()
        .args(["failover", "--group", "g", "--planned", "--timeout", "3s", "--target"])
        .arg(&target)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("called off for every member"), "{err}");
    for vm in ["a", "b"] {
        let cache = site.path("cache").join(vm);
        assert!(!cache.join("fence.toml").exists(), "VM {vm} fenced");
        assert!(!cache.join("planned-failover.toml").exists(), "VM {vm}: the request was left");
    }
    // The sources stopped on the request; they serve again, both shipped.
    drop((a.stop(), b.stop(), ship_a.stop()));
    let (a, b) = (site.serve("a"), site.serve("b"));
    let (ship_a, ship_b) = (site.ship("a"), site.ship("b"));
    write("a", 3);
    write("b", 4);
    let out = run(site
        .tern()
        .args(["failover", "--group", "g", "--planned", "--timeout", "60s", "--json", "--target"])
        .arg(&target));
    let v = json(&out);
    assert_eq!(v["planned"], true, "{v}");
    for m in v["members"].as_array().unwrap() {
        let vm = m["vm"].as_str().unwrap();
        assert_files_equal(Path::new(m["disks"]["disk0"].as_str().unwrap()), &site.path(&format!("{vm}.img")));
    }
    for s in [a, b] {
        assert!(s.exited().success(), "a planned stop is a clean stop");
    }
    for s in [ship_a, ship_b] {
        assert_eq!(s.exited().code(), Some(3), "the shipper stops at the fence");
    }
    // Run again (as after a run that stopped part way): a fenced member's
    // source cannot be stopped again; the error says how to finish.
    let out = site
        .tern()
        .args(["failover", "--group", "g", "--planned", "--timeout", "5s", "--target"])
        .arg(&target)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is already failed over") && err.contains("--latest"), "{err}");
}
