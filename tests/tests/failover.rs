//! Test failover, cleanup and verify, end to end.

use std::process::Command;

use tern_system_tests::*;

fn protected_vm_with_a_tag() -> (TestVm, std::path::PathBuf) {
    let vm =
        TestVm::new(VmSpec { disk_size: 8 << 20, journal_size: "64MiB", random_content: true, ..Default::default() });
    let served = vm.serve(&[]);
    vm.ship_once();
    run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "write -P 5 1M 128k"]));
    run(vm.tern().args(["tag", &vm.name, "before-change"]));
    let at_tag = vm.dir.path().join("at-tag.img");
    std::fs::copy(&vm.image, &at_tag).expect("copy");
    run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "write -P 6 3M 128k"]));
    served.stop();
    vm.ship_once();
    (vm, at_tag)
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).expect("json")
}

#[test]
fn test_failover_from_a_point_and_from_the_latest_then_cleanup() {
    let (vm, at_tag) = protected_vm_with_a_tag();
    let cache = vm.dir.path().join("cache");
    let target = vm.dir.path().join("target");
    // --latest (the default) applies what the cache holds first: the newest write is in it.
    let latest = json(&run(vm.tern().args(["failover", &vm.name, "--test", "--json"])));
    assert_eq!(latest["name"], "test-1");
    let disk = latest["disks"]["disk0"].as_str().expect("disk path").to_string();
    assert_files_equal(std::path::Path::new(&disk), &vm.image);
    let script = std::fs::read_to_string(format!("{}/launch.sh", latest["directory"].as_str().unwrap())).unwrap();
    assert!(script.contains("-nic none") && script.contains(&disk), "{script}");
    // From the app point: the disk as it was at the tag.
    let points = vm.points(&target);
    let app = points.iter().find(|p| p["kind"] == "app").expect("app point");
    let from_tag = json(&run(vm.tern().args([
        "failover",
        &vm.name,
        "--test",
        "--point",
        app["id"].as_str().unwrap(),
        "--name",
        "drill",
        "--json",
    ])));
    let drill_disk = std::path::PathBuf::from(from_tag["disks"]["disk0"].as_str().unwrap());
    assert_files_equal(&drill_disk, &at_tag);
    // The test VM writes to its disk: the point and the replica do not change.
    std::fs::write(&drill_disk, vec![0xab; 8 << 20]).expect("scribble");
    let app_disk = std::path::PathBuf::from(app["disks"]["disk0"].as_str().unwrap());
    assert_files_equal(&app_disk, &at_tag);
    run(vm.tern().args(["verify", &vm.name]));
    // Names are checked; cleanup removes exactly one.
    let out = vm.tern().args(["failover", &vm.name, "--test", "--name", "drill"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("exists"));
    run(vm.tern().args(["failover-cleanup", &vm.name, "drill"]));
    assert!(!drill_disk.exists());
    assert!(std::path::Path::new(&disk).exists(), "test-1 stays");
    let out = vm.tern().args(["failover-cleanup", &vm.name, "nope"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no failover named 'nope'") && err.contains("test-1"), "{err}");
    // A point that does not exist, and a real failover (not in this build).
    let out = vm.tern().args(["failover", &vm.name, "--test", "--point", "999999"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no point '999999'"));
    let _ = cache;
}

#[test]
fn verify_finds_a_single_flipped_byte() {
    let (vm, _) = protected_vm_with_a_tag();
    run(vm.tern().args(["failover", &vm.name, "--test"]));
    run(vm.tern().args(["verify", &vm.name]));
    let replica = vm.dir.path().join("target/vm1/replica/disk0.img");
    let mut bytes = std::fs::read(&replica).expect("replica");
    bytes[5 * 65536 + 1234] ^= 1;
    std::fs::write(&replica, bytes).expect("flip");
    let out = vm.tern().args(["verify", &vm.name]).output().expect("verify");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "a flipped byte must fail verify");
    assert!(text.contains(&format!("differs at {}..{}", 5 * 65536, 6 * 65536)), "{text}");
    // A point is compared the same way, and is still intact.
    let points = vm.points(&vm.dir.path().join("target"));
    let newest = points.iter().max_by_key(|p| p["seq"].as_u64()).expect("a point");
    run(vm.tern().args(["verify", &vm.name, "--point", newest["id"].as_str().unwrap()]));
}

#[test]
fn status_tells_paused_from_protected_and_exits_non_zero_when_unhealthy() {
    let vm =
        TestVm::new(VmSpec { disk_size: 8 << 20, journal_size: "64MiB", random_content: true, ..Default::default() });
    // Enabled, nothing shipped, no shipper: paused, critical (exit 2).
    let out = vm.tern().args(["status", &vm.name, "--json"]).output().expect("status");
    assert_eq!(out.status.code(), Some(2), "a paused VM is critical");
    let s = &json(&String::from_utf8_lossy(&out.stdout))[0];
    assert_eq!(s["state"], "paused", "{s}");
    assert!(s["dirty_bytes"].as_u64().unwrap() > 0, "{s}");
    for field in ["name", "state", "rpo_seconds", "journal_fill", "pending_bytes", "last_point_age_seconds"] {
        assert!(s.get(field).is_some(), "status --json lacks {field}: {s}");
    }
    // Shipped and applied: protected, RPO 0, a point, healthy.
    vm.ship_once();
    let out = vm.apply_with(&vm.dir.path().join("cache"), &vm.dir.path().join("target"), &[], &[]);
    assert!(out.status.success());
    let s = &json(&run(vm.tern().args(["status", "--json"])))[0];
    assert_eq!(s["state"], "protected", "{s}");
    assert_eq!(s["rpo_seconds"], 0.0, "{s}");
    assert!(s["last_point_age_seconds"].as_f64().is_some(), "{s}");
    let text = run(vm.tern().args(["status"]));
    assert!(text.starts_with("vm1: protected · RPO 0s"), "{text}");
    // The target's view: applied, nothing waiting, a point, ok.
    let target = vm.dir.path().join("target");
    let cache = vm.dir.path().join("cache");
    let t = run(Command::new(tern_bin()).arg("status").arg("--target").arg(&target).arg("--cache").arg(&cache));
    assert!(t.starts_with("vm1: ok · applied seq ") && t.contains("0 records waiting in the cache"), "{t}");
    // A write shipped and not applied, no applier: a warning (exit 1).
    let served = vm.serve(&[]);
    run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "write -P 3 0 64k"]));
    served.stop();
    vm.ship_once();
    let out = Command::new(tern_bin())
        .arg("status")
        .arg("--target")
        .arg(&target)
        .arg("--cache")
        .arg(&cache)
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("vm1: warning") && t.contains("1 records waiting") && t.contains("apply stopped"), "{t}");
}

