//! The layout of one VM in the cache store, and its manifest.
//!
//! ```text
//! <cache>/<vm>/manifest.toml          what the target needs to build replicas (below)
//! <cache>/<vm>/segments/<first>-<last> segment files, 20-digit zero-padded seqs (sort = seq order)
//! <cache>/<vm>/segments/.<name>.tmp    a segment being written (never read)
//! ```
//!
//! The applier may delete segments it has applied, but always leaves the
//! newest: it tells a restarted shipper where the stream stands.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tern_driver::vm::{validate_name, Policy, VmConfig};

use crate::file::{read_toml, read_with, FileError};
use crate::segment::{self, SegmentError, SegmentHeader};

/// Version of `manifest.toml` this tern writes and reads.
pub const MANIFEST_VERSION: u32 = 1;

/// `<cache>/<vm>/manifest.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub name: String,
    pub id: uuid::Uuid,
    pub policy: Policy,
    /// The source's journal ring size in bytes (a re-protected direction
    /// takes the same by default). Absent in manifests before 2026-12.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_size: Option<u64>,
    #[serde(rename = "disk")]
    pub disks: Vec<ManifestDisk>,
    /// Every epoch of the sequence stream, oldest first. A new epoch starts
    /// where records were lost before shipping (the journal was discarded
    /// after a host crash): the applier accepts the gap only there, and a
    /// resync window opens at its first record.
    #[serde(rename = "epoch")]
    pub epochs: Vec<Epoch>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ManifestDisk {
    pub name: String,
    pub size: u64,
    /// The source image's path at the source site: after a failover, `tern
    /// reprotect` seeds the reverse direction's replica from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PathBuf>,
    /// Start the replica as a clone of this file at the target site
    /// (absolute, or relative to `<target>/<vm>/`) instead of empty; the
    /// stream then starts with a checksum comparison against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Epoch {
    pub number: u64,
    /// The first sequence number of the epoch.
    pub first_seq: u64,
    /// Why it started, for the operator.
    pub reason: String,
}

impl Manifest {
    pub fn for_vm(config: &VmConfig, first_seq: u64) -> Self {
        Manifest {
            version: MANIFEST_VERSION,
            name: config.name.clone(),
            id: config.id,
            policy: config.policy.clone(),
            journal_size: Some(config.journal.size.bytes()),
            disks: config
                .disks
                .iter()
                .map(|d| ManifestDisk {
                    name: d.name.clone(),
                    size: d.size,
                    source: Some(d.path.clone()),
                    seed: d.seed.clone(),
                })
                .collect(),
            epochs: vec![Epoch { number: 1, first_seq, reason: "replication enabled".into() }],
        }
    }

    pub fn epoch(&self) -> &Epoch {
        self.epochs.last().expect("validated: at least one epoch")
    }

    /// Parses and validates a manifest (untrusted: it comes from the cache).
    pub fn parse(path: &Path, text: &str) -> Result<Self, FileError> {
        let bad = |reason: String| FileError::Damaged { path: path.to_owned(), reason };
        let m: Manifest = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if m.version != MANIFEST_VERSION {
            return Err(bad(format!("version {} is not supported (this tern reads {MANIFEST_VERSION})", m.version)));
        }
        validate_name("VM", &m.name).map_err(|e| bad(e.to_string()))?;
        if m.disks.is_empty() || m.disks.len() > tern_driver::vm::MAX_DISKS {
            return Err(bad(format!("{} disks listed", m.disks.len())));
        }
        for d in &m.disks {
            validate_name("disk", &d.name).map_err(|e| bad(e.to_string()))?;
            if d.size == 0 {
                return Err(bad(format!("disk '{}' has size 0", d.name)));
            }
            if let Some(seed) = &d.seed {
                tern_driver::vm::validate_seed(seed).map_err(|e| bad(format!("disk '{}': {e}", d.name)))?;
            }
        }
        if m.epochs.is_empty() {
            return Err(bad("no epoch listed".into()));
        }
        for w in m.epochs.windows(2) {
            if w[1].number != w[0].number + 1 || w[1].first_seq <= w[0].first_seq {
                return Err(bad(format!("epochs {} and {} are out of order", w[0].number, w[1].number)));
            }
        }
        Ok(m)
    }
}

