//! Where the cache store's objects live: a directory (the default, for one
//! host or a shared filesystem), an S3 bucket (`s3://bucket/prefix`: AWS,
//! Ceph RGW, SeaweedFS, MinIO…) or an Azure Blob container
//! (`az://container/prefix`). One interface for all three, so the shipper
//! and the applier never know which they talk to.
//!
//! The interface is what the two sites need to agree without a lock:
//!
//! - [`Put::Create`]: the object appears only if none of that name exists
//!   (a directory: a hard link of a fsynced temporary; an object store:
//!   `If-None-Match: *`). A stale or fenced shipper can never overwrite a
//!   segment.
//! - [`Put::Replace`]: compare-and-swap on the version read before
//!   (`If-Match` on the ETag; a directory: a content hash compared under a
//!   lock file).
//! - A write whose outcome is unknown (the connection dropped after the
//!   request went out, and the store's client retried it) is settled by
//!   reading the object back: if it holds exactly our bytes, the write
//!   happened. Nothing is ever retried blindly over a conditional write.
//!
//! Objects are whole: a reader sees all of a put or none of it (one PUT;
//! a directory: rename or link of a fsynced file). Remote calls run on a
//! small private tokio runtime, started at the first one; transient
//! failures (5xx, throttling, dropped connections) are retried by the
//! client with backoff for at most [`RETRY_TIMEOUT`], then returned to
//! the caller, which keeps its own retry loop and logs what to check.
//! How long a remote request may take depends on what it carries
//! ([`deadline`]): a transfer is given time for its size at the slowest
//! link waited for, a request without a body a short limit. Credentials
//! come from the environment (`AWS_*`, `AZURE_STORAGE_*`) and are never
//! logged.

mod deadline;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, UNIX_EPOCH};

use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

pub use deadline::{set_timeouts, Timeouts};
use deadline::{Failure, CONNECT_TIMEOUT};

/// How long the store's client retries a transient failure before the
/// call fails (the caller then backs off, logs what to check and retries
/// the whole step): short, so that an outage shows in the log and in
/// `tern status` within seconds rather than hiding in the client.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(10);

/// How to write an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Put {
    /// Write or replace, whatever is there.
    Overwrite,
    /// Write only if no object of the name exists.
    Create,
    /// Replace only if the object is still at this version.
    Replace(Version),
}

/// An object's version: its ETag, or (a directory) a hash of its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version(String);

/// An object read whole.
#[derive(Debug, Clone)]
pub struct Object {
    pub bytes: Vec<u8>,
    pub version: Version,
}

