//! Re-protect and failback, end to end: fail over, change both sides,
//! replicate back sending only the differing regions, fail back, and the
//! original direction runs again — again sending only what differs. And
//! the same seeding for a first protection (`tern enable --seed`), from a
//! copy of the disk carried to the target by other means.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tern_system_tests::*;

const REGION: u64 = 64 << 10;

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).expect("json")
}

fn qemu_io(uri: &str, cmds: &[String]) {
    let mut io = Command::new("qemu-io");
    io.args(["-f", "raw", uri]);
    for c in cmds {
        io.args(["-c", c]);
    }
    run(&mut io);
}

/// Bytes of resync records in a cache's segments (what a checksum
/// comparison decided to send).
fn resync_bytes(tern: impl Fn() -> Command, cache_vm: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(cache_vm.join("segments")).expect("segments") {
        let path = e.expect("entry").path();
        if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
            continue;
        }
        let dump = run(tern().args(["segment", "dump"]).arg(&path));
        for line in dump.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.contains(&"resync") {
                let at = words.iter().position(|w| *w == "length").expect("length column");
                total += words[at + 1].parse::<u64>().expect("length");
            }
        }
    }
    total
}

/// A `tern` command on another site's state directory.
fn tern_at(state: &Path) -> Command {
    tern_with_state(state)
}

/// `tern reprotect` with the failover's sites given and dummy new ones: for
/// what it refuses before it looks at those.
fn reprotect_to_nowhere(vm: &TestVm, from_target: &Path, from_cache: &Path) -> std::process::Output {
    vm.tern()
        .args(["reprotect", &vm.name, "--cache", "nowhere", "--target", "nowhere", "--from-target"])
        .arg(from_target)
        .arg("--from-cache")
        .arg(from_cache)
        .output()
        .expect("tern reprotect")
}

fn apply_daemon(cache: &Path, target: &Path, log: &Path) -> std::process::Child {
    Command::new(tern_bin())
        .args(["apply", "--keep-segments", "--cache"])
        .arg(cache)
        .arg("--target")
        .arg(target)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("tern apply")
}

fn stop(mut child: std::process::Child) {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
}