/// Issue 18 (item 6): `tern status` said `protected`, exit 0, when nothing
/// had ever reached the target. Protected means a recovery point exists.
#[test]
fn status_is_unprotected_and_critical_until_a_point_exists() {
    let vm = TestVm::new(VmSpec { disk_size: 4 << 20, journal_size: "16MiB", ..Default::default() });
    // An empty disk: nothing to sync, the shipper running and idle, no
    // applier: nothing recoverable at the target.
    let ship = vm.ship(&[]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = vm.tern().args(["status", &vm.name]).output().expect("status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.starts_with("vm1: unprotected · RPO -"), "{text}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vm1 (critical: no recovery point at the target yet)"), "{err}");
    drop(ship);
    let t = Command::new(tern_bin()).arg("status").arg("--target").arg(vm.dir.path().join("target")).output().unwrap();
    assert_eq!(t.status.code(), Some(0), "no replica there yet: nothing to judge");
    assert!(String::from_utf8_lossy(&t.stdout).contains("no replicas in"));
}

#[test]
fn failover_while_the_source_still_ships_fences_it_and_applies_nothing_after() {
    let vm =
        TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "64MiB", random_content: true, ..Default::default() });
    let served = vm.serve(&[]);
    let ship = vm.ship(&[]);
    // The source keeps writing and shipping while the target fails over.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let fio = Command::new("fio")
        .args([
            "--name=busy",
            "--ioengine=nbd",
            &format!("--uri={}", vm.uri("disk0")),
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=4",
            "--rate=20m",
            "--time_based",
            "--runtime=30",
            "--size=16m",
            "--thread",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("fio");
    let fio = KillOnDrop(fio);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let out = json(&run(vm.tern().args(["failover", &vm.name, "--json"])));
    assert_eq!(out["test"], false);
    let seq = out["seq"].as_u64().expect("seq");
    let disk = std::path::PathBuf::from(out["disks"]["disk0"].as_str().unwrap());
    // The shipper sees the fence and stops with exit status 3.
    let mut ship = ship;
    let status = {
        let start = std::time::Instant::now();
        loop {
            if let Some(s) = ship.child.try_wait().expect("wait") {
                break s;
            }
            assert!(start.elapsed() < std::time::Duration::from_secs(30), "tern ship did not stop when fenced");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    assert_eq!(status.code(), Some(3), "fenced shipper exit status");
    let log = std::fs::read_to_string(vm.dir.path().join("ship.log")).unwrap();
    assert!(log.contains("this source is fenced"), "{log}");
    drop(fio);
    served.stop();
    // Nothing the old source ships afterwards is applied.
    let checkpoint = || std::fs::read_to_string(vm.dir.path().join("target/vm1/replica/checkpoint.toml")).unwrap();
    let before = checkpoint();
    let out = vm.tern().args(["ship", &vm.name, "--once"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "a fenced source refuses to ship");
    let out = vm.apply_with(&vm.dir.path().join("cache"), &vm.dir.path().join("target"), &[], &[]);
    assert!(out.status.success());
    assert_eq!(checkpoint(), before, "a fenced VM's replica does not move");
    // The failed-over disk is the point's (whose exactness the apply tests
    // prove against the cache oracle).
    let points = vm.points(&vm.dir.path().join("target"));
    let chosen = points.iter().find(|p| p["seq"].as_u64() == Some(seq)).expect("the failover's point");
    assert_files_equal(&disk, &std::path::PathBuf::from(chosen["disks"]["disk0"].as_str().unwrap()));
    let status = json(&String::from_utf8_lossy(&vm.tern().args(["status", "--json"]).output().unwrap().stdout));
    assert_eq!(status[0]["state"], "failed-over-uncommitted");
    // Before commit another point may be chosen; after, not.
    let other = points.iter().find(|p| p["seq"].as_u64() != Some(seq)).expect("an earlier point");
    run(vm.tern().args(["failover", &vm.name, "--point", other["id"].as_str().unwrap()]));
    assert_files_equal(&disk, &std::path::PathBuf::from(other["disks"]["disk0"].as_str().unwrap()));
    run(vm.tern().args(["commit", &vm.name]));
    let out = vm.tern().args(["failover", &vm.name]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("committed"));
    let out = vm.tern().args(["failover-cleanup", &vm.name, "active"]).output().unwrap();
    assert!(!out.status.success(), "the real failover is not a test to clean up");
}

#[test]
fn failover_boot_starts_qemu_on_the_failed_over_disk_and_reprotect_waits_for_it_to_stop() {
    require("qemu-system-x86_64");
    let (vm, _) = protected_vm_with_a_tag();
    let root = vm.dir.path();
    let out = json(&run(vm.tern().args(["failover", &vm.name, "--boot", "--json"])));
    let dir = std::path::PathBuf::from(out["directory"].as_str().unwrap());
    let disk = out["disks"]["disk0"].as_str().unwrap().to_string();
    let pid: i32 = std::fs::read_to_string(dir.join("qemu.pid")).expect("qemu.pid").trim().parse().expect("pid");
    struct Qemu(i32);
    impl Drop for Qemu {
        fn drop(&mut self) {
            let _ = Command::new("kill").arg("-9").arg(self.0.to_string()).status();
        }
    }
    let qemu = Qemu(pid);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("qemu runs");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("qemu-system-x86_64") && cmdline.contains(&disk), "{cmdline}");
    assert!(cmdline.contains("-nic none"), "isolated by default: {cmdline}");
    run(vm.tern().args(["commit", &vm.name]));
    for d in ["cache2", "target2"] {
        std::fs::create_dir(root.join(d)).unwrap();
    }
    let reprotect = || {
        let mut c = tern_with_state(&root.join("state-b"));
        c.args(["reprotect", &vm.name, "--cache"])
            .arg(root.join("cache2"))
            .arg("--target")
            .arg(root.join("target2"))
            .arg("--from-target")
            .arg(root.join("target"))
            .arg("--from-cache")
            .arg(root.join("cache"));
        c
    };
    let out = reprotect().output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&format!("qemu pid {pid}")), "{err}");
    drop(qemu);
    std::thread::sleep(std::time::Duration::from_millis(500));
    run(&mut reprotect());
}

#[test]
fn a_full_target_is_reported_with_what_to_do() {
    let vm =
        TestVm::new(VmSpec { disk_size: 32 << 20, journal_size: "64MiB", random_content: true, ..Default::default() });
    vm.ship_once();
    let target = vm.dir.path().join("small-target");
    let _fs = mount_loop_fs("ext4", &vm.dir.path().join("small.fs"), &target, 16);
    let out = vm.apply_with(&vm.dir.path().join("cache"), &target, &[], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "applying 32 MiB onto a 16 MiB filesystem must fail");
    assert!(err.contains("No space left on device") && err.contains("filesystem named above is full"), "{err}");
    assert!(err.contains(&target.display().to_string()), "the error names the path: {err}");
}

/// `tern disable` refuses while the VM is served or the replica lacks
/// writes, then frees the journal's ring and the VM's state, and keeps the
/// disk, the cache and the target's points.
#[test]
fn disable_refuses_while_served_or_behind_then_frees_the_ring_and_keeps_the_replica() {
    let (vm, _) = protected_vm_with_a_tag();
    let target = vm.dir.path().join("target");
    run(vm
        .tern()
        .arg("apply")
        .arg("--cache")
        .arg(vm.dir.path().join("cache"))
        .arg("--target")
        .arg(&target)
        .arg("--once"));
    let points_before = vm.points(&target).len();
    assert!(points_before > 0);
    let disable =
        |extra: &[&str]| vm.tern().args(["disable", &vm.name]).args(extra).output().expect("run tern disable");

    let served = vm.serve(&[]);
    let out = disable(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("stop `tern serve`"), "{err}");
    run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "write -P 7 0 64k"]));
    served.stop();

    // A write the replica never got: refused without --force, naming it.
    let out = disable(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("journaled and not shipped") && err.contains("--force"), "{err}");
    assert!(vm.state.join(&vm.name).join("vm.toml").exists(), "a refused disable removes nothing");

    vm.ship_once();
    let rings = || {
        std::fs::read_dir(vm.ring_dir())
            .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".ring")).count())
            .unwrap_or(0)
    };
    assert_eq!(rings(), 1, "the VM's ring is in memory");
    let out = run(vm.tern().args(["disable", &vm.name]));
    assert!(out.contains(&format!("disabled VM '{}'", vm.name)), "{out}");
    assert_eq!(rings(), 0, "the ring is freed");
    assert!(!vm.state.join(&vm.name).exists(), "the state is gone");
    assert!(std::fs::read(&vm.image).expect("disk")[..65536].iter().all(|&b| b == 7), "the disk is untouched");
    assert!(vm.cache_dir().exists(), "the cache is kept");
    assert_eq!(vm.points(&target).len(), points_before, "the points are kept");
    let out = vm.tern().args(["status", &vm.name]).output().expect("status");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not enabled"), "{out:?}");
}