/// An object listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its name below the listed prefix.
    pub name: String,
    pub size: u64,
    pub modified_unix_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// [`Put::Create`] found the object there, holding other bytes.
    #[error("{location} already exists with other content: another writer uses the name (two sources shipping under one VM name into one cache?); stop the other, or give this one its own cache")]
    Exists { location: String },
    /// [`Put::Replace`] found the object changed (or gone) since it was read.
    #[error("{location} was changed by someone else since it was read")]
    Changed { location: String },
    /// The cache store itself (directory, bucket or container) is missing.
    #[error("the cache store {store} does not exist{hint}")]
    Missing { store: String, hint: &'static str },
    #[error("cannot use the cache store {location}: {reason}")]
    BadLocation { location: String, reason: String },
    #[error("cannot {what} {location}")]
    Io {
        what: &'static str,
        location: String,
        #[source]
        source: io::Error,
    },
    /// (The client's own error chain repeats itself at every level: its
    /// gist is in the message, the error kept for callers that match it.)
    #[error("cannot {what} {location}: {}", remote_reason(error))]
    Remote { what: &'static str, location: String, error: object_store::Error },
    /// A request ran out of the time it is given ([`Timeouts`]); `reason`
    /// says how long that was and what to set if the link is that slow.
    #[error("cannot {what} {location}{}: {reason}", size.map(|s| format!(" ({})", tern_driver::units::Size(s).approx())).unwrap_or_default())]
    TimedOut { what: &'static str, location: String, size: Option<u64>, reason: String },
}

impl StoreError {
    /// A store that is unreachable, throttling or failing now may work
    /// later; a refused credential or a missing bucket will not.
    pub fn is_permanent(&self) -> bool {
        match self {
            StoreError::Missing { .. } | StoreError::BadLocation { .. } => true,
            StoreError::Remote { error: source, .. } => {
                matches!(
                    source,
                    object_store::Error::Unauthenticated { .. }
                        | object_store::Error::PermissionDenied { .. }
                        | object_store::Error::NotImplemented { .. }
                        | object_store::Error::NotSupported { .. }
                ) || remote_reason(source).contains("NoSuchBucket")
                    || remote_reason(source).contains("ContainerNotFound")
            }
            _ => false,
        }
    }

    /// As an io::Error: the filesystem's own (ENOSPC and EDQUOT keep
    /// their errno for the hints; the caller's message names the object),
    /// else the whole account of the failure.
    pub fn into_io_error(self) -> io::Error {
        match self {
            StoreError::Io { source, .. } => source,
            e => io::Error::other(crate::file::with_causes(&e)),
        }
    }

    /// Why the request failed, without the "cannot <do> <object>" around
    /// it: for a caller whose own error names the object.
    pub fn into_cause(self) -> io::Error {
        match self {
            StoreError::Remote { error, .. } => io::Error::other(remote_reason(&error)),
            StoreError::TimedOut { reason, .. } => io::Error::new(io::ErrorKind::TimedOut, reason),
            e => e.into_io_error(),
        }
    }
}

/// The shortest true account of a remote failure: what kind of refusal,
/// the store's error code when it gave one, else the innermost cause
/// ("Connection refused", "operation timed out").
fn remote_reason(e: &object_store::Error) -> String {
    let text = e.to_string();
    let code = text.split("<Code>").nth(1).and_then(|s| s.split("</Code>").next());
    let mut innermost: &dyn std::error::Error = e;
    while let Some(next) = innermost.source() {
        innermost = next;
    }
    let innermost = innermost.to_string();
    let kind = match e {
        object_store::Error::NotFound { .. } => "not found",
        object_store::Error::Unauthenticated { .. } => {
            "the credentials were refused (check AWS_ACCESS_KEY_ID / AZURE_STORAGE_ACCOUNT_KEY)"
        }
        object_store::Error::PermissionDenied { .. } => {
            "permission denied (check the credentials' policy on the bucket)"
        }
        object_store::Error::Precondition { .. } => "a precondition failed",
        object_store::Error::AlreadyExists { .. } => "already exists",
        _ => "",
    };
    // The client's own timeout says only "deadline has elapsed".
    let innermost = if innermost.contains("deadline has elapsed") {
        "timed out waiting for the store (is it reachable from this host?)".to_string()
    } else {
        innermost
    };
    match (kind, code) {
        ("", Some(code)) => code.to_string(),
        (kind, Some(code)) => format!("{kind} ({code})"),
        ("", None) => innermost.lines().next().unwrap_or("").chars().take(300).collect(),
        (kind, None) => kind.to_string(),
    }
}

/// The CA bundle the store's HTTPS client trusts besides the system's
/// (`--ca FILE`): set once, before the first remote call.
static EXTRA_CA: OnceLock<PathBuf> = OnceLock::new();

/// Trust the certificates in this PEM file as well (a private CA in front
/// of the object store). Call before opening a store.
pub fn set_ca_file(path: &Path) {
    let _ = EXTRA_CA.set(path.to_owned());
}

/// A cache store: where it is and how to reach it. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

enum Inner {
    Dir(PathBuf),
    Remote(Remote),
}

struct Remote {
    /// `s3://bucket/prefix` as the operator wrote it (no credentials).
    url: String,
    /// For requests without a body (HEAD, LIST, DELETE): its client
    /// gives each HTTP request [`Timeouts::request`].
    meta: Arc<dyn ObjectStore>,
    /// For GET and PUT: its client has no limit of its own; each
    /// transfer has the one [`deadline`] gives its size.
    bulk: Arc<dyn ObjectStore>,
    prefix: String,
    timeouts: Timeouts,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.describe())
    }
}

