//! A byte-range lock: holders of overlapping ranges exclude each other,
//! disjoint ranges proceed in parallel.
//!
//! Invariant 1 rests on it: a write holds its range from before it is
//! published in the journal until the source image has it, so two
//! overlapping writes reach the journal in the order they reach the disk.
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
    waiters: usize,
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

    /// Waits until no held range overlaps `[offset, offset + len)`, then
    /// holds it. An empty range still excludes ranges that contain its
    /// offset, so it keeps its place in the order.
    pub fn lock(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        let range = span(offset, len);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        while held.ranges.iter().any(|&r| overlaps(r, range)) {
            held.waiters += 1;
            held = self.released.wait(held).unwrap_or_else(|p| p.into_inner());
            held.waiters -= 1;
        }
        held.ranges.push(range);
        RangeGuard { lock: self, range }
    }

    /// Holds `[offset, offset + len)` if no held range overlaps it now;
    /// never waits.
    pub fn try_lock(&self, offset: u64, len: u64) -> Option<RangeGuard<'_>> {
        let range = span(offset, len);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.ranges.iter().any(|&r| overlaps(r, range)) {
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
        if held.waiters > 0 {
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
