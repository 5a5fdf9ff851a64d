//! The persistent dirty-region bitmap of one disk (`<state>/<vm>/dirty.<disk>`).
//!
//! A set bit means "the replica may differ from the source in this region;
//! resync must re-read it". Writes land here instead of the journal when the
//! ring is full, and `enable` marks every allocated region (the initial
//! sync). The file is memory-mapped and bits are set with atomic `fetch_or`,
//! so marking never takes a lock and survives a crash of the process.
//!
//! ```text
//! file   = header (4096 bytes) | bits (u64 words, little-endian, bit i of word w = region 64w+i)
//! header = { [u8;8] magic "TERNDIRT" | u32 version (1) | u32 region_size
//!          | u64 disk_size | u64 regions | u32 crc32c(0..32) }
//! ```

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use memmap2::MmapRaw;

use crate::{Error, Result};

const MAGIC: [u8; 8] = *b"TERNDIRT";
const VERSION: u32 = 1;
const HEADER_SIZE: usize = 4096;
/// Default region size: 64 KiB, a bit per 64 KiB (a 2 TiB disk takes 4 MiB).
pub const DEFAULT_REGION_SIZE: u32 = 64 * 1024;

#[derive(Debug)]
pub struct DirtyBitmap {
    map: MmapRaw,
    path: PathBuf,
    region_size: u64,
    disk_size: u64,
    regions: u64,
    /// Counts marks (every one, even of an already dirty region) and the
    /// count the last completed `sync` covered: a flush that finds them
    /// equal costs no `msync`, and one that does not waits for its own.
    marks: AtomicU64,
    synced: AtomicU64,
    /// Serializes `msync`s, so a flush never returns while another one that
    /// its marks depend on is still running. Holds the first failure's
    /// kind: Linux reports a failed write-back to one sync only, and the
    /// pages it dropped are clean again, so a later `msync` would succeed
    /// over lost marks. Every sync after a failure fails.
    syncing: Mutex<Option<std::io::ErrorKind>>,
}

impl DirtyBitmap {
    /// Creates an all-clean bitmap file for a disk of `disk_size` bytes.
    pub fn create(path: &Path, disk_size: u64, region_size: u32) -> Result<()> {
        if !region_size.is_power_of_two() || region_size < 4096 {
            return Err(Error::Invalid(format!("region size {region_size} must be a power of two of at least 4096")));
        }
        let regions = disk_size.div_ceil(region_size as u64);
        let create_err = |source| Error::Create { path: path.to_owned(), source };
        let mut f = OpenOptions::new().read(true).write(true).create_new(true).open(path).map_err(create_err)?;
        crate::fs::preallocate(&f, HEADER_SIZE as u64 + regions.div_ceil(64) * 8).map_err(create_err)?;
        f.write_all(&encode_header(region_size, disk_size, regions)).map_err(create_err)?;
        f.sync_all().map_err(|source| Error::Sync { path: path.to_owned(), source })?;
        crate::fs::sync_parent_dir(path)?;
        Ok(())
    }

