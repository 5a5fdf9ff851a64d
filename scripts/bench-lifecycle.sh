#!/usr/bin/env bash
# bench-lifecycle.sh — the lifecycle an operator drives (issue 5, "Measure").
#
# One function per measurement, chosen with MEASURE (space-separated):
#   rto           `tern failover` to a disk ready to boot. For each filesystem
#                 in RTO_FS (loop-mounted, fresh) and each image in RTO_IMAGES:
#                 make the source image, `tern enable` (cache and target on
#                 the loop fs), `tern ship --once` (the initial sync) and
#                 `tern apply --once` (replica + a crash point); then, RUNS
#                 times, with the page cache dropped before each timed command:
#                   test-point   `tern failover vm --test --point <that point>`
#                   test-latest  PENDING bytes written through `tern serve`
#                                and shipped, then `tern failover vm --test
#                                --latest` (applies them, takes a point, clones)
#                   real-latest  the same, with the real `tern failover vm
#                                --latest` (fences the source, clones into
#                                failover/active); afterwards the script puts
#                                the pre-failover state back by hand (removes
#                                failover/active and the cache's fence.toml),
#                                so every run is a first failover.
#                 Plus the copy fallback: COPY_FS (ext4) with COPY_IMAGES.
#                 RTO_FS may name "btrfs+C": btrfs with <target>/vm/failover
#                 marked `chattr +C` by hand before the runs (see rto_case;
#                 the workaround for binaries before git 0aae534, whose
#                 failovers on btrfs were full copies).
#   initial-sync  A sparse IS_SIZE image holding IS_DATA of random data in
#                 1 MiB chunks spread evenly over it: `tern enable`, `tern
#                 ship --once` (the initial sync; cache on the work dir's own
#                 disk), `tern apply --once` onto a loop-mounted IS_TARGET_FS;
#                 against a sparse-aware copy (`cp --sparse=always`) and a
#                 naive full copy (`dd` of the whole image, conv=fsync, in
#                 NAIVE_PIECE pieces deleted as it goes so the disk need not
#                 hold a second IS_SIZE file) to the same disk. IS_ROUNDS
#                 rounds, interleaved, page cache dropped before each.
#   reprotect     Runs scripts/bench-reprotect.sh (re-protect after a
#                 failover: time and bytes sent when 1% of the disk changed).
#
# Usage (root: loop mounts, drop_caches):
#   scripts/bench-lifecycle.sh
#   MEASURE=rto RTO_FS=btrfs RUNS=3 scripts/bench-lifecycle.sh
#   QUICK=1 scripts/bench-lifecycle.sh          smoke test: small images, 2 runs
#
# Knobs [defaults]: MEASURE ["rto initial-sync"], RTO_FS ["btrfs xfs"],
#   RTO_IMAGES ["dense-2g sparse-20g frag-2g"], COPY_FS [ext4], COPY_IMAGES
#   [dense-2g], RUNS [5], COPY_RUNS [3], PENDING [64m], FS_SIZE [48G],
#   IS_SIZE [20g], IS_DATA [1g], IS_ROUNDS [3], IS_TARGET_FS [btrfs],
#   NAIVE_PIECE [4g], MAX_LOAD [1.5] (wait for the 1-min load average to
#   drop below it before each measurement, at most LOAD_WAIT [1800] s; and
#   before each timed run while a rustc runs), BUILD [1] (unless TERN is
#   given, `cargo build --release` first, retried while another build holds
#   the tree; the existing binary if it keeps failing), TERN
#   [target/release/tern] (copied into the results dir so a rebuild cannot
#   swap it mid-run), WORK
#   [/var/tmp/tern-bench-lifecycle], KEEP [0] (keep images and loop fs),
#   MIN_FREE [4g] (stop before a step would leave less free on WORK's disk),
#   DROP_CACHES [1] (drop the page cache before each timed run; 0: only sync).
#
# Images (RTO_IMAGES, COPY_IMAGES): dense-N (N fully written with random
#   bytes) and sparse-N (N bytes long, SPARSE_DATA [2g] of random bytes in
#   1 MiB chunks spread evenly over it), frag-N (dense-N, then FRAG_DATA [1g]
#   of 4 KiB random writes through `tern serve`, shipped and applied: a
#   replica fragmented as by a day of small writes), N with a k/m/g suffix.
#
# Output: $WORK/results-<stamp>/ with rto.tsv, rto-setup.tsv,
#   initial-sync.tsv, every command's output, and summary.md (also on stdout).
set -euo pipefail
# shellcheck source=lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"
cd "$BENCH_ROOT"
HELPER="$BENCH_ROOT/scripts/bench-lifecycle.py"

