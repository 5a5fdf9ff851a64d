//! `tern enable`: its arguments (disks, cache, target, journal size and
//! policy) turned into an [`tern_driver::vm::EnableSpec`], and what it
//! prints about the initial sync to come.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use tern_driver::units::{Rate, Size};
use tern_driver::vm::{self, EnableSpec, InitialSync, JournalConfig, Policy};

use super::Cli;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The VM's name (letters, digits, '.', '_', '-').
    pub vm: String,
    /// A disk to protect, as NAME=PATH (a raw image file or a block
    /// device). Repeat for each disk; NAME becomes its NBD export name.
    #[arg(long = "disk", value_name = "NAME=PATH", required = true, value_parser = crate::cmd::parse_onto)]
    pub disks: Vec<(String, PathBuf)>,
    /// The cache store segments are shipped to: a directory,
    /// s3://BUCKET/PREFIX (credentials and endpoint from AWS_*), or
    /// az://CONTAINER/PREFIX (from AZURE_STORAGE_*).
    #[arg(long)]
    pub cache: PathBuf,
    /// The target site directory replicas and recovery points live in.
    #[arg(long)]
    pub target: PathBuf,
    /// Time between crash-consistent recovery points (at least 10s).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// How long recovery points are kept.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub retention: Duration,
    /// Size of the journal ring (e.g. 256MiB, 1GiB). When it is full, writes
    /// go on and are tracked in the dirty bitmaps instead.
    #[arg(long, default_value = "1GiB")]
    pub journal_size: Size,
    /// Bytes of disk one dirty-bitmap bit stands for.
    #[arg(long, default_value = "64KiB")]
    pub region_size: Size,
    /// The most `tern ship` may send to the cache store, in bytes per
    /// second of segments as stored (e.g. 50MB/s, 100Mbit/s): kept in the
    /// VM's policy; `tern ship --max-rate` overrides it. Default: no limit.
    #[arg(long, value_name = "RATE")]
    pub max_rate: Option<Rate>,
    /// `tern ship` cuts a segment at this many bytes of writes (4KiB to
    /// 64MiB; at most a quarter of the journal). Larger segments make
    /// fewer requests: worth it across a WAN to an object store, where each
    /// one costs round trips (32MiB there).
    #[arg(long, default_value = "8MiB")]
    pub segment_size: Size,
    /// zstd compression of the segments: a level (-7 to 22; negative levels
    /// are zstd's fast ones), or MIN..MAX to let the level follow the
    /// bottleneck between them: lower while the CPU holds the shipper
    /// back, higher while the link does (e.g. -5..9). Default: 1.
    #[arg(long, value_name = "LEVEL|MIN..MAX", value_parser = parse_compression, allow_hyphen_values = true)]
    pub compression: Option<(i32, Option<(i32, i32)>)>,
    /// A copy of a disk already at the target site to start its replica
    /// from, as NAME=PATH (absolute at the target, or relative to
    /// `<target>/<vm>/`): a copy carried there by other means (a shipped
    /// drive, an earlier rsync). The first sync then compares block hashes
    /// and sends only the regions that differ; `tern apply` must run at the
    /// target to answer. Repeat per disk; a disk without one starts empty.
    #[arg(long = "seed", value_name = "NAME=PATH", value_parser = crate::cmd::parse_onto)]
    pub seeds: Vec<(String, PathBuf)>,
    /// The VM's memory when a failover starts it (its launch.sh).
    #[arg(long, default_value = "2GiB")]
    pub memory: Size,
    /// Its virtual CPUs when a failover starts it.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// A NIC of the VM, as BRIDGE[,mac=MAC][,model=MODEL]: the bridge it
    /// is on here, its MAC address (kept across a failover; default: a
    /// stable one made from the VM's id), the qemu model (default
    /// virtio-net-pci). Repeat per NIC, in the guest's order.
    #[arg(long = "nic", value_name = "BRIDGE[,mac=MAC][,model=M]", value_parser = tern_driver::launch::parse_nic)]
    pub nics: Vec<tern_driver::vm::NicConfig>,
    /// The network map, as SOURCE=TARGET: a real failover puts the NICs on
    /// bridge SOURCE on bridge TARGET at the target site (a NIC whose
    /// bridge is not mapped stays on a bridge of the same name). Repeat
    /// per bridge.
    #[arg(long = "network", value_name = "SOURCE=TARGET", value_parser = parse_network)]
    pub network: Vec<(String, String)>,
    /// Direct kernel boot of the failed-over VM: the kernel (a path at the
    /// target site).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// With --kernel: its initrd (a path at the target site).
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// With --kernel: its command line.
    #[arg(long, requires = "kernel", allow_hyphen_values = true)]
    pub append: Option<String>,
    /// Create the cache store directory if it does not exist (otherwise a
    /// missing one is refused: a typo would replicate nowhere).
    #[arg(long)]
    pub create: bool,
    /// Freeze the guest's filesystems for every app point through its
    /// qemu guest agent: qga:SOCKET, the host side of the VM's channel
    /// (`-chardev socket,path=SOCKET,server=on,wait=off,id=qga0 -device
    /// virtio-serial -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0`).
    #[arg(long, value_name = "qga:SOCKET")]
    pub freeze: Option<String>,
    /// How long a freeze may take before the point is taken
    /// crash-consistent instead, and the guest thawed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub freeze_timeout: Duration,
    /// `tern serve` takes an app point (labelled `scheduled`, frozen with
    /// --freeze) this often. Default: none.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub app_interval: Option<Duration>,
}