/// Issue 17: a failover killed at each of its I/O edges leaves no half
/// directory a later one trips on, and running it again finishes it.
#[test]
fn a_failover_killed_at_each_step_is_finished_by_running_it_again() {
    let (vm, at_tag) = protected_vm_with_a_tag();
    let target = vm.dir.path().join("target");
    assert!(vm.apply_with(&vm.dir.path().join("cache"), &target, &[], &[]).status.success());
    let app = vm.points(&target).into_iter().find(|p| p["kind"] == "app").expect("app point");
    let app_id = app["id"].as_str().expect("id").to_owned();
    let failover = |test: bool, armed: Option<&str>| {
        let env: Vec<(&str, &str)> = armed.map(|a| ("TERN_FAILPOINTS", a)).into_iter().collect();
        let mut c = vm.tern_env(&env);
        c.args(["failover", &vm.name, "--point", &app_id, "--json"]);
        if test {
            c.args(["--test", "--name", "drill"]);
        }
        c.output().expect("tern failover")
    };
    use std::os::unix::process::ExitStatusExt;
    let failovers = target.join("vm1/failover");
    for (test, point) in
        [(true, "failover:disks-cloned"), (false, "failover:fence-write"), (false, "failover:disks-cloned")]
    {
        let out = failover(test, Some(&format!("{point}=kill")));
        assert_eq!(out.status.signal(), Some(9), "{point}: {}", String::from_utf8_lossy(&out.stderr));
        let named = failovers.join(if test { "drill" } else { "active" });
        assert!(!named.exists(), "{point}: a killed failover left {} as if complete", named.display());
        let out = failover(test, None);
        assert!(out.status.success(), "{point}: the rerun failed: {}", String::from_utf8_lossy(&out.stderr));
        let f: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_files_equal(std::path::Path::new(f["disks"]["disk0"].as_str().expect("disk")), &at_tag);
        let leftovers: Vec<_> = std::fs::read_dir(&failovers)
            .expect("failover dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{point}: {leftovers:?}");
        if test {
            run(vm.tern().args(["failover-cleanup", &vm.name, "drill"]));
        }
    }
    assert!(vm.cache_dir().join("fence.toml").exists(), "the real failover fenced the source");
}

