//! Coalesced apply: the records of one batch (between two checkpoints,
//! never across a point) reduced to what the replica must end up holding —
//! each byte's last version — and written in offset order, in large merged
//! writes. Reflink filesystems are slow at small random writes; a batch of
//! overlapping 4 KiB writes becomes a few big ones. The result equals
//! applying the records one by one, in order (tested against exactly that).
//!
//! The batch copies no data: it keeps the decoded segments and points into
//! them, and a merged write hands the kernel the pieces (`pwritev`). Each
//! copy of a gigabyte of sequential writes, and the fresh memory a copy
//! needs, cost the applier about as much as the page-cache copy itself.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use tern_driver::image::Image;
use tern_driver::journal::{RecordHeader, RecordKind};

/// Decoded record data the batch refers to (a segment, in `tern apply`).
pub type Payload = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// What a byte range of a disk holds at the end of the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    /// Bytes of payload `payload` of the batch, from index `at`.
    Data { payload: usize, at: usize },
    /// Zeroes (written zeroes or a discard: the replica punches the range).
    Zero,
}

/// One disk's final contents for a batch: non-overlapping ranges keyed by
/// start offset, each `(end, content)`.
#[derive(Debug, Default)]
struct ExtentMap {
    ranges: BTreeMap<u64, (u64, Content)>,
}

impl ExtentMap {
    /// `[start, end)` now holds `content`: earlier ranges it covers are
    /// dropped, ones it overlaps partly are cut.
    fn set(&mut self, start: u64, end: u64, content: Content) {
        if start >= end {
            return;
        }
        // A range starting before `start` that reaches into it: keep its
        // head, and its tail if it also reaches past `end`.
        if let Some((&s, &(e, c))) = self.ranges.range(..start).next_back() {
            if e > start {
                self.ranges.insert(s, (start, c));
                if e > end {
                    self.ranges.insert(end, (e, shift(c, end - s)));
                }
            }
        }
        // Ranges starting inside [start, end): drop, keeping a tail past `end`.
        let inside: Vec<(u64, (u64, Content))> = self.ranges.range(start..end).map(|(&s, &v)| (s, v)).collect();
        for (s, (e, c)) in inside {
            self.ranges.remove(&s);
            if e > end {
                self.ranges.insert(end, (e, shift(c, end - s)));
            }
        }
        self.ranges.insert(start, (end, content));
    }
}

fn shift(c: Content, by: u64) -> Content {
    match c {
        Content::Data { payload, at } => Content::Data { payload, at: at + by as usize },
        Content::Zero => Content::Zero,
    }
}

/// Records of a batch, reduced per disk.
#[derive(Default)]
pub struct Batch {
    disks: BTreeMap<u16, ExtentMap>,
    /// The payloads the ranges point into, each once.
    payloads: Vec<Payload>,
    /// Record data added (what the batch's size is counted in).
    data_len: usize,
}

/// Largest single write the batch issues (merged adjacent data ranges).
const MAX_WRITE: usize = 8 << 20;

/// A merged write at least this long (a sequential stream) starts going to
/// the disk at once, while the applier reads on: on xfs a dense 2 GiB image
/// then applied at 116% of fio's speed instead of 77% (medians of 5
/// rounds). Shorter writes wait for the fsync every GiB, so the filesystem
/// allocates several batches' blocks together (on xfs, 1 GiB of random
/// 4 KiB writes in 43,000 extents instead of 156,000).
const LONG_RUN: usize = 1 << 20;

impl Batch {
    /// Bytes of record data held.
    pub fn data_len(&self) -> usize {
        self.data_len
    }

    /// Adds a record that changes a disk (others are ignored), its data
    /// being `span` of `payload`. The caller has checked the range against
    /// the disk's size.
    pub fn add(&mut self, h: &RecordHeader, payload: &Payload, span: Range<usize>) {
        let end = h.offset + h.length as u64;
        let content = match h.kind {
            RecordKind::Write | RecordKind::Resync => {
                if !self.payloads.last().is_some_and(|p| Arc::ptr_eq(p, payload)) {
                    self.payloads.push(Arc::clone(payload));
                }
                self.data_len += span.len();
                Content::Data { payload: self.payloads.len() - 1, at: span.start }
            }
            RecordKind::Zero | RecordKind::Trim => Content::Zero,
            RecordKind::Tag | RecordKind::Pad => return,
        };
        self.disks.entry(h.disk).or_default().set(h.offset, end, content);
    }

