//! `tern journal dump|dirty|replay`: a VM's journal and bitmaps read
//! offline, for support and for the tests' oracle (replaying a journal onto
//! copies of the disks).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tern_driver::bitmap::DirtyBitmap;
use tern_driver::image::Image;
use tern_driver::journal::{Journal, Position, RecordKind};
use tern_driver::mirror::apply_record;
use tern_driver::vm::VmPaths;

use super::Cli;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print the journal's header and its unconsumed records.
    Dump {
        vm: String,
        /// Start at the first record ever written, not at the consumer's
        /// position (only while the ring has not wrapped).
        #[arg(long)]
        from_start: bool,
        /// Print the header only.
        #[arg(long)]
        header: bool,
    },
    /// List the regions marked dirty (awaiting resync) in each disk's
    /// bitmap, one `DISK OFFSET LENGTH` line per merged range.
    Dirty { vm: String },
    /// Replay the journal's records onto copies of the disks (the oracle:
    /// a copy of each disk as it was at the starting point becomes the
    /// source disk as it is now).
    Replay {
        vm: String,
        /// A disk copy to replay onto, as NAME=PATH. Repeatable.
        #[arg(long = "onto", value_name = "NAME=PATH", required = true, value_parser = crate::cmd::parse_onto)]
        onto: Vec<(String, PathBuf)>,
        /// Start at the first record ever written (see `dump`).
        #[arg(long)]
        from_start: bool,
    },
}

fn start(j: &Journal, from_start: bool) -> Result<Position> {
    if !from_start {
        return Ok(j.tail());
    }
    if j.head().pos > j.capacity() {
        bail!(
            "journal {} has wrapped (head at byte {} of a {}-byte ring): the first records are gone; drop --from-start",
            j.path().display(),
            j.head().pos,
            j.capacity()
        );
    }
    Ok(Position { pos: 0, seq: 1 })
}

pub fn run(cli: &Cli, c: &Command) -> Result<()> {
    match c {
        Command::Dump { vm, from_start, header } => {
            let paths = VmPaths::new(&cli.state, vm)?;
            let j = paths.open_journal()?;
            let (h, t) = (j.head(), j.tail());
            println!("journal {}", j.path().display());
            println!("  capacity {} bytes, fill {:.1}%", j.capacity(), j.fill() * 100.0);
            println!("  head pos {} seq {}; tail pos {} seq {}", h.pos, h.seq, t.pos, t.seq);
            println!(
                "  mode {:?} (overflow at seq {}), flags {:#x}, recoveries {}",
                j.mode(),
                j.overflow_seq(),
                j.flags(),
                j.recoveries()
            );
            if *header {
                return Ok(());
            }
            let mut cursor = j.cursor(start(&j, *from_start)?);
            let mut data = Vec::new();
            while let Some(r) = cursor.next(&mut data).map_err(anyhow::Error::msg)? {
                let extra = if r.kind == RecordKind::Tag {
                    format!(" label {:?}", String::from_utf8_lossy(&data))
                } else {
                    String::new()
                };
                println!(
                    "seq {:>10} {:<6} disk {} offset {} length {} time {}{extra}",
                    r.seq,
                    r.kind.name(),
                    r.disk,
                    r.offset,
                    r.length,
                    r.time_ns
                );
            }
            let end = cursor.position();
            if end.pos < h.pos {
                println!("(stopped at position {} seq {}: not yet published)", end.pos, end.seq);
            }
            Ok(())
        }
        Command::Dirty { vm } => {
            let paths = VmPaths::new(&cli.state, vm)?;
            let config = paths.load_config()?;
            for d in &config.disks {
                let bitmap = DirtyBitmap::open(&paths.dirty(&d.name), d.size)?;
                for (offset, len) in bitmap.dirty_ranges() {
                    println!("{} {offset} {len}", d.name);
                }
            }
            Ok(())
        }
        Command::Replay { vm, onto, from_start } => {
            let paths = VmPaths::new(&cli.state, vm)?;
            let config = paths.load_config()?;
            let j = paths.open_journal()?;
            // One slot per disk of the VM; records of disks without a copy
            // are skipped.
            let mut copies: Vec<Option<Image>> = config.disks.iter().map(|_| None).collect();
            for (name, path) in onto {
                let Some(i) = config.disk_index(name) else { bail!("VM '{vm}' has no disk named '{name}'") };
                let image = Image::open(path)?;
                if image.size() != config.disks[i].size {
                    bail!("{} is {} bytes but disk '{name}' is {}", path.display(), image.size(), config.disks[i].size);
                }
                copies[i] = Some(image);
            }
            let (applied, end) = replay(&j, start(&j, *from_start)?, &copies)?;
            for image in copies.iter().flatten() {
                image.sync_data()?;
            }
            println!(
                "replayed {applied} records, up to seq {} (journal {})",
                end.seq.saturating_sub(1),
                j.path().display()
            );
            Ok(())
        }
    }
}

/// Replays published records from `start` onto the disk copies present in
/// `copies` (indexed like the VM's disks). Returns how many records were
/// applied and where the replay stopped.
pub fn replay(j: &Journal, start: Position, copies: &[Option<Image>]) -> Result<(u64, Position)> {
    let mut cursor = j.cursor(start);
    let mut data = Vec::new();
    let mut applied = 0u64;
    while let Some(mut r) = cursor.next(&mut data).map_err(anyhow::Error::msg)? {
        if let Some(Some(image)) = copies.get(r.disk as usize) {
            r.disk = 0;
            apply_record(std::slice::from_ref(image), &r, &data).with_context(|| format!("replaying seq {}", r.seq))?;
            applied += 1;
        }
    }
    Ok((applied, cursor.position()))
}
