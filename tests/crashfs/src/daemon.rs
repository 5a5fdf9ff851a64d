//! The long-lived process: it owns the model, mounts and unmounts it (a
//! remount is the "reboot": the kernel's caches start empty), and answers the
//! control socket, one line per command and one line per reply.
//!
//! The model must outlive every mount, so each mount gets a fresh
//! `CrashFs` that shares it. Unmounting is our own non-lazy `umount(2)`, so a
//! process still holding the mount makes it fail with EBUSY instead of
//! leaving a detached mount that would keep writing behind the power cut.

use std::fs::OpenOptions;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use fuser::{BackgroundSession, MountOption, SessionACL};
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::fuse::CrashFs;
use crate::model::{CutMode, FaultOp, Model};
use crate::protocol;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{} is busy: a process still has a file, a mapping or its working directory there", .mountpoint.display())]
    Busy { mountpoint: PathBuf },
    #[error("cannot mount {}", .mountpoint.display())]
    Mount { mountpoint: PathBuf, source: io::Error },
    #[error("cannot unmount {}", .mountpoint.display())]
    Unmount { mountpoint: PathBuf, source: io::Error },
    #[error("a power cut needs {} unmounted first", .mountpoint.display())]
    Mounted { mountpoint: PathBuf },
}

impl DaemonError {
    /// The word after `error` on the control socket, for clients to match.
    pub fn code(&self) -> &'static str {
        match self {
            DaemonError::Busy { .. } => "busy",
            DaemonError::Mounted { .. } => "mounted",
            DaemonError::Mount { .. } | DaemonError::Unmount { .. } => "failed",
        }
    }
}