impl Store {
    /// A directory store (which need not exist yet).
    pub fn dir(path: &Path) -> Store {
        Store { inner: Arc::new(Inner::Dir(path.to_owned())) }
    }

    /// Opens the store `location` names: `s3://bucket[/prefix]`,
    /// `az://container[/prefix]`, or else a directory path. Nothing is
    /// contacted yet ([`Store::check`] does).
    pub fn open(location: &Path) -> Result<Store, StoreError> {
        Store::open_with(location, None, deadline::timeouts())
    }

    /// [`Store::open`] with the endpoint given here rather than by
    /// `AWS_ENDPOINT_URL` (a tool talking to two stores at once).
    pub fn open_with_endpoint(location: &Path, endpoint: &str) -> Result<Store, StoreError> {
        Store::open_with(location, Some(endpoint), deadline::timeouts())
    }

    /// [`Store::open`] with an endpoint (else `AWS_ENDPOINT_URL`'s) and
    /// limits (else those [`set_timeouts`] set) of its own.
    pub fn open_with(location: &Path, endpoint: Option<&str>, timeouts: Timeouts) -> Result<Store, StoreError> {
        let text = location.to_string_lossy();
        let Some((scheme, rest)) = text.split_once("://") else { return Ok(Store::dir(location)) };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/').to_string();
        let bad = |why: &str| StoreError::BadLocation { location: text.to_string(), reason: why.to_string() };
        if bucket.is_empty() {
            return Err(bad("no bucket or container named (s3://BUCKET/PREFIX, az://CONTAINER/PREFIX)"));
        }
        // Plain HTTP only where the environment allows it, as the stores'
        // own tools do (a local SeaweedFS, the Azure emulator).
        let allow_http = |var: &str| std::env::var(var).is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        timeouts.check().map_err(|e| bad(&e))?;
        let client = client_options().map_err(|e| bad(&e))?.with_allow_http(
            allow_http("AWS_ALLOW_HTTP") || allow_http("AZURE_ALLOW_HTTP") || allow_http("AZURE_STORAGE_USE_EMULATOR"),
        );
        let retry = object_store::RetryConfig {
            max_retries: 5,
            retry_timeout: RETRY_TIMEOUT,
            backoff: object_store::BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
        };
        let build = |client: object_store::ClientOptions| -> Result<Arc<dyn ObjectStore>, StoreError> {
            let configure = |error| StoreError::Remote { what: "configure", location: text.to_string(), error };
            Ok(match scheme {
                "s3" => Arc::new(
                    endpoint
                        .into_iter()
                        .fold(object_store::aws::AmazonS3Builder::from_env(), |b, e| b.with_endpoint(e))
                        .with_bucket_name(bucket)
                        .with_client_options(client)
                        .with_retry(retry.clone())
                        .build()
                        .map_err(configure)?,
                ),
                "az" => Arc::new(
                    object_store::azure::MicrosoftAzureBuilder::from_env()
                        .with_container_name(bucket)
                        .with_client_options(client)
                        .with_retry(retry.clone())
                        .build()
                        .map_err(configure)?,
                ),
                _ => return Err(bad(&format!("unknown scheme '{scheme}://' (a directory path, s3:// or az://)"))),
            })
        };
        let meta = build(client.clone().with_timeout(timeouts.request))?;
        let bulk = build(client.with_timeout_disabled())?;
        let url = text.trim_end_matches('/').to_string();
        Ok(Store { inner: Arc::new(Inner::Remote(Remote { url, meta, bulk, prefix, timeouts })) })
    }

    /// The store as the operator names it: a path or a URL.
    pub fn describe(&self) -> String {
        match &*self.inner {
            Inner::Dir(p) => p.display().to_string(),
            Inner::Remote(r) => r.url.clone(),
        }
    }