if [[ "${QUICK:-0}" == 1 ]]; then   # smoke-test sizes, unless set explicitly
    : "${RTO_IMAGES=dense-256m sparse-2g frag-256m}" "${COPY_IMAGES=dense-256m}" "${SPARSE_DATA=256m}"
    : "${FRAG_DATA=32m}" "${RUNS=2}" "${COPY_RUNS=1}" "${PENDING=16m}" "${IS_SIZE=2g}" "${IS_DATA=128m}"
    : "${IS_ROUNDS=1}" "${NAIVE_PIECE=1g}" "${FS_SIZE=16G}" "${MAX_LOAD=100}"
fi
MEASURE=${MEASURE-"rto initial-sync"}
RTO_FS=${RTO_FS-"btrfs xfs"}
RTO_IMAGES=${RTO_IMAGES-"dense-2g sparse-20g frag-2g"}
COPY_FS=${COPY_FS-ext4}
COPY_IMAGES=${COPY_IMAGES-dense-2g}
RUNS=${RUNS:-5}
COPY_RUNS=${COPY_RUNS:-3}
PENDING=${PENDING:-64m}
SPARSE_DATA=${SPARSE_DATA:-2g}
FRAG_DATA=${FRAG_DATA:-1g}
FS_SIZE=${FS_SIZE:-48G}
IS_SIZE=${IS_SIZE:-20g}
IS_DATA=${IS_DATA:-1g}
IS_ROUNDS=${IS_ROUNDS:-3}
IS_TARGET_FS=${IS_TARGET_FS:-btrfs}
NAIVE_PIECE=${NAIVE_PIECE:-4g}
MAX_LOAD=${MAX_LOAD:-1.5}
LOAD_WAIT=${LOAD_WAIT:-1800}
BUILD=${BUILD:-1}
TERN=${TERN:-target/release/tern}
WORK=${WORK:-/var/tmp/tern-bench-lifecycle}
KEEP=${KEEP:-0}
MIN_FREE=${MIN_FREE:-4g}
DROP_CACHES=${DROP_CACHES:-1}

BENCH_LOG=utc
need_root "loop mounts, drop_caches"
need_tools fio filefrag mkfs.btrfs mkfs.xfs mkfs.ext4 python3 bc fstrim

# ---------------------------------------------------------------------------
# The binary, the run's record
# ---------------------------------------------------------------------------
make_results
if [[ "$BUILD" == 1 ]]; then build_tern "$RESULTS/build.log" 5; fi
need_tern
tern_snapshot "$RESULTS/tern"
fingerprint "$RESULTS/version.txt" fio filefrag mkfs.btrfs mkfs.xfs mkfs.ext4
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "git: $(git rev-parse --short HEAD) ($(git log -1 --format=%s | cut -c1-80))"
    echo "tree: $(git status --porcelain -- '*.rs' Cargo.toml Cargo.lock | wc -l) modified Rust/Cargo files at build time"
    git status --porcelain -- '*.rs' Cargo.toml Cargo.lock | sed 's/^/  /'
    echo "binary: $TERN_SRC, built $(date -u -r "$TERN_SRC" '+%Y-%m-%d %H:%M:%S UTC'), sha256 $(sha256sum "$TERN" | cut -c1-16)"
    echo "machine: $(machine_desc), $(df -h --output=source,fstype "$WORK" | tail -1)"
    echo "command: MEASURE=\"$MEASURE\" RTO_FS=\"$RTO_FS\" RTO_IMAGES=\"$RTO_IMAGES\" COPY_FS=\"$COPY_FS\" COPY_IMAGES=\"$COPY_IMAGES\" RUNS=$RUNS COPY_RUNS=$COPY_RUNS PENDING=$PENDING DROP_CACHES=$DROP_CACHES SPARSE_DATA=$SPARSE_DATA FRAG_DATA=$FRAG_DATA IS_SIZE=$IS_SIZE IS_DATA=$IS_DATA IS_ROUNDS=$IS_ROUNDS scripts/bench-lifecycle.sh"
} >"$RESULTS/run.txt"
cat "$RESULTS/run.txt" >&2

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
# The VMs' journal rings (memory) in a directory of this run's, removed at
# the end: deleting a state directory by hand does not free them.
export TERN_RING_DIR="/dev/shm/tern-bench-lifecycle-$$"
SERVE_PID=""
on_exit 'rm -rf "$TERN_RING_DIR"'
on_exit 'stop_pid "$SERVE_PID"'
on_exit umount_loops
# The loop filesystems' images, and the work directories (KEEP=1: kept).
remove_work() {
    [[ "$KEEP" != 1 ]] || return 0
    local m
    for m in "${BENCH_MOUNTS[@]}"; do rm -f "$m.img"; done
    for m in "$WORK"/rto-* "$WORK"/is-* "$WORK/initial-sync"; do
        mountpoint -q "$m" 2>/dev/null || rm -rf "$m"
    done
}
on_exit remove_work