#[test]
fn reprotect_sends_only_what_differs_and_failback_restores_the_original_direction() {
    let vm =
        TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "64MiB", random_content: true, ..Default::default() });
    let root = vm.dir.path().to_owned();
    let (cache, target) = (root.join("cache"), root.join("target"));
    // Site A's app points freeze the guest: a site-local setting that the
    // failback must keep.
    let config_path = vm.state.join("vm1/vm.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(&config_path, format!("{config}\n[app-points]\nfreeze = \"qga:/run/vm1/qga.sock\"\n")).unwrap();
    // Site A protects vm1 towards site B.
    let served = vm.serve(&[]);
    vm.ship_once();
    assert!(vm.apply_with(&cache, &target, &[], &[]).status.success());

    // Site A writes regions 32 and 96-97 after the last ship: acknowledged
    // there, never in the cache, so not in the failover's point (a split
    // brain the failback reports).
    qemu_io(&vm.uri("disk0"), &["write -P 0x11 2M 64k".into(), "write -P 0x12 6M 128k".into()]);
    // Failover to B, committed.
    let f = json(&run(vm.tern().args(["failover", &vm.name, "--json"])));
    let b_disk = PathBuf::from(f["disks"]["disk0"].as_str().expect("disk"));
    let out = reprotect_to_nowhere(&vm, &target, &cache);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not committed") && err.contains("tern commit"), "{err}");
    run(vm.tern().args(["commit", &vm.name]));

    // The failed-over VM, run from its disk at B (`failover --boot`),
    // writes regions 32 and 160 before it is shut down for the re-protect.
    served.stop();
    qemu_io(b_disk.to_str().unwrap(), &["write -P 0x21 2M 64k".into(), "write -P 0x22 10M 64k".into()]);
    let state_b = root.join("state-b");
    let (cache2, target2) = (root.join("cache2"), root.join("target2"));
    for d in [&cache2, &target2] {
        std::fs::create_dir(d).expect("site dir");
    }
    let reprotected = run(tern_at(&state_b)
        .args(["reprotect", &vm.name, "--cache"])
        .arg(&cache2)
        .arg("--target")
        .arg(&target2)
        .arg("--from-target")
        .arg(&target)
        .arg("--from-cache")
        .arg(&cache));
    assert!(reprotected.contains("only the regions that differ are sent"), "{reprotected}");
    // Issue 18 (item 8): the hint names this site's state directory, and
    // the new direction's journal is as large as the forward one's.
    assert!(reprotected.contains(&format!("`tern --state {} serve vm1`", state_b.display())), "{reprotected}");
    let config_b = std::fs::read_to_string(state_b.join("vm1/vm.toml")).expect("vm.toml at B");
    assert!(config_b.contains("size = \"64MiB\""), "the forward direction's 64 MiB journal:\n{config_b}");

    // B ships back; A's applier seeds the replica from A's old disk and
    // answers the hash request.
    let applier = apply_daemon(&cache2, &target2, &root.join("apply2.log"));
    let out = tern_at(&state_b).args(["ship", &vm.name, "--once", "--checksum-timeout", "10m"]).output().unwrap();
    stop(applier);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("4 of 256 regions differ"), "regions 32, 96, 97 and 160 differ:\n{log}");
    assert!(log.contains("starts from a seed") && !log.contains("host went down"), "{log}");
    let apply_log = std::fs::read_to_string(root.join("apply2.log")).unwrap();
    assert!(apply_log.contains("seeded from"), "{apply_log}");
    let cache2_vm = cache2.join(&vm.name);
    assert_eq!(resync_bytes(|| vm.tern(), &cache2_vm), 4 * REGION, "exactly the differing regions travel");

    // The VM runs at B on tern's export now: its writes replicate to A.
    let socket_b = root.join("b.sock");
    let serve_b_log = root.join("serve-b.log");
    let serve_b = tern_at(&state_b)
        .args(["serve", &vm.name, "--listen"])
        .arg(format!("unix:{}", socket_b.display()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&serve_b_log).expect("log"))
        .spawn()
        .expect("serve b");
    let mut serve_b = Served::adopt(serve_b, serve_b_log.clone(), "tern serve at B");
    wait_listening(&socket_b, &mut serve_b.child, || std::fs::read_to_string(&serve_b_log).unwrap_or_default());
    qemu_io(&format!("nbd+unix:///disk0?socket={}", socket_b.display()), &["write -P 0x23 14M 64k".into()]);
    // A failback while the VM still runs at B would fence it and drop its
    // later writes: refused until B records a clean stop.
    run(tern_at(&state_b).args(["ship", &vm.name, "--once"]));
    let out = vm.tern().args(["failback", &vm.name, "--cache"]).arg(&cache2).arg("--target").arg(&target2).output();
    let err = String::from_utf8_lossy(&out.as_ref().unwrap().stderr).into_owned();
    assert!(!out.unwrap().status.success() && err.contains("may still run at the failover site"), "{err}");
    assert!(!cache2.join("vm1/fence.toml").exists(), "a refused failback fences nothing");
    serve_b.stop();
    run(tern_at(&state_b).args(["ship", &vm.name, "--once"]));
    assert!(Command::new(tern_bin())
        .args(["apply", "--keep-segments", "--once", "--cache"])
        .arg(&cache2)
        .arg("--target")
        .arg(&target2)
        .status()
        .unwrap()
        .success());
    assert_files_equal(&target2.join("vm1/replica/disk0.img"), &b_disk);

    // Failback at A: A's disks become B's, B is fenced, and A protects
    // towards B again. First the split-brain report: what A wrote after
    // the failover point is named, and not discarded without the flag.
    let out = vm.tern().args(["failback", &vm.name, "--cache"]).arg(&cache2).arg("--target").arg(&target2).output();
    let out = out.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("split brain")
            && err.contains("disk 'disk0': 192.0 KiB in 2 region(s): 2097152+65536, 6291456+131072")
            && err.contains("--discard-source-changes"),
        "{err}"
    );
    assert!(!cache2.join("vm1/fence.toml").exists(), "a refused failback fences nothing");
    // A failback killed half-way is finished by running it again.
    for failpoint in [
        "failback:disks-restored",
        "failback:cache-retire",
        "failback:cache-retired",
        "failback:state-moved",
        "failback:enabled",
    ] {
        let armed = format!("{failpoint}=kill");
        let out = vm
            .tern_env(&[("TERN_FAILPOINTS", &armed)])
            .args(["failback", &vm.name, "--discard-source-changes", "--cache"])
            .arg(&cache2)
            .arg("--target")
            .arg(&target2)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{failpoint} did not stop the failback");
    }
    // The last kill came after the new direction was enabled: the rerun
    // finishes the clean-up (the old direction's fence would stop it).
    let back = run(vm.tern().args(["failback", &vm.name, "--cache"]).arg(&cache2).arg("--target").arg(&target2));
    assert!(back.contains("failed back") && back.contains("clean-up"), "{back}");
    let config = std::fs::read_to_string(&config_path).unwrap();
    assert!(config.contains("freeze = \"qga:/run/vm1/qga.sock\""), "the failback kept [app-points]: {config}");
    let leftovers: Vec<_> = [&vm.state, &cache]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).expect("dir").flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".vm1."))
        .collect();
    assert!(leftovers.is_empty(), "a finished failback leaves nothing aside: {leftovers:?}");
    let again = vm.tern().args(["failback", &vm.name, "--cache"]).arg(&cache2).arg("--target").arg(&target2).output();
    let err = String::from_utf8_lossy(&again.as_ref().unwrap().stderr).into_owned();
    assert!(
        !again.unwrap().status.success() && err.contains("already failed back"),
        "a rerun must not overwrite: {err}"
    );
    assert_files_equal(&vm.image, &b_disk);
    let b_disk_copy = root.join("b-disk-at-failback.img");
    std::fs::copy(&b_disk, &b_disk_copy).expect("copy B's disk");
    let out = tern_at(&state_b).args(["ship", &vm.name, "--once"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "the failover site is fenced after failback");

    // The original direction: B's replica is seeded from the disk the VM
    // ran on there, which is what A's disks now hold: nothing is re-sent.
    // Then A's writes replicate to B as before.
    let applier = apply_daemon(&cache, &target, &root.join("apply1.log"));
    let log = vm.ship_once_with(&["--checksum-timeout", "10m"]);
    stop(applier);
    assert!(log.contains("0 of 256 regions differ"), "{log}");
    assert_eq!(resync_bytes(|| vm.tern(), &vm.cache_dir()), 0);
    let served = vm.serve(&[]);
    qemu_io(&vm.uri("disk0"), &["write -P 0x31 12M 64k".into()]);
    served.stop();
    vm.ship_once();
    assert!(vm.apply_with(&cache, &target, &["--keep-segments"], &[]).status.success());
    assert_files_equal(&target.join("vm1/replica/disk0.img"), &vm.image);
    run(vm.tern().args(["verify", &vm.name]));
    let mut history: Vec<String> = std::fs::read_dir(target.join("vm1/history"))
        .expect("history")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    history.sort();
    assert_eq!(history.len(), 2, "the old direction's replica and points, and the seeds, are kept aside: {history:?}");
    // Issue 18 (item 8): the failover's disks that seeded the replicas do
    // not stay in failover/active after the failback.
    assert!(!target.join("vm1/failover/active").exists(), "failover/active is moved aside after the failback");
    let seeded = history.iter().find(|h| h.starts_with("seeded-")).expect("history/seeded-<id>");
    assert_files_equal(&target.join("vm1/history").join(seeded).join("failover-active/disk0.img"), &b_disk_copy);
    let status = json(&run(vm.tern().args(["status", &vm.name, "--json"])));
    assert_eq!(status[0]["state"], "protected", "{status}");
    // The old direction's journal ring (memory) went with its state.
    let rings: Vec<_> = std::fs::read_dir(vm.ring_dir())
        .expect("ring dir")
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().ends_with(".ring"))
        .collect();
    let id = std::fs::read_to_string(vm.state.join("vm1/vm.toml")).expect("vm.toml");
    assert_eq!(rings.len(), 1, "one journal ring, the new direction's: {rings:?}");
    assert!(id.contains(&rings[0].to_string_lossy()[..36]), "{rings:?} is not the ring of\n{id}");
}