    /// Where `key` is, for messages.
    pub fn location(&self, key: &str) -> String {
        match &*self.inner {
            Inner::Dir(p) => p.join(key).display().to_string(),
            Inner::Remote(r) => format!("{}/{key}", r.url),
        }
    }

    /// The directory, for a directory store.
    pub fn as_dir(&self) -> Option<&Path> {
        match &*self.inner {
            Inner::Dir(p) => Some(p),
            Inner::Remote(_) => None,
        }
    }

    /// Fails unless the store exists and answers with these credentials:
    /// run before anything is configured against it.
    pub fn check(&self) -> Result<(), StoreError> {
        match &*self.inner {
            Inner::Dir(p) if p.is_dir() => Ok(()),
            Inner::Dir(p) => Err(StoreError::Missing {
                store: p.display().to_string(),
                hint: " (create it, or mount the share that holds it)",
            }),
            Inner::Remote(r) => {
                let prefix = r.object_path("");
                let result = runtime().block_on(async {
                    let mut list = r.meta.list(Some(&prefix));
                    list.try_next().await.map(|_| ())
                });
                result.map_err(|error| {
                    let e = r.error("list", r.url.clone(), Failure::Remote(error));
                    let text = e.to_string();
                    if text.contains("NoSuchBucket") || text.contains("ContainerNotFound") {
                        StoreError::Missing { store: r.url.clone(), hint: " (create the bucket or container first)" }
                    } else {
                        e
                    }
                })
            }
        }
    }