/// Issue 18 (item 1): with `tern ship` and `tern apply` running, a write
/// acknowledged and already in the replica was missing from `failover
/// --latest`, which took the newest periodic point (up to an interval
/// old). --latest asks the running applier for a point at the newest
/// applied state; --latest-point keeps the fast choice.
#[test]
fn latest_holds_a_write_already_applied_while_apply_runs_and_latest_point_does_not() {
    use std::time::{Duration, Instant};
    let vm =
        TestVm::new(VmSpec { disk_size: 8 << 20, journal_size: "64MiB", random_content: true, ..Default::default() });
    let target = vm.dir.path().join("target");
    let served = vm.serve(&[]);
    let ship = vm.ship(&[]);
    let apply = vm.apply_daemon(&[]);
    let status = || json(&String::from_utf8_lossy(&vm.tern().args(["status", "--json"]).output().unwrap().stdout));
    let caught_up = |what: &str| {
        let start = Instant::now();
        loop {
            let s = &status()[0];
            if s["applied_seq"].as_u64().is_some_and(|a| Some(a) >= s["head_seq"].as_u64()) && s["points"] != 0 {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "{what}: not applied within 60 s: {s}\n{}", apply.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    caught_up("the initial sync");
    // Acknowledged and flushed (qemu-io flushes as it exits), then applied:
    // RPO 0, but no point holds it (the interval is 5 minutes).
    run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "write -P 7 2M 64k", "-c", "flush"]));
    caught_up("the write");
    let newest_point = vm.points(&target).iter().map(|p| p["seq"].as_u64().unwrap()).max().unwrap();

    let latest = json(&run(vm.tern().args(["failover", &vm.name, "--test", "--json"])));
    assert_files_equal(std::path::Path::new(latest["disks"]["disk0"].as_str().unwrap()), &vm.image);
    assert!(latest["seq"].as_u64().unwrap() > newest_point, "a new point at the applied state: {latest}");
    let log = apply.log();
    assert!(log.contains("answered a point request with point"), "{log}");

    let fast = json(&run(vm.tern().args(["failover", &vm.name, "--test", "--latest-point", "--json"])));
    assert_eq!(fast["point"], latest["point"], "the point --latest took is now the newest");
    // Another write: --latest-point does not wait for it.
    run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "write -P 8 4M 64k", "-c", "flush"]));
    caught_up("the second write");
    let fast = json(&run(vm.tern().args(["failover", &vm.name, "--test", "--latest-point", "--json"])));
    assert_eq!(fast["point"], latest["point"], "--latest-point takes no new point");
    let disk = std::fs::read(fast["disks"]["disk0"].as_str().unwrap()).unwrap();
    assert!(disk[4 << 20..(4 << 20) + 65536].iter().any(|&b| b != 8), "the second write is not in it");
    let latest = json(&run(vm.tern().args(["failover", &vm.name, "--test", "--latest", "--json"])));
    assert_files_equal(std::path::Path::new(latest["disks"]["disk0"].as_str().unwrap()), &vm.image);
    let out = vm.tern().args(["failover", &vm.name, "--test", "--latest", "--latest-point"]).output().unwrap();
    assert!(!out.status.success(), "--latest and --latest-point conflict");
    drop(ship);
    drop(served);
    drop(apply);
}

