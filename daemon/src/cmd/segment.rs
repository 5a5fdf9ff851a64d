//! `tern segment`: offline inspection of the cache store's segment files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tern_driver::image::Image;
use tern_driver::mirror::apply_record;
use tern_store::cache::CacheDir;
use tern_store::segment::{self, Compression, Segment};

use super::Cli;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print a segment's header and records.
    Dump {
        file: PathBuf,
        /// Only the header.
        #[arg(long)]
        header: bool,
    },
    /// Check segments completely (checksums, sequence rules, decompression);
    /// given a VM's cache directory, also that the stream has no gaps.
    Verify { paths: Vec<PathBuf> },
    /// Replay every segment of a VM's cache directory onto copies of its
    /// disks as they were at `enable` (the oracle tests use).
    Replay {
        /// `<cache>/<vm>`.
        dir: PathBuf,
        /// NAME=PATH: the copy of disk NAME to replay onto. Repeatable.
        #[arg(long = "onto", value_name = "NAME=PATH", required = true, value_parser = crate::cmd::parse_onto)]
        onto: Vec<(String, PathBuf)>,
        /// Afterwards, answer a pending block-hash request of the source
        /// (after a host crash) with the hashes of these copies, as the
        /// target site does. Needs a copy of every disk.
        #[arg(long)]
        answer_hashes: bool,
        /// Stop after the record with this sequence number (the oracle of
        /// a recovery point).
        #[arg(long)]
        until_seq: Option<u64>,
    },
}

pub fn run(_cli: &Cli, c: &Command) -> Result<()> {
    match c {
        Command::Dump { file, header } => dump(file, *header),
        Command::Verify { paths } => {
            let mut segments = 0;
            for p in paths {
                segments += if p.is_dir() { verify_dir(p)? } else { verify_file(p).map(|_| 1)? };
            }
            println!("ok: {segments} segment(s) verified");
            Ok(())
        }
        Command::Replay { dir, onto, answer_hashes, until_seq } => {
            replay(dir, onto, *answer_hashes, until_seq.unwrap_or(u64::MAX))
        }
    }
}

fn dump(file: &Path, header_only: bool) -> Result<()> {
    let seg = Segment::read_file(file, None)?;
    let h = &seg.header;
    let compression = match h.compression {
        Compression::None => "none".to_string(),
        Compression::Zstd { level } => format!("zstd level {level}"),
    };
    println!(
        "segment {}\n  vm id {}\n  epoch {}\n  seqs {}..={} ({} records)\n  window {}\n  data {} bytes, stored {} bytes ({compression})",
        file.display(),
        uuid::Uuid::from_bytes(h.vm_id),
        h.epoch,
        h.first_seq,
        h.last_seq,
        h.record_count,
        window_name(h.window),
        h.payload_len,
        h.stored_len
    );
    if header_only {
        return Ok(());
    }
    for (r, _) in seg.records() {
        let marker = match r.flags {
            tern_driver::journal::RESYNC_OPEN => " (opens resync window)",
            tern_driver::journal::RESYNC_CLOSE => " (closes resync window)",
            _ => "",
        };
        println!(
            "  seq {:>10}  disk {}  {:<6} offset {:>14}  length {:>9}{marker}",
            r.seq,
            r.disk,
            r.kind.name(),
            r.offset,
            r.length
        );
    }
    Ok(())
}

fn window_name(w: u32) -> &'static str {
    match (w & segment::WINDOW_AT_START != 0, w & segment::WINDOW_AT_END != 0) {
        (false, false) => "none (consistent throughout)",
        (false, true) => "opens",
        (true, true) => "continues",
        (true, false) => "closes",
    }
}

fn verify_file(p: &Path) -> Result<Segment> {
    Ok(Segment::read_file(p, None)?)
}

