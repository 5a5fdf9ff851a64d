//! A regular file's bytes, kept sparse, and the operations that change them.
//!
//! tern declares its disks and replicas tens of MiB large with `set_len` and
//! writes a few MiB, so content is a map of 4096-byte blocks where an absent
//! block is a hole that reads zeroes. A block can also be allocated but never
//! written (`Block::Zero`, what `fallocate` leaves): it reads zeroes, costs no
//! memory, and counts as data for `SEEK_DATA` and for the space in use. Every
//! change goes through [`FileOp`], the same value the durability model keeps
//! in a file's pending list, so "replay these ops over the durable state" is the
//! only way any state is ever built.

use std::collections::BTreeMap;

/// Allocation unit: what `SEEK_DATA`/`SEEK_HOLE` and `st_blocks` see.
pub const BLOCK: u64 = 4096;
/// What a disk writes atomically: a torn write keeps or loses whole sectors.
pub const SECTOR: u64 = 512;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Block {
    /// Allocated, never written: reads zeroes.
    Zero,
    Data(Box<[u8]>),
}

/// One change to a file's content or size, as the model logs it until fsync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileOp {
    Write {
        off: u64,
        data: Vec<u8>,
    },
    /// truncate or extend.
    SetLen {
        len: u64,
    },
    /// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`: reads zeroes, deallocated.
    Punch {
        off: u64,
        len: u64,
    },
    /// `FALLOC_FL_ZERO_RANGE`: reads zeroes, allocated.
    ZeroRange {
        off: u64,
        len: u64,
        keep_size: bool,
    },
    /// `fallocate` mode 0 or `KEEP_SIZE`.
    Allocate {
        off: u64,
        len: u64,
        keep_size: bool,
    },
}

impl FileOp {
    /// The sector-aligned pieces a power cut may keep or lose independently:
    /// `Some` only for a write that spans more than one sector.
    pub fn sector_pieces(&self) -> Option<Vec<(u64, &[u8])>> {
        let FileOp::Write { off, data } = self else { return None };
        let mut pieces = Vec::new();
        let mut pos = 0usize;
        while pos < data.len() {
            let abs = off + pos as u64;
            let room = (SECTOR - abs % SECTOR) as usize;
            let take = room.min(data.len() - pos);
            pieces.push((abs, &data[pos..pos + take]));
            pos += take;
        }
        (pieces.len() > 1).then_some(pieces)
    }
}

/// A file's size and sparse blocks. Bytes past `size` are always zero.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Content {
    size: u64,
    blocks: BTreeMap<u64, Block>,
}

/// The blocks `[off, off + len)` touches, as indexes.
fn block_span(off: u64, len: u64) -> std::ops::Range<u64> {
    if len == 0 {
        return 0..0;
    }
    off / BLOCK..(off.saturating_add(len) - 1) / BLOCK + 1
}

impl Content {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Blocks that hold data or are allocated (`st_blocks`, capacity).
    pub fn allocated_blocks(&self) -> u64 {
        self.blocks.len() as u64
    }

    /// How many blocks `op` would allocate that are not allocated now.
    pub fn blocks_needed(&self, op: &FileOp) -> u64 {
        let span = match op {
            FileOp::Write { off, data } => block_span(*off, data.len() as u64),
            FileOp::Allocate { off, len, .. } | FileOp::ZeroRange { off, len, .. } => block_span(*off, *len),
            FileOp::SetLen { .. } | FileOp::Punch { .. } => 0..0,
        };
        let present = self.blocks.range(span.clone()).count() as u64;
        (span.end - span.start) - present
    }

    /// Reads up to `len` bytes at `off`, stopping at the end of the file.
    pub fn read(&self, off: u64, len: u64) -> Vec<u8> {
        let end = off.saturating_add(len).min(self.size);
        if off >= end {
            return Vec::new();
        }
        let mut out = vec![0u8; (end - off) as usize];
        for (&idx, block) in self.blocks.range(block_span(off, end - off)) {
            let Block::Data(bytes) = block else { continue };
            let bstart = idx * BLOCK;
            let from = off.max(bstart);
            let to = end.min(bstart + BLOCK);
            out[(from - off) as usize..(to - off) as usize]
                .copy_from_slice(&bytes[(from - bstart) as usize..(to - bstart) as usize]);
        }
        out
    }