    /// The whole object, or `None` if there is none of that name.
    pub fn get(&self, key: &str) -> Result<Option<Object>, StoreError> {
        match &*self.inner {
            Inner::Dir(root) => {
                let path = root.join(key);
                match fs::read(&path) {
                    Ok(bytes) => {
                        let version = content_version(&bytes);
                        Ok(Some(Object { bytes, version }))
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(source) => Err(self.io("read", key, source)),
                }
            }
            Inner::Remote(r) => match runtime().block_on(deadline::get(&*r.bulk, &r.object_path(key), &r.timeouts)) {
                Ok(got) => Ok(got.map(|(bytes, tag)| Object { bytes, version: Version(tag) })),
                Err(failure) => Err(r.error("read", self.location(key), failure)),
            },
        }
    }

    /// Writes `bytes` as `key`, whole. `stage` is called as the write
    /// passes its steps (the crash tests' failpoints).
    pub fn put(&self, key: &str, bytes: &[u8], mode: Put) -> Result<(), StoreError> {
        self.put_staged(key, bytes, mode, &mut |_| Ok(()))
    }

    pub fn put_staged(
        &self,
        key: &str,
        bytes: &[u8],
        mode: Put,
        stage: &mut dyn FnMut(Stage) -> io::Result<()>,
    ) -> Result<(), StoreError> {
        match &*self.inner {
            Inner::Dir(root) => self.dir_put(root, key, bytes, mode, stage),
            Inner::Remote(r) => {
                stage(Stage::Written).map_err(|e| self.io("write", key, e))?;
                stage(Stage::Synced).map_err(|e| self.io("write", key, e))?;
                let path = r.object_path(key);
                let opts = PutOptions::from(match &mode {
                    Put::Overwrite => PutMode::Overwrite,
                    Put::Create => PutMode::Create,
                    Put::Replace(v) => PutMode::Update(UpdateVersion { e_tag: Some(v.0.clone()), version: None }),
                });
                let payload = PutPayload::from(bytes.to_vec());
                match runtime().block_on(deadline::put(&*r.bulk, &path, payload, opts, &r.timeouts)) {
                    Ok(_) => {}
                    // Refused by its condition: perhaps our own earlier
                    // attempt, retried by the client after a lost answer.
                    Err(Failure::Remote(
                        object_store::Error::AlreadyExists { .. }
                        | object_store::Error::Precondition { .. }
                        | object_store::Error::NotFound { .. },
                    )) if mode != Put::Overwrite => self.settle_refused(key, bytes, &mode)?,
                    Err(failure) => return Err(r.error("write", self.location(key), failure)),
                }
                stage(Stage::Published).map_err(|e| self.io("write", key, e))
            }
        }
    }

    /// A conditional write was refused: it stands if the object holds
    /// exactly our bytes (our own write landed, its answer was lost),
    /// otherwise someone else's write won.
    fn settle_refused(&self, key: &str, bytes: &[u8], mode: &Put) -> Result<(), StoreError> {
        match self.get(key)? {
            Some(now) if now.bytes == bytes => {
                log::info!(
                    "cache store: {} was already written with the same content (a retried request)",
                    self.location(key)
                );
                Ok(())
            }
            _ if *mode == Put::Create => Err(StoreError::Exists { location: self.location(key) }),
            _ => Err(StoreError::Changed { location: self.location(key) }),
        }
    }

    fn dir_put(
        &self,
        root: &Path,
        key: &str,
        bytes: &[u8],
        mode: Put,
        stage: &mut dyn FnMut(Stage) -> io::Result<()>,
    ) -> Result<(), StoreError> {
        let path = root.join(key);
        let dir = path.parent().expect("a key names a file below the store");
        ensure_dir_below(root, dir).map_err(|e| self.io("create the directory of", key, e))?;
        let _lock = match &mode {
            Put::Replace(_) => Some(lock_file(&path).map_err(|e| self.io("lock", key, e))?),
            _ => None,
        };
        if let Put::Replace(expected) = &mode {
            match self.get(key)? {
                Some(now) if now.version == *expected => {}
                Some(now) if now.bytes == bytes => return Ok(()),
                _ => return Err(StoreError::Changed { location: self.location(key) }),
            }
        }
        let name = path.file_name().expect("a file name").to_string_lossy();
        let tmp = dir.join(format!(".{name}.tmp"));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            stage(Stage::Written)?;
            f.sync_data()?;
            stage(Stage::Synced)?;
            if mode == Put::Create {
                // link(2) fails if the name exists: create-only, atomically.
                match fs::hard_link(&tmp, &path) {
                    Ok(()) => fs::remove_file(&tmp)?,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        fs::remove_file(&tmp)?;
                        return Ok(false);
                    }
                    Err(e) => return Err(e),
                }
            } else {
                fs::rename(&tmp, &path)?;
            }
            stage(Stage::Linked)?;
            File::open(dir)?.sync_all()?;
            stage(Stage::Published)?;
            Ok(true)
        })();
        match result {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.settle_refused(key, bytes, &mode)?;
                // Our bytes are there: an earlier attempt linked them, and
                // may have failed or died before the directory was synced.
                self.make_durable(key)
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(self.io("write", key, e))
            }
        }
    }

    /// Makes an object that is there durable where that is the writer's
    /// part (a directory: the file and its directory synced; a bucket's
    /// objects are durable once written). For an object an earlier
    /// process or attempt wrote, before counting it shipped.
    pub fn make_durable(&self, key: &str) -> Result<(), StoreError> {
        let Inner::Dir(root) = &*self.inner else { return Ok(()) };
        let path = root.join(key);
        let dir = path.parent().expect("a key names a file below the store");
        File::open(&path)
            .and_then(|f| f.sync_all())
            .and_then(|()| File::open(dir)?.sync_all())
            .map_err(|e| self.io("sync", key, e))
    }

    /// Whether an object of the name exists (without reading it).
    pub fn exists(&self, key: &str) -> Result<bool, StoreError> {
        match &*self.inner {
            Inner::Dir(root) => match fs::metadata(root.join(key)) {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(source) => Err(self.io("look up", key, source)),
            },
            Inner::Remote(r) => match runtime().block_on(r.meta.head(&r.object_path(key))) {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(source) => Err(self.remote("look up", key, source)),
            },
        }
    }

    /// When the object was last written, by the store's clock (a
    /// directory: its mtime); `None` if there is none.
    pub fn modified_unix_ms(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match &*self.inner {
            Inner::Dir(root) => match fs::metadata(root.join(key)).and_then(|m| m.modified()) {
                Ok(t) => Ok(Some(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(self.io("look up", key, source)),
            },
            Inner::Remote(r) => match runtime().block_on(r.meta.head(&r.object_path(key))) {
                Ok(meta) => Ok(Some(meta.last_modified.timestamp_millis().max(0) as u64)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(source) => Err(self.remote("look up", key, source)),
            },
        }
    }

    /// Removes the object; one that is not there is not an error.
    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        match &*self.inner {
            Inner::Dir(root) => match fs::remove_file(root.join(key)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(self.io("remove", key, source)),
            },
            Inner::Remote(r) => match runtime().block_on(r.meta.delete(&r.object_path(key))) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(source) => Err(self.remote("remove", key, source)),
            },
        }
    }

    /// The objects directly below `prefix` (a "directory" such as
    /// `vm1/segments`), sorted by name; names starting with '.' (a
    /// directory store's temporaries) are left out.
    pub fn list(&self, prefix: &str) -> Result<Vec<Listed>, StoreError> {
        let mut out = match &*self.inner {
            Inner::Dir(root) => {
                let mut out = Vec::new();
                let entries = match fs::read_dir(root.join(prefix)) {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(source) => return Err(self.io("list", prefix, source)),
                };
                for entry in entries {
                    let entry = entry.map_err(|e| self.io("list", prefix, e))?;
                    let meta = match entry.metadata() {
                        Ok(m) if m.is_file() => m,
                        _ => continue,
                    };
                    let modified = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok());
                    out.push(Listed {
                        name: entry.file_name().to_string_lossy().into_owned(),
                        size: meta.len(),
                        modified_unix_ms: modified.map_or(0, |d| d.as_millis() as u64),
                    });
                }
                out
            }
            Inner::Remote(r) => {
                let listed = self.list_below(r, prefix)?;
                listed
                    .objects
                    .into_iter()
                    .filter_map(|m| {
                        Some(Listed {
                            name: m.location.filename()?.to_string(),
                            size: m.size,
                            modified_unix_ms: m.last_modified.timestamp_millis().max(0) as u64,
                        })
                    })
                    .collect()
            }
        };
        out.retain(|l| !l.name.starts_with('.'));
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The "directories" directly below `prefix` ("" for the top): the
    /// VMs of a cache store.
    pub fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut out: Vec<String> = match &*self.inner {
            Inner::Dir(root) => {
                let entries = match fs::read_dir(root.join(prefix)) {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(source) => return Err(self.io("list", prefix, source)),
                };
                let mut out = Vec::new();
                for entry in entries {
                    let entry = entry.map_err(|e| self.io("list", prefix, e))?;
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        out.push(entry.file_name().to_string_lossy().into_owned());
                    }
                }
                out
            }
            Inner::Remote(r) => {
                let listed = self.list_below(r, prefix)?;
                listed.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)).collect()
            }
        };
        out.retain(|n| !n.starts_with('.'));
        out.sort();
        Ok(out)
    }

    /// One level of a bucket below `prefix`: its objects and its
    /// "directories" (common prefixes), every page of them.
    fn list_below(&self, r: &Remote, prefix: &str) -> Result<object_store::ListResult, StoreError> {
        runtime()
            .block_on(r.meta.list_with_delimiter(Some(&r.object_path(prefix))))
            .map_err(|source| self.remote("list", prefix, source))
    }

    /// Removes every object below `prefix`; returns how many.
    pub fn delete_all(&self, prefix: &str) -> Result<usize, StoreError> {
        match &*self.inner {
            Inner::Dir(root) => {
                let dir = root.join(prefix);
                let n = count_files(&dir);
                match fs::remove_dir_all(&dir) {
                    Ok(()) => Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
                    Err(source) => Err(self.io("remove", prefix, source)),
                }
            }
            Inner::Remote(r) => {
                let path = r.object_path(prefix);
                runtime()
                    .block_on(async {
                        let all: Vec<_> = r.meta.list(Some(&path)).try_collect().await?;
                        for m in &all {
                            match r.meta.delete(&m.location).await {
                                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                                Err(e) => return Err(e),
                            }
                        }
                        Ok(all.len())
                    })
                    .map_err(|source| self.remote("remove", prefix, source))
            }
        }
    }

    fn io(&self, what: &'static str, key: &str, source: io::Error) -> StoreError {
        StoreError::Io { what, location: self.location(key), source }
    }

    fn remote(&self, what: &'static str, key: &str, error: object_store::Error) -> StoreError {
        match &*self.inner {
            Inner::Remote(r) => r.error(what, self.location(key), Failure::Remote(error)),
            Inner::Dir(_) => StoreError::Remote { what, location: self.location(key), error },
        }
    }
}

