#!/usr/bin/env bash
# bench-apply.sh — what `tern apply` achieves at the target site (issue 4).
#
# In one run, on a loop-mounted btrfs and xfs target (TARGET_FS):
#  1. Raw write speed of the filesystem: fio, buffered, fsync at the end
#     (the applier writes through the page cache and fsyncs per batch):
#     1 MiB sequential writes (the issue's yardstick), and APPLY_DATA of
#     4 KiB random writes into a sparse DISK-sized file, the random run's
#     own pattern: what any applier of those writes meets on this
#     filesystem (`--fallocate=none`: holes, as a new replica has).
#  2. Apply throughput: a cache holding APPLY_DATA of 4 KiB random source
#     writes (and, separately, of 1 MiB sequential ones) over a 2 GiB disk,
#     produced by fio through `tern serve` and shipped with `tern ship
#     --once`; then `tern apply --once` is timed onto an empty replica.
#     MB/s = record data applied / wall time.
#  3. Points: the time `tern apply` reports for taking a point (log line
#     "point … in …") and the filesystem space it used, for a 2 GiB dense
#     replica, a 20 GiB sparse replica holding 1 GiB, and the replica
#     fragmented by the random-write run (its extent count from filefrag).
#
# Usage: scripts/bench-apply.sh        (root: loop mounts)
#   QUICK=1 scripts/bench-apply.sh     smoke test: smaller data
# Knobs: TARGET_FS ["btrfs xfs"], APPLY_DATA [1g], FS_SIZE [48G], WORK
#   [/var/tmp/tern-bench-apply], TERN [target/release/tern].
set -euo pipefail
cd "$(dirname "$0")/.."

TERN=${TERN:-target/release/tern}
WORK=${WORK:-/var/tmp/tern-bench-apply}
TARGET_FS=${TARGET_FS:-"btrfs xfs"}
APPLY_DATA=${APPLY_DATA:-1g}
FS_SIZE=${FS_SIZE:-48G}
DISK=${DISK:-2G}
SPARSE_DISK=${SPARSE_DISK:-20G}
SPARSE_DATA=${SPARSE_DATA:-1g}
if [[ "${QUICK:-0}" == 1 ]]; then
    APPLY_DATA=128m; DISK=512M; SPARSE_DISK=4G; SPARSE_DATA=128m
fi

log() { echo "[bench-apply] $*" >&2; }
[[ $EUID -eq 0 ]] || { log "run as root (loop mounts)"; exit 1; }
for tool in fio filefrag mkfs.btrfs mkfs.xfs qemu-io; do
    command -v "$tool" >/dev/null || { log "missing $tool: run scripts/install-deps.sh"; exit 1; }
done
[[ -x "$TERN" ]] || cargo build --release

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS="$WORK/results-$STAMP"
mkdir -p "$RESULTS"
SERVE_PID=""
MOUNTS=()
# The source VMs' journal rings (memory): each is dropped once its VM's
# cache is made, so four 4 GiB rings never crowd the page cache.
export TERN_RING_DIR=/dev/shm/tern-bench-apply
cleanup() {
    [[ -n "$SERVE_PID" ]] && kill "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null
    rm -rf "$TERN_RING_DIR"
    for m in "${MOUNTS[@]}"; do umount "$m" 2>/dev/null || true; done
}
trap cleanup EXIT

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
    for _ in $(seq 100); do [[ -S "$src/nbd.sock" ]] && break; sleep 0.1; done
    fio --name=w --ioengine=nbd --uri="nbd+unix:///disk0?socket=$src/nbd.sock" --thread \
        --refill_buffers --buffer_compress_percentage=50 "$@" --output="$src/fio.txt" >/dev/null
    "$TERN" --state "$src/state" -q tag vm bench-point >/dev/null
    kill "$SERVE_PID"; wait "$SERVE_PID" 2>/dev/null || true; SERVE_PID=""
    "$TERN" --state "$src/state" -q ship vm --once
    rm -rf "$TERN_RING_DIR"
    du -sb "$src/cache/vm/segments" | cut -f1 >"$src/cache.bytes"
}

# apply_run NAME FS -> seconds, bytes applied, point time, extents
apply_run() {
    local name="$1" fs="$2" mnt="$3"
    local target="$mnt/target-$name"
    rm -rf "$target"; mkdir -p "$target"
    sync; echo 3 >/proc/sys/vm/drop_caches
    local used_before; used_before=$(df -B1 --output=used "$mnt" | tail -1)
    local t0 t1
    t0=$(date +%s.%N)
    "$TERN" apply --cache "$WORK/src-$name/cache" --target "$target" vm --once --keep-segments \
        2>"$RESULTS/apply-$name-$fs.log"
    sync
    t1=$(date +%s.%N)
    local used_after; used_after=$(df -B1 --output=used "$mnt" | tail -1)
    local bytes; bytes=$(python3 - "$WORK/src-$name/fio.txt" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
m = re.search(r"WRITE: bw=.*?io=([\d.]+)([KMGT]i?B)", text)
num, unit = float(m.group(1)), m.group(2)
mult = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]
print(int(num * mult))
EOF
)
    local point_ms; point_ms=$(grep -o "app-consistent point [^ ]* at seq [0-9]* (source time [^)]*), [a-z]* in [0-9.]*[mµn]*s" \
        "$RESULTS/apply-$name-$fs.log" | tail -1 | sed -E 's/.* in //')
    local clone; clone=$(grep -o "app-consistent point .*, [a-z]* in" "$RESULTS/apply-$name-$fs.log" | tail -1 | awk '{print $(NF-1)}')
    local extents; extents=$(filefrag "$target/vm/replica/disk0.img" | awk '{print $2}')
    local point_space; point_space=$(( used_after - used_before ))
    printf '%s\t%s\t%.2f\t%s\t%s\t%s\t%s\t%s\n' "$fs" "$name" "$(echo "$t1 - $t0" | bc)" "$bytes" \
        "$point_ms" "$clone" "$extents" "$point_space" >>"$RESULTS/apply.tsv"
}

