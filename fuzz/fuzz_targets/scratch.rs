//! What the fuzz targets that work on real files share: a scratch
//! directory per process (in /dev/shm when there is one) removed when the
//! process exits, a sweep of the ones dead processes left, and waiting out
//! threads that libFuzzer's leak check would otherwise catch mid-exit.
//! Included by each such target (`#[path = "scratch.rs"] mod scratch;`).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where scratch directories go.
pub fn base() -> PathBuf {
    if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    }
}

/// A fresh directory `<base>/<prefix><pid><suffix>`, after sweeping the
/// directories of `prefix` whose process is gone (a crash, a timeout, a
/// kill: their exit handler never ran).
pub fn fresh_dir(prefix: &str, suffix: &str) -> PathBuf {
    let base = base();
    if let Ok(entries) = fs::read_dir(&base) {
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else { continue };
            let pid = rest.split('-').next().unwrap_or("");
            if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = base.join(format!("{prefix}{}{suffix}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create the fuzz directory");
    dir
}

static DIR: OnceLock<PathBuf> = OnceLock::new();

/// Removes `dir` when the process exits (the first directory given).
pub fn remove_at_exit(dir: &Path) {
    if DIR.set(dir.to_owned()).is_ok() {
        // SAFETY: `atexit` only records the function pointer; `remove_dir`
        // is an `extern "C" fn()` that ignores every error (a panic in it
        // would abort, never unwind into C) and uses only `DIR`, a static
        // that outlives it.
        unsafe { libc::atexit(remove_dir) };
    }
}

extern "C" fn remove_dir() {
    if let Some(dir) = DIR.get() {
        let _ = fs::remove_dir_all(dir);
    }
}

/// Waits (up to a second) until the process has no more threads than
/// `before`. A scoped thread's join returns before the thread has run its
/// thread-local destructors and exited (rust-lang/rust#116179), and
/// `Mirror::open` starts a thread that ends on its own: libFuzzer's leak
/// check right after an input would report what their exits are about to
/// free.
pub fn wait_for_threads(before: usize) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while threads() > before && Instant::now() < deadline {
        std::thread::yield_now();
    }
}

/// Threads of this process (0 without /proc, which disables the wait).
pub fn threads() -> usize {
    fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}
