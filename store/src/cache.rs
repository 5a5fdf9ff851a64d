//! The layout of one VM in the cache store, and its manifest.
//!
//! ```text
//! <cache>/<vm>/manifest.toml          what the target needs to build replicas (below)
//! <cache>/<vm>/segments/<first>-<last> segment files, 20-digit zero-padded seqs (sort = seq order)
//! <cache>/<vm>/segments/.<name>.tmp    a segment being written (a directory store; never read)
//! ```
//!
//! `<cache>` is a directory, or a bucket and prefix ([`crate::object`]):
//! the names are the same in both.
//!
//! The applier may delete segments it has applied, but always leaves the
//! newest: it tells a restarted shipper where the stream stands.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tern_driver::vm::{validate_name, LaunchConfig, Policy, VmConfig};

use crate::file::FileError;
use crate::object::{Put, Stage, Store, StoreError, Version};
use crate::seal::{self, Binding, Key, SealError};
use crate::segment::{self, Segment, SegmentError, SegmentHeader};

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
    /// How a failover starts the VM: vm.toml's `[launch]`, every NIC's MAC
    /// address written out. Absent when the VM has the defaults (2 GiB, 2
    /// CPUs, no NIC), so a target without launch settings reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch: Option<LaunchConfig>,
    #[serde(rename = "disk")]
    pub disks: Vec<ManifestDisk>,
    /// The stream's first record opens a resync window (an initial sync of
    /// the disks' data, or a comparison with a seed): a replica that has
    /// applied nothing yet is not the VM at any moment, and no point is
    /// taken of it. Absent (false) for a stream that starts consistent
    /// (disks empty at enable) and in manifests before 2026-12.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub starts_in_window: bool,
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
    /// A window-closing record of this epoch below this seq does not end
    /// the window the epoch starts in: the ring still held it from before
    /// the comparison the epoch made due (records lost from the cache,
    /// found with the ring not emptied). 0: every close counts.
    #[serde(default, skip_serializing_if = "crate::is_zero")]
    pub closes_from: u64,
}

impl Manifest {
    pub fn for_vm(config: &VmConfig, first_seq: u64) -> Self {
        Manifest {
            version: MANIFEST_VERSION,
            name: config.name.clone(),
            id: config.id,
            policy: config.policy.clone(),
            journal_size: Some(config.journal.size.bytes()),
            launch: Self::launch_of(config),
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
            starts_in_window: false,
            epochs: vec![Epoch { number: 1, first_seq, reason: "replication enabled".into(), closes_from: 0 }],
        }
    }

    /// The manifest's `launch` for `config`: none for the defaults.
    pub fn launch_of(config: &VmConfig) -> Option<LaunchConfig> {
        (!config.launch.is_default()).then(|| config.launch.with_macs(&config.id))
    }

    /// Takes the settings of `config` (the source's vm.toml, maybe edited
    /// since the stream began) that the target uses but the stream does
    /// not depend on: the policy and the launch settings. Returns whether
    /// anything changed.
    pub fn refresh_from(&mut self, config: &VmConfig) -> bool {
        let launch = Self::launch_of(config);
        let changed = self.policy != config.policy || self.launch != launch;
        self.policy = config.policy.clone();
        self.launch = launch;
        changed
    }

    /// The launch settings (the defaults when the manifest has none).
    pub fn launch(&self) -> LaunchConfig {
        self.launch.clone().unwrap_or_default()
    }