log "making the caches (fio through tern serve, then tern ship --once)"
make_cache random "$DISK" --rw=randwrite --bs=4k --iodepth=16 --size="$DISK" --io_size="$APPLY_DATA" --norandommap
make_cache seq "$DISK" --rw=write --bs=1M --iodepth=8 --size="$APPLY_DATA"
make_cache dense "$DISK" --rw=write --bs=1M --iodepth=8 --size="$DISK"
make_cache sparse "$SPARSE_DISK" --rw=write --bs=1M --iodepth=8 --size="$SPARSE_DATA" --offset=40%

printf 'fs\trun\tseconds\tbytes\tpoint\tclone\textents\tspace\n' >"$RESULTS/apply.tsv"
printf 'fs\traw_seq_MBps\traw_rand_MBps\n' >"$RESULTS/raw.tsv"
for fs in $TARGET_FS; do
    img="$WORK/$fs.img" mnt="$WORK/mnt-$fs"
    rm -f "$img"; truncate -s "$FS_SIZE" "$img"
    "mkfs.$fs" -q -f "$img" >/dev/null
    mkdir -p "$mnt"; mount -o loop "$img" "$mnt"; MOUNTS+=("$mnt")
    for run in random seq dense sparse; do
        log "$fs: tern apply --once ($run)"
        apply_run "$run" "$fs" "$mnt"
    done
    # The raw runs last: deleting their files (one of ~200,000 extents)
    # keeps btrfs busy in the background for a while, which must not fall
    # into an apply run.
    # In a directory set up as `tern apply` sets up its replicas' (no
    # copy-on-write on btrfs; xfs has no such flag), so fio meets what the
    # applier meets.
    mkdir -p "$mnt/raw"; chattr +C "$mnt/raw" 2>/dev/null || true
    log "$fs: raw sequential write (fio, 1 MiB, buffered, fsync at end)"
    fio --name=raw --filename="$mnt/raw/raw.dat" --rw=write --bs=1M --size="$APPLY_DATA" --end_fsync=1 --fallocate=none \
        --output-format=json --output="$RESULTS/raw-$fs.json" >/dev/null
    rm -f "$mnt/raw/raw.dat"
    log "$fs: raw random write (fio, 4 KiB over a sparse $DISK file, buffered, fsync at end)"
    fio --name=rawrand --filename="$mnt/raw/raw.dat" --rw=randwrite --bs=4k --size="$DISK" --io_size="$APPLY_DATA" \
        --norandommap --end_fsync=1 --fallocate=none --output-format=json --output="$RESULTS/rawrand-$fs.json" >/dev/null
    python3 - "$RESULTS/raw-$fs.json" "$RESULTS/rawrand-$fs.json" "$fs" >>"$RESULTS/raw.tsv" <<'EOF'
import json, sys
def mbps(path):
    j = json.load(open(path))["jobs"][0]["write"]
    return j["io_bytes"] / (j["runtime"] / 1000) / 1e6
print(f"{sys.argv[3]}\t{mbps(sys.argv[1]):.0f}\t{mbps(sys.argv[2]):.0f}")
EOF
    rm -rf "$mnt/raw"
done

python3 - "$RESULTS" <<'EOF' | tee "$RESULTS/summary.md"
import csv, sys
d = sys.argv[1]
raw = {r["fs"]: r for r in csv.DictReader(open(f"{d}/raw.tsv"), delimiter="\t")}
print("| fs | run | applied | seconds | MB/s | vs raw seq write | vs raw random 4 KiB write | point time | clone | replica extents | space used by apply + point |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in csv.DictReader(open(f"{d}/apply.tsv"), delimiter="\t"):
    mbps = int(r["bytes"]) / float(r["seconds"]) / 1e6
    seq, rand = float(raw[r["fs"]]["raw_seq_MBps"]), float(raw[r["fs"]]["raw_rand_MBps"])
    print(f"| {r['fs']} | {r['run']} | {int(r['bytes']) / 2**20:.0f} MiB | {float(r['seconds']):.2f} | {mbps:.0f} | "
          f"{mbps / seq * 100:.0f}% of {seq:.0f} | {mbps / rand * 100:.0f}% of {rand:.0f} | {r['point']} | {r['clone']} | "
          f"{r['extents']} | {int(r['space']) / 2**20:.0f} MiB |")
EOF
log "results in $RESULTS"