#[test]
fn reprotect_and_failback_refuse_what_they_cannot_do() {
    let vm = TestVm::new(VmSpec { disk_size: 4 << 20, journal_size: "16MiB", ..Default::default() });
    let root = vm.dir.path();
    let cache = root.join("cache");
    let target = root.join("target");
    // Not failed over.
    let out = reprotect_to_nowhere(&vm, &target, &cache);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("has not failed over"), "{err}");
    // Failback without a re-protected direction.
    let out = vm.tern().args(["failback", &vm.name, "--cache"]).arg(&cache).arg("--target").arg(&target).output();
    let err = String::from_utf8_lossy(&out.as_ref().unwrap().stderr).into_owned();
    assert!(!out.unwrap().status.success() && err.contains("has no manifest"), "{err}");
    // Failback while the VM is served here.
    let served = vm.serve(&[]);
    let out = vm.tern().args(["failback", &vm.name, "--cache"]).arg(&cache).arg("--target").arg(&target).output();
    let err = String::from_utf8_lossy(&out.as_ref().unwrap().stderr).into_owned();
    assert!(err.contains("stop `tern serve`"), "{err}");
    served.stop();
}

#[test]
fn enable_with_a_seed_carried_to_the_target_sends_only_what_changed_since() {
    let root = tempfile::Builder::new().prefix("tern-seed-").tempdir_in(test_root()).expect("tempdir");
    let root = root.path();
    let (state, cache, target) = (root.join("state"), root.join("cache"), root.join("target"));
    std::fs::create_dir_all(&cache).expect("cache");
    std::fs::create_dir_all(target.join("carried")).expect("target");
    // A 16 MiB disk of random bytes, copied to the target site (a shipped
    // drive), then changed in regions 10 and 200 before it is protected.
    let disk = root.join("disk0.img");
    let mut bytes = vec![0u8; 16 << 20];
    rand::Rng::fill(&mut rand::thread_rng(), &mut bytes[..]);
    std::fs::write(&disk, &bytes).expect("disk");
    let carried = target.join("carried/disk0.img");
    std::fs::copy(&disk, &carried).expect("carried copy");
    for region in [10u64, 200] {
        let at = (region * REGION + 100) as usize;
        bytes[at..at + 4096].fill(0x5a);
    }
    std::fs::write(&disk, &bytes).expect("changed disk");
    let enable = |seed: &str| {
        tern_at(&state)
            .args(["enable", "vm1", "--cache"])
            .arg(&cache)
            .arg("--target")
            .arg(&target)
            .arg("--disk")
            .arg(format!("disk0={}", disk.display()))
            .args(["--journal-size", "64MiB", "--seed", seed])
            .output()
            .expect("tern enable")
    };
    // A seed for a disk the VM does not have, or one climbing out of the
    // VM's target directory: refused, naming it.
    let out = enable("disk9=/srv/x.img");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("disk 'disk9'"), "{out:?}");
    let out = enable("disk0=../../etc/shadow");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("without '..'"), "{out:?}");
    let out = enable(&format!("disk0={}", carried.display()));
    assert!(out.status.success(), "{out:?}");

    let applier = apply_daemon(&cache, &target, &root.join("apply.log"));
    let out = tern_at(&state).args(["ship", "vm1", "--once", "--checksum-timeout", "10m"]).output().unwrap();
    stop(applier);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("2 of 256 regions differ"), "regions 10 and 200 differ:\n{log}");
    assert_eq!(resync_bytes(|| tern_at(&state), &cache.join("vm1")), 2 * REGION, "exactly the changed regions travel");
    let apply_log = std::fs::read_to_string(root.join("apply.log")).unwrap();
    assert!(apply_log.contains("seeded from"), "{apply_log}");
    // The rest applied: the replica is the source, byte for byte.
    run(tern_at(&state).args(["apply", "--once", "--cache"]).arg(&cache).arg("--target").arg(&target));
    assert_files_equal(&target.join("vm1/replica/disk0.img"), &disk);
    // The seed itself is the operator's and stays as it was.
    assert!(std::fs::metadata(&carried).is_ok());
}

