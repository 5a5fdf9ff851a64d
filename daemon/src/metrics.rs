//! The Prometheus metrics file `tern ship` keeps for node_exporter's
//! textfile collector: `<metrics-dir>/tern-<vm>.prom`, one VM's status —
//! the same [`VmStatus`] `tern status` prints — in the text exposition
//! format (0.0.4), every sample labelled `vm="<name>"`.
//!
//! It is rewritten twice a second through `<metrics-dir>/.tern-<vm>.prom.tmp`
//! and a rename, so a scrape never reads half a file (node_exporter reads
//! only `*.prom`, never the temporary). It is a report: not fsynced, and a
//! failure to write it is logged and never stops shipping.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::status::{State, VmStatus};

/// `<metrics-dir>/tern-<vm>.prom` and how writing it last went.
#[derive(Debug)]
pub struct MetricsFile {
    path: PathBuf,
    tmp: PathBuf,
    /// The last failure, logged once until it changes or writing works again.
    failing: Mutex<Option<String>>,
}

impl MetricsFile {
    /// The file for `vm` in `dir`. Removes the temporary a killed run left.
    pub fn new(dir: &Path, vm: &str) -> Self {
        let file = MetricsFile {
            path: dir.join(format!("tern-{vm}.prom")),
            tmp: dir.join(format!(".tern-{vm}.prom.tmp")),
            failing: Mutex::new(None),
        };
        match std::fs::remove_file(&file.tmp) {
            Ok(()) => log::info!("removed {}, left by an earlier `tern ship`", file.tmp.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot remove {}: {e}", file.tmp.display()),
        }
        file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `status`; `up` is false for the last write as `tern ship`
    /// exits.
    pub fn publish(&self, status: &VmStatus, up: bool) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let written = self.write(&render(status, up, now)).map_err(|e| {
            format!(
                "cannot write the metrics file {}: {e}; create {} (node_exporter's textfile directory) or point `tern ship --metrics-dir` (TERN_METRICS_DIR) elsewhere; shipping goes on meanwhile",
                self.path.display(),
                self.path.parent().unwrap_or(Path::new(".")).display()
            )
        });
        self.note(written);
    }

    /// The status could not be read: the file keeps its last content (its
    /// `tern_last_update_timestamp_seconds` tells how old it is).
    pub fn status_unreadable(&self, why: String) {
        self.note(Err(format!("metrics file {} not updated: {why}", self.path.display())));
    }

    fn note(&self, result: Result<(), String>) {
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(()) => {
                if failing.take().is_some() {
                    log::info!("metrics file {} written again", self.path.display());
                }
            }
            Err(e) => {
                if failing.as_deref() != Some(e.as_str()) {
                    log::warn!("{e}");
                    *failing = Some(e);
                }
            }
        }
    }

    fn write(&self, text: &str) -> std::io::Result<()> {
        let written = std::fs::File::create(&self.tmp)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .and_then(|()| std::fs::rename(&self.tmp, &self.path));
        if written.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        written
    }
}

/// A sample's value: integers stay exact, floats as Prometheus spells them.
enum Value {
    Int(u64),
    Float(f64),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Value::Int(n) => write!(f, "{n}"),
            Value::Float(x) if x.is_nan() => f.write_str("NaN"),
            Value::Float(x) if x.is_infinite() => f.write_str(if x > 0.0 { "+Inf" } else { "-Inf" }),
            Value::Float(x) => write!(f, "{x}"),
        }
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value.replace('\\', r"\\").replace('"', "\\\"").replace('\n', r"\n")
}

