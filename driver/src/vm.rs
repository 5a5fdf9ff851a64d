//! A protected VM: its configuration (`<state>/<vm>/vm.toml`), where its
//! files live, and `enable`, which creates them.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bitmap::{DirtyBitmap, DEFAULT_REGION_SIZE};
use crate::fs::{create_dir_durably, sync_dir, write_durably};
use crate::image::Image;
use crate::journal::Journal;
pub use crate::launch::{LaunchConfig, NicConfig};
use crate::units::{Rate, Size};
use crate::{Error, Result};

/// The version of `vm.toml` this tern writes and reads.
pub const CONFIG_VERSION: u32 = 1;
/// Most disks one VM may have (the journal's disk field is 16 bits; this is
/// the sane limit).
pub const MAX_DISKS: usize = 64;

/// `vm.toml`: everything `tern serve` and `tern ship` need to know about one
/// protected VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VmConfig {
    /// Format version of this file. Default: none, required.
    pub version: u32,
    /// The VM's name: letters, digits, `.`, `_`, `-`; at most 64 bytes.
    pub name: String,
    /// A unique id, written into the journal and every segment so files of
    /// different VMs are never mixed up.
    pub id: uuid::Uuid,
    /// The cache store segments are shipped to: a directory, or
    /// `s3://bucket/prefix` / `az://container/prefix`.
    pub cache: PathBuf,
    /// The key file segments and the manifest are sealed with (`tern
    /// keygen`); none: checksummed only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// The target site directory replicas and points live in.
    pub target: PathBuf,
    #[serde(default)]
    pub journal: JournalConfig,
    #[serde(default)]
    pub policy: Policy,
    /// How application-consistent points of the VM are taken
    /// (`[app-points]`): optional, added without a version bump.
    #[serde(default, skip_serializing_if = "AppPoints::is_default")]
    pub app_points: AppPoints,
    /// How a failover starts the VM (`[launch]`): optional, added without
    /// a version bump; absent means 2 GiB, 2 CPUs, no NIC.
    #[serde(default, skip_serializing_if = "LaunchConfig::is_default")]
    pub launch: LaunchConfig,
    /// The disks, in the order their index appears in journal records.
    #[serde(rename = "disk")]
    pub disks: Vec<DiskConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct JournalConfig {
    /// Size of the journal ring's data area. Default: 1GiB.
    pub size: Size,
    /// Bytes of disk one dirty-bitmap bit stands for. Default: 64KiB.
    pub region_size: Size,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig { size: Size::gib(1), region_size: Size(DEFAULT_REGION_SIZE as u64) }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct Policy {
    /// Time between crash-consistent recovery points. Default: 5m.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How long recovery points are kept. Default: 24h.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Every point younger than this is kept; older ones are thinned to one
    /// per hour until `retention`. Default: 2h.
    #[serde(with = "humantime_serde")]
    pub keep_all: Duration,
    /// zstd level segments are compressed with (negative: zstd's fast
    /// levels); with `compression-min` and `compression-max`, the level
    /// `tern ship` starts at. Default: 1.
    pub compression_level: i32,
    /// With `compression-max`: the level follows the bottleneck between
    /// these two (lower while the CPU holds the shipper back, higher while
    /// the link does). Default: none (a fixed level).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression_min: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression_max: Option<i32>,
    /// `tern ship` cuts a segment at this many bytes of record data...
    /// Default: 8MiB.
    pub segment_size: Size,
    /// ...or when its oldest record is this old, so the lag stays low when
    /// writes are few. Default: 250ms.
    #[serde(with = "humantime_serde")]
    pub segment_age: Duration,
    /// Bytes per second `tern ship` may send to the cache store (segments,
    /// as stored); `None`: as fast as it can. `tern ship --max-rate`
    /// overrides it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rate: Option<Rate>,
    /// The network map: source bridge → the target bridge a real failover
    /// puts the VM's NICs on that were on it (a NIC on a bridge not listed
    /// keeps its bridge's name). Default: empty.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub network: BTreeMap<String, String>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            interval: Duration::from_secs(300),
            retention: Duration::from_secs(24 * 3600),
            keep_all: Duration::from_secs(2 * 3600),
            compression_level: 1,
            compression_min: None,
            compression_max: None,
            segment_size: Size::mib(8),
            segment_age: Duration::from_millis(250),
            max_rate: None,
            network: BTreeMap::new(),
        }
    }
}

