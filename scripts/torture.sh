#!/usr/bin/env bash
# torture.sh — tern's torture suite (issue 17): seeded trials of the whole
# data path. Each trial protects a VM of two disks, runs several NBD
# connections per disk of overlapping writes, write-zeroes, trims, flushes
# and FUA writes against `tern serve`, with `tern ship` and `tern apply`
# running beside it, and makes one disaster happen: a kill -9 at a named
# failpoint, an injected EIO/ENOSPC, a process stalled at a failpoint and
# then killed, a random kill, a power cut of either site (tern-crashfs
# drops what was not fsynced, or a torn part of it, then the host
# "reboots"), or a `tern tag` killed half-way; with clock skew between the
# sites in some. Then recovery, more writes and tags, the final catch-up,
# and the checks, all against the client's own history: the source after
# the crash, every recovery point, every tag's point, the final replica.
#
# Usage (as root: FUSE mounts):
#   scripts/torture.sh [--seeds N] [--first F] [--seed S] [--minutes M]
#                      [--jobs J] [--keep] [--report FILE] [-v]
#     --seeds N    run N seeds from --first (default 1) [20]
#     --seed S     replay one seed (prints every violation)
#     --minutes M  start no trial after M minutes
#     --jobs J     trials at once [1]
#     --keep       keep failing trials' directories (logs, images, history)
#     --report F   totals as JSON (the reliability table's source)
#
# Prints one line per failing seed with the command that replays it, and
# ends with: torture: <trials> trials, <kills> kills, <faults> faults,
# <violations> violations. Exits non-zero on any violation.
set -euo pipefail
# shellcheck source=lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"
cd "$BENCH_ROOT"
BENCH_NAME=torture.sh BENCH_LOG=plain BENCH_ERROR=""   # torture.sh: ...

need_root "the power-cut trials mount FUSE filesystems"
need_tools faketime fusermount3
[[ -e /dev/fuse ]] || modprobe fuse 2>/dev/null || true

tern=$(scripts/build-failpoints.sh)
cargo build --release -p tern-torture -p tern-crashfs >&2
args=("$@")
[[ " $* " == *" --seeds "* || " $* " == *" --seed "* ]] || args+=(--seeds 20)
exec target/release/tern-torture --tern "$tern" --crashfs "$PWD/target/release/tern-crashfs" "${args[@]}"
