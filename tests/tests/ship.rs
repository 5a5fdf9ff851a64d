//! `tern ship` end to end (invariants 4, 5 and 8): the cache, replayed from
//! an empty disk, must give the source image byte for byte — beside a live
//! server under load, across `kill -9` at every step of writing a segment,
//! after the ring overflowed, while the cache is full or gone, and after a
//! host crash.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tern_system_tests::*;

/// fio writing random blocks over the first `region` of the disk.
fn fio_writes(vm: &TestVm, jobs: u32, region: &str, extra: &[&str]) -> Command {
    require("fio");
    let mut c = Command::new("fio");
    c.args([
        "--name=ship",
        "--ioengine=nbd",
        &format!("--uri={}", vm.uri("disk0")),
        "--rw=randwrite",
        "--bsrange=4k-256k",
        "--iodepth=8",
        &format!("--numjobs={jobs}"),
        &format!("--size={region}"),
        "--norandommap",
        "--randrepeat=0",
        "--refill_buffers",
        "--buffer_compress_percentage=50",
        "--thread",
    ])
    .args(extra)
    .stdout(Stdio::null());
    c
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn segment_names(vm: &TestVm) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(vm.cache_dir().join("segments"))
        .map(|d| d.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn ship_beside_a_live_server_under_load_reproduces_the_source_from_an_empty_replica() {
    let vm =
        TestVm::new(VmSpec { disk_size: 32 << 20, journal_size: "64MiB", random_content: true, ..Default::default() });
    let served = vm.serve(&[]);
    let ship = vm.ship(&[]);
    let status = fio_writes(&vm, 2, "32m", &["--io_size=48m"]).status().expect("fio");
    assert!(status.success(), "fio failed");
    // SIGTERM: the current segment is finished, then a clean exit.
    ship.stop();
    let report = vm.ship_report();
    assert!(report["segments_shipped"].as_u64().unwrap_or(0) > 0, "{report}");
    assert!(report["compression_ratio"].as_f64().unwrap_or(0.0) > 1.2, "half-compressible writes: {report}");
    // Catch up with the rest while the server still runs, then once more
    // after it stopped (nothing left, and no error).
    vm.ship_once();
    served.stop();
    vm.ship_once();
    vm.assert_cache_reproduces_source();
    let log = std::fs::read_to_string(vm.dir.path().join("serve.log")).unwrap_or_default();
    assert!(log.contains("resync complete"), "the initial sync must have finished:\n{log}");
}

#[test]
fn a_front_end_killed_between_publishing_a_write_and_writing_the_image_loses_nothing() {
    let vm = TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "64MiB", ..Default::default() });
    let served = vm.serve(&[]);
    let mut c = RawClient::connect(&vm.socket, "disk0");
    assert_eq!(c.call(CMD_WRITE, 0, 0, 4096, &[0x11; 4096]).error, 0);
    drop(c);
    served.stop();
    // The next write is published (the shipper may read it), then the
    // server dies before writing the image: its record stays busy.
    let served = vm.serve_with_env(&[], &[("TERN_FAILPOINTS", "serve:record-published=kill")]);
    let mut c = RawClient::connect(&vm.socket, "disk0");
    c.send(CMD_WRITE, 0, 1, 8192, 4096, &[0x22; 4096]);
    assert!(c.reply(|_| 0).is_none(), "the server must die before acknowledging");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(served.exited().signal(), Some(9));
    // The shipper ships it (published), and, finding no front-end, recovers
    // the journal itself: the published write is re-applied to the image
    // and its record released (until then the tail may not pass it). A
    // second run goes on from the cache.
    let log = vm.ship_once();
    assert!(log.contains("recovering after an unclean stop"), "{log}");
    let shipped = segment_names(&vm);
    let log = vm.ship_once();
    assert_eq!(segment_names(&vm), shipped, "the second run shipped again what the cache had:\n{log}");
    let served = vm.serve(&[]);
    let mut c = RawClient::connect(&vm.socket, "disk0");
    let r = c.call(CMD_READ, 0, 8192, 4096, &[]);
    assert!(r.data.iter().all(|&b| b == 0x22), "the published write is in the image");
    drop(c);
    served.stop();
    vm.ship_once();
    let header = run(vm.tern().args(["journal", "dump", &vm.name, "--header"]));
    assert!(header.contains("fill 0.0%"), "the tail passed the released record:\n{header}");
    vm.assert_journal_reproduces_source();
    vm.assert_cache_reproduces_source();
}

/// Issue 17, bug 1: a zeroing (like a WRITE that found its range busy) was
/// published consumable before the image changed; a running shipper could
/// ship it and move the tail past it, and the front-end killed before the
/// image write never re-applied it. The source kept the old data, the
/// replica got zeroes, forever.
#[test]
fn a_record_shipped_before_its_image_change_is_reapplied_after_a_kill() {
    let vm = TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "64MiB", ..Default::default() });
    let served = vm.serve(&[]);
    let mut c = RawClient::connect(&vm.socket, "disk0");
    assert_eq!(c.call(CMD_WRITE, 0, 0, 65536, &[0x5a; 65536]).error, 0);
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).error, 0);
    drop(c);
    served.stop();
    vm.ship_once();
    let shipped_before = vm.ship_report()["last_shipped_seq"].as_u64().expect("last shipped");
    // The next change is published, and the server is caught there (before
    // the image has it) while a shipper beside it ships the record; then it
    // is killed.
    let served = vm.serve_with_env(&[], &[("TERN_FAILPOINTS", "serve:record-published=delay:30000")]);
    let ship = vm.ship(&[]);
    let mut c = RawClient::connect(&vm.socket, "disk0");
    c.send(CMD_WRITE_ZEROES, 0, 1, 0, 65536, &[]);
    wait_for("the shipper to ship the zeroing", Duration::from_secs(20), || {
        vm.ship_report()["last_shipped_seq"].as_u64().is_some_and(|s| s > shipped_before)
    });
    // Long enough for the tail to have moved past it, had it been free to.
    std::thread::sleep(Duration::from_millis(500));
    served.kill9();
    ship.stop();
    // The restart recovers from the tail: the record must still be there.
    let served = vm.serve(&[]);
    let mut c = RawClient::connect(&vm.socket, "disk0");
    let r = c.call(CMD_READ, 0, 0, 65536, &[]);
    assert!(r.data.iter().all(|&b| b == 0), "the shipped zeroing is missing from the source image");
    drop(c);
    served.stop();
    vm.ship_once();
    vm.assert_cache_reproduces_source();
}