    /// The epoch numbered `number`, if the manifest has it.
    pub fn epoch_numbered(&self, number: u64) -> Option<&Epoch> {
        self.epochs.iter().find(|e| e.number == number)
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
        let launch = m.launch();
        launch.validate(&m.policy.network).map_err(&bad)?;
        if let Some(i) = launch.nics.iter().position(|n| n.mac.is_none()) {
            return Err(bad(format!("launch NIC {i} has no MAC address")));
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
    /// Recovery points in the target's catalog, and the source time of the
    /// newest: the source site's `tern status` reads them here when the
    /// target directory is on another host. Absent before 2026-12-06.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub points: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest_point_ns: Option<u64>,
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
    /// Written by `tern failback` (which fences the re-protected direction
    /// and commits at once); false (absent): by `tern failover`, as every
    /// fence before this field. A failback resumes only from its own fence:
    /// another is a failover of that direction, whose disks it must not
    /// replace. Absent when false, so a fence of `tern failover` stays
    /// readable by releases before it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub by_failback: bool,
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

/// The names of a VM's objects below `<cache>/<vm>/`.
pub const MANIFEST: &str = "manifest.toml";
pub const FENCE: &str = "fence.toml";
pub const SOURCE_STOPPED: &str = "source-stopped.toml";
pub const APPLIED: &str = "applied.toml";
pub const PLANNED_FAILOVER: &str = "planned-failover.toml";
pub const APPLY_FAILURE: &str = "apply-failure.toml";
pub const SEGMENTS: &str = "segments";

/// A segment as listed: its range (from its name), size and location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub first_seq: u64,
    pub last_seq: u64,
    pub size: u64,
    /// Where it is, for messages: a path or a URL.
    pub location: String,
}

/// Why a segment could not be read from the cache store: the way to it
/// failed, or it is bad. Only a bad one is for the operator to move away;
/// the rest are the store's or the link's, and reading again may work.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The store did not give its bytes (unreachable, timed out, an I/O
    /// error): the segment may be good.
    #[error(transparent)]
    Unreadable(StoreError),
    /// It was listed, and is gone now (pruned, or removed by hand): a
    /// new listing says what there is.
    #[error("segment {location} is gone (removed since it was listed)")]
    Gone { location: String },
    /// Its bytes are not a good segment of this VM (damaged, truncated,
    /// sealed for another, no key for it): reading it again gives the
    /// same.
    #[error(transparent)]
    Damaged(#[from] SegmentError),
}

impl ReadError {
    /// Whether the segment itself is bad, rather than the way to it.
    pub fn is_damaged(&self) -> bool {
        matches!(self, ReadError::Damaged(_))
    }

    /// As an io::Error: the whole account of the failure, with the
    /// filesystem's errno where there is one.
    pub fn into_io_error(self) -> io::Error {
        let kind = match &self {
            ReadError::Unreadable(StoreError::Io { source, .. }) => source.kind(),
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, crate::file::with_causes(&self))
    }
}

/// One VM's part of the cache store: `<cache>/<vm>/` in a directory, the
/// objects under `<prefix>/<vm>/` in a bucket. With a key, segments and
/// the manifest are sealed ([`crate::seal`]).
#[derive(Debug, Clone)]
pub struct CacheDir {
    store: Store,
    vm: String,
    key: Option<Key>,
}

impl CacheDir {
    pub fn new(store: &Store, vm: &str) -> Self {
        CacheDir { store: store.clone(), vm: vm.to_string(), key: None }
    }

    /// Segments and the manifest sealed with `key` (and refused unsealed).
    pub fn sealed_with(mut self, key: Option<Key>) -> Self {
        self.key = key;
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn vm(&self) -> &str {
        &self.vm
    }

    pub fn is_sealed(&self) -> bool {
        self.key.is_some()
    }

    /// Where the VM's objects are: `<cache>/<vm>` or `s3://…/<vm>`.
    pub fn describe(&self) -> String {
        self.store.location(&self.vm)
    }

    /// Where one of the VM's objects is, for messages.
    pub fn location(&self, name: &str) -> String {
        self.store.location(&self.object_key(name))
    }

    fn object_key(&self, name: &str) -> String {
        format!("{}/{name}", self.vm)
    }

    /// The object `name`, decoded by `decode`; `None` if there is none.
    pub fn read_with<T>(
        &self,
        name: &str,
        decode: impl FnOnce(&[u8]) -> Result<T, String>,
    ) -> Result<Option<T>, FileError> {
        let location = PathBuf::from(self.location(name));
        match self.store.get(&self.object_key(name)) {
            Ok(Some(object)) => {
                decode(&object.bytes).map(Some).map_err(|reason| FileError::Damaged { path: location, reason })
            }
            Ok(None) => Ok(None),
            Err(e) => Err(FileError::from_store(location, e)),
        }
    }

    /// A small TOML object; `None` if there is none.
    pub fn read_toml<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Option<T>, FileError> {
        self.read_with(name, crate::file::decode_toml)
    }

    /// Writes a small TOML object whole, replacing any, with a first-line
    /// comment saying who writes it.
    pub fn write_toml<T: Serialize>(&self, name: &str, value: &T, comment: &str) -> Result<(), StoreError> {
        let text = toml::to_string(value).expect("tern's files serialize");
        self.put(name, format!("# {comment}\n{text}").as_bytes(), Put::Overwrite)
    }

    pub fn put(&self, name: &str, bytes: &[u8], mode: Put) -> Result<(), StoreError> {
        self.store.put(&self.object_key(name), bytes, mode)
    }

    /// Removes the object; one not there is not an error.
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        self.store.delete(&self.object_key(name))
    }

    pub fn exists(&self, name: &str) -> Result<bool, StoreError> {
        self.store.exists(&self.object_key(name))
    }

    /// When the object was last written (by the store's clock).
    pub fn modified_unix_ms(&self, name: &str) -> Result<Option<u64>, StoreError> {
        self.store.modified_unix_ms(&self.object_key(name))
    }

    /// The fence, if the VM failed over.
    pub fn read_fence(&self) -> Result<Option<Fence>, FileError> {
        self.read_toml(FENCE)
    }

    /// The source's clean-stop marker, if it left one.
    pub fn read_source_stopped(&self) -> Result<Option<SourceStopped>, FileError> {
        self.read_toml(SOURCE_STOPPED)
    }

    /// The planned failover's request to stop, if one is under way.
    pub fn read_planned_failover(&self) -> Result<Option<PlannedFailover>, FileError> {
        self.read_toml(PLANNED_FAILOVER)
    }

    /// The applier's last failure on this VM, if it is failing.
    pub fn read_apply_failure(&self) -> Result<Option<ApplyFailure>, FileError> {
        self.read_toml(APPLY_FAILURE)
    }

    /// The target's progress, if it published any.
    pub fn read_applied(&self) -> Result<Option<Applied>, FileError> {
        self.read_toml(APPLIED)
    }

    /// The manifest, or `None` if there is none yet.
    pub fn read_manifest(&self) -> Result<Option<Manifest>, FileError> {
        Ok(self.read_manifest_versioned()?.map(|(m, _)| m))
    }

    /// The manifest and its version, for a compare-and-swap update.
    pub fn read_manifest_versioned(&self) -> Result<Option<(Manifest, Version)>, FileError> {
        let location = PathBuf::from(self.location(MANIFEST));
        let object = match self.store.get(&self.object_key(MANIFEST)) {
            Ok(Some(object)) => object,
            Ok(None) => return Ok(None),
            Err(e) => return Err(FileError::from_store(location, e)),
        };
        let damaged = |reason: String| FileError::Damaged { path: location.clone(), reason };
        let text = match (&self.key, seal::is_sealed(&object.bytes)) {
            (Some(key), _) => key.open(&object.bytes, &self.manifest_binding()).map_err(|e| damaged(e.to_string()))?,
            (None, true) => return Err(damaged(SealError::NoKey.to_string())),
            (None, false) => object.bytes,
        };
        Manifest::parse(&location, &String::from_utf8_lossy(&text)).map(|m| Some((m, object.version)))
    }

    /// Writes the manifest (sealed, with a key): `Put::Create` for a new
    /// stream, `Put::Replace` with the version read to add an epoch.
    pub fn write_manifest(&self, manifest: &Manifest, mode: Put) -> Result<(), StoreError> {
        let text = toml::to_string(manifest).expect("a manifest serializes");
        let text = format!("# tern cache manifest: written by `tern ship`, read by `tern apply`\n{text}");
        let bytes = match &self.key {
            Some(key) => key.seal(text.as_bytes(), &self.manifest_binding()),
            None => text.into_bytes(),
        };
        self.put(MANIFEST, &bytes, mode)
    }

    fn manifest_binding(&self) -> Binding<'_> {
        Binding { kind: seal::Kind::Manifest, epoch: 0, first_seq: 0, last_seq: 0, owner: self.vm.as_bytes() }
    }

    /// The segments, in sequence order, by name (not opened). Other
    /// objects are ignored.
    pub fn list_segments(&self) -> Result<Vec<Listed>, StoreError> {
        let prefix = self.object_key(SEGMENTS);
        Ok(self
            .store
            .list(&prefix)?
            .into_iter()
            .filter_map(|l| {
                let (first_seq, last_seq) = segment::parse_file_name(&l.name)?;
                let location = self.store.location(&format!("{prefix}/{}", l.name));
                Some(Listed { first_seq, last_seq, size: l.size, location })
            })
            .collect())
    }

    fn segment_key(&self, first_seq: u64, last_seq: u64) -> String {
        self.object_key(&format!("{SEGMENTS}/{}", segment::file_name(first_seq, last_seq)))
    }

    /// Where a segment is, for messages.
    pub fn segment_location(&self, first_seq: u64, last_seq: u64) -> String {
        self.store.location(&self.segment_key(first_seq, last_seq))
    }

    /// Stores a built segment create-only (sealed, with a key). Another
    /// segment of the same name holding the same records counts as this
    /// one (a restarted shipper sending again what it had sent); other
    /// records under the name are refused — two shippers on one stream.
    pub fn write_segment(
        &self,
        header: &SegmentHeader,
        bytes: &[u8],
        stage: &mut dyn FnMut(Stage) -> io::Result<()>,
    ) -> Result<(), StoreError> {
        let key = self.segment_key(header.first_seq, header.last_seq);
        let sealed;
        let object = match &self.key {
            Some(k) => {
                sealed =
                    k.seal(bytes, &segment_binding(header.epoch, header.first_seq, header.last_seq, &header.vm_id));
                &sealed[..]
            }
            None => bytes,
        };
        match self.store.put_staged(&key, object, Put::Create, stage) {
            Err(StoreError::Exists { location }) => {
                let mine = Segment::decode(bytes, None).ok();
                let theirs = match self.read_segment(header.first_seq, header.last_seq, Some(header.vm_id)) {
                    Ok(theirs) => Some(theirs),
                    // Not read: nothing is known of it yet.
                    Err(ReadError::Unreadable(e)) => return Err(e),
                    Err(_) => None,
                };
                match (mine, theirs) {
                    (Some(a), Some(b)) if a.header.epoch == b.header.epoch && a.same_records(&b) => {
                        log::info!("{location} was already shipped with the same records");
                        // By an attempt that may not have synced it.
                        self.store.make_durable(&key)
                    }
                    _ => Err(StoreError::Exists { location }),
                }
            }
            other => other,
        }
    }

    /// Reads, opens (with a key) and decodes one segment.
    pub fn read_segment(
        &self,
        first_seq: u64,
        last_seq: u64,
        expect_vm: Option<[u8; 16]>,
    ) -> Result<Segment, ReadError> {
        let location = PathBuf::from(self.segment_location(first_seq, last_seq));
        let bytes = self.read_segment_bytes(first_seq, last_seq, expect_vm)?;
        Ok(Segment::decode(&bytes, expect_vm).map_err(|e| e.with_path(&location))?)
    }

    /// Only the header of one segment (the whole object is read from a
    /// bucket or when sealed).
    pub fn read_segment_header(
        &self,
        first_seq: u64,
        last_seq: u64,
        vm_id: Option<[u8; 16]>,
    ) -> Result<SegmentHeader, ReadError> {
        match (self.store.as_dir(), &self.key) {
            (Some(_), None) => self.read_file_header(first_seq, last_seq),
            _ => self.read_segment(first_seq, last_seq, vm_id).map(|s| s.header),
        }
    }

    /// [`CacheDir::read_segment_header`] from a directory: the file's
    /// first bytes and its length.
    fn read_file_header(&self, first_seq: u64, last_seq: u64) -> Result<SegmentHeader, ReadError> {
        let location = self.segment_location(first_seq, last_seq);
        let path = Path::new(&location);
        let unreadable = |source: io::Error| match source.kind() {
            io::ErrorKind::NotFound => ReadError::Gone { location: location.clone() },
            _ => ReadError::Unreadable(StoreError::Io { what: "read", location: location.clone(), source }),
        };
        let mut file = fs::File::open(path).map_err(unreadable)?;
        let len = file.metadata().map_err(unreadable)?.len();
        let mut head = Vec::with_capacity(segment::HEADER_SIZE);
        (&mut file).take(segment::HEADER_SIZE as u64).read_to_end(&mut head).map_err(unreadable)?;
        Ok(segment::header_of_file(&head, len).map_err(|e| e.with_path(path))?)
    }

    fn read_segment_bytes(&self, first_seq: u64, last_seq: u64, vm_id: Option<[u8; 16]>) -> Result<Vec<u8>, ReadError> {
        let location = PathBuf::from(self.segment_location(first_seq, last_seq));
        let fail = |reason: String| ReadError::Damaged(SegmentError::at(0, reason).with_path(&location));
        let object = match self.store.get(&self.segment_key(first_seq, last_seq)) {
            Ok(Some(object)) => object.bytes,
            Ok(None) => return Err(ReadError::Gone { location: location.display().to_string() }),
            Err(e) => return Err(ReadError::Unreadable(e)),
        };
        match (&self.key, seal::is_sealed(&object)) {
            (Some(key), _) => {
                // The epoch is in clear (and under the tag): the segment
                // must open as exactly where its name and epoch put it.
                let epoch = seal::sealed_epoch(&object).unwrap_or(0);
                let vm = vm_id.ok_or_else(|| fail("a sealed segment needs the VM's id to open".into()))?;
                key.open(&object, &segment_binding(epoch, first_seq, last_seq, &vm)).map_err(|e| fail(e.to_string()))
            }
            (None, true) => Err(fail(SealError::NoKey.to_string())),
            (None, false) => Ok(object),
        }
    }

    /// Removes one (applied) segment.
    pub fn remove_segment(&self, first_seq: u64, last_seq: u64) -> Result<(), StoreError> {
        self.store.delete(&self.segment_key(first_seq, last_seq))
    }

    /// The header of the newest segment, if any.
    pub fn newest_segment(
        &self,
        vm_id: Option<[u8; 16]>,
    ) -> Result<Option<Result<SegmentHeader, ReadError>>, StoreError> {
        Ok(self.list_segments()?.last().map(|l| self.read_segment_header(l.first_seq, l.last_seq, vm_id)))
    }

    /// Makes the segment `first_seq..=last_seq`, which a previous run
    /// wrote, durable before its records leave the journal (that run may
    /// have died between linking it and syncing its directory).
    pub fn make_segment_durable(&self, first_seq: u64, last_seq: u64) -> Result<(), StoreError> {
        self.store.make_durable(&self.segment_key(first_seq, last_seq))
    }

    /// Removes segments a crashed writer left half-written in a directory
    /// store (an object store never shows a partial object). Returns how
    /// many.
    pub fn remove_temporaries(&self) -> io::Result<usize> {
        let Some(root) = self.store.as_dir() else { return Ok(0) };
        let dir = root.join(&self.vm).join(SEGMENTS);
        let mut n = 0;
        for entry in crate::dir_entries(&dir)? {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                fs::remove_file(dir.join(&*name))?;
                n += 1;
            }
        }
        Ok(n)
    }
}

