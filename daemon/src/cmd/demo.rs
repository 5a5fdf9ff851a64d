//! `tern demo`: the story so far, end to end, in a temporary directory with
//! nothing but this binary. It protects a disk, serves it over NBD, writes
//! through a real NBD connection, and proves the journal is an exact history
//! of the disk by rebuilding it from the journal alone.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use tern_driver::image::Image;
use tern_driver::journal::{Journal, Position};
use tern_driver::units::Size;
use tern_driver::vm::{self, EnableSpec, JournalConfig, Policy, VmPaths};
use tern_driver::{Mirror, MirrorOptions};
use tern_nbd::client::Client;
use tern_nbd::{Listen, Server, ServerOptions};

use crate::Cli;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Work in this directory (it must not exist) instead of a temporary
    /// one, and keep it afterwards.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Size of the demo disk.
    #[arg(long, default_value = "256MiB")]
    pub disk_size: Size,
    /// Write requests the workload sends.
    #[arg(long, default_value_t = 4000)]
    pub writes: u32,
}

pub fn run(_cli: &Cli, a: &Args) -> Result<()> {
    let (tmp, dir) = match &a.dir {
        Some(d) => {
            if d.exists() {
                bail!("{} exists; give --dir a new path (the demo creates it)", d.display());
            }
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            (None, d.clone())
        }
        None => {
            let t =
                tempfile::Builder::new().prefix("tern-demo-").tempdir().context("cannot make a temporary directory")?;
            let p = t.path().to_owned();
            (Some(t), p)
        }
    };
    let size = a.disk_size.bytes();
    println!("tern demo in {}", dir.display());

    // 1. A VM disk with some data on it, and a copy of it as it was then.
    let image = dir.join("vm1-disk0.img");
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    {
        let f = std::fs::File::create(&image).with_context(|| format!("cannot create {}", image.display()))?;
        f.set_len(size)?;
        let mut chunk = vec![0u8; 1 << 20];
        for i in 0..(size >> 20).min(16) {
            rng.fill(&mut chunk[..]);
            std::os::unix::fs::FileExt::write_all_at(&f, &chunk, i << 20)?;
        }
    }
    let original = dir.join("vm1-disk0.at-enable.img");
    std::fs::copy(&image, &original)?;
    println!("[1/4] made a {} disk image with 16 MiB of data: {}", a.disk_size, image.display());

    // 2. Protect it.
    let state = dir.join("state");
    let enabled = vm::enable(
        &state,
        &EnableSpec {
            name: "vm1".into(),
            disks: vec![("disk0".into(), image.clone())],
            cache: dir.join("cache"),
            target: dir.join("target"),
            journal: JournalConfig { size: Size::mib(512), ..Default::default() },
            policy: Policy::default(),
        },
    )?;
    println!(
        "[2/4] tern enable vm1: journal {}, {} marked for the initial sync",
        enabled.config.journal.size,
        Size(enabled.initial_sync_bytes.iter().sum())
    );

    // 3. Serve it over NBD and write through a real connection.
    let paths = VmPaths::new(&state, "vm1")?;
    let mirror = Arc::new(Mirror::open(&paths, MirrorOptions::default())?);
    let server = Arc::new(Server::new(Arc::clone(&mirror), ServerOptions::default()));
    let socket = paths.nbd_socket();
    let listener = Server::bind(&Listen::Unix(socket.clone()))?;
    {
        let server = Arc::clone(&server);
        std::thread::spawn(move || server.accept_loop(listener));
    }
    let mut client = Client::connect(&socket, "disk0").context("cannot connect to the demo's NBD server")?;
    let started = Instant::now();
    let (mut bytes, mut zeroes, mut trims) = (0u64, 0, 0);
    let mut block = vec![0u8; 256 << 10];
    for i in 0..a.writes {
        let len = rng.gen_range(1..=64u32) * 4096;
        let offset = rng.gen_range(0..(size - len as u64) / 4096) * 4096;
        match i % 20 {
            0 => {
                client.zero(offset, len)?;
                zeroes += 1;
            }
            1 => {
                client.trim(offset, len)?;
                trims += 1;
            }
            _ => {
                rng.fill(&mut block[..len as usize]);
                client.write(offset, &block[..len as usize])?;
                bytes += len as u64;
            }
        }
    }
    client.flush()?;
    let secs = started.elapsed().as_secs_f64();
    client.disconnect()?;
    server.disconnect_all();
    mirror.shutdown()?;
    println!(
        "[3/4] tern serve vm1: {} writes ({}), {zeroes} zeroes, {trims} trims and a flush over NBD in {secs:.2}s ({:.0} MiB/s, one request at a time)",
        a.writes - zeroes - trims,
        Size(bytes).approx(),
        bytes as f64 / secs / (1 << 20) as f64
    );

    // 4. The journal alone rebuilds the disk from its state at enable.
    let journal = Journal::open(&paths.journal())?;
    let copies = vec![Some(Image::open(&original)?)];
    let (records, end) = crate::cmd::journal::replay(&journal, Position { pos: 0, seq: 1 }, &copies)?;
    let same = std::fs::read(&image)? == std::fs::read(&original)?;
    println!(
        "[4/4] journal replay: {records} records (seq 1..{}) applied to the disk as it was at enable: {}",
        end.seq - 1,
        if same { "identical to the source disk, byte for byte" } else { "DIFFERENT from the source disk" }
    );
    println!();
    println!("Not in this build yet: shipping to the cache (tern ship), replicas and recovery points (tern apply),");
    println!("failover and verify. Those steps join this demo as they land.");
    if let Some(t) = tmp {
        drop(t);
    } else {
        println!("kept {}", dir.display());
    }
    if !same {
        bail!("the journal does not reproduce the source disk");
    }
    Ok(())
}
