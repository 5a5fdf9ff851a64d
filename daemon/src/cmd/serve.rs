//! `tern serve`: the NBD front-end of a VM — its socket and permissions,
//! the mirror it serves, the resync thread, and the watch that fences the
//! mirror once the VM failed over at the target site.

use std::sync::Arc;

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};
use tern_driver::vm::VmPaths;
use tern_driver::{Mirror, MirrorOptions};
use tern_nbd::{Listen, Server, ServerOptions};
use tern_store::cache::{CacheDir, PLANNED_FAILOVER};

use super::Cli;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The VM whose disks to serve.
    pub vm: String,
    /// Where to listen: unix:PATH, tcp:HOST:PORT, tcp:PORT (loopback) or
    /// stdio (one connection). Repeatable. Default: unix:<state>/<vm>/nbd.sock.
    #[arg(long)]
    pub listen: Vec<Listen>,
    /// Present the disks as kernel block devices, /dev/ublkbN, through the
    /// kernel's ublk driver (Linux 6.0 or later, `modprobe ublk_drv`),
    /// instead of NBD (which it serves too if --listen is given). A `tern
    /// serve --ublk` that dies leaves the devices in place with the VM's
    /// I/O held; the next one re-attaches to them.
    #[arg(long)]
    pub ublk: bool,
    /// Do not journal writes: every region of every disk is marked for
    /// resync instead, so replication falls back to a full resync. Only to
    /// measure what journaling costs.
    #[arg(long)]
    pub no_journal: bool,
    /// Request threads busy at once, shared out among the connections with
    /// requests coming (rounded down, at least one each; a connection with
    /// no new request for 100 ms counts for nothing until its next one;
    /// each keeps this many, parked past its share). Default: one per CPU,
    /// at least 2, at most 64. What waits on the disk (a FLUSH, a READ not
    /// in the page cache, a FUA write's sync) is carried out by 16 more
    /// threads per connection, not these.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Requests that may change one disk image at once (writes, zeroes,
    /// trims; reads are not limited). Default: twice the CPUs.
    #[arg(long)]
    pub image_writers: Option<usize>,
    /// Give the Unix sockets to this group (a hypervisor running as its own
    /// user, such as libvirt's qemu, connects through it).
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// The Unix sockets' permissions, in octal: connecting needs write
    /// permission (0660 lets --socket-group in).
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode)]
    pub socket_mode: u32,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not a file mode: give octal digits, such as 0660"))
}

