#!/usr/bin/env bash
# bench-failover.sh — what choosing the failover's point costs (issue 18):
# `tern failover --test --latest` (apply everything the cache holds, take a
# point at the applied sequence, clone it) against `--latest-point` (clone
# the newest point taken), with PENDING bytes shipped to the cache and not
# yet applied; and --latest answered by a running `tern apply` (the point
# request) with nothing pending; and a planned failover (`--planned`) of
# a VM that writes PLANNED_RATE (fio, 64 KiB random writes through the NBD
# export, for PLANNED_SECONDS) until it shuts down, with `tern ship` and
# `tern apply` running: from the command to the failed-over disk, RPO 0.
#
# Setup: a btrfs loop filesystem (FS_SIZE) holding a DISK-sized sparse
# image, the cache and the target; `tern serve` on it, the initial sync
# shipped and applied. Per round and per size in PENDINGS: PENDING bytes
# of random data written through the NBD export (nbdcopy), `tern ship
# --once`, the page cache dropped, then timed: --latest-point, then
# --latest (which applies the pending bytes). Then, with `tern apply`
# running and the cache drained, --latest again (asking it).
#
# Usage (root: loop mount, drop_caches):
#   scripts/bench-failover.sh
#   PENDINGS="0 64m" ROUNDS=2 scripts/bench-failover.sh
# Knobs [defaults]: PENDINGS ["0 64m 1g"], ROUNDS [3], DISK [4g],
#   PLANNED_RATE [50m], PLANNED_SECONDS [20], MEASURE ["latest planned"],
#   FS_SIZE [16G], WORK [/var/tmp/tern-bench-failover], TERN
#   [target/release/tern; built first].
# Output: one line per timed command, and a summary table (medians, with
# the range) on stdout; everything in $WORK/results-<stamp>/.
set -euo pipefail
# shellcheck source=lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"
cd "$BENCH_ROOT"
PENDINGS=${PENDINGS-"0 64m 1g"}
ROUNDS=${ROUNDS:-3}
DISK=${DISK:-4g}
FS_SIZE=${FS_SIZE:-16G}
WORK=${WORK:-/var/tmp/tern-bench-failover}
TERN=${TERN:-target/release/tern}
PLANNED_RATE=${PLANNED_RATE:-50m}
PLANNED_SECONDS=${PLANNED_SECONDS:-20}
MEASURE=${MEASURE-"latest planned"}

BENCH_LOG=utc
need_root "loop mount, drop_caches"
need_tools nbdcopy mkfs.btrfs python3 fio bc
build_tern
need_tern
make_results
tern_snapshot "$RESULTS/tern"
fingerprint "$RESULTS/version.txt" fio nbdcopy mkfs.btrfs

MNT=$WORK/mnt
on_exit 'stop_pid "${SERVE:-}"'
on_exit 'stop_pid "${APPLY:-}"'
on_exit umount_loops
on_exit 'rm -f "$WORK/fs.img"'
truncate -s "$FS_SIZE" "$WORK/fs.img"
loop_fs btrfs "$WORK/fs.img" "$MNT"
mkdir -p "$MNT/cache" "$MNT/target"
truncate -s "$DISK" "$MNT/disk0.img"
STATE=$MNT/state
TS=("$TERN" --state "$STATE")
"${TS[@]}" enable vm --disk "disk0=$MNT/disk0.img" --cache "$MNT/cache" --target "$MNT/target" \
    --journal-size 256MiB >"$RESULTS/enable.log" 2>&1
SOCK=$WORK/nbd.sock
"${TS[@]}" serve vm --listen "unix:$SOCK" 2>"$RESULTS/serve.log" &
SERVE=$!
wait_for_socket "$SOCK" 10 "$RESULTS/serve.log" "$SERVE" || die "tern serve is not listening"
"${TS[@]}" ship vm --once 2>"$RESULTS/ship-initial.log"
"$TERN" apply vm --once --cache "$MNT/cache" --target "$MNT/target" 2>"$RESULTS/apply-initial.log"
# A first point for --latest-point (an empty disk's initial sync has none).
"${TS[@]}" failover vm --test --latest --name warm-up >"$RESULTS/warm-up.log" 2>&1
"${TS[@]}" failover-cleanup vm warm-up >/dev/null
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'), git $(git rev-parse --short HEAD)"
    echo "machine: $(machine_desc); btrfs on a loop file on $(df --output=fstype "$WORK" | tail -1)"
    echo "command: PENDINGS=\"$PENDINGS\" ROUNDS=$ROUNDS DISK=$DISK scripts/bench-failover.sh"
} | tee "$RESULTS/run.txt" >&2

# run NAME CMD...: CMD timed, its output to $RESULTS/NAME.{out,err}; S = its
# seconds (3 decimals). Dies if it fails.
run() {
    local name=$1
    shift
    timed "$RESULTS/$name.out" "$RESULTS/$name.err" "$@" || die "$name failed: $(tail -3 "$RESULTS/$name.err")"
    S=$(printf '%.3f' "$T_WALL")
}