/// The steps of a put, for failpoints: the bytes written (not yet
/// durable), made durable, published under their name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Written,
    Synced,
    /// A directory store's file is under its name, its directory not yet
    /// synced (a bucket has no such step).
    Linked,
    Published,
}

impl Remote {
    /// The error of a failed request: the client's own, or a timeout that
    /// says how long the request was given and what to set.
    fn error(&self, what: &'static str, location: String, failure: Failure) -> StoreError {
        match failure {
            Failure::Remote(error) if deadline::is_timeout(&error) => {
                StoreError::TimedOut { what, location, size: None, reason: deadline::no_answer(&self.timeouts) }
            }
            Failure::Remote(error) => StoreError::Remote { what, location, error },
            Failure::TimedOut { size, reason } => StoreError::TimedOut { what, location, size, reason },
        }
    }

    fn object_path(&self, key: &str) -> ObjectPath {
        let key = key.trim_matches('/');
        match (self.prefix.is_empty(), key.is_empty()) {
            (true, _) => ObjectPath::from(key),
            (false, true) => ObjectPath::from(self.prefix.as_str()),
            (false, false) => ObjectPath::from(format!("{}/{key}", self.prefix)),
        }
    }
}

fn content_version(bytes: &[u8]) -> Version {
    Version(format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes)))
}