/// `[app-points]`: how the VM's application-consistent points are taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct AppPoints {
    /// Freeze the guest's filesystems for every app point of the VM (`tern
    /// tag`, scheduled ones, group points) through its qemu guest agent:
    /// `qga:<socket>`. Default: none (whoever tags quiesces the
    /// application).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freeze: Option<String>,
    /// How long a freeze may take before the point is taken
    /// crash-consistent instead (and the guest thawed). Default: 10s.
    #[serde(with = "humantime_serde")]
    pub freeze_timeout: Duration,
    /// `tern serve` takes an app point labelled `scheduled` this often.
    /// Default: none.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
}

/// How long a guest freeze may take: the guest's writes wait meanwhile,
/// and a service's watchdog must outlast it with the thaw.
pub fn check_freeze_timeout(timeout: Duration) -> std::result::Result<(), String> {
    if (Duration::from_secs(1)..=Duration::from_secs(60)).contains(&timeout) {
        Ok(())
    } else {
        Err(format!("freeze-timeout {timeout:?} must be between 1s and 60s"))
    }
}

impl AppPoints {
    pub fn is_default(&self) -> bool {
        *self == AppPoints::default()
    }

    /// The agent must be `qga:` and an absolute socket path; a freeze gets
    /// 1 s to 60 s; scheduled points come at most every 10 s, and only with
    /// a freeze (a scheduled tag nobody quiesces is a crash point).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if let Some(f) = &self.freeze {
            match f.strip_prefix("qga:") {
                Some(p) if Path::new(p).is_absolute() => {}
                _ => {
                    return Err(format!(
                        "app-points freeze {f:?} must be qga:SOCKET with an absolute path (the host side of the VM's qemu guest agent channel)"
                    ))
                }
            }
        }
        check_freeze_timeout(self.freeze_timeout).map_err(|e| format!("app-points {e}"))?;
        if self.interval.is_some_and(|i| i < Duration::from_secs(10)) {
            return Err("app-points interval must be at least 10s".into());
        }
        if self.interval.is_some() && self.freeze.is_none() {
            return Err("app-points interval needs freeze: a scheduled app point nobody quiesces is only crash-consistent (crash points come every policy interval already)".into());
        }
        Ok(())
    }
}

impl Default for AppPoints {
    fn default() -> Self {
        AppPoints { freeze: None, freeze_timeout: Duration::from_secs(10), interval: None }
    }
}

/// A bandwidth limit tern can keep: below 64KB/s one 8MiB segment takes
/// minutes and the RPO goes with it; above 100GB/s it limits nothing.
pub fn check_max_rate(rate: Rate) -> std::result::Result<(), String> {
    if (64_000..=100_000_000_000).contains(&rate.bytes_per_second()) {
        Ok(())
    } else {
        Err(format!("max-rate {rate} must be between 64KB/s and 100GB/s"))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DiskConfig {
    /// The disk's name, also its NBD export name.
    pub name: String,
    /// The source image (a file or block device).
    pub path: PathBuf,
    /// Its size in bytes, checked against the image at every start.
    pub size: u64,
    /// Where the target site may start this disk's replica from instead of
    /// an empty file (`tern reprotect`: the old source image): a path at
    /// the target site, absolute or relative to `<target>/<vm>/`. A
    /// checksum comparison then sends only what differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<PathBuf>,
}

/// Checks a VM or disk name: it becomes a path component and an NBD export
/// name, so only a conservative alphabet is allowed.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "invalid {what} name {name:?}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )))
    }
}