#[test]
fn an_initial_sync_cut_off_mid_way_resumes_without_sending_anything_twice() {
    // 24 MiB of random bytes shipped at 4 MB/s, and the shipper (which runs
    // the resync itself: no `tern serve`) killed after two seconds, as a
    // cut link or a crashed host process would leave it.
    let vm =
        TestVm::new(VmSpec { disk_size: 24 << 20, journal_size: "64MiB", random_content: true, ..Default::default() });
    let ship = vm.ship(&["--max-rate", "4MB/s"]);
    std::thread::sleep(std::time::Duration::from_secs(2));
    ship.kill9();
    let cache_vm = vm.cache_dir();
    let before = resync_bytes(|| vm.tern(), &cache_vm);
    assert!(before > 0 && before < 24 << 20, "part of the sync arrived before the cut: {before} bytes");
    eprintln!("resync bytes in the cache at the cut: {before}");
    // The restart ships the rest: what arrived is not sent again.
    vm.ship_once();
    let total = resync_bytes(|| vm.tern(), &cache_vm);
    assert!(
        (24 << 20..=(24 << 20) + 4 * REGION).contains(&total),
        "the whole disk once (a region the cut caught mid-step may go twice): {total} bytes of resync records"
    );
    vm.assert_cache_reproduces_source();
}