    /// Writes the batch onto the images (indexed by disk) in offset order,
    /// merging adjacent data into writes of up to 8 MiB, and empties it.
    /// Returns the number of write/zero calls made.
    pub fn apply(&mut self, images: &[Image]) -> tern_driver::Result<usize> {
        let mut calls = 0;
        // One merged write: its pieces, and where it starts and how long
        // it is (`pending`).
        let mut pieces: Vec<&[u8]> = Vec::new();
        for (&disk, map) in &self.disks {
            let image = images.get(disk as usize).ok_or_else(|| {
                tern_driver::Error::Invalid(format!("a record names disk {disk}, which is not there"))
            })?;
            let mut pending: Option<(u64, usize)> = None;
            let flush = |pieces: &mut Vec<&[u8]>, pending: &mut Option<(u64, usize)>, calls: &mut usize| {
                if let Some((at, len)) = pending.take() {
                    image.write_vectored_at(pieces, at)?;
                    if len >= LONG_RUN {
                        image.start_writeback(at, len as u64)?;
                    }
                    *calls += 1;
                    pieces.clear();
                }
                tern_driver::Result::Ok(())
            };
            for (&start, &(end, content)) in &map.ranges {
                match content {
                    Content::Data { payload, at } => {
                        let len = (end - start) as usize;
                        match pending.as_mut() {
                            Some((s, l)) if *s + *l as u64 == start && *l + len <= MAX_WRITE => *l += len,
                            _ => {
                                flush(&mut pieces, &mut pending, &mut calls)?;
                                pending = Some((start, len));
                            }
                        }
                        pieces.push(&(*self.payloads[payload]).as_ref()[at..at + len]);
                    }
                    Content::Zero => {
                        flush(&mut pieces, &mut pending, &mut calls)?;
                        image.zero(start, end - start, true, false)?;
                        calls += 1;
                    }
                }
            }
            flush(&mut pieces, &mut pending, &mut calls)?;
        }
        drop(pieces);
        *self = Batch::default();
        Ok(calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tern_driver::mirror::apply_record;

    const DISK: u64 = 256 * 1024;

    fn payload(data: Vec<u8>) -> Payload {
        Arc::new(data)
    }

    fn record(kind: u8, offset: u64, len: u32, seq: u64) -> RecordHeader {
        let kind = match kind {
            0 => RecordKind::Zero,
            1 => RecordKind::Trim,
            _ => RecordKind::Write,
        };
        let data_len = if kind == RecordKind::Write { len } else { 0 };
        RecordHeader { seq, offset, time_ns: 0, length: len, data_len, disk: 0, kind, flags: 0 }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn coalesced_apply_equals_in_order_apply(
            ops in proptest::collection::vec((0u8..6, 0u64..DISK / 512, 1u32..64, any::<u8>()), 1..60)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (a, b) = (dir.path().join("a"), dir.path().join("b"));
            let initial: Vec<u8> = (0..DISK).map(|i| (i * 7 % 251) as u8).collect();
            std::fs::write(&a, &initial).unwrap();
            std::fs::write(&b, &initial).unwrap();
            let (ia, ib) = (Image::open(&a).unwrap(), Image::open(&b).unwrap());
            let mut batch = Batch::default();
            // Records come in segments of up to five: one payload each,
            // which the batch points into.
            for (n, segment) in ops.chunks(5).enumerate() {
                let mut data = Vec::new();
                let mut records = Vec::new();
                for (i, &(kind, block, blocks, fill)) in segment.iter().enumerate() {
                    let offset = block * 512;
                    let len = ((blocks as u64 * 512).min(DISK - offset)) as u32;
                    let h = record(kind, offset, len, (n * 5 + i) as u64 + 1);
                    let span = data.len()..data.len() + h.data_len as usize;
                    // Bytes that differ along the record: a range cut or
                    // shifted wrongly shows.
                    data.extend((0..span.len()).map(|j| fill.wrapping_add((j / 7) as u8)));
                    apply_record(std::slice::from_ref(&ia), &h, &data[span.clone()]).unwrap();
                    records.push((h, span));
                }
                let p = payload(data);
                for (h, span) in records {
                    batch.add(&h, &p, span);
                }
            }
            batch.apply(std::slice::from_ref(&ib)).unwrap();
            prop_assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
        }
    }

    #[test]
    fn overlapping_small_writes_become_one_write() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        std::fs::write(&p, vec![0u8; DISK as usize]).unwrap();
        let image = Image::open(&p).unwrap();
        let mut batch = Batch::default();
        for i in 0..64u64 {
            // 4 KiB writes, each overlapping the previous by half.
            let h = record(2, i * 2048, 4096, i + 1);
            batch.add(&h, &payload(vec![i as u8; 4096]), 0..4096);
        }
        assert_eq!(batch.apply(std::slice::from_ref(&image)).unwrap(), 1);
    }
}