/// `<cache>/<vm>/applied.toml`: the target's progress, for the source's
/// end-to-end lag (RPO).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Applied {
    pub version: u32,
    pub epoch: u64,
    pub applied_seq: u64,
    /// Source time of the newest applied record, ns since the Unix epoch.
    pub source_time_ns: u64,
    pub updated_unix_ms: u64,
}

/// `<cache>/<vm>/apply-failure.toml`: the target's applier failed on the
/// VM and retries it with backoff; for `tern status` at either site.
/// Removed by the next pass that succeeds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ApplyFailure {
    pub version: u32,
    /// The error, with its causes, as logged.
    pub error: String,
    /// Failures in a row, this one included.
    pub attempts: u32,
    pub first_failed_unix_ms: u64,
    pub failed_unix_ms: u64,
    /// When the applier tries the VM again (0: not at all; `tern apply
    /// --once` does not retry).
    pub retry_unix_ms: u64,
}

/// `<cache>/<vm>/fence.toml`: the VM failed over at the target site. The
/// source stops shipping when it sees it, and the applier applies nothing
/// more for the VM: the failed-over disks are the VM now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Fence {
    pub version: u32,
    /// The epoch the failed-over VM starts (the source's epochs are older).
    pub epoch: u64,
    /// The point the VM failed over to.
    pub point: String,
    pub seq: u64,
    pub failed_over_unix_ms: u64,
    /// `tern commit` was run: no other point may be chosen any more.
    pub committed: bool,
}

/// `<cache>/<vm>/source-stopped.toml`: the source's front-end stopped
/// cleanly and `tern ship` has shipped everything it journaled, up to
/// `seq`. A failback (which fences the source, dropping anything it ships
/// later) requires it: the VM at the failover site must have stopped and
/// been drained. `tern ship` removes it as soon as it reads a newer record
/// or finds a front-end attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SourceStopped {
    pub version: u32,
    pub vm_id: uuid::Uuid,
    /// The last sequence number the source journaled, shipped and durable.
    pub seq: u64,
    pub unix_ms: u64,
    /// The planned failover request this stop answers (its
    /// `requested-unix-ms`, echoed: no clock of two sites is compared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned_request: Option<u64>,
}

/// `<cache>/<vm>/planned-failover.toml`: `tern failover --planned` asks
/// the source to stop: its `tern serve` refuses writes and exits cleanly,
/// its `tern ship` ships the rest and writes `source-stopped.toml`; then
/// the target fails over with nothing lost. Removed when the fence is
/// written or the planned failover is called off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PlannedFailover {
    pub version: u32,
    pub requested_unix_ms: u64,
}

/// One VM's directory in the cache store.
#[derive(Debug, Clone)]
pub struct CacheDir {
    root: PathBuf,
}

impl CacheDir {
    pub fn new(cache: &Path, vm: &str) -> Self {
        CacheDir { root: cache.join(vm) }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.root.join("manifest.toml")
    }

    pub fn fence_path(&self) -> PathBuf {
        self.root.join("fence.toml")
    }

    /// The fence, if the VM failed over.
    pub fn read_fence(&self) -> Result<Option<Fence>, FileError> {
        read_toml(&self.fence_path())
    }

    pub fn source_stopped_path(&self) -> PathBuf {
        self.root.join("source-stopped.toml")
    }

    /// The source's clean-stop marker, if it left one.
    pub fn read_source_stopped(&self) -> Result<Option<SourceStopped>, FileError> {
        read_toml(&self.source_stopped_path())
    }

    pub fn applied_path(&self) -> PathBuf {
        self.root.join("applied.toml")
    }

    pub fn planned_failover_path(&self) -> PathBuf {
        self.root.join("planned-failover.toml")
    }

    /// The planned failover's request to stop, if one is under way.
    pub fn read_planned_failover(&self) -> Result<Option<PlannedFailover>, FileError> {
        read_toml(&self.planned_failover_path())
    }

    pub fn apply_failure_path(&self) -> PathBuf {
        self.root.join("apply-failure.toml")
    }

    /// The applier's last failure on this VM, if it is failing.
    pub fn read_apply_failure(&self) -> Result<Option<ApplyFailure>, FileError> {
        read_toml(&self.apply_failure_path())
    }

    pub fn segments_dir(&self) -> PathBuf {
        self.root.join("segments")
    }

