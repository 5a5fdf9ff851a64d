//! The judge: what a disk image may hold, given the client's history.
//!
//! Two questions, both answered per 512-byte sector from the
//! self-describing contents ([`crate::sector`]):
//!
//! - After a crash, may the source hold this? Every sector must hold a
//!   write that wrote there (or zeroes a zeroing or the initial state left),
//!   and never one a *durable* write to the same sector definitely came
//!   after (sent once the other was acknowledged). Which writes are durable
//!   depends on the crash: all acknowledged ones when only a process died
//!   (the page cache survived), only flushed and FUA ones after a power
//!   cut.
//! - Is this recovery point a state the source passed through? The writes
//!   it shows, and every write acknowledged before one of them was sent
//!   (the "cut" they imply), must all be there: no sector may show a value
//!   older than a write in the cut that definitely came after it. A point
//!   that mixes an old sector with a newer write is caught without knowing
//!   the point's sequence number.
//!
//! Both are sound (a violation is a real bug) but not complete: between
//! writes whose requests overlapped in time the source's order is not the
//! client's to know, and any of them may be last.

use std::collections::HashMap;

use crate::history::{Kind, Op};
use crate::sector::Held;

/// The history, indexed by sector.
pub struct Oracle<'a> {
    ops: &'a [Op],
    /// disk → sector → indices of the disk-changing ops that cover it.
    by_sector: Vec<Vec<Vec<u32>>>,
    by_id: HashMap<u64, usize>,
}

/// "Never" for an op that was not acknowledged: nothing is sent after it.
/// (The initial state counts as acknowledged at 0; requests are sent
/// after the history's clock starts, at 1 ns or later.)
const NEVER: u64 = u64::MAX;

fn acked(op: &Op) -> u64 {
    op.acked().unwrap_or(NEVER)
}

impl<'a> Oracle<'a> {
    pub fn new(ops: &'a [Op], disks: usize, sectors: u64) -> Self {
        let mut by_sector = vec![vec![Vec::new(); sectors as usize]; disks];
        let mut by_id = HashMap::new();
        for (i, op) in ops.iter().enumerate() {
            by_id.insert(op.id, i);
            if op.kind.changes_disk() {
                for s in op.first_sector..(op.first_sector + op.sectors).min(sectors) {
                    by_sector[op.disk as usize][s as usize].push(i as u32);
                }
            }
        }
        Oracle { ops, by_sector, by_id }
    }

    /// The op a sector's write id names, if it is a data write to that
    /// disk and sector.
    fn writer(&self, id: u64, disk: usize, sector: u64) -> Option<usize> {
        let &i = self.by_id.get(&id)?;
        let op = &self.ops[i];
        (matches!(op.kind, Kind::Write { .. }) && op.disk as usize == disk && op.covers(sector)).then_some(i)
    }

    /// Whether `held` at (disk, sector) survives every op in `after_set`
    /// (ops on that sector, filtered by `counts`): some candidate for what
    /// it holds is not definitely older than one of them.
    fn possible(&self, disk: usize, sector: u64, held: Held, counts: &dyn Fn(usize) -> bool) -> Result<(), String> {
        let here = &self.by_sector[disk][sector as usize];
        let superseded_by = |cand: Option<usize>| -> Option<usize> {
            let since = cand.map_or(0, |c| acked(&self.ops[c]));
            here.iter().map(|&x| x as usize).find(|&x| Some(x) != cand && counts(x) && self.ops[x].sent > since)
        };
        match held {
            Held::Garbage => Err("holds bytes no write of the workload put there (torn, misplaced or corrupt)".into()),
            Held::Write(id) => {
                let Some(w) = self.writer(id, disk, sector) else {
                    let what = self
                        .by_id
                        .get(&id)
                        .map_or("no request of the history".into(), |&i| format!("{:?}", self.ops[i]));
                    return Err(format!("holds the data of request {id}, which never wrote this sector ({what})"));
                };
                match superseded_by(Some(w)) {
                    None => Ok(()),
                    Some(x) => Err(format!(
                        "holds request {id} (sent {}, acknowledged {}), but request {} ({:?}, sent {}) came after it and must be there",
                        ms(self.ops[w].sent),
                        ms(acked(&self.ops[w])),
                        self.ops[x].id,
                        self.ops[x].kind,
                        ms(self.ops[x].sent)
                    )),
                }
            }
            Held::Zero => {
                // The initial state, or any zeroing of this sector.
                let zeroings = here.iter().map(|&x| x as usize).filter(|&x| self.ops[x].kind.zeroes());
                let mut first_blocker = None;
                for cand in std::iter::once(None).chain(zeroings.map(Some)) {
                    match superseded_by(cand) {
                        None => return Ok(()),
                        Some(x) => {
                            first_blocker.get_or_insert(x);
                        }
                    }
                }
                let x = first_blocker.expect("the initial state was a candidate");
                Err(format!(
                    "holds zeroes, but request {} ({:?}, sent {}) must be there",
                    self.ops[x].id,
                    self.ops[x].kind,
                    ms(self.ops[x].sent)
                ))
            }
        }
    }

