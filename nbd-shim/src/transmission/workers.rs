//! The request threads of a server, shared out among its connections:
//! how many of its workers each connection keeps busy, and parking the
//! rest.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use super::DEFAULT_WAITERS;

/// The request threads of a server, shared out among its active
/// connections: each keeps `threads / active connections` of its workers
/// busy (rounded down, at least one), and parks the rest until a
/// connection ends, goes quiet, or its own closes. A connection is active
/// from its handshake on, and quiet once no request has arrived for a
/// [`RECEIVE_POLL`](super::RECEIVE_POLL), until the next one does: four disks of a VM, one of
/// them busy, give that one all the workers, not a quarter.
///
/// A worker's work is CPU work, so workers past the CPUs only take turns:
/// a request waits for its thread to be scheduled again, and a worker
/// preempted while it holds its connection's read side holds up that whole
/// connection. With a team per connection, four connections on two CPUs
/// ran eight workers, and 4 KiB writes at 4 × QD8 had a p99 of 1.6–2.7 ms;
/// one worker each measured 0.44–0.96 ms, with more IOPS
/// (docs/BENCHMARKS.md).
pub struct Workers {
    threads: usize,
    /// Waiters each connection starts (see [`DEFAULT_WAITERS`]).
    pub(super) waiters: usize,
    /// Connections in transmission that are not quiet.
    active: AtomicUsize,
    /// Taken to park, and by whatever may let a parked worker go on (a
    /// connection ending or going quiet, a connection closing), so no
    /// wake-up is lost.
    parked: Mutex<()>,
    changed: Condvar,
}

impl Workers {
    /// `threads` workers for the whole server (at least one per connection).
    pub fn new(threads: usize) -> Self {
        Workers {
            threads: threads.max(1),
            waiters: DEFAULT_WAITERS,
            active: AtomicUsize::new(0),
            parked: Mutex::new(()),
            changed: Condvar::new(),
        }
    }

    /// Each connection starts `waiters` waiters instead of
    /// [`DEFAULT_WAITERS`]; with none, its workers carry out every request
    /// themselves (the fuzz target's setting: a thread started per
    /// connection is most of the cost of a short one).
    pub fn with_waiters(mut self, waiters: usize) -> Self {
        self.waiters = waiters;
        self
    }

    /// The workers each connection starts (and parks past its share): as
    /// many as the server has, since a connection alone may use them all.
    pub(super) fn team(&self) -> usize {
        self.threads
    }

    /// Connections counted active now (for tests).
    #[cfg(test)]
    pub(super) fn active_connections(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// How many of its workers each active connection keeps busy now.
    pub(super) fn share(&self) -> usize {
        self.share_among(self.active.load(Ordering::Acquire))
    }

    fn share_among(&self, active: usize) -> usize {
        (self.threads / active.max(1)).max(1)
    }

    /// Counts an active connection out. Parked workers are woken only
    /// when that gives them a larger share: a connection that goes quiet
    /// at every slow request of its own would otherwise wake every parked
    /// worker of the server each time, to park again.
    fn leave(&self) {
        let before = self.active.fetch_sub(1, Ordering::AcqRel);
        if self.share_among(before - 1) > self.share_among(before) {
            self.wake_all();
        }
    }

    /// Counts a connection in, active, until the returned guard drops.
    pub(super) fn join(&self) -> Joined<'_> {
        self.active.fetch_add(1, Ordering::AcqRel);
        Joined { workers: self, quiet: AtomicBool::new(false) }
    }

    /// Wakes every parked worker to look again at its share and its
    /// connection.
    pub(super) fn wake_all(&self) {
        drop(self.parked.lock().unwrap_or_else(|p| p.into_inner()));
        self.changed.notify_all();
    }

    /// Parks worker `index` of a connection while it is past the
    /// connection's share. False once the connection is closing.
    pub(super) fn wait_for_turn(&self, index: usize, closing: &AtomicBool) -> bool {
        if index < self.share() {
            return !closing.load(Ordering::Acquire);
        }
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        while index >= self.share() && !closing.load(Ordering::Acquire) {
            parked = self.changed.wait(parked).unwrap_or_else(|p| p.into_inner());
        }
        !closing.load(Ordering::Acquire)
    }
}

/// A connection counted in [`Workers`]. Only the worker holding the
/// connection's read side calls `quiet` and `active`, so they never race.
pub(super) struct Joined<'a> {
    workers: &'a Workers,
    quiet: AtomicBool,
}

impl Joined<'_> {
    /// No request came for a while: the connection stops counting, and
    /// parked workers of the others look again at their (larger) share.
    pub(super) fn quiet(&self) {
        if !self.quiet.swap(true, Ordering::AcqRel) {
            self.workers.leave();
        }
    }

    /// A request came: the connection counts again. The others' workers
    /// past their (smaller) share park before their next request.
    pub(super) fn active(&self) {
        // Once per request: a plain load first, the read-modify-write only
        // on the rare way back from quiet.
        if self.quiet.load(Ordering::Acquire) && self.quiet.swap(false, Ordering::AcqRel) {
            self.workers.active.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Joined<'_> {
    /// After every thread of the connection has returned (it is part of
    /// the connection's state): only other connections' workers are
    /// parked.
    fn drop(&mut self) {
        if !*self.quiet.get_mut() {
            self.workers.leave();
        }
    }
}