/// `--compression 3`: a fixed level; `--compression -5..9`: adaptive
/// between the two, starting at level 1 (or the nearer end).
fn parse_compression(s: &str) -> Result<(i32, Option<(i32, i32)>), String> {
    let level = |t: &str| {
        t.trim().parse::<i32>().map_err(|_| format!("{s:?}: expected a zstd level like 3, or MIN..MAX like -5..9"))
    };
    match s.split_once("..") {
        None => Ok((level(s)?, None)),
        Some((min, max)) => {
            let (min, max) = (level(min)?, level(max)?);
            Ok((1.clamp(min, max.max(min)), Some((min, max))))
        }
    }
}

/// `--network br0=br-dr`: both bridge names checked.
fn parse_network(s: &str) -> Result<(String, String), String> {
    let (source, target) =
        s.split_once('=').ok_or_else(|| format!("{s:?}: expected SOURCE=TARGET bridges, as in br0=br-dr"))?;
    tern_driver::launch::validate_bridge(source)?;
    tern_driver::launch::validate_bridge(target)?;
    Ok((source.to_owned(), target.to_owned()))
}

/// The launch settings and the network map the arguments give.
fn launch_settings(a: &Args) -> Result<(vm::LaunchConfig, BTreeMap<String, String>)> {
    let mut network = BTreeMap::new();
    for (source, target) in &a.network {
        if let Some(other) = network.insert(source.clone(), target.clone()) {
            anyhow::bail!(
                "cannot enable VM '{}': --network maps bridge '{source}' twice (to '{other}' and to '{target}'): give one",
                a.vm
            );
        }
    }
    let launch = vm::LaunchConfig {
        memory: a.memory,
        cpus: a.cpus,
        kernel: a.kernel.clone(),
        initrd: a.initrd.clone(),
        append: a.append.clone(),
        nics: a.nics.clone(),
    };
    // Before anything is created (the cache store with --create).
    launch.validate(&network).map_err(|e| anyhow::anyhow!("cannot enable VM '{}': {e}", a.vm))?;
    Ok((launch, network))
}

pub fn run(cli: &Cli, a: &Args) -> Result<()> {
    // Memory the rings of VMs removed by hand still hold is freed first.
    tern_driver::journal::live::sweep_orphans(vm::VmPaths::new(&cli.state, &a.vm)?.ring_dir());
    if vm::is_store_url(&a.cache) {
        // A missing bucket or refused credentials fail here, not in a
        // shipper's retry loop later.
        let store = crate::cache::open_store(&a.cache)?;
        store.check().with_context(|| format!("cannot enable VM '{}'", a.vm))?;
    } else if !a.cache.is_dir() {
        if a.create {
            std::fs::create_dir_all(&a.cache)
                .with_context(|| format!("cannot create the cache store {}", a.cache.display()))?;
            log::info!("created the cache store {}", a.cache.display());
        } else {
            anyhow::bail!(
                "cannot enable VM '{}': the cache store {} does not exist or is not a directory; mount or create it, or pass --create",
                a.vm,
                a.cache.display()
            );
        }
    }
    if let Some(key) = &cli.key {
        tern_store::seal::Key::load(key).with_context(|| format!("cannot enable VM '{}' sealed", a.vm))?;
    }
    let (launch, network) = launch_settings(a)?;
    let spec = EnableSpec {
        name: a.vm.clone(),
        disks: a.disks.clone(),
        cache: a.cache.clone(),
        key: cli.key.clone(),
        target: a.target.clone(),
        journal: JournalConfig { size: a.journal_size, region_size: a.region_size },
        policy: Policy {
            interval: a.interval,
            retention: a.retention,
            max_rate: a.max_rate,
            segment_size: a.segment_size,
            compression_level: a.compression.map_or(1, |c| c.0),
            compression_min: a.compression.and_then(|c| c.1).map(|r| r.0),
            compression_max: a.compression.and_then(|c| c.1).map(|r| r.1),
            network,
            ..Policy::default()
        },
        app_points: vm::AppPoints {
            freeze: a.freeze.clone(),
            freeze_timeout: a.freeze_timeout,
            interval: a.app_interval,
        },
        launch,
        initial_sync: if a.seeds.is_empty() {
            InitialSync::Allocated
        } else {
            InitialSync::Compare { seeds: a.seeds.iter().cloned().collect() }
        },
    };
    let done = vm::enable(&cli.state, &spec).with_context(|| format!("cannot enable VM '{}'", a.vm))?;
    let total: u64 = done.initial_sync_bytes.iter().sum();
    let initial_sync = if a.seeds.is_empty() {
        format!("{} of allocated data marked for the initial sync", Size(total))
    } else {
        format!(
            "the replicas at {} start from the seeds ({}) and only the regions that differ are sent: run `tern apply` there to answer the hash comparison",
            done.config.target.display(),
            a.seeds.iter().map(|(d, p)| format!("{d}={}", p.display())).collect::<Vec<_>>().join(", ")
        )
    };
    log::info!(
        "VM '{}' enabled (id {}): {} disk(s), journal {}; {initial_sync}",
        done.config.name,
        done.config.id,
        done.config.disks.len(),
        done.config.journal.size
    );
    println!(
        "enabled {}: next, start `tern serve {}` and point the VM at {}",
        done.config.name,
        done.config.name,
        vm::VmPaths::new(&cli.state, &done.config.name)?.nbd_socket().display()
    );
    Ok(())
}
