#!/usr/bin/env bash
# fuzz-nbd.sh — runs the cargo-fuzz targets of tern (fuzz/):
#   connection  a whole NBD connection (handshake + transmission) in front
#               of a real mirror, the fuzzer's bytes being the client's side
#               (after a byte that picks the server's threads); the journal
#               is then shipped and resynced, checking every record
#   request     the pure parsers: Request::parse, validate, parse_info,
#               parse_meta_context, with invariant checks
#   segment     the cache store's files: segments, block hashes, manifests
#               (each also tried with its checksums made right)
#   journal     a damaged durable journal file recovered after a crash or a
#               reboot (Mirror::open), then walked as the shipper would
#
# Usage (from anywhere; the script cds to the repo root):
#   scripts/fuzz-nbd.sh               fuzz every target for FUZZ_SECONDS
#   scripts/fuzz-nbd.sh --build-only  only build the targets (CI)
#   FUZZ_SECONDS=600 FUZZ_TARGETS=connection scripts/fuzz-nbd.sh
#
# Environment knobs (defaults in brackets):
#   FUZZ_SECONDS   libFuzzer -max_total_time per target [60]
#   FUZZ_TARGETS   targets to run, space separated
#                  ["connection request segment journal"]
#   FUZZ_TIMEOUT   seconds one input may take before it counts as a hang [10]
#   FUZZ_RSS_MB    libFuzzer -rss_limit_mb [2048]
#   FUZZ_TOOLCHAIN rustup toolchain cargo-fuzz builds with [nightly]
#
# Needs a nightly toolchain (sanitizers); installs cargo-fuzz if missing.
# The corpus grows in fuzz/corpus/<target>/, seeded from
# fuzz/seeds/<target>/: scripts/fuzz-seeds.py writes those of
# connection and request; the journal and segment targets write theirs
# (real files made by the code that writes them) when theirs are missing.
# Each target uses fuzz/<target>.dict as its dictionary if there
# is one, else nbd.dict. Crashes land in fuzz/artifacts/<target>/,
# and the libFuzzer output of each run in
# fuzz/target/fuzz-<target>.log.
# Exit status: non-zero if a build failed or any target found a crash,
# panic, timeout or out-of-memory (every target runs regardless).
set -euo pipefail
# shellcheck source=lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"
BENCH_NAME=fuzz-nbd.sh BENCH_LOG=plain BENCH_ERROR=""   # fuzz-nbd.sh: ...

cd "$BENCH_ROOT"
ROOT=$PWD
FUZZ_DIR=$ROOT/fuzz

FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZ_TARGETS=${FUZZ_TARGETS:-connection request segment journal}
FUZZ_TIMEOUT=${FUZZ_TIMEOUT:-10}
FUZZ_RSS_MB=${FUZZ_RSS_MB:-2048}
FUZZ_TOOLCHAIN=${FUZZ_TOOLCHAIN:-nightly}

build_only=0
for arg in "$@"; do
    case $arg in
        --build-only) build_only=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            log "unknown argument '$arg' (try --help)"
            exit 2
            ;;
    esac
done

if ! cargo "+$FUZZ_TOOLCHAIN" --version >/dev/null 2>&1; then
    die "no '$FUZZ_TOOLCHAIN' toolchain; install it with: rustup toolchain install $FUZZ_TOOLCHAIN"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# cargo-fuzz looks for ./fuzz, so run it from the crate it fuzzes.
fuzz() { (cd "$ROOT" && cargo "+$FUZZ_TOOLCHAIN" fuzz "$@"); }

if ((build_only)); then
    fuzz build
    exit 0
fi

if command -v python3 >/dev/null; then
    python3 scripts/fuzz-seeds.py
else
    log "no python3; using the seeds already in $FUZZ_DIR/seeds"
fi

fuzz build

# Seeds the targets write themselves: they need the build (a real mirror
# writing a journal; the store's encoders), and are made once (they carry
# timestamps, so a rerun would only churn them).
seeds_from_target() { # target, environment variable, a seed that shows they exist
    local dir=$FUZZ_DIR/seeds/$1
    if ! compgen -G "$dir/$3" >/dev/null; then
        log "writing the $1 target's seeds to $dir"
        env "$2=$dir" bash -c 'cd "$0" && cargo "+$1" fuzz run "$2" -- -runs=0' \
            "$ROOT" "$FUZZ_TOOLCHAIN" "$1"
    fi
}
seeds_from_target journal TERN_FUZZ_JOURNAL_SEEDS '*.bin'
seeds_from_target segment TERN_FUZZ_SEGMENT_SEEDS 'manifest-*'

mkdir -p "$FUZZ_DIR/target"
failed=()
for target in $FUZZ_TARGETS; do
    corpus=$FUZZ_DIR/corpus/$target
    mkdir -p "$corpus"
    if [[ -d $FUZZ_DIR/seeds/$target ]]; then
        cp -- "$FUZZ_DIR/seeds/$target"/* "$corpus/"
    fi
    dict=$FUZZ_DIR/$target.dict
    [[ -f $dict ]] || dict=$FUZZ_DIR/nbd.dict
    log=$FUZZ_DIR/target/fuzz-$target.log
    echo "== $target: ${FUZZ_SECONDS}s, corpus $corpus, log $log"
    status=0
    fuzz run "$target" "$corpus" -- \
        -max_total_time="$FUZZ_SECONDS" \
        -rss_limit_mb="$FUZZ_RSS_MB" \
        -timeout="$FUZZ_TIMEOUT" \
        -dict="$dict" \
        -print_final_stats=1 \
        2>&1 | tee "$log" || status=$?
    if ((status != 0)); then
        echo "== $target: FAILED (exit $status); artifacts:" >&2
        ls -l "$FUZZ_DIR/artifacts/$target" >&2 || true
        failed+=("$target")
    else
        # The last status line: runs, coverage, features, corpus, exec/s.
        echo "== $target: ok: $(grep -E '^#[0-9]+' "$log" | tail -n 1)"
    fi
done

if ((${#failed[@]})); then
    die "crashes found in: ${failed[*]}"
fi
