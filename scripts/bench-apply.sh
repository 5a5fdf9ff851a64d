#!/usr/bin/env bash
# bench-apply.sh — what `tern apply` achieves at the target site (issue 4).
#
# In one run, on a loop-mounted btrfs and xfs target (TARGET_FS), made
# afresh for each of ROUNDS rounds:
#  1. Apply throughput: a cache holding APPLY_DATA of 4 KiB random source
#     writes (and, separately, of 1 MiB sequential ones) over a 2 GiB disk,
#     produced by fio through `tern serve` and shipped with `tern ship
#     --once`; then `tern apply --once` is timed onto an empty replica.
#     MB/s = record data applied / (wall time to `sync` − the time its log
#     says taking points took; points are measured on their own, in 3).
#  2. Raw write speed of the same filesystem, in the same round: fio,
#     buffered, fsync at the end (the applier writes through the page
#     cache and fsyncs every GiB): 1 MiB sequential writes (the issue's
#     yardstick) of APPLY_DATA and of DISK (as much as the dense run
#     applies), and APPLY_DATA of 4 KiB random writes into a sparse
#     DISK-sized file, the random run's own pattern: what any applier of
#     those writes meets on this filesystem (`--fallocate=none`: holes, as
#     a new replica has).
#  3. Points: the time `tern apply` reports for taking a
#     point (log line "point … in …") and the filesystem space it used,
#     for a 2 GiB dense replica, a 20 GiB sparse replica holding 1 GiB,
#     and the replica fragmented by the random-write run (its extent count
#     from filefrag).
#
# Usage: scripts/bench-apply.sh        (root: loop mounts)
#   QUICK=1 scripts/bench-apply.sh     smoke test: smaller data
# Knobs: TARGET_FS ["btrfs xfs"], ROUNDS [5], APPLY_DATA [1g], FS_SIZE [24G], WORK
#   [/var/tmp/tern-bench-apply], TERN [target/release/tern].
set -euo pipefail
# shellcheck source=lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"
cd "$BENCH_ROOT"

TERN=${TERN:-target/release/tern}
WORK=${WORK:-/var/tmp/tern-bench-apply}
TARGET_FS=${TARGET_FS:-"btrfs xfs"}
APPLY_DATA=${APPLY_DATA:-1g}
FS_SIZE=${FS_SIZE:-24G}
DISK=${DISK:-2G}
SPARSE_DISK=${SPARSE_DISK:-20G}
SPARSE_DATA=${SPARSE_DATA:-1g}
if [[ "${QUICK:-0}" == 1 ]]; then
    APPLY_DATA=128m; DISK=512M; SPARSE_DISK=4G; SPARSE_DATA=128m; ROUNDS=${ROUNDS:-1}
fi

ROUNDS=${ROUNDS:-5}

need_root "loop mounts"
need_tools fio filefrag mkfs.btrfs mkfs.xfs qemu-io
build_tern
need_tern

make_results
# What was measured: the tree, the binary, the tools.
fingerprint "$RESULTS/version.txt" fio mkfs.btrfs mkfs.xfs qemu-io filefrag
SERVE_PID=""
# The source VMs' journal rings (memory): each is dropped once its VM's
# cache is made, so four 4 GiB rings never crowd the page cache.
export TERN_RING_DIR=/dev/shm/tern-bench-apply
on_exit 'stop_pid "$SERVE_PID"'
on_exit 'rm -rf "$TERN_RING_DIR"'
on_exit umount_loops
# Fully allocated, 24 GiB each: never left behind (unless still mounted).
on_exit 'for fs in $TARGET_FS; do mountpoint -q "$WORK/mnt-$fs" || rm -f "$WORK/$fs.img"; done'

