//! "Every interval, no catch-up": the clock of `tern serve`'s scheduled
//! app points and of `tern group run`'s cuts.

use std::time::{Duration, Instant};

/// Due once per interval, on the grid of the first time. A stall (a
/// machine suspended, a cut that took longer than the interval) is not
/// made up with points back to back: the missed slots are dropped and the
/// next one is an interval after the late one.
pub struct Every {
    interval: Duration,
    next: Instant,
}

impl Every {
    /// First due at `first`.
    pub fn starting(first: Instant, interval: Duration) -> Self {
        Every { interval, next: first }
    }

    /// Whether it is due now; if so, the next is scheduled.
    pub fn due(&mut self) -> bool {
        self.due_at(Instant::now())
    }

    fn due_at(&mut self, now: Instant) -> bool {
        if now < self.next {
            return false;
        }
        self.next += self.interval;
        if self.next <= now {
            self.next = now + self.interval;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_once_per_interval_and_a_stall_is_not_made_up() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut every = Every::starting(t0 + 10 * s, 10 * s);
        assert!(!every.due_at(t0));
        assert!(every.due_at(t0 + 10 * s));
        assert!(!every.due_at(t0 + 10 * s), "not twice in one slot");
        assert!(!every.due_at(t0 + 19 * s));
        // On time but late by 3 s: the next slot stays on the grid.
        assert!(every.due_at(t0 + 23 * s));
        assert!(!every.due_at(t0 + 29 * s));
        assert!(every.due_at(t0 + 30 * s));
        // Suspended for an hour: one point, then an interval later, not
        // the 360 missed ones.
        assert!(every.due_at(t0 + 3630 * s));
        assert!(!every.due_at(t0 + 3631 * s));
        assert!(!every.due_at(t0 + 3639 * s));
        assert!(every.due_at(t0 + 3640 * s));
    }
}
