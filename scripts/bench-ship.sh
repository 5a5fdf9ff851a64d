#!/usr/bin/env bash
# bench-ship.sh — what `tern ship` costs and how far behind it stays (issue 3).
#
# Two parts, in one run:
#  1. Throughput. On three data sets — an ext4 image holding a copy of /usr
#     (VM-like), random bytes, mostly zeroes — `tern enable` a VM on a copy of
#     the data set and time `tern ship --once`, the initial sync of the whole
#     image (read → resync records in the ring → zstd segments in the cache),
#     at each compression level in LEVELS: MB/s, CPU seconds per GB, ratio and
#     the cache's size on disk, next to the `zstd` CLI on the same file
#     (-L -T1, and -L -T$WORKERS since tern compresses with that many workers).
#  2. Lag. A VM on a copy of the usr image, initial sync done; `tern serve`
#     and `tern ship` (daemon) run while fio writes through NBD at a
#     sustained rate (each of RATES): lag p50/p99/max from ship.json, journal
#     fill, overflow, fio's achieved rate, CPU of each process.
#
# Usage (from anywhere; the script cds to the repo root; root is needed for
# the loop mount that builds the usr image):
#   scripts/bench-ship.sh
#   QUICK=1 scripts/bench-ship.sh                # smoke test: 256MiB, 5 s per rate
#   PARTS=lag RATES="200m 250m" RUNTIME=60 scripts/bench-ship.sh
#
# Environment knobs (defaults in brackets):
#   PARTS          which parts to run ["throughput lag"]
#   DATASETS       data sets for the throughput part ["usr random zeroes"]
#   LEVELS         zstd levels for tern and the zstd peers ["1 3"] (negative:
#                  zstd's fast levels, `zstd --fast=N`)
#   SIZE           data set / disk size [2GiB] (KiB/MiB/GiB suffix, multiple of 1MiB)
#   ROUNDS         throughput rounds (tern and zstd interleaved); medians are
#                  reported with the min–max range [3]
#   WORKERS        `tern ship --workers`, and the peers' second -T [nproc]
#   RATES          fio --rate values for the lag part, binary units ["100m 200m 300m"]
#   RUNTIME        seconds of fio per rate [30]
#   FIO_BS         fio block size [64k]
#   FIO_IODEPTH    fio iodepth [8]
#   FIO_COMPRESS   fio --buffer_compress_percentage, with --refill_buffers [70]
#                  (70% of each 512-byte chunk zeroes: zstd ratio ≈ 3, like /usr)
#   LAG_LEVEL      compression level of the lag VM [first of LEVELS], or
#                  MIN..MAX for adaptive compression between the two
#   LAG_STRESS     stress-ng arguments for a competing CPU load during the
#                  lag part, e.g. "--cpu 2 --cpu-load 50" [none]
#   LAG_CACHE      the lag VM's cache store, e.g. s3://tern-test/lag [its own directory]
#   LAG_NETNS      network namespace the lag VM's tern commands run in (the
#                  source host of scripts/bench-wan.sh's emulated WAN) [none]
#   LAG_SHIP_ARGS  extra `tern ship` arguments in the lag part, e.g.
#                  "--max-rate 5MB/s" [none]
#   LAG_ENABLE_ARGS  extra `tern enable` arguments for the lag VM, e.g.
#                  "--segment-size 32MiB" [none]
#   DRAIN_TIMEOUT  seconds to wait after fio for the ring to drain [120]
#   ZEROES_RANDOM_PCT  share of random 4 KiB blocks in the zeroes data set [5]
#   VERIFY         `tern segment verify` every throughput run's cache (untimed) [1]
#   QUICK=1        smoke test: SIZE=256MiB, RUNTIME=5, ROUNDS=1 unless set explicitly
#   WORK           work dir (data sets, runs, results) [/var/tmp/tern-bench-ship]
#   TERN           tern binary [target/release/tern]
#   JOURNAL_SIZE   --journal-size for `tern enable` [1GiB]
#   FRESH_DATA=1   rebuild the data sets even if cached ones exist
#   DROP_CACHES=1  drop the page cache before every timed run (root); by
#                  default images are read from memory, as the peers read them
#   PREFAULT       bytes of memory to allocate, touch and free right before
#                  every timed run [JOURNAL_SIZE + SIZE]; 0 disables. This VM
#                  returns free memory to its host (virtio-balloon free page
#                  reporting): without it, a run that follows a pause pays to
#                  fault the host's pages back in (in tern's sys time: its
#                  ring and the segments' page cache are new memory; zstd
#                  writing to a pipe needs almost none), and the first tern
#                  run of each round came out 30–45% slower than the next.
#
# Output: per-run logs, ship.json, fio JSON and samples under
# $WORK/results/<run-id>/, a Markdown summary on stdout and in
# $WORK/summary.md (and the run dir), machine-readable summary.json.
# Exit status is non-zero if any run failed (the benchmark carries on).
set -euo pipefail
# shellcheck source=lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"
BENCH_ERROR=ERROR

# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

# Record the knobs the caller set *before* defaults, so the summary can
# print the exact command that reproduces this run.
CMDLINE=$(knob_command scripts/bench-ship.sh PARTS DATASETS LEVELS SIZE ROUNDS WORKERS RATES RUNTIME \
    FIO_BS FIO_IODEPTH FIO_COMPRESS LAG_LEVEL LAG_STRESS LAG_CACHE LAG_NETNS LAG_SHIP_ARGS LAG_ENABLE_ARGS DRAIN_TIMEOUT ZEROES_RANDOM_PCT VERIFY QUICK WORK TERN \
    JOURNAL_SIZE FRESH_DATA DROP_CACHES PREFAULT -- "$@")

cd "$BENCH_ROOT"

QUICK="${QUICK:-0}"
if [[ "$QUICK" == 1 ]]; then
    SIZE="${SIZE:-256MiB}"
    RUNTIME="${RUNTIME:-5}"
    ROUNDS="${ROUNDS:-1}"
fi
PARTS="${PARTS:-throughput lag}"
DATASETS="${DATASETS:-usr random zeroes}"
LEVELS="${LEVELS:-1 3}"
SIZE="${SIZE:-2GiB}"
ROUNDS="${ROUNDS:-3}"
WORKERS="${WORKERS:-$(nproc)}"
RATES="${RATES:-100m 200m 300m}"
RUNTIME="${RUNTIME:-30}"
FIO_BS="${FIO_BS:-64k}"
FIO_IODEPTH="${FIO_IODEPTH:-8}"
FIO_COMPRESS="${FIO_COMPRESS:-70}"
read -r FIRST_LEVEL _ <<<"$LEVELS"
LAG_LEVEL="${LAG_LEVEL:-$FIRST_LEVEL}"
DRAIN_TIMEOUT="${DRAIN_TIMEOUT:-120}"
ZEROES_RANDOM_PCT="${ZEROES_RANDOM_PCT:-5}"
VERIFY="${VERIFY:-1}"
WORK="${WORK:-/var/tmp/tern-bench-ship}"
TERN="${TERN:-target/release/tern}"
JOURNAL_SIZE="${JOURNAL_SIZE:-1GiB}"
FRESH_DATA="${FRESH_DATA:-0}"
DROP_CACHES="${DROP_CACHES:-0}"
PREFAULT="${PREFAULT:-}"

PY=/usr/bin/python3          # stdlib only; avoid pyenv shims and venvs
HELPER="$BENCH_ROOT/scripts/bench-ship.py"
EXPORT=disk0                 # the disk's name, also its NBD export name
VM=bench
SOCK_WAIT=30