impl VmConfig {
    /// Checks everything serde cannot: names, paths, sizes, uniqueness.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| Error::Config { path: path.to_owned(), reason };
        if self.version != CONFIG_VERSION {
            return Err(bad(format!(
                "version {} is not supported (this tern reads version {CONFIG_VERSION})",
                self.version
            )));
        }
        validate_name("VM", &self.name).map_err(|e| bad(e.to_string()))?;
        if self.disks.is_empty() || self.disks.len() > MAX_DISKS {
            return Err(bad(format!("a VM needs between 1 and {MAX_DISKS} disks, found {}", self.disks.len())));
        }
        for (i, d) in self.disks.iter().enumerate() {
            validate_name("disk", &d.name).map_err(|e| bad(e.to_string()))?;
            if self.disks[..i].iter().any(|o| o.name == d.name) {
                return Err(bad(format!("disk name '{}' appears twice", d.name)));
            }
            if !d.path.is_absolute() {
                return Err(bad(format!("disk '{}': path {} is not absolute", d.name, d.path.display())));
            }
            if d.size == 0 {
                return Err(bad(format!("disk '{}' has size 0", d.name)));
            }
            if let Some(seed) = &d.seed {
                validate_seed(seed).map_err(|e| bad(format!("disk '{}': {e}", d.name)))?;
            }
        }
        self.app_points.validate().map_err(bad)?;
        for (what, p) in [("cache", &self.cache), ("target", &self.target)] {
            if !(p.is_absolute() || what == "cache" && is_store_url(p)) {
                return Err(bad(format!("{what} path {} is not absolute", p.display())));
            }
        }
        let size = self.journal.size.bytes();
        if !(16 * 1024..=crate::journal::format::MAX_CAPACITY).contains(&size) || !size.is_multiple_of(4096) {
            return Err(bad(format!(
                "journal size {} must be a multiple of 4KiB between 16KiB and 1TiB",
                self.journal.size
            )));
        }
        let region = self.journal.region_size.bytes();
        if !region.is_power_of_two() || !(4096..=1 << 30).contains(&region) {
            return Err(bad(format!(
                "journal region-size {} must be a power of two between 4KiB and 1GiB",
                self.journal.region_size
            )));
        }
        if !(-7..=22).contains(&self.policy.compression_level) {
            return Err(bad(format!(
                "policy compression-level {} is not a zstd level (-7 to 22)",
                self.policy.compression_level
            )));
        }
        match (self.policy.compression_min, self.policy.compression_max) {
            (None, None) => {}
            (Some(min), Some(max)) if (-7..=22).contains(&min) && min <= max && max <= 22 => {
                if !(min..=max).contains(&self.policy.compression_level) {
                    return Err(bad(format!(
                        "policy compression-level {} is outside compression-min..compression-max ({min}..{max})",
                        self.policy.compression_level
                    )));
                }
            }
            (min, max) => {
                return Err(bad(format!(
                    "policy compression-min and compression-max go together, as zstd levels with min <= max in -7..22 (got {min:?} and {max:?})"
                )))
            }
        }
        if !(4096..=64 << 20).contains(&self.policy.segment_size.bytes()) {
            return Err(bad(format!(
                "policy segment-size {} must be between 4KiB and 64MiB",
                self.policy.segment_size
            )));
        }
        if self.policy.segment_age < Duration::from_millis(1) || self.policy.segment_age > Duration::from_secs(600) {
            return Err(bad("policy segment-age must be between 1ms and 10m".into()));
        }
        if let Some(rate) = self.policy.max_rate {
            check_max_rate(rate).map_err(bad)?;
        }
        // With the MACs the manifest will carry: a generated one may equal
        // another NIC's given one.
        self.launch.with_macs(&self.id).validate(&self.policy.network).map_err(bad)?;
        // Builds with failpoints (the torture suite's) take points faster,
        // so a trial of seconds has several.
        let shortest = if crate::fail::ENABLED { Duration::from_millis(100) } else { Duration::from_secs(10) };
        if self.policy.interval < shortest {
            return Err(bad(format!("policy interval must be at least {shortest:?}")));
        }
        Ok(())
    }

    /// Reads and validates a `vm.toml`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path).map_err(|source| Error::Open { path: path.to_owned(), source })?;
        let cfg: VmConfig =
            toml::from_str(&text).map_err(|e| Error::Config { path: path.to_owned(), reason: e.to_string() })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn disk_index(&self, name: &str) -> Option<usize> {
        self.disks.iter().position(|d| d.name == name)
    }
}

/// A replica seed path (it travels to the target site in the manifest):
/// absolute, or relative without `..`, so it cannot climb out of the VM's
/// target directory.
pub fn validate_seed(seed: &Path) -> std::result::Result<(), String> {
    use std::path::Component;
    let ok = !seed.as_os_str().is_empty()
        && seed.as_os_str().len() <= 4096
        && seed.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_) | Component::CurDir));
    if ok {
        Ok(())
    } else {
        Err(format!("seed {} must be an absolute path or a relative one without '..'", seed.display()))
    }
}

/// Where one VM's source-side state lives: `<state>/<vm>/`, and where its
/// journal's live ring is restored when it has none.
#[derive(Debug, Clone)]
pub struct VmPaths {
    dir: PathBuf,
    ring_dir: PathBuf,
}

