//! Real NBD clients against `tern serve`: qemu-io, qemu-img, nbdcopy,
//! nbdinfo, fio's nbd engine, and the kernel itself (ext4 on a loop device
//! over an nbdfuse file). Every test checks what the client saw, what landed
//! in the source image, and (where anything was written) that the journal
//! reproduces the source image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::Value;
use tern_system_tests::{assert_files_equal, require, run, TestVm, VmSpec};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn vm(disk_size: u64) -> TestVm {
    TestVm::new(VmSpec { disk_size, journal_size: "512MiB", ..Default::default() })
}

/// Runs a command, asserting success, and returns stdout and stderr together.
fn run_all(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{text}", out.status);
    text
}

/// The exit code of a command (panics if it died of a signal).
fn exit_code(cmd: &mut Command) -> i32 {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out.status.code().unwrap_or_else(|| panic!("{cmd:?} was killed: {}", out.status))
}

/// Writes `len` deterministic random bytes (no long zero runs) to `path`.
fn random_file(path: &Path, len: u64, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len as usize];
    rng.fill(&mut data[..]);
    std::fs::write(path, &data).expect("write random file");
    data
}

/// Number of NBD connections the server has logged so far.
fn connections_logged(log: &str) -> usize {
    log.lines().filter(|l| l.contains("connected to export")).count()
}

/// How many journal records of each kind (`write`, `zero`, `trim`, ...)
/// `tern journal dump` lists; call after the server stopped.
fn journal_kinds(vm: &TestVm) -> BTreeMap<String, usize> {
    let dump = run(vm.tern().args(["journal", "dump", &vm.name]));
    let mut kinds = BTreeMap::new();
    for line in dump.lines().filter(|l| l.starts_with("seq ")) {
        let kind = line.split_whitespace().nth(2).unwrap_or_else(|| panic!("bad dump line {line:?}"));
        *kinds.entry(kind.to_string()).or_insert(0) += 1;
    }
    kinds
}

// ---- 1. qemu-io --------------------------------------------------------------

#[test]
fn qemu_io_pattern_write_read_zero_discard_flush() {
    require("qemu-io");
    let size = 8 * MIB;
    let vm = vm(size);
    let served = vm.serve(&[]);
    let uri = vm.uri("disk0");

    // Each step writes, then reads back through the server; reads of the
    // neighbours of the unaligned and FUA writes check nothing else changed.
    let commands = [
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        // Zero a range that holds data, so zeroing is observable.
        "write -P 0xcd 1M 512k",
        "read -P 0xcd 1M 512k",
        "write -z 1M 512k",
        "read -P 0 1M 512k",
        // Discard a range that holds data; tern punches a hole, so it reads zero.
        "write -P 0xee 2M 64k",
        "read -P 0xee 2M 64k",
        "discard 2M 64k",
        "read -P 0 2M 64k",
        // Unaligned write inside the 0xab area.
        "write -P 0x5a 4097 3000",
        "read -P 0x5a 4097 3000",
        "read -P 0xab 0 4097",
        "read -P 0xab 7097 1041479",
        "flush",
        // Force Unit Access.
        "write -f -P 0x77 3M 128k",
        "read -P 0x77 3M 128k",
        "read -P 0 3200k 64k",
        "flush",
    ];
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", "--discard=unmap"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.arg(&uri);
    let out = run_all(&mut cmd);
    let lower = out.to_lowercase();
    assert!(!lower.contains("failed") && !lower.contains("error"), "qemu-io reported a failure:\n{out}");
    // Every write/read/discard reported its bytes (nothing silently skipped).
    let done =
        out.lines().filter(|l| l.starts_with("wrote ") || l.starts_with("read ") || l.starts_with("discard ")).count();
    let expected = commands.iter().filter(|c| !c.starts_with("flush")).count();
    assert_eq!(done, expected, "qemu-io did not report every command:\n{out}");

    served.stop();

    // What the source image must hold now.
    let mut want = vec![0u8; size as usize];
    want[..MIB as usize].fill(0xab);
    want[4097..4097 + 3000].fill(0x5a);
    want[(3 * MIB) as usize..(3 * MIB + 128 * KIB) as usize].fill(0x77);
    let got = std::fs::read(&vm.image).expect("read image");
    assert_eq!(got.len(), want.len(), "image size changed");
    if let Some(i) = got.iter().zip(&want).position(|(g, w)| g != w) {
        panic!("source image differs at byte {i}: {:#x}, expected {:#x}", got[i], want[i]);
    }
    // One journal record per request: the zero and the discard reached the
    // server as WRITE_ZEROES and TRIM, not as written zeroes.
    let kinds = journal_kinds(&vm);
    let want: BTreeMap<String, usize> = [("write".into(), 5), ("zero".into(), 1), ("trim".into(), 1)].into();
    assert_eq!(kinds, want, "journal records");
    vm.assert_journal_reproduces_source();
}