/// Protects the failed-over VM back from a second site (its state in
/// `<root>/state-b`, towards `<root>/cache2` and `<root>/target2`), ships
/// the comparison and everything else with the applier answering, and
/// leaves it stopped there with the clean stop recorded. Returns the
/// reverse direction's state, cache and target.
fn reprotect_from_b(vm: &TestVm) -> (PathBuf, PathBuf, PathBuf) {
    let root = vm.dir.path();
    let (state_b, cache2, target2) = (root.join("state-b"), root.join("cache2"), root.join("target2"));
    for d in [&cache2, &target2] {
        std::fs::create_dir(d).expect("site dir");
    }
    run(tern_at(&state_b)
        .args(["reprotect", &vm.name, "--cache"])
        .arg(&cache2)
        .arg("--target")
        .arg(&target2)
        .arg("--from-target")
        .arg(root.join("target"))
        .arg("--from-cache")
        .arg(root.join("cache")));
    let applier = apply_daemon(&cache2, &target2, &root.join("apply2.log"));
    let out = tern_at(&state_b).args(["ship", &vm.name, "--once", "--checksum-timeout", "10m"]).output().unwrap();
    stop(applier);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    run(tern_at(&state_b).args(["ship", &vm.name, "--once"]));
    (state_b, cache2, target2)
}

/// `tern failback` at site A from the reverse direction, with `args`.
fn failback(vm: &TestVm, cache2: &Path, target2: &Path, args: &[&str]) -> std::process::Output {
    vm.tern()
        .args(["failback", &vm.name, "--cache"])
        .arg(cache2)
        .arg("--target")
        .arg(target2)
        .args(args)
        .output()
        .expect("tern failback")
}