/// Issue 18 (item 3): running `tern failover` again before `tern commit`
/// replaced the disk under the failed-over VM, which went on writing to a
/// deleted file. It is refused while a process holds the disk, naming it.
#[test]
fn failover_again_is_refused_while_the_failed_over_disk_is_in_use() {
    require("qemu-io");
    let (vm, _) = protected_vm_with_a_tag();
    let first = json(&run(vm.tern().args(["failover", &vm.name, "--json"])));
    let disk = first["disks"]["disk0"].as_str().unwrap().to_string();
    // The failed-over VM: qemu-io holding the disk open, read-write.
    let qemu = hold_open(&disk);
    let tag = vm.points(&vm.dir.path().join("target")).iter().find(|p| p["kind"] == "app").unwrap()["id"].clone();
    let out = vm.tern().args(["failover", &vm.name, "--point", tag.as_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused while in use: {err}");
    assert!(err.contains(&format!("pid {} (qemu-io)", qemu.0.id())) && err.contains("shut it down"), "{err}");
    let fence = std::fs::read_to_string(vm.cache_dir().join("fence.toml")).unwrap();
    assert!(fence.contains(first["point"].as_str().unwrap()), "the fence still names the first point: {fence}");
    assert!(std::path::Path::new(&disk).exists(), "the disk in use stays");
    drop(qemu);
    let again = json(&run(vm.tern().args(["failover", &vm.name, "--point", tag.as_str().unwrap(), "--json"])));
    assert_eq!(again["point"], tag);
}

/// Whether process `pid` holds `path` open.
fn has_open(pid: u32, path: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == path)))
        .unwrap_or(false)
}

/// Issue 18 (item 4): after a real failover a quiet source's `tern ship`
/// ran on for over a minute, `tern serve` took writes that were then lost
/// without a word, and started again on the fenced site. Ship now stops
/// (exit 3) within seconds, writes get an error the client sees, and serve
/// refuses to start, saying what to do.
#[test]
fn a_fenced_source_stops_shipping_within_seconds_refuses_writes_and_serve() {
    use std::time::{Duration, Instant};
    let (vm, _) = protected_vm_with_a_tag();
    let served = vm.serve(&[]);
    let mut ship = vm.ship(&[]);
    std::thread::sleep(Duration::from_millis(500));
    run(vm.tern().args(["failover", &vm.name]));
    let fenced_at = Instant::now();
    let status = loop {
        if let Some(s) = ship.child.try_wait().expect("wait") {
            break s;
        }
        assert!(fenced_at.elapsed() < Duration::from_secs(10), "a quiet tern ship did not stop when fenced");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(3), "fenced shipper exit status");
    // Within the fence check's second, the front-end refuses writes.
    let refused = loop {
        let out =
            Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "write -P 9 0 4k"]).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if text.contains("Operation not permitted") {
            break text;
        }
        assert!(fenced_at.elapsed() < Duration::from_secs(10), "writes are still taken: {text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(refused.contains("write failed"), "{refused}");
    // Reads go on: the VM can shut down.
    run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "read 0 4k"]));
    let log = served.stop();
    assert!(log.contains("is fenced: it failed over at the target site to point"), "{log}");
    let out = vm.tern().args(["serve", &vm.name]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is fenced") && err.contains("tern failback"), "{err}");
}