/// The model plus the mount it is (or is not) served on.
pub struct Daemon {
    model: Arc<Mutex<Model>>,
    mountpoint: PathBuf,
    session: Mutex<Option<BackgroundSession>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Daemon {
    pub fn new(mountpoint: &Path) -> io::Result<Daemon> {
        Ok(Daemon {
            model: Arc::new(Mutex::new(Model::new())),
            mountpoint: mountpoint.canonicalize()?,
            session: Mutex::new(None),
        })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Mounts unless mounted; returns whether it mounted.
    pub fn mount(&self) -> Result<bool, DaemonError> {
        let mut session = lock(&self.session);
        if session.as_ref().is_some_and(|s| !s.guard.is_finished()) {
            return Ok(false);
        }
        // A new mount's kernel holds no inode yet, whatever the last one held.
        lock(&self.model).unmounted();
        let fs = CrashFs::new(Arc::clone(&self.model));
        let mounted = if nix::unistd::geteuid().is_root() {
            self.mount_as_root(fs)
        } else {
            let mut config = fuser::Config::default();
            config.mount_options = vec![
                MountOption::FSName("tern-crashfs".into()),
                MountOption::Subtype("crashfs".into()),
                MountOption::DefaultPermissions,
            ];
            fuser::Session::new(fs, &self.mountpoint, &config)
        };
        let err = |source| DaemonError::Mount { mountpoint: self.mountpoint.clone(), source };
        *session = Some(mounted.and_then(fuser::Session::spawn).map_err(err)?);
        log::info!("mounted {}", self.mountpoint.display());
        Ok(true)
    }

    /// Mounts with mount(2) on a /dev/fuse we opened, so the session owns no
    /// unmounter of its own (fuser's would try to unmount the path again once
    /// the session ends, after ours did).
    fn mount_as_root(&self, fs: CrashFs) -> io::Result<fuser::Session<CrashFs>> {
        let dev = OpenOptions::new().read(true).write(true).open("/dev/fuse")?;
        let options =
            format!("fd={},rootmode=40755,user_id=0,group_id=0,default_permissions,allow_other", dev.as_raw_fd());
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        mount(Some("tern-crashfs"), &self.mountpoint, Some("fuse.crashfs"), flags, Some(options.as_str()))?;
        let session = fuser::Session::from_fd(fs, OwnedFd::from(dev), SessionACL::All, fuser::Config::default());
        if session.is_err() {
            let _ = umount2(&self.mountpoint, MntFlags::MNT_DETACH);
        }
        session
    }

    /// One non-lazy unmount attempt; returns whether it was mounted.
    pub fn unmount(&self) -> Result<bool, DaemonError> {
        let mut session = lock(&self.session);
        let Some(running) = session.as_ref() else { return Ok(false) };
        if !running.guard.is_finished() {
            self.umount_syscall()?;
        }
        if let Some(finished) = session.take() {
            if let Err(e) = finished.join() {
                log::warn!("the FUSE session of {} ended with {e}", self.mountpoint.display());
            }
        }
        lock(&self.model).unmounted();
        log::info!("unmounted {}", self.mountpoint.display());
        Ok(true)
    }

    fn umount_syscall(&self) -> Result<(), DaemonError> {
        let mountpoint = self.mountpoint.clone();
        match umount2(&self.mountpoint, MntFlags::empty()) {
            Ok(()) | Err(Errno::EINVAL) => Ok(()),
            Err(Errno::EBUSY) => Err(DaemonError::Busy { mountpoint }),
            Err(Errno::EPERM) => {
                // Not root: the setuid helper unmounts for us, still not lazily.
                let status = Command::new("fusermount3").arg("-u").arg("-q").arg(&self.mountpoint).status();
                match status {
                    Ok(s) if s.success() => Ok(()),
                    Ok(_) => Err(DaemonError::Busy { mountpoint }),
                    Err(source) => Err(DaemonError::Unmount { mountpoint, source }),
                }
            }
            Err(e) => Err(DaemonError::Unmount { mountpoint, source: e.into() }),
        }
    }

    /// Unmounts for good at exit: retries a busy mount for 5 s, then detaches it.
    pub fn shutdown(&self) {
        for _ in 0..50 {
            match self.unmount() {
                Ok(_) => return,
                Err(DaemonError::Busy { .. }) => thread::sleep(Duration::from_millis(100)),
                Err(e) => {
                    log::error!("{e}");
                    break;
                }
            }
        }
        log::warn!("{} still busy at exit; detaching it lazily", self.mountpoint.display());
        if let Err(e) = umount2(&self.mountpoint, MntFlags::MNT_DETACH) {
            log::error!("lazy unmount of {} failed: {e}", self.mountpoint.display());
        }
    }

    /// Runs one control command; returns the reply line and whether to exit.
    pub fn command(&self, line: &str) -> (String, bool) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match self.dispatch(&words) {
            Ok(text) if text.is_empty() => "ok".to_owned(),
            Ok(text) => format!("ok {text}"),
            Err((code, message)) => format!("error {code} {message}"),
        };
        log::info!("control: {line} -> {reply}");
        (reply, words.first() == Some(&"exit"))
    }

    fn dispatch(&self, words: &[&str]) -> Result<String, (&'static str, String)> {
        let usage = |m: &str| ("usage", m.to_owned());
        let failed = |e: DaemonError| (e.code(), format!("{e}"));
        match words {
            ["mount"] => self.mount().map(|m| if m { "mounted" } else { "already mounted" }.into()).map_err(failed),
            ["unmount"] => {
                self.unmount().map(|m| if m { "unmounted" } else { "already unmounted" }.into()).map_err(failed)
            }
            ["powercut", seed, mode] => {
                let seed = seed.parse::<u64>().map_err(|_| usage("seed must be an unsigned integer"))?;
                let mode = mode.parse::<CutMode>().map_err(|e| usage(&e))?;
                // Held across the cut so no mount can start in the middle of it.
                let session = lock(&self.session);
                if session.is_some() {
                    return Err(failed(DaemonError::Mounted { mountpoint: self.mountpoint.clone() }));
                }
                let stats = lock(&self.model).powercut(seed, mode);
                drop(session);
                log::info!("power cut (seed {seed}, {mode}): {stats:?}");
                Ok(protocol::encode_cut(&stats))
            }
            ["sync"] => {
                lock(&self.model).sync();
                Ok(String::new())
            }
            ["stats"] => Ok(protocol::encode_stats(&lock(&self.model).stats())),
            ["fail", "clear"] => {
                lock(&self.model).clear_faults();
                Ok(String::new())
            }
            ["fail", op, errno, substring, count] => {
                let op = op.parse::<FaultOp>().map_err(|e| usage(&e))?;
                let errno =
                    protocol::parse_errno(errno).ok_or_else(|| usage("errno: EIO, ENOSPC, EDQUOT or a number"))?;
                let count = count.parse::<u64>().map_err(|_| usage("count must be an unsigned integer"))?;
                lock(&self.model).add_fault(op, errno, substring, count);
                Ok(String::new())
            }
            ["capacity", "none"] => {
                lock(&self.model).set_capacity(None);
                Ok(String::new())
            }
            ["capacity", bytes] => {
                let bytes = bytes.parse::<u64>().map_err(|_| usage("capacity: a byte count or none"))?;
                lock(&self.model).set_capacity(Some(bytes));
                Ok(String::new())
            }
            ["exit"] => Ok(String::new()),
            _ => Err(usage(
                "commands: mount, unmount, powercut <seed> <drop|prefix|subset>, sync, stats, \
                 fail <op> <errno> <path-substring> <count>, fail clear, capacity <bytes|none>, exit",
            )),
        }
    }
}

/// Binds the control socket and answers it on background threads, one per
/// connection; `exit` is signalled on `exit` after its reply is sent.
pub fn serve_control(daemon: Arc<Daemon>, socket: &Path, exit: Sender<()>) -> io::Result<()> {
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(socket)?;
    thread::Builder::new().name("control".into()).spawn(move || {
        for conn in listener.incoming() {
            let conn = match conn {
                Ok(conn) => conn,
                Err(e) => {
                    log::warn!("control socket accept: {e}");
                    continue;
                }
            };
            let (daemon, exit) = (Arc::clone(&daemon), exit.clone());
            let spawned = thread::Builder::new().name("control-conn".into()).spawn(move || {
                if let Err(e) = answer(&daemon, conn, &exit) {
                    log::warn!("control connection: {e}");
                }
            });
            if let Err(e) = spawned {
                log::warn!("control connection thread: {e}");
            }
        }
    })?;
    Ok(())
}

fn answer(daemon: &Daemon, conn: UnixStream, exit: &Sender<()>) -> io::Result<()> {
    let mut writer = conn.try_clone()?;
    for line in BufReader::new(conn).lines() {
        let (reply, quit) = daemon.command(line?.trim());
        writer.write_all(format!("{reply}\n").as_bytes())?;
        writer.flush()?;
        if quit {
            // The receiver only goes away when the process is exiting anyway.
            let _ = exit.send(());
            break;
        }
    }
    Ok(())
}
