//! Compression that follows the bottleneck (policy `compression-min` and
//! `compression-max`). A fixed zstd level loses either way: on a host whose
//! CPUs are busy the compression workers fall behind the writes, and on a
//! slow link a higher level would send less. Once a second the shipper
//! looks at what held it back — the workers compressing, or the writer
//! sending (and waiting for `--max-rate`) — and at the backlog, and moves
//! the level one step: down while the CPU is the bottleneck, up while the
//! link is. A contended CPU makes every thread look busy, the writer's
//! too, so the workers' CPU time is compared with their wall time: a
//! worker that ran for much less than it took was starved of the CPU, and
//! then the level never goes up. Incompressible payloads are stored as is
//! whatever the level (see `Encoder::encode`).

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What the shipper's threads report, read once a second.
#[derive(Debug)]
pub struct Load {
    epoch: Instant,
    /// Nanoseconds the compression workers spent compressing, in all: wall
    /// time, and the time their threads actually ran.
    compress_ns: AtomicU64,
    compress_cpu_ns: AtomicU64,
    /// Nanoseconds the writer spent writing segments and waiting for the
    /// bandwidth limit, in all, not counting the send under way...
    send_ns: AtomicU64,
    /// ...which began this many nanoseconds after `epoch` (0: none). A
    /// send held back by a low limit lasts seconds: it counts while it
    /// lasts, not only once it is done.
    sending_since_ns: AtomicU64,
}

impl Default for Load {
    fn default() -> Self {
        Load {
            epoch: Instant::now(),
            compress_ns: AtomicU64::new(0),
            compress_cpu_ns: AtomicU64::new(0),
            send_ns: AtomicU64::new(0),
            sending_since_ns: AtomicU64::new(0),
        }
    }
}

impl Load {
    /// A worker compressed for `wall`, of which its thread ran `cpu`.
    pub fn compressed(&self, wall: Duration, cpu: Duration) {
        self.compress_ns.fetch_add(wall.as_nanos() as u64, Ordering::AcqRel);
        self.compress_cpu_ns.fetch_add(cpu.min(wall).as_nanos() as u64, Ordering::AcqRel);
    }

    /// The writer begins a segment (its write, then the limit's wait).
    pub fn send_begins(&self) {
        let since = (self.epoch.elapsed().as_nanos() as u64).max(1);
        self.sending_since_ns.store(since, Ordering::Release);
    }

    /// The writer is done with a segment.
    pub fn send_ends(&self) {
        let since = self.sending_since_ns.swap(0, Ordering::AcqRel);
        if since > 0 {
            let now = self.epoch.elapsed().as_nanos() as u64;
            self.send_ns.fetch_add(now.saturating_sub(since), Ordering::AcqRel);
        }
    }

    /// Nanoseconds spent compressing and sending so far, the send under
    /// way included.
    fn totals(&self) -> (u64, u64, u64) {
        let since = self.sending_since_ns.load(Ordering::Acquire);
        let now = self.epoch.elapsed().as_nanos() as u64;
        let under_way = if since > 0 { now.saturating_sub(since) } else { 0 };
        (
            self.compress_ns.load(Ordering::Acquire),
            self.compress_cpu_ns.load(Ordering::Acquire),
            self.send_ns.load(Ordering::Acquire) + under_way,
        )
    }
}

/// The CPU time the calling thread has run (for a worker's share of it).
pub fn thread_cpu_time() -> Duration {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
}

/// One second of the shipper, as the controller sees it.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Share of the workers' time spent compressing (0 to 1).
    pub cpu: f64,
    /// Share of that compressing time the workers' threads did not run:
    /// the CPU was busy with something else (0 to 1).
    pub starved: f64,
    /// Share of the writer's time spent sending or throttled (0 to 1).
    pub link: f64,
    /// Bytes waiting to be shipped now, and a second ago.
    pub backlog: u64,
    pub backlog_before: u64,
}

/// The level after `level` for `sample`, within `min..=max` (zstd's level
/// 0 means its default, 3: it is stepped over).
pub fn next_level(level: i32, min: i32, max: i32, segment_size: u64, s: &Sample) -> i32 {
    // Behind: more than two segments wait and the pile is not shrinking.
    let behind = s.backlog > 2 * segment_size && s.backlog >= s.backlog_before;
    // The CPU is contended: the workers ran for well under the time they
    // took. Every thread then looks busy, the writer's too.
    let starved = s.starved > 0.3 && s.cpu > 0.2;
    let step = if behind {
        if starved || (s.cpu > s.link && s.cpu > 0.5) {
            -1
        } else if s.link > s.cpu && s.link > 0.5 {
            1
        } else {
            // Neither: the reader or the resync holds it back.
            0
        }
    } else if s.cpu > 0.9 || starved && s.cpu > 0.5 {
        // Keeping up, but only just: the CPU is about to hold it back.
        -1
    } else if s.link > 0.8 && s.cpu < 0.6 && !starved && s.backlog > segment_size {
        // Keeping up, but segments queue for a busy link while the CPU has
        // time to spare: send less. (With nothing queued a higher level
        // would only add compression time to the lag.)
        1
    } else {
        0
    };
    let mut next = (level + step).clamp(min, max);
    if next == 0 {
        next = if step < 0 { -1 } else { 1 }.clamp(min, max);
    }
    next
}

/// The counters and the backlog at one tick.
#[derive(Debug, Clone, Copy)]
struct Reading {
    at: Instant,
    compress: u64,
    compress_cpu: u64,
    send: u64,
    backlog: u64,
}