    pub fn apply(&mut self, op: &FileOp) {
        match op {
            FileOp::Write { off, data } => self.write(*off, data),
            FileOp::SetLen { len } => self.set_len(*len),
            FileOp::Punch { off, len } => self.zero(*off, *len, false),
            FileOp::ZeroRange { off, len, keep_size } => {
                self.zero(*off, *len, true);
                self.grow(*off, *len, *keep_size);
            }
            FileOp::Allocate { off, len, keep_size } => {
                for idx in block_span(*off, *len) {
                    self.blocks.entry(idx).or_insert(Block::Zero);
                }
                self.grow(*off, *len, *keep_size);
            }
        }
    }

    /// Grows the size to `end` if it is smaller (a torn write's size update).
    pub fn extend_to(&mut self, end: u64) {
        self.size = self.size.max(end);
    }

    fn grow(&mut self, off: u64, len: u64, keep_size: bool) {
        if !keep_size && len > 0 {
            self.extend_to(off.saturating_add(len));
        }
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = off + data.len() as u64;
        for idx in block_span(off, data.len() as u64) {
            let bstart = idx * BLOCK;
            let from = off.max(bstart);
            let to = end.min(bstart + BLOCK);
            let block = self.blocks.entry(idx).or_insert(Block::Zero);
            if *block == Block::Zero {
                *block = Block::Data(vec![0u8; BLOCK as usize].into_boxed_slice());
            }
            if let Block::Data(bytes) = block {
                bytes[(from - bstart) as usize..(to - bstart) as usize]
                    .copy_from_slice(&data[(from - off) as usize..(to - off) as usize]);
            }
        }
        self.extend_to(end);
    }

    fn set_len(&mut self, len: u64) {
        if len < self.size {
            let keep = len.div_ceil(BLOCK);
            self.blocks.split_off(&keep);
            if !len.is_multiple_of(BLOCK) {
                if let Some(Block::Data(bytes)) = self.blocks.get_mut(&(len / BLOCK)) {
                    bytes[(len % BLOCK) as usize..].fill(0);
                }
            }
        }
        self.size = len;
    }

    /// Zeroes `[off, off + len)`: whole blocks become holes (`allocate` false)
    /// or allocated zero blocks (`allocate` true); partial blocks are zeroed in place.
    fn zero(&mut self, off: u64, len: u64, allocate: bool) {
        let end = off.saturating_add(len);
        for idx in block_span(off, len) {
            let bstart = idx * BLOCK;
            let (from, to) = (off.max(bstart), end.min(bstart + BLOCK));
            if from == bstart && to == bstart + BLOCK {
                if allocate {
                    self.blocks.insert(idx, Block::Zero);
                } else {
                    self.blocks.remove(&idx);
                }
                continue;
            }
            match self.blocks.get_mut(&idx) {
                Some(Block::Data(bytes)) => bytes[(from - bstart) as usize..(to - bstart) as usize].fill(0),
                Some(Block::Zero) => {}
                None if allocate => {
                    self.blocks.insert(idx, Block::Zero);
                }
                None => {}
            }
        }
    }

    /// `SEEK_DATA`: the first allocated offset at or after `off`; `None` is ENXIO.
    pub fn seek_data(&self, off: u64) -> Option<u64> {
        if off >= self.size {
            return None;
        }
        let (&idx, _) = self.blocks.range(off / BLOCK..).next()?;
        let pos = off.max(idx * BLOCK);
        (pos < self.size).then_some(pos)
    }

