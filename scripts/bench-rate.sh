#!/usr/bin/env bash
# bench-rate.sh — how closely `tern ship --max-rate` holds its limit
# (issue 20), beside rsync --bwlimit, the classic limiter, moving the same
# bytes in the same run.
#
# Per round and per rate in RATES: a VM enabled afresh on a SIZE image of
# random bytes (incompressible: what is sent is what is written), its
# initial sync shipped with `tern ship --once --max-rate RATE` into a
# directory cache; then `rsync --bwlimit` copying the same image into a
# directory. Achieved = bytes sent / wall time (tern: the segment bytes
# ship.json counts; rsync: the file). Both run on tmpfs-free local disk
# under WORK; the page cache is dropped before each.
#
# Usage (root: drop_caches):
#   scripts/bench-rate.sh
#   RATES="8MiB/s" SIZE=64m ROUNDS=1 scripts/bench-rate.sh
# Knobs [defaults]: RATES ["8MiB/s 32MiB/s 128MiB/s"] (binary units, so
#   rsync's KiB/s limit is the same rate), SIZE [256m], ROUNDS [3],
#   WORK [/var/tmp/tern-bench-rate], TERN [target/release/tern; built first].
# Output: one line per run and a summary table (medians, with the range).
set -euo pipefail
# shellcheck source=lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"
cd "$BENCH_ROOT"
RATES=${RATES:-"8MiB/s 32MiB/s 128MiB/s"}
SIZE=${SIZE:-256m}
ROUNDS=${ROUNDS:-3}
WORK=${WORK:-/var/tmp/tern-bench-rate}
TERN=${TERN:-target/release/tern}

need_root "drop_caches"
need_tools rsync python3 bc
build_tern
need_tern
mkdir -p "$WORK"
make_results
tern_snapshot "$RESULTS/tern"
fingerprint "$RESULTS/version.txt" rsync
export TERN_RING_DIR=/dev/shm/tern-bench-rate
on_exit 'rm -rf "$WORK/run" "$TERN_RING_DIR"'

IMG=$WORK/image.raw
if [[ ! -f $IMG || $(stat -c %s "$IMG") != $(bytes "$SIZE") ]]; then
    log "making a $SIZE image of random bytes: $IMG"
    head -c "$(bytes "$SIZE")" /dev/urandom >"$IMG"
fi

TSV=$RESULTS/runs.tsv
printf 'rate\tround\ttool\tbytes\tseconds\n' >"$TSV"
for r in $(seq "$ROUNDS"); do
    for rate in $RATES; do
        bps=$(bytes "${rate%/s}")   # MiB/s: bytes per second
        # tern: the initial sync of a fresh VM, limited.
        rm -rf "$WORK/run" "$TERN_RING_DIR"
        mkdir -p "$WORK/run/cache" "$WORK/run/target"
        cp --reflink=auto "$IMG" "$WORK/run/disk0.img"
        "$TERN" -q --state "$WORK/run/state" enable vm --disk "disk0=$WORK/run/disk0.img" \
            --cache "$WORK/run/cache" --target "$WORK/run/target" --journal-size 64MiB >/dev/null
        drop_caches
        timed "$RESULTS/ship-$r-${bps}.out" "$RESULTS/ship-$r-${bps}.log" \
            "$TERN" --state "$WORK/run/state" ship vm --once --max-rate "$rate"
        sent=$(json_get "$WORK/run/state/vm/ship.json" bytes_out)
        printf '%s\t%s\ttern\t%s\t%s\n' "$rate" "$r" "$sent" "$T_WALL" >>"$TSV"
        log "round $r, $rate: tern ship sent $sent bytes in ${T_WALL}s"
        # rsync: the same image, the same limit (its unit is KiB/s).
        rm -rf "$WORK/run/rsync"
        mkdir -p "$WORK/run/rsync"
        drop_caches
        timed "$RESULTS/rsync-$r-${bps}.out" "$RESULTS/rsync-$r-${bps}.log" \
            rsync --whole-file --bwlimit="$((bps / 1024))" "$IMG" "$WORK/run/rsync/"
        printf '%s\t%s\trsync\t%s\t%s\n' "$rate" "$r" "$(stat -c %s "$IMG")" "$T_WALL" >>"$TSV"
        log "round $r, $rate: rsync --bwlimit sent $(stat -c %s "$IMG") bytes in ${T_WALL}s"
    done
done

bench_py - "$TSV" "$SIZE" <<'PY' | tee "$RESULTS/summary.md"
import sys
from benchlib import median_spread, parse_size, read_tsv, unique
rows = read_tsv(sys.argv[1])
print(f"{sys.argv[2]} of random bytes; achieved = bytes sent / wall seconds, MiB/s, median (min–max)\n")
print("| limit | tern ship --max-rate | of the limit | rsync --bwlimit | of the limit |")
print("|---|---:|---:|---:|---:|")
for rate in unique(r["rate"] for r in rows):
    limit = parse_size(rate.removesuffix("/s")) / 2**20
    cells = []
    for tool in ("tern", "rsync"):
        got = [int(r["bytes"]) / float(r["seconds"]) / 2**20 for r in rows if r["rate"] == rate and r["tool"] == tool]
        cells.append(median_spread(got, lambda v: f"{v:.1f}"))
        cells.append(median_spread([g / limit * 100 for g in got], unit="%"))
    print(f"| {rate} | " + " | ".join(cells) + " |")
PY
log "results in $RESULTS"
