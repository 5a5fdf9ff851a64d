//! A byte-range lock: holders of overlapping ranges exclude each other,
//! disjoint ranges proceed in parallel.
//!
//! Invariant 1 rests on it: a write holds its range from before it is
//! published in the journal until the source image has it, so two
//! overlapping writes reach the journal in the order they reach the disk.
//!
//! It is fair: a request waits behind every earlier waiting request it
//! overlaps, not only behind held ranges. Without that, a large range (the
//! resync's whole-disk wait after an overflow) could wait for ever under
//! sustained small writes, one of which is always held, and no recovery
//! point could be taken while the load lasted.
//!
//! A mutex-protected list is enough: the list holds at most one entry per
//! request in flight (a few dozen), and the lock is held for a scan, not for
//! the I/O.

use std::sync::{Condvar, Mutex};

#[derive(Debug, Default)]
pub struct RangeLock {
    held: Mutex<Held>,
    released: Condvar,
}

#[derive(Debug, Default)]
struct Held {
    ranges: Vec<(u64, u64)>, // [start, end)
    /// Requests waiting, oldest first: (ticket, range).
    waiting: std::collections::VecDeque<(u64, (u64, u64))>,
    next_ticket: u64,
}

impl Held {
    fn overlaps_held(&self, range: (u64, u64)) -> bool {
        self.ranges.iter().any(|&r| overlaps(r, range))
    }

    /// Whether a waiting request older than `ticket` (every one, with
    /// `None`) overlaps `range`.
    fn overlaps_earlier_waiter(&self, range: (u64, u64), ticket: Option<u64>) -> bool {
        self.waiting.iter().take_while(|(t, _)| Some(*t) != ticket).any(|&(_, r)| overlaps(r, range))
    }
}

/// Releases its range when dropped.
#[must_use = "the range is unlocked as soon as the guard is dropped"]
#[derive(Debug)]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

/// The `[start, end)` a request holds: an empty one still holds its
/// offset, so it keeps its place in the order.
fn span(offset: u64, len: u64) -> (u64, u64) {
    (offset, offset.saturating_add(len.max(1)))
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl RangeLock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits until no held range and no earlier waiting request overlaps
    /// `[offset, offset + len)`, then holds it. An empty range still
    /// excludes ranges that contain its offset, so it keeps its place in
    /// the order.
    pub fn lock(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        let range = span(offset, len);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.overlaps_held(range) || held.overlaps_earlier_waiter(range, None) {
            let ticket = held.next_ticket;
            held.next_ticket += 1;
            held.waiting.push_back((ticket, range));
            while held.overlaps_held(range) || held.overlaps_earlier_waiter(range, Some(ticket)) {
                held = self.released.wait(held).unwrap_or_else(|p| p.into_inner());
            }
            let mine = held.waiting.iter().position(|(t, _)| *t == ticket).expect("a waiter leaves the queue itself");
            held.waiting.remove(mine);
            // Later waiters that only this one held back may go now.
            self.released.notify_all();
        }
        held.ranges.push(range);
        RangeGuard { lock: self, range }
    }

    /// Holds `[offset, offset + len)` if no held range and no waiting
    /// request overlaps it now; never waits.
    pub fn try_lock(&self, offset: u64, len: u64) -> Option<RangeGuard<'_>> {
        let range = span(offset, len);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.overlaps_held(range) || held.overlaps_earlier_waiter(range, None) {
            return None;
        }
        held.ranges.push(range);
        Some(RangeGuard { lock: self, range })
    }

    /// Number of ranges held right now (for tests and status).
    pub fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).ranges.len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = held.ranges.iter().position(|&r| r == self.range) {
            held.ranges.swap_remove(i);
        }
        if !held.waiting.is_empty() {
            self.lock.released.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn disjoint_ranges_are_held_together() {
        let l = RangeLock::new();
        let _a = l.lock(0, 10);
        let _b = l.lock(10, 10);
        assert_eq!(l.held(), 2);
    }

    #[test]
    fn try_lock_takes_only_a_free_range() {
        let l = RangeLock::new();
        let a = l.try_lock(0, 4096).expect("free");
        assert!(l.try_lock(4095, 2).is_none(), "overlaps the held range");
        assert!(l.try_lock(4096, 4096).is_some(), "disjoint");
        drop(a);
        assert!(l.try_lock(0, 8192).is_some(), "free again");
    }

    #[test]
    fn overlapping_range_waits_for_release() {
        let l = Arc::new(RangeLock::new());
        let g = l.lock(0, 4096);
        let entered = Arc::new(AtomicBool::new(false));
        let t = {
            let (l, entered) = (l.clone(), entered.clone());
            std::thread::spawn(move || {
                let _g = l.lock(4095, 2);
                entered.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!entered.load(Ordering::SeqCst), "overlapping lock was granted while held");
        drop(g);
        t.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
    }

    #[test]
    fn a_large_range_is_granted_under_sustained_small_overlapping_ones() {
        let l = Arc::new(RangeLock::new());
        let stop = Arc::new(AtomicBool::new(false));
        // Four writers, one of them always holding a range.
        let writers: Vec<_> = (0..4u64)
            .map(|i| {
                let (l, stop) = (l.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut j = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let _g = l.lock((i * 7 + j) % 64 * 4096, 4096);
                        std::thread::sleep(Duration::from_micros(500));
                        j += 1;
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        let (granted, l2) = (Arc::new(AtomicBool::new(false)), l.clone());
        let big = {
            let granted = granted.clone();
            std::thread::spawn(move || {
                drop(l2.lock(0, 64 * 4096));
                granted.store(true, Ordering::SeqCst);
            })
        };
        let started = std::time::Instant::now();
        while !granted.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let waited = started.elapsed();
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.join().unwrap();
        }
        big.join().unwrap();
        assert!(waited < Duration::from_secs(5), "the whole-range lock starved behind small writes");
    }

    #[test]
    fn try_lock_never_jumps_an_overlapping_waiter() {
        let l = Arc::new(RangeLock::new());
        let g = l.lock(0, 4096);
        let waiter = {
            let l = l.clone();
            std::thread::spawn(move || drop(l.lock(0, 1 << 20)))
        };
        while l.held.lock().unwrap().waiting.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(l.try_lock(8192, 4096).is_none(), "it would hold back the waiting whole-range request");
        assert!(l.try_lock(2 << 20, 4096).is_some(), "disjoint from every holder and waiter");
        drop(g);
        waiter.join().unwrap();
        assert!(l.try_lock(8192, 4096).is_some());
    }

    #[test]
    fn overlapping_holders_never_coexist_under_contention() {
        let l = Arc::new(RangeLock::new());
        let inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (l, inside) = (l.clone(), inside.clone());
                std::thread::spawn(move || {
                    for j in 0..2000u64 {
                        let _g = l.lock((i + j) % 3 * 100, 150);
                        // Every range overlaps range 100..250 or its neighbour;
                        // the counter checks pairs on the same start.
                        let n = inside.fetch_add(1, Ordering::SeqCst);
                        assert!(n < 3, "more holders than disjoint ranges exist");
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(l.held(), 0);
    }
}
