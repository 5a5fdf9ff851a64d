//! Shared harness of the end-to-end tests: a protected VM in a temporary
//! directory, `tern serve` as a child process, the journal oracle, and a raw
//! NBD client for requests no well-behaved client sends.
//!
//! The tests drive the release binary (`target/release/tern`, or `TERN_BIN`)
//! that `scripts/test.sh` builds first, and the real clients it installs.
#![deny(unsafe_code)]

pub mod proxy;
pub mod qga;
pub mod stores;
pub mod wan;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

/// A `tern` command on a state directory, with journal rings kept beside
/// it (`<state>.rings`, inside the test's temporary directory, removed with
/// it) rather than in `/dev/shm`.
pub fn tern_with_state(state: &Path) -> Command {
    let mut c = Command::new(tern_bin());
    c.arg("--state").arg(state).env("TERN_RING_DIR", ring_dir_of(state));
    c
}

pub fn ring_dir_of(state: &Path) -> PathBuf {
    let mut s = state.as_os_str().to_owned();
    s.push(".rings");
    PathBuf::from(s)
}

/// The tern binary under test (`target/release/tern`, or `TERN_BIN`).
pub fn tern_bin() -> PathBuf {
    workspace_bin("tern", "TERN_BIN", "cargo build --release")
}

/// A binary of the workspace: `$env` if set, else the release (or debug)
/// build, else a failure saying how to build it.
pub(crate) fn workspace_bin(name: &str, env: &str, build: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf();
    for profile in ["release", "debug"] {
        let p = root.join("target").join(profile).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("no {name} binary: run `{build}` (scripts/test.sh does) or set {env}");
}

/// `tern` built with failpoints (`driver/src/fail.rs`), for the crash
/// tests: `scripts/build-failpoints.sh`, run here once per test process (a
/// no-op when the build is fresh, so it never tests stale code), or
/// `TERN_FAILPOINTS_BIN`.
pub fn tern_failpoints_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("TERN_FAILPOINTS_BIN") {
            return PathBuf::from(p);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf();
        let out = Command::new(root.join("scripts/build-failpoints.sh")).output().expect("run build-failpoints.sh");
        assert!(out.status.success(), "scripts/build-failpoints.sh failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let bin = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(Path::new(&bin).is_file(), "build-failpoints.sh printed no binary: {bin:?}");
        PathBuf::from(bin)
    })
    .clone()
}

/// A `tern` command with `env` set: the failpoints build when `env` arms
/// failpoints (`TERN_FAILPOINTS`), the binary under test otherwise.
pub fn tern_command(env: &[(&str, &str)]) -> Command {
    let armed = env.iter().any(|(k, _)| *k == "TERN_FAILPOINTS");
    let mut c = Command::new(if armed { tern_failpoints_bin() } else { tern_bin() });
    c.envs(env.iter().copied());
    c
}

/// The `tern-crashfs` binary (built with the workspace: `cargo build
/// --release --workspace`, which scripts/test.sh runs), or
/// `TERN_CRASHFS_BIN`.
pub fn crashfs_bin() -> PathBuf {
    workspace_bin("tern-crashfs", "TERN_CRASHFS_BIN", "cargo build --release --workspace")
}

/// `cmd` run in the network namespace `netns` (`ip netns exec`, which
/// execs it: the child is the program itself), or as it is.
pub fn in_netns(netns: Option<&str>, cmd: Command) -> Command {
    let Some(ns) = netns else { return cmd };
    let mut wrapped = Command::new("ip");
    wrapped.args(["netns", "exec", ns]).arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        wrapped.current_dir(d);
    }
    wrapped
}

/// Fails the test with an actionable message when a client is missing.
pub fn require(tool: &str) {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map(|o| o.status.success());
    assert!(found.unwrap_or(false), "{tool} is not installed: run scripts/test.sh, which installs the test clients");
}

/// Runs a command, asserting it succeeds; returns its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    check(cmd, &out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn check(cmd: &Command, out: &Output) {
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How to make a test VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub disk_size: u64,
    pub journal_size: &'static str,
    pub region_size: &'static str,
    /// Fill the disk with random bytes before enabling (else sparse).
    pub random_content: bool,
    /// Where the source image lives (else beside the VM's state), for a
    /// test that needs it on a filesystem of its own.
    pub image_dir: Option<PathBuf>,
    /// An existing disk (a block device) to protect instead of a new image
    /// file; `disk_size`, `random_content` and `image_dir` are ignored, and
    /// no copy of it is kept as the oracle's start (`original` is absent).
    pub device: Option<PathBuf>,
    /// The cache store, if not the test's own `cache` directory: an
    /// `s3://` or `az://` location ([`stores`]).
    pub cache: Option<String>,
    /// `tern enable --key`: segments sealed with this key file.
    pub key: Option<PathBuf>,
    /// Environment for every `tern` of this VM (another store's endpoint).
    pub env: Vec<(String, String)>,
    /// The network namespace every `tern` of this VM runs in (the source
    /// host of [`wan::Wan`]).
    pub netns: Option<String>,
}

