//! The journal as a history of the source disk (invariants 1, 2 and 4),
//! proved end to end: real clients write through `tern serve`, and the
//! journal replayed onto the image as it was at `enable` must give the
//! source image byte for byte — under concurrent overlapping writes, across
//! a `kill -9` of the server, and with a ring too small to hold them.

use std::process::{Command, Stdio};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tern_system_tests::*;

/// fio's nbd engine: `jobs` connections writing random-sized blocks over
/// the same `region` bytes, so nearly every write overlaps others.
fn fio_overlapping(vm: &TestVm, jobs: u32, region: &str, extra: &[&str]) -> Command {
    require("fio");
    let mut c = Command::new("fio");
    c.args([
        "--name=overlap",
        "--ioengine=nbd",
        &format!("--uri={}", vm.uri("disk0")),
        "--rw=randwrite",
        "--bsrange=512-64k",
        "--iodepth=16",
        &format!("--numjobs={jobs}"),
        &format!("--size={region}"),
        "--norandommap",
        "--randrepeat=0",
        "--refill_buffers",
        "--group_reporting",
        // Jobs as threads of one process, so killing fio stops all of them.
        "--thread",
    ])
    .args(extra);
    c
}

fn journal_header(vm: &TestVm) -> String {
    run(vm.tern().args(["journal", "dump", &vm.name, "--header"]))
}

#[test]
fn concurrent_overlapping_writes_from_several_connections_replay_exactly() {
    let vm =
        TestVm::new(VmSpec { disk_size: 32 << 20, journal_size: "1GiB", random_content: true, ..Default::default() });
    let served = vm.serve(&[]);
    // Four fio connections over one 4 MiB region …
    let mut fio = fio_overlapping(&vm, 4, "4m", &["--io_size=24m"]).stdout(Stdio::null()).spawn().expect("fio");
    // … while raw clients pipeline zeroes, trims and writes into the same
    // region from two more connections.
    let raw: Vec<_> = (0..2u64)
        .map(|t| {
            let socket = vm.socket.clone();
            std::thread::spawn(move || {
                let mut c = RawClient::connect(&socket, "disk0");
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                for round in 0..50 {
                    for i in 0..16u64 {
                        let off = rng.gen_range(0..(4u64 << 20) - 65536);
                        let len = rng.gen_range(1..65536u32);
                        match rng.gen_range(0..4) {
                            0 => c.send(CMD_WRITE_ZEROES, 0, i, off, len, &[]),
                            1 => c.send(CMD_TRIM, 0, i, off, len, &[]),
                            _ => c.send(CMD_WRITE, 0, i, off, len, &vec![(round * 16 + i) as u8; len as usize]),
                        }
                    }
                    for _ in 0..16 {
                        let r = c.reply(|_| 0).expect("reply");
                        assert_eq!(r.error, 0, "request {} failed", r.cookie);
                    }
                }
            })
        })
        .collect();
    for t in raw {
        t.join().expect("raw client");
    }
    assert!(fio.wait().expect("fio").success(), "fio failed");
    served.stop();
    assert!(journal_header(&vm).contains("mode Journal"), "the ring overflowed; the test needs a bigger journal");
    vm.assert_journal_reproduces_source();
}

#[test]
fn kill_9_during_load_then_restart_keeps_the_journal_a_valid_history() {
    let vm =
        TestVm::new(VmSpec { disk_size: 32 << 20, journal_size: "1GiB", random_content: true, ..Default::default() });
    for round in 0..3 {
        let served = vm.serve(&[]);
        // Rate-limited so three rounds fit in the ring (no shipper drains it).
        let mut fio = fio_overlapping(&vm, 4, "8m", &["--time_based", "--runtime=30", "--rate=25m"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("fio");
        std::thread::sleep(Duration::from_millis(1500 + 500 * round));
        served.kill9();
        let _ = fio.kill();
        let _ = fio.wait();
    }
    // The restart recovers the published tail; a last clean run on top.
    let served = vm.serve(&[]);
    assert!(served.log().contains("recovering after an unclean stop"), "no recovery ran:\n{}", served.log());
    let status = fio_overlapping(&vm, 2, "8m", &["--io_size=8m"]).stdout(Stdio::null()).status().expect("fio");
    assert!(status.success());
    served.stop();
    let header = journal_header(&vm);
    assert!(header.contains("recoveries 3"), "{header}");
    assert!(header.contains("mode Journal"), "{header}");
    vm.assert_journal_reproduces_source();
}

#[test]
fn tiny_ring_overflows_into_exactly_the_regions_written_after_it() {
    // 64 KiB of ring holds 15 records of a 4 KiB write; a sparse disk
    // starts with an empty bitmap.
    let vm =
        TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "64KiB", region_size: "4KiB", ..VmSpec::default() });
    let served = vm.serve(&[]);
    require("qemu-io");
    let writes: Vec<u64> = (0..100u64).map(|i| (i * 37 % 256) * 65536).collect();
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &vm.uri("disk0")]);
    for (i, off) in writes.iter().enumerate() {
        cmd.args(["-c", &format!("write -P {} {off} 4k", i + 1)]);
    }
    for (i, off) in writes.iter().enumerate() {
        cmd.args(["-c", &format!("read -P {} {off} 4k", i + 1)]);
    }
    let out = run(&mut cmd);
    assert!(!out.contains("failed") && !out.contains("error"), "qemu-io:\n{out}");
    served.stop();

    assert!(journal_header(&vm).contains("mode Overflow"));
    let dump = run(vm.tern().args(["journal", "dump", &vm.name, "--from-start"]));
    let journaled: Vec<u64> = dump
        .lines()
        .filter(|l| l.contains(" write "))
        .map(|l| l.split_whitespace().nth(6).and_then(|o| o.parse().ok()).expect("offset"))
        .collect();
    assert_eq!(journaled, writes[..15].to_vec(), "the journal holds the first writes, in order");
    let dirty: Vec<(u64, u64)> = run(vm.tern().args(["journal", "dirty", &vm.name]))
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[1].parse().expect("offset"), f[2].parse().expect("len"))
        })
        .collect();
    let mut expected: Vec<(u64, u64)> = writes[15..].iter().map(|&o| (o, 4096)).collect();
    expected.sort();
    assert_eq!(dirty, expected, "the bitmap holds exactly the regions written after the ring filled");
}