impl VmPaths {
    /// `name` is validated first, so it can never climb out of `state`.
    /// Rings are restored in [`crate::journal::live::default_ring_dir`].
    pub fn new(state: &Path, name: &str) -> Result<Self> {
        validate_name("VM", name)?;
        Ok(VmPaths { dir: state.join(name), ring_dir: crate::journal::live::default_ring_dir() })
    }

    /// The same VM, with live rings restored in `dir` (tests keep theirs in
    /// their own temporary directory).
    /// Where this VM's live ring is restored when it has none.
    pub fn ring_dir(&self) -> &Path {
        &self.ring_dir
    }

    pub fn with_ring_dir(mut self, dir: &Path) -> Self {
        self.ring_dir = dir.to_owned();
        self
    }

    /// The same VM's files in `dir`, where its state directory was moved
    /// (by `tern disable` or `tern failback`, on the way out).
    pub fn moved_to(&self, dir: &Path) -> Self {
        VmPaths { dir: dir.to_owned(), ring_dir: self.ring_dir.clone() }
    }

    /// Opens the VM's journal (durable file and live ring).
    pub fn open_journal(&self) -> Result<Journal> {
        Journal::open(&self.journal(), &self.ring_dir)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("vm.toml")
    }
    pub fn journal(&self) -> PathBuf {
        self.dir.join("journal")
    }
    pub fn dirty(&self, disk: &str) -> PathBuf {
        self.dir.join(format!("dirty.{disk}"))
    }
    /// Written by `tern failback` before it retires this direction's stream
    /// in the cache (and with it the fence): `tern serve` refuses the VM
    /// while it is there.
    pub fn failing_back(&self) -> PathBuf {
        self.dir.join("failing-back")
    }
    pub fn nbd_socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }
    /// Held (flock) by the one front-end serving this VM.
    pub fn frontend_lock(&self) -> PathBuf {
        self.dir.join("frontend.lock")
    }

    /// Held (flock) by the one consumer of the journal (`tern ship`, or
    /// `tern journal fold`).
    /// Held by a `tern tag` while it appends; names its reservation (see
    /// `tag`).
    pub fn tag_lock(&self) -> PathBuf {
        self.dir.join("tag.lock")
    }

    pub fn consumer_lock(&self) -> PathBuf {
        self.dir.join("consumer.lock")
    }

    /// Loads the VM's configuration, with an operator-friendly error when
    /// the VM was never enabled.
    pub fn load_config(&self) -> Result<VmConfig> {
        let path = self.config();
        if !path.exists() {
            let name = self.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            return Err(Error::Invalid(format!(
                "VM '{name}' is not enabled here (no {}); run `tern enable {name} --disk …` first, or pass the right --state",
                path.display()
            )));
        }
        VmConfig::load(&path)
    }
}

/// What the operator asks `tern enable` for.
#[derive(Debug, Clone)]
pub struct EnableSpec {
    pub name: String,
    /// `(name, path)` of each disk.
    pub disks: Vec<(String, PathBuf)>,
    pub cache: PathBuf,
    /// The sealing key file, if any.
    pub key: Option<PathBuf>,
    pub target: PathBuf,
    pub journal: JournalConfig,
    pub policy: Policy,
    pub app_points: AppPoints,
    /// Launch settings; NICs without a MAC address get a generated one.
    pub launch: LaunchConfig,
    pub initial_sync: InitialSync,
}

/// Whether a cache location names an object store (`s3://…`, `az://…`)
/// rather than a directory.
pub fn is_store_url(location: &Path) -> bool {
    location.to_str().is_some_and(|s| s.contains("://"))
}

/// How the target's replica is brought level with the source at first.
#[derive(Debug, Clone, Default)]
pub enum InitialSync {
    /// The replica starts empty: every allocated region is sent.
    #[default]
    Allocated,
    /// The replica starts as a copy of an older version of each disk (disk
    /// name → seed path at the target site, see [`DiskConfig::seed`]):
    /// a checksum comparison finds the regions that differ and only those
    /// are sent (`tern reprotect`, `tern failback`).
    Compare { seeds: std::collections::BTreeMap<String, PathBuf> },
}

/// What `enable` did, for the operator.
#[derive(Debug, Clone)]
pub struct Enabled {
    pub config: VmConfig,
    /// Per disk: bytes of allocated data marked for the initial sync.
    pub initial_sync_bytes: Vec<u64>,
}

