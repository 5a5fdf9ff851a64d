//! Points at the newest applied state (`tern failover --latest`, a
//! failback's catch-up): applied and taken here when no `tern apply` holds
//! the replicas, or asked of the one that does through
//! `<target>/<vm>/point-request.toml` and answered in `point-answer.toml`.
//! Inside a resync window there is no such point: the answer says so and
//! names the newest consistent one.

use super::*;

/// Applies everything the cache holds for `vm` and takes a crash-consistent
/// point at the newest applied record, or finds the one there. Fails if
/// another `tern apply` holds the replicas (see [`latest_applied_point`]),
/// or if the replica is inside a resync window there.
pub fn catch_up_and_point(cache: &Store, target: &Path, vm: &str) -> Result<Point> {
    let options = ApplyOptions { once: true, ..ApplyOptions::default() };
    let mut applier = VmApplier::open(cache, target, vm, &options)?
        .with_context(|| format!("the cache {} holds nothing for VM '{vm}'", cache.describe()))?;
    // One pass: what the cache holds now (a source still shipping must not
    // keep the failover waiting).
    let stop = AtomicBool::new(false);
    applier.step(&stop)?;
    applier.point_at_applied()?.map_err(anyhow::Error::msg)
}

/// How long [`latest_applied_point`] waits for a running `tern apply`.
pub const POINT_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// A point at the newest state the target can have: everything the cache
/// holds applied (`tern failover --latest`). Applies itself, or, while a
/// `tern apply` holds the replicas, asks it (`point-request.toml`) and
/// waits for its answer, saying what it waits for; if that applier stops
/// meanwhile, applies itself after all.
pub fn latest_applied_point(cache: &Store, target: &Path, vm: &str) -> Result<Point> {
    let dir = TargetDir::new(target, vm);
    let cache_dir = CacheDir::new(cache, vm);
    let started = std::time::Instant::now();
    let mut told = started;
    let mut asked: Option<PointRequest> = None;
    loop {
        match catch_up_and_point(cache, target, vm) {
            Err(e) if is_busy(&e) => {}
            outcome => {
                if let Some(request) = &asked {
                    withdraw_point_request(&dir, request);
                }
                return outcome;
            }
        }
        let request = match &asked {
            Some(r) => r.clone(),
            None => {
                let request = PointRequest {
                    version: 1,
                    id: uuid::Uuid::new_v4().to_string(),
                    requested_unix_ms: now_ns() / 1_000_000,
                };
                write_durably(&dir.point_request_path(), toml::to_string(&request)?.as_bytes())?;
                log::info!(
                    "VM '{vm}': `tern apply` is running and holds the replicas; asked it to apply everything in {} and take a point there",
                    cache_dir.describe()
                );
                asked = Some(request.clone());
                request
            }
        };
        // Answers are read a few times a second; the lock is tried again
        // each second (the applier may have stopped).
        let until = std::time::Instant::now() + Duration::from_secs(1);
        while std::time::Instant::now() < until {
            if let Some(answer) = dir.read_point_answer().or_else(FileError::damaged_as_none)? {
                if answer.id == request.id {
                    let _ = std::fs::remove_file(dir.point_answer_path());
                    return match (answer.point, answer.error) {
                        (Some(id), _) => dir.list_points()?.into_iter().find(|p| p.id == id).with_context(|| {
                            format!("`tern apply` answered with point {id}, which is not in the catalog")
                        }),
                        (None, error) => Err(anyhow::anyhow!(error.unwrap_or_else(|| "no reason given".into())))
                            .context(format!("`tern apply` took no point for VM '{vm}'")),
                    };
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(failure) = cache_dir.read_apply_failure().or_else(FileError::damaged_as_none)? {
            if failure.failed_unix_ms >= request.requested_unix_ms {
                withdraw_point_request(&dir, &request);
                bail!(
                    "the running `tern apply` fails on VM '{vm}' ({}); fix that, or fail over to the newest existing point with --latest-point",
                    failure.error
                );
            }
        }
        let waited = started.elapsed();
        if waited >= POINT_REQUEST_TIMEOUT {
            withdraw_point_request(&dir, &request);
            bail!(
                "the running `tern apply` did not answer for VM '{vm}' within {}s (is it stuck? see its log); or fail over to the newest existing point with --latest-point",
                waited.as_secs()
            );
        }
        if told.elapsed() >= Duration::from_secs(5) {
            let applied = dir.read_checkpoint().ok().flatten().map_or(0, |c| c.applied_seq);
            let newest = cache_dir.list_segments().ok().and_then(|s| s.iter().map(|l| l.last_seq).max());
            log::info!(
                "VM '{vm}': waiting {}s for `tern apply` to apply what the cache holds (replicas at seq {applied}{}) and take a point",
                waited.as_secs(),
                newest.map(|n| format!(", the cache's newest segment ends at seq {n}")).unwrap_or_default()
            );
            told = std::time::Instant::now();
        }
    }
}

fn is_busy(e: &anyhow::Error) -> bool {
    e.downcast_ref::<tern_driver::Error>().is_some_and(|e| matches!(e, tern_driver::Error::Busy { .. }))
}

/// Removes the request if it is still `request` (another asker may have
/// replaced it).
fn withdraw_point_request(dir: &TargetDir, request: &PointRequest) {
    if let Ok(Some(r)) = dir.read_point_request() {
        if r.id == request.id {
            let _ = std::fs::remove_file(dir.point_request_path());
        }
    }
}

impl VmApplier {
    /// A pending point request (`tern failover --latest` while this applier
    /// holds the replicas).
    pub(super) fn point_request(&self) -> Option<PointRequest> {
        match self.target.read_point_request() {
            Ok(Some(r)) => Some(r),
            Ok(None) => None,
            Err(e @ FileError::Damaged { .. }) => {
                log::warn!("VM '{}': ignoring a point request: {e}", self.name);
                let _ = std::fs::remove_file(self.target.point_request_path());
                None
            }
            Err(e) => {
                log::warn!("VM '{}': {e:#}", self.name);
                None
            }
        }
    }

    /// Answers `request` with a point at the newest applied state, or why
    /// there is none. A failure to take it is answered and returned.
    pub(super) fn answer_point_request(&mut self, request: PointRequest) -> Result<()> {
        let outcome = self.point_at_applied();
        let (point, error) = match &outcome {
            Ok(Ok(p)) => (Some(p.id.clone()), None),
            Ok(Err(why)) => (None, Some(why.clone())),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        match &point {
            Some(id) => log::info!("VM '{}': answered a point request with point {id}", self.name),
            None => log::warn!(
                "VM '{}': answered a point request without a point: {}",
                self.name,
                error.as_deref().unwrap_or("")
            ),
        }
        let answer = PointAnswer { version: 1, id: request.id.clone(), point, error };
        write_durably(&self.target.point_answer_path(), toml::to_string(&answer)?.as_bytes())?;
        withdraw_point_request(&self.target, &request);
        outcome.map(|_| ())
    }

    /// The point at the newest applied state (the replicas committed
    /// first): the one there if any, else a new crash-consistent one. The
    /// inner `Err` says why there is none: the replica is inside a resync
    /// window, naming the newest consistent point.
    pub(super) fn point_at_applied(&mut self) -> Result<std::result::Result<Point, String>> {
        self.commit()?;
        let cur = self.cur.clone();
        let points = self.target.list_points()?;
        if cur.in_window {
            let newest = match points.iter().max_by_key(|p| p.seq) {
                Some(p) => format!(
                    "the newest consistent point is {} (seq {}): use it with --point {} (or --latest-point)",
                    p.id, p.seq, p.id
                ),
                None => "and there is no point yet".into(),
            };
            return Ok(Err(format!(
                "VM '{}' is inside a resync window at seq {} (an initial sync or a catch-up after an overflow is running): no consistent point exists there; {newest}",
                self.name, cur.applied_seq
            )));
        }
        if cur.applied_seq < self.mixed_until {
            return Ok(Err(format!(
                "VM '{}': an apply pass that stopped wrote the replicas past seq {} (up to seq {}), and applying has not passed that again{}: no consistent state exists there; use an earlier point with --point (or --latest-point)",
                self.name,
                cur.applied_seq,
                self.mixed_until,
                if self.cache.read_fence().ok().flatten().is_some() { " (the VM is failed over, so nothing more is applied)" } else { "" }
            )));
        }
        if let Some(p) = points.into_iter().find(|p| p.seq == cur.applied_seq && p.epoch == cur.epoch) {
            return Ok(Ok(p));
        }
        let id = Point::make_id(cur.applied_seq, PointKind::Crash);
        self.take_point(cur.applied_seq, cur.epoch, cur.source_time_ns, PointKind::Crash, PointTag::default())?;
        let taken = self.target.list_points()?.into_iter().find(|p| p.id == id);
        Ok(Ok(taken.context("the point just taken is not in the catalog")?))
    }
}