fn segment_binding(epoch: u64, first_seq: u64, last_seq: u64, vm_id: &[u8; 16]) -> Binding<'_> {
    Binding { kind: seal::Kind::Segment, epoch, first_seq, last_seq, owner: vm_id }
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
            launch: None,
            disks: vec![ManifestDisk {
                name: "root".into(),
                size: 1 << 30,
                source: None,
                seed: Some("failover/active/root.img".into()),
            }],
            starts_in_window: true,
            epochs: vec![
                Epoch { number: 1, first_seq: 1, reason: "replication enabled".into(), closes_from: 0 },
                Epoch { number: 2, first_seq: 500, reason: "host crash".into(), closes_from: 0 },
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
    fn a_manifest_carries_launch_settings_and_refuses_bad_ones() {
        let p = Path::new("/c/vm1/manifest.toml");
        let mut m = manifest();
        let plain = toml::to_string(&m).unwrap();
        assert!(!plain.contains("launch") && !plain.contains("network"), "defaults are not written: {plain}");
        m.launch = Some(LaunchConfig {
            cpus: 4,
            nics: vec![tern_driver::launch::parse_nic("br-src,mac=52:54:00:00:00:07").unwrap()],
            ..Default::default()
        });
        m.policy.network.insert("br-src".into(), "br-dr".into());
        let text = toml::to_string(&m).unwrap();
        assert_eq!(Manifest::parse(p, &text).unwrap(), m);
        for (from, to) in [
            ("mac = \"52:54:00:00:00:07\"", "mac = \"01:54:00:00:00:07\""),
            ("mac = \"52:54:00:00:00:07\"", ""),
            ("bridge = \"br-src\"", "bridge = \"br/src\""),
            ("br-src = \"br-dr\"", "br-other = \"br-dr\""),
        ] {
            assert!(text.contains(from), "{from} in {text}");
            let err = Manifest::parse(p, &text.replace(from, to)).unwrap_err().to_string();
            assert!(err.starts_with("/c/vm1/manifest.toml is damaged: "), "{err}");
        }
    }

    #[test]
    fn listing_ignores_temporaries_and_junk_and_sorts_by_seq() {
        let dir = tempfile::tempdir().unwrap();
        let c = CacheDir::new(&Store::dir(dir.path()), "vm1");
        assert!(c.list_segments().unwrap().is_empty());
        let segments = dir.path().join("vm1").join(SEGMENTS);
        fs::create_dir_all(&segments).unwrap();
        for (a, b) in [(11, 20), (1, 10), (21, 21)] {
            fs::write(segments.join(segment::file_name(a, b)), b"x").unwrap();
        }
        let tmp = segments.join(format!(".{}.tmp", segment::file_name(22, 30)));
        fs::write(&tmp, b"x").unwrap();
        fs::write(segments.join("notes.txt"), b"x").unwrap();
        let firsts: Vec<u64> = c.list_segments().unwrap().iter().map(|s| s.first_seq).collect();
        assert_eq!(firsts, [1, 11, 21]);
        assert_eq!(
            c.list_segments().unwrap()[0].location,
            segments.join(segment::file_name(1, 10)).display().to_string()
        );
        assert_eq!(c.remove_temporaries().unwrap(), 1);
        assert!(!tmp.exists());
    }

    #[test]
    fn a_sealed_cache_refuses_plain_objects_and_a_plain_one_sealed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::dir(dir.path());
        let key_path = dir.path().join("vm1.key");
        Key::generate(&key_path).unwrap();
        let sealed = CacheDir::new(&store, "vm1").sealed_with(Some(Key::load(&key_path).unwrap()));
        let plain = CacheDir::new(&store, "vm1");
        let mut m = manifest();
        m.name = "vm1".into();
        sealed.write_manifest(&m, Put::Create).unwrap();
        assert_eq!(sealed.read_manifest().unwrap().unwrap(), m);
        let e = plain.read_manifest().unwrap_err().to_string();
        assert!(e.contains("manifest.toml is damaged") && e.contains("no key was given"), "{e}");
        // Another VM's sealed manifest, moved under this name: refused.
        let other = CacheDir::new(&store, "vm2").sealed_with(Some(Key::load(&key_path).unwrap()));
        let bytes = fs::read(dir.path().join("vm1/manifest.toml")).unwrap();
        fs::create_dir_all(dir.path().join("vm2")).unwrap();
        fs::write(dir.path().join("vm2/manifest.toml"), bytes).unwrap();
        assert!(other.read_manifest().unwrap_err().to_string().contains("does not authenticate"));
        plain.write_manifest(&m, Put::Overwrite).unwrap();
        assert!(sealed.read_manifest().unwrap_err().to_string().contains("not sealed"));
    }

    #[test]
    fn a_segment_that_cannot_be_read_is_not_called_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::dir(dir.path());
        let key_path = dir.path().join("vm1.key");
        Key::generate(&key_path).unwrap();
        let segments = dir.path().join("vm1").join(SEGMENTS);
        fs::create_dir_all(&segments).unwrap();
        let path = segments.join(segment::file_name(1, 10));
        // Only the header from a plain directory; the whole object sealed.
        let sealed = CacheDir::new(&store, "vm1").sealed_with(Some(Key::load(&key_path).unwrap()));
        for c in [CacheDir::new(&store, "vm1"), sealed] {
            let read = || c.read_segment_header(1, 10, Some([7; 16])).unwrap_err();
            fs::write(&path, b"not a segment").unwrap();
            assert!(read().is_damaged(), "{}", read());
            fs::remove_file(&path).unwrap();
            assert!(matches!(read(), ReadError::Gone { .. }), "{}", read());
            // (A directory in its place: the read fails, EISDIR.)
            fs::create_dir(&path).unwrap();
            assert!(matches!(read(), ReadError::Unreadable(_)), "{}", read());
            fs::remove_dir(&path).unwrap();
        }
    }
}
