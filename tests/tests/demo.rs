//! `tern demo` is the README's first command: it must work with nothing but
//! the binary, and its verdict must be the real one.

use std::process::Command;

use tern_system_tests::tern_bin;

#[test]
fn demo_runs_and_the_failover_disk_and_the_replica_match_the_source() {
    let rings = tempfile::tempdir().expect("tempdir");
    let out = Command::new(tern_bin())
        .args(["demo", "--disk-size", "64MiB", "--writes", "500"])
        .env("TERN_RING_DIR", rings.path())
        .output()
        .expect("run tern demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "tern demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("tern ship vm1, beside the workload"), "{stdout}");
    assert!(stdout.contains("RPO seen while writing: max") && stdout.contains("now 0.0s"), "{stdout}");
    assert!(stdout.contains("-app at seq"), "an app-consistent point at the tag: {stdout}");
    assert!(stdout.contains("tern failover vm1 --test --point"), "{stdout}");
    assert!(stdout.contains("vs the source at the tag: identical"), "{stdout}");
    assert!(stdout.contains("tern verify vm1: replica vs source disk: identical"), "{stdout}");
    // Its journal ring (memory, outside its directory) went with it.
    let left: Vec<_> = std::fs::read_dir(rings.path()).expect("ring dir").collect();
    assert!(left.is_empty(), "the demo left its journal ring behind: {left:?}");
}

/// As an unprivileged user (`nobody`), with a copy of the binary it can
/// reach, in its own temporary directory: no root, no reflinks needed.
#[test]
fn demo_runs_unprivileged() {
    let dir = tempfile::Builder::new().prefix("tern-demo-nobody-").tempdir().expect("tempdir");
    let bin = dir.path().join("tern");
    std::fs::copy(tern_bin(), &bin).expect("copy tern");
    use std::os::unix::fs::PermissionsExt;
    for (p, mode) in [(dir.path(), 0o777), (bin.as_path(), 0o755)] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin)
        .args(["demo", "--disk-size", "32MiB", "--writes", "200"])
        .env("TMPDIR", dir.path())
        .env("TERN_RING_DIR", dir.path().join("rings"))
        .output()
        .expect("run tern demo as nobody");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "tern demo as nobody failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("tern verify vm1: replica vs source disk: identical"), "{stdout}");
}
