//! How long a request to a bucket may take. One limit for every request
//! cannot serve both kinds tern makes: a request without a body (HEAD, a
//! page of a listing, DELETE) should fail within seconds when the store
//! does not answer, while a transfer (a segment of up to ~40 MiB, a hash
//! answer of hundreds of MiB) takes its size over the link's speed — a
//! 40 MiB segment needs 168 s at 2 Mbit/s, and a limit shorter than that
//! fails it at every attempt, for good, however healthy the link.
//!
//! - A request without a body: [`Timeouts::request`] (the client's own
//!   limit, per HTTP request).
//! - A PUT: [`Timeouts::request`] plus the time its bytes take at
//!   [`Timeouts::min_rate`], the slowest link tern waits for. The client
//!   sends the body out of sight, so a PUT that stalls is caught only at
//!   this deadline.
//! - A GET: its answer's head within [`Timeouts::request`]; then, the
//!   size known, the same deadline as a PUT of that size, and never
//!   [`Timeouts::request`] without a byte received (a stall is caught in
//!   seconds, whatever the size).
//!
//! Connecting has its own limit, [`CONNECT_TIMEOUT`]. A request cut short
//! here is dropped with its connection; its caller retries as after any
//! other failure.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutOptions, PutPayload, PutResult};
use tern_driver::units::{Rate, Size};
use tokio::time::Instant;

/// The environment variables (and `tern` options) that set [`Timeouts`],
/// named in the errors that a timeout gives.
const TIMEOUT_SETTING: &str = "TERN_STORE_TIMEOUT (--store-timeout)";
const MIN_RATE_SETTING: &str = "TERN_STORE_MIN_RATE (--store-min-rate)";

/// How long establishing a connection to the store may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The limits of the requests to a bucket (a directory store has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A request without a body, the head of a GET's answer, and the
    /// longest a GET may receive nothing. Default: 30 s.
    pub request: Duration,
    /// The slowest link a transfer is given time for: a PUT or GET of
    /// `n` bytes may take `request` plus `n` at this rate. Default: 32
    /// KiB/s (256 kbit/s: an 8 MiB segment is given 4 min 46 s).
    pub min_rate: Rate,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { request: Duration::from_secs(30), min_rate: Rate(32 << 10) }
    }
}

impl Timeouts {
    /// Fails on limits that would fail every request.
    pub fn check(&self) -> Result<(), String> {
        if self.request.is_zero() {
            return Err("the store's request timeout must be longer than 0".into());
        }
        if self.min_rate.bytes_per_second() == 0 {
            return Err("the store's minimum rate must be above 0".into());
        }
        Ok(())
    }

    /// How long a transfer of `bytes` may take in all.
    pub fn transfer(&self, bytes: u64) -> Duration {
        let at_min_rate = bytes as f64 / self.min_rate.bytes_per_second().max(1) as f64;
        self.request + Duration::from_secs_f64(at_min_rate.min(1e9))
    }
}

static TIMEOUTS: OnceLock<Timeouts> = OnceLock::new();

/// Use these limits for the stores this process opens from now on
/// (`--store-timeout`, `--store-min-rate`): set once, before opening one.
pub fn set_timeouts(timeouts: Timeouts) {
    let _ = TIMEOUTS.set(timeouts);
}

/// The limits [`set_timeouts`] set, else the defaults.
pub(super) fn timeouts() -> Timeouts {
    TIMEOUTS.get().copied().unwrap_or_default()
}

/// Why a transfer failed: the store's client said so, or it ran out of
/// time here.
pub(super) enum Failure {
    Remote(object_store::Error),
    TimedOut { size: Option<u64>, reason: String },
}

impl From<object_store::Error> for Failure {
    fn from(e: object_store::Error) -> Self {
        Failure::Remote(e)
    }
}

/// `put_opts` within [`Timeouts::transfer`] of its size.
pub(super) async fn put(
    store: &dyn ObjectStore,
    path: &ObjectPath,
    payload: PutPayload,
    opts: PutOptions,
    t: &Timeouts,
) -> Result<PutResult, Failure> {
    let size = payload.content_length() as u64;
    let limit = t.transfer(size);
    match tokio::time::timeout(limit, store.put_opts(path, payload, opts)).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(Failure::TimedOut { size: Some(size), reason: too_slow(t, size, limit, None) }),
    }
}

