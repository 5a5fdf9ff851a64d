//! `tern demo` is the README's first command: it must work with nothing but
//! the binary, and its verdict must be the real one.

use std::process::Command;

use tern_system_tests::tern_bin;

#[test]
fn demo_runs_and_the_failover_disk_and_the_replica_match_the_source() {
    let out = Command::new(tern_bin())
        .args(["demo", "--disk-size", "64MiB", "--writes", "500"])
        .output()
        .expect("run tern demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "tern demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("tern ship vm1 --once"), "{stdout}");
    assert!(stdout.contains("-app at seq"), "an app-consistent point at the tag: {stdout}");
    assert!(stdout.contains("tern failover vm1 --test --point"), "{stdout}");
    assert!(stdout.contains("vs the source at the tag: identical"), "{stdout}");
    assert!(stdout.contains("tern verify vm1: replica vs source disk: identical"), "{stdout}");
}
