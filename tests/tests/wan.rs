//! Two sites across an emulated WAN (`tern_system_tests::wan`): the source
//! host, the target host and the object store each in a network namespace
//! of its own, joined by links of 50 ms round trip, 100 Mbit/s and 1%
//! loss. The sites share nothing but the bucket (and this machine's
//! filesystem, where each keeps its own directories). The whole lifecycle
//! crosses the links: protect, points, a test failover, the source host
//! destroyed and a failover without it, re-protect back through a second
//! bucket, failback, and the original direction again. Every replica and
//! failed-over disk is judged against what the client wrote.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tern_system_tests::stores::{require_stores, PrivateSeaweed};
use tern_system_tests::wan::{Link, Site, Wan, STORE_PORT};
use tern_system_tests::*;

const MIB: u64 = 1 << 20;

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// Waits (`limit` at most) until `copy` holds exactly the bytes of
/// `original`: replication across the link caught up.
fn wait_equal(original: &Path, copy: &Path, limit: Duration, what: &str) {
    let started = Instant::now();
    loop {
        let (a, b) = (std::fs::read(original).expect("read the source"), std::fs::read(copy).unwrap_or_default());
        if a == b {
            eprintln!("{what}: caught up in {:.1} s", started.elapsed().as_secs_f64());
            return;
        }
        assert!(started.elapsed() < limit, "{what}: {} never caught up with {}", copy.display(), original.display());
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A `tern` running in the background (`log` beside the VM).
fn spawn(mut cmd: Command, log: PathBuf, what: &'static str) -> Served {
    let file = std::fs::File::create(&log).expect("log");
    let child = cmd.stdout(Stdio::null()).stderr(file).spawn().unwrap_or_else(|e| panic!("start {what}: {e}"));
    Served::adopt(child, log, what)
}

#[test]
fn the_lifecycle_crosses_a_wan_and_the_target_fails_over_without_the_source_host() {
    require_stores();
    let tag = format!("tw{}", std::process::id() % 100_000);
    let mut wan = Wan::new(&tag, Link::WAN);
    let work = tempfile::Builder::new().prefix("tern-wan-").tempdir_in(test_root()).expect("tempdir");
    let _store = PrivateSeaweed::start_in(&work.path().join("store"), STORE_PORT, Some(wan.ns(None)));
    let run_id = work.path().file_name().unwrap().to_string_lossy().into_owned();
    let (forward, back) = (format!("s3://tern-test/{run_id}"), format!("s3://tern-reverse/{run_id}"));

    // Site A: the VM, enabled, served and shipped in the source namespace.
    let source_ns = wan.ns(Some(Site::Source));
    let vm = TestVm::new(VmSpec {
        disk_size: 32 * MIB,
        journal_size: "64MiB",
        random_content: true,
        cache: Some(forward.clone()),
        env: vec![("AWS_ENDPOINT_URL".into(), wan.store_endpoint(Site::Source))],
        netns: Some(source_ns.clone()),
        ..Default::default()
    });
    let root = vm.dir.path().to_owned();
    // Site B: its own state directory, in the target namespace.
    let (target, state_b, target_ns) = (root.join("target"), root.join("state-b"), wan.ns(Some(Site::Target)));
    let endpoint_b = wan.store_endpoint(Site::Target);
    let at_b = || {
        let mut c = tern_with_state(&state_b);
        c.env("AWS_ENDPOINT_URL", &endpoint_b);
        in_netns(Some(&target_ns), c)
    };
    let apply_at_b = || {
        let mut c = at_b();
        c.args(["apply", "--cache", &forward, "--target"]).arg(&target);
        spawn(c, root.join("apply-b.log"), "tern apply at B")
    };
    let replica_b = target.join("vm1/replica/disk0.img");

    let served = vm.serve(&[]);
    let shipper = vm.ship(&[]);
    let applier = apply_at_b();
    write_patterns(&vm.socket, 0, 64);
    wait_equal(&vm.image, &replica_b, Duration::from_secs(180), "the initial sync and 4 MiB of writes");

    // An application point, and the source as it was then: what the point
    // must hold.
    run(vm.tern().args(["tag", "vm1", "across-the-wan"]));
    let at_tag = root.join("source-at-tag.img");
    std::fs::copy(&vm.image, &at_tag).expect("copy the source");
    write_patterns(&vm.socket, 64, 32);
    wait_equal(&vm.image, &replica_b, Duration::from_secs(120), "2 MiB more");
    let status = json(&run(vm.tern().args(["status", "vm1", "--json"])));
    assert_eq!(status[0]["state"], "protected", "the source learns the target's progress from the bucket: {status}");

    // A test failover at B from the application point.
    let points = json(&run(at_b().args(["points", "vm1", "--json", "--target"]).arg(&target)));
    let app = points.as_array().unwrap().iter().find(|p| p["kind"] == "app").expect("the tag's point").clone();
    let drill = json(&run(at_b()
        .args(["failover", "vm1", "--test", "--json", "--point", app["id"].as_str().unwrap(), "--cache", &forward])
        .arg("--target")
        .arg(&target)));
    assert_files_equal(&at_tag, Path::new(drill["disks"]["disk0"].as_str().expect("the drill's disk")));

    // The disaster: the source host gone, its processes with it. Everything
    // it wrote was acknowledged and replicated before, so the failover at B
    // (the store and B alone) must hold all of it.
    wan.destroy_source();
    drop((served, shipper));
    let started = Instant::now();
    let failed_over = json(&run(at_b()
        .args(["failover", "vm1", "--latest", "--json", "--cache", &forward])
        .arg("--target")
        .arg(&target)));
    eprintln!("failover with the source host gone: {:.1} s", started.elapsed().as_secs_f64());
    let disk_b = PathBuf::from(failed_over["disks"]["disk0"].as_str().expect("the failover's disk"));
    assert_files_equal(&vm.image, &disk_b);
    run(at_b().args(["commit", "vm1", "--cache", &forward]).arg("--target").arg(&target));
    drop(applier);

    // Site A comes back (its disks survived). B re-protects the VM towards
    // A through the second bucket; the VM runs at B on tern's export.
    wan.restore_source();
    let target_a = root.join("target-a");
    std::fs::create_dir(&target_a).expect("site A's target directory");
    run(at_b()
        .args(["reprotect", "vm1", "--cache", &back, "--target"])
        .arg(&target_a)
        .arg("--from-target")
        .arg(&target)
        .args(["--from-cache", &forward]));
    let back_applier = {
        let mut c = vm.tern();
        c.args(["apply", "--cache", &back, "--target"]).arg(&target_a);
        spawn(c, root.join("apply-a.log"), "tern apply at A")
    };
    let socket_b = root.join("b.sock");
    let served_b = {
        let mut c = at_b();
        c.args(["serve", "vm1", "--listen"]).arg(format!("unix:{}", socket_b.display()));
        let mut s = spawn(c, root.join("serve-b.log"), "tern serve at B");
        let log = root.join("serve-b.log");
        wait_listening(&socket_b, &mut s.child, || std::fs::read_to_string(&log).unwrap_or_default());
        s
    };
    let shipper_b = {
        let mut c = at_b();
        c.args(["ship", "vm1"]);
        spawn(c, root.join("ship-b.log"), "tern ship at B")
    };
    write_patterns(&socket_b, 200, 48);
    wait_equal(&disk_b, &target_a.join("vm1/replica/disk0.img"), Duration::from_secs(180), "B's writes back at A");

    // Failback: the VM shut down at B; its shipper records the clean stop.
    served_b.stop();
    let started = Instant::now();
    while !shipper_b.log().contains("the source stopped cleanly") {
        assert!(started.elapsed() < Duration::from_secs(60), "B's clean stop never shipped:\n{}", shipper_b.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    back_applier.stop();
    let out = run(vm.tern().args(["failback", "vm1", "--cache", &back]).arg("--target").arg(&target_a));
    assert!(out.contains("failed back"), "{out}");
    assert_files_equal(&disk_b, &vm.image);
    assert_eq!(shipper_b.exited().code(), Some(3), "B's shipper is fenced off by the failback");

    // The original direction again: B's replica is seeded from the disks
    // the VM ran on there; A's new writes reach it across the link.
    let applier = apply_at_b();
    let served = vm.serve(&[]);
    let shipper = vm.ship(&[]);
    write_patterns(&vm.socket, 300, 32);
    wait_equal(&vm.image, &replica_b, Duration::from_secs(180), "A's writes after the failback");
    drop((served, shipper, applier));
}