#[test]
fn kill_9_at_each_step_of_writing_a_segment_never_exposes_a_partial_one() {
    let vm =
        TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "64MiB", random_content: true, ..Default::default() });
    let served = vm.serve(&[]);
    for point in [
        "ship:batch-read",
        "ship:segment-written",
        "ship:segment-synced",
        "ship:segment-linked",
        "ship:segment-renamed",
    ] {
        let status = fio_writes(&vm, 1, "16m", &["--io_size=4m"]).status().expect("fio");
        assert!(status.success());
        let armed = format!("{point}=kill");
        let out =
            vm.tern_env(&[("TERN_FAILPOINTS", &armed)]).args(["ship", &vm.name, "--once"]).output().expect("ship");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(9),
            "{point}: ship must die there:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Whatever is visible under a segment's name is complete and valid.
        run(vm.tern().args(["segment", "verify"]).arg(vm.cache_dir()));
        let names = segment_names(&vm);
        let temporaries = names.iter().filter(|n| n.ends_with(".tmp")).count();
        match point {
            "ship:segment-written" | "ship:segment-synced" => {
                assert_eq!(temporaries, 1, "{point}: the half-written segment stays a temporary: {names:?}")
            }
            _ => assert_eq!(temporaries, 0, "{point}: {names:?}"),
        }
        // The restart cleans up and goes on where the cache stands.
        let log = vm.ship_once();
        if point == "ship:segment-renamed" || point == "ship:segment-linked" {
            assert!(log.contains("already in the cache"), "the restart must skip what was shipped:\n{log}");
        }
        assert!(segment_names(&vm).iter().all(|n| !n.ends_with(".tmp")), "temporaries are removed");
    }
    served.stop();
    vm.ship_once();
    vm.assert_cache_reproduces_source();
}

#[test]
fn ring_overflow_is_caught_up_by_resync_and_its_segments_carry_the_window() {
    // A sparse disk (no initial sync) and a ring far smaller than the writes.
    let vm =
        TestVm::new(VmSpec { disk_size: 32 << 20, journal_size: "1MiB", region_size: "64KiB", ..VmSpec::default() });
    let served = vm.serve(&[]);
    // A first small write ships while the replica is consistent …
    run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "write -P 7 0 64k"]));
    vm.ship_once();
    // … then, with no shipper, far more than the ring holds: it overflows
    // and the VM's writes go on into the bitmap.
    let status = fio_writes(&vm, 2, "32m", &["--io_size=24m"]).status().expect("fio");
    assert!(status.success(), "writes must not fail when the ring is full");
    let header = run(vm.tern().args(["journal", "dump", &vm.name, "--header"]));
    assert!(header.contains("mode Overflow"), "{header}");
    // ship --once while serve runs: serve's resync re-sends the dirty
    // regions as ship makes room, and ship returns once the window closed.
    vm.ship_once();
    served.stop();
    vm.assert_cache_reproduces_source();
    // The window is visible in the segment headers: one opens it, one
    // closes it, none of those before.
    let windows: Vec<String> = segment_names(&vm)
        .iter()
        .map(|n| {
            let dump =
                run(vm.tern().args(["segment", "dump", "--header"]).arg(vm.cache_dir().join("segments").join(n)));
            dump.lines().find(|l| l.trim_start().starts_with("window")).unwrap_or("").trim().to_string()
        })
        .collect();
    assert!(windows[0].contains("none"), "{windows:?}");
    assert!(windows.iter().any(|w| w.contains("opens")), "{windows:?}");
    assert!(windows.last().is_some_and(|w| w.contains("closes") || w.contains("none")), "{windows:?}");
    let first_open = windows.iter().position(|w| w.contains("opens")).expect("opens");
    assert!(windows[..first_open].iter().all(|w| w.contains("none")), "{windows:?}");
}