# Before each timed run: the page cache dropped (DROP_CACHES=1, the default:
# a target host that has not read the replica's metadata lately), or only
# flushed (DROP_CACHES=0: warm, as right after `tern apply` wrote it).
before_timed_run() { if [[ "$DROP_CACHES" == 1 ]]; then drop_caches; else sync; fi; }

# need_space BYTES: stop (cleanly) unless the work dir's disk has BYTES free
# beyond MIN_FREE [4g]. The disk is shared with builds and other work; the
# loop filesystems are sparse files on it and grow as they fill.
need_space() {
    local avail; avail=$(df -B1 --output=avail "$WORK" | tail -1)
    (( avail >= $1 + $(bytes "$MIN_FREE") )) ||
        die "only $((avail >> 20)) MiB free on $WORK's disk, $(( $1 >> 20 )) MiB + MIN_FREE $MIN_FREE needed: stopping"
}
loadavg() { cut -d' ' -f1 /proc/loadavg; }

# Before a measurement: wait until the machine is quiet (the 2-core machine
# is shared with builds).
wait_quiet() {
    local waited=0
    while (( $(echo "$(loadavg) >= $MAX_LOAD" | bc) )) && (( waited < LOAD_WAIT )); do
        (( waited == 0 )) && log "load $(loadavg) ≥ $MAX_LOAD: waiting (at most ${LOAD_WAIT}s)"
        sleep 15; waited=$((waited + 15))
    done
    (( waited > 0 )) && log "waited ${waited}s; load now $(loadavg)"
    return 0
}
# Before a timed run: no compiler running beside it.
wait_no_build() {
    local waited=0
    while pgrep -x rustc >/dev/null && (( waited < LOAD_WAIT )); do
        (( waited == 0 )) && log "a rustc is running: waiting"
        sleep 10; waited=$((waited + 10))
    done
    return 0
}

# A file's extent records (`filefrag -v`): what a clone walks. Plain
# `filefrag` counts physically discontiguous runs, so a sparse file whose
# data sits in one run on disk counts as 1 however many holes it has.
extents() { filefrag -v "$1" 2>/dev/null | grep -cE '^ *[0-9]+:' || true; }

# mount_fs FS NAME -> a fresh loop-mounted FS at $WORK/NAME (MNT).
MNT=""
mount_fs() {
    local fs="$1" name="$2"
    MNT="$WORK/$name"
    umount "$MNT" 2>/dev/null || true
    rm -f "$MNT.img"; truncate -s "$FS_SIZE" "$MNT.img"
    loop_fs "${fs%+C}" "$MNT.img" "$MNT"   # btrfs+C: btrfs
}
umount_fs() {
    local mnt="$1"
    umount_loop "$mnt"
    [[ "$KEEP" == 1 ]] || { rm -f "$mnt.img"; rmdir "$mnt"; }
}

# make_image NAME PATH -> the source image; echoes "size data" in bytes.
make_image() {
    local name="$1" path="$2" size data
    case "$name" in
        dense-*) size=${name#dense-}; data=$size ;;
        sparse-*) size=${name#sparse-}; data=$SPARSE_DATA ;;
        frag-*) size=${name#frag-}; data=$size ;;
        *) die "unknown image '$name' (dense-N or sparse-N)" ;;
    esac
    python3 "$HELPER" fill "$path" --size "$size" --data "$data" --chunk 1m
    echo "$(bytes "$size") $(bytes "$data")"
}