impl Default for VmSpec {
    fn default() -> Self {
        VmSpec {
            disk_size: 64 << 20,
            journal_size: "256MiB",
            region_size: "64KiB",
            random_content: false,
            image_dir: None,
            device: None,
            cache: None,
            key: None,
            env: Vec::new(),
            netns: None,
        }
    }
}

/// Creates a VM's image file as `spec` says.
fn make_image(image: &Path, spec: &VmSpec) {
    let f = std::fs::File::create(image).expect("create image");
    f.set_len(spec.disk_size).expect("size image");
    if spec.random_content {
        let mut rng = rand::rngs::StdRng::seed_from_u64(spec.disk_size);
        let mut buf = vec![0u8; 1 << 20];
        let mut w = std::io::BufWriter::new(&f);
        for _ in 0..spec.disk_size.div_ceil(1 << 20) {
            rng.fill(&mut buf[..]);
            w.write_all(&buf).expect("fill image");
        }
        w.flush().expect("flush image");
        f.set_len(spec.disk_size).expect("size image");
    }
}

/// A protected VM with one disk, `disk0`, in a temporary directory.
pub struct TestVm {
    pub dir: tempfile::TempDir,
    pub name: String,
    pub state: PathBuf,
    pub image: PathBuf,
    /// A copy of the image as it was when enabled: the oracle's start.
    pub original: PathBuf,
    pub socket: PathBuf,
    /// Set for every `tern` command of this VM ([`VmSpec::env`]).
    pub env: Vec<(String, String)>,
    /// Where every `tern` command of this VM runs ([`VmSpec::netns`]).
    pub netns: Option<String>,
}

impl TestVm {
    pub fn new(spec: VmSpec) -> Self {
        let dir = tempfile::Builder::new().prefix("tern-test-").tempdir_in(test_root()).expect("tempdir");
        let original = dir.path().join("original.img");
        let image = match &spec.device {
            Some(device) => device.clone(),
            None => {
                let image = spec.image_dir.as_deref().unwrap_or(dir.path()).join("disk0.img");
                make_image(&image, &spec);
                std::fs::copy(&image, &original).expect("copy image");
                image
            }
        };
        let state = dir.path().join("state");
        let socket = dir.path().join("nbd.sock");
        // The cache store and the target site are the operator's (a mount,
        // a share): tern never creates them.
        for site in ["cache", "target"] {
            std::fs::create_dir(dir.path().join(site)).expect("create site directory");
        }
        let vm = TestVm {
            name: "vm1".into(),
            state,
            image,
            original,
            socket,
            dir,
            env: spec.env.clone(),
            netns: spec.netns.clone(),
        };
        let cache = spec.cache.clone().map_or_else(|| vm.dir.path().join("cache"), PathBuf::from);
        let mut enable = vm.tern();
        if let Some(key) = &spec.key {
            enable.arg("--key").arg(key);
        }
        run(enable
            .args(["enable", "vm1", "--cache"])
            .arg(cache)
            .arg("--target")
            .arg(vm.dir.path().join("target"))
            .arg("--disk")
            .arg(format!("disk0={}", vm.image.display()))
            .args(["--journal-size", spec.journal_size, "--region-size", spec.region_size]));
        vm
    }

    /// A `tern` command with this VM's state directory.
    pub fn tern(&self) -> Command {
        let mut c = tern_with_state(&self.state);
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        in_netns(self.netns.as_deref(), c)
    }

    /// [`TestVm::tern`] with `env` set (see [`tern_command`]).
    pub fn tern_env(&self, env: &[(&str, &str)]) -> Command {
        let mut c = tern_command(env);
        c.arg("--state").arg(&self.state).env("TERN_RING_DIR", ring_dir_of(&self.state));
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        in_netns(self.netns.as_deref(), c)
    }

    /// The directory the VM's journal ring lives in (see [`tern_with_state`]).
    pub fn ring_dir(&self) -> PathBuf {
        ring_dir_of(&self.state)
    }

