//! `tern demo`: the story end to end, in a temporary directory with nothing
//! but this binary. It protects a disk, serves it over NBD, writes through
//! a real NBD connection with an app-consistent tag halfway while the
//! shipper and the applier run beside it (sampling the RPO), takes
//! recovery points, test-fails over from the tag's point, and checks the
//! replica and that point against the source, byte for byte.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use tern_driver::units::Size;
use tern_driver::vm::{self, EnableSpec, InitialSync, JournalConfig, Policy, VmPaths};
use tern_driver::{Mirror, MirrorOptions};
use tern_nbd::client::Client;
use tern_nbd::{Listen, Server, ServerOptions};

use super::Cli;

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
    let paths = VmPaths::new(&state, "vm1")?;
    let enabled = vm::enable_at(
        &paths,
        &EnableSpec {
            name: "vm1".into(),
            disks: vec![("disk0".into(), image.clone())],
            cache: dir.join("cache"),
            key: None,
            target: dir.join("target"),
            journal: JournalConfig { size: Size::mib(512), ..Default::default() },
            policy: Policy::default(),
            app_points: Default::default(),
            launch: Default::default(),
            initial_sync: InitialSync::Allocated,
        },
    )?;
    println!(
        "[2/7] tern enable vm1: journal {}, {} marked for the initial sync",
        enabled.config.journal.size,
        Size(enabled.initial_sync_bytes.iter().sum())
    );

    // The journal's live ring is in memory, outside the demo's directory:
    // a demo that removes its directory removes the ring too (also when
    // it fails half-way).
    let ring = tmp.is_some().then(|| RetireJournalOnDrop(paths.journal()));

    // 3. Serve it over NBD and write through a real connection.
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
    // Ship and apply run beside the workload, as their services would; a
    // sampler watches the RPO `tern status` reports.
    let cache_root = dir.join("cache");
    let cache_store = tern_store::object::Store::dir(&cache_root);
    let target_root = dir.join("target");
    let stop_ship = Arc::new(AtomicBool::new(false));
    let shipper = {
        let (paths, stop) = (paths.clone(), Arc::clone(&stop_ship));
        let options = crate::ship::ShipOptions {
            once: false,
            workers: 2,
            checksum_timeout: Duration::from_secs(60),
            max_rate: None,
        };
        std::thread::spawn(move || crate::ship::run(&paths, &options, stop))
    };
    let stop_apply = Arc::new(AtomicBool::new(false));
    let applier = {
        let (cache, target, stop) = (cache_store.clone(), target_root.clone(), Arc::clone(&stop_apply));
        let options = crate::apply::ApplyOptions::default();
        std::thread::spawn(move || crate::apply::run(&cache, &target, Some("vm1"), &options, stop))
    };
    let stop_sampler = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (paths, config, stop) = (paths.clone(), enabled.config.clone(), Arc::clone(&stop_sampler));
        std::thread::spawn(move || {
            let mut rpos = Vec::new();
            while !stop.load(Ordering::Acquire) {
                if let Ok(s) = crate::status::vm_status(&paths, &config, crate::status::Shipper::FromFiles) {
                    rpos.extend(s.rpo_seconds);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            rpos
        })
    };
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

    // 4. Stop the shipper (it finishes its segment) and catch up with
    //    whatever it left, as `tern ship --once` would.
    stop_ship.store(true, Ordering::Release);
    let stats = shipper.join().map_err(|_| anyhow::anyhow!("the shipper thread panicked"))??;
    let options =
        crate::ship::ShipOptions { once: true, workers: 2, checksum_timeout: Duration::from_secs(60), max_rate: None };
    let last = crate::ship::run(&paths, &options, Arc::new(AtomicBool::new(false)))?;
    let journal = paths.open_journal()?;
    let (r, l) = (stats.report(&journal), last.report(&journal));
    println!(
        "[4/7] tern ship vm1, beside the workload: the initial sync and every write, {} records in {} segments, {} compressed to {} (ratio {:.2}), lag p50 {:.0} ms, p99 {:.0} ms",
        r.records_shipped + l.records_shipped,
        r.segments_shipped + l.segments_shipped,
        Size(r.bytes_in + l.bytes_in).approx(),
        Size(r.bytes_out + l.bytes_out).approx(),
        (r.bytes_in + l.bytes_in) as f64 / (r.bytes_out + l.bytes_out).max(1) as f64,
        r.lag_p50_ms,
        r.lag_p99_ms
    );

    // 5. The target site: the applier ran beside the workload too; let it
    //    finish what the cache holds.
    stop_apply.store(true, Ordering::Release);
    applier.join().map_err(|_| anyhow::anyhow!("the applier thread panicked"))??;
    let options = crate::apply::ApplyOptions { once: true, ..Default::default() };
    crate::apply::run(&cache_store, &target_root, Some("vm1"), &options, Arc::new(AtomicBool::new(false)))?;
    stop_sampler.store(true, Ordering::Release);
    let rpos = sampler.join().map_err(|_| anyhow::anyhow!("the sampler thread panicked"))?;
    let rpo_now = crate::status::vm_status(&paths, &enabled.config, crate::status::Shipper::FromFiles)?
        .rpo_seconds
        .unwrap_or(f64::NAN);
    let target = tern_store::target::TargetDir::new(&target_root, "vm1");
    let points = target.list_points()?;
    println!(
        "[5/7] tern apply, beside the workload: replica {} and {} recovery point(s) ({}); RPO seen while writing: max {:.1}s over {} samples; now {:.1}s",
        target.replica_path("disk0").display(),
        points.len(),
        points.iter().map(|p| format!("{} {} at seq {}", p.kind.name(), p.id, p.seq)).collect::<Vec<_>>().join(", "),
        rpos.iter().copied().fold(0.0, f64::max),
        rpos.len(),
        rpo_now
    );

    // 6. A test failover from the app point: its disk is the source as it
    //    was at the tag, and replication is untouched.
    let app = points.iter().find(|p| p.kind == tern_store::target::PointKind::App);
    let verdict = |ok: bool| if ok { "identical, byte for byte" } else { "DIFFERENT" };
    let (failover_same, failover_line) = match app {
        Some(p) => {
            let started = Instant::now();
            let f = crate::failover::make_failover(
                &dir.join("target"),
                &cache_store,
                "vm1",
                &crate::failover::Choice::Point(p.id.clone()),
                Some("drill"),
                true,
                &Default::default(),
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
    let replica_dir = target.replica_dir();
    let differing: u64 = crate::verify::compare(&sources, &replica_dir, 64 << 10)?
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
    println!("Next, by hand: a real failover (`tern failover`, which fences the source), `tern commit`, `tern reprotect` and `tern failback` (see the README).");
    if let Some(t) = tmp {
        drop(ring);
        drop(t);
    } else {
        println!("kept {}", dir.display());
    }
    if !same {
        bail!("the replica or the test failover's disk does not match the source");
    }
    Ok(())
}

/// Retires a journal (its live ring in memory, its link and file) when
/// dropped, before the directory that holds it goes.
struct RetireJournalOnDrop(std::path::PathBuf);

impl Drop for RetireJournalOnDrop {
    fn drop(&mut self) {
        if let Err(e) = tern_driver::journal::live::retire(&self.0) {
            log::warn!("cannot retire the demo journal: {e}");
        }
    }
}