/// A file's identity: its device and inode (two paths, one file).
fn file_id(path: &Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).map_err(|source| Error::Open { path: path.to_owned(), source })?;
    Ok((m.dev(), m.ino()))
}

/// Every disk of the other VMs in `state`: (VM, disk, file identity). A
/// VM whose `vm.toml` cannot be read, or whose image is gone, is skipped.
fn protected_images(state: &Path, except: &str) -> Vec<(String, String, (u64, u64))> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(state) else { return out };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == except || validate_name("VM", &name).is_err() {
            continue;
        }
        let Ok(config) = VmConfig::load(&e.path().join("vm.toml")) else { continue };
        for d in config.disks {
            if let Ok(id) = file_id(&d.path) {
                out.push((config.name.clone(), d.name, id));
            }
        }
    }
    out
}

/// Refuses an image file in a format other than raw: tern mirrors the
/// bytes a client writes, so a qcow2 (or VMDK, VHDX) file would be served
/// as its container, not the disk inside. Block devices are raw.
fn refuse_image_formats(image: &Image, disk: &str) -> Result<()> {
    let mut head = [0u8; 8];
    if image.size() < head.len() as u64 || image.read_at(&mut head, 0).is_err() {
        return Ok(());
    }
    let format = match &head {
        [b'Q', b'F', b'I', 0xfb, ..] => "qcow2",
        [b'K', b'D', b'M', b'V', ..] => "VMDK",
        b"vhdxfile" => "VHDX",
        _ => return Ok(()),
    };
    let path = image.path().display();
    Err(Error::Invalid(format!(
        "disk '{disk}': {path} is a {format} image, not raw: tern protects raw images and block devices; convert it first (qemu-img convert -O raw {path} {path}.raw) and protect the raw file"
    )))
}

/// Registers a VM: writes `vm.toml`, creates the journal and the dirty
/// bitmaps, and marks every allocated region dirty (the initial sync, which
/// the shipper carries out as a resync). Nothing is left half-made: files
/// are built in a temporary directory that is renamed into place last.
pub fn enable(state: &Path, spec: &EnableSpec) -> Result<Enabled> {
    enable_at(&VmPaths::new(state, &spec.name)?, spec)
}

