# scripts/lib/bench.sh — what the bench and test scripts share (issue 19).
#
# Sourced, first thing after `set -euo pipefail` (before the script's `cd`):
#     # shellcheck source=lib/bench.sh
#     source "$(dirname "$0")/lib/bench.sh"
# (scripts/.shellcheckrc lets shellcheck follow it.) It sets a few variables
# and defines functions; it runs nothing. It owns:
#
#   Messages   log, die, step. BENCH_NAME [the script's name, less .sh]
#              prefixes them; BENCH_LOG picks the form: local (the default),
#              "[name HH:MM:SS] msg" in local time; utc, the same in UTC;
#              plain, "name: msg". die says "BENCH_ERROR [error]: msg" and
#              exits 1. step prints "=== what" (after an empty line if
#              BENCH_STEP_GAP=1).
#   Teardown   on_exit CMD: CMD runs at exit, after the CMDs registered
#              before it, each whatever the others did (one EXIT trap);
#              trap_interrupts: INT and TERM say "interrupted" and exit 130
#              (for scripts that wait for background jobs); stop_pid.
#   Checks     need_root, need_tools, need_fio_nbd, need_tern.
#   The binary build_tern (TERN given: that one; else cargo build --release
#              -q), tern_snapshot (a copy a rebuild cannot swap), fingerprint
#              (version.txt: tree, binary, kernel, tools), tool_version,
#              machine_desc, cpu_model, knob_command (the command that
#              reproduces a run), make_results (STAMP, RESULTS).
#   Measuring  drop_caches, timed and since (wall seconds), rotate (who goes
#              first in each interleaved round).
#   Servers    wait_for_socket (a server listening), wait_for_log,
#              export_size (nbdinfo).
#   Loop fs    loop_fs, umount_loop, umount_loops.
#   Python     bench_py (python3 with scripts/lib on its path, for inline
#              `bench_py - <<EOF` blocks), bytes (sizes), json_get; the
#              Python helpers themselves are in scripts/lib/benchlib.py.
#
# Exports BENCH_LIB (this directory) and LC_NUMERIC=C (a dot in
# $EPOCHREALTIME and in printf's numbers, whatever the locale).

# shellcheck shell=bash
# The variables it sets (T_WALL, STAMP, RESULTS, TERN_SRC) are the scripts'.
# shellcheck disable=SC2034

BENCH_LIB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BENCH_ROOT=$(cd "$BENCH_LIB/../.." && pwd)
export BENCH_LIB LC_NUMERIC=C
BENCH_NAME=${0##*/}
BENCH_NAME=${BENCH_NAME%.sh}
# Whether the caller gave TERN (build_tern then builds nothing), read before
# the script sets its default.
BENCH_TERN_GIVEN=${TERN:+1}

# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------
log() {
    case ${BENCH_LOG:-local} in
        plain) printf '%s: %s\n' "$BENCH_NAME" "$*" >&2 ;;
        utc) TZ=UTC0 printf '[%s %(%H:%M:%S)T] %s\n' "$BENCH_NAME" -1 "$*" >&2 ;;
        *) printf '[%s %(%H:%M:%S)T] %s\n' "$BENCH_NAME" -1 "$*" >&2 ;;
    esac
}
die() {
    local what=${BENCH_ERROR-error}
    log "${what:+$what: }$*"
    exit 1
}
step() {
    [[ ${BENCH_STEP_GAP:-0} != 1 ]] || echo
    printf '=== %s\n' "$*"
}

# ---------------------------------------------------------------------------
# Teardown
# ---------------------------------------------------------------------------
BENCH_ON_EXIT=()
# on_exit CMD: CMD (eval'd) at exit, after those registered before it. Each
# runs whatever the others did; the script's exit status stays its own.
on_exit() {
    BENCH_ON_EXIT+=("$1")
    trap _bench_exit EXIT
}
_bench_exit() {
    local rc=$? cmd
    trap - EXIT INT TERM
    set +eu   # a step that fails, or names a variable never set, stops no other
    for cmd in "${BENCH_ON_EXIT[@]}"; do eval "$cmd" || true; done
    exit "$rc"
}
# bash runs a trap only once the foreground child exits: scripts that run
# their long jobs in the background and `wait` for them get Ctrl-C at once.
trap_interrupts() { trap 'log "interrupted"; exit 130' INT TERM; }