# make_cache NAME DISK_SIZE FIO_ARGS... -> a source VM $WORK/src-NAME whose
# cache holds what fio wrote (journal big enough, shipped once at the end).
make_cache() {
    local name="$1" size="$2"; shift 2
    local src="$WORK/src-$name"
    rm -rf "$src" "$TERN_RING_DIR"; mkdir -p "$src/cache" "$src/target"
    truncate -s "$size" "$src/disk.img"
    "$TERN" --state "$src/state" -q enable vm --disk "disk0=$src/disk.img" --cache "$src/cache" \
        --target "$src/target" --journal-size 4GiB >/dev/null
    "$TERN" --state "$src/state" -q serve vm --listen "unix:$src/nbd.sock" 2>>"$src/serve.log" &
    SERVE_PID=$!
    wait_for_socket "$src/nbd.sock" 10 "$src/serve.log" "$SERVE_PID" || die "tern serve is not listening ($src)"
    fio --name=w --ioengine=nbd --uri="nbd+unix:///disk0?socket=$src/nbd.sock" --thread \
        --refill_buffers --buffer_compress_percentage=50 "$@" --output="$src/fio.txt" >/dev/null
    "$TERN" --state "$src/state" -q tag vm bench-point >/dev/null
    stop_pid "$SERVE_PID"; SERVE_PID=""
    "$TERN" --state "$src/state" -q ship vm --once
    # Only the cache is used from here: the journal file and the source
    # image would hold gigabytes of disk for nothing.
    rm -rf "$TERN_RING_DIR" "$src/state" "$src/disk.img"
    du -sb "$src/cache/vm/segments" | cut -f1 >"$src/cache.bytes"
}

# apply_run NAME FS MNT ROUND INPUT -> a row of apply.tsv: wall seconds to
# `sync`, seconds of that spent taking points (from the log), bytes
# applied, the last point's time and clone method, the replica's extents,
# and the space apply and its points used. INPUT: "warm" reads the cache's
# segments into the page cache first (a running applier follows the
# receiver by seconds and reads what was just written), "cold" leaves them
# on disk (catching up after a backlog).
apply_run() {
    local name="$1" fs="$2" mnt="$3" round="$4" input="$5"
    # A target of its own: nothing is deleted within a round, so no run
    # meets the filesystem still freeing what an earlier one left.
    local target="$mnt/target-$name-$input" log="$RESULTS/apply-$name-$input-$fs-$round.log"
    mkdir -p "$target"
    drop_caches
    [[ $input == warm ]] && cat "$WORK/src-$name/cache/vm/segments/"* >/dev/null
    local used_before; used_before=$(df -B1 --output=used "$mnt" | tail -1)
    local t0=$EPOCHREALTIME wall
    "$TERN" apply --cache "$WORK/src-$name/cache" --target "$target" vm --once --keep-segments 2>"$log"
    sync
    wall=$(since "$t0")
    local used_after; used_after=$(df -B1 --output=used "$mnt" | tail -1)
    local extents; extents=$(filefrag "$target/vm/replica/disk0.img" | awk '{print $2}')
    bench_py - "$WORK/src-$name/fio.txt" "$log" "$fs" "$name" "$round" "$wall" "$extents" \
        "$(( used_after - used_before ))" "$input" >>"$RESULTS/apply.tsv" <<'PY'
import re, sys
from benchlib import applied_points
fio, log, fs, name, rnd, wall, extents, space, source = sys.argv[1:]
m = re.search(r"WRITE: bw=.*?io=([\d.]+)([KMGT]i?B)", open(fio).read())
mult = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40, "kB": 1e3, "MB": 1e6, "GB": 1e9}
applied = int(float(m.group(1)) * mult[m.group(2)])
points = applied_points(open(log).read())
point_s = sum(s for _, s, _ in points)
last_point, clone = (points[-1][2], points[-1][0]) if points else ("-", "-")
if source == "cold":
    name += ", segments on disk"
print(f"{fs}\t{name}\t{rnd}\t{wall}\t{point_s:.3f}\t{applied}\t{last_point}\t{clone}\t{extents}\t{space}")
PY
}

