//! `tern apply` end to end (invariants 6, 7 and 8): every recovery point
//! equals the source after exactly the records up to its sequence number;
//! an app-consistent point equals the source at its tag; points stay as
//! they were while the replica moves on; `kill -9` and restarts change
//! nothing; a damaged, missing or stale segment stops the VM at the last
//! good sequence; reflinks on btrfs and xfs, copies on ext4.

use std::path::{Path, PathBuf};
use std::process::Command;

use tern_system_tests::*;

/// A VM whose cache holds: the initial sync, then `rounds` times some
/// writes and a tag, each round shipped (so each round is at least one
/// segment). Returns the VM and, per tag, the source image right after it.
fn vm_with_tagged_history(rounds: usize) -> (TestVm, Vec<(String, PathBuf)>) {
    let vm =
        TestVm::new(VmSpec { disk_size: 8 << 20, journal_size: "64MiB", random_content: true, ..Default::default() });
    let served = vm.serve(&[]);
    vm.ship_once();
    let mut tagged = Vec::new();
    for round in 0..rounds {
        let mut io = Command::new("qemu-io");
        io.args(["-f", "raw", &vm.uri("disk0")]);
        for i in 0..6u64 {
            let off = (round as u64 * 7 + i * 13) % 120 * 65536;
            io.args(["-c", &format!("write -P {} {off} 96k", round * 6 + i as usize + 1)]);
        }
        io.args(["-c", &format!("discard {} 64k", (round as u64 * 3 + 100) * 65536)]);
        run(&mut io);
        let label = format!("round-{round}");
        let out = run(vm.tern().args(["tag", &vm.name, &label]));
        assert!(out.contains("tagged"), "{out}");
        // Nothing is in flight: the source now is what the tag stands for.
        let copy = vm.dir.path().join(format!("source-at-{label}.img"));
        std::fs::copy(&vm.image, &copy).expect("copy source");
        tagged.push((label, copy));
        vm.ship_once();
    }
    served.stop();
    vm.ship_once();
    (vm, tagged)
}

fn files_equal(a: &Path, b: &Path) -> bool {
    std::fs::read(a).expect("read") == std::fs::read(b).expect("read")
}

fn point_disk(p: &serde_json::Value) -> PathBuf {
    PathBuf::from(p["disks"]["disk0"].as_str().expect("disk0 path"))
}

fn checkpoint_seq(target: &Path) -> u64 {
    let text = std::fs::read_to_string(target.join("vm1/replica/checkpoint.toml")).expect("checkpoint");
    let line = text.lines().find(|l| l.starts_with("applied-seq")).expect("applied-seq");
    line.split('=').nth(1).expect("value").trim().parse().expect("number")
}

/// Every point of the catalog against the cache oracle, and every app point
/// against the source as it was at its tag.
fn assert_points_are_exact(vm: &TestVm, cache_vm_dir: &Path, target: &Path, tagged: &[(String, PathBuf)]) {
    let points = vm.points(target);
    let apps: Vec<&serde_json::Value> = points.iter().filter(|p| p["kind"] == "app").collect();
    assert_eq!(apps.len(), tagged.len(), "one app point per tag: {points:#?}");
    assert!(points.iter().any(|p| p["kind"] == "crash"), "at least one crash-consistent point: {points:#?}");
    for p in &points {
        let seq = p["seq"].as_u64().expect("seq");
        let oracle = vm.cache_image_at(cache_vm_dir, seq);
        assert!(
            files_equal(&point_disk(p), &oracle),
            "point {} differs from the source after exactly seq {seq}",
            p["id"]
        );
    }
    for (p, (label, source)) in apps.iter().zip(tagged) {
        assert_eq!(p["label"], label.as_str());
        assert!(files_equal(&point_disk(p), source), "app point {label} differs from the source at its tag");
    }
}