    /// Starts `tern serve` on this VM's socket and waits until it accepts.
    pub fn serve(&self, extra: &[&str]) -> Served {
        self.serve_with_env(extra, &[])
    }

    /// `serve` with extra environment (`TERN_FAILPOINTS`, …).
    pub fn serve_with_env(&self, extra: &[&str], env: &[(&str, &str)]) -> Served {
        let log = self.dir.path().join("serve.log");
        let logf = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let child = self
            .tern_env(env)
            .args(["serve", &self.name, "--listen"])
            .arg(format!("unix:{}", self.socket.display()))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn tern serve");
        let mut served = Served { child, log, what: "tern serve" };
        let log = served.log.clone();
        wait_listening(&self.socket, &mut served.child, || std::fs::read_to_string(&log).unwrap_or_default());
        served
    }

    /// Starts `tern ship` (running until stopped) beside the server.
    pub fn ship(&self, args: &[&str]) -> Served {
        self.ship_with_env(args, &[])
    }

    /// [`TestVm::ship`] with extra environment (`TERN_FAILPOINTS` runs the
    /// failpoint build).
    pub fn ship_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Served {
        let log = self.dir.path().join("ship.log");
        let logf = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let child = self
            .tern_env(env)
            .args(["ship", &self.name])
            .args(args)
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn tern ship");
        Served { child, log, what: "tern ship" }
    }

    /// `tern ship --once`, asserting success; returns its log (stderr).
    pub fn ship_once(&self) -> String {
        self.ship_once_with(&[])
    }

