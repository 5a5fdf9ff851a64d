//! `tern demo`: the story so far, end to end, in a temporary directory with
//! nothing but this binary. It protects a disk, serves it over NBD, writes
//! through a real NBD connection with an app-consistent tag halfway, ships
//! the journal to the cache store, applies it at the target site with
//! recovery points, and checks the replica and the tag's point against the
//! source, byte for byte.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use tern_driver::journal::Journal;
use tern_driver::units::Size;
use tern_driver::vm::{self, EnableSpec, InitialSync, JournalConfig, Policy, VmPaths};
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

    // 1. A VM disk with some data on it.
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
    println!("[1/7] made a {} disk image with 16 MiB of data: {}", a.disk_size, image.display());

    // 2. Protect it. The cache store and the target site are directories
    //    here; in production, mounts or shares.
    let state = dir.join("state");
    for site in ["cache", "target"] {
        std::fs::create_dir(dir.join(site)).with_context(|| format!("cannot create {}", dir.join(site).display()))?;
    }
    let enabled = vm::enable(
        &state,
        &EnableSpec {
            name: "vm1".into(),
            disks: vec![("disk0".into(), image.clone())],
            cache: dir.join("cache"),
            target: dir.join("target"),
            journal: JournalConfig { size: Size::mib(512), ..Default::default() },
            policy: Policy::default(),
            initial_sync: InitialSync::Allocated,
        },
    )?;
    println!(
        "[2/7] tern enable vm1: journal {}, {} marked for the initial sync",
        enabled.config.journal.size,
        Size(enabled.initial_sync_bytes.iter().sum())
    );

    // 3. Serve it over NBD and write through a real connection.
    let paths = VmPaths::new(&state, "vm1")?;
    let mirror = Arc::new(Mirror::open(&paths, MirrorOptions::default())?);
    // The initial sync, as `tern serve`'s background resync does it: the
    // 16 MiB of data go into the journal as resync records, and the window
    // closes before the workload starts.
    while mirror.resync_step(64 << 20)? != tern_driver::ResyncStep::Idle {}
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
    let at_tag = dir.join("vm1-disk0.at-tag.img");
    for i in 0..a.writes {
        if i == a.writes / 2 {
            // Halfway, an app-consistent marker (the client sends one
            // request at a time, so nothing is in flight): keep a copy of
            // the source as it is now, to check the point against.
            client.flush()?;
            mirror.tag("halfway")?.context("the journal took no tag (full)")?;
            std::fs::copy(&image, &at_tag)?;
        }
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
                // Half random, half zero: about as compressible as VM data.
                let half = len as usize / 2;
                rng.fill(&mut block[..half]);
                block[half..len as usize].fill(0);
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
        "[3/7] tern serve vm1: {} writes ({}), {zeroes} zeroes, {trims} trims, a tag 'halfway' and a flush over NBD in {secs:.2}s ({:.0} MiB/s, one request at a time)",
        a.writes - zeroes - trims,
        Size(bytes).approx(),
        bytes as f64 / secs / (1 << 20) as f64
    );

    // 4. Ship: the initial sync and every write, as segments in the cache.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let options =
        crate::ship::ShipOptions { once: true, workers: 2, checksum_timeout: std::time::Duration::from_secs(60) };
    let started = Instant::now();
    let stats = crate::ship::run(&paths, &options, stop)?;
    let r = stats.report(&Journal::open(&paths.journal())?);
    println!(
        "[4/7] tern ship vm1 --once: the initial sync and every write, {} records in {} segments, {} compressed to {} (ratio {:.2}) in {:.2}s",
        r.records_shipped,
        r.segments_shipped,
        Size(r.bytes_in).approx(),
        Size(r.bytes_out).approx(),
        r.compression_ratio,
        started.elapsed().as_secs_f64()
    );

    // 5. The target site: replicas and recovery points.
    let started = Instant::now();
    let options = crate::apply::ApplyOptions { once: true, keep_segments: false };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    crate::apply::run(&dir.join("cache"), &dir.join("target"), Some("vm1"), &options, stop)?;
    let target = tern_store::target::TargetDir::new(&dir.join("target"), "vm1");
    let points = target.list_points()?;
    println!(
        "[5/7] tern apply --once: replica {} and {} recovery point(s) ({}) in {:.2}s",
        target.replica_path("disk0").display(),
        points.len(),
        points.iter().map(|p| format!("{} {} at seq {}", p.kind.name(), p.id, p.seq)).collect::<Vec<_>>().join(", "),
        started.elapsed().as_secs_f64()
    );

    // 6. A test failover from the app point: its disk is the source as it
    //    was at the tag, and replication is untouched.
    let app = points.iter().find(|p| p.kind == tern_store::target::PointKind::App);
    let verdict = |ok: bool| if ok { "identical, byte for byte" } else { "DIFFERENT" };
    let (failover_same, failover_line) = match app {
        Some(p) => {
            let started = Instant::now();
            let f = crate::cmd::failover::make_failover(
                &dir.join("target"),
                &dir.join("cache"),
                "vm1",
                Some(&p.id),
                Some("drill"),
                true,
            )?;
            let disk = &f.disks[0].1;
            let same = std::fs::read(disk)? == std::fs::read(&at_tag)?;
            let line = format!(
                "[6/7] tern failover vm1 --test --point {}: disk ready in {:.0?} ({}) at {}; vs the source at the tag: {}",
                p.id,
                started.elapsed(),
                if f.copied { "copied: this filesystem cannot reflink" } else { "reflink" },
                disk.display(),
                verdict(same)
            );
            (same, line)
        }
        None => (false, "[6/7] no app-consistent point was taken at the tag: no test failover".to_string()),
    };
    println!("{failover_line}");

    // 7. Verify: the replica against the source, region by region.
    let sources = vec![("disk0".to_string(), image.clone())];
    let replica_dir = target.replica_path("disk0").parent().map(std::path::Path::to_path_buf).unwrap_or_default();
    let differing: u64 = crate::cmd::verify::compare(&sources, &replica_dir, 64 << 10)?
        .iter()
        .flat_map(|(_, ranges)| ranges.iter().map(|(s, e)| e - s))
        .sum();
    let replica_same = differing == 0;
    println!(
        "[7/7] tern verify vm1: replica vs source disk: {}",
        if replica_same { "identical".to_string() } else { format!("{} DIFFER", Size(differing).approx()) }
    );
    let same = replica_same && failover_same;
    println!();
    println!("Not in this build yet: a real failover (fencing), commit, re-protect and failback.");
    if let Some(t) = tmp {
        drop(t);
    } else {
        println!("kept {}", dir.display());
    }
    if !same {
        bail!("the replica or the test failover's disk does not match the source");
    }
    Ok(())
}