#[test]
fn every_point_is_the_source_after_exactly_its_records_and_app_points_match_their_tags() {
    let (vm, tagged) = vm_with_tagged_history(5);
    let target = vm.dir.path().join("target");
    let out = vm.apply_with(&vm.dir.path().join("cache"), &target, &["--keep-segments"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The replica is the source; the points are exact, and they kept their
    // content while the replica went on past them.
    assert_files_equal(&vm.image, &target.join("vm1/replica/disk0.img"));
    assert_points_are_exact(&vm, &vm.cache_dir(), &target, &tagged);
    // applied.toml tells the source how far the target is.
    let applied = std::fs::read_to_string(vm.cache_dir().join("applied.toml")).expect("applied.toml");
    assert!(applied.contains(&format!("applied-seq = {}", checkpoint_seq(&target))), "{applied}");
    // Without --keep-segments, applied segments go, but the newest stays.
    let out = vm.apply_with(&vm.dir.path().join("cache"), &target, &[], &[]);
    assert!(out.status.success());
    let left = std::fs::read_dir(vm.cache_dir().join("segments")).expect("segments").count();
    assert_eq!(left, 1, "applied segments are pruned, all but the newest");
}

#[test]
fn kill_9_while_replaying_and_while_cloning_then_restart_gives_the_same_replica_and_catalog() {
    let (vm, _tagged) = vm_with_tagged_history(3);
    let cache = vm.dir.path().join("cache");
    let target = |name: &str| {
        let t = vm.dir.path().join(name);
        std::fs::create_dir(&t).expect("target dir");
        t
    };
    let uninterrupted = target("target-a");
    let out = vm.apply_with(&cache, &uninterrupted, &["--keep-segments"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let keep = ["--keep-segments"];
    // A batch per segment, fsynced rarely: the kill at the third batch
    // written comes after batches that no fsync or checkpoint may cover.
    let small = ["--keep-segments", "--batch-size", "64KiB", "--sync-every", "1GiB"];
    // Per target: the failpoints killed at, one run each, with their flags.
    type Kills<'a> = &'a [(&'a str, &'a [&'a str])];
    let runs: [(&str, Kills); 2] = [
        (
            "target-b",
            &[
                ("apply:replica-sync=kill", &keep),
                ("apply:batch-applied=kill", &keep),
                ("apply:point-cloned=kill", &keep),
            ],
        ),
        ("target-c", &[("apply:batch-written=kill@3", &small)]),
    ];
    for (name, kills) in runs {
        let killed = target(name);
        use std::os::unix::process::ExitStatusExt;
        for (point, args) in kills {
            let out = vm.apply_with(&cache, &killed, args, &[("TERN_FAILPOINTS", point)]);
            assert_eq!(out.status.signal(), Some(9), "{point}: {}", String::from_utf8_lossy(&out.stderr));
            // No half point is ever listed.
            for p in vm.points(&killed) {
                assert!(point_disk(&p).exists(), "{point}: listed point {} lacks its disk", p["id"]);
            }
        }
        let out = vm.apply_with(&cache, &killed, &keep, &[]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_same_replica_and_catalog(&vm, &uninterrupted, &killed);
    }
}

fn assert_same_replica_and_catalog(vm: &TestVm, a: &Path, b: &Path) {
    assert_files_equal(&a.join("vm1/replica/disk0.img"), &b.join("vm1/replica/disk0.img"));
    let (pa, pb) = (vm.points(a), vm.points(b));
    let summary = |ps: &[serde_json::Value]| -> Vec<String> {
        ps.iter().map(|p| format!("{} {} {} {}", p["id"], p["seq"], p["kind"], p["label"])).collect()
    };
    assert_eq!(summary(&pa), summary(&pb), "{}", b.display());
    for (x, y) in pa.iter().zip(&pb) {
        assert_files_equal(&point_disk(x), &point_disk(y));
    }
    let leftovers: Vec<_> = std::fs::read_dir(b.join("vm1/points"))
        .expect("points")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "half-taken points are cleaned up: {leftovers:?}");
}

/// Applies with one segment damaged by `damage`; asserts the applier stops
/// with an error containing `expect` and the replica stays at the last good
/// sequence (the segment before the damaged one).
fn assert_bad_segment_stops_apply(name: &str, damage: impl FnOnce(&Path, &[PathBuf]), expect: &str) {
    let (vm, _) = vm_with_tagged_history(3);
    let segments: Vec<PathBuf> = {
        let mut v: Vec<PathBuf> = std::fs::read_dir(vm.cache_dir().join("segments"))
            .expect("segments")
            .map(|e| e.expect("entry").path())
            .collect();
        v.sort();
        v
    };
    assert!(segments.len() >= 4, "{name}: the test needs several segments: {segments:?}");
    let victim = 2;
    let last_good: u64 = segments[victim - 1]
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split('-').nth(1))
        .and_then(|n| n.parse().ok())
        .expect("segment name");
    let oracle = vm.cache_image_at(&vm.cache_dir(), last_good);
    damage(&segments[victim], &segments);
    let target = vm.dir.path().join("target");
    let out = vm.apply_with(&vm.dir.path().join("cache"), &target, &["--keep-segments"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{name}: apply must fail:\n{err}");
    assert!(err.contains(expect), "{name}: expected {expect:?} in:\n{err}");
    assert!(err.contains(&format!("stays at seq {last_good}")), "{name}: {err}");
    assert_eq!(checkpoint_seq(&target), last_good, "{name}: the replica stays at the last good sequence");
    assert_files_equal(&target.join("vm1/replica/disk0.img"), &oracle);
}

#[test]
fn a_corrupted_segment_stops_apply_at_the_last_good_sequence() {
    assert_bad_segment_stops_apply(
        "corrupted",
        |p, _| {
            let mut b = std::fs::read(p).expect("read");
            let mid = b.len() / 2;
            b[mid] ^= 0x10;
            std::fs::write(p, b).expect("write");
        },
        "checksum mismatch",
    );
}

#[test]
fn a_truncated_segment_stops_apply_at_the_last_good_sequence() {
    assert_bad_segment_stops_apply(
        "truncated",
        |p, _| {
            // Half its body cut off, its header whole (a segment of one
            // small record is not much longer than its header).
            let len = std::fs::metadata(p).expect("stat").len();
            let cut = (len - 128).div_ceil(2);
            std::fs::OpenOptions::new().write(true).open(p).expect("open").set_len(len - cut).expect("truncate");
        },
        "bytes, header says",
    );
}

#[test]
fn a_missing_segment_stops_apply_at_the_gap() {
    assert_bad_segment_stops_apply("missing", |p, _| std::fs::remove_file(p).expect("remove"), "(a gap)");
}

#[test]
fn a_segment_of_a_stale_epoch_is_refused() {
    // A segment that claims epoch 0 with the right VM id, seqs and checksums:
    // what a fenced-off old source could still ship.
    assert_bad_segment_stops_apply(
        "stale epoch",
        |p, _| {
            let seg = tern_store::segment::Segment::read_file(p, None).expect("segment");
            let h = &seg.header;
            let mut b = tern_store::segment::SegmentBuilder::new(h.vm_id, 0, h.first_seq);
            for (r, data) in seg.records() {
                b.push(r, data).expect("push");
            }
            b.set_window(h.window);
            let mut enc = tern_store::segment::Encoder::new(h.compression).expect("encoder");
            let (_, bytes) = enc.encode(&b).expect("encode");
            std::fs::write(p, bytes).expect("write");
        },
        "stale source",
    );
}

#[test]
fn points_are_reflinks_on_btrfs_and_xfs_and_copies_on_ext4() {
    let (vm, tagged) = vm_with_tagged_history(2);
    for (fs, clone) in [("btrfs", "reflink"), ("xfs", "reflink"), ("ext4", "copy")] {
        let target = vm.dir.path().join(format!("target-{fs}"));
        let _mount = mount_loop_fs(fs, &vm.dir.path().join(format!("{fs}.fs")), &target, 400);
        let out = vm.apply_with(&vm.dir.path().join("cache"), &target, &["--keep-segments"], &[]);
        assert!(out.status.success(), "{fs}: {}", String::from_utf8_lossy(&out.stderr));
        let points = vm.points(&target);
        assert!(points.iter().all(|p| p["clone"] == clone), "{fs}: expected {clone} clones: {points:#?}");
        assert_points_are_exact(&vm, &vm.cache_dir(), &target, &tagged);
        // A test failover clones a point the same way (on btrfs, from the
        // points' in-place files into a directory without the flag).
        let newest = points.iter().max_by_key(|p| p["seq"].as_u64()).expect("a point");
        let f: serde_json::Value = serde_json::from_str(&run(vm
            .tern()
            .args(["failover", &vm.name, "--test", "--json", "--point", newest["id"].as_str().unwrap(), "--target"])
            .arg(&target)))
        .expect("json");
        assert_eq!(f["clone"], clone, "{fs}: {f}");
        if clone == "copy" {
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("cannot share extents"),
                "{fs}: the copy fallback is warned about"
            );
        }
    }
}

#[test]
fn tag_refuses_bad_labels_and_a_full_journal() {
    let vm =
        TestVm::new(VmSpec { disk_size: 8 << 20, journal_size: "64KiB", random_content: false, ..Default::default() });
    for bad in ["", &"x".repeat(257), "a\nb"] {
        let out = vm.tern().args(["tag", &vm.name, bad]).output().expect("tag");
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("a tag label must be"), "{bad:?}");
    }
    let served = vm.serve(&[]);
    // Small writes, more than the ring holds, and no shipper: the ring is
    // full and stays so (one write too large for the ring would overflow
    // an empty ring, which the background resync leaves at once).
    let mut io = Command::new("qemu-io");
    io.args(["-f", "raw", &vm.uri("disk0")]);
    for i in 0..32 {
        io.args(["-c", &format!("write {}k 4k", i * 4)]);
    }
    run(&mut io);
    let out = vm.tern().args(["tag", &vm.name, "full"]).output().expect("tag");
    served.stop();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("retry once `tern ship` has caught up"));
}

#[test]
fn a_tag_before_the_initial_sync_is_done_makes_no_point() {
    // The replica starts empty: until the initial sync is shipped it is not
    // the source, so a tag there cannot become a point.
    let vm =
        TestVm::new(VmSpec { disk_size: 4 << 20, journal_size: "16MiB", random_content: true, ..Default::default() });
    run(vm.tern().args(["tag", &vm.name, "too-early"]));
    vm.ship_once();
    let target = vm.dir.path().join("target");
    let out = vm.apply_with(&vm.dir.path().join("cache"), &target, &["--keep-segments"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("falls inside a resync window"));
    let points = vm.points(&target);
    assert!(points.iter().all(|p| p["kind"] == "crash"), "{points:#?}");
    assert_files_equal(&vm.image, &target.join("vm1/replica/disk0.img"));
}

#[test]
fn all_disks_of_a_vm_are_in_every_point_at_the_same_sequence() {
    let dir = tempfile::Builder::new().prefix("tern-test-").tempdir_in(test_root()).expect("tempdir");
    let d = dir.path();
    for site in ["cache", "target"] {
        std::fs::create_dir(d.join(site)).expect("site");
    }
    for (i, byte) in [(0, 0x11u8), (1, 0x22)] {
        std::fs::write(d.join(format!("disk{i}.img")), vec![byte; 4 << 20]).expect("disk");
    }
    let tern = || tern_with_state(&d.join("state"));
    run(tern()
        .args(["enable", "vm1", "--cache"])
        .arg(d.join("cache"))
        .arg("--target")
        .arg(d.join("target"))
        .arg("--disk")
        .arg(format!("disk0={}", d.join("disk0.img").display()))
        .arg("--disk")
        .arg(format!("disk1={}", d.join("disk1.img").display())));
    let socket = d.join("nbd.sock");
    let mut serve = tern()
        .args(["serve", "vm1", "--listen"])
        .arg(format!("unix:{}", socket.display()))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("serve");
    wait_listening(&socket, &mut serve, String::new);
    // The initial sync done (serve re-sends, ship waits for the window to close).
    run(tern().args(["ship", "vm1", "--once"]));
    let uri = |disk: &str| format!("nbd+unix:///{disk}?socket={}", socket.display());
    // A write on each disk, the tag, then one more on each: the point must
    // hold the first two on both disks and neither of the last two.
    run(Command::new("qemu-io").args(["-f", "raw", &uri("disk0"), "-c", "write -P 1 0 64k"]));
    run(Command::new("qemu-io").args(["-f", "raw", &uri("disk1"), "-c", "write -P 2 1M 64k"]));
    run(tern().args(["tag", "vm1", "both"]));
    let at_tag: Vec<Vec<u8>> = (0..2).map(|i| std::fs::read(d.join(format!("disk{i}.img"))).expect("read")).collect();
    run(Command::new("qemu-io").args(["-f", "raw", &uri("disk0"), "-c", "write -P 3 2M 64k"]));
    run(Command::new("qemu-io").args(["-f", "raw", &uri("disk1"), "-c", "write -P 4 3M 64k"]));
    let _ = Command::new("kill").arg(serve.id().to_string()).status();
    let _ = serve.wait();
    run(tern().args(["ship", "vm1", "--once"]));
    run(Command::new(tern_bin())
        .args(["apply", "vm1", "--once", "--cache"])
        .arg(d.join("cache"))
        .arg("--target")
        .arg(d.join("target")));
    let out = run(Command::new(tern_bin()).args(["points", "vm1", "--json", "--target"]).arg(d.join("target")));
    let points: Vec<serde_json::Value> = serde_json::from_str(&out).expect("json");
    let app = points.iter().find(|p| p["kind"] == "app").expect("the app point");
    for (i, expected) in at_tag.iter().enumerate() {
        let path = app["disks"][format!("disk{i}")].as_str().expect("both disks in the point");
        assert!(
            std::fs::read(path).expect("read point") == *expected,
            "disk{i} of the point differs from the source at the tag"
        );
        let replica = d.join(format!("target/vm1/replica/disk{i}.img"));
        assert_files_equal(&replica, &d.join(format!("disk{i}.img")));
    }
}

#[test]
fn batch_and_sync_sizes_out_of_range_or_unparsable_are_refused_with_the_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cache, target) = (dir.path().join("cache"), dir.path().join("target"));
    for (flag, value, expect) in [
        ("--batch-size", "0", "--batch-size 0B is out of range: give 4KiB to 1TiB"),
        ("--sync-every", "2TiB", "--sync-every 2TiB is out of range: give 4KiB to 1TiB"),
        ("--batch-size", "lots", "invalid value 'lots' for '--batch-size"),
    ] {
        let out = Command::new(tern_bin())
            .args(["apply", "--cache"])
            .arg(&cache)
            .arg("--target")
            .arg(&target)
            .args(["--once", flag, value])
            .output()
            .expect("run tern");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value} must be refused");
        assert!(err.contains(expect), "{flag} {value}: expected {expect:?} in:\n{err}");
        assert!(!target.exists(), "{flag} {value}: nothing is created before the options are checked");
    }
}

/// Issue 17, bug 2: retention measured point ages on the target's clock and
/// kept no point for sure: a source silent for longer than the retention
/// (a disaster) or a target clock ahead deleted every point. Ages are now
/// measured on the stream's clock, and the newest point of each kind stays.
#[test]
fn a_silent_source_or_a_target_clock_a_day_ahead_expires_no_point() {
    require("faketime");
    // Two tags: two app points, so retention has an older one to judge
    // (the newest of each kind is kept anyway).
    let (vm, _tagged) = vm_with_tagged_history(2);
    let target = vm.dir.path().join("target");
    let cache = vm.dir.path().join("cache");
    let out = vm.apply_with(&cache, &target, &[], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let before: Vec<String> = vm.points(&target).iter().map(|p| p["id"].to_string()).collect();
    assert!(before.len() >= 3, "a crash point and the tags' app points: {before:?}");
    // A day and an hour later by the target's clock (the default retention
    // is 24 h).
    let apply_a_day_later = || {
        let out = Command::new("faketime")
            .args(["-f", "+25h"])
            .arg(tern_bin())
            .args(["apply", "--once", "--cache"])
            .arg(&cache)
            .arg("--target")
            .arg(&target)
            .arg(&vm.name)
            .output()
            .expect("run faketime");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        vm.points(&target).iter().map(|p| p["id"].to_string()).collect::<Vec<String>>()
    };
    // Nothing new from the source.
    assert_eq!(apply_a_day_later(), before, "points expired while the source was silent");
    // New data, its source time minutes after the points': still young.
    let served = vm.serve(&[]);
    run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "write -P 9 0 64k"]));
    served.stop();
    vm.ship_once();
    let after = apply_a_day_later();
    assert!(before.iter().all(|id| after.contains(id)), "points expired by the target's clock: {before:?} → {after:?}");
}

/// Issue 18 (item 2): one failure used to stop applying a VM until `tern
/// apply` was restarted, the source showing its last state forever. The
/// daemon retries with backoff, and `tern status` shows the error until a
/// pass succeeds.
#[test]
fn a_failing_vm_is_retried_with_backoff_and_status_shows_the_error_meanwhile() {
    use std::time::{Duration, Instant};
    let (vm, _) = vm_with_tagged_history(2);
    let target = vm.dir.path().join("target");
    let failure_file = vm.cache_dir().join("apply-failure.toml");
    // The first two batches fail (EIO): tries at 0 s, 1 s, then 3 s succeeds.
    let daemon = vm.apply_daemon(&[("TERN_FAILPOINTS", "apply:batch-written=eio@1;apply:batch-written=eio@2")]);
    let start = Instant::now();
    while !failure_file.exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "no failure published:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = vm.tern().args(["status", "vm1"]).output().expect("tern status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(!status.status.success(), "a VM whose applier fails is unhealthy: {text}");
    assert!(text.contains("vm1: error") && text.contains("the target's applier failed"), "{text}");
    assert!(text.contains("Input/output error"), "the error itself is shown: {text}");

    let head = vm.ship_report()["last_shipped_seq"].as_u64().expect("shipped seq");
    while failure_file.exists()
        || !target.join("vm1/replica/checkpoint.toml").exists()
        || checkpoint_seq(&target) < head
    {
        assert!(start.elapsed() < Duration::from_secs(60), "the VM was not retried:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = daemon.stop();
    assert!(log.contains("trying again in 1s") && log.contains("trying again in 2s"), "{log}");
    assert!(log.contains("applying again after 2 failed attempt(s)"), "{log}");
    assert_files_equal(&target.join("vm1/replica/disk0.img"), &vm.image);
    let status = vm.tern().args(["status", "vm1", "--json"]).output().expect("tern status");
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    assert!(json[0]["last_error"].is_null(), "{json}");
}

/// Issue 18 (item 7): typos used to pass silently. `tern apply` for a VM
/// the cache does not hold exited 0 printing nothing; `tern enable` took a
/// cache store that does not exist; a bad setting blamed a vm.toml that
/// was never written.
#[test]
fn typos_are_refused_with_what_exists() {
    let (vm, _) = vm_with_tagged_history(1);
    let out = vm.apply_with(&vm.dir.path().join("cache"), &vm.dir.path().join("target"), &[], &[]);
    assert!(out.status.success());
    let out = tern_command(&[])
        .args(["apply", "vm11", "--once", "--cache"])
        .arg(vm.dir.path().join("cache"))
        .arg("--target")
        .arg(vm.dir.path().join("target"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("holds no VM 'vm11' (it holds: vm1)"), "{err}");

    let d = vm.dir.path();
    std::fs::write(d.join("other.img"), vec![0u8; 1 << 20]).unwrap();
    let enable = |cache: &str, extra: &[&str]| {
        tern_with_state(&d.join("state2"))
            .args(["enable", "vm2", "--disk"])
            .arg(format!("disk0={}", d.join("other.img").display()))
            .arg("--cache")
            .arg(d.join(cache))
            .arg("--target")
            .arg(d.join("target"))
            .args(extra)
            .output()
            .unwrap()
    };
    let out = enable("cahce", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cahce does not exist") && err.contains("--create"), "{err}");
    assert!(!d.join("state2/vm2").exists());
    let out = enable("cache", &["--interval", "1s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("interval") && !err.contains("vm.toml"), "{err}");
    let out = enable("new-cache", &["--create"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(d.join("new-cache").is_dir());
}