// ---- 2. qemu-img ---------------------------------------------------------------

#[test]
fn qemu_img_convert_in_and_out_then_compare() {
    require("qemu-img");
    let size = 16 * MIB;
    let vm = vm(size);
    let input = vm.dir.path().join("input.raw");
    let output = vm.dir.path().join("out.raw");
    let data = random_file(&input, size, 0x1111);
    let served = vm.serve(&[]);
    let uri = vm.uri("disk0");

    run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&input).arg(&uri));
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(&uri).arg(&output));
    let cmp = run_all(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&input).arg(&uri));
    assert!(cmp.contains("Images are identical"), "qemu-img compare: {cmp}");
    assert_files_equal(&input, &output);

    // compare must notice a one-byte difference made through the server,
    // and a second convert must put it back.
    let flipped = !data[(5 * MIB) as usize];
    run(Command::new("qemu-io").args(["-f", "raw", "-c", &format!("write -P {flipped:#x} 5M 1")]).arg(&uri));
    let code =
        exit_code(Command::new("qemu-img").args(["compare", "-q", "-f", "raw", "-F", "raw"]).arg(&input).arg(&uri));
    assert_eq!(code, 1, "qemu-img compare did not see the changed byte (exit {code})");
    run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&input).arg(&uri));
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&input).arg(&uri));

    served.stop();
    assert_files_equal(&input, &vm.image);
    let kinds = journal_kinds(&vm);
    assert!(kinds.get("write").is_some_and(|&n| n > 0) && kinds.len() == 1, "journal records: {kinds:?}");
    vm.assert_journal_reproduces_source();
}

// ---- 3. nbdcopy ---------------------------------------------------------------

#[test]
fn nbdcopy_round_trip() {
    require("nbdcopy");
    let size = 32 * MIB;
    let vm = vm(size);
    let (in1, out1) = (vm.dir.path().join("in1.raw"), vm.dir.path().join("out1.raw"));
    let (in2, out2) = (vm.dir.path().join("in2.raw"), vm.dir.path().join("out2.raw"));
    random_file(&in1, size, 0x2222);
    random_file(&in2, size, 0x3333);
    let served = vm.serve(&[]);
    let uri = vm.uri("disk0");

    run(Command::new("nbdcopy").arg(&in1).arg(&uri));
    run(Command::new("nbdcopy").arg(&uri).arg(&out1));
    assert_files_equal(&in1, &out1);

    // Multi-connection, many requests in flight, in and out (nbdcopy caps
    // connections at the thread count, which defaults to the cores).
    let before = connections_logged(&served.log());
    run(Command::new("nbdcopy").args(["--connections=4", "--threads=4", "--requests=16"]).arg(&in2).arg(&uri));
    let after = connections_logged(&served.log());
    assert!(after - before >= 4, "nbdcopy --connections=4 opened {} connection(s):\n{}", after - before, served.log());
    run(Command::new("nbdcopy").args(["--connections=4", "--threads=4", "--requests=16"]).arg(&uri).arg(&out2));
    assert_files_equal(&in2, &out2);

    served.stop();
    assert_files_equal(&in2, &vm.image);
    let kinds = journal_kinds(&vm);
    assert!(kinds.get("write").is_some_and(|&n| n > 0) && kinds.len() == 1, "journal records: {kinds:?}");
    vm.assert_journal_reproduces_source();
}

// ---- 4. nbdinfo ---------------------------------------------------------------

