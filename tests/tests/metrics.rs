//! What `tern ship` reports besides `ship.json`: the Prometheus metrics
//! file for node_exporter's textfile collector (the same numbers as `tern
//! status`, replaced whole, never a temporary left behind) and the
//! progress of the initial sync in its log.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tern_system_tests::*;

/// A parsed metrics file: series (`name{labels}`) → value.
type Samples = BTreeMap<String, f64>;

/// Parses the text exposition format strictly: every sample's family has
/// HELP and TYPE lines before it, every value is a number, and the file
/// ends with a newline (a half-written file fails here).
fn parse_prom(text: &str) -> Result<Samples, String> {
    if !text.ends_with('\n') {
        return Err("does not end with a newline".into());
    }
    let (mut helped, mut typed) = (Vec::new(), Vec::new());
    let mut samples = Samples::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.push(rest.split(' ').next().unwrap_or_default().to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split(' ');
            let name = words.next().unwrap_or_default().to_string();
            let kind = words.next().unwrap_or_default();
            if !["gauge", "counter"].contains(&kind) {
                return Err(format!("{name}: unexpected type {kind:?}"));
            }
            if kind == "counter" && !name.ends_with("_total") {
                return Err(format!("counter {name} does not end in _total"));
            }
            typed.push(name);
        } else {
            let (series, value) = line.rsplit_once(' ').ok_or_else(|| format!("not a sample: {line:?}"))?;
            let name = series.split('{').next().unwrap_or_default();
            if !helped.iter().any(|h| h == name) || !typed.iter().any(|t| t == name) {
                return Err(format!("{name} has no HELP or TYPE line before it"));
            }
            if !series.contains("{vm=\"vm1\"") || !series.ends_with('}') {
                return Err(format!("{series} lacks the label vm=\"vm1\""));
            }
            let value: f64 = value.parse().map_err(|e| format!("{line:?}: {e}"))?;
            samples.insert(series.to_string(), value);
        }
    }
    Ok(samples)
}

fn read_prom(path: &Path) -> Samples {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    parse_prom(&text).unwrap_or_else(|e| panic!("{}: {e}:\n{text}", path.display()))
}

/// The value of a metric labelled only with the VM.
fn get(samples: &Samples, name: &str) -> Option<f64> {
    samples.get(&format!("{name}{{vm=\"vm1\"}}")).copied()
}

fn value(samples: &Samples, name: &str) -> f64 {
    get(samples, name).unwrap_or_else(|| panic!("no {name} in {samples:#?}"))
}

/// The state whose `tern_state` sample is 1 (exactly one must be).
fn state(samples: &Samples) -> String {
    let on: Vec<&String> =
        samples.iter().filter(|(k, v)| k.starts_with("tern_state{") && **v == 1.0).map(|(k, _)| k).collect();
    assert_eq!(on.len(), 1, "exactly one state is 1: {samples:#?}");
    let label = on[0].split("state=\"").nth(1).expect("a state label");
    label.trim_end_matches("\"}").to_string()
}

