//! Comparing disks by content: each source disk against its copy in a
//! replica, point or failover directory, region by region, by XXH3-128.
//! `tern verify` prints it; `tern demo` proves its failover with it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use tern_driver::image::Image;
use tern_store::hashes::region_hashes;

/// A disk's name and its differing byte ranges `[start, end)`, merged.
pub type DiskDifferences = (String, Vec<(u64, u64)>);

/// Compares each source disk with `<dir>/<disk>.img`, region by region, by
/// XXH3-128.
pub fn compare(sources: &[(String, PathBuf)], dir: &Path, region: u64) -> Result<Vec<DiskDifferences>> {
    let mut out = Vec::new();
    for (name, path) in sources {
        let source = Image::open_read_only(path)?;
        let copy_path = dir.join(format!("{name}.img"));
        let copy = Image::open_read_only(&copy_path)?;
        if copy.size() != source.size() {
            bail!("disk '{name}': {} is {} bytes, the source {}", copy_path.display(), copy.size(), source.size());
        }
        let (a, b) = (region_hashes(&source, region)?, region_hashes(&copy, region)?);
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (i, _) in a.iter().zip(&b).enumerate().filter(|(_, (x, y))| x != y) {
            let (start, end) = (i as u64 * region, ((i as u64 + 1) * region).min(source.size()));
            match ranges.last_mut() {
                Some(r) if r.1 == start => r.1 = end,
                _ => ranges.push((start, end)),
            }
        }
        out.push((name.clone(), ranges));
    }
    Ok(out)
}