# raw_seq FS MNT ROUND / raw_random FS MNT ROUND: fio on the same
# filesystem, in the same round, in a directory set up as `tern apply` sets
# up its replicas' (no copy-on-write on btrfs; xfs has no such flag), so
# fio meets what the applier meets. row FS ROUND makes the round's row of
# raw.tsv from their results.
raw_seq() {
    local fs="$1" mnt="$2" round="$3" size
    mkdir -p "$mnt/raw"; chattr +C "$mnt/raw" 2>/dev/null || true
    # As much as the runs it is set beside (APPLY_DATA; DISK for the dense
    # run): how much is written decides how much the page cache absorbs
    # (here 1 GiB may pass at twice the speed of 2 GiB).
    for size in "$APPLY_DATA" "$DISK"; do
        log "$fs round $round: raw sequential write of $size (fio, 1 MiB, buffered, fsync at end)"
        drop_caches
        fio --name=raw --filename="$mnt/raw/raw.dat" --rw=write --bs=1M --size="$size" --end_fsync=1 --fallocate=none \
            --output-format=json --output="$RESULTS/raw-$size-$fs-$round.json" >/dev/null
        rm -f "$mnt/raw/raw.dat"
    done
}
raw_random() {
    local fs="$1" mnt="$2" round="$3"
    mkdir -p "$mnt/raw"; chattr +C "$mnt/raw" 2>/dev/null || true
    log "$fs round $round: raw random write (fio, 4 KiB over a sparse $DISK file, buffered, fsync at end)"
    drop_caches
    fio --name=rawrand --filename="$mnt/raw/rand.dat" --rw=randwrite --bs=4k --size="$DISK" --io_size="$APPLY_DATA" \
        --norandommap --end_fsync=1 --fallocate=none --output-format=json --output="$RESULTS/rawrand-$fs-$round.json" >/dev/null
}
raw_row() {
    local fs="$1" round="$2"
    bench_py - "$RESULTS/raw-$APPLY_DATA-$fs-$round.json" "$RESULTS/raw-$DISK-$fs-$round.json" \
        "$RESULTS/rawrand-$fs-$round.json" "$fs" "$round" >>"$RESULTS/raw.tsv" <<'PY'
import sys
from benchlib import fio_job
def mbps(path):
    j = fio_job(path)["write"]
    return j["io_bytes"] / (j["runtime"] / 1000) / 1e6
print(f"{sys.argv[4]}\t{sys.argv[5]}\t{mbps(sys.argv[1]):.0f}\t{mbps(sys.argv[2]):.0f}\t{mbps(sys.argv[3]):.0f}")
PY
}

# settle MNT: an untimed 1 GiB sequential write, deleted. Here (xfs or
# btrfs on a loop device over ext4) the first large sequential write on a
# new filesystem, and the first after a burst of 4 KiB random writes, runs
# at a third of the speed of the next, whoever makes it (fio: 2.75 s, then
# 1.03 s; 2.76 s even 20 s later): it must not fall on a measured run.
settle() {
    local mnt="$1"
    drop_caches
    fio --name=settle --filename="$mnt/settle.dat" --rw=write --bs=1M --size=1g --end_fsync=1 --fallocate=none >/dev/null
    rm -f "$mnt/settle.dat"; sync
}

log "making the caches (fio through tern serve, then tern ship --once)"
make_cache random "$DISK" --rw=randwrite --bs=4k --iodepth=16 --size="$DISK" --io_size="$APPLY_DATA" --norandommap
make_cache seq "$DISK" --rw=write --bs=1M --iodepth=8 --size="$APPLY_DATA"
make_cache dense "$DISK" --rw=write --bs=1M --iodepth=8 --size="$DISK"
make_cache sparse "$SPARSE_DISK" --rw=write --bs=1M --iodepth=8 --size="$SPARSE_DATA" --offset=40%