fn status_json(vm: &TestVm) -> serde_json::Value {
    let out = vm.tern().args(["status", &vm.name, "--json"]).output().expect("run tern status");
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    all[0].clone()
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// The files of the metrics directory are this VM's metrics file and, for
/// an instant while it is replaced, its temporary; nothing else.
fn assert_only_metrics_files(dir: &Path, temporary_allowed: bool) {
    for name in file_names(dir) {
        let ok = name == "tern-vm1.prom" || temporary_allowed && name == ".tern-vm1.prom.tmp";
        assert!(ok, "unexpected file {name} in {}", dir.display());
    }
}

#[test]
fn the_metrics_file_tells_what_status_tells_and_is_only_ever_replaced_whole() {
    require("qemu-io");
    let vm =
        TestVm::new(VmSpec { disk_size: 16 << 20, journal_size: "64MiB", random_content: true, ..Default::default() });
    let metrics = vm.dir.path().join("metrics");
    std::fs::create_dir(&metrics).expect("metrics dir");
    let prom = metrics.join("tern-vm1.prom");
    // Writes journaled beside the initial sync.
    let served = vm.serve(&[]);
    for (i, offset) in ["0", "1m", "5m"].iter().enumerate() {
        run(Command::new("qemu-io").args([
            "-f",
            "raw",
            &vm.uri("disk0"),
            "-c",
            &format!("write -P {} {offset} 256k", i + 1),
        ]));
    }
    served.stop();
    let ship = vm.ship(&["--metrics-dir", metrics.to_str().expect("utf-8 path")]);
    // While it runs, every read finds a whole file; wait until everything
    // journaled and dirty is in the cache.
    let start = Instant::now();
    let running = loop {
        assert_only_metrics_files(&metrics, true);
        if prom.exists() {
            let s = read_prom(&prom);
            if get(&s, "tern_shipped_seq") == get(&s, "tern_journal_head_seq")
                && value(&s, "tern_dirty_bytes") == 0.0
                // Shipped, but no point at the target yet: not protected.
                && state(&s) == "unprotected"
            {
                break s;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(60), "ship did not catch up within 60 s:\n{}", ship.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(value(&running, "tern_up"), 1.0, "tern ship runs");
    assert_eq!(value(&running, "tern_pending_bytes"), 0.0);
    assert_eq!(
        value(&running, "tern_journal_ring_bytes"),
        (64 << 20) as f64 + 4096.0,
        "the 64 MiB ring and its header page"
    );
    assert!(value(&running, "tern_journal_head_seq") >= 3.0, "three writes and the initial sync: {running:#?}");
    assert!(value(&running, "tern_segments_shipped_total") >= 1.0, "{running:#?}");
    assert!(value(&running, "tern_ship_bytes_in_total") >= (16 << 20) as f64, "the initial sync alone: {running:#?}");
    assert!(value(&running, "tern_ship_bytes_out_total") > 0.0);
    assert_eq!(value(&running, "tern_cache_errors_total"), 0.0);
    assert!(value(&running, "tern_ship_lag_p99_seconds") > 0.0, "{running:#?}");
    let updated = value(&running, "tern_last_update_timestamp_seconds");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    assert!((now - updated).abs() < 10.0, "written just now: {updated} vs {now}");
    // Nothing applied yet: no RPO is invented, and no point age.
    assert_eq!(get(&running, "tern_rpo_seconds"), None, "{running:#?}");
    assert_eq!(get(&running, "tern_last_point_age_seconds"), None, "{running:#?}");
    // SIGTERM: the last word says tern ship is down, and no temporary stays.
    ship.stop();
    let stopped = read_prom(&prom);
    assert_eq!(value(&stopped, "tern_up"), 0.0);
    assert_only_metrics_files(&metrics, false);
    // The same numbers as `tern status`.
    let s = status_json(&vm);
    assert_eq!(value(&stopped, "tern_journal_head_seq"), s["head_seq"].as_f64().expect("head_seq"), "{s}");
    assert_eq!(value(&stopped, "tern_shipped_seq"), s["shipped_seq"].as_f64().expect("shipped_seq"), "{s}");
    assert_eq!(value(&stopped, "tern_pending_bytes"), s["pending_bytes"].as_f64().expect("pending"), "{s}");
    assert_eq!(value(&stopped, "tern_dirty_bytes"), s["dirty_bytes"].as_f64().expect("dirty"), "{s}");
    assert_eq!(value(&stopped, "tern_journal_fill_ratio"), s["journal_fill"].as_f64().expect("fill"), "{s}");
    assert_eq!(state(&stopped), s["state"].as_str().expect("state"), "{s}");

    // Applied at the target: the RPO (0, as status computes it), the
    // applied seq and the newest point's age appear.
    let out = vm.apply_with(&vm.dir.path().join("cache"), &vm.dir.path().join("target"), &[], &[]);
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
    vm.ship_once_with(&["--metrics-dir", metrics.to_str().expect("utf-8 path")]);
    let applied = read_prom(&prom);
    let s = status_json(&vm);
    assert_eq!(value(&applied, "tern_rpo_seconds"), 0.0, "{applied:#?}");
    assert_eq!(s["rpo_seconds"].as_f64(), Some(0.0), "{s}");
    assert_eq!(value(&applied, "tern_applied_seq"), value(&applied, "tern_journal_head_seq"), "{applied:#?}");
    let age = value(&applied, "tern_last_point_age_seconds");
    assert!((0.0..600.0).contains(&age), "the point was just taken: {age}");
    assert_eq!(state(&applied), "protected");
    assert_only_metrics_files(&metrics, false);
}

#[test]
fn the_metrics_file_defaults_to_the_state_directory_and_follows_tern_metrics_dir() {
    let vm = TestVm::new(VmSpec { disk_size: 4 << 20, random_content: true, ..Default::default() });
    vm.ship_once();
    let default = vm.state.join("vm1").join("tern-vm1.prom");
    let s = read_prom(&default);
    assert_eq!(value(&s, "tern_up"), 0.0, "--once exited");
    assert_eq!(value(&s, "tern_shipped_seq"), value(&s, "tern_journal_head_seq"));
    assert_eq!(value(&s, "tern_pending_bytes"), 0.0);
    assert!(!vm.state.join("vm1").join(".tern-vm1.prom.tmp").exists());
    // /etc/default/tern's TERN_METRICS_DIR reaches the unit this way.
    let elsewhere = vm.dir.path().join("node-exporter");
    std::fs::create_dir(&elsewhere).expect("dir");
    let mut cmd = vm.tern();
    cmd.args(["ship", &vm.name, "--once"]).env("TERN_METRICS_DIR", &elsewhere);
    run(&mut cmd);
    assert_eq!(file_names(&elsewhere), vec!["tern-vm1.prom".to_string()]);
    let s = read_prom(&elsewhere.join("tern-vm1.prom"));
    assert_eq!(state(&s), status_json(&vm)["state"].as_str().expect("state"), "as status says");
}

#[test]
fn a_missing_metrics_directory_is_logged_and_shipping_goes_on() {
    let vm = TestVm::new(VmSpec { disk_size: 4 << 20, random_content: true, ..Default::default() });
    let missing = vm.dir.path().join("no-such-dir");
    let log = vm.ship_once_with(&["--metrics-dir", missing.to_str().expect("utf-8 path")]);
    assert!(log.contains("cannot write the metrics file"), "{log}");
    assert!(log.contains("--metrics-dir"), "the message says what to do: {log}");
    assert_eq!(log.matches("cannot write the metrics file").count(), 1, "logged once, not twice a second: {log}");
    assert!(!missing.exists(), "tern does not create the directory");
    vm.assert_cache_reproduces_source();
}

/// "VM 'vm1': initial sync 312.0 MiB of 1.0 GiB sent (45 MB/s, ETA 16s)":
/// the sent bytes in MiB, the total text, the ETA text.
fn progress_line(line: &str) -> Option<(f64, String, String)> {
    let rest = line.split("VM 'vm1': initial sync ").nth(1)?;
    let (sent, rest) = rest.split_once(" of ")?;
    let (total, rest) = rest.split_once(" sent (")?;
    let (rate, eta) = rest.trim_end_matches(')').split_once(", ETA ")?;
    assert!(rate.ends_with(" MB/s"), "{line}");
    let mib = match sent.split_once(' ')? {
        (n, "MiB") => n.parse().ok()?,
        (n, "KiB") => n.parse::<f64>().ok()? / 1024.0,
        (n, "B") => n.parse::<f64>().ok()? / 1048576.0,
        (n, "GiB") => n.parse::<f64>().ok()? * 1024.0,
        _ => return None,
    };
    Some((mib, total.to_string(), eta.to_string()))
}

#[test]
fn initial_sync_progress_is_logged_with_bytes_rate_and_eta_when_not_on_a_terminal() {
    // 200 MiB of data and a small ring: the sync is paced by shipping, so
    // it lasts long enough for several lines.
    let vm =
        TestVm::new(VmSpec { disk_size: 200 << 20, journal_size: "8MiB", random_content: true, ..Default::default() });
    let mut cmd = vm.tern();
    cmd.args(["ship", &vm.name, "--once", "--workers", "1", "--progress-interval", "100ms"]).env("TERN_LOG", "info");
    let out = cmd.output().expect("run tern ship");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    assert!(log.contains("VM 'vm1': initial sync of 200.0 MiB started"), "{log}");
    let lines: Vec<(f64, String, String)> = log.lines().filter_map(progress_line).collect();
    assert!(!lines.is_empty(), "no progress line:\n{log}");
    for (sent, total, eta) in &lines {
        assert_eq!(total, "200.0 MiB", "the total is what enable marked:\n{log}");
        assert!((0.0..=200.0).contains(sent), "{log}");
        assert!(eta.ends_with('s') || eta.ends_with('m') || eta == "unknown", "{log}");
    }
    assert!(lines.windows(2).all(|w| w[0].0 <= w[1].0), "progress only grows:\n{log}");
    let all: Vec<&str> = log.lines().collect();
    let finished = all.iter().position(|l| l.contains("VM 'vm1': initial sync finished: 200.0 MiB sent in"));
    let last_progress = all.iter().rposition(|l| progress_line(l).is_some());
    assert!(finished.is_some_and(|f| last_progress.is_some_and(|p| p < f)), "the last line says it finished:\n{log}");
    // Not a word of a bar: stderr is not a terminal.
    assert!(!log.contains('\r') && !log.contains("\u{1b}[2K"), "{log}");
}