/// Creates `dir` (durably) below `root`, but never `root` itself: if that
/// is gone (an unmounted share), writing into a fresh directory in its
/// place would hide objects from the real store.
fn ensure_dir_below(root: &Path, dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if !root.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("the cache store {} is missing (unmounted?)", root.display()),
        ));
    }
    tern_driver::fs::create_dir_durably(dir).map_err(|e| io::Error::other(e.with_causes()))
}

fn lock_file(path: &Path) -> io::Result<nix::fcntl::Flock<File>> {
    let name = path.file_name().expect("a file name").to_string_lossy();
    let lock = path.with_file_name(format!(".{name}.lock"));
    let f = fs::OpenOptions::new().create(true).truncate(false).write(true).open(lock)?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e.into())
}

fn count_files(dir: &Path) -> usize {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .map(|e| if e.file_type().is_ok_and(|t| t.is_dir()) { count_files(&e.path()) } else { 1 })
                .sum()
        })
        .unwrap_or(0)
}

/// What both clients of a bucket share (each sets its own request limit).
fn client_options() -> Result<object_store::ClientOptions, String> {
    let mut options = object_store::ClientOptions::new().with_connect_timeout(CONNECT_TIMEOUT);
    if let Some(path) = EXTRA_CA.get() {
        let pem = fs::read(path).map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
        let certs = object_store::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("{} holds no PEM certificate: {e}", path.display()))?;
        for cert in certs {
            options = options.with_root_certificate(cert);
        }
    }
    Ok(options)
}

