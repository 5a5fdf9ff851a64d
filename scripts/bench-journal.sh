#!/usr/bin/env bash
# What journaling itself costs the write path (issue 2: "journaling costing at
# most 10% against tern without it"), without a consumer competing for the
# CPU: `tern serve` with the journal on, its ring large enough to hold the
# whole run (so it never fills and nothing drains it), against `tern serve
# --no-journal`, on the same image, in back-to-back pairs (the machine is
# noisy; pairs taken close together compare better than rounds far apart).
#
#   scripts/bench-journal.sh
#   PAIRS=3 WORKLOADS=seq-write scripts/bench-journal.sh
#
# Knobs (environment):
#   WORKLOADS   seq-write randwrite-qd1 randwrite-qd32 4conn-qd8 [all four]
#   PAIRS       journal/no-journal pairs per workload [5]
#   RUNTIME     measured seconds per fio run [3]; RAMP seconds before [1]
#   RING        --journal-size: must hold RUNTIME+RAMP seconds of writes [12GiB]
#   WORK        scratch and results [/var/tmp/tern-bench-journal]
#   TERN        the binary [target/release/tern]
#
# The fio runs are those of scripts/bench-nbd.sh (nbd engine, 2 GiB image of
# random bytes, unix socket). A run whose journal overflowed is reported as
# such and left out: it would measure the bitmap, not the journal.
set -euo pipefail
# shellcheck source=lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"

WORKLOADS="${WORKLOADS:-seq-write randwrite-qd1 randwrite-qd32 4conn-qd8}"
PAIRS="${PAIRS:-5}"
RUNTIME="${RUNTIME:-3}"
RAMP="${RAMP:-1}"
RING="${RING:-12GiB}"
WORK="${WORK:-/var/tmp/tern-bench-journal}"
TERN="${TERN:-$BENCH_ROOT/target/release/tern}"

need_fio_nbd
need_tern

declare -A FIO_ARGS=(
    [seq-write]="--rw=write --bs=1M --iodepth=8 --numjobs=1"
    [randwrite-qd1]="--rw=randwrite --bs=4k --iodepth=1 --numjobs=1"
    [randwrite-qd32]="--rw=randwrite --bs=4k --iodepth=32 --numjobs=1"
    [4conn-qd8]="--rw=randwrite --bs=4k --iodepth=8 --numjobs=4 --group_reporting"
)
for w in $WORKLOADS; do [[ -n ${FIO_ARGS[$w]:-} ]] || die "unknown workload '$w'"; done

STAMP="$(date +%Y%m%d-%H%M%S)"
RESULTS="$WORK/results-$STAMP"
RUN="$WORK/run"
IMG="$WORK/image.raw"
export TERN_RING_DIR="/dev/shm/tern-bench-journal-$$"
mkdir -p "$RESULTS"
fingerprint "$RESULTS/version.txt" fio
SERVER_PID=""
on_exit 'stop_pid "$SERVER_PID"'
on_exit 'rm -rf "$RUN" "$TERN_RING_DIR"'

if [[ ! -f $IMG ]]; then
    log "making a 2 GiB image of random bytes: $IMG"
    dd if=/dev/urandom of="$IMG" bs=1M count=2048 status=none
fi

