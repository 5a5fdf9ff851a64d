//! Self-describing sector contents: every 512-byte sector a workload write
//! puts on a disk says which write put it there, on which disk and at
//! which sector, so any image (a source disk after a crash, a recovery
//! point, a replica) can be read back as "which write does each sector
//! hold", and a sector that holds anything else is caught.

pub const SECTOR: u64 = 512;
const MAGIC: &[u8; 8] = b"TERNSECT";

/// What one sector of an image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// All zeroes: never written, or zeroed or trimmed.
    Zero,
    /// The data of write `id`.
    Write(u64),
    /// Anything else: torn, misplaced or corrupt data.
    Garbage,
}

/// The contents write `id` puts in sector `sector` of disk `disk`.
pub fn encode(id: u64, disk: u16, sector: u64, out: &mut [u8]) {
    debug_assert_eq!(out.len(), SECTOR as usize);
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&id.to_le_bytes());
    out[16..18].copy_from_slice(&disk.to_le_bytes());
    out[18..26].copy_from_slice(&sector.to_le_bytes());
    // Filler that differs per write and sector (so compression and
    // deduplication see real data), then a checksum of it all.
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ sector.rotate_left(17) ^ u64::from(disk);
    for chunk in out[26..504].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = chunk.len();
        chunk.copy_from_slice(&x.to_le_bytes()[..n]);
    }
    let sum = xxhash_rust::xxh3::xxh3_64(&out[..504]);
    out[504..].copy_from_slice(&sum.to_le_bytes());
}

/// Reads back one sector of disk `disk` at `sector`.
pub fn decode(disk: u16, sector: u64, b: &[u8]) -> Held {
    if b.iter().all(|&x| x == 0) {
        return Held::Zero;
    }
    if &b[..8] != MAGIC {
        return Held::Garbage;
    }
    let id = u64::from_le_bytes(b[8..16].try_into().unwrap_or_default());
    let mut expect = [0u8; SECTOR as usize];
    encode(id, disk, sector, &mut expect);
    if expect[..] == b[..] {
        Held::Write(id)
    } else {
        Held::Garbage
    }
}

/// Every sector of an image.
pub fn decode_image(disk: u16, bytes: &[u8]) -> Vec<Held> {
    bytes.chunks(SECTOR as usize).enumerate().map(|(i, b)| decode(disk, i as u64, b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sector_reads_back_as_its_write_and_nothing_else_does() {
        let mut b = [0u8; 512];
        encode(42, 1, 7, &mut b);
        assert_eq!(decode(1, 7, &b), Held::Write(42));
        assert_eq!(decode(0, 7, &b), Held::Garbage, "another disk");
        assert_eq!(decode(1, 8, &b), Held::Garbage, "another sector");
        b[300] ^= 1;
        assert_eq!(decode(1, 7, &b), Held::Garbage, "a flipped bit");
        assert_eq!(decode(1, 7, &[0u8; 512]), Held::Zero);
    }
}
