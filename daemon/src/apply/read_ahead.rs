//! Segments read ahead of the applier, in order, on a thread of their own:
//! reading, verifying and decompressing the next segments overlaps writing
//! and fsyncing the batch before them. At most a budget of decoded bytes
//! waits, plus the segment the reader holds while it waits for room (so a
//! segment larger than the budget still passes).

use std::sync::{Arc, Condvar, Mutex};
use std::thread::Scope;

use crossbeam_channel::Receiver;
use tern_store::cache::{CacheDir, Listed, ReadError};
use tern_store::segment::Segment;

/// A segment as listed in the cache (first seq, last seq, location), and
/// what reading it gave.
pub type ReadSegment = (u64, u64, String, Result<Segment, ReadError>);

/// Decoded bytes waiting (and whether the applier has gone), and the
/// wake-up for the reader when either changes.
type Budget = Arc<(Mutex<Queued>, Condvar)>;

#[derive(Default)]
struct Queued {
    bytes: u64,
    closed: bool,
}

/// The segments of `todo`, in order, read on a scoped thread. Dropping the
/// iterator stops the reader (after the segment it is reading).
pub fn spawn<'scope>(
    scope: &'scope Scope<'scope, '_>,
    cache: CacheDir,
    todo: Vec<Listed>,
    vm_id: [u8; 16],
    budget: u64,
) -> Taken {
    let (tx, rx) = crossbeam_channel::unbounded::<(ReadSegment, u64)>();
    let waiting: Budget = Arc::new((Mutex::new(Queued::default()), Condvar::new()));
    let reader_waiting = Arc::clone(&waiting);
    scope.spawn(move || {
        for Listed { first_seq: first, last_seq: last, location: path, .. } in todo {
            let segment = cache.read_segment(first, last, Some(vm_id));
            let size = segment.as_ref().map_or(0, |s| s.header.payload_len);
            let (lock, freed) = &*reader_waiting;
            let mut queued = lock.lock().unwrap_or_else(|p| p.into_inner());
            while !queued.closed && queued.bytes > 0 && queued.bytes + size > budget {
                queued = freed.wait(queued).unwrap_or_else(|p| p.into_inner());
            }
            if queued.closed {
                return;
            }
            queued.bytes += size;
            drop(queued);
            if tx.send(((first, last, path, segment), size)).is_err() {
                return; // the applier stopped
            }
        }
    });
    Taken { rx, waiting, held: 0 }
}

/// The applier's end: each segment's bytes count against the budget until
/// the next one is taken (its records are in the batch by then).
pub struct Taken {
    rx: Receiver<(ReadSegment, u64)>,
    waiting: Budget,
    held: u64,
}

impl Taken {
    fn release(&mut self) {
        let (lock, freed) = &*self.waiting;
        lock.lock().unwrap_or_else(|p| p.into_inner()).bytes -= std::mem::take(&mut self.held);
        freed.notify_one();
    }
}

impl Iterator for Taken {
    type Item = ReadSegment;

    fn next(&mut self) -> Option<ReadSegment> {
        self.release();
        let (segment, size) = self.rx.recv().ok()?;
        self.held = size;
        Some(segment)
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        // A reader waiting for room, or about to, stops.
        let (lock, freed) = &*self.waiting;
        lock.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_driver::journal::{RecordHeader, RecordKind};
    use tern_store::segment::{Compression, Encoder, SegmentBuilder};

    const VM: [u8; 16] = [7; 16];

    /// Segment `i` (seqs i+1..=i+1): one 64 KiB write of byte `i`.
    fn write_segments(cache: &CacheDir, n: u64) -> Vec<Listed> {
        for i in 0..n {
            let seq = i + 1;
            let data = vec![i as u8; 65536];
            let h = RecordHeader {
                seq,
                offset: 0,
                time_ns: seq,
                length: 65536,
                data_len: 65536,
                disk: 0,
                kind: RecordKind::Write,
                flags: 0,
            };
            let mut b = SegmentBuilder::new(VM, 1, seq);
            b.push(&h, &data).expect("push");
            let (header, bytes) = Encoder::new(Compression::None).expect("encoder").encode(&b).expect("encode");
            cache.write_segment(&header, &bytes, &mut |_| Ok(())).expect("write segment");
        }
        cache.list_segments().expect("list")
    }

    #[test]
    fn segments_come_in_order_with_their_errors_and_at_most_the_budget_ahead() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = CacheDir::new(&tern_store::object::Store::dir(dir.path()), "vm1");
        let todo = write_segments(&cache, 6);
        std::fs::write(&todo[3].location, b"not a segment").expect("damage one");
        std::thread::scope(|scope| {
            // A budget below one segment: one segment is read ahead of the
            // one being applied, never two.
            let mut segments = spawn(scope, cache.clone(), todo.clone(), VM, 1);
            for (i, listed) in todo.iter().enumerate() {
                let (first, last, path) = (&listed.first_seq, &listed.last_seq, &listed.location);
                let (f, l, p, segment) = segments.next().expect("every segment comes");
                assert_eq!((f, l, &p), (*first, *last, path));
                match segment {
                    Ok(s) => {
                        assert_ne!(i, 3, "the damaged segment is refused");
                        let (h, data) = s.records().next().expect("a record");
                        assert_eq!((h.seq, data[0]), (*first, i as u8));
                    }
                    Err(e) => assert!(i == 3 && e.is_damaged() && e.to_string().contains(&todo[3].location), "{e}"),
                }
                std::thread::sleep(std::time::Duration::from_millis(30));
                // (A damaged segment holds no bytes: the next may come
                // while it is held; the applier stops at it anyway.)
                if i != 3 {
                    assert!(segments.rx.is_empty(), "segment {} read ahead past the budget", i + 2);
                }
            }
            assert!(segments.next().is_none());
        });
    }

    #[test]
    fn dropping_the_segments_stops_the_reader() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = CacheDir::new(&tern_store::object::Store::dir(dir.path()), "vm1");
        let todo = write_segments(&cache, 20);
        // The scope returns only once the reader has stopped.
        std::thread::scope(|scope| {
            let mut segments = spawn(scope, cache.clone(), todo, VM, 1);
            assert!(segments.next().is_some());
        });
    }
}