    /// Opens a bitmap and checks it belongs to a disk of `disk_size` bytes.
    pub fn open(path: &Path, disk_size: u64) -> Result<Self> {
        let bad = |reason: String| Error::Format { path: path.to_owned(), what: "dirty bitmap", reason };
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| Error::Open { path: path.to_owned(), source })?;
        let mut h = [0u8; 36];
        f.read_exact_at(&mut h, 0).map_err(|_| bad("file is shorter than its header".into()))?;
        if h[..8] != MAGIC {
            return Err(bad("bad magic".into()));
        }
        let word = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap_or_default());
        let version = u32::from_le_bytes(h[8..12].try_into().unwrap_or_default());
        let region_size = u32::from_le_bytes(h[12..16].try_into().unwrap_or_default());
        let (size, regions) = (word(16), word(24));
        let crc = u32::from_le_bytes(h[32..36].try_into().unwrap_or_default());
        if version != VERSION {
            return Err(bad(format!("unsupported version {version}")));
        }
        if crc != crate::checksum::crc32c(&h[..32]) {
            return Err(bad("header checksum mismatch".into()));
        }
        if size != disk_size {
            return Err(bad(format!("made for a disk of {size} bytes, but the disk has {disk_size}")));
        }
        if !region_size.is_power_of_two() || regions != size.div_ceil(region_size as u64) {
            return Err(bad(format!("region size {region_size} and count {regions} do not fit the disk size")));
        }
        let len = f.metadata().map_err(|source| Error::Open { path: path.to_owned(), source })?.len();
        if len != HEADER_SIZE as u64 + regions.div_ceil(64) * 8 {
            return Err(bad(format!(
                "file is {len} bytes, expected {}",
                HEADER_SIZE as u64 + regions.div_ceil(64) * 8
            )));
        }
        let map = MmapRaw::map_raw(&f).map_err(|source| Error::Map { path: path.to_owned(), source })?;
        Ok(DirtyBitmap {
            map,
            path: path.to_owned(),
            region_size: region_size as u64,
            disk_size,
            regions,
            marks: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            syncing: Mutex::new(None),
        })
    }

    pub fn region_size(&self) -> u64 {
        self.region_size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn word(&self, w: u64) -> &AtomicU64 {
        debug_assert!(w < self.regions.div_ceil(64));
        // SAFETY: word `w` lies inside the mapping (checked against the file
        // length at open), 8-byte aligned after the page-sized header; the
        // mapping lives as long as `self`. Every access is atomic.
        unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(HEADER_SIZE + 8 * w as usize).cast()) }
    }

    /// Marks every region touching `[offset, offset + len)` dirty.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.disk_size {
            return;
        }
        let first = offset / self.region_size;
        let last = (offset + len - 1).min(self.disk_size - 1) / self.region_size;
        let mut r = first;
        while r <= last {
            let (w, bit) = (r / 64, r % 64);
            let n = (64 - bit).min(last - r + 1);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit };
            let word = self.word(w);
            // Load first: marking an already dirty region must not dirty
            // the cache line (or the page) again.
            if word.load(Ordering::Acquire) & mask != mask {
                word.fetch_or(mask, Ordering::AcqRel);
            }
            r += n;
        }
        // Counted even when the bits were already set: another thread may
        // have set them and not yet counted, and this write's flush must
        // still wait for an msync that covers them.
        self.marks.fetch_add(1, Ordering::AcqRel);
    }

    /// Clears one region (the resync, once its content is shipped).
    pub fn clear(&self, region: u64) {
        if region < self.regions {
            self.word(region / 64).fetch_and(!(1u64 << (region % 64)), Ordering::AcqRel);
            self.marks.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Clears every region touching `[offset, offset + len)` (the caller
    /// holds the range and has re-sent its content).
    pub fn clear_range(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.disk_size {
            return;
        }
        let last = (offset + len - 1).min(self.disk_size - 1) / self.region_size;
        for r in offset / self.region_size..=last {
            self.clear(r);
        }
    }

    /// The first run of dirty regions at or after byte `from`, as a byte
    /// range clipped to the disk and to at most `max_len` bytes (rounded
    /// down to whole regions, at least one). Skips clean words 64 regions
    /// at a time.
    pub fn next_dirty(&self, from: u64, max_len: u64) -> Option<(u64, u64)> {
        let max_regions = (max_len / self.region_size).max(1);
        let mut r = from / self.region_size;
        while r < self.regions {
            let word = self.word(r / 64).load(Ordering::Acquire) >> (r % 64);
            if word == 0 {
                r = (r / 64 + 1) * 64;
                continue;
            }
            r += word.trailing_zeros() as u64;
            let first = r;
            while r < self.regions && r - first < max_regions && self.is_dirty(r) {
                r += 1;
            }
            let start = first * self.region_size;
            let end = (r * self.region_size).min(self.disk_size);
            return Some((start, end - start));
        }
        None
    }

    pub fn is_dirty(&self, region: u64) -> bool {
        region < self.regions && self.word(region / 64).load(Ordering::Acquire) & (1 << (region % 64)) != 0
    }

    pub fn dirty_count(&self) -> u64 {
        (0..self.regions.div_ceil(64)).map(|w| self.word(w).load(Ordering::Acquire).count_ones() as u64).sum()
    }

    /// The dirty regions as merged byte ranges `(offset, len)`, clipped to
    /// the disk.
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for r in 0..self.regions {
            if !self.is_dirty(r) {
                continue;
            }
            let start = r * self.region_size;
            let end = ((r + 1) * self.region_size).min(self.disk_size);
            match out.last_mut() {
                Some((o, l)) if *o + *l == start => *l = end - *o,
                _ => out.push((start, end - start)),
            }
        }
        out
    }

    /// Makes every mark made before this call durable.
    pub fn sync(&self) -> Result<()> {
        let target = self.marks.load(Ordering::Acquire);
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let mut failed = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(kind) = *failed {
            let why = "an earlier msync of this bitmap failed, so marks it held may be lost; \
                       no later one is reported durable until the front-end is restarted";
            return Err(Error::Sync { path: self.path.clone(), source: std::io::Error::new(kind, why) });
        }
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(()); // an msync that started after our marks covered them
        }
        let covered = self.marks.load(Ordering::Acquire);
        self.map.flush().map_err(|source| {
            *failed = Some(source.kind());
            Error::Sync { path: self.path.clone(), source }
        })?;
        self.synced.fetch_max(covered, Ordering::AcqRel);
        Ok(())
    }
}