#[test]
fn a_full_cache_never_fails_the_vm_and_replication_completes_once_space_returns() {
    let vm =
        TestVm::new(VmSpec { disk_size: 24 << 20, journal_size: "4MiB", random_content: false, ..Default::default() });
    // The cache store is a small filesystem, nearly filled by someone else.
    let cache_root = vm.dir.path().join("cache");
    let _fs = mount_loop_fs("ext4", &vm.dir.path().join("cache.fs"), &cache_root, 32);
    run(Command::new("mkdir").arg(&cache_root).arg("-p"));
    let filler = cache_root.join("filler");
    let fill = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=40", "status=none"])
        .arg(format!("of={}", filler.display()))
        .status()
        .expect("dd");
    assert!(!fill.success(), "dd must hit ENOSPC filling the cache");
    let served = vm.serve(&[]);
    let ship = vm.ship(&[]);
    // Incompressible writes, more than the ring holds: the cache is full,
    // ship cannot write, the ring overflows — and the VM's writes succeed.
    let status = fio_writes(&vm, 1, "24m", &["--io_size=16m", "--buffer_compress_percentage=0"]).status().expect("fio");
    assert!(status.success(), "a full cache must never fail the VM's writes");
    wait_for("ship to report the cache error", Duration::from_secs(30), || {
        vm.ship_report()["cache_errors"].as_u64().unwrap_or(0) > 0
    });
    assert!(vm.ship_report()["cache_failing"].as_str().unwrap_or("").contains("No space left"), "{}", vm.ship_report());
    // Space returns: ship's retry succeeds and the resync catches up.
    std::fs::remove_file(&filler).expect("remove filler");
    ship.stop();
    vm.ship_once();
    served.stop();
    vm.ship_once();
    vm.assert_cache_reproduces_source();
}

#[test]
fn the_cache_store_gone_and_back_loses_nothing() {
    let vm =
        TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "64MiB", random_content: true, ..Default::default() });
    let served = vm.serve(&[]);
    vm.ship_once();
    let ship = vm.ship(&[]);
    let pid = ship.child.id() as u64;
    wait_for("ship to start", Duration::from_secs(30), || vm.ship_report()["pid"].as_u64() == Some(pid));
    let (cache, away) = (vm.dir.path().join("cache"), vm.dir.path().join("cache.away"));
    std::fs::rename(&cache, &away).expect("take the cache away");
    let status = fio_writes(&vm, 1, "16m", &["--io_size=8m"]).status().expect("fio");
    assert!(status.success());
    wait_for("ship to report the missing cache", Duration::from_secs(30), || {
        vm.ship_report()["cache_failing"].as_str().unwrap_or("").contains("is missing")
    });
    assert!(!cache.exists(), "ship must not create the cache store itself");
    std::fs::rename(&away, &cache).expect("bring the cache back");
    wait_for("ship to recover", Duration::from_secs(60), || vm.ship_report()["cache_failing"].is_null());
    ship.stop();
    served.stop();
    vm.ship_once();
    vm.assert_cache_reproduces_source();
}

/// Three 4 KiB writes in three 64 KiB regions (1M, 5M, 9M) of disk0.
fn write_three_regions(vm: &TestVm) {
    let mut io = Command::new("qemu-io");
    io.args(["-f", "raw", &vm.uri("disk0")]);
    for (i, off) in ["1M", "5M", "9M"].iter().enumerate() {
        io.args(["-c", &format!("write -P {} {off} 4k", i + 1)]);
    }
    run(&mut io);
}

/// Kills `tern serve` and makes the journal look as if the host went down
/// (attached, another boot id).
fn crash_the_host(vm: &TestVm, served: Served) {
    served.kill9();
    let journal = vm.state.join(&vm.name).join("journal");
    // The host's memory is gone, and the journal's live ring with it.
    let ring = std::fs::read_link(journal.with_file_name("journal.ring")).expect("the journal's ring link");
    std::fs::remove_file(&ring).expect("remove the live ring");
    run(Command::new("dd")
        .args(["if=/dev/urandom", "bs=16", "count=1", "seek=200", "oflag=seek_bytes", "conv=notrunc", "status=none"])
        .arg(format!("of={}", journal.display())));
}

#[test]
fn after_a_host_crash_only_the_regions_that_differ_from_the_replica_are_shipped() {
    let vm =
        TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "64MiB", random_content: true, ..Default::default() });
    let served = vm.serve(&[]);
    vm.ship_once();
    // Three writes the journal holds but the cache never gets: the host
    // goes down before they are shipped.
    write_three_regions(&vm);
    crash_the_host(&vm, served);
    let served = vm.serve(&[]);
    let ship = vm.ship(&["--checksum-timeout", "10m"]);
    let request = vm.cache_dir().join("hash-request.toml");
    wait_for("ship to ask the target for hashes", Duration::from_secs(30), || request.exists());
    // The target: its replica is the cache replayed; it answers.
    let replica = vm.dir.path().join("target-replica.img");
    std::fs::File::create(&replica).expect("replica").set_len(16 << 20).expect("size");
    let answered = run(vm
        .tern()
        .args(["segment", "replay"])
        .arg(vm.cache_dir())
        .arg("--onto")
        .arg(format!("disk0={}", replica.display()))
        .arg("--answer-hashes"));
    assert!(answered.contains("answered"), "{answered}");
    wait_for("the comparison", Duration::from_secs(30), || !request.exists());
    ship.stop();
    let log = std::fs::read_to_string(vm.dir.path().join("ship.log")).expect("ship log");
    assert!(log.contains("3 of 256 regions differ"), "exactly the three lost writes differ:\n{log}");
    vm.ship_once();
    served.stop();
    vm.ship_once();
    vm.assert_cache_reproduces_source();
}