printf 'fs\trun\tround\twall\tpoint_s\tbytes\tpoint\tclone\textents\tspace\n' >"$RESULTS/apply.tsv"
printf 'fs\tround\traw_seq_MBps\traw_seq_disk_MBps\traw_rand_MBps\n' >"$RESULTS/raw.tsv"
# Rounds: this machine's write speed swings by ±40% within an hour, so
# every round puts the apply runs and fio's raw runs side by side on a
# freshly made filesystem (nothing a previous run left, such as btrfs
# still freeing a 200,000-extent file, falls into the next one; no replica
# is deleted within a round), and the summary compares within rounds. Within a round the random runs come
# first (apply, then fio), then the sequential ones (apply, then fio), each
# group after an untimed settle write; the dense run comes last, and the
# sparse one (for its point) in the first round only.
for round in $(seq "$ROUNDS"); do
    for fs in $TARGET_FS; do
        img="$WORK/$fs.img" mnt="$WORK/mnt-$fs"
        # Allocated in full on the root filesystem: a sparse image would
        # make whichever run first writes a region pay for allocating it
        # there too (the raw runs come last and would find it done).
        rm -f "$img"; fallocate -l "$FS_SIZE" "$img"
        # No discard (mkfs -K, mount -o nodiscard): btrfs would otherwise
        # discard what a deleted settle or raw file freed while the next
        # run is timed, and the loop device would punch it out of the image.
        loop_fs "$fs" "$img" "$mnt" nodiscard -K
        # Warm and cold take turns at going first: the first run of a group
        # has measured slower here, whichever it was.
        inputs=$(rotate $((round - 1)) warm cold)
        settle "$mnt"
        for input in $inputs; do
            log "$fs round $round: tern apply --once (random, segments $input)"
            apply_run random "$fs" "$mnt" "$round" "$input"
        done
        raw_random "$fs" "$mnt" "$round"
        settle "$mnt"
        for input in $inputs; do
            log "$fs round $round: tern apply --once (seq, segments $input)"
            apply_run seq "$fs" "$mnt" "$round" "$input"
        done
        raw_seq "$fs" "$mnt" "$round"
        raw_row "$fs" "$round"
        # Dense every round: 2 GiB, where the raw write shows the disk more
        # than the page cache; sparse (a point time) in the first.
        runs=dense
        [[ $round == 1 ]] && runs="dense sparse"
        for run in $runs; do
            log "$fs round $round: tern apply --once ($run, segments warm)"
            apply_run "$run" "$fs" "$mnt" "$round" warm
        done
        umount_loop "$mnt"; rm -f "$img"
    done
done

bench_py - "$RESULTS" <<'EOF' | tee "$RESULTS/summary.md"
import sys
from benchlib import median, median_spread as span, read_tsv, unique
d = sys.argv[1]
raw = {(r["fs"], r["round"]): r for r in read_tsv(f"{d}/raw.tsv")}
rows = read_tsv(f"{d}/apply.tsv")
print("Apply MB/s = record data / (wall time to `sync` − time taking points); medians over rounds (range).")
print("Ratios are taken within each round, then their median. Segments are in the page cache unless marked.")
print()
print("| fs | run | applied | rounds | apply MB/s | raw seq MB/s, as much data | apply / raw seq | raw random 4 KiB MB/s | "
      "apply / raw random | points took | last round: point | replica extents | space used by apply + points |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for fs in unique(r["fs"] for r in rows):
    for run in unique(r["run"] for r in rows if r["fs"] == fs):
        rs = [r for r in rows if r["fs"] == fs and r["run"] == run]
        mbps = [int(r["bytes"]) / (float(r["wall"]) - float(r["point_s"])) / 1e6 for r in rs]
        # The raw sequential write of as much data as the run applied
        # (sparse applies SPARSE_DATA, APPLY_DATA unless set otherwise).
        column = "raw_seq_disk_MBps" if run == "dense" else "raw_seq_MBps"
        seq = [float(raw[(fs, r["round"])][column]) for r in rs]
        rand = [float(raw[(fs, r["round"])]["raw_rand_MBps"]) for r in rs]
        vs_seq = [m / s * 100 for m, s in zip(mbps, seq)]
        vs_rand = [m / s * 100 for m, s in zip(mbps, rand)]
        points = [float(r["point_s"]) for r in rs]
        last = rs[-1]
        print(f"| {fs} | {run} | {int(last['bytes']) / 2**20:.0f} MiB | {len(rs)} | {span(mbps)} | {span(seq)} | "
              f"{span(vs_seq, unit='%')} | {span(rand)} | {span(vs_rand, unit='%')} | {median(points):.2f} s | "
              f"{last['point']} ({last['clone']}) | {last['extents']} | {int(last['space']) / 2**20:.0f} MiB |")
EOF
log "results in $RESULTS"
