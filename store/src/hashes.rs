//! Block hashes, exchanged through the cache store after an unclean host
//! shutdown: the source cannot know which of its last writes the replica
//! got, so it asks the target for the hash of every region of the replica,
//! compares them with its own, and re-sends only the regions that differ.
//! Nothing ever connects inward to the source: the request and the answer
//! are files in the cache.
//!
//! ```text
//! <cache>/<vm>/hash-request.toml                 { version, epoch, region-size, id }  written by `tern ship`
//! <cache>/<vm>/hashes/epoch-<n>-<id>.<disk>      the replica's hashes (below)         written by the target
//!
//! hashes = { [u8;8] magic "TERNHASH" | u32 version (1) | u32 region_size
//!          | [u8;16] vm_id | u64 epoch | u64 disk_size | u64 applied_seq | u64 count }   64 bytes
//!          | count × 16-byte XXH3-128 hashes (little-endian), one per region
//!          | u32 crc32c of everything before
//! ```
//!
//! The comparison may run at any time after the request: a region that
//! differs at the crash keeps differing in bytes no later write covers, and
//! the replica receives every later write anyway.

use serde::{Deserialize, Serialize};
use tern_driver::image::Image;

use crate::cache::CacheDir;

pub const MAGIC: [u8; 8] = *b"TERNHASH";
pub const VERSION: u32 = 1;
const HEADER_SIZE: usize = 64;
/// Regions per disk a hash file may list (a 64 KiB region: 64 TiB).
pub const MAX_REGIONS: u64 = 1 << 30;

/// `hash-request.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HashRequest {
    pub version: u32,
    /// The epoch that started with the unclean shutdown.
    pub epoch: u64,
    pub region_size: u64,
    /// Names this comparison's answers: one epoch may see several
    /// comparisons (a torn record found after a restart), and an answer
    /// left from an earlier one (its clean-up failed, or it came after
    /// the shipper gave up waiting) hashes the replica as it was then. A
    /// request without one (version 1) is answered under 0.
    #[serde(default)]
    pub id: u64,
}

/// The version of `hash-request.toml` this tern writes.
pub const REQUEST_VERSION: u32 = 2;

/// The hashes of one disk's regions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHashes {
    pub vm_id: [u8; 16],
    pub epoch: u64,
    pub region_size: u64,
    pub disk_size: u64,
    /// The replica had every record up to this sequence number applied.
    pub applied_seq: u64,
    pub hashes: Vec<u128>,
}

/// Hashes every `region_size` region of an image (the last one may be
/// shorter), reading it front to back in large pieces.
pub fn region_hashes(image: &Image, region_size: u64) -> tern_driver::Result<Vec<u128>> {
    let size = image.size();
    let per_read = (4 << 20) / region_size.max(1) * region_size.max(1);
    let mut buf = vec![0u8; per_read.max(region_size) as usize];
    let mut hashes = Vec::with_capacity(size.div_ceil(region_size) as usize);
    let mut offset = 0;
    while offset < size {
        let n = (buf.len() as u64).min(size - offset) as usize;
        image.read_at(&mut buf[..n], offset)?;
        hashes.extend(buf[..n].chunks(region_size as usize).map(xxhash_rust::xxh3::xxh3_128));
        offset += n as u64;
    }
    Ok(hashes)
}