# write_pending DIR DISK_BYTES [BS AMOUNT]: AMOUNT [PENDING] bytes of BS
# [1M] random writes through `tern serve` (as a VM would write), then `tern
# ship --once`.
write_pending() {
    local d="$1" disk_bytes="$2" bs="${3:-1M}" amount="${4:-$PENDING}" sock="$1/nbd.sock"
    rm -f "$sock"
    "$TERN" --state "$d/state" -q serve vm --listen "unix:$sock" 2>>"$d/serve.log" &
    SERVE_PID=$!
    wait_for_socket "$sock" 10 "$d/serve.log" "$SERVE_PID" || die "tern serve is not listening ($d)"
    fio --name=pending --ioengine=nbd --uri="nbd+unix:///disk0?socket=$sock" --thread \
        --rw=randwrite --bs="$bs" --iodepth=16 --size="$disk_bytes" --io_size="$amount" --norandommap \
        --randrepeat=0 --refill_buffers --output="$d/fio-pending.txt" >/dev/null
    stop_pid "$SERVE_PID"; SERVE_PID=""
    "$TERN" --state "$d/state" -q ship vm --once 2>>"$d/ship.log"
}

# Parses a failover's output (`--json`; older binaries: the text line):
# READY (seconds, the command's own figure), POINT (id), METHOD.
parse_failover() {
    local out="$1"
    if [[ "$(head -c1 "$out")" == "{" ]]; then
        read -r READY POINT METHOD < <(python3 "$HELPER" failover-json "$out")
        return
    fi
    local ready
    ready=$(grep -o 'ready in [0-9.]*[a-zµ]*s' "$out" | head -1 | sed 's/ready in //')
    READY=$(awk -v v="$ready" 'BEGIN {
        if (v == "") { print "-"; exit }
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        m = (u == "s") ? 1 : (u == "ms") ? 1e-3 : (u == "µs" || u == "us") ? 1e-6 : (u == "ns") ? 1e-9 : 0
        printf "%.4f", n * m }')
    POINT=$(grep -o ' point [^ ]* (seq' "$out" | head -1 | awk '{print $2}')
    if grep -q 'copied: the target cannot reflink' "$out"; then METHOD=copy; else METHOD=reflink; fi
}

# ---------------------------------------------------------------------------
# RTO
# ---------------------------------------------------------------------------
RTO_TSV="$RESULTS/rto.tsv"
RTO_SETUP_TSV="$RESULTS/rto-setup.tsv"

# rto_record FS IMAGE KIND RUN STATUS OUT TARGET NAME PENDING
rto_record() {
    local fs="$1" image="$2" kind="$3" run="$4" status="$5" out="$6" target="$7" name="$8" pending="$9"
    READY=- POINT=- METHOD=-
    [[ "$status" == ok ]] && parse_failover "$out"
    local pext=- fext=-
    if [[ "$POINT" != - && -n "$POINT" ]]; then pext=$(extents "$target/vm/points/$POINT/disk0.img"); fi
    [[ -f "$target/vm/failover/$name/disk0.img" ]] && fext=$(extents "$target/vm/failover/$name/disk0.img")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$fs" "$image" "$kind" "$run" "$status" \
        "$T_WALL" "$READY" "$METHOD" "${POINT:--}" "${pext:--}" "${fext:--}" "$pending" "$(loadavg)" >>"$RTO_TSV"
    log "  $fs $image $kind run $run: $status, wall ${T_WALL}s, ready in ${READY}s, $METHOD, point ${POINT:--} ($pext extents)"
}

# drop_copied_point TARGET ID: where points are full copies (no reflink),
# the point a --latest failover took goes after the run, or the loop fs
# (and the disk under it) fills with a copy of the image per run.
drop_copied_point() {
    local dir="$1/vm/points/$2"
    [[ -n "$2" && "$2" != - && -f "$dir/point.toml" ]] || return 0
    if grep -q '^clone = "copy"' "$dir/point.toml"; then rm -rf "$dir"; fi
}