#[test]
fn nbdinfo_reports_json_map_and_capabilities() {
    require("nbdinfo");
    require("qemu-io");
    let size = 64 * MIB;
    let vm = vm(size);
    let served = vm.serve(&[]);
    let uri = vm.uri("disk0");

    // --json
    let text = run(Command::new("nbdinfo").arg("--json").arg(&uri));
    let info: Value = serde_json::from_str(&text).expect("nbdinfo --json is JSON");
    let exports = info["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 1, "one export expected:\n{text}");
    let e = &exports[0];
    assert_eq!(e["export-name"], "disk0", "{text}");
    assert_eq!(e["export-size"], size, "{text}");
    for key in ["can_multi_conn", "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache"] {
        assert_eq!(e[key], true, "{key} in:\n{text}");
    }
    assert_eq!(e["is_read_only"], false, "{text}");
    assert_eq!(e["block_size_maximum"], 33554432, "{text}");
    let contexts: Vec<&str> = e["contexts"].as_array().expect("contexts").iter().filter_map(Value::as_str).collect();
    assert!(contexts.contains(&"base:allocation"), "contexts {contexts:?} in:\n{text}");

    // --map: all hole before, data exactly at 4M..5M after writing it.
    let map = parse_map(&run(Command::new("nbdinfo").arg("--map").arg(&uri)), size);
    for (off, len, ty, desc) in &map {
        assert_eq!((*ty, desc.as_str()), (3, "hole,zero"), "extent at {off}+{len} of a fresh sparse disk: {map:?}");
    }
    let out =
        run_all(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0xab 4M 1M", "-c", "flush"]).arg(&uri));
    assert!(!out.to_lowercase().contains("fail") && !out.to_lowercase().contains("error"), "qemu-io: {out}");
    let map = parse_map(&run(Command::new("nbdinfo").arg("--map").arg(&uri)), size);
    let mut data_bytes = 0;
    for (off, len, ty, desc) in &map {
        let (start, end) = (*off, off + len);
        if start < 5 * MIB && end > 4 * MIB {
            assert!(start >= 4 * MIB && end <= 5 * MIB, "extent {start}+{len} straddles the data: {map:?}");
            assert_eq!((*ty, desc.as_str()), (0, "data"), "extent {start}+{len} must be data: {map:?}");
            data_bytes += len;
        } else {
            assert_eq!((*ty, desc.as_str()), (3, "hole,zero"), "extent {start}+{len} must be a hole: {map:?}");
        }
    }
    assert_eq!(data_bytes, MIB, "data extents must cover 4M..5M: {map:?}");

    // --can / --is: exit 0 = true, 2 = false.
    for cap in ["flush", "fua", "trim", "zero", "multi-conn", "fast-zero", "cache"] {
        let code = exit_code(Command::new("nbdinfo").args(["--can", cap]).arg(&uri));
        assert_eq!(code, 0, "nbdinfo --can {cap} exited {code}");
    }
    let code = exit_code(Command::new("nbdinfo").args(["--is", "read-only"]).arg(&uri));
    assert_eq!(code, 2, "nbdinfo --is read-only exited {code} (2 = false)");
    let code = exit_code(Command::new("nbdinfo").arg("--size").arg(&uri));
    assert_eq!(code, 0);
    assert_eq!(run(Command::new("nbdinfo").arg("--size").arg(&uri)).trim(), size.to_string());

    served.stop();
    let img = std::fs::read(&vm.image).expect("read image");
    assert!(img[(4 * MIB) as usize..(5 * MIB) as usize].iter().all(|&b| b == 0xab), "data not in the source image");
    assert!(img[..(4 * MIB) as usize].iter().chain(&img[(5 * MIB) as usize..]).all(|&b| b == 0), "stray data");
    let kinds = journal_kinds(&vm);
    assert_eq!(kinds, [("write".to_string(), 1)].into(), "journal records");
    vm.assert_journal_reproduces_source();
}

/// Parses `nbdinfo --map` lines (offset, length, type, description) and
/// asserts they tile 0..size with no gap or overlap.
fn parse_map(text: &str, size: u64) -> Vec<(u64, u64, u32, String)> {
    let mut out = Vec::new();
    let mut next = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() >= 3, "bad map line {line:?} in:\n{text}");
        let parse = |s: &str| s.parse::<u64>().unwrap_or_else(|_| panic!("bad number {s:?} in map line {line:?}"));
        let (off, len, ty) = (parse(f[0]), parse(f[1]), parse(f[2]) as u32);
        assert_eq!(off, next, "map has a gap or overlap at {line:?}:\n{text}");
        assert!(len > 0, "empty extent {line:?}");
        next = off + len;
        out.push((off, len, ty, f.get(3).copied().unwrap_or("").to_string()));
    }
    assert_eq!(next, size, "map does not cover the whole disk:\n{text}");
    out
}

// ---- 5. fio -------------------------------------------------------------------

