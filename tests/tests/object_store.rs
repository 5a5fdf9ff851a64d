//! The cache store on real object stores (SeaweedFS for S3, Azurite for
//! Azure Blob; `scripts/stores.sh`): the lifecycle through a bucket, sealed
//! segments that a hostile store cannot alter, swap or replay, and clear
//! errors for a missing bucket or refused credentials. Every replica is
//! judged against the source image the client wrote, never against tern's
//! own output.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tern_store::object::Put;
use tern_system_tests::proxy::FaultProxy;
use tern_system_tests::stores::{self, require_stores};
use tern_system_tests::*;

const MIB: u64 = 1 << 20;

fn apply_once(vm: &TestVm, cache: &str, target: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(tern_bin())
        .args(extra)
        .args(["apply", "--cache", cache, "--target"])
        .arg(target)
        .args([&vm.name, "--once"])
        .output()
        .expect("run tern apply")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn replica(target: &Path) -> std::path::PathBuf {
    target.join("vm1/replica/disk0.img")
}

#[test]
fn the_whole_lifecycle_runs_through_an_s3_bucket() {
    let cache = stores::s3("tern-test");
    let vm = TestVm::new(VmSpec {
        disk_size: 16 * MIB,
        random_content: true,
        cache: Some(cache.clone()),
        ..Default::default()
    });
    let target = vm.dir.path().join("target");
    let served = vm.serve(&[]);
    write_patterns(&vm.socket, 0, 40);
    vm.ship_once();
    let out = apply_once(&vm, &cache, &target, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_files_equal(&vm.image, &replica(&target));
    // The objects are where the layout says, and nothing else is.
    let store = stores::open(&cache);
    assert!(store.get("vm1/manifest.toml").unwrap().is_some());
    assert!(store.get("vm1/applied.toml").unwrap().is_some());
    let segments = store.list("vm1/segments").unwrap();
    assert_eq!(segments.len(), 1, "applied segments are deleted, all but the newest: {segments:?}");

    // More writes while it runs, a tag, and the status at the source.
    write_patterns(&vm.socket, 40, 20);
    run(vm.tern().args(["tag", "vm1", "before-failover"]));
    vm.ship_once();
    let out = apply_once(&vm, &cache, &target, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = json(&run(vm.tern().args(["status", "vm1", "--json"])));
    assert_eq!(status[0]["rpo_seconds"].as_f64(), Some(0.0), "the target's progress is read from the bucket: {status}");
    let points = vm.points(&target);
    let app = points.iter().find(|p| p["kind"] == "app").expect("an app point for the tag");
    // The source host of two sites has no target directory: its status
    // learns the points from what the applier published in the bucket.
    let elsewhere = vm.dir.path().join("target-at-the-other-site");
    std::fs::rename(&target, &elsewhere).unwrap();
    let status = json(&run(vm.tern().args(["status", "vm1", "--json"])));
    std::fs::rename(&elsewhere, &target).unwrap();
    assert_eq!(status[0]["points"].as_u64(), Some(points.len() as u64), "{status}");
    assert_eq!(status[0]["state"], "protected", "{status}");
    assert!(status[0]["last_point_age_seconds"].as_f64().is_some(), "{status}");

    // A test failover from the app point, then the real one: the fence
    // goes into the bucket and the source stops at it.
    let out =
        json(&run(vm.tern().args(["failover", "vm1", "--test", "--json", "--point", app["id"].as_str().unwrap()])));
    let drill = out["disks"]["disk0"].as_str().expect("the test failover's disk");
    assert!(Path::new(drill).is_file(), "{out}");
    drop(served);
    run(vm.tern().args(["failover", "vm1", "--latest"]));
    assert!(store.get("vm1/fence.toml").unwrap().is_some(), "the fence is in the bucket");
    assert_files_equal(&vm.image, &target.join("vm1/failover/active/disk0.img"));
    let out = vm.tern().args(["ship", "vm1", "--once"]).output().unwrap();
    assert!(!out.status.success() && stderr(&out).contains("fenced"), "{}", stderr(&out));
}

#[test]
fn sealed_segments_in_azure_blob_open_only_unaltered_with_the_right_key() {
    let cache = stores::azure("tern-test");
    let keys = tempfile::tempdir().unwrap();
    let (key, wrong) = (keys.path().join("vm1.key"), keys.path().join("other.key"));
    for k in [&key, &wrong] {
        run(Command::new(tern_bin()).arg("keygen").arg(k));
    }
    let vm = TestVm::new(VmSpec {
        disk_size: 8 * MIB,
        cache: Some(cache.clone()),
        key: Some(key.clone()),
        ..Default::default()
    });
    let target = vm.dir.path().join("target");
    let served = vm.serve(&[]);
    // Three segments: each ship --once ends one.
    for round in 0..3 {
        write_patterns(&vm.socket, round * 10, 10);
        vm.ship_once();
    }
    drop(served);
    let store = stores::open(&cache);
    let segments = store.list("vm1/segments").unwrap();
    assert!(segments.len() >= 3, "{segments:?}");
    let name = |i: usize| format!("vm1/segments/{}", segments[i].name);
    // Nothing in the bucket is readable without the key.
    let plain = store.get(&name(0)).unwrap().unwrap().bytes;
    assert!(plain.starts_with(b"TERNSEAL"), "sealed");
    assert!(!plain.windows(8).any(|w| w == b"TERNSEGM"), "no segment header in clear");

    for (flags, expect) in [
        (vec![], "no key was given"),
        (vec!["--key".to_string(), wrong.display().to_string()], "does not authenticate"),
    ] {
        let out = apply_once(&vm, &cache, &target, &flags.iter().map(String::as_str).collect::<Vec<_>>());
        let err = stderr(&out);
        assert!(!out.status.success() && err.contains("manifest.toml") && err.contains(expect), "{err}");
    }
    let key_flag = ["--keys", keys.path().to_str().unwrap()];

    // A hostile store: each damage to the second segment is refused,
    // naming it, and the replica stays at the end of the first.
    let good = store.get(&name(1)).unwrap().unwrap().bytes;
    let first = store.get(&name(0)).unwrap().unwrap().bytes;
    let mut flipped = good.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x40;
    for (what, bytes, expect) in [
        ("a flipped bit", flipped, "does not authenticate"),
        ("a truncation", good[..good.len() - 100].to_vec(), "does not authenticate"),
        ("the first segment replayed under its name", first, "sealed as kind 1"),
    ] {
        store.put(&name(1), &bytes, Put::Overwrite).unwrap();
        let out = apply_once(&vm, &cache, &target, &key_flag);
        let err = stderr(&out);
        assert!(!out.status.success(), "{what} was applied");
        assert!(err.contains(&segments[1].name) && err.contains(expect), "{what}: {err}");
        let checkpoint = std::fs::read_to_string(target.join("vm1/replica/checkpoint.toml")).unwrap();
        let (_, last) = segments[0].name.split_once('-').unwrap();
        assert!(
            checkpoint.contains(&format!("applied-seq = {}", last.trim_start_matches('0'))),
            "{what}: the replica stays at the first segment: {checkpoint}"
        );
    }
    // Deleted: the third segment is refused as the one after a gap, the
    // missing seqs named.
    store.delete(&name(1)).unwrap();
    let out = apply_once(&vm, &cache, &target, &key_flag);
    let err = stderr(&out);
    assert!(!out.status.success(), "applied across a deleted segment");
    assert!(err.contains(&segments[2].name) && err.contains("are missing"), "a deleted segment: {err}");
    // Repaired, everything applies and the replica is the source.
    store.put(&name(1), &good, Put::Overwrite).unwrap();
    let out = apply_once(&vm, &cache, &target, &key_flag);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_files_equal(&vm.image, &replica(&target));
}

#[test]
fn another_vms_sealed_segment_moved_into_a_stream_is_refused() {
    let cache = stores::s3("tern-test");
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("shared.key");
    run(Command::new(tern_bin()).arg("keygen").arg(&key));
    let spec =
        || VmSpec { disk_size: 4 * MIB, cache: Some(cache.clone()), key: Some(key.clone()), ..Default::default() };
    // Two VMs named vm1 in two prefixes of the bucket, one key.
    let b_location = stores::s3("tern-test");
    let (a, b) = (TestVm::new(spec()), TestVm::new(VmSpec { cache: Some(b_location.clone()), ..spec() }));
    for vm in [&a, &b] {
        let served = vm.serve(&[]);
        write_patterns(&vm.socket, 0, 5);
        drop(served);
        vm.ship_once();
    }
    let (sa, sb) = (stores::open(&cache), stores::open(&b_location));
    let (la, lb) = (sa.list("vm1/segments").unwrap(), sb.list("vm1/segments").unwrap());
    // B's newest segment, under the name A's next one would have.
    let a_last: u64 = la.last().unwrap().name.split_once('-').unwrap().1.parse().unwrap();
    let b_seg = lb.iter().find(|l| l.name.starts_with(&format!("{:020}", 1))).unwrap_or(&lb[0]);
    let (b_first, b_last) = b_seg.name.split_once('-').unwrap();
    let span: u64 = b_last.parse::<u64>().unwrap() - b_first.parse::<u64>().unwrap();
    let forged = format!("vm1/segments/{:020}-{:020}", a_last + 1, a_last + 1 + span);
    sa.put(&forged, &sb.get(&format!("vm1/segments/{}", b_seg.name)).unwrap().unwrap().bytes, Put::Create).unwrap();
    let target = a.dir.path().join("target");
    let out = apply_once(&a, &cache, &target, &["--key", key.to_str().unwrap()]);
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains(&forged.replace("vm1/segments/", "")), "{err}");
    assert!(err.contains("sealed as") || err.contains("does not authenticate"), "{err}");
}

#[test]
fn a_missing_bucket_or_refused_credentials_fail_enable_at_once_and_clearly() {
    require_stores();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d.img");
    std::fs::File::create(&image).unwrap().set_len(MIB).unwrap();
    let enable = |cache: &str, env: &[(&str, &str)]| {
        let started = Instant::now();
        let out = tern_with_state(&dir.path().join("state"))
            .envs(env.iter().copied())
            .args(["enable", "vm1", "--cache", cache, "--target"])
            .arg(dir.path())
            .arg("--disk")
            .arg(format!("disk0={}", image.display()))
            .output()
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(20), "no retry loop: {:?}", started.elapsed());
        assert!(!out.status.success(), "enable succeeded against {cache}");
        stderr(&out)
    };
    let err = enable("s3://no-such-bucket-tern/x", &[]);
    assert!(err.contains("s3://no-such-bucket-tern/x") && err.contains("does not exist"), "{err}");
    assert!(err.contains("create the bucket"), "{err}");
    let err = enable("s3://tern-test/x", &[("AWS_SECRET_ACCESS_KEY", "wrong")]);
    assert!(err.contains("s3://tern-test/x"), "{err}");
    assert!(
        err.contains("credentials") || err.contains("SignatureDoesNotMatch") || err.contains("AccessDenied"),
        "{err}"
    );
    assert!(!err.contains("wrong"), "a secret is never printed: {err}");
    let err = enable("az://no-such-container/x", &[]);
    assert!(err.contains("does not exist") && err.contains("container"), "{err}");
    assert!(!dir.path().join("state/vm1").exists(), "nothing enabled");
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn the_store_killed_mid_upload_and_back_later_loses_nothing() {
    let weed_dir = tempfile::Builder::new().prefix("tern-weed-").tempdir_in(test_root()).unwrap();
    let mut weed = stores::PrivateSeaweed::start(weed_dir.path(), 19500);
    let cache = stores::s3("tern-test");
    let env = vec![("AWS_ENDPOINT_URL".to_string(), weed.endpoint())];
    let vm =
        TestVm::new(VmSpec { disk_size: 16 * MIB, cache: Some(cache.clone()), env: env.clone(), ..Default::default() });
    let served = vm.serve(&[]);
    let ship = vm.ship(&[]);
    write_patterns(&vm.socket, 0, 30);
    std::thread::sleep(Duration::from_secs(1));
    // The store dies while segments are going up; the VM writes on: its
    // writes are acknowledged (the journal and the bitmap absorb them).
    weed.kill9();
    write_patterns(&vm.socket, 30, 60);
    let waited = Instant::now();
    let failing = loop {
        // (Exit 2: no point at the target yet; the report is what counts.)
        let out = vm.tern().args(["status", "vm1", "--json"]).output().unwrap();
        let status = json(&String::from_utf8_lossy(&out.stdout));
        if let Some(e) = status[0]["last_error"].as_str() {
            break e.to_string();
        }
        assert!(waited.elapsed() < Duration::from_secs(60), "status never reported the store down: {status}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(failing.contains(&cache), "the error names the store: {failing}");
    weed.restart();
    write_patterns(&vm.socket, 90, 10);
    // The shipper finds the store back on its own (a stop asked while it
    // still retries ends it with the records unshipped, exit 1: right, but
    // not this test's case). `restart` returns once the port accepts, which
    // may be before the store serves: wait for the shipper to say so.
    let waited = Instant::now();
    while !ship.log().contains("succeeded after") {
        assert!(waited.elapsed() < Duration::from_secs(120), "the shipper never recovered: {}", ship.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    served.stop();
    ship.stop();
    vm.ship_once();
    let target = vm.dir.path().join("target");
    let out = Command::new(tern_bin())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(["apply", "--cache", &cache, "--target"])
        .arg(&target)
        .args(["vm1", "--once"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_files_equal(&vm.image, &replica(&target));
    let log = std::fs::read_to_string(vm.dir.path().join("ship.log")).unwrap();
    assert!(log.contains("succeeded after"), "the shipper said it recovered: {log}");
}

#[test]
fn a_cut_link_a_throttling_store_and_lost_answers_lose_nothing() {
    require_stores();
    let upstream: std::net::SocketAddr = "127.0.0.1:8333".parse().unwrap();
    let proxy = FaultProxy::start(upstream);
    let cache = stores::s3("tern-test");
    let env = vec![("AWS_ENDPOINT_URL".to_string(), proxy.endpoint())];
    let vm = TestVm::new(VmSpec { disk_size: 16 * MIB, cache: Some(cache.clone()), env, ..Default::default() });
    let served = vm.serve(&[]);
    let ship = vm.ship(&[]);
    write_patterns(&vm.socket, 0, 20);
    // The link is cut for 30 s while the VM writes on: every write is
    // acknowledged (the journal and the bitmap absorb them).
    proxy.cut(true);
    let cut_at = Instant::now();
    let mut round = 20;
    while cut_at.elapsed() < Duration::from_secs(30) {
        write_patterns(&vm.socket, round, 5);
        round += 5;
        std::thread::sleep(Duration::from_millis(500));
    }
    proxy.cut(false);
    // The store throttles: five requests answered 503 SlowDown.
    proxy.slow_down(5);
    write_patterns(&vm.socket, round, 10);
    // A PUT reaches the store but its answer is lost: the retry finds the
    // object there, reads it back and counts it written.
    proxy.lose_put_answers(1);
    write_patterns(&vm.socket, round + 10, 10);
    let waited = Instant::now();
    while proxy.slowed() < 5 || proxy.lost() < 1 {
        assert!(
            waited.elapsed() < Duration::from_secs(120),
            "slowed {} lost {}: {}",
            proxy.slowed(),
            proxy.lost(),
            std::fs::read_to_string(vm.dir.path().join("ship.log")).unwrap_or_default()
        );
        write_patterns(&vm.socket, round + 20, 1);
        std::thread::sleep(Duration::from_millis(200));
    }
    served.stop();
    let log = ship.stop();
    vm.ship_once();
    let target = vm.dir.path().join("target");
    let out = apply_once(&vm, &cache, &target, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_files_equal(&vm.image, &replica(&target));
    assert!(log.contains("cannot write segment") || log.contains("cannot"), "the outage was logged: {log}");
    assert!(log.contains("succeeded after"), "and its end: {log}");
    assert!(
        log.contains("already written with the same content") || log.contains("already shipped with the same records"),
        "the lost answer was settled by reading back: {log}"
    );
}

#[test]
fn a_create_whose_answer_is_lost_is_settled_by_reading_it_back() {
    require_stores();
    let proxy = FaultProxy::start("127.0.0.1:8333".parse().unwrap());
    let location = stores::s3("tern-test");
    let store = stores::open_at(&proxy.endpoint(), &location);
    proxy.lose_put_answers(1);
    store.put("vm1/segments/a", b"one", Put::Create).expect("settled by reading back");
    assert_eq!(proxy.lost(), 1, "the answer was lost");
    assert_eq!(store.get("vm1/segments/a").unwrap().unwrap().bytes, b"one");
    // Another writer's bytes under the name are not ours: refused.
    proxy.lose_put_answers(1);
    let e = store.put("vm1/segments/a", b"two", Put::Create).unwrap_err();
    assert!(e.to_string().contains("already exists with other content"), "{e}");
}

/// A full store is absorbed like a full disk. SeaweedFS enforces a bucket
/// quota by making the bucket read-only (its PUTs then fail with
/// InternalError): the VM's writes go on, `tern ship` keeps retrying and
/// `tern status` says what fails, and once the operator makes room
/// everything arrives, nothing lost.
#[test]
fn a_bucket_over_its_quota_is_absorbed_like_a_full_disk() {
    let bucket = format!("tern-quota-{}", std::process::id());
    stores::weed_shell(&format!("s3.bucket.create -name {bucket}"));
    let cache = format!("s3://{bucket}/t");
    let vm = TestVm::new(VmSpec {
        disk_size: 8 * MIB,
        random_content: true,
        cache: Some(cache.clone()),
        ..Default::default()
    });
    let target = vm.dir.path().join("target");
    let served = vm.serve(&[]);
    vm.ship_once(); // 8 MiB of random bytes: over a 1 MB quota
    let quota = stores::weed_shell(&format!("s3.bucket.quota -name={bucket} -op=set -sizeMB=1"));
    assert!(quota.contains(&format!("updated quota for bucket {bucket}")), "{quota}");
    // SeaweedFS's own enforcer (`s3.bucket.quota.enforce`) sees the usage
    // only once the volume servers' periodic reports reach the master,
    // which took over a minute on a loaded CI machine: the bucket is made
    // read-only here the way the enforcer does it, a read-only rule on
    // the bucket's path.
    let rule = stores::weed_shell(&format!("fs.configure -locationPrefix=/buckets/{bucket}/ -readOnly=true -apply"));
    assert!(rule.contains(&format!("\"locationPrefix\":  \"/buckets/{bucket}/\"")), "{rule}");

    let shipper = vm.ship(&[]);
    write_patterns(&vm.socket, 0, 40); // acknowledged while the store refuses
    let started = Instant::now();
    let failing = loop {
        // (Non-zero while not healthy, like a monitoring plugin.)
        let out = vm.tern().args(["status", "vm1", "--json"]).output().expect("tern status");
        let status = json(&String::from_utf8_lossy(&out.stdout));
        if status[0]["last_error"].as_str().is_some_and(|e| e.contains(&bucket)) {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "status never showed the full store: {status}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(failing[0]["cache_errors"].as_u64() > Some(0), "{failing}");
    assert!(failing[0]["pending_bytes"].as_u64() > Some(0), "the journal holds what is not stored: {failing}");
    write_patterns(&vm.socket, 40, 10);

    // Room again: the quota lifted (which also lifts read-only).
    stores::weed_shell(&format!("s3.bucket.quota -name={bucket} -op=remove"));
    let started = Instant::now();
    while !shipper.log().contains("succeeded after") {
        assert!(started.elapsed() < Duration::from_secs(60), "the shipper never recovered:\n{}", shipper.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(served);
    shipper.stop();
    vm.ship_once(); // whatever the stopped shipper left
    let out = apply_once(&vm, &cache, &target, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_files_equal(&vm.image, &replica(&target));
    stores::weed_shell(&format!("s3.bucket.delete -name {bucket}"));
}

/// A link slower than a segment over the request timeout: the segment
/// ships and applies all the same, since a transfer is given the time
/// its size takes at the slowest rate tern waits for
/// (`TERN_STORE_MIN_RATE`), not the request timeout (`TERN_STORE_TIMEOUT`,
/// short here as it is for requests without a body).
#[test]
fn a_segment_that_needs_longer_than_the_request_timeout_ships_through_a_slow_link() {
    require_stores();
    let proxy = FaultProxy::start("127.0.0.1:8333".parse().unwrap());
    // 1 MiB/s each way, against a 2 s request timeout: anything over 2 MiB
    // takes longer than that.
    proxy.throttle(MIB);
    let timeout = 2;
    let cache = stores::s3("tern-test");
    let env = vec![
        ("AWS_ENDPOINT_URL".to_string(), proxy.endpoint()),
        ("TERN_STORE_TIMEOUT".to_string(), format!("{timeout}s")),
        ("TERN_STORE_MIN_RATE".to_string(), "256KiB/s".to_string()),
    ];
    // Random data does not compress: the initial sync is one segment of
    // about the disk's size.
    let vm = TestVm::new(VmSpec {
        disk_size: 6 * MIB,
        random_content: true,
        cache: Some(cache.clone()),
        env,
        ..Default::default()
    });
    let started = Instant::now();
    let ship = vm.ship(&["--once"]);
    let status = ship.exited();
    let log = std::fs::read_to_string(vm.dir.path().join("ship.log")).unwrap_or_default();
    assert!(status.success(), "tern ship --once through the slow link: {status}\n{log}");
    assert!(!log.contains("timed out") && !log.contains("cannot write"), "no attempt failed: {log}");
    let shipped = started.elapsed();
    let store = stores::open(&cache);
    let largest = store.list("vm1/segments").unwrap().iter().map(|l| l.size).max().unwrap_or(0);
    assert!(largest > timeout * MIB, "a segment of {largest} bytes crosses the link within the request timeout");
    // The applier reads it through the same link, with the same limits.
    let target = vm.dir.path().join("target");
    let env: Vec<(&str, &str)> = vm.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let applying = Instant::now();
    let out = vm.apply_with(Path::new(&cache), &target, &[], &env);
    assert!(out.status.success(), "tern apply through the slow link: {}", stderr(&out));
    assert!(!stderr(&out).contains("timed out"), "no attempt failed: {}", stderr(&out));
    assert_files_equal(&vm.image, &replica(&target));
    eprintln!("largest segment {largest} bytes: shipped in {shipped:?}, applied in {:?}", applying.elapsed());
}

/// A link that stops moving (connections open, nothing forwarded) fails
/// a transfer within a bounded time, with an error that names the
/// object, its size and the setting to change: a PUT at its deadline
/// (the time its size takes at the slowest rate waited for, plus the
/// request timeout), a GET as soon as nothing arrived for the request
/// timeout.
#[test]
fn a_stalled_link_fails_a_transfer_in_bounded_time_naming_object_size_and_setting() {
    use tern_driver::units::Rate;
    use tern_store::object::Timeouts;
    require_stores();
    let proxy = FaultProxy::start("127.0.0.1:8333".parse().unwrap());
    let location = stores::s3("tern-test");
    let timeouts = Timeouts { request: Duration::from_secs(1), min_rate: Rate(MIB) };
    let store = stores::open_at_with(&proxy.endpoint(), &location, timeouts);
    let data: Vec<u8> = (0..3 * MIB).map(|i| (i * 7919 % 251) as u8).collect();
    store.put("vm1/segments/a", &data, Put::Create).unwrap();

    // A PUT into the dark: 1 s and 3 MiB at 1 MiB/s.
    proxy.stall(true);
    let started = Instant::now();
    let e = store.put("vm1/segments/b", &data, Put::Create).unwrap_err().to_string();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(3900) && took < Duration::from_secs(10),
        "the PUT failed after {took:?}: {e}"
    );
    eprintln!("a stalled PUT, after {took:?}: {e}");
    for part in [store.location("vm1/segments/b").as_str(), "3.0 MiB", "TERN_STORE_MIN_RATE"] {
        assert!(e.contains(part), "{part:?} is not in: {e}");
    }

    // A GET that stops half-way is caught after 1 s of silence, before its
    // 4 s deadline.
    proxy.stall(false);
    proxy.throttle(MIB);
    let e = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(1500));
            proxy.stall(true);
        });
        let started = Instant::now();
        let e = store.get("vm1/segments/a").unwrap_err().to_string();
        let took = started.elapsed();
        assert!(took < Duration::from_millis(3500), "the GET failed after {took:?}: {e}");
        eprintln!("a GET stalled half-way, after {took:?}: {e}");
        e
    });
    for part in [store.location("vm1/segments/a").as_str(), "3.0 MiB", "nothing received", "TERN_STORE_TIMEOUT"] {
        assert!(e.contains(part), "{part:?} is not in: {e}");
    }
    // The link back, the object reads whole.
    proxy.stall(false);
    proxy.throttle(0);
    assert_eq!(store.get("vm1/segments/a").unwrap().unwrap().bytes, data);
}

/// A read of the cache that fails as `tern ship` starts (a link that
/// drops, a store restarting) is retried like any other store failure:
/// the shipper goes on, and never calls a good segment damaged (moving
/// one away costs a new epoch and a checksum comparison). Nor does the
/// applier call a segment it could not read damage to repair.
#[test]
fn a_failed_read_of_the_cache_is_retried_never_taken_for_a_damaged_segment() {
    require_stores();
    let proxy = FaultProxy::start("127.0.0.1:8333".parse().unwrap());
    let cache = stores::s3("tern-test");
    let env = vec![("AWS_ENDPOINT_URL".to_string(), proxy.endpoint())];
    let vm = TestVm::new(VmSpec { disk_size: 4 * MIB, cache: Some(cache.clone()), env, ..Default::default() });
    let served = vm.serve(&[]);
    write_patterns(&vm.socket, 0, 10);
    vm.ship_once();
    // The next start's reads of the newest segment fail, twice as often
    // as the store's client retries one (six attempts).
    write_patterns(&vm.socket, 10, 10);
    proxy.fail_gets("/vm1/segments/", 12);
    let started = Instant::now();
    let log = vm.ship_once();
    assert_eq!(proxy.failed_gets(), 12, "{log}");
    assert!(!log.contains("damaged"), "a failed read called a segment damaged: {log}");
    assert!(log.contains("cannot read the newest segment") && log.contains("succeeded after"), "{log}");
    eprintln!("shipped after 12 failed reads of the newest segment in {:?}", started.elapsed());
    // Then the manifest's.
    write_patterns(&vm.socket, 20, 10);
    proxy.fail_gets("/vm1/manifest.toml", 12);
    let log = vm.ship_once();
    assert_eq!(proxy.failed_gets(), 24, "{log}");
    assert!(log.contains("cannot read") && log.contains("manifest.toml") && log.contains("succeeded after"), "{log}");
    drop(served);

    // The applier: a segment it could not read is tried again later (here,
    // with --once, the next run), not refused as damaged.
    let target = vm.dir.path().join("target");
    let env: Vec<(&str, &str)> = vm.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    proxy.fail_gets("/vm1/segments/", 6);
    let out = vm.apply_with(Path::new(&cache), &target, &[], &env);
    let err = stderr(&out);
    assert!(!out.status.success(), "applied although its reads failed: {err}");
    assert!(err.contains("cannot read") && err.contains("/vm1/segments/"), "{err}");
    assert!(!err.contains("repair or re-ship"), "a failed read called damage: {err}");
    proxy.fail_gets("/vm1/segments/", 0);
    let out = vm.apply_with(Path::new(&cache), &target, &[], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_files_equal(&vm.image, &replica(&target));
}