    pub fn segment_path(&self, first_seq: u64, last_seq: u64) -> PathBuf {
        self.segments_dir().join(segment::file_name(first_seq, last_seq))
    }

    pub fn temp_path(&self, first_seq: u64, last_seq: u64) -> PathBuf {
        self.segments_dir().join(format!(".{}.tmp", segment::file_name(first_seq, last_seq)))
    }

    /// The manifest, or `None` if there is none yet.
    pub fn read_manifest(&self) -> Result<Option<Manifest>, FileError> {
        let path = self.manifest_path();
        read_with(&path, |bytes| match Manifest::parse(&path, &String::from_utf8_lossy(bytes)) {
            Ok(m) => Ok(m),
            Err(FileError::Damaged { reason, .. }) => Err(reason),
            Err(e) => Err(e.to_string()),
        })
    }

    /// The segment files, in sequence order, by name (not opened). Other
    /// files are ignored.
    pub fn list_segments(&self) -> io::Result<Vec<(u64, u64, PathBuf)>> {
        let mut out = Vec::new();
        for entry in crate::dir_entries(&self.segments_dir())? {
            if let Some((first, last)) = entry.file_name().to_str().and_then(segment::parse_file_name) {
                out.push((first, last, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The header of the newest segment, if any.
    pub fn newest_segment(&self) -> io::Result<Option<Result<SegmentHeader, SegmentError>>> {
        Ok(self.list_segments()?.last().map(|(_, _, p)| segment::read_header(p)))
    }

    /// Removes segments a crashed writer left half-written. Returns how many.
    pub fn remove_temporaries(&self) -> io::Result<usize> {
        let mut n = 0;
        for entry in crate::dir_entries(&self.segments_dir())? {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                fs::remove_file(self.segments_dir().join(&*name))?;
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            version: 1,
            name: "vm1".into(),
            id: uuid::Uuid::from_bytes([7; 16]),
            policy: Policy::default(),
            journal_size: None,
            disks: vec![ManifestDisk {
                name: "root".into(),
                size: 1 << 30,
                source: None,
                seed: Some("failover/active/root.img".into()),
            }],
            epochs: vec![
                Epoch { number: 1, first_seq: 1, reason: "replication enabled".into() },
                Epoch { number: 2, first_seq: 500, reason: "host crash".into() },
            ],
        }
    }

    #[test]
    fn manifest_round_trips_and_bad_ones_are_refused_with_the_path() {
        let p = Path::new("/c/vm1/manifest.toml");
        let text = toml::to_string(&manifest()).unwrap();
        assert_eq!(Manifest::parse(p, &text).unwrap(), manifest());
        for (from, to) in [
            ("version = 1", "version = 9"),
            ("name = \"vm1\"", "name = \"../etc\""),
            ("number = 2", "number = 3"),
            ("first-seq = 500", "first-seq = 1"),
            ("size = 1073741824", "size = 0"),
            ("name = \"root\"", "name = \"a/b\""),
            ("seed = \"failover/active/root.img\"", "seed = \"../../etc/shadow\""),
        ] {
            assert!(text.contains(from), "{from}");
            let err = Manifest::parse(p, &text.replace(from, to)).unwrap_err().to_string();
            assert!(err.starts_with("/c/vm1/manifest.toml is damaged: "), "{err}");
        }
        assert!(Manifest::parse(p, &format!("{text}\nextra = 1\n")).is_err());
    }

    #[test]
    fn listing_ignores_temporaries_and_junk_and_sorts_by_seq() {
        let dir = tempfile::tempdir().unwrap();
        let c = CacheDir::new(dir.path(), "vm1");
        assert!(c.list_segments().unwrap().is_empty());
        fs::create_dir_all(c.segments_dir()).unwrap();
        for (a, b) in [(11, 20), (1, 10), (21, 21)] {
            fs::write(c.segment_path(a, b), b"x").unwrap();
        }
        fs::write(c.temp_path(22, 30), b"x").unwrap();
        fs::write(c.segments_dir().join("notes.txt"), b"x").unwrap();
        let firsts: Vec<u64> = c.list_segments().unwrap().iter().map(|s| s.0).collect();
        assert_eq!(firsts, [1, 11, 21]);
        assert_eq!(c.remove_temporaries().unwrap(), 1);
        assert!(!c.temp_path(22, 30).exists());
    }
}