#[test]
fn fio_nbd_engine_verify_two_connections_qd16() {
    require("fio");
    let per_job = 16 * MIB;
    let vm = vm(2 * per_job);
    let served = vm.serve(&[]);
    let uri = vm.uri("disk0");

    let before = connections_logged(&served.log());
    let out = Command::new("fio")
        .args(["--name=tern", "--ioengine=nbd"])
        .arg(format!("--uri={uri}"))
        .args(["--rw=randwrite", "--bs=4k", "--iodepth=16", "--numjobs=2"])
        .args(["--size=16m", "--offset=0", "--offset_increment=16m"])
        .args(["--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_dump=0"])
        .args(["--randrepeat=0", "--verify_state_save=0", "--output-format=json"])
        .current_dir(vm.dir.path())
        .output()
        .expect("run fio");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fio failed ({}):\n{stdout}\n{stderr}\n{}", out.status, served.log());
    for bad in ["verify", "bad magic", "crc32c", "error"] {
        assert!(!stderr.to_lowercase().contains(bad), "fio reported {bad:?}:\n{stderr}");
    }
    // fio may print notes before the JSON document.
    let json = &stdout[stdout.find('{').unwrap_or_else(|| panic!("no JSON from fio:\n{stdout}\n{stderr}"))..];
    let report: Value = serde_json::from_str(json).expect("fio JSON");
    let jobs = report["jobs"].as_array().expect("jobs array");
    assert_eq!(jobs.len(), 2, "two fio jobs expected:\n{stdout}");
    for job in jobs {
        let name = job["jobname"].as_str().unwrap_or("?");
        assert_eq!(job["error"], 0, "job {name} error:\n{stdout}");
        let written = job["write"]["io_bytes"].as_u64().unwrap_or(0);
        assert_eq!(written, per_job, "job {name} wrote {written} bytes:\n{stdout}");
        let verified = job["read"]["io_bytes"].as_u64().unwrap_or(0);
        assert_eq!(verified, per_job, "job {name} verified (read back) {verified} bytes:\n{stdout}");
    }
    let conns = connections_logged(&served.log()) - before;
    assert!(conns >= 2, "fio's two jobs used {conns} connection(s):\n{}", served.log());

    served.stop();
    // Random writes with a random map cover every 4k block of both halves:
    // no block of the source image may be left zero.
    let img = std::fs::read(&vm.image).expect("read image");
    for (i, block) in img.chunks(4096).enumerate() {
        assert!(block.iter().any(|&b| b != 0), "block {i} was never written by fio");
    }
    // Every 4k write of both jobs is one journal record.
    let kinds = journal_kinds(&vm);
    assert_eq!(kinds, [("write".to_string(), (2 * per_job / 4096) as usize)].into(), "journal records");
    vm.assert_journal_reproduces_source();
}

// ---- 6. ext4 through nbdfuse and a loop device ---------------------------------

/// Cleans up the stack in order even if the test panics: the ext4 mount,
/// the loop device, the nbdfuse mount, then nbdfuse itself.
struct FuseStack {
    mnt: Option<PathBuf>,
    loopdev: Option<String>,
    fuse_dir: PathBuf,
    nbdfuse: Option<Child>,
}

impl FuseStack {
    fn unmount_ext4(&mut self) -> Result<(), String> {
        if let Some(mnt) = &self.mnt {
            status(Command::new("umount").arg(mnt))?;
            self.mnt = None;
        }
        Ok(())
    }

    fn detach_loop(&mut self) -> Result<(), String> {
        if let Some(dev) = &self.loopdev {
            status(Command::new("losetup").args(["-d", dev]))?;
            self.loopdev = None;
        }
        Ok(())
    }

