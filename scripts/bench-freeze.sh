#!/usr/bin/env bash
# bench-freeze.sh — guest freeze through the qemu guest agent (issue 22):
# `tern tag --freeze qga:` ROUNDS times while a Debian guest writes to ext4
# on tern's NBD export without pause (the freeze scenario of
# scripts/vm-test.sh). Per tag: how long the agent took to answer
# guest-fsfreeze-freeze (the guest flushing and freezing its filesystems),
# and freeze-to-thaw: from the freeze sent to the thaw answered, the time
# the guest's writes wait for the point.
#
# The guest is software-emulated (no KVM here): its flush is slower than
# on hardware, so read the figures as an upper bound.
#
# Usage: scripts/bench-freeze.sh
# Knobs [defaults]: ROUNDS [20], WORK [/var/tmp/tern-bench-freeze].
# Output: the lines in RESULTS/bench.txt and a summary.
set -euo pipefail
# shellcheck source=lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"
cd "$BENCH_ROOT"
WORK=${WORK:-/var/tmp/tern-bench-freeze}
ROUNDS=${ROUNDS:-20}
TERN=target/release/tern
need_root "qemu, apt"
mkdir -p "$WORK"
make_results

TERN_FREEZE_ROUNDS=$ROUNDS BENCH_OUT=$RESULTS/bench.txt scripts/vm-test.sh freeze
fingerprint "$RESULTS/version.txt" qemu-system-x86_64

log "results in $RESULTS (command: $(knob_command scripts/bench-freeze.sh ROUNDS))"
awk '
    $2 == "freeze" { n++; a[n] = $3 * 1000; f[n] = $4 * 1000 }
    function sort(x,   i, k, t) { for (i = 1; i <= n; i++) for (k = i + 1; k <= n; k++) if (x[k] < x[i]) { t = x[i]; x[i] = x[k]; x[k] = t } }
    function pct(x, p,   i) { i = int(n * p + 0.999); if (i < 1) i = 1; return x[i] }
    END {
        sort(a); sort(f)
        printf "%d frozen tags under load\n", n
        printf "freeze answered (guest flush + freeze): p50 %.0f ms, p99 %.0f ms, max %.0f ms\n", pct(a, 0.5), pct(a, 0.99), a[n]
        printf "freeze-to-thaw (writes wait):           p50 %.0f ms, p99 %.0f ms, max %.0f ms\n", pct(f, 0.5), pct(f, 0.99), f[n]
    }' "$RESULTS/bench.txt" | tee "$RESULTS/summary.txt"