    /// The source after a crash: `durable(op)` says which ops must have
    /// survived. Violations, at most `limit` described.
    pub fn check_after_crash(&self, images: &[Vec<Held>], durable: &dyn Fn(&Op) -> bool, limit: usize) -> Vec<String> {
        let durable: Vec<bool> = self.ops.iter().map(durable).collect();
        let counts = |x: usize| durable[x];
        self.check_all(images, &counts, limit)
    }

    /// A recovery point (or a replica): a state the source passed through.
    pub fn check_point(&self, images: &[Vec<Held>], limit: usize) -> Vec<String> {
        // The newest send among the writes the point shows: every op
        // acknowledged before it precedes a write in the point.
        let mut newest_sent = 0;
        let mut visible = vec![false; self.ops.len()];
        for (disk, held) in images.iter().enumerate() {
            for (s, h) in held.iter().enumerate() {
                if let Held::Write(id) = h {
                    if let Some(w) = self.writer(*id, disk, s as u64) {
                        visible[w] = true;
                        newest_sent = newest_sent.max(self.ops[w].sent);
                    }
                }
            }
        }
        // A visible write that was never acknowledged may be torn (a power
        // cut keeps some of its sectors): it counts where it shows, and
        // does not require its other sectors.
        let in_cut: Vec<bool> = self
            .ops
            .iter()
            .enumerate()
            .map(|(i, op)| op.acked().is_some_and(|a| visible[i] || a < newest_sent))
            .collect();
        let counts = |x: usize| in_cut[x];
        self.check_all(images, &counts, limit)
    }

    fn check_all(&self, images: &[Vec<Held>], counts: &dyn Fn(usize) -> bool, limit: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut total = 0;
        for (disk, held) in images.iter().enumerate() {
            for (s, &h) in held.iter().enumerate() {
                if let Err(why) = self.possible(disk, s as u64, h, counts) {
                    total += 1;
                    if out.len() < limit {
                        out.push(format!("disk {disk} sector {s}: {why}"));
                    }
                }
            }
        }
        if total > out.len() {
            out.push(format!("… {} more sectors like these", total - out.len()));
        }
        out
    }
}

fn ms(ns: u64) -> String {
    if ns == NEVER {
        "never".into()
    } else {
        format!("{:.3}ms", ns as f64 / 1e6)
    }
}

