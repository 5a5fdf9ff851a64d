//! The tern processes of a trial: how each is started (failpoints armed or
//! not, the site's clock, the simulated host's boot id), watched, stopped
//! and killed, and commands run with a deadline (a step that never ends is
//! a violation, not a stuck suite).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::plan::Role;

/// Debian's libfaketime for multi-threaded programs (package `faketime`).
pub const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// What every tern command of a trial shares.
#[derive(Debug, Clone)]
pub struct TernEnv {
    /// `tern` built with failpoints.
    pub tern: PathBuf,
    pub state: PathBuf,
    pub ring_dir: PathBuf,
    pub cache: PathBuf,
    pub target: PathBuf,
    pub socket: PathBuf,
    pub logs: PathBuf,
    /// The source host's boot id (a new one after its power cut).
    pub boot_id: String,
    /// `faketime` offsets of the two sites' clocks.
    pub source_clock: Option<String>,
    pub target_clock: Option<String>,
    /// Where armed failpoints log their firing.
    pub failpoint_log: PathBuf,
}

/// Which site's clock a command runs on.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    Source,
    Target,
}

impl TernEnv {
    /// A `tern` command on `clock`, with `armed` failpoints.
    pub fn command(&self, clock: Clock, armed: Option<&str>) -> Command {
        let offset = match clock {
            Clock::Source => &self.source_clock,
            Clock::Target => &self.target_clock,
        };
        let mut c = Command::new(&self.tern);
        if let Some(off) = offset {
            // libfaketime preloaded into tern itself (the `faketime`
            // command would run it as its child, which a kill -9 of the
            // child we know would miss). Deadlines and patience in tern
            // run on the monotonic clock: only the wall clock moves.
            c.env("LD_PRELOAD", FAKETIME_LIB).env("FAKETIME", off).env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        c.env("TERN_RING_DIR", &self.ring_dir)
            .env("TERN_BOOT_ID", &self.boot_id)
            .env("TERN_FAILPOINTS_LOG", &self.failpoint_log)
            .env_remove("TERN_FAILPOINTS")
            .arg("--state")
            .arg(&self.state)
            .stdin(Stdio::null());
        if let Some(a) = armed {
            c.env("TERN_FAILPOINTS", a);
        }
        c
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{name}.log")))
            .expect("log file")
    }

    /// Starts a daemon; `tern serve` is waited for until it listens.
    pub fn start(&self, role: Role, armed: Option<&str>) -> Result<Daemon, String> {
        let (clock, args): (Clock, Vec<String>) = match role {
            Role::Serve => (
                Clock::Source,
                vec!["serve".into(), "vm".into(), "--listen".into(), format!("unix:{}", self.socket.display())],
            ),
            Role::Ship => (Clock::Source, vec!["ship".into(), "vm".into(), "--checksum-timeout".into(), "20s".into()]),
            Role::Apply => (
                Clock::Target,
                vec![
                    "apply".into(),
                    "--cache".into(),
                    self.cache.display().to_string(),
                    "--target".into(),
                    self.target.display().to_string(),
                    "vm".into(),
                ],
            ),
        };
        let child = self
            .command(clock, armed)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(self.log(role.name()))
            .spawn()
            .map_err(|e| format!("cannot start tern {}: {e}", role.name()))?;
        let mut d = Daemon { role, child, armed: armed.is_some() };
        if role == Role::Serve {
            let started = Instant::now();
            while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
                if let Some(status) = d.exited() {
                    return Err(format!("tern serve exited ({status}) before listening"));
                }
                if started.elapsed() > Duration::from_secs(60) {
                    d.kill();
                    return Err("hang: tern serve did not listen within 60 s".into());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(d)
    }

    /// Runs a tern command to its end within `limit`.
    pub fn run(&self, clock: Clock, armed: Option<&str>, args: &[&str], limit: Duration) -> Result<Output, String> {
        let mut c = self.command(clock, armed);
        c.args(args);
        run_with_deadline(&mut c, limit).map_err(|e| format!("tern {}: {e}", args.join(" ")))
    }
}

/// Runs `cmd` to its end, or kills it after `limit` (a hang).
pub fn run_with_deadline(cmd: &mut Command, limit: Duration) -> Result<Output, String> {
    let mut child =
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| format!("cannot start: {e}"))?;
    // Drain the pipes on threads, or a chatty child blocks on a full pipe.
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut v);
        v
    });
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            forget_faketime(child.id());
            break s;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            forget_faketime(child.id());
            let stderr = t_err.join().unwrap_or_default();
            return Err(format!(
                "hang: still running after {limit:?}; its log ends:\n{}",
                tail(&String::from_utf8_lossy(&stderr), 15)
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output { status, stdout: t_out.join().unwrap_or_default(), stderr: t_err.join().unwrap_or_default() })
}

/// Removes what libfaketime (preloaded into a process of `pid` that is
/// now reaped) leaves behind when killed: it makes a shared memory object
/// and a semaphore named by its pid and unlinks them only at a normal
/// exit. Left, they pile up in /dev/shm (thousands over a long run), and a
/// later `faketime` whose pid is reused fails with "sem_open: File exists".
pub fn forget_faketime(pid: u32) {
    for name in [format!("/dev/shm/faketime_shm_{pid}"), format!("/dev/shm/sem.faketime_sem_{pid}")] {
        let _ = std::fs::remove_file(name);
    }
}

/// The last `n` lines of a text.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A running tern daemon of the trial.
pub struct Daemon {
    pub role: Role,
    child: Child,
    /// Started with failpoints armed.
    pub armed: bool,
}

impl Daemon {
    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.try_wait().ok().flatten();
        if status.is_some() {
            forget_faketime(self.child.id());
        }
        status
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        forget_faketime(self.child.id());
    }

    /// SIGTERM, then waits up to `limit`: its exit status, or an error
    /// after a kill -9 if it did not stop in time.
    pub fn stop(&mut self, limit: Duration) -> Result<ExitStatus, String> {
        if let Some(s) = self.exited() {
            return Ok(s);
        }
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        loop {
            if let Some(s) = self.exited() {
                return Ok(s);
            }
            if started.elapsed() > limit {
                self.kill();
                return Err(format!("hang: tern {} did not stop within {limit:?} of SIGTERM", self.role.name()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads every disk image of the VM at `dir` (`<name>.img`).
pub fn read_images(dir: &Path, disks: &[String]) -> Result<Vec<Vec<u8>>, String> {
    disks
        .iter()
        .map(|d| {
            let p = dir.join(format!("{d}.img"));
            std::fs::read(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        })
        .collect()
}
