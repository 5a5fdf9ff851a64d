//! The client's history: every request the workload sent, when it was
//! sent and when (and how) it was answered. It is the oracle: recovery
//! points, the source after a crash and the final replica are all judged
//! against what the client wrote and saw acknowledged, never against a
//! replay of tern's own output.

use std::sync::Mutex;
use std::time::Instant;

/// What a request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Data: each sector gets [`crate::sector::encode`] of the write's id.
    Write {
        fua: bool,
    },
    /// Reads zeroes afterwards (WRITE_ZEROES).
    Zero {
        fua: bool,
    },
    /// Reads zeroes afterwards (tern punches the range at the source).
    Trim,
    Flush,
}

impl Kind {
    pub fn changes_disk(self) -> bool {
        !matches!(self, Kind::Flush)
    }

    /// Leaves zeroes (as opposed to write data).
    pub fn zeroes(self) -> bool {
        matches!(self, Kind::Zero { .. } | Kind::Trim)
    }

    pub fn fua(self) -> bool {
        matches!(self, Kind::Write { fua: true } | Kind::Zero { fua: true })
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// An error reply: the change may or may not be on the disk.
    Error(u32),
    /// No reply (the server died or the connection broke): the same.
    Lost,
}

/// One request. Times are nanoseconds since the trial started.
#[derive(Debug, Clone)]
pub struct Op {
    /// Unique in the trial; a write's sectors carry it.
    pub id: u64,
    pub disk: u16,
    pub kind: Kind,
    pub first_sector: u64,
    pub sectors: u64,
    pub sent: u64,
    /// When the reply came, and what it said; `None` while in flight.
    pub done: Option<(u64, Outcome)>,
}

impl Op {
    /// The time the request was acknowledged successfully, if it was.
    pub fn acked(&self) -> Option<u64> {
        match self.done {
            Some((t, Outcome::Ok)) => Some(t),
            _ => None,
        }
    }

    pub fn covers(&self, sector: u64) -> bool {
        (self.first_sector..self.first_sector + self.sectors).contains(&sector)
    }
}

/// The history, appended to by the client threads.
pub struct History {
    epoch: Instant,
    ops: Mutex<Vec<Op>>,
}

impl History {
    pub fn new() -> Self {
        History { epoch: Instant::now(), ops: Mutex::new(Vec::new()) }
    }

    /// Now, on the history's clock.
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Records a request about to be sent; its index.
    pub fn sent(&self, id: u64, disk: u16, kind: Kind, first_sector: u64, sectors: u64) -> usize {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        // The send time is taken under the lock, so the log is in send order.
        ops.push(Op { id, disk, kind, first_sector, sectors, sent: self.now(), done: None });
        ops.len() - 1
    }

    /// Records the reply of request `index`.
    pub fn done(&self, index: usize, outcome: Outcome) {
        let now = self.now();
        self.ops.lock().unwrap_or_else(|p| p.into_inner())[index].done = Some((now, outcome));
    }

    /// Every request in flight is lost (the server is gone): called after
    /// the clients stopped.
    pub fn lose_in_flight(&self) {
        let now = self.now();
        for op in self.ops.lock().unwrap_or_else(|p| p.into_inner()).iter_mut() {
            if op.done.is_none() {
                op.done = Some((now, Outcome::Lost));
            }
        }
    }

    /// After a power cut: the acknowledged changes not in `durable` may be
    /// gone (nothing made them durable), so from now on they count as
    /// uncertain, like a request that was never answered.
    pub fn power_lost(&self, durable: &std::collections::BTreeSet<u64>) {
        for op in self.ops.lock().unwrap_or_else(|p| p.into_inner()).iter_mut() {
            if let Some((t, Outcome::Ok)) = op.done {
                if op.kind.changes_disk() && !durable.contains(&op.id) {
                    op.done = Some((t, Outcome::Lost));
                }
            }
        }
    }

    pub fn snapshot(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