#[test]
fn after_a_host_crash_with_no_answer_from_the_target_a_full_resync_brings_the_replica_back() {
    let vm =
        TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "64MiB", random_content: true, ..Default::default() });
    let served = vm.serve(&[]);
    vm.ship_once();
    let status = fio_writes(&vm, 1, "16m", &["--io_size=4m"]).status().expect("fio");
    assert!(status.success());
    crash_the_host(&vm, served);
    let served = vm.serve(&[]);
    assert!(served.log().contains("the host went down"), "{}", served.log());
    let status = fio_writes(&vm, 1, "16m", &["--io_size=2m"]).status().expect("fio");
    assert!(status.success());
    // No target answers the hash request: after the timeout, every region
    // is re-sent.
    let log = vm.ship_once_with(&["--checksum-timeout", "0s"]);
    assert!(log.contains("starting epoch 2"), "{log}");
    assert!(log.contains("full resync"), "{log}");
    served.stop();
    vm.ship_once();
    let manifest = std::fs::read_to_string(vm.cache_dir().join("manifest.toml")).expect("manifest");
    assert!(manifest.contains("number = 2"), "{manifest}");
    vm.assert_cache_reproduces_source();
}

/// The ring vanishing from memory under a running `tern serve` (a tmpfs
/// cleared, logind's RemoveIPC): a shipper starting then rebuilt it from
/// the durable journal and shipped that stale copy, while the front-end
/// went on writing to the ring it still mapped, which nobody shipped. The
/// rebuilt ring now needs recovery: the shipper says so and waits, and
/// once `tern serve` is restarted every write arrives.
#[test]
fn a_ring_that_vanished_under_a_running_serve_is_waited_for_and_recovered() {
    let vm =
        TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "64MiB", random_content: true, ..Default::default() });
    let served = vm.serve(&[]);
    vm.ship_once();
    run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "write -P 1 1M 64k"]));
    let journal = vm.state.join(&vm.name).join("journal");
    let ring = std::fs::read_link(journal.with_file_name("journal.ring")).expect("the journal's ring link");
    std::fs::remove_file(&ring).expect("remove the live ring");
    run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "write -P 2 2M 64k"]));
    let ship = vm.ship(&["--checksum-timeout", "0s"]);
    wait_for("the shipper to say it waits", Duration::from_secs(60), || ship.log().contains("must be recovered"));
    let shipped = segment_names(&vm);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(segment_names(&vm), shipped, "nothing is shipped from the rebuilt ring meanwhile");
    served.stop();
    let served = vm.serve(&[]);
    run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "write -P 3 3M 64k"]));
    served.stop();
    ship.stop();
    vm.ship_once();
    vm.assert_cache_reproduces_source();
}

/// A first manifest written over a ring a host crash emptied while it was
/// in overflow (the cache store unreachable all along): no opener is in
/// the ring (none is journaled in overflow), yet the replica must start
/// inside a window. The manifest said it started consistent, and a
/// failover then took point 0 of the empty replica.
#[test]
fn a_first_manifest_over_an_emptied_overflowed_ring_starts_in_a_window() {
    let vm = TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "1MiB", ..Default::default() });
    let served = vm.serve(&[]);
    let status = fio_writes(&vm, 1, "16m", &["--io_size=4m"]).status().expect("fio");
    assert!(status.success());
    crash_the_host(&vm, served);
    // The shipper starts first: it recovers the journal itself.
    vm.ship_killed_at("ship:segment-written=kill@1");
    let manifest = std::fs::read_to_string(vm.cache_dir().join("manifest.toml")).expect("manifest");
    assert!(manifest.contains("starts-in-window = true"), "{manifest}");
    let out = vm.tern().args(["failover", &vm.name, "--test", "--latest"]).output().expect("failover");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("inside a resync window at seq"), "{err}");
    assert!(err.contains("there is no point yet"), "{err}");
}

/// Issue 17, bug 8: after a host crash before the first segment was
/// shipped, the shipper took the jumped sequence numbers for a plain
/// continuation of the manifest's stream (no new epoch), and the applier
/// stopped for good on the "gap".
#[test]
fn a_host_crash_before_the_first_segment_starts_an_epoch_the_target_accepts() {
    // Sparse: no initial sync, so the first ship writes the manifest and
    // no segment.
    let vm = TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "64MiB", ..Default::default() });
    let served = vm.serve(&[]);
    vm.ship_once();
    assert!(segment_names(&vm).is_empty(), "nothing to ship yet: {:?}", segment_names(&vm));
    run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "write -P 5 1M 64k"]));
    crash_the_host(&vm, served);
    let served = vm.serve(&[]);
    run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "write -P 6 3M 64k"]));
    let log = vm.ship_once_with(&["--checksum-timeout", "0s"]);
    assert!(log.contains("starting epoch 2"), "{log}");
    served.stop();
    vm.ship_once();
    let target = vm.dir.path().join("target");
    let out = vm.apply_with(&vm.dir.path().join("cache"), &target, &[], &[]);
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
    assert_files_equal(&vm.image, &target.join("vm1/replica/disk0.img"));
}

/// Issue 17, bug 11: `segments/` was created without fsyncing its parent,
/// so a power cut of the cache store could take away segments reported
/// shipped (the ring's tail had moved past them).
#[test]
fn shipped_segments_survive_a_power_cut_of_the_cache_store() {
    let vm =
        TestVm::new(VmSpec { disk_size: 24 << 20, journal_size: "64MiB", random_content: true, ..Default::default() });
    // The cache store is a crash filesystem: what is not durable is gone
    // at its power cut.
    let cache = vm.dir.path().join("cache");
    let mut fs = tern_crashfs::Process::spawn(&crashfs_bin(), &cache, &vm.dir.path().join("crashfs.ctl"))
        .expect("start tern-crashfs");
    // The first segment shipped (the ring's tail moved past it), the
    // shipper dies writing the second, the power goes.
    vm.ship_killed_at("ship:segment-written=kill@2");
    let complete = |names: Vec<String>| names.into_iter().filter(|n| !n.ends_with(".tmp")).collect::<Vec<_>>();
    let shipped = complete(segment_names(&vm));
    assert_eq!(shipped.len(), 1, "one segment shipped before the kill: {shipped:?}");
    fs.control.power_cut(17, tern_crashfs::CutMode::Drop).expect("power cut");
    assert_eq!(complete(segment_names(&vm)), shipped, "a segment reported shipped is gone after the power cut");
    vm.ship_once();
    vm.assert_cache_reproduces_source();
    fs.shutdown().expect("stop tern-crashfs");
}