/// The journal's ring lives in memory (tmpfs): where that has no room for
/// it, enabling the VM says so, and what to do, instead of failing later.
#[test]
fn a_ring_directory_without_room_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tiny = dir.path().join("tiny");
    let _tmpfs = mount_tmpfs(&tiny, "1m");
    let image = dir.path().join("disk0.img");
    std::fs::write(&image, vec![7u8; 1 << 20]).expect("image");
    for site in ["cache", "target"] {
        std::fs::create_dir(dir.path().join(site)).expect("site");
    }
    let out = tern_with_state(&dir.path().join("state"))
        .env("TERN_RING_DIR", tiny.join("rings"))
        .args(["enable", "vm1", "--journal-size", "64MiB", "--disk"])
        .arg(format!("disk0={}", image.display()))
        .arg("--cache")
        .arg(dir.path().join("cache"))
        .arg("--target")
        .arg(dir.path().join("target"))
        .output()
        .expect("run tern enable");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "enable succeeded without room for the ring");
    assert!(
        err.contains("cannot allocate the journal's memory ring")
            && err.contains(&tiny.join("rings").display().to_string())
            && err.contains("--journal-size")
            && err.contains("TERN_RING_DIR"),
        "{err}"
    );
    assert!(!dir.path().join("state/vm1").exists(), "nothing half-enabled is left");
    let left: Vec<_> = std::fs::read_dir(tiny.join("rings")).expect("ring dir").collect();
    assert!(left.is_empty(), "no half-restored ring is left: {left:?}");
}

/// The source image's filesystem fills up mid-write: the client is told
/// ENOSPC, and the journal still holds exactly what the image holds. The
/// failed write was published before the image write (invariant 2), so the
/// journal must follow it with what the image really got (none, some or
/// all of it); without that, the replica would receive data the source
/// never kept.
#[test]
fn writes_failing_on_a_full_source_filesystem_leave_the_journal_a_true_history() {
    let root = tempfile::tempdir().expect("tempdir");
    let full = root.path().join("full");
    let _tmpfs = mount_tmpfs(&full, "3m");
    let vm = TestVm::new(VmSpec { disk_size: 16 << 20, image_dir: Some(full.clone()), ..Default::default() });
    let served = vm.serve(&[]);
    let mut c = RawClient::connect(&vm.socket, "disk0");
    // Writes of 640 KiB: the fifth reaches past the 3 MiB tmpfs and fails
    // with its first 512 KiB written; the later ones fail with nothing.
    let len = 640 << 10;
    let errors: Vec<u32> =
        (0..8u64).map(|i| c.call(CMD_WRITE, 0, i * len as u64, len, &vec![i as u8 + 1; len as usize]).error).collect();
    assert_eq!(&errors[..4], &[0; 4], "writes that fit succeed");
    assert!(errors[4..].iter().all(|&e| e == ENOSPC), "writes past the space left fail with ENOSPC: {errors:?}");
    let image = std::fs::read(&vm.image).expect("read image");
    assert!(image[4 * len as usize..][..4096].iter().all(|&b| b == 5), "the failed write landed in part");
    // Where the image has its blocks, writes still succeed; the journal
    // keeps recording them after the failures.
    assert_eq!(c.call(CMD_WRITE, 0, 4096, 8192, &[0xee; 8192]).error, 0);
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).error, 0);
    drop(c);
    let log = served.log();
    served.stop();
    assert!(
        log.contains("No space left on device") && log.contains("disk0"),
        "the server log names the failure: {log}"
    );
    vm.assert_journal_reproduces_source();
}