# rto_case FS MNT IMAGE RUNS
rto_case() {
    local fs="$1" mnt="$2" image="$3" runs="$4"
    local d="$WORK/rto-$fs-$image" cache="$mnt/cache-$image" target="$mnt/target-$image"
    local out="$RESULTS/rto-$fs-$image"
    rm -rf "$d" "$cache" "$target"; mkdir -p "$d" "$cache" "$target" "$out"
    log "$fs $image: making the source image"
    # source image + journal + cache segments + replica (+ a frag ring)
    local need; need=$(( 4 * $(bytes "${image#*-}") ))
    [[ "$image" == sparse-* ]] && need=$(( 4 * $(bytes "$SPARSE_DATA") + (1 << 30) ))
    [[ "$image" == frag-* ]] && need=$(( need + 2 * $(bytes "$FRAG_DATA") ))
    need_space "$need"
    local sizes disk_bytes data_bytes
    sizes=$(make_image "$image" "$d/disk.img"); read -r disk_bytes data_bytes <<<"$sizes"
    local T="$TERN --state $d/state"
    # frag-*: a ring that holds all FRAG_DATA, so the 4 KiB writes reach the
    # replica as records (an overflow would resync whole 64 KiB regions).
    local journal=1GiB
    [[ "$image" == frag-* ]] && journal=$(( $(bytes "$FRAG_DATA") * 2 / 1048576 + 256 ))MiB
    drop_caches
    timed "$out/enable.out" "$out/enable.err" $T enable vm --disk "disk0=$d/disk.img" --cache "$cache" \
        --target "$target" --journal-size "$journal"
    local enable_s=$T_WALL
    timed "$out/ship.out" "$out/ship.err" $T ship vm --once; local ship_s=$T_WALL
    timed "$out/apply.out" "$out/apply.err" $T apply --cache "$cache" --target "$target" vm --once
    local apply_s=$T_WALL
    if [[ "$image" == frag-* ]]; then
        # A replica fragmented by a day of small random writes: FRAG_DATA of
        # 4 KiB writes through `tern serve`, shipped and applied.
        log "$fs $image: fragmenting: $FRAG_DATA of 4 KiB random writes through tern serve, ship, apply"
        write_pending "$d" "$disk_bytes" 4k "$FRAG_DATA"
        $T -q tag vm fragmented >/dev/null   # a point there (crash points come every 5 min)
        $T -q ship vm --once 2>>"$d/ship.log"
        $T -q apply --cache "$cache" --target "$target" vm --once 2>>"$out/apply.err"
    fi
    local point
    point=$($T points vm --json | python3 -c 'import json,sys; print(max(json.load(sys.stdin), key=lambda p: p["seq"])["id"])')
    local rext; rext=$(extents "$target/vm/replica/disk0.img")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$fs" "$image" "$disk_bytes" "$data_bytes" "$enable_s" "$ship_s" \
        "$apply_s" "$rext" >>"$RTO_SETUP_TSV"
    log "$fs $image: initial sync shipped in ${ship_s}s, applied in ${apply_s}s; point $point, replica $rext extents"
    if [[ "$fs" == btrfs+C ]]; then
        # The workaround row: failover directories inherit NOCOW like the
        # replica and the points (which `tern apply` marks `chattr +C`), so
        # btrfs can reflink between them (it refuses FICLONE between a NOCOW
        # and a COW file, and tern then falls back to a copy).
        mkdir -p "$target/vm/failover"; chattr +C "$target/vm/failover"
    fi
    wait_quiet
    local r st copies=0
    grep -q '^clone = "copy"' "$target/vm/points/$point/point.toml" && copies=2
    for r in $(seq "$runs"); do
        # PENDING twice more in the cache and the replica; on a filesystem
        # without reflinks a failover and a point are full copies too
        need_space $(( ${copies:-0} * data_bytes + 3 * $(bytes "$PENDING") + (512 << 20) ))
        # test failover from the point
        wait_no_build; before_timed_run
        st=ok; timed "$out/test-point-$r.out" "$out/test-point-$r.err" \
            $T failover vm --test --point "$point" --name "p$r" --json || st=fail
        rto_record "$fs" "$image" test-point "$r" "$st" "$out/test-point-$r.out" "$target" "p$r" 0
        $T -q failover-cleanup vm "p$r" >/dev/null 2>&1 || true

        # test failover, --latest, with PENDING in the cache
        write_pending "$d" "$disk_bytes"
        wait_no_build; before_timed_run
        st=ok; timed "$out/test-latest-$r.out" "$out/test-latest-$r.err" \
            $T failover vm --test --latest --name "l$r" --json || st=fail
        rto_record "$fs" "$image" test-latest "$r" "$st" "$out/test-latest-$r.out" "$target" "l$r" "$PENDING"
        $T -q failover-cleanup vm "l$r" >/dev/null 2>&1 || true
        drop_copied_point "$target" "$POINT"

        # real failover, --latest, with PENDING in the cache
        write_pending "$d" "$disk_bytes"
        wait_no_build; before_timed_run
        st=ok; timed "$out/real-latest-$r.out" "$out/real-latest-$r.err" \
            $T failover vm --latest --json || st=fail
        rto_record "$fs" "$image" real-latest "$r" "$st" "$out/real-latest-$r.out" "$target" active "$PENDING"
        drop_copied_point "$target" "$POINT"
        # Back to the state before the failover (so the next run is a first
        # failover too): the failed-over disks and the fence go.
        rm -rf "$target/vm/failover/active" "$cache/vm/fence.toml"
    done
    rm -rf "$cache" "$target" "$d"
    fstrim "$mnt" >/dev/null 2>&1 || true
}