# stop_pid PID [NAME [SECONDS]]: SIGTERM to PID (empty: nothing to stop), and
# wait for it. With SECONDS: SIGKILL if it still runs after them.
stop_pid() {
    local pid=${1:-} name=${2:-} secs=${3:-} i
    [[ -n $pid ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        if [[ -n $secs ]]; then
            for ((i = 0; i < secs * 10; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            if kill -0 "$pid" 2>/dev/null; then
                log "WARNING: ${name:-process} (pid $pid) ignored SIGTERM for ${secs}s; sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
            fi
        fi
    fi
    wait "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------
need_root() { [[ $EUID -eq 0 ]] || die "run as root${1:+ ($1)}"; }
need_tools() {
    local t
    for t in "$@"; do command -v "$t" >/dev/null || die "missing $t: run scripts/install-deps.sh"; done
}
need_fio_nbd() {
    need_tools fio
    fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no 'nbd' ioengine (install fio built with libnbd)"
}
need_tern() { [[ -x $TERN ]] || die "no tern binary at $TERN (cargo build --release, or set TERN=)"; }

# ---------------------------------------------------------------------------
# The binary, and what was measured
# ---------------------------------------------------------------------------
# build_tern [LOG [TRIES]]: TERN given by the caller: that binary, never
# rebuilt. Otherwise `cargo build --release -q` (output to LOG if given;
# TRIES [1] attempts a minute apart, since another build may hold the tree,
# and then the existing binary); the script's TERN is target/release/tern.
build_tern() {
    [[ -z ${BENCH_TERN_GIVEN:-} ]] || return 0
    local logf=${1:-} tries=${2:-1} attempt
    for ((attempt = 1; ; attempt++)); do
        if [[ -n $logf ]]; then
            (cd "$BENCH_ROOT" && cargo build --release -q) >>"$logf" 2>&1 && return 0
        else
            (cd "$BENCH_ROOT" && cargo build --release -q) >&2 && return 0
        fi
        ((tries > 1)) || die "cargo build --release failed${logf:+ (see $logf)}"
        log "cargo build --release failed (attempt $attempt; another engineer mid-edit?)${logf:+, see $logf}"
        if ((attempt == tries)); then
            log "using the existing $TERN"
            return 0
        fi
        sleep 60
    done
}

# tern_snapshot PATH: TERN copied to PATH and measured from there, so a
# `cargo build` during the run cannot swap it; TERN_SRC is the original.
tern_snapshot() {
    cp "$TERN" "$1" || return
    TERN_SRC=$TERN
    TERN=$1
}

# tool_version TOOL: the first line of TOOL's version (-V for the e2fsprogs
# and xfsprogs tools), or n/a if it is not installed.
tool_version() {
    local flag=--version
    command -v "$1" >/dev/null || { echo n/a; return 0; }
    case $1 in mkfs.ext4 | mke2fs | e2fsck | filefrag | mkfs.xfs | xfs_*) flag=-V ;; esac
    ("$1" "$flag" 2>&1 || true) | head -n1
}

# fingerprint FILE [TOOL...]: what was measured, into FILE: the tree (git
# rev-parse HEAD, git status --porcelain), the binary (sha256sum of TERN),
# the kernel (uname -r), then "TOOL: version" for each TOOL.
fingerprint() {
    local file=$1 t
    shift
    {
        git -C "$BENCH_ROOT" rev-parse HEAD || true
        git -C "$BENCH_ROOT" status --porcelain || true
        sha256sum "$TERN" || true
        uname -r
        for t in "$@"; do echo "$t: $(tool_version "$t")"; done
    } >"$file" 2>&1
}

# machine_desc: "N CPUs, M GiB, kernel K".
machine_desc() {
    echo "$(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), kernel $(uname -r)"
}
cpu_model() {
    local m
    m=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)
    [[ -n $m ]] || m=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n1 || true)
    echo "$m"
}

# shq WORD: WORD bare if that is safe for a shell, else in single quotes
# (readable, unlike printf %q's backslashes).
shq() {
    if [[ $1 =~ ^[A-Za-z0-9_./:=+,@%-]+$ ]]; then printf '%s' "$1"
    else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
# knob_command SCRIPT KNOB... [-- ARG...]: the command that reproduces this
# run: the knobs among KNOB that the caller set (so: call it before the
# defaults are applied), SCRIPT, and its arguments.
knob_command() {
    local out="" k a
    local script=$1
    shift
    while (($#)) && [[ $1 != -- ]]; do
        k=$1
        shift
        if [[ -n ${!k+x} ]]; then out+="$k=$(shq "${!k}") "; fi
    done
    out+=$script
    (($#)) && shift
    for a in "$@"; do out+=" $(shq "$a")"; done
    printf '%s' "$out"
}

# make_results: STAMP (UTC) and the directory RESULTS=$WORK/results-$STAMP.
make_results() {
    STAMP=$(date -u +%Y%m%dT%H%M%SZ)
    RESULTS=$WORK/results-$STAMP
    mkdir -p "$RESULTS"
}

# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# since T0: seconds from T0 (an $EPOCHREALTIME) to now.
since() { echo "$EPOCHREALTIME - $1" | bc; }

# timed OUT ERR CMD...: runs CMD, its output to OUT and ERR; T_WALL = its
# wall seconds. Returns CMD's status.
T_WALL=0
timed() {
    local out=$1 err=$2 t0=$EPOCHREALTIME rc=0
    shift 2
    "$@" >"$out" 2>"$err" || rc=$?
    T_WALL=$(since "$t0")
    return $rc
}

# rotate K ITEM...: the items rotated left by K. Round r of an interleaved
# benchmark runs `rotate $((r - 1)) A B C`: each takes its turn at going
# first, so slow drifts of a noisy machine favour none of them.
rotate() {
    local k=$1
    shift
    (($#)) || return 0
    k=$((k % $#))
    echo "${@:k+1}" "${@:1:k}"
}

# ---------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------
# wait_for_socket SOCK SECONDS LOG [PID [WHO]]: until SOCK exists (the server
# listens). 1, after LOG's last lines, if PID exits first or SECONDS pass.
wait_for_socket() {
    local sock=$1 secs=$2 logf=$3 pid=${4:-} who=${5:-tern serve}
    local deadline=$((SECONDS + secs))
    while [[ ! -S $sock ]]; do
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            log "$who exited before creating $sock; last log lines:"
            tail -n 20 "$logf" >&2 || true
            return 1
        fi
        if ((SECONDS >= deadline)); then
            log "$who did not create $sock within ${secs}s; last log lines:"
            tail -n 20 "$logf" >&2 || true
            return 1
        fi
        sleep 0.1
    done
}

# wait_for_log LOG PATTERN SECONDS: until LOG has a line matching PATTERN
# (such as tern serve's "journal ring mapped"); 1 if not within SECONDS.
wait_for_log() {
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        grep -q -- "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    grep -q -- "$2" "$1" 2>/dev/null
}

# export_size URI LOG: the NBD export's size in bytes (nbdinfo, its errors
# to LOG), retried for 5 s: a socket can appear just before its server
# accepts. 1 if it never answers.
export_size() {
    local size i
    for ((i = 0; i < 50; i++)); do
        size=$(timeout 10 nbdinfo --size "$1" 2>>"$2") && { echo "$size"; return 0; }
        sleep 0.1
    done
    return 1
}

# ---------------------------------------------------------------------------
# Loop-mounted filesystems
# ---------------------------------------------------------------------------
BENCH_MOUNTS=()
# loop_fs FS IMG MNT [OPTIONS [MKFS_ARG...]]: a fresh FS (btrfs, xfs, ext4)
# made on IMG (the caller makes IMG, at its size), loop-mounted at MNT
# (mount -o loop[,OPTIONS]). umount_loops unmounts it at the latest.
loop_fs() {
    local fs=$1 img=$2 mnt=$3 opts=${4:-}
    shift 3
    (($# == 0)) || shift
    case $fs in
        ext4) mkfs.ext4 -q -F "$@" "$img" >/dev/null || return ;;
        *) "mkfs.$fs" -q -f "$@" "$img" >/dev/null || return ;;
    esac
    mkdir -p "$mnt" || return
    mount -o "loop${opts:+,$opts}" "$img" "$mnt" || return
    BENCH_MOUNTS+=("$mnt")
}
# umount_loop MNT: unmounted now, and no longer umount_loops' concern.
umount_loop() {
    local m keep=()
    umount "$1" || return
    for m in "${BENCH_MOUNTS[@]}"; do [[ $m == "$1" ]] || keep+=("$m"); done
    BENCH_MOUNTS=("${keep[@]}")
}
# umount_loops: every loop_fs mount still mounted (lazily if busy), for
# on_exit; BENCH_MOUNTS keeps the list, for the steps after it.
umount_loops() {
    local m
    for m in "${BENCH_MOUNTS[@]}"; do
        mountpoint -q "$m" 2>/dev/null || continue
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
}

# ---------------------------------------------------------------------------
# Python
# ---------------------------------------------------------------------------
# bench_py ARG...: python3 (PY if the script set one) with scripts/lib on its
# path: inline blocks `bench_py - ARG... <<'EOF'` can `from benchlib import`
# (and leave no __pycache__ in the tree).
bench_py() {
    PYTHONPATH="$BENCH_LIB${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1 "${PY:-python3}" "$@"
}
# bytes SIZE: SIZE (2g, 64m, 256MiB, 4096) in bytes; binary suffixes.
bytes() { "${PY:-python3}" "$BENCH_LIB/benchlib.py" size "$1"; }
# json_get FILE KEY: a top-level value of a JSON file; 1 if there is none.
json_get() { "${PY:-python3}" "$BENCH_LIB/benchlib.py" get "$1" "$2"; }