/// The bytes of `image` at `offset`.
fn bytes_at(image: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    std::fs::File::open(image).expect("image").read_exact_at(&mut buf, offset).expect("read image");
    buf
}

#[test]
fn failback_refuses_when_the_applier_pruned_source_writes_made_after_the_failover_point() {
    let vm = TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "64MiB", ..Default::default() });
    let root = vm.dir.path().to_owned();
    let (cache, target) = (root.join("cache"), root.join("target"));
    // Point 1 holds the write at 1 MiB.
    let served = vm.serve(&[]);
    qemu_io(&vm.uri("disk0"), &["write -P 0x11 1M 64k".into()]);
    vm.ship_once();
    assert!(vm.apply_with(&cache, &target, &[], &[]).status.success());
    let first = vm.points(&target)[0]["id"].as_str().expect("point id").to_owned();
    // A write at 2 MiB after it, then a tag (no disk change): applied at
    // the target, which prunes the write's segment and keeps the newest,
    // the tag's.
    qemu_io(&vm.uri("disk0"), &["write -P 0x22 2M 64k".into()]);
    vm.ship_once();
    run(vm.tern().args(["tag", &vm.name, "after-the-write"]));
    vm.ship_once();
    assert!(vm.apply_with(&cache, &target, &[], &[]).status.success());
    let segments = std::fs::read_dir(vm.cache_dir().join("segments")).unwrap().count();
    assert_eq!(segments, 1, "the applier pruned all but the newest segment");
    // The failover goes to point 1, before the write; committed, and
    // protected back from B.
    run(vm.tern().args(["failover", &vm.name, "--point", &first]));
    served.stop();
    run(vm.tern().args(["commit", &vm.name]));
    let (_, cache2, target2) = reprotect_from_b(&vm);

    // The write at 2 MiB is A's, after the failover point: the failback
    // would discard it, and says so even though its record left the cache.
    let out = failback(&vm, &cache2, &target2, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "failback discarded a write made after the failover point:\n{err}");
    assert!(
        err.contains("split brain")
            && err.contains("record seq 2: shipped after the failover point, applied at the failover site")
            && err.contains("--discard-source-changes"),
        "the report names the records whose extent is unknown:\n{err}"
    );
    assert!(!cache2.join("vm1/fence.toml").exists(), "a refused failback fences nothing");
    assert_eq!(bytes_at(&vm.image, 2 << 20, 65536), vec![0x22; 65536], "A's write at 2 MiB is intact");
}

#[test]
fn failback_refuses_after_a_failover_of_the_reprotected_direction() {
    let vm = TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "64MiB", ..Default::default() });
    let root = vm.dir.path().to_owned();
    let (cache, target) = (root.join("cache"), root.join("target"));
    let served = vm.serve(&[]);
    qemu_io(&vm.uri("disk0"), &["write -P 0x11 1M 64k".into()]);
    vm.ship_once();
    assert!(vm.apply_with(&cache, &target, &[], &[]).status.success());
    // A writes at 2 MiB after the last ship (a split brain), then fails
    // over to B, which protects the VM back.
    qemu_io(&vm.uri("disk0"), &["write -P 0x22 2M 64k".into()]);
    run(vm.tern().args(["failover", &vm.name]));
    served.stop();
    run(vm.tern().args(["commit", &vm.name]));
    let (_, cache2, target2) = reprotect_from_b(&vm);

    // Site B is lost: at A, a real failover of the reverse direction, and
    // the VM runs from its disks there and writes at 7 MiB.
    run(Command::new(tern_bin()).args(["failover", &vm.name, "--cache"]).arg(&cache2).arg("--target").arg(&target2));
    let active = target2.join("vm1/failover/active/disk0.img");
    qemu_io(active.to_str().unwrap(), &["write -P 0x77 7M 64k".into()]);

    // That fence is no failback's: a failback neither resumes from it nor
    // skips its checks; it refuses, and replaces no disk.
    let out = failback(&vm, &cache2, &target2, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "failback over a failover of the reverse direction:\n{err}");
    assert!(err.contains("failed over") && err.contains("tern failover"), "{err}");
    assert_eq!(bytes_at(&vm.image, 2 << 20, 65536), vec![0x22; 65536], "A's own write at 2 MiB is intact");
    assert_eq!(bytes_at(&active, 7 << 20, 65536), vec![0x77; 65536], "the failover's write at 7 MiB is intact");
    // Committed, it is refused the same way (not taken for a finished one).
    run(Command::new(tern_bin()).args(["commit", &vm.name, "--cache"]).arg(&cache2).arg("--target").arg(&target2));
    let out = failback(&vm, &cache2, &target2, &["--discard-source-changes"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("tern failover"), "{err}");
    assert_eq!(bytes_at(&vm.image, 2 << 20, 65536), vec![0x22; 65536], "A's own write at 2 MiB is intact");
}

