//! The group barrier: how a group point cuts several VMs' journals at one
//! instant (`tern tag --group`).
//!
//! The coordinator closes the barrier of every member's ring (its pid in
//! the header's barrier word), appends a group tag to each, and opens them
//! again. While a ring's barrier is closed its producers reserve nothing
//! but tags: a write waits before it takes a place in the ring, so it is
//! not acknowledged either. Why that is enough: a write to one member that
//! another member's client saw acknowledged before that member's tag was
//! reserved before its own ring's barrier closed (or it would have
//! waited, and been acknowledged only after every tag), so it lies before
//! its member's tag too. A point at the tags never holds a consequence
//! without its cause.
//!
//! The check sits in the reservation loop after the head is read: a
//! producer whose compare-and-swap lands after a tag read a head the tag
//! had moved, so it saw the barrier the coordinator closed before it.
//!
//! A barrier is never left closed: a producer that finds its holder dead
//! (`kill(pid, 0)` says so), or the deadline passed, opens it itself and
//! says so.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::*;

/// CLOCK_MONOTONIC in ns: one clock for every process on the host.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

/// Whether a process with this pid exists (on this host, in this pid
/// namespace).
fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 checks for the process and sends nothing.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

impl Journal {
    /// Closes the barrier for `holder` (a pid) for at most `hold_for`, after
    /// which producers open it themselves. Err(the holder) if another live
    /// process holds it.
    pub fn close_barrier(&self, holder: u32, hold_for: Duration) -> std::result::Result<(), u32> {
        let word = self.atomic_u64(OFF_BARRIER);
        loop {
            let cur = word.load(Ordering::SeqCst);
            if cur != 0 && cur != u64::from(holder) && alive(cur as u32) && !self.barrier_expired() {
                return Err(cur as u32);
            }
            // The deadline first: a producer that sees the holder sees it.
            self.atomic_u64(OFF_BARRIER_DEADLINE).store(monotonic_ns() + hold_for.as_nanos() as u64, Ordering::SeqCst);
            if word.compare_exchange(cur, u64::from(holder), Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                return Ok(());
            }
        }
    }

    /// Opens the barrier `holder` closed. False if it was no longer its
    /// (a producer opened it after the deadline, or found the holder dead).
    pub fn open_barrier(&self, holder: u32) -> bool {
        self.atomic_u64(OFF_BARRIER).compare_exchange(u64::from(holder), 0, Ordering::SeqCst, Ordering::SeqCst).is_ok()
    }

    /// The pid holding the barrier, if it is closed.
    pub fn barrier_holder(&self) -> Option<u32> {
        match self.atomic_u64(OFF_BARRIER).load(Ordering::SeqCst) {
            0 => None,
            pid => Some(pid as u32),
        }
    }

    fn barrier_expired(&self) -> bool {
        monotonic_ns() > self.atomic_u64(OFF_BARRIER_DEADLINE).load(Ordering::SeqCst)
    }

    /// A producer's side: returns at once while the barrier is open, else
    /// once it opens — or after opening it itself, when its holder died or
    /// held it past the deadline.
    pub(super) fn pass_barrier(&self) {
        let word = self.atomic_u64(OFF_BARRIER);
        let mut nap = Duration::from_micros(20);
        loop {
            let holder = word.load(Ordering::SeqCst);
            if holder == 0 {
                return;
            }
            let (dead, late) = (!alive(holder as u32), self.barrier_expired());
            if (dead || late) && word.compare_exchange(holder, 0, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                log::warn!(
                    "journal {}: opened the group barrier that process {holder} {}",
                    self.path.display(),
                    if dead { "left closed when it died" } else { "held past its deadline" }
                );
                return;
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_micros(500));
        }
    }
}