/// A segment under its name whose directory was never synced is not yet
/// shipped: a power cut of the cache store can take it away. A shipper
/// killed there left it so, and the next one (finding it there) moved the
/// ring's tail past its records without syncing; one whose directory sync
/// failed found it there on its retry and counted it written. Either way
/// the records were gone from the journal and, after the power cut, from
/// the cache. Now both sync it before the tail moves.
fn a_segment_linked_but_not_synced(armed: &str) {
    let vm = TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "64MiB", ..Default::default() });
    let served = vm.serve(&[]);
    let cache = vm.dir.path().join("cache");
    let mut fs = tern_crashfs::Process::spawn(&crashfs_bin(), &cache, &vm.dir.path().join("crashfs.ctl"))
        .expect("start tern-crashfs");
    // Sparse: the first run writes the manifest, no segment.
    vm.ship_once();
    run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "write -P 7 1M 64k"]));
    if armed.ends_with("kill@1") {
        vm.ship_killed_at(armed);
        // The next run finds the segment there and has nothing else to do.
        let log = vm.ship_once();
        assert!(log.contains("already in the cache"), "{log}");
    } else {
        let out = vm.tern_env(&[("TERN_FAILPOINTS", armed)]).args(["ship", &vm.name, "--once"]).output().expect("ship");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && err.contains("succeeded after"), "the retry settled it: {err}");
    }
    let shipped: Vec<String> = segment_names(&vm).into_iter().filter(|n| !n.ends_with(".tmp")).collect();
    assert_eq!(shipped.len(), 1, "{shipped:?}");
    fs.control.power_cut(17, tern_crashfs::CutMode::Drop).expect("power cut");
    assert_eq!(
        segment_names(&vm).into_iter().filter(|n| !n.ends_with(".tmp")).collect::<Vec<_>>(),
        shipped,
        "the segment the ring's tail passed is gone after the power cut"
    );
    served.stop();
    vm.ship_once();
    vm.assert_cache_reproduces_source();
    fs.shutdown().expect("stop tern-crashfs");
}

#[test]
fn a_segment_a_killed_shipper_linked_is_synced_before_its_records_leave_the_journal() {
    a_segment_linked_but_not_synced("ship:segment-linked=kill@1");
}

#[test]
fn a_segment_whose_directory_sync_failed_is_synced_when_its_retry_finds_it() {
    a_segment_linked_but_not_synced("ship:segment-linked=eio@1");
}

/// A shipped segment that goes missing from the cache after the ring
/// released its records (removed, a store rolled back, or damaged and
/// moved away as the shipper's own error advises): the restarted shipper
/// took the gap for a host crash's discard, started an epoch and nothing
/// else, and the replica went on without those writes, its later points
/// missing them, nothing said. Now the gap makes a checksum comparison
/// due: only what the replica lacks is sent again. With `tern serve`
/// running, and with the VM down (the shipper opens the window itself).
fn a_segment_lost_from_the_cache(serving: bool) {
    let vm =
        TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "64MiB", random_content: true, ..Default::default() });
    let served = vm.serve(&[]);
    vm.ship_once();
    write_three_regions(&vm);
    vm.ship_once();
    let names = segment_names(&vm);
    let newest = names.last().expect("a segment");
    std::fs::rename(vm.cache_dir().join("segments").join(newest), vm.dir.path().join(newest)).expect("move away");
    let served = if serving {
        Some(served)
    } else {
        served.stop();
        None
    };
    let applier = vm.apply_daemon(&[]);
    let ship = vm.ship(&["--checksum-timeout", "10m"]);
    wait_for("the checksum comparison", Duration::from_secs(120), || ship.log().contains("regions differ"));
    let log = ship.stop();
    assert!(log.contains("are missing from") && log.contains("starting epoch 2"), "{log}");
    assert!(log.contains("3 of 256 regions differ"), "exactly the lost writes are sent again:\n{log}");
    if let Some(served) = served {
        served.stop();
    }
    vm.ship_once();
    applier.stop();
    let target = vm.dir.path().join("target");
    let out = vm.apply_with(&vm.dir.path().join("cache"), &target, &[], &[]);
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
    assert_files_equal(&vm.image, &target.join("vm1/replica/disk0.img"));
}

#[test]
fn a_segment_lost_from_the_cache_is_sent_again_by_a_checksum_comparison() {
    a_segment_lost_from_the_cache(true);
}

#[test]
fn a_segment_lost_from_the_cache_of_a_stopped_vm_is_sent_again() {
    a_segment_lost_from_the_cache(false);
}

