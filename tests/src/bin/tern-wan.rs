//! `tern-wan`: the helper behind the emulated WAN of the two-site tests and
//! benchmarks (`tern_system_tests::wan`).
//!
//! - `tern-wan delay --ms N`: the delay line. Run inside a site's network
//!   namespace, it takes every packet iptables queues to NFQUEUE 0 and lets
//!   it through N ms later, in order (this kernel has no netem).
//! - `tern-wan probe ENDPOINT LOCATION`: waits (60 s at most) until the S3
//!   store at ENDPOINT answers for LOCATION's bucket; for a store started
//!   in a namespace the test process cannot reach.
//! - `tern-wan up TAG`: builds the WAN (50 ms, 100 Mbit/s, 1% loss; or
//!   `TERN_WAN_DELAY_MS`, `TERN_WAN_RATE_MBIT`, `TERN_WAN_LOSS_PERCENT`)
//!   with SeaweedFS in the store's namespace (data in `TERN_WAN_DIR`,
//!   default /var/tmp/tern-wan-TAG), prints `ready` and holds it until its
//!   standard input closes; for the benchmark scripts.

use std::collections::VecDeque;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tern_system_tests::stores::PrivateSeaweed;
use tern_system_tests::wan::{Link, Wan, STORE_PORT};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["delay", "--ms", ms] => delay_line(Duration::from_millis(ms.parse().expect("--ms N"))),
        ["probe", endpoint, location] => probe(endpoint, location),
        ["up", tag] => up(tag),
        ["requests", endpoint, location, size] => requests(endpoint, location, size.parse().expect("SIZE in bytes")),
        _ => {
            eprintln!(
                "usage: tern-wan delay --ms N | probe ENDPOINT LOCATION | up TAG | requests ENDPOINT LOCATION SIZE"
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("tern-wan: {e}");
        std::process::exit(1);
    }
}

/// Holds every queued packet for `delay`, then accepts it. Packets leave
/// in the order they came (one delay for all), so the link reorders
/// nothing. The queue is polled (the crate offers no descriptor to wait
/// on) every half millisecond at most: the delay is exact to that.
fn delay_line(delay: Duration) -> std::io::Result<()> {
    let mut queue = nfq::Queue::open()?;
    queue.bind(0)?;
    queue.set_copy_range(0, 0)?; // metadata only: nothing is rewritten
    queue.set_queue_max_len(0, 65536)?;
    queue.set_fail_open(0, true)?;
    queue.set_nonblocking(true);
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    loop {
        loop {
            match queue.recv() {
                Ok(mut packet) => {
                    packet.set_verdict(nfq::Verdict::Accept);
                    held.push_back((Instant::now() + delay, packet));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // The kernel's answer to a verdict on a packet that is gone
                // (its device went away with a site's namespace).
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(e),
            }
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            let (_, packet) = held.pop_front().expect("front");
            queue.verdict(packet)?;
        }
        let next = held.front().map_or(Duration::MAX, |(due, _)| due.saturating_duration_since(now));
        std::thread::sleep(next.min(Duration::from_micros(500)));
    }
}

fn probe(endpoint: &str, location: &str) -> std::io::Result<()> {
    let store = tern_store::object::Store::open_with_endpoint(Path::new(location), endpoint)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let started = Instant::now();
    loop {
        match store.check() {
            Ok(()) => return Ok(()),
            Err(e) if started.elapsed() > Duration::from_secs(60) => {
                return Err(std::io::Error::other(format!("{endpoint} did not answer for {location}: {e}")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// What one request of each kind costs against the store: 10 GETs of a
/// missing object (the fence check), 10 HEADs (the manifest check), 10
/// create-only PUTs of SIZE bytes, timed one after another as the
/// shipper makes them.
fn requests(endpoint: &str, location: &str, size: usize) -> std::io::Result<()> {
    use tern_store::object::Put;
    let store = tern_store::object::Store::open_with_endpoint(Path::new(location), endpoint)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let payload: Vec<u8> = (0..size).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect();
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    for round in 0..10 {
        let t = Instant::now();
        store.get("probe/absent").map_err(|e| std::io::Error::other(e.to_string()))?;
        let get = ms(t);
        let t = Instant::now();
        store.exists("probe/absent").map_err(|e| std::io::Error::other(e.to_string()))?;
        let head = ms(t);
        let t = Instant::now();
        store
            .put(&format!("probe/{round}-{}", std::process::id()), &payload, Put::Create)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let put = ms(t);
        println!("get {get:.0} ms, head {head:.0} ms, put {put:.0} ms ({:.1} MB/s)", size as f64 / put / 1000.0);
    }
    Ok(())
}

fn up(tag: &str) -> std::io::Result<()> {
    let var = |name: &str, default: f64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let link = Link {
        delay_ms: var("TERN_WAN_DELAY_MS", Link::WAN.delay_ms as f64) as u32,
        rate_mbit: var("TERN_WAN_RATE_MBIT", Link::WAN.rate_mbit as f64) as u32,
        loss_percent: var("TERN_WAN_LOSS_PERCENT", Link::WAN.loss_percent),
    };
    let dir = std::env::var_os("TERN_WAN_DIR")
        .map_or_else(|| PathBuf::from(format!("/var/tmp/tern-wan-{tag}")), PathBuf::from);
    let wan = Wan::new(tag, link);
    let store = PrivateSeaweed::start_in(&dir, STORE_PORT, Some(wan.ns(None)));
    println!("ready");
    // Held until the script that started it closes our standard input.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(store);
    drop(wan);
    Ok(())
}