measure_rto() {
    printf 'fs\timage\tkind\trun\tstatus\twall_s\tready_s\tmethod\tpoint\tpoint_extents\tfailover_extents\tpending\tload\n' >"$RTO_TSV"
    printf 'fs\timage\tdisk_bytes\tdata_bytes\tenable_s\tship_s\tapply_s\treplica_extents\n' >"$RTO_SETUP_TSV"
    local fs image
    for fs in $RTO_FS; do
        wait_quiet
        mount_fs "$fs" "rto-$fs"
        for image in $RTO_IMAGES; do rto_case "$fs" "$MNT" "$image" "$RUNS"; done
        umount_fs "$MNT"
    done
    for fs in $COPY_FS; do
        wait_quiet
        mount_fs "$fs" "rto-$fs"
        for image in $COPY_IMAGES; do rto_case "$fs" "$MNT" "$image" "$COPY_RUNS"; done
        umount_fs "$MNT"
    done
}

# ---------------------------------------------------------------------------
# Initial sync
# ---------------------------------------------------------------------------
IS_TSV="$RESULTS/initial-sync.tsv"

is_record() { # what round wall bytes_in bytes_moved data_bytes note
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$IS_TSV"
    log "  initial-sync round $2: $1: ${3}s, moved $5 bytes${7:+ ($7)}"
}

