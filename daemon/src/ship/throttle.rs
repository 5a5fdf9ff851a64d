//! The bandwidth limit of `tern ship --max-rate`: the writer's sends to the
//! cache store (segments as stored, after compression: what crosses the
//! link) held to a rate.
//!
//! It keeps a schedule, as rsync's `--bwlimit` does: each segment's size
//! at the rate is booked from when its send began (or from where the
//! schedule stood, if that is later), and after the send the writer
//! sleeps until the schedule catches up. A send that was itself slower
//! than the limit (a slow link) waits nothing; an idle link banks nothing,
//! since a send after a pause books from its own start. Waiting here only
//! slows the shipper: the ring and the dirty bitmaps absorb the backlog,
//! and the VM never waits (invariant 4).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tern_driver::units::Rate;

#[derive(Debug)]
pub struct Throttle {
    rate: Rate,
    /// When everything sent so far is paid for at `rate`.
    paid_until: Option<Instant>,
}

impl Throttle {
    pub fn new(rate: Rate) -> Self {
        Throttle { rate, paid_until: None }
    }

    /// Books `bytes` whose send began at `started`; returns how long to
    /// wait at `now` (the send done) before the next send may begin.
    pub fn book(&mut self, bytes: u64, started: Instant, now: Instant) -> Duration {
        let from = self.paid_until.map_or(started, |t| t.max(started));
        let paid = from + Duration::from_secs_f64(bytes as f64 / self.rate.bytes_per_second() as f64);
        self.paid_until = Some(paid);
        paid.saturating_duration_since(now)
    }

    /// Books `bytes` sent since `started` and sleeps until they are paid
    /// for. Returns the time slept. A stop request ends the wait at once: a
    /// shipper that is stopping sends what is in flight and exits.
    pub fn pay(&mut self, bytes: u64, started: Instant, stop: &AtomicBool) -> Duration {
        let now = Instant::now();
        let deadline = now + self.book(bytes, started, now);
        while !stop.load(Ordering::Acquire) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(100)));
        }
        now.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    #[test]
    fn a_run_of_instant_sends_takes_exactly_its_bytes_at_the_rate() {
        let mut t = Throttle::new(Rate(10 * MB));
        let t0 = Instant::now();
        let mut now = t0;
        for _ in 0..100 {
            now += t.book(MB, now, now);
        }
        let elapsed = now - t0;
        // 100 MB at 10 MB/s, the last send's share included.
        assert!(elapsed.abs_diff(Duration::from_secs(10)) < Duration::from_millis(1), "{elapsed:?}");
    }

    #[test]
    fn a_send_slower_than_the_limit_waits_nothing() {
        let mut t = Throttle::new(Rate(MB));
        let t0 = Instant::now();
        // 1 MB that took 2 s to send (a link slower than the limit).
        assert_eq!(t.book(MB, t0, t0 + Duration::from_secs(2)), Duration::ZERO);
        // The next starts at once and books from its own start.
        let t2 = t0 + Duration::from_secs(2);
        assert_eq!(t.book(MB, t2, t2), Duration::from_secs(1));
    }

    #[test]
    fn an_idle_link_banks_nothing() {
        let mut t = Throttle::new(Rate(MB));
        let t0 = Instant::now();
        assert_eq!(t.book(MB, t0, t0), Duration::from_secs(1));
        // An hour idle, then 3 MB at once: still 3 s, not free.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(t.book(3 * MB, later, later), Duration::from_secs(3));
    }

    #[test]
    fn a_stop_request_ends_the_wait() {
        let mut t = Throttle::new(Rate(64_000));
        let stop = AtomicBool::new(true);
        // Would be 10 s.
        assert!(t.pay(64_000 * 10, Instant::now(), &stop) < Duration::from_secs(1));
    }
}
