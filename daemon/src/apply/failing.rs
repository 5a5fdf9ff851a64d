//! VMs the applier failed on. A failure stops nothing for good: the
//! target is a long-running service, and what failed (a full or missing
//! filesystem, a segment still being uploaded, a seed not yet mounted) is
//! often fixed from outside. The VM is tried again after a backoff that
//! doubles up to [`RETRY_MAX`]; meanwhile its failure is published in the
//! cache (`apply-failure.toml`) for `tern status` at either site, and
//! removed by the first pass that succeeds.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tern_store::cache::{ApplyFailure, CacheDir, APPLY_FAILURE};

/// The first retry's wait; each failure in a row doubles it.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two tries.
pub const RETRY_MAX: Duration = Duration::from_secs(300);

/// The wait after the `attempts`-th failure in a row.
pub fn backoff(attempts: u32) -> Duration {
    RETRY_FIRST.saturating_mul(1u32 << attempts.saturating_sub(1).min(16)).min(RETRY_MAX)
}

struct Failing {
    failure: ApplyFailure,
    retry_at: Instant,
}

#[derive(Default)]
pub struct FailingVms {
    vms: BTreeMap<String, Failing>,
}

impl FailingVms {
    /// Whether `vm` is failing and its next try is not due yet.
    pub fn waiting(&self, vm: &str, now: Instant) -> bool {
        self.vms.get(vm).is_some_and(|f| now < f.retry_at)
    }

    /// Records a failure of `vm` and publishes it; `retry`: whether it
    /// will be tried again (not by `tern apply --once`). Returns the wait.
    pub fn failed(&mut self, cache: &CacheDir, vm: &str, error: String, retry: bool) -> Duration {
        let now_ms = super::now_ns() / 1_000_000;
        let previous = self.vms.remove(vm);
        let attempts = previous.as_ref().map_or(0, |f| f.failure.attempts) + 1;
        let wait = backoff(attempts);
        let failure = ApplyFailure {
            version: 1,
            error,
            attempts,
            first_failed_unix_ms: previous.map_or(now_ms, |f| f.failure.first_failed_unix_ms),
            failed_unix_ms: now_ms,
            retry_unix_ms: if retry { now_ms + wait.as_millis() as u64 } else { 0 },
        };
        publish(cache, vm, Some(&failure));
        self.vms.insert(vm.to_owned(), Failing { failure, retry_at: Instant::now() + wait });
        wait
    }

    /// `vm` applied a pass without failing: it is well again (and a
    /// failure file an earlier applier left goes too).
    pub fn succeeded(&mut self, cache: &CacheDir, vm: &str) {
        if let Some(f) = self.vms.remove(vm) {
            log::info!("VM '{vm}': applying again after {} failed attempt(s)", f.failure.attempts);
        }
        if cache.exists(APPLY_FAILURE).unwrap_or(true) {
            publish(cache, vm, None);
        }
    }

    /// The first failure, if any (`tern apply --once` exits with it).
    pub fn first(&self) -> Option<(&str, &str)> {
        self.vms.iter().next().map(|(vm, f)| (vm.as_str(), f.failure.error.as_str()))
    }
}

/// Writes (or with `None` removes) the VM's failure file; a failure to do
/// so is logged, never fatal: it is a report, not state.
fn publish(cache: &CacheDir, vm: &str, failure: Option<&ApplyFailure>) {
    let done = match failure {
        Some(f) => cache.write_toml(APPLY_FAILURE, f, "tern apply failing on this VM; removed when it applies again"),
        None => cache.remove(APPLY_FAILURE),
    };
    if let Err(e) = done {
        log::warn!("VM '{vm}': cannot update the failure report: {e:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_from_a_second_up_to_five_minutes() {
        let waits: Vec<u64> = (1..=12).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(backoff(u32::MAX), RETRY_MAX);
    }
}