measure_initial_sync() {
    printf 'what\tround\twall_s\tbytes_in\tbytes_moved\tdata_bytes\tnote\n' >"$IS_TSV"
    local d="$WORK/initial-sync" out="$RESULTS/initial-sync"
    rm -rf "$d"; mkdir -p "$d" "$out"
    wait_quiet
    need_space $(( 5 * $(bytes "$IS_DATA") + $(bytes "$NAIVE_PIECE") ))
    mount_fs "$IS_TARGET_FS" "is-$IS_TARGET_FS"
    local mnt="$MNT"
    log "initial-sync: a $IS_SIZE sparse image holding $IS_DATA in 1 MiB chunks"
    python3 "$HELPER" fill "$d/disk.img" --size "$IS_SIZE" --data "$IS_DATA" --chunk 1m
    local size_b data_b piece_b
    size_b=$(bytes "$IS_SIZE"); data_b=$(bytes "$IS_DATA"); piece_b=$(bytes "$NAIVE_PIECE")
    local round
    for round in $(seq "$IS_ROUNDS"); do
        wait_quiet
        # tern: enable, ship --once (the initial sync), apply --once
        rm -rf "$d/state" "$d/cache" "$mnt/target"; mkdir -p "$d/cache" "$mnt/target"
        local T="$TERN --state $d/state"
        wait_no_build; drop_caches
        timed "$out/enable-$round.out" "$out/enable-$round.err" $T enable vm --disk "disk0=$d/disk.img" \
            --cache "$d/cache" --target "$mnt/target"
        is_record "tern enable (marks allocated data)" "$round" "$T_WALL" - 0 "$data_b" \
            "$(grep -o '[0-9.]*[KMGT]iB of allocated data marked' "$out/enable-$round.err" || true)"
        timed "$out/ship-$round.out" "$out/ship-$round.err" $T ship vm --once
        local bin bout seg
        bin=$(json_get "$d/state/vm/ship.json" bytes_in)
        bout=$(json_get "$d/state/vm/ship.json" bytes_out)
        seg=$(du -s -B1 --apparent-size "$d/cache/vm/segments" | cut -f1)
        is_record "tern ship --once (initial sync, segments to the ext4 disk)" "$round" "$T_WALL" "$bin" "$seg" \
            "$data_b" "ship.json bytes_out $bout, $(ls "$d/cache/vm/segments" | wc -l) segments"
        cp "$d/state/vm/ship.json" "$out/ship-$round.json"
        drop_caches
        timed "$out/apply-$round.out" "$out/apply-$round.err" $T apply --cache "$d/cache" --target "$mnt/target" vm --once
        is_record "tern apply --once (onto $IS_TARGET_FS)" "$round" "$T_WALL" - \
            "$(du -s -B1 "$mnt/target/vm/replica" | cut -f1)" "$data_b" \
            "replica $(extents "$mnt/target/vm/replica/disk0.img") extents"
        rm -rf "$d/state" "$d/cache" "$mnt/target"; fstrim "$mnt" >/dev/null 2>&1 || true

        # sparse-aware copy (SEEK_DATA/SEEK_HOLE, zero detection), fsynced
        wait_no_build; rm -f "$d/copy-sparse.img"; drop_caches
        timed "$out/cp-$round.out" "$out/cp-$round.err" \
            bash -c 'cp --sparse=always "$1" "$2" && sync "$2"' _ "$d/disk.img" "$d/copy-sparse.img"
        is_record "cp --sparse=always (to the same disk)" "$round" "$T_WALL" - \
            "$(du -s -B1 "$d/copy-sparse.img" | cut -f1)" "$data_b" ""
        rm -f "$d/copy-sparse.img"

        # naive full copy: every byte, holes as zeroes, in pieces
        wait_no_build; drop_caches
        local off=0 total=0 n
        while (( off < size_b )); do
            n=$(( size_b - off < piece_b ? size_b - off : piece_b ))
            timed "$out/dd-$round.out" "$out/dd-$round.err" dd if="$d/disk.img" of="$d/naive.piece" bs=1M \
                iflag=skip_bytes,count_bytes skip="$off" count="$n" conv=fsync status=none
            total=$(echo "$total + $T_WALL" | bc)
            rm -f "$d/naive.piece"; sync
            off=$(( off + n ))
        done
        local note=""
        (( piece_b < size_b )) && note="written as $(( (size_b + piece_b - 1) / piece_b )) pieces of $NAIVE_PIECE, each fsynced and deleted (disk space)"
        is_record "dd of the whole image (naive full copy, to the same disk)" "$round" "$total" - "$size_b" "$data_b" "$note"
    done
    umount_fs "$mnt"
    [[ "$KEEP" == 1 ]] || rm -rf "$d"
}

# ---------------------------------------------------------------------------
# Re-protect (issue 5): measured by scripts/bench-reprotect.sh (its own
# knobs: RP_FS, RP_SIZE, RP_PERCENT, RP_CASES); MEASURE=reprotect runs it
# with this script's binary.
# ---------------------------------------------------------------------------
measure_reprotect() {
    [[ -x scripts/bench-reprotect.sh ]] || die "scripts/bench-reprotect.sh is missing"
    TERN="$TERN" scripts/bench-reprotect.sh 2>&1 | tee "$RESULTS/reprotect.txt"
}

# ---------------------------------------------------------------------------
for m in $MEASURE; do
    fn="measure_${m//-/_}"
    declare -F "$fn" >/dev/null || die "unknown measurement '$m' (rto, initial-sync, reprotect)"
    log "measuring: $m"
    "$fn"
done

{
    echo "## bench-lifecycle run $STAMP"
    echo
    sed 's/^/    /' "$RESULTS/run.txt"
    echo
    python3 "$HELPER" summary "$RESULTS"
} | tee "$RESULTS/summary.md"
log "results in $RESULTS"
