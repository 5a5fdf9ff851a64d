#!/usr/bin/env bash
# Builds `tern` with failpoints compiled in (driver/src/fail.rs) for the
# crash and torture tests, in a target directory of its own so the release
# binary never has them. Prints the binary's path.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p tern --features failpoints --target-dir target/failpoints >&2
echo "$PWD/target/failpoints/release/tern"