/// A shipper that started an epoch after a host crash (the manifest
/// published) and stopped before any segment of it was written: the next
/// one started the epoch a second time at the same seq, a manifest that
/// no longer parses ("epochs out of order"), and every later start and
/// the applier failed on it.
#[test]
fn an_epoch_started_by_a_shipper_that_died_is_not_started_twice() {
    let vm = TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "64MiB", ..Default::default() });
    let served = vm.serve(&[]);
    run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "write -P 5 1M 64k"]));
    vm.ship_once();
    run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "write -P 6 2M 64k"]));
    crash_the_host(&vm, served);
    let served = vm.serve(&[]);
    run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "write -P 7 3M 64k"]));
    vm.ship_killed_at("ship:segment-written=kill@1");
    let manifest = std::fs::read_to_string(vm.cache_dir().join("manifest.toml")).expect("manifest");
    assert!(manifest.contains("number = 2"), "the dead run published epoch 2: {manifest}");
    let log = vm.ship_once_with(&["--checksum-timeout", "0s"]);
    assert!(!log.contains("starting epoch 3"), "{log}");
    served.stop();
    vm.ship_once();
    let manifest = std::fs::read_to_string(vm.cache_dir().join("manifest.toml")).expect("manifest");
    assert!(manifest.contains("number = 2") && !manifest.contains("number = 3"), "{manifest}");
    let target = vm.dir.path().join("target");
    let out = vm.apply_with(&vm.dir.path().join("cache"), &target, &[], &[]);
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
    assert_files_equal(&vm.image, &target.join("vm1/replica/disk0.img"));
}

#[test]
fn bad_segments_in_the_cache_are_refused_with_file_and_offset() {
    let vm =
        TestVm::new(VmSpec { disk_size: 4 << 20, journal_size: "16MiB", random_content: true, ..Default::default() });
    vm.ship_once();
    let names = segment_names(&vm);
    let path = vm.cache_dir().join("segments").join(&names[0]);
    let mut bytes = std::fs::read(&path).expect("segment");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&path, &bytes).expect("corrupt");
    let out = vm.tern().args(["segment", "verify"]).arg(vm.cache_dir()).output().expect("verify");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&names[0]) && err.contains("at byte"), "{err}");
    // A cache that belongs to another VM of the same name is refused.
    let manifest = vm.cache_dir().join("manifest.toml");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    let id = text.lines().find(|l| l.starts_with("id = ")).expect("id line").to_string();
    std::fs::write(&manifest, text.replace(&id, "id = \"00000000-0000-4000-8000-000000000000\"")).expect("write");
    let out = vm.tern().args(["ship", &vm.name, "--once"]).output().expect("ship");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another VM of the same name"), "{err}");
}

#[test]
fn serve_starts_while_ship_resyncs_offline() {
    // A big initial sync through a small ring: ship resyncs offline, holding
    // the VM in turns, when the front-end starts.
    let vm =
        TestVm::new(VmSpec { disk_size: 48 << 20, journal_size: "2MiB", random_content: true, ..Default::default() });
    let ship = vm.ship(&[]);
    wait_for("ship to start resyncing", Duration::from_secs(30), || {
        vm.ship_report()["records_shipped"].as_u64().unwrap_or(0) > 0
    });
    let served = vm.serve(&[]);
    run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "write -P 9 40M 1M"]));
    ship.stop();
    served.stop();
    vm.ship_once();
    vm.assert_cache_reproduces_source();
}

/// The initial sync sends allocated data only, and allocated zeroes as zero
/// records without their bytes.
#[test]
fn the_initial_sync_sends_allocated_zeroes_as_zero_records() {
    let dir = tempfile::Builder::new().prefix("tern-test-").tempdir_in(test_root()).expect("tempdir");
    let image = dir.path().join("disk0.img");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&image).expect("image");
        f.set_len(64 << 20).expect("size");
        // 4 MiB of data, 8 MiB of written (allocated) zeroes, the rest a hole.
        f.write_all_at(&vec![0x5a; 4 << 20], 0).expect("data");
        f.write_all_at(&vec![0; 8 << 20], 16 << 20).expect("zeroes");
        f.sync_all().expect("sync");
    }
    for d in ["cache", "target"] {
        std::fs::create_dir(dir.path().join(d)).expect("site");
    }
    let tern = || tern_with_state(&dir.path().join("state"));
    run(tern()
        .args(["enable", "vm1", "--cache"])
        .arg(dir.path().join("cache"))
        .arg("--target")
        .arg(dir.path().join("target"))
        .arg("--disk")
        .arg(format!("disk0={}", image.display())));
    run(tern().args(["ship", "vm1", "--once"]));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("state/vm1/ship.json")).expect("ship.json"))
            .expect("json");
    assert_eq!(report["bytes_in"], 4 << 20, "only the non-zero data travels: {report}");
    let replica = dir.path().join("replica.img");
    std::fs::File::create(&replica).expect("replica").set_len(64 << 20).expect("size");
    run(tern()
        .args(["segment", "replay"])
        .arg(dir.path().join("cache/vm1"))
        .arg("--onto")
        .arg(format!("disk0={}", replica.display())));
    assert_files_equal(&image, &replica);
}

/// Issue 17, bug 3: a tag on a stopped VM lived only in the in-memory
/// ring; shipped, then lost with the ring at a reboot, its sequence number
/// went to the next write, which the shipper then skipped as shipped.
#[test]
fn a_tag_on_a_stopped_vm_then_a_reboot_never_hands_its_sequence_number_to_a_write() {
    let vm = TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "64MiB", ..Default::default() });
    let served = vm.serve(&[]);
    run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "write -P 1 0 1M", "-c", "flush"]));
    served.stop();
    let out = run(vm.tern().args(["tag", &vm.name, "stopped"]));
    assert!(out.contains("tagged"), "{out}");
    vm.ship_once();
    // A clean reboot: the ring in memory is gone, the journal file stays.
    let ring = std::fs::read_link(vm.state.join(&vm.name).join("journal.ring")).expect("the ring link");
    std::fs::remove_file(&ring).expect("remove the live ring");
    let served = vm.serve(&[]);
    run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "write -P 2 2M 1M", "-c", "flush"]));
    served.stop();
    vm.ship_once();
    vm.assert_cache_reproduces_source();
}