/// Sets a Unix socket's group and mode as asked (`--socket-group`,
/// `--socket-mode`).
fn set_socket_access(path: &std::path::Path, group: Option<&str>, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(name) = group {
        let group = nix::unistd::Group::from_name(name)
            .with_context(|| format!("cannot look up group '{name}'"))?
            .with_context(|| format!("no group named '{name}' (--socket-group)"))?;
        nix::unistd::chown(path, None, Some(group.gid))
            .with_context(|| format!("cannot give {} to group '{name}'", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {} to {mode:o}", path.display()))
}

pub fn run(cli: &Cli, a: &Args) -> Result<()> {
    let paths = VmPaths::new(&cli.state, &a.vm)?;
    // Rings of VMs whose state directory was removed by hand hold memory
    // until reboot: free them.
    tern_driver::journal::live::sweep_orphans(paths.ring_dir());
    let config = paths.load_config()?;
    let cache = crate::cache::for_source(&config)?;
    if cache.exists(PLANNED_FAILOVER).unwrap_or(false) {
        anyhow::bail!(
            "a planned failover of VM '{}' is under way (its request is in {}): this site serves it no more; wait for it to finish, or remove that file to call it off",
            a.vm,
            cache.location(PLANNED_FAILOVER)
        );
    }
    if let Some(reason) = fence_of(&cache) {
        anyhow::bail!(
            "VM '{}' is fenced: {reason}. Anything written here would be lost, so this site serves it no more: the VM runs at the target site now; re-protect it there to replicate it back, then `tern failback {}` here",
            a.vm,
            a.vm
        );
    }
    // After the fence: a failback writes this marker before it retires
    // the fence with the old stream, so a serve that found no fence finds
    // the marker of a failback under way or interrupted.
    if let Ok(marker) = std::fs::read_to_string(paths.failing_back()) {
        anyhow::bail!(
            "VM '{}' is failing back, and that was interrupted or is under way ({}: {}): its disks hold (or are getting) the failover site's point and this direction is retired; run that `tern failback` again to finish, then serve the VM",
            a.vm,
            paths.failing_back().display(),
            marker.trim()
        );
    }
    let mirror = Arc::new(
        open_waiting(
            &paths,
            MirrorOptions {
                journal: !a.no_journal,
                image_writers: a.image_writers.unwrap_or_else(MirrorOptions::default_image_writers),
            },
        )
        .with_context(|| format!("cannot serve VM '{}'", a.vm))?,
    );
    if a.no_journal {
        log::warn!("journaling is OFF (--no-journal): every region of VM '{}' is marked for a full resync", a.vm);
    }
    let threads = a.threads.unwrap_or_else(ServerOptions::default_threads).clamp(1, 256);
    let options = ServerOptions { threads, ..Default::default() };
    let server = Arc::new(Server::new(Arc::clone(&mirror), options));
    // NBD unless only ublk was asked for; both at once serve the same
    // disks through the same mirror and journal.
    let listen = match (a.listen.is_empty(), a.ublk) {
        (false, _) => a.listen.clone(),
        (true, false) => vec![Listen::Unix(paths.nbd_socket())],
        (true, true) => Vec::new(),
    };

    if listen.contains(&Listen::Stdio) {
        server.serve_stdio();
        return mirror.shutdown().context("clean shutdown failed");
    }

    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).context("cannot install signal handlers")?;
    let mut listeners = Vec::new();
    for l in &listen {
        let listener = Server::bind(l).with_context(|| format!("cannot listen on {l}"))?;
        listeners.push(listener);
    }
    let devices = if a.ublk { Some(start_ublk(&paths, &mirror)?) } else { None };
    let mut serving: Vec<String> = devices
        .as_ref()
        .map(|d| d.ids().iter().map(|&id| tern_driver::ublk::device_path(id).display().to_string()).collect())
        .unwrap_or_default();
    if !listen.is_empty() {
        let exports: Vec<String> = (0..mirror.disk_count())
            .map(|i| format!("{} ({} bytes)", mirror.disk_name(i), mirror.disk_size(i)))
            .collect();
        let addresses: Vec<String> = listen.iter().map(ToString::to_string).collect();
        log::info!("serving VM '{}' on {}: exports {}", a.vm, addresses.join(", "), exports.join(", "));
        serving.extend(addresses);
    }
    // Hand the bound listeners to accept threads, keeping the socket paths
    // to remove at exit.
    let mut sockets = Vec::new();
    for listener in listeners {
        if let Some(p) = tern_nbd::server::socket_path(&listener) {
            set_socket_access(p, a.socket_group.as_deref(), a.socket_mode)?;
            sockets.push(p.to_owned());
        }
        let server = Arc::clone(&server);
        std::thread::Builder::new().name("nbd-accept".into()).spawn(move || server.accept_loop(listener))?;
    }

    let resync = start_background(&mirror, cache)?;
    let app_points = start_app_points(&paths, &mirror)?;
    crate::notify::ready(&format!("serving VM '{}' on {}", a.vm, serving.join(", ")));

    let signal = signals.forever().next();
    log::info!("signal {signal:?}: stopping; finishing the requests in flight");
    crate::notify::stopping(&format!("stopping VM '{}': finishing the requests in flight", a.vm));
    if let Some(devices) = devices {
        log::info!("removing the ublk devices of VM '{}'", a.vm);
        devices.remove();
        let _ = std::fs::remove_file(ublk_record(&paths));
    }
    // A freeze under way is thawed before the front-end goes.
    if let Some((stop, thread)) = app_points {
        stop.store(true, std::sync::atomic::Ordering::Release);
        let _ = thread.join();
    }
    server.disconnect_all();
    let result = mirror.shutdown().context("clean shutdown failed");
    for s in sockets {
        let _ = std::fs::remove_file(s);
    }
    let _ = resync.join();
    result
}

/// What runs beside the front-ends: the resync thread (returned, to be
/// joined after the mirror's shutdown; it pings systemd's watchdog) and
/// the watch that fences the mirror once the VM failed over.
fn start_background(mirror: &Arc<Mirror>, cache: CacheDir) -> Result<std::thread::JoinHandle<()>> {
    let resync = {
        let mirror = Arc::clone(mirror);
        std::thread::Builder::new().name("resync".into()).spawn(move || resync_loop(&mirror))?
    };
    let mirror = Arc::clone(mirror);
    std::thread::Builder::new().name("fence-watch".into()).spawn(move || watch_fence(&mirror, &cache))?;
    Ok(resync)
}

type Stoppable = (Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<()>);

/// The VM's scheduled app points (`[app-points] interval`), frozen as its
/// policy says, on a thread of their own; none without an interval.
fn start_app_points(paths: &VmPaths, mirror: &Arc<Mirror>) -> Result<Option<Stoppable>> {
    let config = mirror.config();
    let Some(interval) = config.app_points.interval else { return Ok(None) };
    let quiescing = crate::freeze::Quiescing::of(config, None, false, None)?;
    log::info!(
        "VM '{}': an app point every {}{}",
        config.name,
        humantime::format_duration(interval),
        match &quiescing {
            crate::freeze::Quiescing::Freeze(agent, _) => format!(", the guest frozen through {agent}"),
            crate::freeze::Quiescing::None => String::new(),
        }
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let thread = {
        let (mirror, stop, paths) = (Arc::clone(mirror), Arc::clone(&stop), paths.clone());
        std::thread::Builder::new()
            .name("app-points".into())
            .spawn(move || app_point_loop(&mirror, &paths, &quiescing, interval, &stop))?
    };
    Ok(Some((stop, thread)))
}

fn app_point_loop(
    mirror: &Mirror,
    paths: &VmPaths,
    quiescing: &crate::freeze::Quiescing,
    interval: std::time::Duration,
    stop: &std::sync::atomic::AtomicBool,
) {
    let vm = &mirror.config().name;
    let mut every = crate::every::Every::starting(std::time::Instant::now() + interval, interval);
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        if !every.due() {
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        // Neither a fenced VM nor a journal with no room gets its guest
        // frozen for a tag that cannot be taken.
        if mirror.fenced().is_some() {
            continue;
        }
        if mirror.journal().overflowed() {
            log::warn!(
                "VM '{vm}': no scheduled app point: the journal is catching up after an overflow; next in {}",
                humantime::format_duration(interval)
            );
            continue;
        }
        match crate::freeze::tag(mirror.journal(), paths, "scheduled", quiescing) {
            Ok(Some(t)) => log::info!(
                "VM '{vm}': scheduled app point at seq {}{}",
                t.seq,
                t.quiesce
                    .as_ref()
                    .map(|q| format!(", {}", crate::freeze::describe(q, t.freeze_answered, t.thawed.as_ref())))
                    .unwrap_or_default()
            ),
            Ok(None) => log::warn!(
                "VM '{vm}': no scheduled app point: the journal is full or catching up after an overflow; next in {}",
                humantime::format_duration(interval)
            ),
            Err(e) => log::error!("VM '{vm}': the scheduled app point failed: {e:#}"),
        }
    }
}

/// The file recording the ublk device of each disk (one id a line), for a
/// restarted `tern serve --ublk` to re-attach to.
fn ublk_record(paths: &VmPaths) -> std::path::PathBuf {
    paths.dir().join("ublk-devices")
}

/// `tern serve --ublk`: the disks as /dev/ublkbN (re-attaching to those a
/// killed `tern serve` left), recorded for the next one.
fn start_ublk(paths: &VmPaths, mirror: &Arc<Mirror>) -> Result<tern_driver::ublk::Devices> {
    // Devices a `tern serve --ublk` that died left behind, held for us.
    let recorded: Vec<Option<i32>> = std::fs::read_to_string(ublk_record(paths))
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().parse().ok().filter(|id| std::path::Path::new(&format!("/dev/ublkc{id}")).exists()))
        .collect();
    let vm = mirror.config().name.clone();
    let devices = tern_driver::ublk::serve(Arc::clone(mirror), &recorded, |disk, id| {
        let how = if recorded.get(disk).copied().flatten() == Some(id) { "re-attached to" } else { "as" };
        log::info!(
            "serving VM '{vm}' disk '{}' {how} {}",
            mirror.disk_name(disk),
            tern_driver::ublk::device_path(id).display()
        );
    })
    .with_context(|| format!("cannot serve VM '{vm}' over ublk"))?;
    let ids: String = devices.ids().iter().map(|id| format!("{id}\n")).collect();
    tern_driver::fs::write_durably(&ublk_record(paths), ids.as_bytes())
        .with_context(|| format!("cannot record the ublk devices in {}", ublk_record(paths).display()))?;
    Ok(devices)
}

/// How often the cache is checked for a fence: a failover stops this
/// site's writes within about this long.
const FENCE_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Why the VM is fenced, if the target site failed it over (its fence is
/// in the cache). A cache that cannot be read tells nothing: not fenced.
fn fence_of(cache: &CacheDir) -> Option<String> {
    match cache.read_fence() {
        Ok(Some(f)) => Some(format!(
            "it failed over at the target site to point {} (seq {}){}",
            f.point,
            f.seq,
            if f.committed { ", committed" } else { "" }
        )),
        Err(e @ tern_store::file::FileError::Damaged { .. }) => {
            Some(format!("its fence in the cache is unreadable ({e})"))
        }
        _ => None,
    }
}

/// Fences the mirror once the cache holds a fence, then logs the writes it
/// refuses (at most every 10 s).
fn watch_fence(mirror: &Mirror, cache: &CacheDir) {
    let vm = &mirror.config().name;
    let mut logged = 0;
    for tick in 0u64.. {
        std::thread::sleep(FENCE_CHECK);
        match mirror.fenced() {
            None => {
                if let Some(reason) = fence_of(cache) {
                    mirror.fence(reason);
                } else if cache.exists(PLANNED_FAILOVER).unwrap_or(false) {
                    // A planned failover: no write after this is acked,
                    // then a clean stop (journal detached), after which
                    // `tern ship` ships the rest and records the stop.
                    mirror.fence("a planned failover to the target site is under way".into());
                    log::warn!(
                        "VM '{}': a planned failover was requested at the target site: stopping (shut the VM down)",
                        vm
                    );
                    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM);
                }
            }
            Some(refused) if refused > logged && tick % 10 == 0 => {
                log::error!(
                    "VM '{}' is fenced: refused {} write(s) so far (the VM sees I/O errors); shut it down here",
                    vm,
                    refused
                );
                logged = refused;
            }
            Some(_) => {}
        }
    }
}

/// Opens the VM, waiting up to 10 s while another process holds it: `tern
/// ship` resyncing offline holds it for at most 2 s at a time.
fn open_waiting(paths: &VmPaths, options: MirrorOptions) -> tern_driver::Result<Mirror> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut logged = false;
    loop {
        match Mirror::open(paths, options) {
            Err(e @ tern_driver::Error::Busy { .. }) if std::time::Instant::now() < deadline => {
                if !logged {
                    log::info!("{e}; waiting for it (up to 10 s)");
                    logged = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Re-sends dirty regions in the background for as long as the VM is
/// served (the initial sync, after an overflow, after a host crash). Paced
/// by the ring: it only works while the ring is less than half full.
fn resync_loop(mirror: &Mirror) {
    use std::time::Duration;
    use tern_driver::ResyncStep;
    loop {
        // The watchdog's pings come from here, not from the fence watch: a
        // store that hangs must not get the VM's front-end restarted, a
        // mirror that does not turn (a wedged lock, the journal) must.
        crate::notify::watchdog();
        match mirror.resync_step(8 << 20) {
            Ok(ResyncStep::Progress { .. }) => {}
            Ok(ResyncStep::Idle) => std::thread::sleep(Duration::from_millis(50)),
            Ok(ResyncStep::WaitingForRoom | ResyncStep::AwaitingChecksum) => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(tern_driver::Error::ShuttingDown) => return,
            Err(e) => {
                log::error!("VM '{}': resync failed: {}; retrying in 5s", mirror.config().name, e.with_causes());
                std::thread::sleep(Duration::from_secs(5));
            }
        }
    }
}
