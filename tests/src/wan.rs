//! Two sites and an object store on one machine: three network namespaces
//! (the source host, the target host, the store) joined by veth pairs
//! whose links are made a WAN — a round trip of 2 × `delay`, `rate` each
//! way, `loss` of the packets each way.
//!
//! This kernel has no `netem`, so the link is built from what it has: `tbf`
//! limits the rate (on both ends of each pair), `iptables -m statistic`
//! drops packets at the receiver, and a delay line of our own holds every
//! packet arriving over a link for `delay` in an NFQUEUE (`tern-wan
//! delay`, `src/bin/tern-wan.rs`) before the kernel lets it through. TCP sees a real round trip, real loss and a real bottleneck;
//! only the jitter of a real path is missing. Segmentation offloads are off
//! on the links, so a packet is a packet (loss is per 1500-byte frame, not
//! per 64 KiB super-frame).
//!
//!   source ns  wan0 10.77.1.1 ── src0 10.77.1.2  store ns
//!   target ns  wan0 10.77.2.1 ── tgt0 10.77.2.2  (SeaweedFS on :8333)
//!
//! The sites reach only the store (no route between them: the target
//! never needs the source). Everything is removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The link between each site and the store.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// One way; the round trip is twice this.
    pub delay_ms: u32,
    /// Each way.
    pub rate_mbit: u32,
    /// Of the packets, each way.
    pub loss_percent: f64,
}

impl Link {
    /// The WAN: 50 ms round trip, 100 Mbit/s, 1% loss.
    pub const WAN: Link = Link { delay_ms: 25, rate_mbit: 100, loss_percent: 1.0 };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    Source,
    Target,
}

pub struct Wan {
    tag: String,
    link: Link,
    /// The delay line of each namespace, by name.
    delay_lines: Vec<(String, Child)>,
}

/// The S3 port of the store inside its namespace.
pub const STORE_PORT: u16 = 8333;

impl Wan {
    /// Builds the namespaces and links; `tag` (a few letters) names them
    /// (`<tag>-src`, `<tag>-tgt`, `<tag>-store`), so two can coexist.
    pub fn new(tag: &str, link: Link) -> Self {
        crate::require("iptables");
        crate::require("ethtool");
        let mut wan = Wan { tag: tag.to_owned(), link, delay_lines: Vec::new() };
        wan.remove(); // what a killed run left behind
        let store = wan.ns(None);
        add_ns(&store);
        wan.start_delay_line(&store);
        wan.add_site(Site::Source);
        wan.add_site(Site::Target);
        wan
    }