/// [`enable`] with the paths given (and so the directory live rings are
/// restored in); they must be those of `spec.name`.
pub fn enable_at(paths: &VmPaths, spec: &EnableSpec) -> Result<Enabled> {
    validate_name("VM", &spec.name)?;
    let state = match paths.dir().parent() {
        Some(state) if paths.dir().file_name().is_some_and(|n| n == spec.name.as_str()) => state,
        _ => {
            return Err(Error::Invalid(format!(
                "{} is not the state directory of VM '{}'",
                paths.dir().display(),
                spec.name
            )))
        }
    };
    if paths.dir().exists() {
        return Err(Error::Invalid(format!(
            "VM '{}' is already enabled ({} exists); pick another name or remove that directory after stopping its services",
            spec.name,
            paths.dir().display()
        )));
    }
    let absolute = |p: &Path| -> Result<PathBuf> {
        std::path::absolute(p).map_err(|source| Error::Open { path: p.to_owned(), source })
    };
    let mut disks: Vec<DiskConfig> = Vec::new();
    let mut images = Vec::new();
    if let InitialSync::Compare { seeds } = &spec.initial_sync {
        if let Some(name) = seeds.keys().find(|s| !spec.disks.iter().any(|(d, _)| d == *s)) {
            return Err(Error::Invalid(format!("a seed names disk '{name}', but VM '{}' has no such disk", spec.name)));
        }
    }
    let mut ids = Vec::new();
    let protected = protected_images(state, &spec.name);
    for (name, path) in &spec.disks {
        validate_name("disk", name)?;
        let path = fs::canonicalize(path).map_err(|source| Error::Open { path: path.clone(), source })?;
        // Read-only: enable only learns the size and the allocated extents.
        let image = Image::open_read_only(&path)?;
        if image.size() == 0 {
            return Err(Error::Invalid(format!("disk '{name}': {} is empty", path.display())));
        }
        let id = file_id(&path)?;
        if let Some(i) = ids.iter().position(|other| *other == id) {
            return Err(Error::Invalid(format!(
                "disks '{}' and '{name}' are the same file ({}): give each disk its own image",
                disks[i].name,
                path.display()
            )));
        }
        ids.push(id);
        if let Some((vm, disk)) = protected.iter().find(|(_, _, other)| *other == id).map(|(v, d, _)| (v, d)) {
            return Err(Error::Invalid(format!(
                "disk '{name}': {} is already protected as disk '{disk}' of VM '{vm}'; one image can be protected once (`tern disable {vm}` first to move it)",
                path.display()
            )));
        }
        refuse_image_formats(&image, name)?;
        let seed = match &spec.initial_sync {
            InitialSync::Compare { seeds } => seeds.get(name).cloned(),
            InitialSync::Allocated => None,
        };
        disks.push(DiskConfig { name: name.clone(), path, size: image.size(), seed });
        images.push(image);
    }
    let id = uuid::Uuid::new_v4();
    let config = VmConfig {
        version: CONFIG_VERSION,
        name: spec.name.clone(),
        id,
        cache: if is_store_url(&spec.cache) { spec.cache.clone() } else { absolute(&spec.cache)? },
        key: spec.key.as_deref().map(absolute).transpose()?,
        target: absolute(&spec.target)?,
        journal: spec.journal.clone(),
        policy: spec.policy.clone(),
        app_points: spec.app_points.clone(),
        launch: spec.launch.with_macs(&id),
        disks,
    };
    // Not yet a file: a bad setting is the command line's, not vm.toml's.
    config.validate(&paths.config()).map_err(|e| match e {
        Error::Config { reason, .. } => Error::Invalid(format!("VM '{}': {reason}", spec.name)),
        other => other,
    })?;

    create_dir_durably(state)?;
    let tmp = state.join(format!(".{}.enabling-{}", spec.name, std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).map_err(|source| Error::Create { path: tmp.clone(), source })?;
    let built = (|| -> Result<Vec<u64>> {
        let staged = VmPaths { dir: tmp.clone(), ring_dir: paths.ring_dir.clone() };
        Journal::create(&staged.journal(), *config.id.as_bytes(), config.journal.size.bytes())?;
        let mut marked = Vec::new();
        let compare = matches!(spec.initial_sync, InitialSync::Compare { .. });
        for (disk, image) in config.disks.iter().zip(&images) {
            let path = staged.dirty(&disk.name);
            DirtyBitmap::create(&path, disk.size, config.journal.region_size.bytes() as u32)?;
            let bitmap = DirtyBitmap::open(&path, disk.size)?;
            let mut bytes = 0;
            if !compare {
                for (offset, len) in image.data_ranges()? {
                    bitmap.mark(offset, len);
                    bytes += len;
                }
            }
            bitmap.sync()?;
            marked.push(bytes);
        }
        if compare || marked.iter().any(|&b| b > 0) {
            // The replica starts empty: inconsistent until the initial sync
            // is done. The window opens before anything else is journaled
            // (a tag before the first front-end must not become a point).
            let journal = staged.open_journal()?;
            let opener = crate::journal::NewRecord {
                disk: 0,
                kind: crate::journal::RecordKind::Resync,
                offset: 0,
                length: 0,
                flags: crate::journal::RESYNC_OPEN,
            };
            journal.append(&opener, &[]).ok_or_else(|| Error::Invalid("a new journal took no record".into()))?;
            journal.set_window_open(true);
            if compare {
                // `tern ship` asks the target for the seeded replica's
                // hashes and marks what differs; the window stays open
                // until that is sent.
                journal.set_flags(crate::journal::FLAG_CHECKSUM_RESYNC);
            }
            journal.sync()?;
        }
        let text =
            toml::to_string_pretty(&config).map_err(|e| Error::Invalid(format!("cannot encode vm.toml: {e}")))?;
        write_durably(&staged.config(), text.as_bytes())?;
        Ok(marked)
    })();
    let marked = match built {
        Ok(m) => m,
        Err(e) => {
            let _ = crate::journal::live::retire(&tmp.join("journal"));
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    fs::rename(&tmp, paths.dir()).map_err(|source| Error::Create { path: paths.dir().to_owned(), source })?;
    sync_dir(state)?;
    if crate::journal::live::link_path(&paths.journal()).exists() {
        // The ring was made under the temporary name: opening it at the
        // final one records its owner there (a sweep would otherwise take
        // it for the ring of a removed VM).
        paths.open_journal()?;
    }
    Ok(Enabled { config, initial_sync_bytes: marked })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    /// `vm1`'s paths under `<dir>/state`, its live rings in `<dir>/rings`.
    fn vm1(dir: &Path) -> VmPaths {
        VmPaths::new(&dir.join("state"), "vm1").unwrap().with_ring_dir(&dir.join("rings"))
    }

    fn spec(dir: &Path, disks: Vec<(String, PathBuf)>) -> EnableSpec {
        EnableSpec {
            name: "vm1".into(),
            disks,
            cache: dir.join("cache"),
            key: None,
            target: dir.join("target"),
            journal: JournalConfig { size: Size::kib(64), ..Default::default() },
            policy: Policy::default(),
            app_points: Default::default(),
            launch: LaunchConfig::default(),
            initial_sync: InitialSync::Allocated,
        }
    }

    #[test]
    fn enable_writes_config_and_marks_allocated_regions() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("a.img");
        let f = File::create(&img).unwrap();
        f.set_len(4 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[1; 4096], 1 << 20).unwrap();
        let done = enable_at(&vm1(d.path()), &spec(d.path(), vec![("disk0".into(), img)])).unwrap();
        assert_eq!(done.initial_sync_bytes[0] % 4096, 0);
        assert!(done.initial_sync_bytes[0] >= 4096);
        let paths = vm1(d.path());
        let cfg = paths.load_config().unwrap();
        assert_eq!(cfg, done.config);
        let bm = DirtyBitmap::open(&paths.dirty("disk0"), 4 << 20).unwrap();
        assert!(bm.is_dirty(16)); // region of offset 1 MiB
        assert!(!bm.is_dirty(0));
        // The initial sync's resync window is open before anything else
        // can be journaled.
        let journal = paths.open_journal().unwrap();
        assert!(journal.window_open());
        let first = journal.cursor(journal.tail()).next(&mut Vec::new()).unwrap().unwrap();
        assert_eq!(
            (first.seq, first.kind, first.flags),
            (1, crate::journal::RecordKind::Resync, crate::journal::RESYNC_OPEN)
        );
    }

    #[test]
    fn enable_of_an_empty_disk_opens_no_window() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("a.img");
        File::create(&img).unwrap().set_len(4 << 20).unwrap();
        enable_at(&vm1(d.path()), &spec(d.path(), vec![("disk0".into(), img)])).unwrap();
        let journal = vm1(d.path()).open_journal().unwrap();
        assert!(!journal.window_open());
        assert_eq!(journal.head().seq, 1, "nothing journaled");
    }

    #[test]
    fn enable_twice_is_refused_and_leaves_the_first() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("a.img");
        File::create(&img).unwrap().set_len(1 << 20).unwrap();
        enable_at(&vm1(d.path()), &spec(d.path(), vec![("disk0".into(), img.clone())])).unwrap();
        let err = enable_at(&vm1(d.path()), &spec(d.path(), vec![("disk0".into(), img)])).unwrap_err();
        assert!(err.to_string().contains("already enabled"), "{err}");
    }

    /// Issue 18 (item 5): one file as two disks, a file another VM
    /// protects (also by another path: a hard link), and a qcow2 image.
    #[test]
    fn enable_refuses_a_file_twice_a_protected_file_and_a_qcow2_image() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("a.img");
        File::create(&img).unwrap().set_len(1 << 20).unwrap();
        let link = d.path().join("a-link.img");
        fs::hard_link(&img, &link).unwrap();
        let twice = vec![("disk0".into(), img.clone()), ("disk1".into(), link.clone())];
        let err = enable_at(&vm1(d.path()), &spec(d.path(), twice)).unwrap_err().to_string();
        assert!(err.contains("disks 'disk0' and 'disk1' are the same file"), "{err}");
        assert!(!vm1(d.path()).dir().exists(), "nothing is left half-made");

        enable_at(&vm1(d.path()), &spec(d.path(), vec![("disk0".into(), img)])).unwrap();
        let mut other = spec(d.path(), vec![("boot".into(), link)]);
        other.name = "vm2".into();
        let vm2 = VmPaths::new(&d.path().join("state"), "vm2").unwrap().with_ring_dir(&d.path().join("rings"));
        let err = enable_at(&vm2, &other).unwrap_err().to_string();
        assert!(
            err.contains("already protected as disk 'disk0' of VM 'vm1'") && err.contains("tern disable vm1"),
            "{err}"
        );

        let qcow = d.path().join("b.qcow2");
        let mut header = b"QFI\xfb\0\0\0\x03".to_vec();
        header.resize(1 << 20, 0);
        fs::write(&qcow, header).unwrap();
        other.disks = vec![("disk0".into(), qcow)];
        let err = enable_at(&vm2, &other).unwrap_err().to_string();
        assert!(err.contains("is a qcow2 image, not raw") && err.contains("qemu-img convert -O raw"), "{err}");
        assert!(!vm2.dir().exists());
    }

    #[test]
    fn bad_names_and_missing_disks_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        for name in ["../x", "", "a/b", ".hidden", &"x".repeat(65)] {
            let mut s = spec(d.path(), vec![]);
            s.name = name.to_string();
            assert!(enable(&state, &s).is_err(), "{name:?} accepted");
        }
        let err =
            enable_at(&vm1(d.path()), &spec(d.path(), vec![("disk0".into(), d.path().join("nope"))])).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        assert!(!state.join("vm1").exists());
    }

    /// `[launch]` and the policy's `network` are optional: a vm.toml
    /// without them reads as the defaults and is written back without
    /// them; one with them reads back as written.
    #[test]
    fn config_round_trips_with_and_without_launch_settings() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vm.toml");
        let base = "version = 1\nname = \"a\"\nid = \"00000000-0000-0000-0000-000000000000\"\ncache = \"/c\"\ntarget = \"/t\"\n";
        let disk = "[[disk]]\nname = \"d\"\npath = \"/x\"\nsize = 1\n";
        fs::write(&p, format!("{base}{disk}")).unwrap();
        let plain = VmConfig::load(&p).unwrap();
        assert_eq!(plain.launch, LaunchConfig::default());
        assert_eq!((plain.launch.memory, plain.launch.cpus), (Size::gib(2), 2));
        assert!(plain.launch.nics.is_empty() && plain.policy.network.is_empty());
        let text = toml::to_string_pretty(&plain).unwrap();
        assert!(!text.contains("launch") && !text.contains("network"), "{text}");

        let launch = "[policy.network]\nbr0 = \"br-dr\"\n[launch]\nmemory = \"1GiB\"\ncpus = 4\n[[launch.nic]]\nbridge = \"br0\"\nmac = \"52:54:00:00:00:10\"\n[[launch.nic]]\nbridge = \"br1\"\nmodel = \"e1000\"\n";
        fs::write(&p, format!("{base}{launch}{disk}")).unwrap();
        let cfg = VmConfig::load(&p).unwrap();
        assert_eq!((cfg.launch.memory, cfg.launch.cpus), (Size::gib(1), 4));
        assert_eq!(cfg.launch.nics[0].model, "virtio-net-pci");
        assert_eq!(cfg.launch.nics[1].mac, None, "made when it travels, not on load");
        assert_eq!(cfg.policy.network["br0"], "br-dr");
        fs::write(&p, toml::to_string_pretty(&cfg).unwrap()).unwrap();
        assert_eq!(VmConfig::load(&p).unwrap(), cfg);

        for (bad, want) in [
            ("[launch]\nram = 1\n", "unknown field `ram`"),
            ("[policy.network]\nbr9 = \"br-dr\"\n", "no NIC of the VM is on 'br9'"),
            ("[[launch.nic]]\nbridge = \"br0\"\nmac = \"01:00:00:00:00:01\"\n", "multicast"),
            // NIC 0's generated MAC is the one NIC 1 was given.
            (
                &format!(
                    "[[launch.nic]]\nbridge = \"br0\"\n[[launch.nic]]\nbridge = \"br1\"\nmac = \"{}\"\n",
                    crate::launch::generated_mac(&uuid::Uuid::nil(), 0)
                ),
                "the same MAC address",
            ),
        ] {
            fs::write(&p, format!("{base}{bad}{disk}")).unwrap();
            let err = VmConfig::load(&p).unwrap_err().to_string();
            assert!(err.contains("vm.toml") && err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn config_with_unknown_field_is_refused_with_its_path() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vm.toml");
        fs::write(&p, "version = 1\nname = \"a\"\nid = \"00000000-0000-0000-0000-000000000000\"\ncache = \"/c\"\ntarget = \"/t\"\nbogus = 1\n[[disk]]\nname = \"d\"\npath = \"/x\"\nsize = 1\n").unwrap();
        let err = VmConfig::load(&p).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("vm.toml") && msg.contains("bogus"), "{msg}");
    }
}
