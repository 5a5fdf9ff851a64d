#!/usr/bin/env bash
# bench-nbd.sh — compare NBD servers (tern, tern without journal, qemu-nbd,
# nbdkit) exporting the same 2 GiB raw image, using fio's `nbd` engine
# (libnbd client, no kernel nbd device involved).
#
# Usage (from anywhere; the script cds to the repo root):
#   scripts/bench-nbd.sh
#   SYSTEMS="qemu-nbd nbdkit" RUNTIME=3 ROUNDS=1 scripts/bench-nbd.sh
#
# Environment knobs (defaults in brackets):
#   SYSTEMS          systems to run, space separated
#                    ["tern tern-nojournal qemu-nbd nbdkit"]; also tern-overflow
#                    and tern-ring (journal on, a ring that holds the whole
#                    run, no consumer: journaling alone, without the
#                    shipper's CPU; use a short RUNTIME)
#   WORKLOADS        subset of workloads to run [all six, see below]
#   RUNTIME          seconds of measured time per fio run [10]
#   RAMP             fio ramp_time, seconds, not measured [2]
#   ROUNDS           interleaved rounds; medians are taken over them [3]
#   WORK             work dir (image, logs, results) [/var/tmp/tern-bench-nbd]
#   TERN             tern binary [target/release/tern]
#   TERN_JOURNAL_SIZE  --journal-size for `tern enable` [1GiB]
#   TERN_RING_SIZE   --journal-size of tern-ring for 1 MiB writes [12GiB]
#   TERN_RING_SIZE_4K  --journal-size of tern-ring for the 4 KiB workloads
#                    [3GiB]: each run gets a ring that holds it and no more,
#                    since a ring is memory the page cache cannot use
#   NBDKIT_THREADS   nbdkit -t value; empty = nbdkit default (16) [16]
#   FRESH_IMAGE=1    recreate the image even if a 2 GiB one already exists
#   DROP_CACHES=1    drop the page cache before every server start (root)
#   PIN_DIRTY        1: for the whole run, fix the kernel's dirty-page
#                    thresholds (vm.dirty_bytes, vm.dirty_background_bytes) at
#                    the values it computes before any server starts, and
#                    restore the settings at exit (root) [1]. Otherwise
#                    tern-ring's ring, which only this benchmark makes that
#                    large, lowers them for tern-ring alone (see below).
#
# Output: raw fio JSON under $WORK/results/<run-id>/, a Markdown table on
# stdout and in $WORK/summary.md, machine-readable $WORK/summary.json.
# Exit status is non-zero if any server start or fio run failed (the
# benchmark carries on regardless so one flaky run doesn't waste the rest).
set -euo pipefail
# shellcheck source=lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"
BENCH_ERROR=ERROR

# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

# Record which knobs the caller set explicitly *before* applying defaults, so
# the summary can print the exact command that reproduces this run.
CMDLINE=$(knob_command scripts/bench-nbd.sh SYSTEMS WORKLOADS RUNTIME RAMP ROUNDS WORK TERN TERN_JOURNAL_SIZE \
    TERN_RING_SIZE TERN_RING_SIZE_4K NBDKIT_THREADS FRESH_IMAGE DROP_CACHES PIN_DIRTY -- "$@")

# Paths like target/release/tern are relative to the repo root.
cd "$BENCH_ROOT"

SYSTEMS="${SYSTEMS:-tern tern-nojournal qemu-nbd nbdkit}"
ALL_WORKLOADS="seq-write randwrite-qd1 randwrite-qd32 randread-qd32 randrw-70-30 4conn-qd8 4conn-flush"
WORKLOADS="${WORKLOADS:-$ALL_WORKLOADS}"
RUNTIME="${RUNTIME:-10}"
RAMP="${RAMP:-2}"
ROUNDS="${ROUNDS:-3}"
WORK="${WORK:-/var/tmp/tern-bench-nbd}"
TERN="${TERN:-target/release/tern}"
TERN_JOURNAL_SIZE="${TERN_JOURNAL_SIZE:-1GiB}"
TERN_RING_SIZE="${TERN_RING_SIZE:-12GiB}"
TERN_RING_SIZE_4K="${TERN_RING_SIZE_4K:-3GiB}"
NBDKIT_THREADS="${NBDKIT_THREADS-16}"
FRESH_IMAGE="${FRESH_IMAGE:-0}"
DROP_CACHES="${DROP_CACHES:-0}"
PIN_DIRTY="${PIN_DIRTY:-1}"