    /// `tern ship --once` with `TERN_FAILPOINTS` set to `armed`, asserting
    /// it was killed there (`kill`); returns its log (stderr).
    pub fn ship_killed_at(&self, armed: &str) -> String {
        use std::os::unix::process::ExitStatusExt;
        let out = self
            .tern_env(&[("TERN_FAILPOINTS", armed)])
            .args(["ship", &self.name, "--once"])
            .output()
            .expect("run tern ship");
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.signal(), Some(9), "{armed}: tern ship must die there:\n{log}");
        log
    }

    pub fn ship_once_with(&self, args: &[&str]) -> String {
        let mut cmd = self.tern();
        cmd.args(["ship", &self.name, "--once"]).args(args);
        let out = cmd.output().expect("run tern ship");
        check(&cmd, &out);
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `<cache>/<vm>`.
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache").join(&self.name)
    }

    /// `tern apply` running as a daemon from this VM's cache into its
    /// target, with `env` (see [`tern_command`]); its log is `apply.log`.
    pub fn apply_daemon(&self, env: &[(&str, &str)]) -> Served {
        let log = self.dir.path().join("apply.log");
        let child = tern_command(env)
            .args(["apply", "--cache"])
            .arg(self.dir.path().join("cache"))
            .arg("--target")
            .arg(self.dir.path().join("target"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn tern apply");
        Served { child, log, what: "tern apply" }
    }

    /// `tern apply --once` for this VM from `cache` into `target`, with
    /// extra arguments and environment; returns the raw output.
    pub fn apply_with(&self, cache: &Path, target: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
        tern_command(env)
            .args(["apply", "--cache"])
            .arg(cache)
            .arg("--target")
            .arg(target)
            .arg(&self.name)
            .arg("--once")
            .args(args)
            .output()
            .expect("run tern apply")
    }

    /// The catalog at `target`, as `tern points --json` gives it.
    pub fn points(&self, target: &Path) -> Vec<serde_json::Value> {
        let out = run(Command::new(tern_bin()).args(["points", &self.name, "--json", "--target"]).arg(target));
        serde_json::from_str::<serde_json::Value>(&out).expect("points json").as_array().expect("array").clone()
    }

    /// Replays the cache's segments up to `seq` onto an empty disk: what a
    /// point at `seq` must hold.
    pub fn cache_image_at(&self, cache_vm_dir: &Path, seq: u64) -> PathBuf {
        let image = self.dir.path().join(format!("oracle-{seq}.img"));
        let _ = std::fs::remove_file(&image);
        let f = std::fs::File::create(&image).expect("create oracle");
        f.set_len(std::fs::metadata(&self.image).expect("stat").len()).expect("size oracle");
        drop(f);
        run(self
            .tern()
            .args(["segment", "replay"])
            .arg(cache_vm_dir)
            .arg("--until-seq")
            .arg(seq.to_string())
            .arg("--onto")
            .arg(format!("disk0={}", image.display())));
        image
    }

    /// `tern ship`'s report (`ship.json`).
    pub fn ship_report(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.state.join(&self.name).join("ship.json")).unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    /// The cache oracle: every segment verifies and the stream has no gap,
    /// and replaying them all onto an empty disk (what the target starts
    /// from) gives the source image byte for byte.
    pub fn assert_cache_reproduces_source(&self) {
        run(self.tern().args(["segment", "verify"]).arg(self.cache_dir()));
        let replica = self.dir.path().join("replica.img");
        let _ = std::fs::remove_file(&replica);
        let f = std::fs::File::create(&replica).expect("create replica");
        f.set_len(std::fs::metadata(&self.image).expect("stat image").len()).expect("size replica");
        drop(f);
        run(self
            .tern()
            .args(["segment", "replay"])
            .arg(self.cache_dir())
            .arg("--onto")
            .arg(format!("disk0={}", replica.display())));
        assert_files_equal(&self.image, &replica);
    }

    /// The NBD URI of a disk.
    pub fn uri(&self, disk: &str) -> String {
        format!("nbd+unix:///{disk}?socket={}", self.socket.display())
    }

    /// The journal oracle: replays the whole journal onto the image as it
    /// was at enable and asserts it equals the source image byte for byte.
    pub fn assert_journal_reproduces_source(&self) {
        let copy = self.dir.path().join("oracle.img");
        std::fs::copy(&self.original, &copy).expect("copy original");
        run(self
            .tern()
            .args(["journal", "replay", &self.name, "--from-start", "--onto"])
            .arg(format!("disk0={}", copy.display())));
        assert_files_equal(&self.image, &copy);
    }
}

/// `count` writes of 64 KiB through the NBD export `disk0` at `socket`,
/// write `i` of a pattern of its own at an offset of its own (`first` picks
/// up where an earlier call stopped); the client sees each acknowledged.
pub fn write_patterns(socket: &Path, first: u64, count: u64) {
    const CMD_WRITE: u16 = 1;
    let mut c = RawClient::connect(socket, "disk0");
    for i in first..first + count {
        let data: Vec<u8> = (0..65536u32).map(|b| (b as u64 * 31 + i * 7) as u8).collect();
        let offset = (i * 3 * 65536) % (c.size - 65536);
        assert_eq!(c.call(CMD_WRITE, 0, offset, 65536, &data).error, 0, "write {i} acknowledged");
    }
}

/// Waits (30 s at most) until `server` listens on the unix socket `socket`;
/// panics, with `log()`, if it exits or never does.
pub fn wait_listening(socket: &Path, server: &mut Child, log: impl Fn() -> String) {
    let start = Instant::now();
    while UnixStream::connect(socket).is_err() {
        if let Ok(Some(status)) = server.try_wait() {
            panic!("the server exited ({status}) before listening on {}:\n{}", socket.display(), log());
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the server did not listen on {} within 30 s:\n{}",
            socket.display(),
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The directory tests make their VMs in (`TERN_TEST_DIR`, default the
/// system temporary directory).
pub fn test_root() -> PathBuf {
    std::env::var_os("TERN_TEST_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir)
}

/// A running `tern serve` or `tern ship`; killed when dropped.
pub struct Served {
    pub child: Child,
    log: PathBuf,
    what: &'static str,
}

impl Served {
    /// Adopts a `tern serve` or `tern ship` the test started itself (with
    /// its standard error going to `log`): killed when dropped, like every
    /// `Served`, so a failing test leaves no process behind.
    pub fn adopt(child: Child, log: PathBuf, what: &'static str) -> Self {
        Served { child, log, what }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it with SIGTERM and asserts a clean exit; returns its log.
    pub fn stop(mut self) -> String {
        self.signal(libc::SIGTERM);
        let status = self.wait(Duration::from_secs(30));
        assert!(status.success(), "{} exited with {status}:\n{}", self.what, self.log());
        self.log()
    }

    /// Waits for it to exit by itself (a failpoint, an error).
    pub fn exited(mut self) -> std::process::ExitStatus {
        self.wait(Duration::from_secs(30))
    }

    /// Kills it with SIGKILL (a crash).
    pub fn kill9(mut self) {
        self.signal(libc::SIGKILL);
        self.wait(Duration::from_secs(30));
    }

    fn signal(&self, sig: i32) {
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status();
        assert!(ok.map(|s| s.success()).unwrap_or(false), "cannot signal {}", self.what);
    }

    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(start.elapsed() < limit, "{} did not exit within {limit:?}:\n{}", self.what, self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts two files have the same bytes, naming the first difference.
pub fn assert_files_equal(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).expect("read a"), std::fs::read(b).expect("read b"));
    assert_eq!(x.len(), y.len(), "{} and {} differ in size", a.display(), b.display());
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ first at byte {i} ({:#x} vs {:#x})", a.display(), b.display(), x[i], y[i]);
    }
}

// ---- a raw NBD client ------------------------------------------------------

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// A minimal NBD client that sends whatever it is told: for the requests a
/// well-behaved client refuses to send.
pub struct RawClient {
    pub sock: UnixStream,
    pub size: u64,
}

/// One reply: the cookie, the error (0 = success) and any data.
#[derive(Debug)]
pub struct Reply {
    pub cookie: u64,
    pub error: u32,
    pub data: Vec<u8>,
}

impl RawClient {
    /// Connects and picks `export` with NBD_OPT_GO (simple replies).
    pub fn connect(socket: &Path, export: &str) -> Self {
        let mut sock = UnixStream::connect(socket).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let mut greeting = [0u8; 18];
        sock.read_exact(&mut greeting).expect("greeting");
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        sock.write_all(&3u32.to_be_bytes()).expect("flags");
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        sock.write_all(&option(7, &data)).expect("GO");
        let mut size = None;
        loop {
            let mut h = [0u8; 20];
            sock.read_exact(&mut h).expect("option reply");
            let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
            let len = u32::from_be_bytes(h[16..20].try_into().expect("4")) as usize;
            let mut d = vec![0u8; len];
            sock.read_exact(&mut d).expect("option reply data");
            match kind {
                3 if u16::from_be_bytes([d[0], d[1]]) == 0 => {
                    size = Some(u64::from_be_bytes(d[2..10].try_into().expect("8")))
                }
                1 => break,
                3 => {}
                other => panic!("GO failed with reply type {other:#x}: {}", String::from_utf8_lossy(&d)),
            }
        }
        RawClient { sock, size: size.expect("NBD_INFO_EXPORT") }
    }

    /// Sends one request (and its payload, if any) without waiting.
    pub fn send(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, length: u32, payload: &[u8]) {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&length.to_be_bytes());
        b.extend_from_slice(payload);
        self.sock.write_all(&b).expect("send request");
    }

    /// Reads one simple reply; `read_len` bytes of data follow a successful
    /// READ. `None` when the server closed the connection.
    pub fn reply(&mut self, read_len: impl Fn(u64) -> usize) -> Option<Reply> {
        let mut h = [0u8; 16];
        self.sock.read_exact(&mut h).ok()?;
        assert_eq!(u32::from_be_bytes(h[..4].try_into().ok()?), 0x6744_6698, "simple reply magic");
        let error = u32::from_be_bytes(h[4..8].try_into().ok()?);
        let cookie = u64::from_be_bytes(h[8..16].try_into().ok()?);
        let mut data = vec![0u8; if error == 0 { read_len(cookie) } else { 0 }];
        self.sock.read_exact(&mut data).ok()?;
        Some(Reply { cookie, error, data })
    }

    /// Sends a request and reads its reply (no data expected unless READ).
    pub fn call(&mut self, kind: u16, flags: u16, offset: u64, length: u32, payload: &[u8]) -> Reply {
        self.send(kind, flags, 1, offset, length, payload);
        let n = if kind == CMD_READ { length as usize } else { 0 };
        self.reply(|_| n).expect("server closed the connection")
    }
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// A filesystem a test mounted; unmounted when dropped.
pub struct Mounted {
    dir: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// A tmpfs of `size` (as `mount -o size=` takes it) at `dir`, which is
/// created. A small one is a filesystem that fills.
pub fn mount_tmpfs(dir: &Path, size: &str) -> Mounted {
    std::fs::create_dir_all(dir).expect("mount point");
    run(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir));
    Mounted { dir: dir.to_owned() }
}

/// A loop-mounted filesystem (`ext4`, `btrfs`, `xfs`) of `mib` MiB at
/// `dir`, made in the file `image`.
pub fn mount_loop_fs(fstype: &str, image: &Path, dir: &Path, mib: u64) -> Mounted {
    let mkfs = format!("mkfs.{fstype}");
    require(&mkfs);
    let f = std::fs::File::create(image).expect("create fs image");
    f.set_len(mib << 20).expect("size fs image");
    drop(f);
    let quiet: &[&str] = match fstype {
        "ext4" => &["-q", "-F"],
        _ => &["-q", "-f"],
    };
    run(Command::new(&mkfs).args(quiet).arg(image));
    std::fs::create_dir_all(dir).expect("mount point");
    run(Command::new("mount").args(["-o", "loop"]).arg(image).arg(dir));
    Mounted { dir: dir.to_owned() }
}