/// Stopping writes the records no consumer took to the durable journal,
/// at disk speed; with much of it, the log says so before and after, so
/// an operator waiting on `systemctl stop` knows why.
#[test]
fn stopping_with_unshipped_records_says_what_it_writes_and_how_long_it_took() {
    let vm = TestVm::new(VmSpec { disk_size: 128 << 20, ..Default::default() });
    let served = vm.serve(&[]);
    let mut c = RawClient::connect(&vm.socket, "disk0");
    let mib = vec![0x6bu8; 1 << 20];
    for i in 0..80u64 {
        assert_eq!(c.call(CMD_WRITE, 0, i << 20, 1 << 20, &mib).error, 0, "WRITE at {i} MiB");
    }
    drop(c);
    let log = served.stop();
    let journal = vm.state.join("vm1/journal");
    assert!(
        log.contains(&format!("of journal records not shipped yet to {} before stopping", journal.display())),
        "the stop did not say what it writes:\n{log}"
    );
    assert!(log.contains("journal records written in"), "the stop did not say how long it took:\n{log}");
    assert!(log.contains("front-end detached cleanly"), "{log}");
}

/// Issue 18 (item 9): a ring lives in tmpfs, outside its state directory;
/// a state directory removed by hand left it in memory until reboot. Each
/// ring names its owner; `tern enable` and `tern serve` free the rings
/// whose owner is gone and that no process holds, and `tern status` names
/// them and each VM's ring size.
#[test]
fn rings_whose_state_is_gone_are_named_by_status_and_freed_by_enable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let rings = d.join("rings");
    for site in ["cache", "target"] {
        std::fs::create_dir(d.join(site)).expect("site");
    }
    let tern = |state: &str| {
        let mut c = tern_with_state(&d.join(state));
        c.env("TERN_RING_DIR", &rings);
        c
    };
    let enable = |state: &str, image: &str| {
        // Data on the disk: enable opens the journal (the initial sync's
        // window), which makes the ring.
        std::fs::write(d.join(image), vec![7u8; 1 << 20]).expect("image");
        let out = tern(state)
            .args(["enable", "vm1", "--journal-size", "1MiB", "--disk"])
            .arg(format!("disk0={}", d.join(image).display()))
            .arg("--cache")
            .arg(d.join("cache"))
            .arg("--target")
            .arg(d.join("target"))
            .output()
            .expect("enable");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let ring_files = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&rings)
            .expect("rings")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".ring"))
            .collect();
        v.sort();
        v
    };
    enable("a", "a.img");
    enable("b", "b.img");
    assert_eq!(ring_files().len(), 2);
    let out = tern("b").args(["status", "vm1"]).output().expect("status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ring 1.0 MiB in memory"), "{text}");

    // A's state is removed by hand: status names its ring, enable frees it.
    std::fs::remove_dir_all(d.join("a")).expect("rm state a");
    let out = tern("b").args(["status", "vm1"]).output().expect("status");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("orphaned journal ring") && err.contains(&format!("{}", d.join("a/vm1/journal").display())),
        "{err}"
    );
    let log = enable("c", "c.img");
    assert!(log.contains("freed 1.0 MiB of memory: the journal ring"), "{log}");
    assert_eq!(ring_files().len(), 2, "b's and c's rings stay");

    // A ring held open is never freed, whatever happened to its state.
    let socket = d.join("b.sock");
    let mut serve = tern("b")
        .args(["serve", "vm1", "--listen"])
        .arg(format!("unix:{}", socket.display()))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("serve");
    wait_listening(&socket, &mut serve, String::new);
    std::fs::rename(d.join("b"), d.join("b-moved")).expect("move b");
    let log = enable("d", "d.img");
    assert!(!log.contains("freed"), "a ring in use stays: {log}");
    assert_eq!(ring_files().len(), 3);
    let _ = serve.kill();
    let _ = serve.wait();
}

/// Linux reports a failed write-back to one `fsync` of a file, not to
/// every one running: of two FLUSHes in flight together one failed while
/// the other was acknowledged over the lost pages. They now sync one at a
/// time, and once one failed every later one fails. The first image sync
/// fails (EIO injected); whichever FLUSH reaches the bitmap sync second is
/// held there 300 ms, so the two overlap.
#[test]
fn a_flush_beside_a_failed_one_is_never_acknowledged() {
    let vm = TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "64MiB", ..Default::default() });
    let served = vm.serve_with_env(&[], &[("TERN_FAILPOINTS", "serve:image-sync=eio@1;serve:bitmap-sync=delay:300@2")]);
    let mut c = RawClient::connect(&vm.socket, "disk0");
    assert_eq!(c.call(CMD_WRITE, 0, 0, 4096, &[0x33; 4096]).error, 0);
    c.send(CMD_FLUSH, 0, 1, 0, 0, &[]);
    c.send(CMD_FLUSH, 0, 2, 0, 0, &[]);
    let mut errors: Vec<(u64, u32)> =
        (0..2).map(|_| c.reply(|_| 0).expect("a FLUSH reply")).map(|r| (r.cookie, r.error)).collect();
    errors.sort();
    const EIO: u32 = 5;
    assert_eq!(errors, [(1, EIO), (2, EIO)], "a FLUSH acknowledged beside a failed one: {errors:?}");
    drop(c);
    drop(served);
}