    /// `SEEK_HOLE`: the first hole at or after `off`, the end of file counting
    /// as one; `None` is ENXIO.
    pub fn seek_hole(&self, off: u64) -> Option<u64> {
        if off >= self.size {
            return None;
        }
        let mut next = off / BLOCK;
        for (&idx, _) in self.blocks.range(next..) {
            if idx != next {
                break;
            }
            next += 1;
        }
        Some(off.max(next * BLOCK).min(self.size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(off: u64, byte: u8, len: usize) -> FileOp {
        FileOp::Write { off, data: vec![byte; len] }
    }

    #[test]
    fn write_past_end_leaves_a_hole_that_reads_zeroes() {
        let mut c = Content::default();
        c.apply(&write(3 * BLOCK + 10, 7, 20));
        assert_eq!(c.size(), 3 * BLOCK + 30);
        assert_eq!(c.allocated_blocks(), 1);
        assert_eq!(c.read(0, 4), vec![0; 4]);
        assert_eq!(c.read(3 * BLOCK + 8, 4), vec![0, 0, 7, 7]);
        assert_eq!(c.read(3 * BLOCK + 28, 100), vec![7, 7]);
    }

    #[test]
    fn shrink_then_grow_reads_zeroes_past_the_old_end() {
        let mut c = Content::default();
        c.apply(&write(0, 9, 2 * BLOCK as usize));
        c.apply(&FileOp::SetLen { len: 100 });
        c.apply(&FileOp::SetLen { len: 2 * BLOCK });
        assert_eq!(c.allocated_blocks(), 1);
        assert_eq!(c.read(98, 4), vec![9, 9, 0, 0]);
    }

    #[test]
    fn punch_deallocates_whole_blocks_and_zeroes_partial_ones() {
        let mut c = Content::default();
        c.apply(&write(0, 1, 3 * BLOCK as usize));
        c.apply(&FileOp::Punch { off: 100, len: 2 * BLOCK });
        assert_eq!(c.size(), 3 * BLOCK);
        assert_eq!(c.allocated_blocks(), 2, "only block 1 is wholly inside the hole");
        assert_eq!(c.read(98, 4), vec![1, 1, 0, 0]);
        assert_eq!(c.read(2 * BLOCK + 98, 4), vec![0, 0, 1, 1]);
    }

    #[test]
    fn zero_range_and_allocate_keep_blocks_allocated() {
        let mut c = Content::default();
        c.apply(&write(0, 1, BLOCK as usize));
        c.apply(&FileOp::ZeroRange { off: 0, len: BLOCK, keep_size: true });
        c.apply(&FileOp::Allocate { off: 4 * BLOCK, len: BLOCK, keep_size: false });
        assert_eq!(c.read(0, BLOCK), vec![0; BLOCK as usize]);
        assert_eq!(c.allocated_blocks(), 2);
        assert_eq!(c.size(), 5 * BLOCK);
        assert_eq!(c.blocks_needed(&write(4 * BLOCK, 1, 2 * BLOCK as usize)), 1);
    }

    #[test]
    fn seek_data_and_hole_follow_the_block_map() {
        let mut c = Content::default();
        c.apply(&FileOp::SetLen { len: 10 * BLOCK });
        c.apply(&write(2 * BLOCK, 1, 2 * BLOCK as usize));
        c.apply(&write(7 * BLOCK + 5, 1, 1));
        assert_eq!(c.seek_data(0), Some(2 * BLOCK));
        assert_eq!(c.seek_hole(2 * BLOCK + 1), Some(4 * BLOCK));
        assert_eq!(c.seek_data(4 * BLOCK), Some(7 * BLOCK));
        assert_eq!(c.seek_hole(7 * BLOCK), Some(8 * BLOCK));
        assert_eq!(c.seek_data(8 * BLOCK), None);
        assert_eq!(c.seek_hole(8 * BLOCK), Some(8 * BLOCK));
        assert_eq!(c.seek_hole(10 * BLOCK), None);
    }

    #[test]
    fn sector_pieces_split_at_absolute_512_byte_boundaries() {
        assert_eq!(write(100, 1, 50).sector_pieces(), None, "inside one sector: atomic");
        let op = write(500, 1, 600);
        let pieces = op.sector_pieces().map(|p| p.iter().map(|(o, d)| (*o, d.len())).collect::<Vec<_>>());
        assert_eq!(pieces, Some(vec![(500, 12), (512, 512), (1024, 76)]));
    }
}