/// Every segment of `<cache>/<vm>`, in order: each verified, consecutive,
/// of the manifest's VM, gaps only where an epoch starts.
fn verify_dir(dir: &Path) -> Result<usize> {
    let (cache, manifest) = open_cache_dir(dir)?;
    let mut expected: Option<u64> = None;
    let list = cache.list_segments()?;
    for l in &list {
        let (first, last, path) = (&l.first_seq, &l.last_seq, &l.location);
        let seg = cache.read_segment(*first, *last, Some(*manifest.id.as_bytes()))?;
        if (seg.header.first_seq, seg.header.last_seq) != (*first, *last) {
            bail!("{}: holds seqs {}..={}, not what its name says", path, seg.header.first_seq, seg.header.last_seq);
        }
        if let Some(e) = expected {
            let epoch_starts_here =
                manifest.epochs.iter().any(|ep| ep.first_seq == *first && ep.number == seg.header.epoch);
            if *first != e && !epoch_starts_here {
                bail!("{}: starts at seq {first}, but the previous segment ended at {} (a gap)", path, e - 1);
            }
        }
        expected = Some(last + 1);
    }
    Ok(list.len())
}

fn open_cache_dir(dir: &Path) -> Result<(CacheDir, tern_store::cache::Manifest)> {
    let (Some(store), Some(vm)) = (dir.parent(), dir.file_name().and_then(|n| n.to_str())) else {
        bail!("{} is not a <cache>/<vm> directory", dir.display());
    };
    let cache = crate::cache::for_vm(&crate::cache::open_store(store)?, vm)?;
    let manifest = cache
        .read_manifest()?
        .with_context(|| format!("{} has no manifest.toml: not a tern cache directory", dir.display()))?;
    Ok((cache, manifest))
}

fn replay(dir: &Path, onto: &[(String, PathBuf)], answer_hashes: bool, until_seq: u64) -> Result<()> {
    verify_dir(dir)?;
    let (cache, manifest) = open_cache_dir(dir)?;
    let mut copies: Vec<Option<Image>> = Vec::new();
    for d in &manifest.disks {
        copies.push(match onto.iter().find(|(n, _)| *n == d.name) {
            Some((_, p)) => {
                let image = Image::open(p)?;
                if image.size() != d.size {
                    bail!("{} is {} bytes but disk '{}' is {}", p.display(), image.size(), d.name, d.size);
                }
                Some(image)
            }
            None => None,
        });
    }
    for (n, _) in onto {
        if !manifest.disks.iter().any(|d| d.name == *n) {
            bail!("VM '{}' has no disk named '{n}'", manifest.name);
        }
    }
    let (records, segments) = replay_cache(&cache, &manifest, &copies, until_seq)?;
    println!("replayed {records} records from {segments} segments");
    if answer_hashes {
        let mut disks = Vec::new();
        for (d, copy) in manifest.disks.iter().zip(&copies) {
            let Some(image) = copy else { bail!("--answer-hashes needs a copy of every disk; '{}' has none", d.name) };
            disks.push((d.name.as_str(), image));
        }
        let last_seq = cache.list_segments()?.last().map_or(0, |s| s.last_seq);
        match cache.answer_hash_request(*manifest.id.as_bytes(), &disks, last_seq).map_err(anyhow::Error::msg)? {
            Some(epoch) => {
                println!("answered the source's block-hash request for epoch {epoch} (replica at seq {last_seq})")
            }
            None => println!("no block-hash request is pending"),
        }
    }
    Ok(())
}

/// Applies every segment of a cache directory, in order, onto the disk
/// copies given (indexed like the manifest's disks). Returns the records
/// applied and the segments read.
pub fn replay_cache(
    cache: &CacheDir,
    manifest: &tern_store::cache::Manifest,
    copies: &[Option<Image>],
    until_seq: u64,
) -> Result<(u64, u64)> {
    let (mut records, mut segments) = (0u64, 0u64);
    for l in cache.list_segments()? {
        let path = &l.location;
        let seg = cache.read_segment(l.first_seq, l.last_seq, Some(*manifest.id.as_bytes()))?;
        for (h, data) in seg.records().take_while(|(h, _)| h.seq <= until_seq) {
            if let Some(Some(image)) = copies.get(h.disk as usize) {
                let mut h = *h;
                h.disk = 0;
                apply_record(std::slice::from_ref(image), &h, data)
                    .with_context(|| format!("replaying seq {} of {}", h.seq, path))?;
                records += h.kind.changes_disk() as u64;
            }
        }
        segments += 1;
    }
    for image in copies.iter().flatten() {
        image.sync_data()?;
    }
    Ok((records, segments))
}