/// The whole object and its ETag (`None` if there is none): the answer's
/// head within [`Timeouts::request`], the rest within
/// [`Timeouts::transfer`] of its size from the start, with never
/// [`Timeouts::request`] between two parts.
pub(super) async fn get(
    store: &dyn ObjectStore,
    path: &ObjectPath,
    t: &Timeouts,
) -> Result<Option<(Vec<u8>, String)>, Failure> {
    let started = Instant::now();
    let got = match tokio::time::timeout(t.request, store.get(path)).await {
        Ok(Ok(got)) => got,
        Ok(Err(object_store::Error::NotFound { .. })) => return Ok(None),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => return Err(Failure::TimedOut { size: None, reason: no_answer(t) }),
    };
    let size = got.meta.size;
    let tag = got.meta.e_tag.clone().unwrap_or_default();
    let limit = t.transfer(size);
    let deadline = started + limit;
    // (The size is the store's word: reserve no more than a large segment
    // before the bytes show it.)
    let mut bytes = Vec::with_capacity(size.min(64 << 20) as usize);
    let mut stream = got.into_stream();
    loop {
        let quiet_until = Instant::now() + t.request;
        match tokio::time::timeout_at(quiet_until.min(deadline), stream.try_next()).await {
            Ok(Ok(Some(part))) => bytes.extend_from_slice(&part),
            Ok(Ok(None)) => return Ok(Some((bytes, tag))),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) if deadline <= quiet_until => {
                let reason = too_slow(t, size, limit, Some(bytes.len() as u64));
                return Err(Failure::TimedOut { size: Some(size), reason });
            }
            Err(_) => {
                let reason = format!(
                    "nothing received for {} after {} of it: the link or the store stalled; if the store pauses that long, raise {TIMEOUT_SETTING}",
                    seconds(t.request),
                    Size(bytes.len() as u64).approx(),
                );
                return Err(Failure::TimedOut { size: Some(size), reason });
            }
        }
    }
}

/// Whether the store's client gave up on `e` for lack of time: its own
/// limit on a request without a body, or on connecting.
pub(super) fn is_timeout(e: &object_store::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<object_store::client::HttpError>()
            .is_some_and(|h| h.kind() == object_store::client::HttpErrorKind::Timeout)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Why a request without a body (or a GET's head) timed out.
pub(super) fn no_answer(t: &Timeouts) -> String {
    format!(
        "no answer within {} (no connection within {}, or no reply after it): is the store reachable from this host? If it is and answers that slowly, raise {TIMEOUT_SETTING}",
        seconds(t.request),
        seconds(CONNECT_TIMEOUT),
    )
}

/// Why a transfer of `size` bytes ran out of its `limit`, `received` of
/// them (a GET's) in.
fn too_slow(t: &Timeouts, size: u64, limit: Duration, received: Option<u64>) -> String {
    if limit < t.request * 2 && received.is_none_or(|r| r == 0) {
        // Mostly the request's own limit: no answer, rather than a slow link.
        return no_answer(t);
    }
    let mut reason = format!("not done within {}", seconds(limit));
    if let Some(received) = received {
        let _ = write!(reason, " ({} received)", Size(received).approx());
    }
    let _ = write!(
        reason,
        ", the time {} takes at {} plus {}: the link to the store is slower than {} or stalled; if it is that slow, set {MIN_RATE_SETTING} below its speed",
        Size(size).approx(),
        t.min_rate,
        seconds(t.request),
        t.min_rate,
    );
    reason
}

/// A duration to the second, for messages ("4m 46s").
fn seconds(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs().max(1))).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transfer_is_given_the_request_timeout_plus_its_size_at_the_minimum_rate() {
        let t = Timeouts { request: Duration::from_secs(30), min_rate: Rate(32 << 10) };
        assert_eq!(t.transfer(0), Duration::from_secs(30));
        assert_eq!(t.transfer(8 << 20), Duration::from_secs(30 + 256));
        assert_eq!(t.transfer(40 << 20), Duration::from_secs(30 + 1280));
        assert!(Timeouts { min_rate: Rate(0), ..t }.check().is_err());
        assert!(Timeouts { request: Duration::ZERO, ..t }.check().is_err());
        assert_eq!(t, Timeouts::default());
    }

    #[test]
    fn a_timeout_says_how_long_it_waited_and_what_to_set() {
        let t = Timeouts::default();
        let why = too_slow(&t, 8 << 20, t.transfer(8 << 20), Some(3 << 20));
        assert!(why.starts_with("not done within 4m 46s (3.0 MiB received)"), "{why}");
        assert!(why.contains("the time 8.0 MiB takes at 32KiB/s plus 30s"), "{why}");
        assert!(why.contains("TERN_STORE_MIN_RATE"), "{why}");
        assert!(no_answer(&t).contains("30s") && no_answer(&t).contains("TERN_STORE_TIMEOUT"));
        // A small object that takes that long was never answered.
        assert_eq!(too_slow(&t, 300, t.transfer(300), None), no_answer(&t));
    }
}
