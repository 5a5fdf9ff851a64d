//! systemd's service notifications (`sd_notify`) for tern's units, which
//! are `Type=notify` with a `WatchdogSec=`: READY once the service does its
//! job (the export listening, the devices up, the store reached), STATUS
//! lines for `systemctl status`, STOPPING, and watchdog pings from each
//! service's supervising loop — a loop that stops turning (a deadlock, a
//! wedged lock) stops the pings, and systemd restarts the service.
//!
//! Outside systemd (no `NOTIFY_SOCKET`) every call does nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        log::warn!("cannot notify systemd (NOTIFY_SOCKET): {e}");
    }
}

/// The service does its job now; `status` says what, for `systemctl status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A line for `systemctl status` (replaces the last).
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// The service is stopping (systemd then waits up to TimeoutStopSec).
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// The watchdog's interval, if systemd asked for pings (`WatchdogSec=`).
fn watchdog_interval() -> Option<Duration> {
    static INTERVAL: OnceLock<Option<Duration>> = OnceLock::new();
    *INTERVAL.get_or_init(|| {
        let mut usec = 0;
        sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec))
    })
}

/// Tells the watchdog the caller's loop is turning. Called from a loop
/// that turns at least every second; sends at most one ping a quarter of
/// the watchdog's interval, so it may be called as often as wanted.
pub fn watchdog() {
    static START: OnceLock<Instant> = OnceLock::new();
    static LAST_MS: AtomicU64 = AtomicU64::new(0);
    let Some(interval) = watchdog_interval() else { return };
    let now_ms = START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1;
    let last = LAST_MS.load(Ordering::Relaxed);
    if last != 0 && now_ms - last < (interval / 4).as_millis() as u64 {
        return;
    }
    if LAST_MS.compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
        send(&[NotifyState::Watchdog]);
    }
}