    /// Unmounts the nbdfuse file (retrying while the loop device lets go of
    /// it) and waits for nbdfuse to exit.
    fn stop_nbdfuse(&mut self) -> Result<(), String> {
        let Some(child) = &mut self.nbdfuse else { return Ok(()) };
        let fusermount = if which("fusermount3") { "fusermount3" } else { "fusermount" };
        let start = Instant::now();
        loop {
            match status(Command::new(fusermount).arg("-u").arg(&self.fuse_dir)) {
                Ok(()) => break,
                Err(e) if start.elapsed() > Duration::from_secs(10) => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        let start = Instant::now();
        loop {
            if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
                self.nbdfuse = None;
                return if s.success() { Ok(()) } else { Err(format!("nbdfuse exited with {s}")) };
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err("nbdfuse did not exit after fusermount -u".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FuseStack {
    fn drop(&mut self) {
        if self.unmount_ext4().is_err() {
            if let Some(mnt) = self.mnt.take() {
                let _ = Command::new("umount").arg("-l").arg(mnt).status();
            }
        }
        let _ = self.detach_loop();
        if self.stop_nbdfuse().is_err() {
            let _ = Command::new("umount").arg("-l").arg(&self.fuse_dir).status();
            if let Some(mut c) = self.nbdfuse.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn status(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr)))
    }
}

fn which(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map(|o| o.status.success()).unwrap_or(false)
}

fn is_root() -> bool {
    run(Command::new("id").arg("-u")).trim() == "0"
}

#[test]
fn ext4_on_tern_through_nbdfuse_and_loop() {
    assert!(is_root(), "ext4_on_tern_through_nbdfuse_and_loop needs root (loop devices, mount); CI runs as root");
    for tool in ["nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount"] {
        require(tool);
    }
    assert!(which("fusermount3") || which("fusermount"), "fusermount3 is not installed (package fuse3)");
    let size = 128 * MIB;
    let vm = vm(size);
    let served = vm.serve(&[]);
    let uri = vm.uri("disk0");
    let fuse_dir = vm.dir.path().join("fuse");
    let mnt = vm.dir.path().join("mnt");
    std::fs::create_dir(&fuse_dir).expect("mkdir fuse");
    std::fs::create_dir(&mnt).expect("mkdir mnt");
    let file = fuse_dir.join("disk");

    let child = Command::new("nbdfuse")
        .arg(&file)
        .arg(&uri)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(vm.dir.path().join("nbdfuse.log")).expect("nbdfuse log"))
        .spawn()
        .expect("spawn nbdfuse");
    let mut stack = FuseStack { mnt: None, loopdev: None, fuse_dir: fuse_dir.clone(), nbdfuse: Some(child) };
    let start = Instant::now();
    while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) != size {
        if let Some(s) = stack.nbdfuse.as_mut().and_then(|c| c.try_wait().expect("wait")) {
            panic!(
                "nbdfuse exited ({s}): {}",
                std::fs::read_to_string(vm.dir.path().join("nbdfuse.log")).unwrap_or_default()
            );
        }
        assert!(start.elapsed() < Duration::from_secs(10), "nbdfuse did not present {} within 10 s", file.display());
        std::thread::sleep(Duration::from_millis(20));
    }

    let dev = run(Command::new("losetup").args(["-f", "--show"]).arg(&file)).trim().to_string();
    assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
    stack.loopdev = Some(dev.clone());
    // mkfs discards the whole device first (TRIM through nbdfuse).
    run(Command::new("mkfs.ext4").args(["-q", "-F", &dev]));
    run(Command::new("mount").args(["-t", "ext4", "-o", "discard", &dev]).arg(&mnt));
    stack.mnt = Some(mnt.clone());

    // 20 MiB of random data across files, one more file deleted (discard).
    let mut files = BTreeMap::new();
    for i in 0..5u64 {
        let name = format!("file{i}");
        let data = random_file(&mnt.join(&name), 4 * MIB + i * 513, 0x6000 + i);
        files.insert(name, data);
    }
    std::fs::create_dir(mnt.join("dir")).expect("mkdir in ext4");
    std::fs::write(mnt.join("dir/small"), b"tern\n").expect("small file");
    files.insert("dir/small".into(), b"tern\n".to_vec());
    random_file(&mnt.join("scratch"), 2 * MIB, 0x7000);
    run(&mut Command::new("sync"));
    std::fs::remove_file(mnt.join("scratch")).expect("rm scratch");
    run(&mut Command::new("sync"));
    for (name, data) in &files {
        assert!(std::fs::read(mnt.join(name)).expect("read back") == *data, "{name} reads back wrong");
    }

    stack.unmount_ext4().unwrap_or_else(|e| panic!("{e}"));
    run(Command::new("e2fsck").args(["-fn", &dev]));
    stack.detach_loop().unwrap_or_else(|e| panic!("{e}"));
    stack.stop_nbdfuse().unwrap_or_else(|e| panic!("{e}"));
    drop(stack);

    served.stop();

    // The source image itself is a clean ext4 holding the files.
    run(Command::new("e2fsck").arg("-fn").arg(&vm.image));
    let check = vm.dir.path().join("check");
    std::fs::create_dir(&check).expect("mkdir check");
    run(Command::new("mount").args(["-t", "ext4", "-o", "ro,loop,noload"]).arg(&vm.image).arg(&check));
    let contents: Vec<(String, bool)> = files
        .iter()
        .map(|(n, d)| (n.clone(), std::fs::read(check.join(n)).map(|x| x == *d).unwrap_or(false)))
        .collect();
    let scratch_gone = !check.join("scratch").exists();
    run(Command::new("umount").arg(&check));
    for (name, ok) in contents {
        assert!(ok, "{name} differs in the source image");
    }
    assert!(scratch_gone, "the deleted file is still in the source image");

    // The kernel's discards (mkfs, -o discard) reached tern as TRIM.
    let kinds = journal_kinds(&vm);
    assert!(kinds.get("write").is_some_and(|&n| n > 0), "journal records: {kinds:?}");
    assert!(kinds.get("trim").is_some_and(|&n| n > 0), "no TRIM from mkfs/discard: {kinds:?}");
    vm.assert_journal_reproduces_source();
}

// ---- 7. requests that wait on the disk -----------------------------------------

/// A disk on a slow device: nbdkit's memory plugin behind its delay filter
/// (every read takes `read_delay`, every write `write_delay`: `NNNms`, or
/// `0`; nbdkit 1.32 refuses `1s`), presented as a file by nbdfuse and as a
/// block device by a loop device. Torn down in order, even on a panic.
struct SlowDisk {
    fuse: FuseStack,
    nbdkit: Child,
    /// nbdkit's socket: the disk as it is under the loop device's page
    /// cache, that is, what a sync has made durable.
    socket: PathBuf,
    /// Sockets, logs and the FUSE mount point; removed last (fields drop
    /// after `drop` has torn the stack down).
    _scratch: tempfile::TempDir,
}

impl SlowDisk {
    /// `prefix` names its scratch directory under the test root.
    fn new(prefix: &str, size: u64, read_delay: &str, write_delay: &str) -> Self {
        assert!(is_root(), "this test needs root (a loop device); CI runs as root");
        assert!(which("fusermount3") || which("fusermount"), "fusermount3 is not installed (package fuse3)");
        for tool in ["nbdkit", "nbdfuse", "losetup"] {
            require(tool);
        }
        let scratch =
            tempfile::Builder::new().prefix(prefix).tempdir_in(tern_system_tests::test_root()).expect("tempdir");
        let dir = scratch.path().to_owned();
        let sock = dir.join("slow.sock");
        let nbdkit = Command::new("nbdkit")
            .args(["--foreground", "-U"])
            .arg(&sock)
            .args([
                "--filter=delay",
                "memory",
                &size.to_string(),
                &format!("rdelay={read_delay}"),
                &format!("wdelay={write_delay}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("nbdkit.log")).expect("nbdkit log"))
            .spawn()
            .expect("spawn nbdkit");
        let fuse_dir = dir.join("slow-fuse");
        std::fs::create_dir(&fuse_dir).expect("mkdir slow-fuse");
        let mut disk = SlowDisk {
            fuse: FuseStack { mnt: None, loopdev: None, fuse_dir: fuse_dir.clone(), nbdfuse: None },
            nbdkit,
            socket: sock.clone(),
            _scratch: scratch,
        };
        let start = Instant::now();
        while !sock.exists() {
            let log = || std::fs::read_to_string(dir.join("nbdkit.log")).unwrap_or_default();
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nbdkit did not listen on {}: {}",
                sock.display(),
                log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let file = fuse_dir.join("disk");
        let child = Command::new("nbdfuse")
            .arg(&file)
            .arg(format!("nbd+unix:///?socket={}", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("slow-nbdfuse.log")).expect("nbdfuse log"))
            .spawn()
            .expect("spawn nbdfuse");
        disk.fuse.nbdfuse = Some(child);
        let start = Instant::now();
        while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) != size {
            assert!(start.elapsed() < Duration::from_secs(10), "nbdfuse did not present {}", file.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        let dev = run(Command::new("losetup").args(["-f", "--show"]).arg(&file)).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        disk.fuse.loopdev = Some(dev);
        disk
    }

    fn device(&self) -> PathBuf {
        PathBuf::from(self.fuse.loopdev.as_deref().expect("loop device"))
    }
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        // The loop device and nbdfuse go before the server behind them.
        let _ = self.fuse.detach_loop();
        let _ = self.fuse.stop_nbdfuse();
        let _ = self.nbdkit.kill();
        let _ = self.nbdkit.wait();
    }
}

/// What waits on the disk, more of it than the connection has request
/// threads, holds up no other request: with two workers, a READ the page
/// cache answers, sent after six READs that miss it, or after three FUA
/// WRITEs and a FLUSH (each a sync of this disk, 300 ms a write), is
/// answered first; and every request succeeds.
#[test]
fn requests_that_wait_on_the_disk_hold_up_no_other_request() {
    let size = 64 * MIB;
    let slow = SlowDisk::new("tern-slow-", size, "300ms", "300ms");
    let vm = slow_vm(&slow, size);
    let served = vm.serve(&["--threads", "2"]);
    let mut c = tern_system_tests::RawClient::connect(&vm.socket, "disk0");
    use tern_system_tests::CMD_READ;

    // Offset 0 into the page cache (a read of the device's own pages).
    assert_eq!(c.call(CMD_READ, 0, 0, 4096, &[]).error, 0, "first read of offset 0");
    // Six reads far apart (past any read-ahead), none cached, then offset 0.
    for k in 1..=6u64 {
        c.send(CMD_READ, 0, k, k * 8 * MIB, 4096, &[]);
    }
    c.send(CMD_READ, 0, 100, 0, 4096, &[]);
    let order = replies(&mut c, 7, |cookie| if cookie <= 100 { 4096 } else { 0 });
    assert_eq!(order[0], 100, "the cached READ waited behind reads of the slow disk: replies in order {order:?}");
    assert_eq!(sorted(&order), [1, 2, 3, 4, 5, 6, 100], "every READ answered once");

    // Three FUA WRITEs (whole pages, so nothing is read first) and a FLUSH,
    // then the cached READ.
    use tern_system_tests::{CMD_FLUSH, CMD_WRITE};
    const CMD_FLAG_FUA: u16 = 1;
    let page = vec![0x5a; 4096];
    for k in 1..=3u64 {
        c.send(CMD_WRITE, CMD_FLAG_FUA, 200 + k, k * 8 * MIB + 64 * KIB, 4096, &page);
    }
    c.send(CMD_FLUSH, 0, 204, 0, 0, &[]);
    c.send(CMD_READ, 0, 100, 0, 4096, &[]);
    let order = replies(&mut c, 5, |cookie| if cookie == 100 { 4096 } else { 0 });
    assert_eq!(order[0], 100, "the cached READ waited behind syncs of the slow disk: replies in order {order:?}");
    assert_eq!(sorted(&order), [100, 201, 202, 203, 204], "every request answered once");
    drop(c);
    served.stop();
    // The device holds what the FUA WRITEs wrote.
    let f = std::fs::File::open(slow.device()).expect("open the slow disk");
    for k in 1..=3u64 {
        let mut got = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut got, k * 8 * MIB + 64 * KIB).expect("read back");
        assert!(got == page, "FUA WRITE {k} is not on the disk");
    }
}

/// A connection that sends nothing holds none of the server's workers
/// from a busy one: four disks of a VM, one of them busy, give that one
/// all of them. With `--threads 2` and a quiet second connection, a WRITE
/// of part of a page the slow disk must first read (300 ms) keeps one
/// worker, and a cached READ sent after it is answered first by the other.
/// Were the quiet connection given a share, the busy one would have a
/// single worker, and the READ would wait behind the WRITE.
#[test]
fn a_quiet_connection_holds_no_worker_from_a_busy_one() {
    use tern_system_tests::{CMD_READ, CMD_WRITE};
    let size = 64 * MIB;
    let slow = SlowDisk::new("tern-quiet-", size, "300ms", "0");
    let vm = slow_vm(&slow, size);
    let served = vm.serve(&["--threads", "2"]);
    let _quiet = tern_system_tests::RawClient::connect(&vm.socket, "disk0");
    let mut busy = tern_system_tests::RawClient::connect(&vm.socket, "disk0");
    assert_eq!(busy.call(CMD_READ, 0, 0, 4096, &[]).error, 0, "first read of offset 0");
    // A connection counts as quiet once a poll (100 ms) passes without a
    // request; give it ten, for a loaded machine.
    std::thread::sleep(Duration::from_millis(1000));
    for round in 0..2 {
        let at = (1 + round) * 8 * MIB + 1000;
        busy.send(CMD_WRITE, 0, 1, at, 100, &[0; 100]);
        busy.send(CMD_READ, 0, 100, 0, 4096, &[]);
        let order = replies(&mut busy, 2, |cookie| if cookie == 100 { 4096 } else { 0 });
        assert_eq!(
            order,
            [100, 1],
            "round {round}: the cached READ waited behind a WRITE the slow disk held up, as if the quiet connection \
             kept one of the two workers"
        );
    }
    drop(busy);
    served.stop();
}

/// A test VM protecting `slow`, with no initial sync due: the front-end
/// would re-read the whole disk for it in the background (minutes at this
/// speed), caching what a test needs uncached and writing what it needs
/// unwritten.
fn slow_vm(slow: &SlowDisk, size: u64) -> TestVm {
    let vm = TestVm::new(VmSpec { device: Some(slow.device()), journal_size: "64MiB", ..Default::default() });
    // The bitmap is a shared mapping: the cleared bits are in the page
    // cache `tern serve` maps next.
    tern_driver::bitmap::DirtyBitmap::open(&vm.state.join("vm1/dirty.disk0"), size)
        .expect("open the bitmap")
        .clear_range(0, size);
    vm
}

/// A FUA WRITE is answered only once its data is durable, and so is a
/// FLUSH after a plain WRITE, while a plain WRITE alone is answered from
/// the page cache: read straight from the slow disk's own server (under
/// the loop device and its page cache), the data is there as the FUA or
/// FLUSH reply arrives, and not yet after the plain WRITE's. Data reaches
/// that server only through writeback, and every write there takes a
/// second, so a reply sent before the sync finishes finds the old data.
/// (What is durable here is the image: `tern serve` syncs it together
/// with the journal.) Journaled (the payload received into its journal
/// record) and not (`--no-journal`, received into a buffer).
#[test]
fn a_write_is_durable_before_its_fua_or_flush_is_answered() {
    use tern_system_tests::{CMD_FLUSH, CMD_READ, CMD_WRITE};
    const CMD_FLAG_FUA: u16 = 1;
    let size = 64 * MIB;
    let slow = SlowDisk::new("tern-durable-", size, "0", "1000ms");
    let vm = slow_vm(&slow, size);
    let mut below = tern_system_tests::RawClient::connect(&slow.socket, "");
    let mut on_disk = |offset: u64| {
        let r = below.call(CMD_READ, 0, offset, 4096, &[]);
        assert_eq!(r.error, 0, "reading the slow disk's server at {offset}");
        r.data
    };
    let mut fill = 0u8;
    for args in [&[][..], &["--no-journal"][..]] {
        let served = vm.serve(args);
        let mut c = tern_system_tests::RawClient::connect(&vm.socket, "disk0");

        fill += 1;
        let (page, offset) = (vec![fill; 4096], fill as u64 * MIB);
        assert_eq!(c.call(CMD_WRITE, CMD_FLAG_FUA, offset, 4096, &page).error, 0, "FUA WRITE ({args:?})");
        let got = on_disk(offset);
        assert!(
            got == page,
            "a FUA WRITE ({args:?}) was answered before its data was durable (disk has {:#x}, not {fill:#x})",
            got[0]
        );

        fill += 1;
        let (page, offset) = (vec![fill; 4096], fill as u64 * MIB);
        assert_eq!(c.call(CMD_WRITE, 0, offset, 4096, &page).error, 0, "WRITE ({args:?})");
        let got = on_disk(offset);
        assert!(
            got != page,
            "a plain WRITE ({args:?}) was on the disk when answered: this test cannot tell a sync from none (is the image written through?)"
        );
        assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).error, 0, "FLUSH ({args:?})");
        let got = on_disk(offset);
        assert!(
            got == page,
            "a FLUSH ({args:?}) was answered before the WRITE before it was durable (disk has {:#x}, not {fill:#x})",
            got[0]
        );
        drop(c);
        served.stop();
    }
}

/// Reads `n` replies (each READ's data all zeroes, as the slow disk holds);
/// their cookies in the order they came. Every one must have succeeded.
fn replies(c: &mut tern_system_tests::RawClient, n: usize, read_len: impl Fn(u64) -> usize) -> Vec<u64> {
    (0..n)
        .map(|_| {
            let r = c.reply(&read_len).expect("server closed the connection");
            assert_eq!(r.error, 0, "request cookie {} failed", r.cookie);
            assert!(r.data.iter().all(|&b| b == 0), "READ cookie {} returned data the disk does not hold", r.cookie);
            r.cookie
        })
        .collect()
}

fn sorted(v: &[u64]) -> Vec<u64> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v
}

/// Issue 18 (item 5): while `tern serve` serves an image, qemu's tools see
/// its lock (as they see a running VM's), and a VM (here qemu-io) holding
/// the image keeps `tern serve` from starting, named in the error.
#[test]
fn qemu_tools_see_the_serving_lock_and_serve_refuses_an_image_in_use() {
    require("qemu-io");
    let vm = vm(4 * MIB);
    let image = vm.image.to_str().unwrap().to_owned();
    let served = vm.serve(&[]);
    let out = Command::new("qemu-io").args(["-f", "raw", &image, "-c", "write 0 4k"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("Failed to get \"write\" lock"), "qemu-io: {err}");
    // A copy would not be consistent: refused, as with a running VM's disk.
    let copy = vm.dir.path().join("copy.img");
    let out = Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &image]).arg(&copy).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("Failed to get shared \"write\" lock"), "qemu-img: {err}");
    // Force share (read only) is still let in, and so is `info` (which
    // force-shares in the qemu of Debian 12).
    run(Command::new("qemu-img").args(["convert", "-U", "-f", "raw", "-O", "raw", &image]).arg(&copy));
    run(Command::new("qemu-img").args(["info", "-f", "raw", &image]));
    served.stop();

    let mut holder = Command::new("qemu-io")
        .args(["-f", "raw", &image, "-c", "sleep 60000"])
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-io");
    // Once qemu-io holds the image (and a moment for its lock), one serve:
    // it waits 10 s for a busy VM, then says who holds it.
    let start = Instant::now();
    let held = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|fds| fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == vm.image)))
            .unwrap_or(false)
    };
    while !held(holder.id()) {
        assert!(start.elapsed() < Duration::from_secs(20), "qemu-io never opened the image");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let out = vm.tern().args(["serve", &vm.name, "--listen", "unix:/nonexistent/x.sock"]).output().unwrap();
    let out = String::from_utf8_lossy(&out.stderr).into_owned();
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(out.contains(&format!("pid {} (qemu-io)", holder.id())) && out.contains("write lock"), "{out}");
    let served = vm.serve(&[]);
    served.stop();
}
