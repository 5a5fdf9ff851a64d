//! The workload: client threads, each with its own NBD connection to one
//! disk, sending seeded writes (some FUA), write-zeroes, trims and flushes
//! with overlapping ranges across connections, and logging each in the
//! [`History`]. The trial pauses them (quiesce: nothing in flight) to tag
//! or check, and stops them at the end.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::history::{History, Kind, Outcome};
use crate::nbd::{self, Client};
use crate::sector::{self, SECTOR};

/// How long a request may go unanswered by a server that is not stopped
/// on purpose before it counts as a hang.
pub const PATIENCE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    pub socket: PathBuf,
    pub disks: Vec<String>,
    pub disk_size: u64,
    pub connections_per_disk: usize,
    /// Out of 100: write, FUA write, zero, trim; the rest are flushes.
    pub mix: [u32; 4],
    /// Largest request, in 4 KiB blocks.
    pub max_blocks: u64,
    /// Requests aim at the first `hot` bytes this share of the time (out
    /// of 100), so connections overlap.
    pub hot_share: u32,
    pub hot: u64,
    /// Think time between requests, up to this.
    pub think: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Run,
    Pause,
    Stop,
}

struct Shared {
    mode: Mutex<(Mode, usize)>, // the mode, and how many clients are parked
    changed: Condvar,
    next_id: AtomicU64,
    /// Requests that went unanswered for `PATIENCE` (a hang, unless the
    /// trial stalled the server on purpose).
    pub timeouts: Mutex<Vec<String>>,
}

pub struct Workload {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    clients: usize,
}

impl Workload {
    /// Starts the clients, paused.
    pub fn start(spec: &WorkloadSpec, seed: u64, history: Arc<History>) -> Workload {
        let shared = Arc::new(Shared {
            mode: Mutex::new((Mode::Pause, 0)),
            changed: Condvar::new(),
            next_id: AtomicU64::new(1),
            timeouts: Mutex::new(Vec::new()),
        });
        let clients = spec.disks.len() * spec.connections_per_disk;
        let threads = (0..clients)
            .map(|i| {
                let (spec, shared, history) = (spec.clone(), Arc::clone(&shared), Arc::clone(&history));
                std::thread::spawn(move || {
                    client(i, &spec, seed.wrapping_mul(31).wrapping_add(i as u64), &shared, &history)
                })
            })
            .collect();
        let w = Workload { shared, threads, clients };
        w.wait_parked();
        w
    }

    fn set(&self, mode: Mode) {
        self.shared.mode.lock().unwrap_or_else(|p| p.into_inner()).0 = mode;
        self.shared.changed.notify_all();
    }

    fn wait_parked(&self) {
        let mut m = self.shared.mode.lock().unwrap_or_else(|p| p.into_inner());
        while m.1 < self.clients {
            m = self.shared.changed.wait(m).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn run(&self) {
        self.set(Mode::Run);
    }

    /// Parks every client once its request in flight is answered (or
    /// lost): afterwards nothing is in flight.
    pub fn pause(&self) {
        self.set(Mode::Pause);
        self.wait_parked();
    }

    pub fn stop(mut self) -> Vec<String> {
        self.set(Mode::Stop);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        std::mem::take(&mut *self.shared.timeouts.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn next_id(&self) -> u64 {
        self.shared.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

fn client(index: usize, spec: &WorkloadSpec, seed: u64, shared: &Shared, history: &History) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let disk = (index % spec.disks.len()) as u16;
    let mut conn: Option<Client> = None;
    loop {
        {
            let mut m = shared.mode.lock().unwrap_or_else(|p| p.into_inner());
            if m.0 != Mode::Run {
                // Parked: a connection kept across a pause may be to a
                // server killed meanwhile; reconnect after.
                m.1 += 1;
                shared.changed.notify_all();
                while m.0 == Mode::Pause {
                    m = shared.changed.wait(m).unwrap_or_else(|p| p.into_inner());
                }
                m.1 -= 1;
                if m.0 == Mode::Stop {
                    return;
                }
                conn = None;
            }
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Client::connect(&spec.socket, &spec.disks[disk as usize], PATIENCE) {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            },
        };
        let roll = rng.gen_range(0..100);
        let kind = if roll < spec.mix[0] {
            Kind::Write { fua: false }
        } else if roll < spec.mix[0] + spec.mix[1] {
            Kind::Write { fua: true }
        } else if roll < spec.mix[0] + spec.mix[1] + spec.mix[2] {
            Kind::Zero { fua: rng.gen_bool(0.2) }
        } else if roll < spec.mix.iter().sum() {
            Kind::Trim
        } else {
            Kind::Flush
        };
        let blocks = rng.gen_range(1..=spec.max_blocks);
        let span = if rng.gen_range(0..100) < spec.hot_share { spec.hot } else { spec.disk_size };
        let last_block = (span / 4096).saturating_sub(blocks).max(1);
        let offset = rng.gen_range(0..last_block) * 4096;
        let len = blocks * 4096;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (cmd, flags, payload) = match kind {
            Kind::Write { fua } => {
                let mut data = vec![0u8; len as usize];
                for (i, s) in data.chunks_mut(SECTOR as usize).enumerate() {
                    sector::encode(id, disk, offset / SECTOR + i as u64, s);
                }
                (nbd::CMD_WRITE, if fua { nbd::FLAG_FUA } else { 0 }, data)
            }
            Kind::Zero { fua } => (
                nbd::CMD_WRITE_ZEROES,
                if fua { nbd::FLAG_FUA } else { 0 } | (rng.gen_range(0..2) * nbd::FLAG_NO_HOLE),
                vec![],
            ),
            Kind::Trim => (nbd::CMD_TRIM, 0, vec![]),
            Kind::Flush => (nbd::CMD_FLUSH, 0, vec![]),
        };
        let (first, sectors) = if kind.changes_disk() { (offset / SECTOR, len / SECTOR) } else { (0, 0) };
        let (offset, len) = if kind.changes_disk() { (offset, len) } else { (0, 0) };
        let at = history.sent(id, disk, kind, first, sectors);
        let started = Instant::now();
        match c.request(cmd, flags, offset, len as u32, &payload) {
            Ok((0, _)) => history.done(at, Outcome::Ok),
            Ok((e, _)) => history.done(at, Outcome::Error(e)),
            Err(e) => {
                history.done(at, Outcome::Lost);
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
                    shared.timeouts.lock().unwrap_or_else(|p| p.into_inner()).push(format!(
                        "request {id} ({kind:?} on disk {disk} at {offset}+{len}) unanswered after {:.1?}",
                        started.elapsed()
                    ));
                }
                conn = None;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if !spec.think.is_zero() {
            std::thread::sleep(spec.think.mul_f64(rng.gen::<f64>()));
        }
    }
}
