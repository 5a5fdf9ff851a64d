#!/usr/bin/env bash
# bench-store.sh — the cache store as a directory, in SeaweedFS (S3) and in
# Azurite (Azure Blob), same run (issue 20): the initial sync of a fresh VM
# shipped (`tern ship --once`) into each, then applied from each (`tern
# apply --once`), over loopback. The stores are scripts/stores.sh's.
#
# Per round, per store (rotated so none always goes first): a VM enabled
# afresh on a SIZE image (half random, half zero-filled 4 KiB blocks mixed:
# zstd halves it), shipped, then applied into a fresh target. Rates are
# disk bytes per wall second; the page cache is dropped before each step.
#
# Usage (root): scripts/bench-store.sh
#   SIZE=256m ROUNDS=1 scripts/bench-store.sh
# Knobs [defaults]: SIZE [512m], ROUNDS [3], STORES ["dir s3 az"],
#   WORK [/var/tmp/tern-bench-store], TERN [target/release/tern; built first].
set -euo pipefail
# shellcheck source=lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"
cd "$BENCH_ROOT"
SIZE=${SIZE:-512m}
ROUNDS=${ROUNDS:-3}
STORES=${STORES:-"dir s3 az"}
WORK=${WORK:-/var/tmp/tern-bench-store}
TERN=${TERN:-target/release/tern}

need_root "drop_caches"
need_tools python3 bc
build_tern
need_tern
scripts/stores.sh start
eval "$(scripts/stores.sh env)"
mkdir -p "$WORK"
make_results
tern_snapshot "$RESULTS/tern"
fingerprint "$RESULTS/version.txt"
export TERN_RING_DIR=/dev/shm/tern-bench-store
on_exit 'rm -rf "$WORK/run" "$TERN_RING_DIR"'

IMG=$WORK/image.raw
if [[ ! -f $IMG || $(stat -c %s "$IMG") != $(bytes "$SIZE") ]]; then
    log "making a $SIZE image, half random, half zeros: $IMG"
    python3 - "$IMG" "$(bytes "$SIZE")" <<'PY'
import os, sys
path, size = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    for i in range(size // 4096):
        f.write(os.urandom(4096) if i % 2 else bytes(4096))
PY
fi

location() { # store round
    case $1 in
    dir) echo "$WORK/run/cache" ;;
    s3) echo "s3://tern-test/bench-$$-$2" ;;
    az) echo "az://tern-test/bench-$$-$2" ;;
    esac
}

TSV=$RESULTS/runs.tsv
printf 'store\tround\tstep\tbytes\tseconds\tsent\n' >"$TSV"
for r in $(seq "$ROUNDS"); do
    for store in $(rotate $((r - 1)) $STORES); do
        cache=$(location "$store" "$r")
        rm -rf "$WORK/run" "$TERN_RING_DIR"
        mkdir -p "$WORK/run/cache" "$WORK/run/target"
        cp --reflink=auto "$IMG" "$WORK/run/disk0.img"
        "$TERN" -q --state "$WORK/run/state" enable vm --disk "disk0=$WORK/run/disk0.img" \
            --cache "$cache" --target "$WORK/run/target" --journal-size 64MiB >/dev/null
        drop_caches
        timed "$RESULTS/ship-$r-$store.out" "$RESULTS/ship-$r-$store.log" \
            "$TERN" --state "$WORK/run/state" ship vm --once
        sent=$(json_get "$WORK/run/state/vm/ship.json" bytes_out)
        printf '%s\t%s\tship\t%s\t%s\t%s\n' "$store" "$r" "$(stat -c %s "$IMG")" "$T_WALL" "$sent" >>"$TSV"
        log "round $r, $store: shipped in ${T_WALL}s ($sent bytes sent)"
        drop_caches
        timed "$RESULTS/apply-$r-$store.out" "$RESULTS/apply-$r-$store.log" \
            "$TERN" apply --cache "$cache" --target "$WORK/run/target" vm --once
        cmp -s "$IMG" "$WORK/run/target/vm/replica/disk0.img" || die "round $r, $store: the replica differs from the source"
        printf '%s\t%s\tapply\t%s\t%s\t%s\n' "$store" "$r" "$(stat -c %s "$IMG")" "$T_WALL" "$sent" >>"$TSV"
        log "round $r, $store: applied in ${T_WALL}s (replica equals the source)"
    done
done

bench_py - "$TSV" "$SIZE" <<'PY' | tee "$RESULTS/summary.md"
import sys
from benchlib import median_spread, read_tsv, unique
rows = read_tsv(sys.argv[1])
print(f"initial sync of a {sys.argv[2]} disk (half random, half zeros), MB/s of disk, median (min–max)\n")
print("| cache store | ship | apply | bytes sent per byte written |")
print("|---|---:|---:|---:|")
names = {"dir": "directory (same disk)", "s3": "SeaweedFS, S3 over loopback", "az": "Azurite, Azure Blob over loopback"}
for store in unique(r["store"] for r in rows):
    cells = []
    for step in ("ship", "apply"):
        got = [int(r["bytes"]) / float(r["seconds"]) / 1e6 for r in rows if r["store"] == store and r["step"] == step]
        cells.append(median_spread(got, lambda v: f"{v:.0f}"))
    ratio = [int(r["sent"]) / int(r["bytes"]) for r in rows if r["store"] == store and r["step"] == "ship"]
    cells.append(median_spread(ratio, lambda v: f"{v:.2f}"))
    print(f"| {names.get(store, store)} | " + " | ".join(cells) + " |")
PY
log "results in $RESULTS"