fn encode_header(region_size: u32, disk_size: u64, regions: u64) -> [u8; 36] {
    let mut h = [0u8; 36];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&region_size.to_le_bytes());
    h[16..24].copy_from_slice(&disk_size.to_le_bytes());
    h[24..32].copy_from_slice(&regions.to_le_bytes());
    let crc = crate::checksum::crc32c(&h[..32]);
    h[32..36].copy_from_slice(&crc.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap(size: u64) -> (tempfile::TempDir, DirtyBitmap) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dirty.disk0");
        DirtyBitmap::create(&p, size, 65536).unwrap();
        let b = DirtyBitmap::open(&p, size).unwrap();
        (d, b)
    }

    #[test]
    fn mark_covers_every_touched_region_and_no_other() {
        let (_d, b) = bitmap(10 << 20);
        b.mark(65535, 2); // touches regions 0 and 1
        b.mark(64 * 65536 + 10, 65536 * 70); // regions 64..=134 cross word boundaries
        let dirty: Vec<u64> = (0..160).filter(|&r| b.is_dirty(r)).collect();
        let mut expected = vec![0, 1];
        expected.extend(64..=134);
        assert_eq!(dirty, expected);
        assert_eq!(b.dirty_count(), expected.len() as u64);
    }

    #[test]
    fn marks_survive_reopen() {
        let (d, b) = bitmap(1 << 20);
        b.mark(200_000, 1);
        b.sync().unwrap();
        drop(b);
        let b = DirtyBitmap::open(&d.path().join("dirty.disk0"), 1 << 20).unwrap();
        assert_eq!(b.dirty_ranges(), vec![(196_608, 65536)]);
    }

    #[test]
    fn last_partial_region_is_clipped_to_the_disk() {
        let (_d, b) = bitmap(100_000);
        b.mark(99_999, 1);
        assert_eq!(b.dirty_ranges(), vec![(65536, 100_000 - 65536)]);
    }

    #[test]
    fn next_dirty_finds_runs_in_order_and_clear_range_empties_them() {
        let (_d, b) = bitmap(10 * 1024 * 1024 + 1000);
        let rs = b.region_size();
        b.mark(3 * rs, 1);
        b.mark(70 * rs + 5, 4 * rs); // regions 70..=74
        b.mark(10 * 1024 * 1024 + 10, 1); // the last, partial region
        assert_eq!(b.next_dirty(0, 1 << 20), Some((3 * rs, rs)));
        assert_eq!(b.next_dirty(4 * rs, 1 << 20), Some((70 * rs, 5 * rs)));
        assert_eq!(b.next_dirty(70 * rs, 2 * rs), Some((70 * rs, 2 * rs)), "capped at max_len");
        assert_eq!(b.next_dirty(75 * rs, 1 << 20), Some((160 * rs, 1000)), "clipped to the disk");
        b.clear_range(70 * rs, 5 * rs);
        b.clear_range(3 * rs, 1);
        b.clear_range(160 * rs, 1000);
        assert_eq!(b.next_dirty(0, 1 << 20), None);
        assert_eq!(b.dirty_count(), 0);
    }

    #[test]
    fn wrong_disk_size_is_refused() {
        let (d, b) = bitmap(1 << 20);
        drop(b);
        let err = DirtyBitmap::open(&d.path().join("dirty.disk0"), 2 << 20).unwrap_err();
        assert!(err.to_string().contains("made for a disk of 1048576 bytes"), "{err}");
    }
}