    /// A site's namespace and its link to the store.
    fn add_site(&mut self, site: Site) {
        let (ns, store, tag) = (self.ns(Some(site)), self.ns(None), &self.tag);
        let (net, peer) = if site == Site::Source { (1, "src0") } else { (2, "tgt0") };
        add_ns(&ns);
        // Made in the root namespace under unique names, moved, renamed.
        let (a, b) = (format!("{tag}{net}a"), format!("{tag}{net}b"));
        sh(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b]);
        sh(&["ip", "link", "set", &a, "netns", &ns, "name", "wan0"]);
        sh(&["ip", "link", "set", &b, "netns", &store, "name", peer]);
        for (ns, dev, addr) in [(&ns, "wan0", format!("10.77.{net}.1/24")), (&store, peer, format!("10.77.{net}.2/24"))]
        {
            sh(&["ip", "-n", ns, "addr", "add", &addr, "dev", dev]);
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
            in_ns(ns, &["ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off"]);
            // The rate each way: tbf on the sending end, with a queue of a
            // quarter of a second, as a router's would be.
            let rate = format!("{}mbit", self.link.rate_mbit);
            let limit = format!("{}", self.link.rate_mbit as u64 * 1_000_000 / 8 / 4);
            in_ns(
                ns,
                &["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst", "64kb", "limit", &limit],
            );
            // Loss at the receiver (dropped on the way out, a packet would
            // be a local error to the sender, not a loss on the wire).
            if self.link.loss_percent > 0.0 {
                let p = format!("{}", self.link.loss_percent / 100.0);
                let rule =
                    ["INPUT", "-i", dev, "-m", "statistic", "--mode", "random", "--probability", &p, "-j", "DROP"];
                ensure_rule(ns, &rule);
            }
            // The delay, also at the receiving end: held on the way out, a
            // packet would still count against its socket's TCP Small Queues
            // budget, and TCP would send two packets per delay.
            if self.link.delay_ms > 0 {
                ensure_rule(ns, &["INPUT", "-i", dev, "-j", "NFQUEUE", "--queue-num", "0"]);
            }
        }
        self.start_delay_line(&ns);
    }

    fn start_delay_line(&mut self, ns: &str) {
        if self.link.delay_ms == 0 {
            return;
        }
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(wan_bin())
            .args(["delay", "--ms", &self.link.delay_ms.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .expect("start the delay line");
        self.delay_lines.push((ns.to_owned(), child));
    }

    /// The namespace of a site, or of the store (`None`).
    pub fn ns(&self, site: Option<Site>) -> String {
        match site {
            Some(Site::Source) => format!("{}-src", self.tag),
            Some(Site::Target) => format!("{}-tgt", self.tag),
            None => format!("{}-store", self.tag),
        }
    }

    /// `AWS_ENDPOINT_URL` as a site sees the store.
    pub fn store_endpoint(&self, site: Site) -> String {
        let net = if site == Site::Source { 1 } else { 2 };
        format!("http://10.77.{net}.2:{STORE_PORT}")
    }

    /// The source host gone: every process in its namespace killed and
    /// the namespace deleted (its link with it).
    pub fn destroy_source(&mut self) {
        let ns = self.ns(Some(Site::Source));
        self.stop_delay_lines(|n| n == ns);
        kill_all_in(&ns);
        // The link goes with it (a namespace's devices are freed
        // asynchronously after it is deleted: too late to add it again).
        let _ = Command::new("ip").args(["-n", &self.ns(None), "link", "delete", "src0"]).status();
        let _ = Command::new("ip").args(["netns", "delete", &ns]).status();
    }

    /// The source host back, on a fresh namespace and link (its disks, on
    /// the shared filesystem, survived).
    pub fn restore_source(&mut self) {
        self.add_site(Site::Source);
    }

    fn stop_delay_lines(&mut self, which: impl Fn(&str) -> bool) {
        let (stop, keep) = std::mem::take(&mut self.delay_lines).into_iter().partition(|(ns, _)| which(ns));
        self.delay_lines = keep;
        for (_, mut c) in stop {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn remove(&mut self) {
        self.stop_delay_lines(|_| true);
        for ns in [self.ns(Some(Site::Source)), self.ns(Some(Site::Target)), self.ns(None)] {
            if Path::new("/run/netns").join(&ns).exists() {
                kill_all_in(&ns);
                let _ = Command::new("ip").args(["netns", "delete", &ns]).status();
            }
        }
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.remove();
    }
}

fn kill_all_in(ns: &str) {
    let out = Command::new("ip").args(["netns", "pids", ns]).output();
    for pid in out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default().split_whitespace() {
        let _ = Command::new("kill").args(["-9", pid]).status();
    }
}

fn add_ns(ns: &str) {
    sh(&["ip", "netns", "add", ns]);
    sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
}

/// Appends an iptables rule to a chain of `ns` unless it is there (the
/// store keeps a link's rules when the site at its other end goes).
fn ensure_rule(ns: &str, rule: &[&str]) {
    let mut check = vec!["ip", "netns", "exec", ns, "iptables", "-C"];
    check.extend_from_slice(rule);
    if Command::new(check[0]).args(&check[1..]).output().is_ok_and(|o| o.status.success()) {
        return;
    }
    let mut add = vec!["iptables", "-A"];
    add.extend_from_slice(rule);
    in_ns(ns, &add);
}

fn in_ns(ns: &str, args: &[&str]) {
    let mut all = vec!["ip", "netns", "exec", ns];
    all.extend_from_slice(args);
    sh(&all);
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// The `tern-wan` helper (`src/bin/tern-wan.rs`), built with this crate.
pub fn wan_bin() -> PathBuf {
    crate::workspace_bin("tern-wan", "TERN_WAN_BIN", "cargo build --release -p tern-system-tests")
}