TSV=$RESULTS/failover.tsv
echo -e "case\tpending\tround\tseconds" >"$TSV"
n=0
if [[ " $MEASURE " == *" latest "* ]]; then
for r in $(seq "$ROUNDS"); do
    for pending in $PENDINGS; do
        n=$((n + 1))
        if [[ $pending != 0 ]]; then
            head -c "$(bytes "$pending")" /dev/urandom >"$WORK/pending.bin"
            nbdcopy "$WORK/pending.bin" "nbd+unix:///disk0?socket=$SOCK"
            rm -f "$WORK/pending.bin"
        fi
        "${TS[@]}" ship vm --once 2>>"$RESULTS/ship.log"
        drop_caches
        run "latest-point-$n" "${TS[@]}" failover vm --test --latest-point --name "lp$n"
        log "--latest-point, $pending pending, round $r: ${S}s"
        echo -e "latest-point\t$pending\t$r\t$S" >>"$TSV"
        drop_caches
        run "latest-$n" "${TS[@]}" failover vm --test --latest --name "l$n"
        log "--latest, $pending pending, round $r: ${S}s"
        echo -e "latest\t$pending\t$r\t$S" >>"$TSV"
        "${TS[@]}" failover-cleanup vm "lp$n" >/dev/null
        "${TS[@]}" failover-cleanup vm "l$n" >/dev/null
    done
done
# --latest answered by a running applier, nothing pending.
"$TERN" apply vm --cache "$MNT/cache" --target "$MNT/target" 2>"$RESULTS/apply-daemon.log" &
APPLY=$!
sleep 2
for r in $(seq "$ROUNDS"); do
    n=$((n + 1))
    run "latest-asked-$n" "${TS[@]}" failover vm --test --latest --name "la$n"
    log "--latest asking a running tern apply, round $r: ${S}s"
    echo -e "latest (apply running)\t0\t$r\t$S" >>"$TSV"
    "${TS[@]}" failover-cleanup vm "la$n" >/dev/null
done
stop_pid "$APPLY"; APPLY=
fi

# A planned failover of a VM writing PLANNED_RATE until it shuts down,
# ship and apply running. Each round starts from a fresh VM (the failover
# fences the one before).
if [[ " $MEASURE " == *" planned "* ]]; then
for r in $(seq "$ROUNDS"); do
    stop_pid "${SERVE:-}"; SERVE=
    rm -rf "$STATE" "$MNT/cache/vm" "$MNT/target/vm" "$MNT/disk0.img"
    truncate -s "$DISK" "$MNT/disk0.img"
    "${TS[@]}" enable vm --disk "disk0=$MNT/disk0.img" --cache "$MNT/cache" --target "$MNT/target" \
        --journal-size 256MiB >>"$RESULTS/enable.log" 2>&1
    "${TS[@]}" serve vm --listen "unix:$SOCK" 2>"$RESULTS/serve-planned-$r.log" &
    SERVE=$!
    wait_for_socket "$SOCK" 10 "$RESULTS/serve-planned-$r.log" "$SERVE" || die "tern serve is not listening"
    "${TS[@]}" ship vm 2>"$RESULTS/ship-planned-$r.log" &
    SHIP=$!
    "$TERN" apply vm --cache "$MNT/cache" --target "$MNT/target" 2>"$RESULTS/apply-planned-$r.log" &
    APPLY=$!
    fio --name=vm --ioengine=nbd --uri="nbd+unix:///disk0?socket=$SOCK" --rw=randwrite --bs=64k \
        --iodepth=8 --rate="$PLANNED_RATE" --size="$DISK" --time_based --runtime="$PLANNED_SECONDS" \
        --output="$RESULTS/fio-planned-$r.txt" >/dev/null 2>&1
    # The VM has shut down: fail over, planned.
    run "planned-$r" "${TS[@]}" failover vm --planned --json
    wait "$SHIP" 2>/dev/null || true
    wait "$SERVE" 2>/dev/null || true
    SERVE=
    seq=$(json_get "$RESULTS/planned-$r.out" seq)
    same=$(cmp -s "$MNT/disk0.img" "$MNT/target/vm/failover/active/disk0.img" && echo identical || echo DIFFERENT)
    log "--planned after ${PLANNED_SECONDS}s at $PLANNED_RATE, round $r: ${S}s (seq $seq, failed-over disk vs source: $same)"
    [[ $same == identical ]] || die "the planned failover's disk differs from the source"
    echo -e "planned\t${PLANNED_RATE}/s for ${PLANNED_SECONDS}s\t$r\t$S" >>"$TSV"
    stop_pid "$APPLY"; APPLY=
done
fi

bench_py - "$TSV" <<'EOF' | tee "$RESULTS/summary.md"
import sys
from benchlib import median, read_tsv, spread, unique
rows = read_tsv(sys.argv[1])
print("| tern failover | pending in the cache (or load) | median s | range s | runs |")
print("|---|---|---|---|---|")
for k in unique((r["case"], r["pending"]) for r in rows):
    v = [float(r["seconds"]) for r in rows if (r["case"], r["pending"]) == k]
    print(f"| --{k[0]} | {k[1]} | {median(v):.2f} | {spread(v, lambda x: f'{x:.2f}')} | {len(v)} |")
EOF
log "results in $RESULTS"