# One fio run against a fresh VM; writes "iops p99_us overflowed(0/1)" to
# $out.result.
one_run() {
    local variant="$1" workload="$2" out="$3"
    rm -rf "$RUN" "$TERN_RING_DIR"
    mkdir -p "$RUN/cache" "$RUN/target"
    "$TERN" -q --state "$RUN/state" enable bench --disk "disk0=$IMG" --cache "$RUN/cache" \
        --target "$RUN/target" --journal-size "$RING" >/dev/null
    # The initial sync is not what is measured: ship it, then forget it.
    "$TERN" -q --state "$RUN/state" ship bench --once >/dev/null 2>&1
    rm -rf "$RUN/cache/bench"
    sync
    local extra=()
    [[ $variant == nojournal ]] && extra=(--no-journal)
    "$TERN" --state "$RUN/state" serve bench --listen "unix:$RUN/sock" "${extra[@]}" 2>"$out.serve.log" &
    SERVER_PID=$!
    wait_for_socket "$RUN/sock" 60 "$out.serve.log" "$SERVER_PID" || die "tern serve did not listen; see $out.serve.log"
    # The ring is mapped in the background after the socket is up; the
    # run measures the steady state, not those first seconds.
    if [[ ${#extra[@]} -eq 0 ]]; then
        wait_for_log "$out.serve.log" "journal ring mapped" 120 ||
            log "warning: the ring was not mapped within 120 s; this run includes the mapping ($out.serve.log)"
    fi
    # shellcheck disable=SC2086
    fio --name="$workload" --ioengine=nbd --uri="nbd+unix:///disk0?socket=$RUN/sock" --size=2g \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" ${FIO_ARGS[$workload]} \
        --output-format=json --output="$out.json" >/dev/null 2>&1
    kill "$SERVER_PID"; wait "$SERVER_PID" || true; SERVER_PID=""
    local overflowed=0
    if [[ $variant == journal ]] &&
        "$TERN" --state "$RUN/state" journal dump bench --header 2>/dev/null | grep -q "mode Overflow"; then
        overflowed=1
    fi
    bench_py - "$out.json" "$overflowed" >"$out.result" <<'EOF'
import sys
from benchlib import fio_job
job = fio_job(sys.argv[1])["write"]
print(round(job["iops"]), job["clat_ns"]["percentile"]["99.000000"] // 1000, sys.argv[2])
EOF
}

TSV="$RESULTS/runs.tsv"
printf 'workload\tpair\tvariant\tiops\tp99_us\toverflowed\n' >"$TSV"
for w in $WORKLOADS; do
    for p in $(seq "$PAIRS"); do
        # Which goes first alternates, so neither always runs right after
        # the other's teardown.
        for v in $(rotate $((p - 1)) journal nojournal); do
            one_run "$v" "$w" "$RESULTS/$w-$p-$v"
            read -r iops p99 ovf <"$RESULTS/$w-$p-$v.result"
            printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$w" "$p" "$v" "$iops" "$p99" "$ovf" >>"$TSV"
            note=""
            [[ $ovf == 1 ]] && note=" (the ring overflowed: left out)"
            log "$w pair $p $v: $iops IOPS, p99 $p99 µs$note"
        done
    done
done

bench_py - "$TSV" "$RESULTS/summary.md" "$RING" "$RUNTIME" "$RAMP" <<'EOF'
import sys
from benchlib import median, read_tsv, unique
rows = read_tsv(sys.argv[1])
out = open(sys.argv[2], "w")
out.write(f"journal ring {sys.argv[3]}, no consumer; {sys.argv[4]} s per run after {sys.argv[5]} s ramp\n\n")
out.write("| workload | journal IOPS (median) | no journal IOPS (median) | journal cost, median of pairs | pairs (journal / no journal) | p99 µs journal / no journal |\n")
out.write("|---|---:|---:|---:|---|---|\n")
for w in unique(r["workload"] for r in rows):
    pairs = {}
    for r in rows:
        if r["workload"] == w:
            pairs.setdefault(r["pair"], {})[r["variant"]] = r
    good = [p for p in pairs.values() if len(p) == 2 and p["journal"]["overflowed"] == "0"]
    if not good:
        out.write(f"| {w} | – | – | – | every run overflowed | |\n")
        continue
    j = [int(p["journal"]["iops"]) for p in good]
    n = [int(p["nojournal"]["iops"]) for p in good]
    cost = median(1 - a / b for a, b in zip(j, n))
    pj = median(int(p["journal"]["p99_us"]) for p in good)
    pn = median(int(p["nojournal"]["p99_us"]) for p in good)
    listing = " · ".join(f"{a:,}/{b:,}" for a, b in zip(j, n))
    out.write(f"| {w} | {median(j):,.0f} | {median(n):,.0f} | {cost:.0%} | {listing} | {pj:,.0f} / {pn:,.0f} |\n")
out.close()
print(open(sys.argv[2]).read())
EOF
log "results in $RESULTS"