/// `tern ship --once`, killed and failed if it takes longer than `limit`.
fn ship_once_within(vm: &TestVm, limit: Duration) -> String {
    let log = vm.dir.path().join("ship-once.log");
    let logf = std::fs::File::create(&log).expect("log");
    let mut child =
        vm.tern().args(["ship", &vm.name, "--once"]).stderr(logf).stdout(Stdio::null()).spawn().expect("ship");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tern ship --once still running after {limit:?}:\n{}", std::fs::read_to_string(&log).unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(status.success(), "tern ship --once failed:\n{text}");
    text
}

/// Issue 17, bug 5: a `tern tag` killed between reserving its record and
/// publishing it left a hole only crash recovery padded: the shipper
/// stopped there for good, even across a clean restart of `tern serve`.
#[test]
fn a_tag_killed_before_publishing_never_stops_the_stream() {
    let vm = TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "64MiB", ..Default::default() });
    let killed_tag = || {
        let out = vm.tern_env(&[("TERN_FAILPOINTS", "tag:reserved=kill")]).args(["tag", &vm.name, "x"]).output();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.expect("tag").status.signal(), Some(9), "the tagger must die before publishing");
    };
    let write = |pattern: u8, at: &str| {
        let cmd = format!("write -P {pattern} {at} 64k");
        run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", &cmd, "-c", "flush"]));
    };
    // While the front-end runs.
    let served = vm.serve(&[]);
    write(1, "0");
    killed_tag();
    write(2, "1M");
    ship_once_within(&vm, Duration::from_secs(30));
    // Across a clean restart of the front-end.
    killed_tag();
    write(3, "2M");
    served.stop();
    let served = vm.serve(&[]);
    write(4, "3M");
    served.stop();
    ship_once_within(&vm, Duration::from_secs(30));
    vm.assert_cache_reproduces_source();
}

#[test]
fn max_rate_holds_the_shipper_to_the_limit_and_ship_json_says_so() {
    // 12 MiB of random bytes, which do not compress.
    let vm =
        TestVm::new(VmSpec { disk_size: 12 << 20, journal_size: "64MiB", random_content: true, ..Default::default() });
    let started = Instant::now();
    vm.ship_once_with(&["--max-rate", "4MB/s"]);
    let took = started.elapsed();
    // 12.6 MB at 4 MB/s: not before 3.1 s. Unlimited, this takes well
    // under a second here.
    assert!(took >= Duration::from_millis(3_100), "12 MiB at 4 MB/s shipped in {took:?}");
    let report = vm.ship_report();
    assert_eq!(report["max_rate_bytes_per_second"].as_u64(), Some(4_000_000), "{report}");
    let throttled = report["throttled_seconds"].as_f64().unwrap_or(0.0);
    assert!(throttled >= 2.5, "the writer waited {throttled} s for the limit: {report}");
    vm.assert_cache_reproduces_source();
}

#[test]
fn the_policy_limit_comes_from_enable_and_the_command_line_lifts_it() {
    let vm = TestVm::new(VmSpec { disk_size: 4 << 20, ..Default::default() });
    let image = vm.dir.path().join("disk2.img");
    std::fs::File::create(&image).and_then(|f| f.set_len(4 << 20)).expect("image");
    let enable = |name: &str, rate: &str| {
        vm.tern()
            .args(["enable", name, "--cache"])
            .arg(vm.dir.path().join("cache"))
            .arg("--target")
            .arg(vm.dir.path().join("target"))
            .arg("--disk")
            .arg(format!("disk0={}", image.display()))
            .args(["--max-rate", rate])
            .output()
            .expect("run tern enable")
    };
    // Too slow to be a limit tern can keep: refused, naming the setting.
    let out = enable("vm2", "10KB/s");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max-rate 10KB/s must be between 64KB/s and 100GB/s"), "{err}");
    // Ambiguous units (bits or bytes?) are refused too.
    let out = enable("vm2", "100Mb/s");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown unit"), "{out:?}");

    let out = enable("vm2", "100Mbit/s");
    assert!(out.status.success(), "{out:?}");
    let toml = std::fs::read_to_string(vm.state.join("vm2").join("vm.toml")).expect("vm.toml");
    assert!(toml.contains("max-rate = \"12500KB/s\""), "{toml}");

    let ship = |args: &[&str]| {
        let mut cmd = vm.tern();
        cmd.args(["ship", "vm2", "--once"]).args(args);
        let out = cmd.output().expect("run tern ship");
        assert!(out.status.success(), "{out:?}");
        let text = std::fs::read_to_string(vm.state.join("vm2").join("ship.json")).expect("ship.json");
        serde_json::from_str::<serde_json::Value>(&text).expect("json")
    };
    assert_eq!(ship(&[])["max_rate_bytes_per_second"].as_u64(), Some(12_500_000));
    assert!(ship(&["--max-rate", "unlimited"])["max_rate_bytes_per_second"].is_null());
    assert_eq!(ship(&["--max-rate", "2MiB/s"])["max_rate_bytes_per_second"].as_u64(), Some(2 << 20));
}

