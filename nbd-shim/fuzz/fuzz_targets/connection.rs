//! Fuzzes a whole NBD connection: the fuzzer's bytes are everything a
//! client sends (client flags, options, requests with their payloads), fed
//! to `Server::serve_streams` in front of a real mirror (a 1 MiB sparse
//! image with a 256 KiB journal in a temporary directory). Replies are
//! discarded. The mirror is shared by all inputs, so the image's contents
//! and the journal (which overflows into the dirty bitmap once full, as
//! nothing ships it) carry over from one input to the next.
#![no_main]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tern_driver::units::Size;
use tern_driver::vm::{self, EnableSpec, JournalConfig, VmPaths};
use tern_driver::{Mirror, MirrorOptions};
use tern_nbd::{Server, ServerOptions};

const PREFIX: &str = "tern-nbd-fuzz-";

static DIR: OnceLock<PathBuf> = OnceLock::new();
static SERVER: OnceLock<Server> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let server = SERVER.get_or_init(setup);
    let before = threads();
    server.serve_streams(data, std::io::sink(), &|| {}, &|| Ok(()), "fuzz");
    wait_for_threads(before);
});

/// `transmission::serve` runs its workers in `std::thread::scope`, whose
/// implicit join returns once a worker's closure is done but before the
/// thread has run its thread-local destructors and exited
/// (rust-lang/rust#116179, documented as intended by #149482). libFuzzer's
/// leak check right after the input would then report what those
/// destructors are about to free (the thread's `Thread` handle, glibc's
/// TLS-destructor node): wait until the workers are really gone.
fn wait_for_threads(before: usize) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while threads() > before && Instant::now() < deadline {
        std::thread::yield_now();
    }
}

/// Threads of this process (0 without /proc, which disables the wait).
fn threads() -> usize {
    fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}

fn setup() -> Server {
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    sweep_stale(&base);
    let dir = base.join(format!("{PREFIX}{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create the fuzz directory");
    DIR.set(dir.clone()).expect("setup runs once");
    // SAFETY: `atexit` only records the function pointer; `remove_dir` is an
    // `extern "C" fn()` that ignores every error (a panic in it would abort,
    // never unwind into C) and uses only `DIR`, a static that outlives it.
    unsafe { libc::atexit(remove_dir) };

    let image = dir.join("disk0.img");
    fs::File::create(&image).and_then(|f| f.set_len(1 << 20)).expect("create the image");
    let state = dir.join("state");
    // The journal's live ring goes in the same directory, removed with it.
    let paths = VmPaths::new(&state, "vm").expect("VM paths").with_ring_dir(&dir.join("rings"));
    vm::enable_at(
        &paths,
        &EnableSpec {
            name: "vm".into(),
            disks: vec![("disk0".into(), image)],
            cache: dir.join("cache"),
            target: dir.join("target"),
            journal: JournalConfig { size: Size::kib(256), region_size: Size::kib(4) },
            policy: Default::default(),
            initial_sync: Default::default(),
        },
    )
    .expect("enable the VM");
    let mirror = Mirror::open(&paths, MirrorOptions::default()).expect("open the mirror");
    Server::new(Arc::new(mirror), ServerOptions { threads: 2, ..Default::default() })
}

extern "C" fn remove_dir() {
    if let Some(dir) = DIR.get() {
        let _ = fs::remove_dir_all(dir);
    }
}

/// Removes the directories of earlier fuzzing processes that died without
/// running their exit handler (a crash, a timeout, a kill).
fn sweep_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}