/// The controller: the level in use (the workers read it for each batch)
/// and what it last saw.
#[derive(Debug)]
pub struct Adaptive {
    pub level: AtomicI32,
    min: i32,
    max: i32,
    workers: usize,
    segment_size: u64,
    /// When the last tick was, and the counters and backlog then (only
    /// the status thread ticks).
    last: Mutex<Option<Reading>>,
}

impl Adaptive {
    pub fn new(start: i32, min: i32, max: i32, workers: usize, segment_size: u64) -> Self {
        Adaptive {
            level: AtomicI32::new(start),
            min,
            max,
            workers: workers.max(1),
            segment_size,
            last: Mutex::new(None),
        }
    }

    /// Called about once a second with the backlog now: moves the level
    /// when the last second says so. Returns the level in use.
    pub fn tick(&self, load: &Load, backlog: u64) -> i32 {
        let now = Instant::now();
        let (c, c_cpu, w) = load.totals();
        let level = self.level.load(Ordering::Acquire);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Reading { at, compress: c0, compress_cpu: c_cpu0, send: w0, backlog: backlog_before }) = *last {
            let secs = now.duration_since(at).as_secs_f64();
            if secs < 0.5 {
                return level;
            }
            let compressing = (c - c0) as f64;
            let sample = Sample {
                cpu: (compressing / 1e9 / secs / self.workers as f64).min(1.0),
                starved: if compressing > 0.0 { 1.0 - (c_cpu - c_cpu0) as f64 / compressing } else { 0.0 },
                link: ((w - w0) as f64 / 1e9 / secs).min(1.0),
                backlog,
                backlog_before,
            };
            let next = next_level(level, self.min, self.max, self.segment_size, &sample);
            if next != level {
                log::debug!("compression level {level} -> {next} ({sample:?})");
                self.level.store(next, Ordering::Release);
            }
        }
        *last = Some(Reading { at: now, compress: c, compress_cpu: c_cpu, send: w, backlog });
        self.level.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 8 << 20;

    fn sample(cpu: f64, link: f64, backlog: u64, before: u64) -> Sample {
        Sample { cpu, starved: 0.0, link, backlog, backlog_before: before }
    }

    #[test]
    fn behind_on_a_busy_cpu_the_level_goes_down_towards_the_fast_levels() {
        let s = sample(1.0, 0.3, 100 * SEG, 90 * SEG);
        assert_eq!(next_level(3, -5, 9, SEG, &s), 2);
        assert_eq!(next_level(1, -5, 9, SEG, &s), -1, "level 0 is zstd's default (3): stepped over");
        assert_eq!(next_level(-5, -5, 9, SEG, &s), -5, "never below the policy's minimum");
    }

    #[test]
    fn behind_on_a_busy_link_the_level_goes_up_to_send_less() {
        let s = sample(0.4, 1.0, 100 * SEG, 100 * SEG);
        assert_eq!(next_level(1, -5, 9, SEG, &s), 2);
        assert_eq!(next_level(-1, -5, 9, SEG, &s), 1);
        assert_eq!(next_level(9, -5, 9, SEG, &s), 9, "never above the policy's maximum");
    }

    #[test]
    fn a_starved_cpu_makes_the_writer_look_busy_too_and_the_level_goes_down() {
        // Behind, the writer "busier" than the workers, but the workers ran
        // for only half the time they took: the CPU is the bottleneck.
        let s = Sample { starved: 0.5, ..sample(0.6, 0.9, 100 * SEG, 100 * SEG) };
        assert_eq!(next_level(3, -5, 9, SEG, &s), 2);
        // Keeping up with segments queued for a busy writer: no step up
        // while the CPU is contended.
        let s = Sample { starved: 0.5, ..sample(0.4, 0.9, 2 * SEG, 3 * SEG) };
        assert_eq!(next_level(3, -5, 9, SEG, &s), 3);
    }

    #[test]
    fn behind_with_neither_side_busy_it_holds() {
        let s = sample(0.1, 0.0, 100 * SEG, 100 * SEG);
        assert_eq!(next_level(3, -5, 9, SEG, &s), 3);
    }

    #[test]
    fn keeping_up_it_holds_unless_one_side_is_nearly_saturated() {
        assert_eq!(next_level(3, -5, 9, SEG, &sample(0.5, 0.5, SEG, SEG)), 3);
        // A shrinking backlog is not "behind", even a large one.
        assert_eq!(next_level(3, -5, 9, SEG, &sample(0.5, 0.5, 50 * SEG, 60 * SEG)), 3);
        assert_eq!(next_level(3, -5, 9, SEG, &sample(0.95, 0.2, 0, 0)), 2);
        assert_eq!(next_level(3, -5, 9, SEG, &sample(0.3, 0.9, 2 * SEG, 3 * SEG)), 4);
        // A busy link with nothing queued: no reason to spend CPU.
        assert_eq!(next_level(3, -5, 9, SEG, &sample(0.3, 0.9, 0, 0)), 3);
    }

    #[test]
    fn the_controller_moves_once_a_second_from_what_the_threads_reported() {
        let load = Load::default();
        let a = Adaptive::new(1, -5, 9, 2, SEG);
        assert_eq!(a.tick(&load, 2 * SEG), 1, "the first tick only takes its bearings");
        // The writer has been sending (or waiting) the whole time, the
        // workers idled.
        load.send_begins();
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(a.tick(&load, 2 * SEG), 2);
        assert_eq!(a.tick(&load, 2 * SEG), 2, "not again within half a second");
    }
}