#[test]
fn status_shows_a_throttled_shipper_its_limit_backlog_and_eta() {
    let vm =
        TestVm::new(VmSpec { disk_size: 24 << 20, journal_size: "64MiB", random_content: true, ..Default::default() });
    let ship = vm.ship(&["--max-rate", "1MB/s"]);
    // The first segment goes at once, then the limit holds the rest back:
    // about 25 s in all at 1 MB/s.
    let status = || {
        let out = vm.tern().args(["status", "vm1", "--json"]).output().expect("tern status");
        let all: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
        all[0].clone()
    };
    wait_for("a shipped segment and a measured rate", Duration::from_secs(30), || {
        let s = status();
        s["segments_shipped"].as_u64().unwrap_or(0) > 0 && s["ship_rate_mb_s"].as_f64().unwrap_or(0.0) > 0.0
    });
    let s = status();
    assert_eq!(s["ship_running"], true, "{s}");
    assert_eq!(s["max_rate_bytes_per_second"].as_u64(), Some(1_000_000), "{s}");
    let backlog = s["backlog_bytes"].as_u64().unwrap_or(0);
    assert!(backlog > 4 << 20, "most of 24 MiB still waits: {s}");
    let eta = s["backlog_eta_seconds"].as_f64().expect("an ETA while it ships");
    assert!(eta > 1.0, "{s}");
    // (Exit 1: an initial sync is a warning.)
    let out = vm.tern().args(["status", "vm1"]).output().expect("tern status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("(limit 1MB/s)") && text.contains("shipped in"), "{text}");
    ship.stop();
}

#[test]
fn adaptive_compression_climbs_while_the_link_holds_the_shipper_back() {
    let vm = TestVm::new(VmSpec { disk_size: 4 << 20, ..Default::default() });
    let image = vm.dir.path().join("disk2.img");
    make_random_image(&image, 32 << 20);
    let enable = |compression: &str| {
        vm.tern()
            .args(["enable", "vm2", "--cache"])
            .arg(vm.dir.path().join("cache"))
            .arg("--target")
            .arg(vm.dir.path().join("target"))
            .arg("--disk")
            .arg(format!("disk0={}", image.display()))
            .args(["--journal-size", "64MiB", "--compression", compression])
            .output()
            .expect("run tern enable")
    };
    let out = enable("6..-3");
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("compression-min and compression-max"), "{out:?}");
    let out = enable("-3..6");
    assert!(out.status.success(), "{out:?}");
    let toml = std::fs::read_to_string(vm.state.join("vm2/vm.toml")).expect("vm.toml");
    assert!(toml.contains("compression-min = -3") && toml.contains("compression-max = 6"), "{toml}");

    // 32 MiB at 2 MB/s: the writer is busy (sending, or waiting for the
    // limit) all the time while the workers idle: the level goes up, one
    // step a second, from 1 towards 6.
    let log = vm.dir.path().join("ship2.log");
    let child = vm
        .tern()
        .args(["ship", "vm2", "--max-rate", "2MB/s"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("tern ship");
    let ship = Served::adopt(child, log, "tern ship");
    let report = || -> serde_json::Value {
        std::fs::read_to_string(vm.state.join("vm2/ship.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    };
    wait_for("the compression level to climb to 4", Duration::from_secs(30), || {
        report()["compression_level"].as_i64().unwrap_or(0) >= 4
    });
    assert_eq!(report()["compression_adaptive"], true);
    let out = vm.tern().args(["status", "vm2"]).output().expect("tern status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("adaptive"), "{text}");
    ship.stop();
}

/// An image of `size` random bytes (which zstd cannot shrink).
fn make_random_image(path: &std::path::Path, size: usize) {
    let mut bytes = vec![0u8; size];
    rand::Rng::fill(&mut rand::thread_rng(), &mut bytes[..]);
    std::fs::write(path, bytes).expect("image");
}

/// A clean-stop marker whose write reported failure may be in the cache
/// all the same (an object store's answer lost after the PUT landed). The
/// shipper took it for absent, so when the source ran again it did not
/// remove it; a failback would then take the source for stopped and
/// discard what it wrote since. (Every marker write "fails" here, so no
/// retry succeeds in between.) A store failing so is tried again after a
/// pause, not at every idle turn.
#[test]
fn a_stop_marker_whose_write_seemed_to_fail_goes_when_the_source_runs_again() {
    let vm = TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "64MiB", ..Default::default() });
    let served = vm.serve(&[]);
    vm.ship_once();
    served.stop();
    let marker = vm.cache_dir().join("source-stopped.toml");
    let ship = vm.ship_with_env(&[], &[("TERN_FAILPOINTS", "ship:stop-marker-written=eio@1..")]);
    wait_for("the marker's write to land and be reported failed", Duration::from_secs(30), || {
        marker.exists() && ship.log().contains("source-stopped.toml")
    });
    let shipped = vm.ship_report()["last_shipped_seq"].as_u64().expect("last shipped");
    let served = vm.serve(&[]);
    run(Command::new("qemu-io").args(["-f", "raw", &vm.uri("disk0"), "-c", "write -P 7 1M 64k"]));
    wait_for("the write to be shipped", Duration::from_secs(30), || {
        vm.ship_report()["last_shipped_seq"].as_u64().is_some_and(|s| s > shipped)
    });
    wait_for("the marker to go", Duration::from_secs(10), || !marker.exists());
    served.stop();
    // The failing store was tried again after pauses, not at every idle
    // turn of the shipper (every 2 ms), and the outage logged once.
    let log = ship.log();
    let tries = log.matches("failpoint ship:stop-marker-written").count();
    assert!((1..=5).contains(&tries), "{tries} marker writes in a few seconds:\n{log}");
    assert_eq!(log.matches("trying again after a pause").count(), 1, "{log}");
    drop(ship); // its last word fails too (every marker write does)
}
