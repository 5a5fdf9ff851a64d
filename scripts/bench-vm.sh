#!/usr/bin/env bash
# bench-vm.sh — tern's front-ends inside a guest (issue 21): fio 4 KiB
# random writes at QD 32 and 1 MiB sequential writes through /dev/ublkb0
# (tern serve --ublk), through the kernel's NBD client to tern serve, and
# on a virtio disk directly, in one guest and one run; and the longest
# write a writer sees while `tern serve --ublk` is killed with SIGKILL and
# started again (RESTARTS times).
#
# The guest is software-emulated (no KVM here), so absolute figures mean
# little: read the ratios to the virtio disk. The guest's side is
# tests/vm/bench.sh, booted by `scripts/vm-test.sh bench`.
#
# Usage: scripts/bench-vm.sh
# Knobs [defaults]: ROUNDS [2] (each front-end, rotating order), RUNTIME
#   [10] (seconds per fio job), RESTARTS [10], WORK [/var/tmp/tern-bench-vm].
# Output: the guest's lines in RESULTS/bench.txt and a table.
set -euo pipefail
# shellcheck source=lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"
cd "$BENCH_ROOT"
WORK=${WORK:-/var/tmp/tern-bench-vm}
ROUNDS=${ROUNDS:-2} RUNTIME=${RUNTIME:-10} RESTARTS=${RESTARTS:-10}
TERN=target/release/tern
need_root "qemu, apt"
mkdir -p "$WORK"
make_results

# The guest reads its knobs from the kernel command line.
TERN_VM_TIMEOUT=${TERN_VM_TIMEOUT:-1800} BENCH_OUT=$RESULTS/bench.txt \
    TERN_VM_APPEND="tern.rounds=$ROUNDS tern.runtime=$RUNTIME tern.restarts=$RESTARTS" \
    scripts/vm-test.sh bench
fingerprint "$RESULTS/version.txt" fio qemu-system-x86_64

log "results in $RESULTS (command: $(knob_command scripts/bench-vm.sh ROUNDS RUNTIME RESTARTS))"
awk '
    $2 == "fio" {
        key = $3 " " $4; mib = $5 / 1024; sum[key] += mib; iops[key] += $6; n[key]++
        if (!(key in lo) || mib < lo[key]) lo[key] = mib
        if (!(key in hi) || mib > hi[key]) hi[key] = mib
    }
    $2 == "restart" { stall[++r] = $4 / 1000 }
    $2 == "norestart" { base = $3 / 1000 }
    $2 == "re-attached" { reattached = $3 }
    END {
        printf "%-18s %-7s %20s %8s %10s\n", "job", "path", "MiB/s (min-max)", "IOPS", "vs virtio"
        split("randwrite-4k-qd32 write-1m", jobs, " ")
        split("ublk nbd virtio", paths, " ")
        for (j = 1; j <= 2; j++) for (p = 1; p <= 3; p++) {
            key = jobs[j] " " paths[p]; v = jobs[j] " virtio"
            printf "%-18s %-7s %8.1f (%4.0f-%4.0f) %8.0f %9.2fx\n", jobs[j], paths[p], sum[key] / n[key],
                lo[key], hi[key], iops[key] / n[key], (sum[key] / n[key]) / (sum[v] / n[v])
        }
        # p50 and max of the per-restart longest writes
        for (i = 1; i <= r; i++) for (k = i + 1; k <= r; k++) if (stall[k] < stall[i]) { t = stall[i]; stall[i] = stall[k]; stall[k] = t }
        printf "restart stall (the longest write across a kill -9 and restart; %d restarts, %s re-attached): p50 %.0f ms, max %.0f ms; the same writer without a restart: %.0f ms\n",
            r, reattached, (r % 2 ? stall[(r + 1) / 2] : (stall[r / 2] + stall[r / 2 + 1]) / 2), stall[r], base
    }' "$RESULTS/bench.txt" | tee "$RESULTS/summary.txt"