PY=/usr/bin/python3          # stdlib only; avoid pyenv shims and venvs
EXPORT=disk0                 # export name, identical for every server
IMG_BYTES=$((2 * 1024 * 1024 * 1024))
IMG="$WORK/disk.img"
SOCK_WAIT=30                 # seconds to wait for a server's socket

[[ "$RUNTIME" =~ ^[0-9]+$ && "$RUNTIME" -gt 0 ]] || die "RUNTIME must be a positive integer (got '$RUNTIME')"
[[ "$RAMP" =~ ^[0-9]+$ ]] || die "RAMP must be a non-negative integer (got '$RAMP')"
[[ "$ROUNDS" =~ ^[0-9]+$ && "$ROUNDS" -gt 0 ]] || die "ROUNDS must be a positive integer (got '$ROUNDS')"
[[ -z "$NBDKIT_THREADS" || "$NBDKIT_THREADS" =~ ^[0-9]+$ ]] || die "NBDKIT_THREADS must be an integer or empty"
[[ "$PIN_DIRTY" == 0 || "$PIN_DIRTY" == 1 ]] || die "PIN_DIRTY must be 0 or 1 (got '$PIN_DIRTY')"

# ---------------------------------------------------------------------------
# Workloads: name -> fio options. All are time_based over the whole image.
# (Human-readable descriptions live in DESC in the summary code below.)
# ---------------------------------------------------------------------------
declare -A WL_OPTS=(
    [seq-write]="--rw=write --bs=1M --iodepth=8 --numjobs=1"
    [randwrite-qd1]="--rw=randwrite --bs=4k --iodepth=1 --numjobs=1"
    [randwrite-qd32]="--rw=randwrite --bs=4k --iodepth=32 --numjobs=1"
    [randread-qd32]="--rw=randread --bs=4k --iodepth=32 --numjobs=1"
    [randrw-70-30]="--rw=randrw --rwmixread=70 --bs=4k --iodepth=32 --numjobs=1"
    # numjobs=4: the nbd engine opens one NBD connection per job.
    [4conn-qd8]="--rw=randwrite --bs=4k --iodepth=8 --numjobs=4"
    # A FLUSH after every 8 writes on each of 4 connections: FLUSHes in
    # flight together, the group commit's case.
    [4conn-flush]="--rw=randwrite --bs=4k --iodepth=8 --numjobs=4 --fsync=8"
)
for w in $WORKLOADS; do
    [[ -n "${WL_OPTS[$w]+x}" ]] || die "unknown workload '$w' (known: $ALL_WORKLOADS)"
done

# ---------------------------------------------------------------------------
# Preflight: tools, system selection
# ---------------------------------------------------------------------------
[[ -x "$PY" ]] || die "$PY not found (needed to parse fio JSON)"
# fio must be built with the libnbd engine; `--enghelp=nbd` fails otherwise.
need_fio_nbd
# nbdinfo is used to prove each server really serves the export before fio runs.
HAVE_NBDINFO=0; command -v nbdinfo >/dev/null && HAVE_NBDINFO=1

SELECTED=()
for s in $SYSTEMS; do
    case "$s" in
        tern|tern-nojournal|tern-overflow|tern-ring)
            # tern may not be built yet; skip rather than fail so the peers
            # can still be measured.
            if [[ ! -x "$TERN" ]]; then
                log "skipping '$s': tern binary '$TERN' not found or not executable (cargo build --release, or set TERN=)"
                continue
            fi ;;
        qemu-nbd) command -v qemu-nbd >/dev/null || { log "skipping qemu-nbd: not installed"; continue; } ;;
        nbdkit)
            command -v nbdkit >/dev/null || { log "skipping nbdkit: not installed"; continue; }
            nbdkit file --dump-plugin >/dev/null 2>&1 || { log "skipping nbdkit: file plugin missing"; continue; } ;;
        *) die "unknown system '$s' (known: tern tern-nojournal tern-overflow tern-ring qemu-nbd nbdkit)" ;;
    esac
    SELECTED+=("$s")