/// The file's text: each family with its HELP and TYPE lines. A value
/// that is not known (no `applied.toml`, no readable catalog, no
/// `ship.json`) leaves its family out rather than inventing a number.
pub fn render(s: &VmStatus, up: bool, now_unix_secs: f64) -> String {
    let vm = format!("vm=\"{}\"", escape(&s.name));
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, Value)]| {
        if samples.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{{{vm}{labels}}} {value}");
        }
    };
    let one = |v: Option<Value>| v.map(|v| vec![(String::new(), v)]).unwrap_or_default();
    let int = |n: u64| one(Some(Value::Int(n)));
    let float = |x: f64| one(Some(Value::Float(x)));
    family(
        "tern_up",
        "gauge",
        "1 while tern ship runs for the VM and rewrites this file, 0 once it exited cleanly (a file left by a killed run still says 1: alert on its age too).",
        &int(up as u64),
    );
    let states: Vec<(String, Value)> = State::ALL
        .iter()
        .map(|&st| (format!(",state=\"{}\"", st.name()), Value::Int((st == s.state) as u64)))
        .collect();
    family(
        "tern_state",
        "gauge",
        "The VM's replication state as tern status names it: 1 for the current one, 0 for the others.",
        &states,
    );
    family("tern_journal_fill_ratio", "gauge", "Fraction of the journal ring in use (0 to 1).", &float(s.journal_fill));
    family("tern_journal_head_seq", "gauge", "Sequence number of the newest journaled record.", &int(s.head_seq));
    family(
        "tern_journal_ring_bytes",
        "gauge",
        "Memory the journal's live ring holds (allocated bytes, in tmpfs).",
        &one(s.ring_bytes.map(Value::Int)),
    );
    family(
        "tern_app_point_freeze_failed",
        "gauge",
        "1 when the guest freeze of the newest app point tagged here failed (the point is crash-consistent only), else 0.",
        &one(s.last_app_point.as_ref().map(|p| Value::Int((p.consistency == "crash") as u64))),
    );
    family(
        "tern_pending_bytes",
        "gauge",
        "Bytes journaled and not yet shipped to the cache store.",
        &int(s.pending_bytes),
    );
    family(
        "tern_dirty_bytes",
        "gauge",
        "Bytes marked for resync (dirty regions times the region size).",
        &int(s.dirty_bytes),
    );
    family(
        "tern_backlog_bytes",
        "gauge",
        "Bytes waiting to be shipped: journaled and unshipped, plus marked for resync.",
        &int(s.backlog_bytes),
    );
    family(
        "tern_backlog_eta_seconds",
        "gauge",
        "Seconds until the backlog is shipped at the current rate (absent while nothing ships).",
        &one(s.backlog_eta_seconds.map(Value::Float)),
    );
    family(
        "tern_ship_upload_bytes_per_second",
        "gauge",
        "Bytes per second sent to the cache store (segments as stored), over the last second or so.",
        &one(s.upload_rate_mb_s.map(|r| Value::Float(r * 1e6))),
    );
    family(
        "tern_ship_max_rate_bytes_per_second",
        "gauge",
        "The running shipper's bandwidth limit (absent when it has none).",
        &one(s.max_rate_bytes_per_second.map(Value::Int)),
    );
    family(
        "tern_ship_compression_level",
        "gauge",
        "The zstd level the running shipper compresses segments with (it moves when the policy makes it adaptive).",
        &one(s.compression_level.map(|l| Value::Float(l.into()))),
    );
    family(
        "tern_shipped_seq",
        "gauge",
        "Sequence number of the newest record durable in the cache store.",
        &one(s.shipped_seq.map(Value::Int)),
    );
    family(
        "tern_applied_seq",
        "gauge",
        "Sequence number of the newest record applied at the target site (its applied.toml in the cache).",
        &one(s.applied_seq.map(Value::Int)),
    );
    family(
        "tern_ship_bytes_in_total",
        "counter",
        "Record bytes shipped, before compression, since tern ship started.",
        &one(s.ship_bytes_in.map(Value::Int)),
    );
    family(
        "tern_ship_bytes_out_total",
        "counter",
        "Segment bytes written to the cache store since tern ship started.",
        &one(s.ship_bytes_out.map(Value::Int)),
    );
    family(
        "tern_segments_shipped_total",
        "counter",
        "Segments made durable in the cache store since tern ship started.",
        &one(s.segments_shipped.map(Value::Int)),
    );
    family(
        "tern_cache_errors_total",
        "counter",
        "Failed attempts to write to the cache store since tern ship started.",
        &one(s.cache_errors.map(Value::Int)),
    );
    family(
        "tern_ship_lag_p99_seconds",
        "gauge",
        "99th percentile of the time from a record's journaling to its segment being durable in the cache.",
        &one(s.ship_lag_p99_ms.map(|ms| Value::Float(ms / 1000.0))),
    );
    family(
        "tern_rpo_seconds",
        "gauge",
        "RPO as tern status computes it: 0 when everything journaled is applied, else the age of the newest applied write (an upper bound).",
        &one(s.rpo_seconds.map(Value::Float)),
    );
    family(
        "tern_last_point_age_seconds",
        "gauge",
        "Age of the newest recovery point, when the target's catalog is readable here.",
        &one(s.last_point_age_seconds.map(Value::Float)),
    );
    family(
        "tern_last_update_timestamp_seconds",
        "gauge",
        "When tern ship wrote this file, in seconds since the Unix epoch.",
        &float(now_unix_secs),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> VmStatus {
        VmStatus {
            name: "vm1".into(),
            state: State::Protected,
            rpo_seconds: Some(0.0),
            journal_fill: 0.25,
            journal_mode: "journal".into(),
            pending_bytes: 4096,
            dirty_bytes: 0,
            resync_window_open: false,
            last_point_age_seconds: None,
            points: 0,
            test_failovers: 0,
            serve_running: true,
            ship_running: true,
            ship_rate_mb_s: Some(1.0),
            upload_rate_mb_s: Some(0.5),
            max_rate_bytes_per_second: Some(2_000_000),
            compression_level: Some(-3),
            compression_adaptive: Some(true),
            backlog_bytes: 4096,
            backlog_eta_seconds: Some(0.004096),
            ship_lag_p99_ms: Some(250.0),
            compression_ratio: Some(2.0),
            segments_shipped: Some(3),
            ship_bytes_in: Some(u64::MAX),
            ship_bytes_out: Some(1 << 20),
            cache_errors: Some(0),
            head_seq: 42,
            shipped_seq: Some(41),
            applied_seq: None,
            last_error: None,
            ring_bytes: None,
            last_app_point: None,
        }
    }

    /// name{labels} → value, asserting every sample's family was declared
    /// by a TYPE line before it.
    fn samples(text: &str) -> Vec<(String, String)> {
        let mut typed = Vec::new();
        let mut out = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.push(rest.split(' ').next().unwrap_or_default().to_string());
            } else if !line.starts_with('#') {
                let (series, value) = line.rsplit_once(' ').expect("a sample is `series value`");
                let name = series.split('{').next().unwrap_or_default();
                assert!(typed.iter().any(|t| t == name), "{name} has no TYPE line before it");
                out.push((series.to_string(), value.to_string()));
            }
        }
        out
    }

    #[test]
    fn every_family_has_help_and_type_and_unknown_values_are_left_out() {
        let text = render(&status(), true, 1.5);
        let s = samples(&text);
        let get = |k: &str| s.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("tern_up{vm=\"vm1\"}"), Some("1"));
        assert_eq!(get("tern_state{vm=\"vm1\",state=\"protected\"}"), Some("1"));
        assert_eq!(get("tern_state{vm=\"vm1\",state=\"paused\"}"), Some("0"));
        assert_eq!(get("tern_ship_bytes_in_total{vm=\"vm1\"}"), Some("18446744073709551615"), "integers stay exact");
        assert_eq!(get("tern_ship_lag_p99_seconds{vm=\"vm1\"}"), Some("0.25"));
        assert_eq!(get("tern_rpo_seconds{vm=\"vm1\"}"), Some("0"));
        assert_eq!(get("tern_last_update_timestamp_seconds{vm=\"vm1\"}"), Some("1.5"));
        assert_eq!(get("tern_ship_upload_bytes_per_second{vm=\"vm1\"}"), Some("500000"));
        assert_eq!(get("tern_ship_max_rate_bytes_per_second{vm=\"vm1\"}"), Some("2000000"));
        assert_eq!(get("tern_backlog_bytes{vm=\"vm1\"}"), Some("4096"));
        assert_eq!(get("tern_ship_compression_level{vm=\"vm1\"}"), Some("-3"));
        assert_eq!(get("tern_backlog_eta_seconds{vm=\"vm1\"}"), Some("0.004096"));
        assert!(!text.contains("tern_last_point_age_seconds"), "no catalog: no family, not even its HELP");
        assert!(!text.contains("tern_applied_seq"));
        assert_eq!(text.matches("# HELP ").count(), text.matches("# TYPE ").count());
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("a\nb"), r"a\nb");
    }

    #[test]
    fn non_finite_floats_are_spelled_as_prometheus_reads_them() {
        assert_eq!(Value::Float(f64::NAN).to_string(), "NaN");
        assert_eq!(Value::Float(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Value::Float(1e-7).to_string(), "0.0000001");
    }

    #[test]
    fn the_file_is_replaced_whole_and_no_temporary_stays() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(".tern-vm1.prom.tmp"), "half").expect("leftover");
        let file = MetricsFile::new(dir.path(), "vm1");
        file.publish(&status(), true);
        file.publish(&status(), false);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["tern-vm1.prom".to_string()]);
        let text = std::fs::read_to_string(file.path()).expect("read");
        assert!(text.contains("tern_up{vm=\"vm1\"} 0\n"), "{text}");
    }

    #[test]
    fn a_missing_directory_is_reported_not_fatal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = MetricsFile::new(&dir.path().join("missing"), "vm1");
        file.publish(&status(), true);
        let failing = file.failing.lock().expect("lock").clone().expect("the failure is kept");
        assert!(failing.contains("--metrics-dir"), "{failing}");
        std::fs::create_dir(dir.path().join("missing")).expect("mkdir");
        file.publish(&status(), true);
        assert!(file.failing.lock().expect("lock").is_none());
    }
}