/// Issue 18 (item 10): a planned failover (a switchover) loses nothing: the
/// source's `tern serve` stops taking writes and exits, its `tern ship`
/// ships the rest, and the failed-over disk is the source byte for byte.
#[test]
fn a_planned_failover_stops_the_source_and_loses_nothing() {
    let vm =
        TestVm::new(VmSpec { disk_size: 8 << 20, journal_size: "64MiB", random_content: true, ..Default::default() });
    vm.ship_once();
    // Without a running shipper the source never answers: called off after
    // the timeout (its stop recorded before the request does not count),
    // and the source may serve again.
    let out = vm.tern().args(["failover", &vm.name, "--planned", "--timeout", "1s"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("did not stop and ship everything") && err.contains("called off"),
        "{err}"
    );
    assert!(!vm.cache_dir().join("planned-failover.toml").exists());
    assert!(!vm.cache_dir().join("fence.toml").exists(), "nothing fenced");

    let mut served = vm.serve(&[]);
    let mut ship = vm.ship(&[]);
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &vm.uri("disk0"),
        "-c",
        "write -P 7 1M 256k",
        "-c",
        "write -P 8 5M 64k",
    ]));
    let out = json(&run(vm.tern().args(["failover", &vm.name, "--planned", "--json"])));
    assert_eq!(out["planned"], true);
    let disk = out["disks"]["disk0"].as_str().unwrap().to_string();
    // Everything the source wrote, and it stopped cleanly on its own.
    assert_files_equal(std::path::Path::new(&disk), &vm.image);
    let status = exits_within(&mut served.child, 10).expect("tern serve exits on a planned failover");
    assert!(status.success(), "a clean stop: {}", served.log());
    assert!(served.log().contains("a planned failover was requested"), "{}", served.log());
    let status = exits_within(&mut ship.child, 10).expect("tern ship stops at the fence");
    assert_eq!(status.code(), Some(3));
    assert!(!vm.cache_dir().join("planned-failover.toml").exists(), "the fence replaces the request");
    let out = vm.tern().args(["serve", &vm.name]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("is fenced"));
}

