//! The bandwidth limit of `tern ship --max-rate`: a token bucket on the
//! bytes the writer sends to the cache store (segments as stored, after
//! compression: what crosses the link).
//!
//! It keeps a virtual schedule: every segment books its size at the rate,
//! and a segment may start once the schedule is no more than a second
//! ahead of the clock (the bucket holds one second of bytes). Waiting
//! here only slows the shipper: the ring and the dirty bitmaps absorb the
//! backlog, and the VM never waits (invariant 4).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tern_driver::units::Rate;

/// How far the schedule may run ahead of the clock: the bucket's size,
/// in time at the rate.
const BURST: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Throttle {
    rate: Rate,
    /// When everything booked so far is paid for at `rate`.
    paid_until: Option<Instant>,
}

impl Throttle {
    pub fn new(rate: Rate) -> Self {
        Throttle { rate, paid_until: None }
    }

    /// Books `bytes` to be sent at `now`: how long to wait before sending
    /// them.
    pub fn book(&mut self, bytes: u64, now: Instant) -> Duration {
        let start = self.paid_until.map_or(now, |t| t.max(now));
        let wait = start.checked_sub(BURST).map_or(Duration::ZERO, |allowed| allowed.saturating_duration_since(now));
        let cost = Duration::from_secs_f64(bytes as f64 / self.rate.bytes_per_second() as f64);
        self.paid_until = Some(start + cost);
        wait
    }

    /// Books `bytes` and sleeps as long as the limit asks. Returns the time
    /// waited. A stop request ends the wait at once: a shipper that is
    /// stopping sends what is in flight at full speed and exits.
    pub fn wait_for(&mut self, bytes: u64, stop: &AtomicBool) -> Duration {
        let started = Instant::now();
        let deadline = started + self.book(bytes, started);
        while !stop.load(Ordering::Acquire) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(100)));
        }
        started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    #[test]
    fn a_long_run_goes_at_the_rate_after_one_burst() {
        let mut t = Throttle::new(Rate(10 * MB));
        let t0 = Instant::now();
        let mut now = t0;
        // 100 segments of 1 MB sent as soon as allowed: 10 s at 10 MB/s,
        // the first second's worth (the burst) without waiting.
        for _ in 0..100 {
            now += t.book(MB, now);
        }
        let elapsed = now - t0;
        assert!(elapsed >= Duration::from_millis(8_890) && elapsed <= Duration::from_millis(9_000), "{elapsed:?}");
    }

    #[test]
    fn a_segment_larger_than_the_bucket_is_paid_for_by_the_next() {
        let mut t = Throttle::new(Rate(MB));
        let t0 = Instant::now();
        assert_eq!(t.book(8 * MB, t0), Duration::ZERO);
        // 8 s of credit spent: the next waits until 1 s before it is paid.
        assert_eq!(t.book(MB, t0), Duration::from_secs(7));
    }

    #[test]
    fn an_idle_link_does_not_bank_more_than_one_burst() {
        let mut t = Throttle::new(Rate(MB));
        let t0 = Instant::now();
        assert_eq!(t.book(MB, t0), Duration::ZERO);
        // An hour idle: the schedule restarts from the clock, so a burst
        // after it is one second's worth, not an hour's.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(t.book(MB, later), Duration::ZERO);
        assert_eq!(t.book(MB, later), Duration::ZERO);
        assert_eq!(t.book(MB, later), Duration::from_secs(1));
    }

    #[test]
    fn a_stop_request_ends_the_wait() {
        let mut t = Throttle::new(Rate(64_000));
        let stop = AtomicBool::new(false);
        assert!(t.wait_for(64_000 * 10, &stop) < Duration::from_secs(1)); // the burst
        stop.store(true, Ordering::Release);
        assert!(t.wait_for(64_000, &stop) < Duration::from_secs(1)); // would be 9 s
    }
}