impl BlockHashes {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_SIZE + self.hashes.len() * 16 + 4);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&(self.region_size as u32).to_le_bytes());
        b.extend_from_slice(&self.vm_id);
        for v in [self.epoch, self.disk_size, self.applied_seq, self.hashes.len() as u64] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for h in &self.hashes {
            b.extend_from_slice(&h.to_le_bytes());
        }
        let crc = tern_driver::checksum::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a hash file (untrusted: it comes from the cache).
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() < HEADER_SIZE + 4 {
            return Err(format!("file is {} bytes, shorter than a header", b.len()));
        }
        if b[..8] != MAGIC {
            return Err("bad magic: not a tern hash file".into());
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if u32_at(8) != VERSION {
            return Err(format!("version {} is not supported (this tern reads {VERSION})", u32_at(8)));
        }
        let (region_size, disk_size, count) = (u32_at(12) as u64, u64_at(40), u64_at(56));
        if region_size < 4096 || !region_size.is_power_of_two() {
            return Err(format!("region size {region_size} is not a power of two of at least 4096"));
        }
        if count > MAX_REGIONS || count != disk_size.div_ceil(region_size) {
            return Err(format!(
                "{count} hashes do not cover a disk of {disk_size} bytes in {region_size}-byte regions"
            ));
        }
        let expected_len = HEADER_SIZE as u64 + count * 16 + 4;
        if b.len() as u64 != expected_len {
            return Err(format!("file is {} bytes, the header says {expected_len}", b.len()));
        }
        let body = b.len() - 4;
        let (stored, computed) = (u32_at(body), tern_driver::checksum::crc32c(&b[..body]));
        if stored != computed {
            return Err(format!("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"));
        }
        Ok(BlockHashes {
            vm_id: b[16..32].try_into().expect("16 bytes"),
            epoch: u64_at(32),
            region_size,
            disk_size,
            applied_seq: u64_at(48),
            hashes: b[HEADER_SIZE..body].chunks(16).map(|c| u128::from_le_bytes(c.try_into().expect("16"))).collect(),
        })
    }
}

/// `<cache>/<vm>/hash-request.toml`.
pub const HASH_REQUEST: &str = "hash-request.toml";

/// The name of one disk's answer to `request` below `<cache>/<vm>/`.
pub fn hashes_name(request: &HashRequest, disk: &str) -> String {
    format!("hashes/epoch-{}-{:016x}.{disk}", request.epoch, request.id)
}

impl CacheDir {
    /// The pending request, if any.
    pub fn read_hash_request(&self) -> Result<Option<HashRequest>, crate::file::FileError> {
        self.read_toml(HASH_REQUEST)
    }

    /// The target's answer to `request` for one disk, `None` while it has
    /// not come.
    pub fn read_hashes(
        &self,
        request: &HashRequest,
        disk: &str,
    ) -> Result<Option<BlockHashes>, crate::file::FileError> {
        self.read_with(&hashes_name(request, disk), BlockHashes::decode)
    }

    /// Target side: answers the pending request with the hashes of the
    /// replica images (`replicas` in the manifest's disk order), each
    /// written whole, so the source never reads half of one. Returns the
    /// epoch answered, or `None` if nothing was asked.
    pub fn answer_hash_request(
        &self,
        vm_id: [u8; 16],
        disks: &[(&str, &Image)],
        applied_seq: u64,
    ) -> Result<Option<u64>, String> {
        let request = match self.read_hash_request() {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        for (name, image) in disks {
            let hashes = region_hashes(image, request.region_size).map_err(|e| e.to_string())?;
            let file = BlockHashes {
                vm_id,
                epoch: request.epoch,
                region_size: request.region_size,
                disk_size: image.size(),
                applied_seq,
                hashes,
            };
            self.put(&hashes_name(&request, name), &file.encode(), crate::object::Put::Overwrite)
                .map_err(|e| crate::file::with_causes(&e))?;
        }
        Ok(Some(request.epoch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn sample() -> BlockHashes {
        BlockHashes {
            vm_id: [3; 16],
            epoch: 2,
            region_size: 65536,
            disk_size: 3 * 65536 + 100,
            applied_seq: 77,
            hashes: vec![1, 2, u128::MAX, 4],
        }
    }

    #[test]
    fn round_trip_and_every_corruption_is_refused() {
        let b = sample().encode();
        assert_eq!(BlockHashes::decode(&b).unwrap(), sample());
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x01;
            assert!(BlockHashes::decode(&bad).is_err(), "flip at byte {i} not detected");
        }
        for len in 0..b.len() {
            assert!(BlockHashes::decode(&b[..len]).is_err(), "truncation to {len} not detected");
        }
    }

    #[test]
    fn equal_regions_hash_equal_and_different_ones_differ() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        let mut content = vec![0u8; 5 * 65536 + 10];
        content[65536 + 7] = 1;
        fs::write(&p, &content).unwrap();
        let h = region_hashes(&Image::open(&p).unwrap(), 65536).unwrap();
        assert_eq!(h.len(), 6);
        assert_eq!(h[0], h[2]);
        assert_ne!(h[0], h[1]);
        assert_ne!(h[0], h[5], "the short last region hashes its own length");
    }
}