#[test]
fn a_failback_killed_after_retiring_the_old_stream_leaves_nothing_to_serve_the_old_direction() {
    let vm = TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "64MiB", ..Default::default() });
    let root = vm.dir.path().to_owned();
    let (cache, target) = (root.join("cache"), root.join("target"));
    let served = vm.serve(&[]);
    qemu_io(&vm.uri("disk0"), &["write -P 0x11 1M 64k".into()]);
    vm.ship_once();
    assert!(vm.apply_with(&cache, &target, &[], &[]).status.success());
    run(vm.tern().args(["failover", &vm.name]));
    served.stop();
    run(vm.tern().args(["commit", &vm.name]));
    let (_, cache2, target2) = reprotect_from_b(&vm);

    // The failback dies once the old direction's stream (and with it the
    // fence that kept `tern serve` away here) is retired.
    let out = vm
        .tern_env(&[("TERN_FAILPOINTS", "failback:cache-retired=kill")])
        .args(["failback", &vm.name, "--cache"])
        .arg(&cache2)
        .arg("--target")
        .arg(&target2)
        .output()
        .unwrap();
    assert!(!out.status.success(), "failback:cache-retired did not stop the failback");
    assert!(!cache.join("vm1/fence.toml").exists(), "killed after the old stream was retired");
    let restored = std::fs::read(&vm.image).expect("image");

    // The old direction must not serve now: the rerun skips the split-brain
    // check (its fence says an earlier run made it) and would restore the
    // point over whatever it was written meanwhile.
    let log = root.join("serve-after-kill.log");
    let mut serve = vm
        .tern()
        .args(["serve", &vm.name, "--listen"])
        .arg(format!("unix:{}", vm.socket.display()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("tern serve");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = serve.try_wait().expect("wait") {
            break Some(status);
        }
        if vm.socket.exists() || std::time::Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let served_log = std::fs::read_to_string(&log).unwrap_or_default();
    if status.is_none() {
        // It serves: the VM's write goes in, and the rerun discards it.
        qemu_io(&vm.uri("disk0"), &["write -P 0x55 5M 64k".into()]);
        stop(serve);
        let rerun = failback(&vm, &cache2, &target2, &[]);
        panic!(
            "tern serve served the old direction of a half-done failback; the rerun ({}) left 5 MiB as {:x?}:\n{served_log}",
            rerun.status,
            &bytes_at(&vm.image, 5 << 20, 4)
        );
    }
    assert!(
        !status.unwrap().success() && served_log.contains("tern failback") && served_log.contains("interrupted"),
        "{served_log}"
    );
    assert_eq!(std::fs::read(&vm.image).expect("image"), restored, "nothing wrote the disk");

    // The rerun finishes the failback; the new direction serves.
    let back = run(vm.tern().args(["failback", &vm.name, "--cache"]).arg(&cache2).arg("--target").arg(&target2));
    assert!(back.contains("failed back"), "{back}");
    vm.serve(&[]).stop();
}
