//! The shipper's resync driver: when no front-end runs, the shipper opens
//! the VM itself to re-send dirty regions (then nobody else can), and it
//! turns a pending checksum resync into dirty marks. While `tern serve`
//! runs, serve's own resync thread does the re-sending.

use super::*;

/// Re-sends dirty regions when no front-end runs (then nobody else can),
/// and turns a pending checksum resync into dirty marks. While `tern
/// serve` runs, its own resync thread does the re-sending.
pub(super) fn drive_resync(
    paths: &VmPaths,
    checksum: &checksum::ChecksumResync,
    journal: &Journal,
    bitmaps: &[DirtyBitmap],
    reader_done: &AtomicBool,
    idle: &AtomicBool,
    stop: &AtomicBool,
) {
    while !reader_done.load(Ordering::Acquire) && !stop.load(Ordering::Acquire) {
        if journal.checksum_resync_due() {
            if let Err(e) = checksum.poll(journal, bitmaps) {
                log::error!("checksum resync: {e:#}; retrying in 5s");
                std::thread::sleep(Duration::from_secs(5));
                continue;
            }
        }
        let dirty = bitmaps.iter().any(|b| b.dirty_count() > 0);
        let attached = journal.flags() & journal::FLAG_ATTACHED != 0;
        // A comparison still due needs its window opened (the target
        // answers only once the replica has reached the epoch, and an idle
        // VM ships nothing else to reach it with).
        let checksum_due = journal.checksum_resync_due();
        // A window the last front-end left open (it stopped before closing
        // it) is closed by the next front-end's first step.
        if !dirty && !attached && !journal.window_open() && !checksum_due {
            idle.store(true, Ordering::Release);
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match Mirror::open(paths, MirrorOptions::default()) {
            Ok(mirror) => {
                idle.store(false, Ordering::Release);
                let result = resync_for_a_while(&mirror, reader_done, stop);
                wait_for_the_shipper(journal, reader_done, stop);
                // Detach cleanly even after an error (an attached journal
                // means a crash to the next front-end).
                let shutdown = mirror.shutdown();
                if let Err(e) = result.and(shutdown) {
                    log::error!("resync of VM '{}' failed: {e:#}; retrying in 5s", mirror.config().name);
                    std::thread::sleep(Duration::from_secs(5));
                }
                // A front-end that is starting waits for the lock: let it in.
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(tern_driver::Error::Busy { .. }) => {
                // `tern serve` runs and resyncs itself; `--once` waits for
                // the bitmaps to empty and the window to close.
                idle.store(true, Ordering::Release);
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => {
                log::error!("cannot open VM for resync: {e}; retrying in 5s");
                std::thread::sleep(Duration::from_secs(5));
            }
        }
    }
}

/// Waits (3 s at most) until this process's shipper has taken nearly all
/// the records in the ring. Detaching writes whatever it has not taken to
/// the durable journal, at disk speed: after two seconds of resync,
/// gigabytes about to be shipped anyway (an initial sync of 2 GiB spent
/// 6.9 s of its 8.9 s so). Bounded, since a `tern serve` that is starting
/// waits 10 s for the VM.
pub(super) fn wait_for_the_shipper(journal: &Journal, reader_done: &AtomicBool, stop: &AtomicBool) {
    let until = Instant::now() + Duration::from_secs(3);
    while journal.unconsumed_bytes() > 64 << 20
        && Instant::now() < until
        && !reader_done.load(Ordering::Acquire)
        && !stop.load(Ordering::Acquire)
    {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs resync steps for up to two seconds (then the front-end lock is
/// released for a moment, so `tern serve` can start).
pub(super) fn resync_for_a_while(
    mirror: &Mirror,
    reader_done: &AtomicBool,
    stop: &AtomicBool,
) -> tern_driver::Result<ResyncStep> {
    let until = Instant::now() + Duration::from_secs(2);
    loop {
        let step = mirror.resync_step(8 << 20)?;
        match step {
            ResyncStep::Idle => return Ok(step),
            ResyncStep::Progress { .. } => {}
            ResyncStep::WaitingForRoom | ResyncStep::AwaitingChecksum => std::thread::sleep(Duration::from_millis(2)),
        }
        if Instant::now() >= until || reader_done.load(Ordering::Acquire) || stop.load(Ordering::Acquire) {
            return Ok(step);
        }
    }
}
