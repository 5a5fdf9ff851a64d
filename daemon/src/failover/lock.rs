//! One `tern failover` or `tern commit` of a VM at a time, at a target
//! site: `<target>/<vm>/failover.lock`, an `flock` whose file names the
//! holder (its pid, then its command). Without it two runs shared the
//! temporary directory of one failover name, and a failover wrote the
//! fence it had read before a commit that came in between, undoing it.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long a run waits for another of the same VM to finish before it
/// gives up: long enough for a moment's overlap, short enough that an
/// operator is not left waiting on a failover applying for minutes.
const WAIT: Duration = Duration::from_secs(3);

/// The lock a failover or commit holds until it is dropped.
pub struct FailoverLock {
    _file: File,
}

/// Takes the lock of the VM whose target directory is `root` (created
/// durably if missing) for `command` (say "`tern commit`"), waiting
/// [`WAIT`] at most; refuses naming the holder.
pub fn lock(root: &Path, vm: &str, command: &str) -> Result<FailoverLock> {
    tern_driver::fs::create_dir_durably(root)?;
    let path = root.join("failover.lock");
    let started = Instant::now();
    loop {
        match tern_driver::fs::lock_exclusive(&path, &format!("the failovers of VM '{vm}'"), command) {
            Ok(mut file) => {
                // After the pid lock_exclusive wrote: for the error below.
                writeln!(file, "{command}").with_context(|| format!("cannot write {}", path.display()))?;
                return Ok(FailoverLock { _file: file });
            }
            Err(tern_driver::Error::Busy { .. }) if started.elapsed() < WAIT => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(tern_driver::Error::Busy { .. }) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let mut lines = holder.lines().map(str::trim);
                let pid = lines.next().filter(|p| !p.is_empty()).unwrap_or("unknown");
                let other = lines.next().filter(|c| !c.is_empty()).unwrap_or("`tern failover` or `tern commit`");
                bail!(
                    "another {other} of VM '{vm}' is running (pid {pid}, holding {}), still after {}s: nothing was done; let it finish (or stop it), then run this again",
                    path.display(),
                    WAIT.as_secs()
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
}