/// The runtime every remote call of this process runs on: two threads,
/// started at the first call (never before a fork).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tern-store")
            .enable_all()
            .build()
            .expect("the object store's runtime starts")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_store_creates_once_replaces_by_version_and_lists_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::dir(dir.path());
        s.check().unwrap();
        assert!(s.get("vm1/a").unwrap().is_none());
        s.put("vm1/segments/2", b"two", Put::Create).unwrap();
        s.put("vm1/segments/1", b"one", Put::Create).unwrap();
        // The same bytes again: our own write, settled; other bytes: refused.
        s.put("vm1/segments/1", b"one", Put::Create).unwrap();
        assert!(matches!(s.put("vm1/segments/1", b"uno", Put::Create), Err(StoreError::Exists { .. })));
        assert_eq!(s.get("vm1/segments/1").unwrap().unwrap().bytes, b"one");
        let names: Vec<_> = s.list("vm1/segments").unwrap().into_iter().map(|l| (l.name, l.size)).collect();
        assert_eq!(names, [("1".to_string(), 3), ("2".to_string(), 3)]);
        assert_eq!(s.list_dirs("").unwrap(), ["vm1"]);

        s.put("vm1/m", b"v1", Put::Overwrite).unwrap();
        let v1 = s.get("vm1/m").unwrap().unwrap().version;
        s.put("vm1/m", b"v2", Put::Replace(v1.clone())).unwrap();
        assert!(matches!(s.put("vm1/m", b"v3", Put::Replace(v1)), Err(StoreError::Changed { .. })));
        assert_eq!(s.get("vm1/m").unwrap().unwrap().bytes, b"v2");
        assert!(s.list("vm1").unwrap().iter().all(|l| !l.name.starts_with('.')));

        s.delete("vm1/m").unwrap();
        s.delete("vm1/m").unwrap();
        assert_eq!(s.delete_all("vm1").unwrap(), 2);
        assert!(s.list_dirs("").unwrap().is_empty());
    }

    #[test]
    fn a_missing_directory_store_is_never_created_by_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::dir(&dir.path().join("gone"));
        assert!(matches!(s.check(), Err(StoreError::Missing { .. })));
        let e = s.put("vm1/manifest.toml", b"x", Put::Overwrite).unwrap_err();
        assert!(e.to_string().contains("gone/vm1/manifest.toml"), "{e}");
        assert!(!dir.path().join("gone").exists());
    }

    #[test]
    fn locations_parse_and_name_objects() {
        let s = Store::open(Path::new("s3://bucket/some/prefix/")).unwrap();
        assert_eq!(s.location("vm1/manifest.toml"), "s3://bucket/some/prefix/vm1/manifest.toml");
        assert!(s.as_dir().is_none());
        assert!(Store::open(Path::new("s3://")).is_err());
        assert!(Store::open(Path::new("ftp://x/y")).unwrap_err().to_string().contains("unknown scheme"));
        assert_eq!(Store::open(Path::new("/srv/cache")).unwrap().as_dir(), Some(Path::new("/srv/cache")));
    }

    #[test]
    fn object_store_semantics_match_the_directory_store() {
        // The crate's in-memory store stands in for S3 here; the servers
        // are exercised end to end in tests/tests/object_store.rs.
        let memory: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let s = Store {
            inner: Arc::new(Inner::Remote(Remote {
                url: "mem://t".into(),
                meta: Arc::clone(&memory),
                bulk: memory,
                prefix: "p".into(),
                timeouts: Timeouts::default(),
            })),
        };
        s.check().unwrap();
        s.put("vm1/segments/1", b"one", Put::Create).unwrap();
        s.put("vm1/segments/1", b"one", Put::Create).unwrap();
        assert!(matches!(s.put("vm1/segments/1", b"uno", Put::Create), Err(StoreError::Exists { .. })));
        s.put("vm1/m", b"v1", Put::Overwrite).unwrap();
        let v1 = s.get("vm1/m").unwrap().unwrap().version;
        s.put("vm1/m", b"v2", Put::Replace(v1.clone())).unwrap();
        assert!(matches!(s.put("vm1/m", b"v3", Put::Replace(v1)), Err(StoreError::Changed { .. })));
        assert_eq!(s.list("vm1/segments").unwrap()[0].name, "1");
        assert_eq!(s.list_dirs("").unwrap(), ["vm1"]);
        assert_eq!(s.delete_all("vm1").unwrap(), 2);
        assert!(s.get("vm1/m").unwrap().is_none());
    }
}