SIZE_BYTES="$(bytes "$SIZE")" || die "SIZE must be like 2GiB or 256MiB (got '$SIZE')"
((SIZE_BYTES >= (64 << 20) && SIZE_BYTES % (1 << 20) == 0)) || die "SIZE must be a multiple of 1MiB, at least 64MiB"
SIZE_MIB=$((SIZE_BYTES >> 20))
JOURNAL_BYTES="$(bytes "$JOURNAL_SIZE")" || die "JOURNAL_SIZE must be like 1GiB or 512MiB (got '$JOURNAL_SIZE')"
if [[ -z "$PREFAULT" ]]; then PREFAULT_BYTES=$((JOURNAL_BYTES + SIZE_BYTES))
else PREFAULT_BYTES="$(bytes "$PREFAULT")" || die "PREFAULT must be like 3GiB or 0 (got '$PREFAULT')"; fi
[[ "$RUNTIME" =~ ^[0-9]+$ && "$RUNTIME" -gt 0 ]] || die "RUNTIME must be a positive integer (got '$RUNTIME')"
[[ "$WORKERS" =~ ^[0-9]+$ && "$WORKERS" -gt 0 ]] || die "WORKERS must be a positive integer (got '$WORKERS')"
[[ "$ROUNDS" =~ ^[0-9]+$ && "$ROUNDS" -gt 0 ]] || die "ROUNDS must be a positive integer (got '$ROUNDS')"
PEER_THREADS="1"; ((WORKERS > 1)) && PEER_THREADS+=" $WORKERS"
[[ "$DRAIN_TIMEOUT" =~ ^[0-9]+$ ]] || die "DRAIN_TIMEOUT must be an integer (got '$DRAIN_TIMEOUT')"
for l in $LEVELS ${LAG_LEVEL%..*} ${LAG_LEVEL#*..}; do
    if ! [[ "$l" =~ ^-?[0-9]+$ ]] || ((l < -7 || l > 19)); then
        die "levels must be integers from -7 to 19 (got '$l'; zstd needs --ultra above 19)"
    fi
done
[[ -z ${LAG_STRESS:-} ]] || need_tools stress-ng
for p in $PARTS; do
    [[ "$p" == throughput || "$p" == lag ]] || die "unknown part '$p' (known: throughput lag)"
done
for d in $DATASETS; do
    [[ "$d" == usr || "$d" == random || "$d" == zeroes ]] || die "unknown data set '$d' (known: usr random zeroes)"
done
for r in $RATES; do
    [[ "$r" =~ ^[0-9]+[kmg]?$ ]] || die "RATES entries must be like 200m (got '$r')"
done
has_part() { [[ " $PARTS " == *" $1 "* ]]; }

# ---------------------------------------------------------------------------
# Preflight
# ---------------------------------------------------------------------------
[[ -x "$PY" ]] || die "$PY not found"
[[ -f "$HELPER" ]] || die "$HELPER not found"
if [[ "$TERN" != /* ]]; then TERN="$BENCH_ROOT/$TERN"; fi
need_tern
need_tools zstd
if has_part lag; then need_fio_nbd; fi
if has_part lag || [[ " $DATASETS " == *" usr "* ]]; then
    need_tools mkfs.ext4
    need_root "building the usr image: a loop mount"
fi
HAVE_NBDINFO=0; command -v nbdinfo >/dev/null && HAVE_NBDINFO=1

RUN_ID="$(date +%Y%m%d-%H%M%S)"
RESULTS="$WORK/results/$RUN_ID"
LOGS="$RESULTS/logs"
DATA="$WORK/data"
RUNS="$WORK/runs"            # disks, VM state and caches of the current run
mkdir -p "$RESULTS" "$LOGS" "$DATA"
rm -rf "$RUNS"; mkdir -p "$RUNS"
# The block device under the work dir, for its write rate during the lag runs.
WORK_DISK="$(basename "$(findmnt -no SOURCE --target "$WORK" 2>/dev/null || true)")"
grep -qw -- "$WORK_DISK" /proc/diskstats 2>/dev/null || WORK_DISK=""
# Measure a snapshot of the binary: a `cargo build` during the run must not
# swap it underneath (the version line below is read from the same copy).
tern_snapshot "$RUNS/tern"
fingerprint "$RESULTS/version.txt" zstd fio mkfs.ext4
MANIFEST="$RESULTS/manifest.tsv"
: >"$MANIFEST"
FAILURES=0

# ---------------------------------------------------------------------------
# Process bookkeeping: everything started in the background is stopped on
# exit, whatever the way out.
# ---------------------------------------------------------------------------
SERVE_PID=""
SHIP_PID=""
RUN_PID=""                   # a measured run (helper → tern ship --once or zstd)
FIO_PID=""
SAMPLER_PID=""
SAMPLER_STOP=""

stop_sampler() {
    [[ -n "$SAMPLER_PID" ]] || return 0
    touch "$SAMPLER_STOP"
    stop_pid "$SAMPLER_PID" sampler 5
    SAMPLER_PID=""
}

# The VMs' journal rings (memory) in a directory of this run's, removed at
# the end: deleting a state directory by hand does not free them.
export TERN_RING_DIR="/dev/shm/tern-bench-ship-$$"
on_exit 'rm -rf "$TERN_RING_DIR"'
on_exit '[[ -z $FIO_PID ]] || { log "cleanup: stopping fio"; stop_pid "$FIO_PID" fio 10; }'
on_exit '[[ -z $RUN_PID ]] || { log "cleanup: stopping the measured run"; stop_pid "$RUN_PID" "measured run" 10; }'
on_exit stop_sampler
on_exit '[[ -z $SHIP_PID ]] || { log "cleanup: stopping tern ship"; stop_pid "$SHIP_PID" "tern ship" 30; }'
on_exit '[[ -z $SERVE_PID ]] || { log "cleanup: stopping tern serve"; stop_pid "$SERVE_PID" "tern serve" 30; }'
on_exit '((${#BENCH_MOUNTS[@]} == 0)) || { log "cleanup: unmounting ${BENCH_MOUNTS[*]}"; umount_loops; }'
trap_interrupts

# Before every timed run: the page cache as asked, memory backed by the host.
before_timed_run() {
    if [[ "$DROP_CACHES" == 1 ]]; then
        drop_caches || log "WARNING: could not drop caches"
    fi
    "$PY" "$HELPER" prefault "$PREFAULT_BYTES" || log "WARNING: prefault of $PREFAULT_BYTES bytes failed"
}

# ---------------------------------------------------------------------------
# Data sets, cached in $DATA by size and reused between runs.
# ---------------------------------------------------------------------------
dataset_path() { echo "$DATA/$1-${SIZE_MIB}MiB.img"; }

make_usr() {
    local out="$1" tmp="$1.tmp" mnt="$DATA/mnt" blog="$LOGS/make-usr.log"
    rm -f "$tmp"
    truncate -s "$SIZE_BYTES" "$tmp"
    loop_fs ext4 "$tmp" "$mnt" "" -L tern-bench 2>>"$blog" || die "mkfs.ext4 or the loop mount of $tmp failed (see $blog)"
    # Fills the file system; running out of space is the expected end.
    if cp -a /usr "$mnt/" 2>>"$blog"; then
        log "  /usr fit entirely"
    else
        local other
        other="$(grep -v 'No space left on device' "$blog" | grep -c '^cp: ' || true)"
        log "  copy stopped when the file system filled up ($((other)) other cp errors; see $blog)"
    fi
    df -B1 --output=used,size "$mnt" | tail -n1 >"$out.df"
    umount_loop "$mnt"
    # Fully allocated (free space written as real zero bytes), so `tern
    # enable` marks the whole image and tern ships the very bytes zstd reads.
    cp --sparse=never "$tmp" "$out.full"
    rm -f "$tmp"
    sync "$out.full"
    mv "$out.full" "$out"
}

ensure_dataset() {
    local ds="$1" out
    out="$(dataset_path "$ds")"
    if [[ "$FRESH_DATA" != 1 && -f "$out" && "$(stat -c %s "$out")" == "$SIZE_BYTES" ]]; then
        log "reusing data set $out"
        return
    fi
    rm -f "$out" "$out.df"
    log "building data set $ds ($SIZE) at $out"
    case "$ds" in
        usr) make_usr "$out" ;;
        random)
            head -c "$SIZE_BYTES" /dev/urandom >"$out.tmp"
            sync "$out.tmp"; mv "$out.tmp" "$out" ;;
        zeroes)
            "$PY" "$HELPER" make-zeroes --size "$SIZE_BYTES" --random-pct "$ZEROES_RANDOM_PCT" --out "$out.tmp"
            mv "$out.tmp" "$out" ;;
    esac
}

dataset_desc() {
    local ds="$1" path used size
    path="$(dataset_path "$ds")"
    case "$ds" in
        usr)
            if [[ -f "$path.df" ]]; then
                read -r used size <"$path.df"
                echo "ext4 (mkfs.ext4 defaults) filled by \`cp -a /usr\` until full: $((used >> 20)) MiB used of $((size >> 20)) MiB; copied with --sparse=never so the free space is real zero bytes and the whole image is allocated"
            else
                echo "ext4 filled by \`cp -a /usr\`, fully allocated"
            fi ;;
        random) echo "/dev/urandom" ;;
        zeroes) echo "4 KiB blocks, ${ZEROES_RANDOM_PCT}% random (seeded), the rest zero bytes written out (fully allocated)" ;;
    esac
}

# jget FILE KEY: a top-level value of a JSON file (empty if missing).
jget() { json_get "$1" "$2" 2>/dev/null || true; }

# ---------------------------------------------------------------------------
# tern helpers
# ---------------------------------------------------------------------------
# The lag part's tern commands: in LAG_NETNS if set (`ip netns exec` execs
# tern, so a background one's $! is tern's pid).
LAG_TERN=("$TERN")
[[ -z ${LAG_NETNS:-} ]] || LAG_TERN=(ip netns exec "$LAG_NETNS" "$TERN")
read -r -a LAG_SHIP_EXTRA <<<"${LAG_SHIP_ARGS:-}"
ENABLE_EXTRA=() # set for the lag VM: LAG_ENABLE_ARGS

# new_vm DIR DISK LEVEL LOG [CACHE [TERN...]]: fresh state/cache/target
# under DIR, a VM on DISK (its cache CACHE if given, enabled by TERN...).
new_vm() {
    local dir="$1" disk="$2" level="$3" logf="$4" cache="${5:-$1/cache}"
    local tern=("${@:6}")
    ((${#tern[@]})) || tern=("$TERN")
    rm -rf "$dir/state" "$dir/cache" "$dir/target"
    mkdir -p "$dir/state" "$dir/cache" "$dir/target"
    local cmd=("${tern[@]}" --state "$dir/state" enable "$VM" --disk "$EXPORT=$disk"
               --cache "$cache" --target "$dir/target" --journal-size "$JOURNAL_SIZE" "${ENABLE_EXTRA[@]}")
    echo "+ ${cmd[*]}" >>"$logf"
    "${cmd[@]}" >>"$logf" 2>&1 || return 1
    local toml="$dir/state/$VM/vm.toml"
    grep -q '^compression-level = ' "$toml" || { echo "no compression-level in $toml" >>"$logf"; return 1; }
    if [[ $level == *..* ]]; then
        # Adaptive: from level 1 (or the nearer end) between MIN and MAX.
        local min=${level%..*} max=${level#*..} start=1
        ((start < min)) && start=$min
        ((start > max)) && start=$max
        sed -i "s/^compression-level = .*/compression-level = $start\ncompression-min = $min\ncompression-max = $max/" "$toml"
    else
        sed -i "s/^compression-level = .*/compression-level = $level/" "$toml"
    fi
    echo "+ set compression $level in $toml" >>"$logf"
}

# tern_run DATASET DISK LEVEL ROUND: a fresh VM on DISK, `tern ship --once`.
tern_run() {
    local ds="$1" disk="$2" level="$3" round="$4" status=ok
    local name="tern-$ds-L$level-r$round"
    local dir="$RESULTS/throughput/$name" vmdir="$RUNS/$name" slog="$LOGS/$name.log"
    mkdir -p "$dir" "$vmdir"
    if ! new_vm "$vmdir" "$disk" "$level" "$slog"; then
        log "  $name: tern enable failed (log: $slog)"; tail -n 5 "$slog" >&2 || true
        status=enable-failed
    else
        before_timed_run
        local cmd=("$TERN" --state "$vmdir/state" ship "$VM" --once --workers "$WORKERS")
        echo "+ ${cmd[*]}" >>"$slog"
        # Hard timeout: 4 MB/s would be a broken shipper, not a slow one.
        # In the background and waited for, so Ctrl-C reaches the trap.
        timeout --kill-after=10 $((SIZE_BYTES / 4000000 + 120)) \
            "$PY" "$HELPER" run --out "$dir/run.json" -- "${cmd[@]}" >>"$slog" 2>&1 &
        RUN_PID=$!
        wait "$RUN_PID" || status=ship-failed
        RUN_PID=""
        if [[ "$status" != ok ]]; then
            log "  $name: tern ship --once failed (log: $slog)"; tail -n 5 "$slog" >&2 || true
        fi
        cp "$vmdir/state/$VM/ship.json" "$dir/ship.json" 2>/dev/null || true
        du -sb "$vmdir/cache" >"$dir/du.txt" 2>/dev/null || true
        if [[ "$status" == ok && "$VERIFY" == 1 ]] &&
            ! "$TERN" --state "$vmdir/state" segment verify "$vmdir/cache/$VM" >"$LOGS/$name-verify.log" 2>&1; then
            status=verify-failed
            log "  $name: tern segment verify failed (log: $LOGS/$name-verify.log)"
            tail -n 5 "$LOGS/$name-verify.log" >&2 || true
        fi
        if [[ "$status" == ok ]]; then
            # The one-line report tern prints at the end, and the time.
            local wall
            wall="$(jget "$dir/run.json" wall_s)"
            log "  $name: $(grep -o "shipped .*" "$slog" | tail -n1 | sed 's/, lag p50.*//') in $(printf '%.2f' "${wall:-0}") s"
        fi
    fi
    [[ "$status" == ok ]] || FAILURES=$((FAILURES + 1))
    printf 'tern\t%s\t%s\t%s\t%s\t%s\t%s\n' "$ds" "$level" "$WORKERS" "$round" "$status" "$dir" >>"$MANIFEST"
    rm -rf "$vmdir"   # a 1 GiB journal and the segments
}

# zstd_run DATASET FILE LEVEL THREADS ROUND
zstd_run() {
    local ds="$1" src="$2" level="$3" t="$4" round="$5" status=ok lv
    if ((level < 0)); then lv="--fast=$((-level))"; else lv="-$level"; fi
    local name="zstd-$ds-L$level-T$t-r$round"
    local dir="$RESULTS/throughput/$name"
    mkdir -p "$dir"
    before_timed_run
    "$PY" "$HELPER" run --out "$dir/run.json" --count-stdout -- \
        zstd -q "$lv" -T"$t" -c "$src" 2>>"$LOGS/$name.log" &
    RUN_PID=$!
    wait "$RUN_PID" || { status=zstd-failed; FAILURES=$((FAILURES + 1)); }
    RUN_PID=""
    local wall out
    wall="$(jget "$dir/run.json" wall_s)"; out="$(jget "$dir/run.json" stdout_bytes)"
    log "  $name: zstd $lv -T$t: $(printf '%.2f' "${wall:-0}") s, ${out:-?} bytes out"
    printf 'zstd\t%s\t%s\t%s\t%s\t%s\t%s\n' "$ds" "$level" "$t" "$round" "$status" "$dir" >>"$MANIFEST"
}

# ---------------------------------------------------------------------------
# Environment description for the summary header.
# ---------------------------------------------------------------------------
CPU_MODEL="$(cpu_model)"
TERN_VER="$(timeout 5 "$TERN" --version 2>/dev/null | head -n1 || true)"
TERN_GIT="$(git -C "$BENCH_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
git -C "$BENCH_ROOT" diff --quiet HEAD -- . ':!scripts' 2>/dev/null || TERN_GIT+="+dirty"
FIO_OPTS="--ioengine=nbd --rw=randwrite --bs=$FIO_BS --iodepth=$FIO_IODEPTH --rate=<rate> --time_based --runtime=$RUNTIME --buffer_compress_percentage=$FIO_COMPRESS --refill_buffers --size=$SIZE_BYTES"
{
    echo "date=$(date -Iseconds)"
    echo "nproc=$(nproc)"
    echo "kernel=$(uname -r)"
    echo "cpu=$CPU_MODEL"
    echo "mem=$(free -g | awk '/^Mem:/ {print $2 " GiB"}')"
    echo "tern=${TERN_VER:-tern} (git $TERN_GIT, $TERN_SRC built $(date -r "$TERN_SRC" '+%F %T'))"
    echo "loadavg_start=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "zstd=$(tool_version zstd | sed 's/^\*\** *//; s/ *\**$//')"
    echo "fio=$(tool_version fio)"
    echo "command=$CMDLINE"
    echo "parts=$PARTS"
    echo "datasets=$DATASETS"
    echo "levels=$LEVELS"
    echo "size=$SIZE"
    echo "size_bytes=$SIZE_BYTES"
    echo "rounds=$ROUNDS"
    echo "workers=$WORKERS"
    echo "journal_size=$JOURNAL_SIZE"
    echo "rates=$RATES"
    echo "runtime=$RUNTIME"
    echo "fio_opts=$FIO_OPTS"
    echo "lag_level=$LAG_LEVEL"
    echo "drop_caches=$DROP_CACHES"
    echo "prefault_bytes=$PREFAULT_BYTES"
    echo "disk=$WORK_DISK"
    echo "work=$WORK"
    echo "results=$RESULTS"
} >"$RESULTS/meta.env"

log "parts: $PARTS; size $SIZE; levels $LEVELS; workers $WORKERS; results: $RESULTS"
read -r LOAD1 _ </proc/loadavg
if awk -v l="$LOAD1" 'BEGIN { exit !(l > 1.0) }'; then
    log "WARNING: load average $LOAD1 before the start: something else may be running; figures would be disturbed"
fi

# ---------------------------------------------------------------------------
# Part 1: throughput of the initial sync, and the zstd CLI on the same bytes
# ---------------------------------------------------------------------------
if has_part throughput; then
    for ds in $DATASETS; do
        ensure_dataset "$ds"
        src="$(dataset_path "$ds")"
        { echo "size_$ds=$(stat -c %s "$src")"; echo "desc_$ds=$(dataset_desc "$ds")"; } >>"$RESULTS/meta.env"

        # One fresh disk per data set: `tern ship --once` only reads it, so
        # every level ships the same copy (each with a fresh VM and cache).
        disk="$RUNS/$ds-disk.img"
        log "$ds: copying the data set to a fresh disk $disk"
        cp --sparse=never "$src" "$disk"
        sync "$disk"

        for ((round = 1; round <= ROUNDS; round++)); do
            for level in $LEVELS; do
                tern_run "$ds" "$disk" "$level" "$round"
            done
            # The zstd CLI on the same bytes, one thread and $WORKERS threads.
            for level in $LEVELS; do
                for t in $PEER_THREADS; do
                    zstd_run "$ds" "$src" "$level" "$t" "$round"
                done
            done
        done
        rm -f "$disk"
    done
fi

# ---------------------------------------------------------------------------
# Part 2: lag while fio writes through `tern serve` at a sustained rate
# ---------------------------------------------------------------------------
# wait_ready SOCK LOG: the socket exists and the export answers.
wait_ready() {
    local sock="$1" logf="$2" size
    wait_for_socket "$sock" "$SOCK_WAIT" "$logf" "$SERVE_PID" || return 1
    if ((HAVE_NBDINFO)); then
        size=$(export_size "nbd+unix:///$EXPORT?socket=$sock" "$logf") || size=""
        [[ "$size" == "$SIZE_BYTES" ]] || { log "export size '$size', expected $SIZE_BYTES"; return 1; }
    fi
}

if has_part lag; then
    ensure_dataset usr
    grep -q '^desc_usr=' "$RESULTS/meta.env" || echo "desc_usr=$(dataset_desc usr)" >>"$RESULTS/meta.env"
    vmdir="$RUNS/lag"
    mkdir -p "$vmdir"
    disk="$vmdir/disk.img"
    slog="$LOGS/tern-lag-setup.log"
    log "lag: copying the usr data set to $disk, enabling, initial sync"
    cp --sparse=never "$(dataset_path usr)" "$disk"
    sync "$disk"
    read -r -a ENABLE_EXTRA <<<"${LAG_ENABLE_ARGS:-}"
    new_vm "$vmdir" "$disk" "$LAG_LEVEL" "$slog" "${LAG_CACHE:-$vmdir/cache}" "${LAG_TERN[@]}" ||
        die "lag: tern enable failed (log: $slog)"
    state="$vmdir/state"
    echo "+ ${LAG_TERN[*]} --state $state ship $VM --once --workers $WORKERS" >>"$slog"
    "${LAG_TERN[@]}" --state "$state" ship "$VM" --once --workers "$WORKERS" >>"$slog" 2>&1 ||
        die "lag: initial sync (tern ship --once) failed (log: $slog)"
    log "  initial sync: $(grep -o "shipped .*" "$slog" | tail -n1)"

    STRESS_PID=""
    if [[ -n ${LAG_STRESS:-} ]]; then
        log "lag: a competing load, stress-ng $LAG_STRESS"
        # shellcheck disable=SC2086
        stress-ng $LAG_STRESS --timeout 0 >"$LOGS/stress-ng.log" 2>&1 &
        STRESS_PID=$!
        on_exit 'stop_pid "$STRESS_PID"'
    fi
    for rate in $RATES; do
        name="lag-$rate"
        dir="$RESULTS/lag/$rate"
        mkdir -p "$dir"
        serve_log="$LOGS/tern-$name-serve.log"
        ship_log="$LOGS/tern-$name-ship.log"
        flog="$LOGS/$name-fio.log"
        sock="$vmdir/nbd.sock"
        status=ok
        rm -f "$sock" "$state/$VM/ship.json"

        # Catch up with anything a previous rate left (an overflow's dirty
        # regions), so every rate starts from an empty ring.
        "${LAG_TERN[@]}" --state "$state" ship "$VM" --once --workers "$WORKERS" >>"$slog" 2>&1 ||
            log "  WARNING: catch-up before $rate failed (log: $slog)"
        rm -f "$state/$VM/ship.json"
        before_timed_run

        log "lag at fio --rate=$rate for ${RUNTIME}s"
        echo "+ ${LAG_TERN[*]} --state $state serve $VM --listen unix:$sock" >>"$serve_log"
        "${LAG_TERN[@]}" --state "$state" serve "$VM" --listen "unix:$sock" >>"$serve_log" 2>&1 &
        SERVE_PID=$!
        if ! wait_ready "$sock" "$serve_log"; then
            status=serve-failed
        else
            echo "+ ${LAG_TERN[*]} --state $state ship $VM --workers $WORKERS ${LAG_SHIP_EXTRA[*]}" >>"$ship_log"
            "${LAG_TERN[@]}" --state "$state" ship "$VM" --workers "$WORKERS" "${LAG_SHIP_EXTRA[@]}" >>"$ship_log" 2>&1 &
            SHIP_PID=$!
            SAMPLER_STOP="$dir/.stop"; rm -f "$SAMPLER_STOP"
            "$PY" "$HELPER" sample --out "$dir/samples.jsonl" --stop "$SAMPLER_STOP" \
                --ship-json "$state/$VM/ship.json" --tern "$TERN" --state "$state" --vm "$VM" \
                --pid "serve=$SERVE_PID" --pid "ship=$SHIP_PID" --disk "$WORK_DISK" \
                2>>"$LOGS/$name-sampler.log" &
            SAMPLER_PID=$!
            sleep 2   # ship's first status, and a baseline sample
            args=(--name="ship-lag-$rate" --ioengine=nbd --uri="nbd+unix:///$EXPORT?socket=$sock"
                  --rw=randwrite --bs="$FIO_BS" --iodepth="$FIO_IODEPTH" --rate="$rate"
                  --time_based --runtime="$RUNTIME" --size="$SIZE_BYTES"
                  --buffer_compress_percentage="$FIO_COMPRESS" --refill_buffers
                  --output-format=json --output="$dir/fio.json")
            echo "+ fio ${args[*]}" >"$flog"
            echo "fio_start=$EPOCHREALTIME" >"$dir/times.env"
            # In the background and waited for, so Ctrl-C reaches the trap.
            timeout --kill-after=10 $((RUNTIME + 120)) fio "${args[@]}" >>"$flog" 2>&1 &
            FIO_PID=$!
            wait "$FIO_PID" || status=fio-failed
            FIO_PID=""
            echo "fio_end=$EPOCHREALTIME" >>"$dir/times.env"
            kill -0 "$SERVE_PID" 2>/dev/null || status=serve-died
            kill -0 "$SHIP_PID" 2>/dev/null || status=ship-died
            # Let the shipper drain what fio left in the ring.
            t0=$EPOCHREALTIME; drained=0
            while ((EPOCHSECONDS - ${t0%.*} < DRAIN_TIMEOUT)) && kill -0 "$SHIP_PID" 2>/dev/null; do
                pend="$(jget "$state/$VM/ship.json" pending_bytes)"
                if [[ "$pend" == 0 ]]; then drained=1; break; fi
                sleep 0.25
            done
            t1=$EPOCHREALTIME
            { echo "drain_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')"
              echo "drained=$drained"; } >>"$dir/times.env"
            ((drained)) || log "  WARNING: the ring did not drain within ${DRAIN_TIMEOUT}s"
            sleep 1   # one more sample after the drain
            stop_sampler
            stop_pid "$SHIP_PID" "tern ship" 30; SHIP_PID=""
        fi
        stop_pid "$SERVE_PID" "tern serve" 30; SERVE_PID=""
        cp "$state/$VM/ship.json" "$dir/ship.json" 2>/dev/null || true
        "$TERN" --state "$state" journal dump "$VM" --header >"$dir/journal-header.txt" 2>&1 || true
        if grep -q "mode Overflow" "$dir/journal-header.txt" || grep -q "took no more records" "$serve_log"; then
            echo yes >"$dir/overflow.txt"
            log "  WARNING: the ring overflowed at $rate: writes went to the dirty bitmap, not the journal"
        fi
        if [[ "$status" == ok ]]; then
            log "  $(grep -o "shipped .*" "$ship_log" | tail -n1)"
        else
            log "  $name: $status (logs: $serve_log $ship_log $flog)"
            tail -n 5 "$flog" >&2 2>/dev/null || true
            FAILURES=$((FAILURES + 1))
        fi
        printf 'lag\t%s\t%s\t%s\n' "$rate" "$status" "$dir" >>"$MANIFEST"
    done
    rm -rf "$vmdir"
fi

# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------
echo "loadavg_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$RESULTS/meta.env"
"$PY" "$HELPER" summary "$RESULTS" "$WORK"
log "wrote $WORK/summary.md and $WORK/summary.json (details in $RESULTS)"
rm -rf "$RUNS"
if ((FAILURES > 0)); then
    log "$FAILURES run(s) failed; see $LOGS"
    exit 1
fi
