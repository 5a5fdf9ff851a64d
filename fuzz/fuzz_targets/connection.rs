//! Fuzzes a whole NBD connection: the fuzzer's bytes are everything a
//! client sends (client flags, options, requests with their payloads), fed
//! to `Server::serve_streams` in front of a real mirror (a 1 MiB sparse
//! image with a 16 KiB journal ring, in /dev/shm). Replies are discarded.
//!
//! Input: byte 0 chooses the server, the rest is the client's side.
//! - bit 0 clear: one worker and no waiter; the worker carries out every
//!   request itself. Nothing runs on another thread: starting, and then
//!   waiting out, a connection's threads (2 workers and 16 waiters, as
//!   this target ran until 2026-12) was most of the time an input took.
//! - bit 0 set: one worker and one waiter, which FLUSH, FUA and uncached
//!   READs are handed to, as in `tern serve`: one thread per input. (Two
//!   workers, taking turns on the read side, cost a third more per input
//!   and fill the corpus with inputs whose only news is a new interleaving
//!   of the two.)
//!
//! After each input the target plays `tern ship`: it walks the journal from
//! the tail to the head, checking that every record the connection left is
//! published, intact and dense in sequence numbers, moves the tail past
//! them, runs the resync until it is idle (out of overflow, nothing dirty,
//! the window closed), then trims the disk and consumes that too. So every
//! input starts from the same empty, journaling mirror, only at another
//! place in the ring; an input that writes more than the ring holds takes
//! it into overflow and the resync out again.
#![no_main]

use std::fs;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;

#[path = "scratch.rs"]
mod scratch;
use tern_driver::journal::RecordKind;
use tern_driver::units::Size;
use tern_driver::vm::{self, EnableSpec, JournalConfig, VmPaths};
use tern_driver::{Mirror, MirrorOptions, ResyncStep};
use tern_nbd::{Server, ServerOptions};

const PREFIX: &str = "tern-nbd-fuzz-";
/// The image's size (scripts/fuzz-seeds.py knows it too).
const DISK_SIZE: u64 = 1 << 20;

static SERVERS: OnceLock<Servers> = OnceLock::new();

struct Servers {
    mirror: Arc<Mirror>,
    /// One worker, no waiter: no thread started per input.
    single: Server,
    /// One worker and one waiter.
    threaded: Server,
}

fuzz_target!(|data: &[u8]| {
    let s = SERVERS.get_or_init(setup);
    let Some((&mode, client)) = data.split_first() else { return };
    if mode & 1 == 0 {
        s.single.serve_streams(client, std::io::sink(), &|| {}, &|| Ok(()), "fuzz");
    } else {
        let before = scratch::threads();
        s.threaded.serve_streams(client, std::io::sink(), &|| {}, &|| Ok(()), "fuzz");
        scratch::wait_for_threads(before);
    }
    ship_and_reset(&s.mirror);
});

/// What a shipper that keeps up, and the front-end's resync, would do
/// between this input and the next; panics where the journal breaks a
/// promise.
fn ship_and_reset(mirror: &Mirror) {
    consume(mirror);
    let mut steps = 0;
    loop {
        match mirror.resync_step(u64::MAX).expect("resync step") {
            ResyncStep::Idle => break,
            ResyncStep::Progress { .. } | ResyncStep::WaitingForRoom => consume(mirror),
            ResyncStep::AwaitingChecksum => panic!("a checksum resync is due, but the host never went down"),
        }
        steps += 1;
        // A 1 MiB disk in 4 KiB runs, a quarter of the ring at a time.
        assert!(steps < 10_000, "the resync does not finish");
    }
    mirror.trim(0, 0, DISK_SIZE, false).expect("trim the disk");
    consume(mirror);
}

/// Reads every record from the tail to the head, as the shipper does, and
/// moves the tail past them. With no request in flight, there is no hole:
/// the walk must end exactly at the head.
fn consume(mirror: &Mirror) {
    let journal = mirror.journal();
    let head = journal.head();
    let mut cursor = journal.cursor(journal.tail());
    let mut data = Vec::new();
    loop {
        let at = cursor.position();
        match cursor.next(&mut data) {
            Ok(Some(h)) => {
                assert_eq!(data.len(), h.data_len as usize, "record at {at:?}: {h:?}");
                if h.kind.changes_disk() {
                    let end = h.offset.checked_add(h.length as u64);
                    assert!(end.is_some_and(|e| e <= DISK_SIZE), "record at {at:?} past the disk: {h:?}");
                }
                if h.kind == RecordKind::Pad {
                    assert!(h.offset > 0, "a wrap pad was handed out: {h:?}");
                }
            }
            Ok(None) => break,
            Err(e) => panic!("the journal is unreadable after a connection: {e}"),
        }
    }
    let end = cursor.position();
    assert_eq!(end.pos, head.pos, "the walk stopped short of the head ({head:?}) at {end:?}: a hole");
    assert_eq!(end.seq, head.seq, "sequence numbers do not add up to the head's");
    journal.set_tail(end);
}

fn setup() -> Servers {
    let dir = scratch::fresh_dir(PREFIX, "");
    scratch::remove_at_exit(&dir);

    let image = dir.join("disk0.img");
    fs::File::create(&image).and_then(|f| f.set_len(DISK_SIZE)).expect("create the image");
    let state = dir.join("state");
    // The journal's live ring goes in the same directory, removed with it.
    let paths = VmPaths::new(&state, "vm").expect("VM paths").with_ring_dir(&dir.join("rings"));
    vm::enable_at(
        &paths,
        &EnableSpec {
            name: "vm".into(),
            disks: vec![("disk0".into(), image)],
            cache: dir.join("cache"),
            key: None,
            target: dir.join("target"),
            // The smallest ring: an input of 16 KiB of writes overflows it.
            journal: JournalConfig { size: Size::kib(16), region_size: Size::kib(4) },
            policy: Default::default(),
            app_points: Default::default(),
            launch: Default::default(),
            initial_sync: Default::default(),
        },
    )
    .expect("enable the VM");
    let mirror = Arc::new(Mirror::open(&paths, MirrorOptions::default()).expect("open the mirror"));
    let single = ServerOptions { threads: 1, waiters: 0, ..Default::default() };
    let threaded = ServerOptions { threads: 1, waiters: 1, ..Default::default() };
    Servers {
        single: Server::new(Arc::clone(&mirror), single),
        threaded: Server::new(Arc::clone(&mirror), threaded),
        mirror,
    }
}