done
((${#SELECTED[@]} > 0)) || die "no runnable systems selected (SYSTEMS='$SYSTEMS')"
if [[ "$TERN" != /* ]]; then TERN="$BENCH_ROOT/$TERN"; fi  # absolute, for logs

RUN_ID="$(date +%Y%m%d-%H%M%S)"
RESULTS="$WORK/results/$RUN_ID"
LOGS="$RESULTS/logs"
RUNTMP="$WORK/tmp"           # per-(round,system) state dirs, sockets
mkdir -p "$RESULTS" "$LOGS" "$RUNTMP"
MANIFEST="$RESULTS/manifest.tsv"   # round system workload status file
# tern's journal rings (in memory) for the benchmark's VMs; one VM at a
# time, its ring removed with its state.
export TERN_RING_DIR="/dev/shm/tern-bench-nbd-$$"
: >"$MANIFEST"
fingerprint "$RESULTS/version.txt" fio qemu-nbd nbdkit nbdinfo

# ---------------------------------------------------------------------------
# Server lifecycle. Only one server runs at a time; its pid is in SERVER_PID.
# ---------------------------------------------------------------------------
SERVER_PID=""
SERVER_NAME=""
FIO_PID=""                   # fio (via timeout) currently running, if any
OVERFLOWED=0
SHIP_PID=""                  # tern's journal consumer (`tern ship`), for the journal-on system

stop_server() {
    stop_pid "$SHIP_PID"
    SHIP_PID=""
    [[ -n "$SERVER_PID" ]] || return 0
    local pid="$SERVER_PID"
    SERVER_PID=""
    # Give it 120 s to shut down cleanly, as tern-serve@.service does
    # (TimeoutStopSec): tern writes the records no consumer took to its
    # durable journal first, gigabytes after tern-ring's 1 MiB writes.
    # Then insist.
    stop_pid "$pid" "$SERVER_NAME" 120
    # What its shutdown left dirty is not the next run's to write back.
    sync
    # A journal that overflowed stopped journaling: those figures would not
    # measure the journal, so say so loudly.
    if [[ "$SERVER_NAME" == tern* && "$SERVER_NAME" != tern-nojournal && "$SERVER_NAME" != tern-overflow &&
        -n "${TERN_STATE_DIR:-}" ]] &&
        "$TERN" --state "$TERN_STATE_DIR" journal dump bench --header 2>/dev/null | grep -q "mode Overflow"; then
        log "WARNING: $SERVER_NAME's journal overflowed during ${CURRENT_WORKLOAD:-this run}: its consumer fell behind (or its ring was too small for the run), and writes after that point went to the dirty bitmap, not the journal"
        echo "$SERVER_NAME ${CURRENT_WORKLOAD:-?}" >>"$RESULTS/overflowed.txt"
        OVERFLOWED=1
    fi
}

# ---------------------------------------------------------------------------
# Dirty-page thresholds. The kernel starts writing a file's dirty pages back
# at a share of the memory it could use for them, and throttles writers at a
# larger share. A journal ring is in-memory (tmpfs) and not such memory, so
# tern-ring's ring, sized to hold a whole run without a consumer (12 GiB;
# a deployment's default is 1 GiB, drained by `tern ship`), halves both
# thresholds for tern-ring alone: 1 MiB writes then meet background writeback
# of the 2 GiB image that no other server meets. Measured (2026-11-29, 12 GiB
# of tmpfs allocated beside the server, thresholds not pinned): nbdkit lost
# 20% on seq-write, and nothing once they were pinned.
# ---------------------------------------------------------------------------
DIRTY_SAVED=""
pin_dirty_thresholds() {
    local page bytes background
    page="$(getconf PAGESIZE)"
    bytes=$(( $(awk '$1 == "nr_dirty_threshold" {print $2}' /proc/vmstat) * page ))
    background=$(( $(awk '$1 == "nr_dirty_background_threshold" {print $2}' /proc/vmstat) * page ))
    if ((bytes == 0 || background == 0)); then
        log "WARNING: /proc/vmstat gives no dirty thresholds; not pinning them"; return
    fi
    DIRTY_SAVED="$(cat /proc/sys/vm/dirty_bytes /proc/sys/vm/dirty_ratio \
                       /proc/sys/vm/dirty_background_bytes /proc/sys/vm/dirty_background_ratio | tr '\n' ' ')"
    if ! { echo "$background" >/proc/sys/vm/dirty_background_bytes && echo "$bytes" >/proc/sys/vm/dirty_bytes; } 2>/dev/null; then
        log "WARNING: cannot set vm.dirty_bytes (not root?); thresholds not pinned, tern-ring's seq-write runs with lower ones"
        restore_dirty_thresholds; return
    fi
    DIRTY_PINNED="$((bytes >> 20)) MiB (background $((background >> 20)) MiB)"
    log "dirty-page thresholds pinned for the run: $DIRTY_PINNED"
}
restore_dirty_thresholds() {
    [[ -n "$DIRTY_SAVED" ]] || return 0
    local b r bb br
    read -r b r bb br <<<"$DIRTY_SAVED"
    # Each pair is one setting: writing one of its forms clears the other.
    if ((b > 0)); then echo "$b" >/proc/sys/vm/dirty_bytes; else echo "$r" >/proc/sys/vm/dirty_ratio; fi
    if ((bb > 0)); then echo "$bb" >/proc/sys/vm/dirty_background_bytes; else echo "$br" >/proc/sys/vm/dirty_background_ratio; fi
    DIRTY_SAVED=""
}
DIRTY_PINNED="not pinned"

# Never leave a server behind, whatever way we exit (fio: timeout relays
# the signal to it).
on_exit '[[ -z $FIO_PID ]] || { log "cleanup: stopping fio (pid $FIO_PID)"; stop_pid "$FIO_PID"; }'
on_exit '[[ -z $SERVER_PID ]] || { log "cleanup: stopping $SERVER_NAME (pid $SERVER_PID)"; stop_server; }'
on_exit 'rm -rf "$TERN_RING_DIR"'
on_exit 'restore_dirty_thresholds || log "WARNING: could not restore the dirty-page settings: $DIRTY_SAVED (bytes ratio background_bytes background_ratio)"'
trap_interrupts

# Wait for the server's unix socket, then check the export is reachable and
# has the expected size. Returns non-zero (with a message) on failure.
wait_ready() {
    local sock="$1" logf="$2" uri
    uri="nbd+unix:///$EXPORT?socket=$sock"
    wait_for_socket "$sock" "$SOCK_WAIT" "$logf" "$SERVER_PID" "$SERVER_NAME" || return 1
    case "$SERVER_NAME" in
        tern | tern-ring | tern-overflow)
            # tern maps its journal ring in the background once listening;
            # measure the steady state, not those first seconds.
            wait_for_log "$logf" "journal ring mapped" 120 ||
                log "warning: $SERVER_NAME did not map its ring within 120 s; this run includes the mapping ($logf)" ;;
    esac
    if ((HAVE_NBDINFO)); then
        # The socket can appear slightly before accept() works; retried.
        local size
        if ! size=$(export_size "$uri" "$logf"); then
            log "$SERVER_NAME: socket exists but export '$EXPORT' is not reachable via $uri"
            tail -n 20 "$logf" >&2 || true
            return 1
        fi
        if [[ "$size" != "$IMG_BYTES" ]]; then
            log "$SERVER_NAME: export size is $size bytes, expected $IMG_BYTES"
            return 1
        fi
    fi
    return 0
}

# tern-ring's ring for a workload: room for the whole run, and no more.
ring_size() {
    case "$1" in
        seq-write) echo "$TERN_RING_SIZE" ;;
        *) echo "$TERN_RING_SIZE_4K" ;;
    esac
}

# start_server SYSTEM DIR LOGFILE -> sets SERVER_PID, SOCK; tern starts a
# VM for the workload in NEXT_WORKLOAD
start_server() {
    local sys="$1" dir="$2" logf="$3"
    SOCK="$dir/nbd.sock"
    SERVER_NAME="$sys"
    rm -f "$SOCK"
    case "$sys" in
        tern|tern-nojournal|tern-overflow|tern-ring)
            # Fresh state dir per start; the journal lives inside it.
            # tern-overflow: a 64 KiB journal and no consumer, so after the
            # first few writes every write goes to the dirty bitmap (the
            # "ring full, carry on at full speed" path).
            local state="$dir/state"
            TERN_STATE_DIR="$state"
            rm -rf "$TERN_RING_DIR"   # the previous VM's ring
            mkdir -p "$state" "$dir/cache" "$dir/target"
            local enable=("$TERN" --state "$state" enable bench
                          --disk "$EXPORT=$IMG" --cache "$dir/cache" --target "$dir/target"
                          --journal-size "$(case $sys in tern-overflow) echo 64KiB ;; tern-ring) ring_size "$NEXT_WORKLOAD" ;;
                                            *) echo "$TERN_JOURNAL_SIZE" ;; esac)")
            echo "+ ${enable[*]}" >>"$logf"
            if ! "${enable[@]}" >>"$logf" 2>&1; then
                log "$sys: 'tern enable' failed; last log lines:"
                tail -n 20 "$logf" >&2 || true
                return 1
            fi
            if [[ "$sys" == tern || "$sys" == tern-ring ]]; then
                # The initial sync (the whole image, marked dirty by enable)
                # is not what this benchmark measures: ship it first, then
                # drop the segments so the cache does not grow per workload.
                echo "+ $TERN --state $state ship bench --once" >>"$logf"
                "$TERN" --state "$state" ship bench --once >>"$logf" 2>&1 || { log "tern: initial sync failed"; return 1; }
                rm -rf "$dir/cache/bench"
            fi
            local serve=("$TERN" --state "$state" serve bench --listen "unix:$SOCK")
            [[ "$sys" == tern-nojournal ]] && serve+=(--no-journal)
            echo "+ ${serve[*]}" >>"$logf"
            "${serve[@]}" >>"$logf" 2>&1 &
            SERVER_PID=$!
            if [[ "$sys" == tern ]]; then
                # Journal on means the shipper runs beside it, as in
                # production: it reads and verifies every record, compresses
                # it (zstd -1) into segments in the cache and frees the ring.
                local ship=("$TERN" --state "$state" ship bench)
                echo "+ ${ship[*]}" >>"$logf"
                "${ship[@]}" >>"$logf" 2>&1 &
                SHIP_PID=$!
            fi
            wait_ready "$SOCK" "$logf"
            return
            ;;
        qemu-nbd)
            # -e/--shared 8: allow several simultaneous connections (4conn
            # workload); -t: keep serving after fio disconnects between jobs.
            local cmd=(qemu-nbd -f raw -k "$SOCK" -x "$EXPORT" --cache=writeback
                       --aio=threads --shared=8 -t "$IMG")
            echo "+ ${cmd[*]}" >>"$logf"
            "${cmd[@]}" >>"$logf" 2>&1 &
            ;;
        nbdkit)
            local cmd=(nbdkit -U "$SOCK" -e "$EXPORT" --foreground)
            [[ -n "$NBDKIT_THREADS" ]] && cmd+=(-t "$NBDKIT_THREADS")
            cmd+=(file "$IMG")
            echo "+ ${cmd[*]}" >>"$logf"
            "${cmd[@]}" >>"$logf" 2>&1 &
            ;;
    esac
    SERVER_PID=$!
    wait_ready "$SOCK" "$logf"
}

# ---------------------------------------------------------------------------
# The image: 2 GiB of fully written random data, created once and reused by
# every system (servers are restarted, the image is not copied).
# ---------------------------------------------------------------------------
if [[ "$FRESH_IMAGE" == 1 || ! -f "$IMG" || "$(stat -c %s "$IMG")" != "$IMG_BYTES" ]]; then
    log "creating 2 GiB random image $IMG"
    # Random data so nobody can shortcut zeroes/sparse holes; fsync so the
    # first system measured doesn't pay for writeback of the image itself.
    dd if=/dev/urandom of="$IMG.tmp" bs=1M count=2048 conv=fsync status=none
    mv "$IMG.tmp" "$IMG"
else
    log "reusing existing 2 GiB image $IMG (FRESH_IMAGE=1 to recreate)"
fi

# ---------------------------------------------------------------------------
# Environment description for the summary header.
# ---------------------------------------------------------------------------
CPU_MODEL="$(cpu_model)"
TERN_VER="n/a"
if [[ -x "$TERN" ]]; then
    TERN_VER="$(timeout 5 "$TERN" --version 2>/dev/null | head -n1 || true)"
    TERN_GIT="$(git -C "$BENCH_ROOT" rev-parse --short HEAD 2>/dev/null || echo uncommitted)"
    TERN_VER="${TERN_VER:-tern} (git $TERN_GIT)"
fi
if [[ "$PIN_DIRTY" == 1 ]]; then pin_dirty_thresholds; fi
{
    echo "date=$(date -Iseconds)"
    echo "nproc=$(nproc)"
    echo "kernel=$(uname -r)"
    echo "cpu=$CPU_MODEL"
    echo "fio=$(tool_version fio)"
    echo "qemu_nbd=$(tool_version qemu-nbd)"
    echo "nbdkit=$(tool_version nbdkit)"
    echo "tern=$TERN_VER"
    echo "command=$CMDLINE"
    echo "systems=${SELECTED[*]}"
    echo "workloads=$WORKLOADS"
    echo "rounds=$ROUNDS"
    echo "runtime=$RUNTIME"
    echo "ramp=$RAMP"
    echo "nbdkit_threads=${NBDKIT_THREADS:-default}"
    echo "dirty_thresholds=$DIRTY_PINNED"
    echo "results=$RESULTS"
} >"$RESULTS/meta.env"

# ---------------------------------------------------------------------------
# Main loop: ROUNDS interleaved rounds. Within a round every system runs
# every workload; the system order is rotated each round so slow drifts of
# the (noisy) machine don't systematically favour whoever runs first.
# ---------------------------------------------------------------------------
FAILURES=0
log "systems: ${SELECTED[*]}; workloads: $WORKLOADS; ${ROUNDS} round(s) × ${RUNTIME}s (+${RAMP}s ramp)"
log "results: $RESULTS"

for ((r = 1; r <= ROUNDS; r++)); do
    for sys in $(rotate $((r - 1)) "${SELECTED[@]}"); do
        dir="$RUNTMP/r$r-$sys"
        rm -rf "$dir"; mkdir -p "$dir"
        slog="$LOGS/r$r-$sys-server.log"

        if [[ "$DROP_CACHES" == 1 ]]; then
            drop_caches || log "WARNING: could not drop caches"
        fi

        log "round $r/$ROUNDS: starting $sys"
        read -r NEXT_WORKLOAD _ <<<"$WORKLOADS"
        if ! start_server "$sys" "$dir" "$slog"; then
            log "round $r: $sys failed to start (log: $slog); skipping its workloads this round"
            stop_server
            for w in $WORKLOADS; do printf '%s\t%s\t%s\t%s\t%s\n' "$r" "$sys" "$w" server-failed - >>"$MANIFEST"; done
            FAILURES=$((FAILURES + 1))
            rm -rf "$dir"
            continue
        fi

        uri="nbd+unix:///$EXPORT?socket=$SOCK"
        server_dead=0
        first_workload=1
        for w in $WORKLOADS; do
            # tern gets a fresh VM (and empty journal) per workload, so an
            # overflow in one workload cannot leave the next unjournaled;
            # stop_server reports any overflow against this workload.
            if [[ "$sys" == tern* ]] && ((!first_workload)) && ((!server_dead)); then
                stop_server
                rm -rf "$dir"; mkdir -p "$dir"
                NEXT_WORKLOAD="$w"
                if ! start_server "$sys" "$dir" "$slog"; then server_dead=1; fi
                uri="nbd+unix:///$EXPORT?socket=$SOCK"
            fi
            first_workload=0
            CURRENT_WORKLOAD="$w"
            if ((server_dead)); then
                # Don't run (and time out) against a dead server; record it.
                printf '%s\t%s\t%s\t%s\t%s\n' "$r" "$sys" "$w" skipped-server-died - >>"$MANIFEST"
                continue
            fi
            out="$RESULTS/r$r-$sys-$w.json"
            flog="$LOGS/r$r-$sys-$w.fio.log"
            # shellcheck disable=SC2086  # WL_OPTS is a deliberate word list
            args=(--name="$w" --ioengine=nbd --uri="$uri" --size=2g
                  ${WL_OPTS[$w]}
                  --time_based --runtime="$RUNTIME" --ramp_time="$RAMP"
                  --group_reporting --output-format=json --output="$out")
            echo "+ fio ${args[*]}" >"$flog"
            # Hard timeout so a wedged server can't hang the benchmark. fio
            # runs in the background and we `wait` for it because bash only
            # runs the INT/TERM trap after a *foreground* child exits (and
            # `timeout` puts fio in its own process group, out of Ctrl-C's
            # reach); `wait` is interrupted at once, and cleanup stops fio.
            status=ok
            timeout --kill-after=10 $((RUNTIME + RAMP + 120)) fio "${args[@]}" >>"$flog" 2>&1 &
            FIO_PID=$!
            if ! wait "$FIO_PID"; then status=fio-failed; fi
            # A crashed server is the more useful diagnosis than fio's error.
            if ! kill -0 "$SERVER_PID" 2>/dev/null; then status=server-died; fi
            if [[ "$status" == ok ]]; then
                log "  $sys $w done"
            else
                log "  $sys $w: $status (fio log: $flog)"; tail -n 5 "$flog" >&2 || true
                FAILURES=$((FAILURES + 1))
            fi
            FIO_PID=""
            printf '%s\t%s\t%s\t%s\t%s\n' "$r" "$sys" "$w" "$status" "$out" >>"$MANIFEST"
            # Flush dirty page cache now, so the next run (possibly another
            # system) doesn't pay for this run's writeback.
            sync
            if [[ "$status" == server-died ]]; then
                log "  $sys died; see $slog; skipping its remaining workloads this round"
                tail -n 10 "$slog" >&2 || true
                server_dead=1
            fi
        done

        stop_server
        log "round $r/$ROUNDS: stopped $sys"
        rm -rf "$dir"   # tern state/cache/target can be large
    done
done

# ---------------------------------------------------------------------------
# Summary: medians over rounds, Markdown + JSON.
# ---------------------------------------------------------------------------
bench_py - "$RESULTS" "$WORK" <<'PYEOF'
import os, sys
from benchlib import fio_job, median as med, read_env, spread, write_summary

results, work = sys.argv[1], sys.argv[2]
meta = read_env(os.path.join(results, "meta.env"))
systems = meta["systems"].split()
workloads = meta["workloads"].split()
DESC = {
    "seq-write": "1 MiB seq write, QD8",
    "randwrite-qd1": "4 KiB rand write, QD1",
    "randwrite-qd32": "4 KiB rand write, QD32",
    "randread-qd32": "4 KiB rand read, QD32",
    "randrw-70-30": "4 KiB 70/30 rand read/write, QD32",
    "4conn-qd8": "4 KiB rand write, 4 conns × QD8",
    "4conn-flush": "4 KiB rand write, 4 conns × QD8, FLUSH every 8 writes",
}

def pct(side, p):
    perc = side.get("clat_ns", {}).get("percentile") or {}
    v = perc.get(p)
    return None if v is None else v / 1000.0  # ns -> µs

def extract(path):
    job = fio_job(path)  # group_reporting => one aggregated entry
    if job.get("error"):
        raise ValueError(f"fio job error {job['error']}")
    rd, wr = job["read"], job["write"]
    m = {
        "mibps": (rd["bw_bytes"] + wr["bw_bytes"]) / 1048576.0,
        "iops": rd["iops"] + wr["iops"],
        "read_iops": rd["iops"], "write_iops": wr["iops"],
        "read_p50_us": pct(rd, "50.000000") if rd["total_ios"] else None,
        "read_p99_us": pct(rd, "99.000000") if rd["total_ios"] else None,
        "write_p50_us": pct(wr, "50.000000") if wr["total_ios"] else None,
        "write_p99_us": pct(wr, "99.000000") if wr["total_ios"] else None,
    }
    if m["iops"] <= 0:
        raise ValueError("zero IOPS")
    return m

runs = []
with open(os.path.join(results, "manifest.tsv")) as f:
    for line in f:
        rnd, sysname, wl, status, path = line.rstrip("\n").split("\t")
        run = {"round": int(rnd), "system": sysname, "workload": wl, "status": status,
               "file": None if path == "-" else os.path.relpath(path, results)}
        if status == "ok":
            try:
                run["metrics"] = extract(path)
            except Exception as e:  # keep going; mark as failed
                run["status"] = f"parse-failed: {e}"
        runs.append(run)

KEYS = ["mibps", "iops", "read_iops", "write_iops",
        "read_p50_us", "read_p99_us", "write_p50_us", "write_p99_us"]
summary = {}
for wl in workloads:
    summary[wl] = {}
    for s in systems:
        ok = [r["metrics"] for r in runs
              if r["workload"] == wl and r["system"] == s and "metrics" in r]
        total = sum(1 for r in runs if r["workload"] == wl and r["system"] == s)
        cell = {"ok_runs": len(ok), "runs": total}
        for k in KEYS:
            cell[k] = med([m[k] for m in ok])
        cell["iops_min"] = min((m["iops"] for m in ok), default=None)
        cell["iops_max"] = max((m["iops"] for m in ok), default=None)
        summary[wl][s] = cell

def f_us(v):
    if v is None: return "–"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"

def fmt_cell(wl, c):
    if not c["ok_runs"]:
        return f"FAILED (0/{c['runs']})"
    s = f"{c['iops']:,.0f} IOPS · {c['mibps']:,.1f} MiB/s"
    has_r = c["read_p50_us"] is not None
    has_w = c["write_p50_us"] is not None
    if has_r and has_w:  # mixed: both sides
        s += (f" · p50 r{f_us(c['read_p50_us'])}/w{f_us(c['write_p50_us'])} µs"
              f" · p99 r{f_us(c['read_p99_us'])}/w{f_us(c['write_p99_us'])} µs")
    else:
        side = "read" if has_r else "write"
        s += f" · p50 {f_us(c[side + '_p50_us'])} µs · p99 {f_us(c[side + '_p99_us'])} µs"
    if c["ok_runs"] < c["runs"]:
        s += f" ({c['ok_runs']}/{c['runs']} ok)"
    return s

rounds = int(meta["rounds"])
lines = []
lines.append("# NBD server benchmark (fio nbd engine)")
lines.append("")
lines.append(f"- date: {meta['date']} · nproc: {meta['nproc']} · kernel: {meta['kernel']} · CPU: {meta['cpu']}")
lines.append(f"- {meta['fio']} · {meta['qemu_nbd']} · {meta['nbdkit']} · tern: {meta['tern']}")
lines.append(f"- command: `{meta['command']}`")
lines.append(f"- 2 GiB random raw image, unix socket, {rounds} interleaved round(s) × "
             f"{meta['runtime']} s (+{meta['ramp']} s ramp) per run; nbdkit threads: {meta['nbdkit_threads']}; "
             f"dirty-page thresholds: {meta.get('dirty_thresholds', 'not recorded')}; "
             f"cells are medians over rounds; latency = fio completion latency "
             f"(write side for write jobs, read side for reads, r/w both for the mix)")
lines.append("")
lines.append("| workload | " + " | ".join(systems) + " |")
lines.append("|---|" + "---|" * len(systems))
for wl in workloads:
    row = [f"**{wl}** ({DESC.get(wl, '')})"]
    row += [fmt_cell(wl, summary[wl][s]) for s in systems]
    lines.append("| " + " | ".join(row) + " |")
if rounds > 1:
    # Spread across rounds, to judge whether differences exceed the noise.
    lines.append("")
    lines.append("IOPS range over rounds (min – max):")
    lines.append("")
    lines.append("| workload | " + " | ".join(systems) + " |")
    lines.append("|---|" + "---|" * len(systems))
    for wl in workloads:
        row = [wl]
        for s in systems:
            c = summary[wl][s]
            row.append(spread([c["iops_min"], c["iops_max"]], lambda v: f"{v:,.0f}", " – "))
        lines.append("| " + " | ".join(row) + " |")
bad = [r for r in runs if r["status"] != "ok"]
if bad:
    lines.append("")
    lines.append("Failed runs: " + ", ".join(f"r{r['round']} {r['system']} {r['workload']} ({r['status']})" for r in bad))
md = "\n".join(lines) + "\n"

write_summary(md, {"meta": meta, "summary": summary, "runs": runs}, (work, results))
sys.stdout.write(md)
PYEOF

log "wrote $WORK/summary.md and $WORK/summary.json (raw fio JSON in $RESULTS)"
if ((FAILURES > 0)); then
    log "$FAILURES run(s)/start(s) failed; see $LOGS"
    exit 1
fi