/// The ops a power cut must not lose: acknowledged FUA writes and zeroings,
/// and writes acknowledged before a flush of their disk was sent that was
/// acknowledged itself.
pub fn flushed(ops: &[Op]) -> Vec<bool> {
    // Per disk, the send times of acknowledged flushes, sorted.
    let mut flushes: HashMap<u16, Vec<u64>> = HashMap::new();
    for op in ops {
        if op.kind == Kind::Flush && op.acked().is_some() {
            flushes.entry(op.disk).or_default().push(op.sent);
        }
    }
    let newest: HashMap<u16, u64> = flushes.into_iter().map(|(d, v)| (d, v.into_iter().max().unwrap_or(0))).collect();
    ops.iter()
        .map(|op| match op.acked() {
            Some(a) if op.kind.changes_disk() => op.kind.fua() || newest.get(&op.disk).is_some_and(|&f| f > a),
            _ => false,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Outcome;

    fn op(id: u64, kind: Kind, first: u64, n: u64, sent: u64, done: Option<(u64, Outcome)>) -> Op {
        Op { id, disk: 0, kind, first_sector: first, sectors: n, sent, done }
    }

    const W: Kind = Kind::Write { fua: false };

    #[test]
    fn a_point_missing_a_write_acknowledged_before_a_visible_one_is_caught() {
        // Write 1 on sector 0, acknowledged at 10; write 2 on sector 1, sent
        // at 20: a point showing 2 must show 1.
        let ops = vec![op(1, W, 0, 1, 1, Some((10, Outcome::Ok))), op(2, W, 1, 1, 20, Some((30, Outcome::Ok)))];
        let o = Oracle::new(&ops, 1, 2);
        assert!(o.check_point(&[vec![Held::Write(1), Held::Write(2)]], 5).is_empty());
        assert!(o.check_point(&[vec![Held::Write(1), Held::Zero]], 5).is_empty(), "a prefix");
        assert!(o.check_point(&[vec![Held::Zero, Held::Zero]], 5).is_empty(), "the empty prefix");
        let v = o.check_point(&[vec![Held::Zero, Held::Write(2)]], 5);
        assert_eq!(v.len(), 1, "{v:?}");
    }

    #[test]
    fn concurrent_overlapping_writes_may_land_in_either_order() {
        let ops = vec![op(1, W, 0, 1, 1, Some((10, Outcome::Ok))), op(2, W, 0, 1, 5, Some((15, Outcome::Ok)))];
        let o = Oracle::new(&ops, 1, 1);
        let all = |_: &Op| true;
        assert!(o.check_after_crash(&[vec![Held::Write(1)]], &all, 5).is_empty());
        assert!(o.check_after_crash(&[vec![Held::Write(2)]], &all, 5).is_empty());
        assert_eq!(o.check_after_crash(&[vec![Held::Zero]], &all, 5).len(), 1, "both were acknowledged");
    }

    #[test]
    fn after_a_power_cut_only_flushed_writes_must_survive() {
        let ops = vec![
            op(1, W, 0, 1, 1, Some((10, Outcome::Ok))),
            op(2, Kind::Flush, 0, 0, 20, Some((25, Outcome::Ok))),
            op(3, W, 0, 1, 30, Some((40, Outcome::Ok))),
            op(4, W, 1, 1, 50, Some((60, Outcome::Ok))),
        ];
        let o = Oracle::new(&ops, 1, 2);
        let flushed = flushed(&ops);
        assert_eq!(flushed, vec![true, false, false, false]);
        let durable = |op: &Op| flushed[ops.iter().position(|o| o.id == op.id).unwrap()];
        assert!(o.check_after_crash(&[vec![Held::Write(1), Held::Zero]], &durable, 5).is_empty());
        assert!(o.check_after_crash(&[vec![Held::Write(3), Held::Zero]], &durable, 5).is_empty());
        assert_eq!(o.check_after_crash(&[vec![Held::Zero, Held::Zero]], &durable, 5).len(), 1, "write 1 was flushed");
    }

    #[test]
    fn an_unacknowledged_write_may_show_torn_but_an_acknowledged_one_not() {
        let ops = vec![op(1, W, 0, 2, 1, Some((10, Outcome::Lost))), op(2, W, 0, 2, 20, Some((30, Outcome::Ok)))];
        let o = Oracle::new(&ops, 1, 2);
        assert!(o.check_point(&[vec![Held::Zero, Held::Write(1)]], 5).is_empty(), "write 1 torn by a power cut");
        assert_eq!(o.check_point(&[vec![Held::Zero, Held::Write(2)]], 5).len(), 1, "write 2 was acknowledged whole");
    }

    #[test]
    fn garbage_and_misplaced_data_are_caught() {
        let ops = vec![op(1, W, 0, 1, 1, Some((10, Outcome::Ok)))];
        let o = Oracle::new(&ops, 1, 2);
        assert_eq!(o.check_point(&[vec![Held::Write(1), Held::Garbage]], 5).len(), 1);
        assert_eq!(o.check_point(&[vec![Held::Write(1), Held::Write(1)]], 5).len(), 1, "write 1 never wrote sector 1");
    }

    #[test]
    fn a_lost_write_may_or_may_not_be_there() {
        let ops = vec![op(1, W, 0, 1, 1, Some((10, Outcome::Ok))), op(2, W, 0, 1, 20, Some((25, Outcome::Lost)))];
        let o = Oracle::new(&ops, 1, 1);
        let all = |op: &Op| op.acked().is_some();
        assert!(o.check_after_crash(&[vec![Held::Write(1)]], &all, 5).is_empty());
        assert!(o.check_after_crash(&[vec![Held::Write(2)]], &all, 5).is_empty());
    }
}
