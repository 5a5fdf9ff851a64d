//! The torture harness's side of the control socket: one method per
//! command, and [`Control::power_cut`], the whole reboot.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::model::{CutMode, CutStats, FaultOp, Stats};
use crate::protocol;

/// How long [`Control::power_cut`] retries an unmount that is busy.
const BUSY_RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to the control socket {}", .path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("control socket I/O")]
    Io(#[from] io::Error),
    #[error("the daemon closed the control socket")]
    Closed,
    #[error("the daemon refused {command:?}: {code} {message}")]
    Refused { command: String, code: String, message: String },
    #[error("still busy after {}s; something holds the mount: {message}", BUSY_RETRY.as_secs())]
    Busy { message: String },
    #[error("unreadable reply {reply:?}: {why}")]
    Protocol { reply: String, why: String },
    #[error("cannot start {}", .binary.display())]
    Spawn { binary: PathBuf, source: io::Error },
    #[error("tern-crashfs exited before it was ready (its stderr says why)")]
    NotReady,
}

/// A connection to a running `tern-crashfs`.
pub struct Control {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Control {
    pub fn connect(socket: impl AsRef<Path>) -> Result<Control, Error> {
        let path = socket.as_ref().to_path_buf();
        let writer = UnixStream::connect(&path).map_err(|source| Error::Connect { path, source })?;
        Ok(Control { reader: BufReader::new(writer.try_clone()?), writer })
    }

    /// Sends one command line; returns the text after `ok`.
    pub fn command(&mut self, line: &str) -> Result<String, Error> {
        self.writer.write_all(format!("{line}\n").as_bytes())?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
            return Err(Error::Closed);
        }
        let reply = reply.trim_end();
        if let Some(rest) = reply.strip_prefix("ok") {
            return Ok(rest.trim_start().to_owned());
        }
        let rest = reply
            .strip_prefix("error ")
            .ok_or_else(|| Error::Protocol { reply: reply.to_owned(), why: "neither ok nor error".into() })?;
        let (code, message) = rest.split_once(' ').unwrap_or((rest, ""));
        Err(Error::Refused { command: line.to_owned(), code: code.to_owned(), message: message.to_owned() })
    }

    pub fn mount(&mut self) -> Result<(), Error> {
        self.command("mount").map(drop)
    }

    /// One unmount attempt: [`Error::Refused`] with code `busy` while in use.
    pub fn unmount(&mut self) -> Result<(), Error> {
        self.command("unmount").map(drop)
    }

    /// Applies a power cut to the unmounted filesystem.
    pub fn powercut(&mut self, seed: u64, mode: CutMode) -> Result<CutStats, Error> {
        let reply = self.command(&format!("powercut {seed} {mode}"))?;
        protocol::parse_cut(&reply).map_err(|why| Error::Protocol { reply, why })
    }

    /// The reboot: unmount (retrying while busy), power cut, mount again.
    pub fn power_cut(&mut self, seed: u64, mode: CutMode) -> Result<CutStats, Error> {
        let start = Instant::now();
        loop {
            match self.unmount() {
                Ok(()) => break,
                Err(Error::Refused { code, message, .. }) if code == "busy" => {
                    if start.elapsed() > BUSY_RETRY {
                        return Err(Error::Busy { message });
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        }
        let stats = self.powercut(seed, mode)?;
        self.mount()?;
        Ok(stats)
    }

    /// Makes everything durable, like finished kernel writeback.
    pub fn sync(&mut self) -> Result<(), Error> {
        self.command("sync").map(drop)
    }

    pub fn stats(&mut self) -> Result<Stats, Error> {
        let reply = self.command("stats")?;
        protocol::parse_stats(&reply).map_err(|why| Error::Protocol { reply, why })
    }

    /// The next `count` `op`s on a path containing `path_substring` (no
    /// spaces; paths start at the mount's root with `/`) fail with `errno`.
    pub fn fail(&mut self, op: FaultOp, errno: i32, path_substring: &str, count: u64) -> Result<(), Error> {
        self.command(&format!("fail {op} {errno} {path_substring} {count}")).map(drop)
    }

    pub fn fail_clear(&mut self) -> Result<(), Error> {
        self.command("fail clear").map(drop)
    }

    /// Writes and allocations past `bytes` in use fail with ENOSPC; `None` lifts it.
    pub fn capacity(&mut self, bytes: Option<u64>) -> Result<(), Error> {
        let arg = bytes.map_or("none".to_owned(), |b| b.to_string());
        self.command(&format!("capacity {arg}")).map(drop)
    }

    /// Asks the daemon to unmount and exit.
    pub fn exit(&mut self) -> Result<(), Error> {
        self.command("exit").map(drop)
    }
}

/// A `tern-crashfs` child process, mounted and connected; dropping it asks it
/// to exit and waits.
pub struct Process {
    child: Child,
    _stdout: BufReader<ChildStdout>,
    pub control: Control,
}

impl Process {
    /// Starts `binary` on `mountpoint` with its control socket at `socket` and
    /// waits for its `ready` line. The child logs to our stderr, warnings and
    /// errors only unless `RUST_LOG` says otherwise.
    pub fn spawn(binary: &Path, mountpoint: &Path, socket: &Path) -> Result<Process, Error> {
        let spawn_err = |source| Error::Spawn { binary: binary.to_path_buf(), source };
        let mut command = Command::new(binary);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "warn");
        }
        let mut child =
            command.arg(mountpoint).arg("--control").arg(socket).stdout(Stdio::piped()).spawn().map_err(spawn_err)?;
        let mut stdout = BufReader::new(child.stdout.take().ok_or(Error::NotReady)?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if !line.starts_with("ready ") {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::NotReady);
        }
        let control = Control::connect(socket)?;
        Ok(Process { child, _stdout: stdout, control })
    }

    /// Asks the daemon to exit and waits for it.
    pub fn shutdown(mut self) -> Result<(), Error> {
        self.control.exit()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            if self.control.exit().is_err() {
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
        }
    }
}
