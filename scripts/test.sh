#!/usr/bin/env bash
# The whole test suite, as CI runs it (`.ci/run`): installs what the tests
# need, then the gates: format, lints, unit tests, end-to-end tests against
# real clients, a VM booted from tern's export, and the fuzz targets' build.
set -euo pipefail
# shellcheck source=lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"
cd "$BENCH_ROOT"
BENCH_STEP_GAP=1   # step: an empty line before each

step "dependencies"
scripts/install-deps.sh

step "object stores for the two-site tests (SeaweedFS, Azurite: scripts/stores.sh)"
scripts/stores.sh install
scripts/stores.sh start
on_exit 'scripts/stores.sh stop'
eval "$(scripts/stores.sh env)"

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "build (release)"
cargo build --release --workspace

step "tests (unit and end-to-end)"
# Release mode: the end-to-end tests push real I/O through tern. Every
# crate's tests run even after one fails, so one run reports every failure.
results=$(mktemp)
on_exit 'rm -f "$results"'
cargo test --release --workspace --no-fail-fast 2>&1 | tee "$results"
passed=$(awk '/^test result:/ { n += $4 } END { print n + 0 }' "$results")
failed=$(awk '/^test result:/ { n += $6 } END { print n + 0 }' "$results")

step "torture: a bounded sweep of seeded trials (scripts/torture.sh)"
# About 4 minutes of the suite that finds silent data loss by machine:
# kills at failpoints, injected errors, power cuts, clock skew, judged
# against the client's history. Longer runs: scripts/torture.sh --seeds N.
scripts/torture.sh --seeds 400 --minutes "${TERN_TORTURE_MINUTES:-4}"

step "systemd units (systemd-analyze verify)"
scripts/check-units.sh

step "a real VM on tern's NBD export (qemu, Debian's 6.12 kernel)"
scripts/vm-test.sh

step "fuzz targets build"
if [[ "${TERN_SKIP_FUZZ_BUILD:-0}" != 1 ]]; then
    scripts/fuzz-nbd.sh --build-only
fi

echo
echo "tests: $passed passed, $failed failed"