/// The child's exit status, if it exits within `secs`.
fn exits_within(child: &mut std::process::Child, secs: u64) -> Option<std::process::ExitStatus> {
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(secs) {
        if let Some(s) = child.try_wait().expect("wait") {
            return Some(s);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    None
}

/// The shipper publishes the manifest before its first segment: a failover
/// in between took a crash point "0" of the still empty replica, a disk
/// the VM never had. The manifest now says the stream starts with an
/// initial sync, and no point is taken before it is applied; a VM whose
/// disks were empty at enable still has its point 0.
#[test]
fn no_point_is_taken_of_a_replica_the_initial_sync_has_not_reached() {
    let vm =
        TestVm::new(VmSpec { disk_size: 8 << 20, journal_size: "64MiB", random_content: true, ..Default::default() });
    vm.ship_killed_at("ship:segment-written=kill@1");
    let manifest = std::fs::read_to_string(vm.cache_dir().join("manifest.toml")).expect("the manifest is there");
    assert!(manifest.contains("starts-in-window = true"), "{manifest}");
    let out = vm.tern().args(["failover", &vm.name, "--test", "--latest"]).output().expect("failover");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("inside a resync window at seq 0"), "{err}");
    assert!(!vm.dir.path().join("target/vm1/failover").exists(), "nothing failed over");
    // Once the initial sync is there, the point is the source's data.
    vm.ship_once();
    let j = json(&run(vm.tern().args(["failover", &vm.name, "--test", "--latest", "--json"])));
    let disk = j["disks"]["disk0"].as_str().expect("a disk").to_string();
    assert_files_equal(&vm.image, std::path::Path::new(&disk));

    let empty = TestVm::new(VmSpec { disk_size: 4 << 20, journal_size: "16MiB", ..Default::default() });
    empty.ship_once();
    let manifest = std::fs::read_to_string(empty.cache_dir().join("manifest.toml")).expect("manifest");
    assert!(!manifest.contains("starts-in-window"), "{manifest}");
    run(empty.tern().args(["failover", &empty.name, "--test", "--latest"]));
}

/// The id of the app point `protected_vm_with_a_tag` tagged, applied first.
fn applied_app_point(vm: &TestVm) -> String {
    let target = vm.dir.path().join("target");
    let out = vm.apply_with(&vm.dir.path().join("cache"), &target, &[], &[]);
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
    let points = vm.points(&target);
    let app = points.iter().find(|p| p["kind"] == "app").expect("app point");
    app["id"].as_str().expect("id").to_owned()
}

/// Waits (20 s at most) until the failpoints log `log` says `point` fired:
/// the process is caught there (a `delay`).
fn wait_for_failpoint(log: &std::path::Path, point: &str) {
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(log).unwrap_or_default().contains(point) {
        assert!(start.elapsed() < std::time::Duration::from_secs(20), "{point} never fired");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Issue 19 (#5): a real failover killed after it fenced the source and
/// before its disks were in `failover/active` let `tern commit` say the VM
/// "runs from" that missing directory; the committed fence then refused
/// the failover that would have finished it, and re-protect. Commit now
/// refuses until `failover/active` holds the fence's point, saying how to
/// finish.
#[test]
fn commit_refuses_a_failover_that_did_not_finish_and_says_how_to_finish_it() {
    use std::os::unix::process::ExitStatusExt;
    let (vm, _) = protected_vm_with_a_tag();
    let app = applied_app_point(&vm);
    let active = vm.dir.path().join("target/vm1/failover/active");
    let out = vm
        .tern_env(&[("TERN_FAILPOINTS", "failover:disks-cloned=kill")])
        .args(["failover", &vm.name, "--point", &app])
        .output()
        .expect("tern failover");
    assert_eq!(out.status.signal(), Some(9), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!active.exists(), "the killed failover's disks are not in {}", active.display());
    let out = vm.tern().args(["commit", &vm.name]).output().expect("tern commit");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "committed a failover that did not finish: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        err.contains("nothing is committed") && err.contains(&format!("`tern failover vm1 --point {app}`")),
        "{err}"
    );
    let fence = std::fs::read_to_string(vm.cache_dir().join("fence.toml")).expect("fence");
    assert!(fence.contains("committed = false"), "{fence}");
    // What it advises finishes the failover, and the commit then stands.
    run(vm.tern().args(["failover", &vm.name, "--point", &app]));
    let out = run(vm.tern().args(["commit", &vm.name]));
    assert!(out.contains(&format!("failover to point {app} ")) && out.contains("committed"), "{out}");
}

/// Issue 19 (#4): a second `tern failover` found the failed-over VM
/// started on `failover/active` only after it had fenced at its new
/// point; it refused, advising `tern commit`, which then certified the new
/// point while the VM ran from the old one. A failover refused leaves the
/// fence as it found it.
#[test]
fn a_failover_refused_because_the_vm_started_meanwhile_leaves_the_fence_as_it_was() {
    require("qemu-io");
    let (vm, _) = protected_vm_with_a_tag();
    let app = applied_app_point(&vm);
    let first = json(&run(vm.tern().args(["failover", &vm.name, "--json"])));
    let first_point = first["point"].as_str().expect("point").to_owned();
    assert_ne!(first_point, app);
    let disk = first["disks"]["disk0"].as_str().expect("disk").to_owned();
    // Caught just before it writes the fence; the VM starts meanwhile.
    let log = vm.dir.path().join("failpoints.log");
    let again = vm
        .tern_env(&[("TERN_FAILPOINTS", "failover:fence-write=delay:3000")])
        .env("TERN_FAILPOINTS_LOG", &log)
        .args(["failover", &vm.name, "--point", &app])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tern failover");
    wait_for_failpoint(&log, "failover:fence-write");
    let qemu = hold_open(&disk);
    let out = again.wait_with_output().expect("tern failover");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is in use by"), "{err}");
    let fence = std::fs::read_to_string(vm.cache_dir().join("fence.toml")).expect("fence");
    assert!(fence.contains(&format!("point = \"{first_point}\"")), "the fence names the point the VM runs: {fence}");
    let out = run(vm.tern().args(["commit", &vm.name]));
    assert!(out.contains(&format!("failover to point {first_point} ")), "{out}");
    drop(qemu);
}

/// Issue 19 (#6): two `tern failover` runs of one VM at once shared their
/// temporary directory: one reported its point with the other's disks. A
/// second run is refused while the first holds the VM, naming it.
#[test]
fn a_second_failover_of_a_vm_while_one_runs_is_refused_naming_the_first() {
    let (vm, at_tag) = protected_vm_with_a_tag();
    let app = applied_app_point(&vm);
    let log = vm.dir.path().join("failpoints.log");
    let first = vm
        .tern_env(&[("TERN_FAILPOINTS", "failover:disks-cloned=delay:6000")])
        .env("TERN_FAILPOINTS_LOG", &log)
        .args(["failover", &vm.name, "--test", "--point", &app, "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tern failover");
    wait_for_failpoint(&log, "failover:disks-cloned");
    let out = vm.tern().args(["failover", &vm.name, "--test", "--latest-point"]).output().expect("tern failover");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second failover ran beside the first: {}", String::from_utf8_lossy(&out.stdout));
    assert!(err.contains("another `tern failover`") && err.contains(&format!("pid {}", first.id())), "{err}");
    let out = first.wait_with_output().expect("tern failover");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let f = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(f["point"], app.as_str());
    assert_files_equal(std::path::Path::new(f["disks"]["disk0"].as_str().expect("disk")), &at_tag);
}

/// Issue 19 (#7): `tern commit` while a second `tern failover` ran was
/// undone when that failover wrote the fence it had read before: the VM
/// uncommitted, at another point. Commit is refused while a failover
/// runs, and the failover's point is committed after it.
#[test]
fn commit_while_a_failover_runs_is_refused_and_not_undone() {
    let (vm, _) = protected_vm_with_a_tag();
    let app = applied_app_point(&vm);
    run(vm.tern().args(["failover", &vm.name]));
    let log = vm.dir.path().join("failpoints.log");
    let again = vm
        .tern_env(&[("TERN_FAILPOINTS", "failover:fence-write=delay:6000")])
        .env("TERN_FAILPOINTS_LOG", &log)
        .args(["failover", &vm.name, "--point", &app])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tern failover");
    wait_for_failpoint(&log, "failover:fence-write");
    let out = vm.tern().args(["commit", &vm.name]).output().expect("tern commit");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "committed while a failover ran: {}", String::from_utf8_lossy(&out.stdout));
    assert!(err.contains("another `tern failover`") && err.contains(&format!("pid {}", again.id())), "{err}");
    let out = again.wait_with_output().expect("tern failover");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(vm.tern().args(["commit", &vm.name]));
    assert!(out.contains(&format!("failover to point {app} ")), "{out}");
    let fence = std::fs::read_to_string(vm.cache_dir().join("fence.toml")).expect("fence");
    assert!(fence.contains("committed = true") && fence.contains(&format!("point = \"{app}\"")), "{fence}");
}

/// Issue 19 (#9): launch.sh attached the disks in name order, so a VM
/// enabled with `--disk root=… --disk data=…` booted from `data`. They are
/// attached in the VM's order, the first its boot disk.
#[test]
fn launch_sh_attaches_the_disks_in_the_vms_order() {
    let dir = tempfile::Builder::new().prefix("tern-test-").tempdir_in(test_root()).expect("tempdir");
    let state = dir.path().join("state");
    for site in ["cache", "target"] {
        std::fs::create_dir(dir.path().join(site)).expect("site");
    }
    for disk in ["root", "data"] {
        std::fs::File::create(dir.path().join(format!("{disk}.img"))).and_then(|f| f.set_len(4 << 20)).expect("image");
    }
    run(tern_with_state(&state)
        .args(["enable", "vm1", "--cache"])
        .arg(dir.path().join("cache"))
        .arg("--target")
        .arg(dir.path().join("target"))
        .arg("--disk")
        .arg(format!("root={}", dir.path().join("root.img").display()))
        .arg("--disk")
        .arg(format!("data={}", dir.path().join("data.img").display()))
        .args(["--journal-size", "16MiB"]));
    run(tern_with_state(&state).args(["ship", "vm1", "--once"]));
    let f = json(&run(tern_with_state(&state).args(["failover", "vm1", "--test", "--json"])));
    let script =
        std::fs::read_to_string(format!("{}/launch.sh", f["directory"].as_str().expect("dir"))).expect("script");
    let drives: Vec<&str> = script.lines().filter(|l| l.contains("-drive")).collect();
    assert_eq!(drives.len(), 2, "{script}");
    assert!(drives[0].contains("/root.img,") && drives[1].contains("/data.img,"), "root first: {script}");
}

/// A process holding `disk` open read-write (qemu-io), as a failed-over
/// VM would; killed when dropped. Returns once it has the disk open.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn hold_open(disk: &str) -> Running {
    let qemu = Running(
        Command::new("qemu-io")
            .args(["-f", "raw", disk, "-c", "sleep 60000"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("qemu-io"),
    );
    let start = std::time::Instant::now();
    while !has_open(qemu.0.id(), disk) {
        assert!(start.elapsed() < std::time::Duration::from_secs(20), "qemu-io never opened {disk}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    qemu
}
