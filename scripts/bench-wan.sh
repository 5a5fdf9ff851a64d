#!/usr/bin/env bash
# bench-wan.sh — two sites across the emulated WAN of the tests (issue 20):
# the source host, the target host and a SeaweedFS each in a network
# namespace, links of 50 ms round trip, 100 Mbit/s and 1% loss each way
# (`tern-wan up`, tests/src/wan.rs: tbf, iptables loss, an NFQUEUE delay
# line; this kernel has no netem).
#
# Parts (PARTS, all by default):
#   sync      per round, a fresh VM on a SIZE image (half random, half zero
#             4 KiB blocks) at the source host: its initial sync shipped
#             (`tern ship --once`) into the bucket across the WAN and, in
#             the same round, into a directory on the source host; the
#             bucket's then applied at the target host (`tern apply
#             --once`). MB/s of disk; bytes sent per byte written.
#   failover  per round, on a WAN of its own: a VM (FAILOVER_SIZE) served
#             and shipped at the source, applied at the target; fio writes
#             WRITE_MB through NBD; once the replica equals the source, the
#             source host is destroyed (every process in its namespace
#             killed, its link and namespace deleted) and `tern failover
#             --latest` at the target is timed; the failed-over disk must
#             equal the source image.
#   lag       scripts/bench-ship.sh's lag part with the VM at the source host
#             and its cache in the bucket: fio at each of RATES, without and
#             with `tern ship --max-rate MAX_RATE`. Lag = a record's age when
#             its segment is stored in the bucket: what losing the source
#             host would lose (the RPO at the store).
#
# Usage (root): scripts/bench-wan.sh
#   PARTS=failover ROUNDS=1 scripts/bench-wan.sh
# Knobs [defaults]: PARTS ["sync failover lag"], SIZE [256m], ROUNDS [2],
#   FAILOVER_SIZE [128m], FAILOVER_ROUNDS [3], WRITE_MB [64], RATES
#   ["20m 80m"], RUNTIME [30], MAX_RATE [5MB/s], LAG_SIZE [512MiB],
#   SEGMENT_SIZE (`tern enable --segment-size`, every part) [tern's default],
#   WORK [/var/tmp/tern-bench-wan], TERN [target/release/tern; built first].
set -euo pipefail
# shellcheck source=lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"
cd "$BENCH_ROOT"
PARTS=${PARTS:-"sync failover lag"}
SIZE=${SIZE:-256m}
ROUNDS=${ROUNDS:-2}
FAILOVER_SIZE=${FAILOVER_SIZE:-128m}
FAILOVER_ROUNDS=${FAILOVER_ROUNDS:-3}
WRITE_MB=${WRITE_MB:-64}
RATES=${RATES:-"20m 80m"}
RUNTIME=${RUNTIME:-30}
MAX_RATE=${MAX_RATE:-5MB/s}
LAG_SIZE=${LAG_SIZE:-512MiB}
WORK=${WORK:-/var/tmp/tern-bench-wan}
TERN=${TERN:-target/release/tern}
WAN_BIN=target/release/tern-wan
ENABLE_ARGS=()
[[ -z ${SEGMENT_SIZE:-} ]] || ENABLE_ARGS=(--segment-size "$SEGMENT_SIZE")

need_root "network namespaces"
need_tools python3 fio ip iptables ethtool tc
need_fio_nbd
build_tern
need_tern
cargo build --release -q -p tern-system-tests --bin tern-wan
scripts/stores.sh install >/dev/null
eval "$(scripts/stores.sh env)" # the credentials; the WAN runs a SeaweedFS of its own
mkdir -p "$WORK"
make_results
tern_snapshot "$RESULTS/tern"
fingerprint "$RESULTS/version.txt"
trap_interrupts
export TERN_RING_DIR=/dev/shm/tern-bench-wan
has_part() { [[ " $PARTS " == *" $1 "* ]]; }

# wan_up TAG: the WAN (namespaces TAG-src, TAG-tgt, TAG-store), held until
# wan_down. SRC and TGT prefix a command to run it at either site.
WAN_PID="" WAN_FD=""
wan_up() {
    local tag=$1 fifo=$WORK/wan.fifo
    rm -rf "$fifo" "$WORK/store-$tag"
    mkfifo "$fifo"
    TERN_WAN_DIR=$WORK/store-$tag "$WAN_BIN" up "$tag" <"$fifo" >"$RESULTS/wan-$tag.log" 2>&1 &
    WAN_PID=$!
    exec {WAN_FD}>"$fifo" # its standard input: closed, it takes the WAN down
    local deadline=$((SECONDS + 90))
    until grep -q '^ready' "$RESULTS/wan-$tag.log"; do
        kill -0 "$WAN_PID" 2>/dev/null || die "tern-wan up failed: $(tail -n 3 "$RESULTS/wan-$tag.log")"
        ((SECONDS < deadline)) || die "the WAN did not come up in 90 s ($RESULTS/wan-$tag.log)"
        sleep 0.5
    done
    SRC=(ip netns exec "$tag-src" env AWS_ENDPOINT_URL=http://10.77.1.2:8333)
    TGT=(ip netns exec "$tag-tgt" env AWS_ENDPOINT_URL=http://10.77.2.2:8333)
}
wan_down() {
    [[ -n $WAN_PID ]] || return 0
    exec {WAN_FD}>&-
    wait "$WAN_PID" || true
    WAN_PID=""
}
on_exit 'wan_down; rm -rf "$WORK/run" "$TERN_RING_DIR"'

# image PATH SIZE: half random, half zero 4 KiB blocks (zstd halves it).
image() {
    [[ -f $1 && $(stat -c %s "$1") == $(bytes "$2") ]] && return 0
    log "making a $2 image, half random, half zeros: $1"
    python3 - "$1" "$(bytes "$2")" <<'PY'
import os, sys
path, size = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    for i in range(size // 4096):
        f.write(os.urandom(4096) if i % 2 else bytes(4096))
PY
}

TSV=$RESULTS/runs.tsv
printf 'part\tround\tstep\tstore\tbytes\tseconds\tsent\n' >"$TSV"

if has_part sync; then
    step "sync: the initial sync of $SIZE across the WAN and into a directory"
    image "$WORK/image.raw" "$SIZE"
    wan_up bw
    for r in $(seq "$ROUNDS"); do
        for store in $(rotate $((r - 1)) s3 dir); do
            rm -rf "$WORK/run" "$TERN_RING_DIR"
            mkdir -p "$WORK/run/cache" "$WORK/run/target"
            cp --reflink=auto "$WORK/image.raw" "$WORK/run/disk0.img"
            cache=$WORK/run/cache
            [[ $store == s3 ]] && cache=s3://tern-test/sync-$$-$r
            "${SRC[@]}" "$TERN" -q --state "$WORK/run/state" enable vm --disk "disk0=$WORK/run/disk0.img" \
                --cache "$cache" --target "$WORK/run/target" --journal-size 256MiB "${ENABLE_ARGS[@]}" >/dev/null
            drop_caches
            timed "$RESULTS/sync-$r-$store.out" "$RESULTS/sync-$r-$store.log" \
                "${SRC[@]}" "$TERN" --state "$WORK/run/state" ship vm --once ||
                die "round $r, $store: ship failed ($RESULTS/sync-$r-$store.log)"
            sent=$(json_get "$WORK/run/state/vm/ship.json" bytes_out)
            printf 'sync\t%s\tship\t%s\t%s\t%s\t%s\n' "$r" "$store" "$(stat -c %s "$WORK/image.raw")" "$T_WALL" "$sent" >>"$TSV"
            log "round $r, $store: shipped in ${T_WALL}s ($sent bytes sent)"
            [[ $store == s3 ]] || continue
            drop_caches
            timed "$RESULTS/apply-$r.out" "$RESULTS/apply-$r.log" \
                "${TGT[@]}" "$TERN" apply --cache "$cache" --target "$WORK/run/target" vm --once ||
                die "round $r: apply failed ($RESULTS/apply-$r.log)"
            cmp -s "$WORK/image.raw" "$WORK/run/target/vm/replica/disk0.img" || die "round $r: the replica differs from the source"
            printf 'sync\t%s\tapply\t%s\t%s\t%s\t%s\n' "$r" "$store" "$(stat -c %s "$WORK/image.raw")" "$T_WALL" "$sent" >>"$TSV"
            log "round $r: applied at the target in ${T_WALL}s (the replica equals the source)"
        done
    done
    wan_down
fi

if has_part failover; then
    step "failover: the source host destroyed, the target fails over alone"
    image "$WORK/failover.raw" "$FAILOVER_SIZE"
    for r in $(seq "$FAILOVER_ROUNDS"); do
        wan_up bwf
        run=$WORK/run
        rm -rf "$run" "$TERN_RING_DIR"
        mkdir -p "$run/target"
        cp --reflink=auto "$WORK/failover.raw" "$run/disk0.img"
        cache=s3://tern-test/failover-$$-$r
        "${SRC[@]}" "$TERN" -q --state "$run/state" enable vm --disk "disk0=$run/disk0.img" \
            --cache "$cache" --target "$run/target" --journal-size 256MiB "${ENABLE_ARGS[@]}" >/dev/null
        "${SRC[@]}" "$TERN" --state "$run/state" ship vm --once 2>"$RESULTS/failover-$r-sync.log"
        "${TGT[@]}" "$TERN" apply --cache "$cache" --target "$run/target" 2>"$RESULTS/failover-$r-apply.log" &
        apply_pid=$!
        "${SRC[@]}" "$TERN" --state "$run/state" serve vm --listen "unix:$run/nbd.sock" 2>"$RESULTS/failover-$r-serve.log" &
        serve_pid=$!
        "${SRC[@]}" "$TERN" --state "$run/state" ship vm 2>"$RESULTS/failover-$r-ship.log" &
        wait_for_socket "$run/nbd.sock" 30 "$RESULTS/failover-$r-serve.log" "$serve_pid"
        fio --name=failover --ioengine=nbd --uri="nbd+unix:///disk0?socket=$run/nbd.sock" --rw=randwrite \
            --bs=64k --iodepth=8 --size="${WRITE_MB}m" --io_size="${WRITE_MB}m" --buffer_compress_percentage=50 \
            --refill_buffers >"$RESULTS/failover-$r-fio.log" 2>&1
        t0=$EPOCHREALTIME
        until cmp -s "$run/disk0.img" "$run/target/vm/replica/disk0.img"; do
            (($(echo "$(since "$t0") < 600" | bc))) || die "round $r: the replica never caught up"
            sleep 0.5
        done
        caught_up=$(since "$t0")
        # The source host gone: its processes, its link, its namespace.
        for pid in $(ip netns pids bwf-src); do kill -9 "$pid" 2>/dev/null || true; done
        ip -n bwf-store link delete src0
        ip netns delete bwf-src
        wait "$serve_pid" 2>/dev/null || true
        timed "$RESULTS/failover-$r.json" "$RESULTS/failover-$r.log" \
            "${TGT[@]}" "$TERN" --state "$run/state-b" failover vm --latest --json --cache "$cache" --target "$run/target" ||
            die "round $r: the failover failed ($RESULTS/failover-$r.log)"
        disk=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["disks"]["disk0"])' "$RESULTS/failover-$r.json")
        cmp -s "$run/disk0.img" "$disk" || die "round $r: the failed-over disk differs from the source"
        printf 'failover\t%s\tfailover\ts3\t%s\t%s\t%s\n' "$r" "$((WRITE_MB << 20))" "$T_WALL" "$caught_up" >>"$TSV"
        log "round $r: caught up ${caught_up}s after fio; failover without the source host in ${T_WALL}s (disk equals the source)"
        stop_pid "$apply_pid" "tern apply" 30
        wan_down
    done
fi

if has_part lag; then
    step "lag: fio at $RATES through tern serve at the source, the cache across the WAN"
    wan_up bw
    for limit in none "$MAX_RATE"; do
        extra=""
        [[ $limit == none ]] || extra="--max-rate $limit"
        name=${limit//\//-}
        log "lag with ship ${extra:-unlimited}"
        PARTS=lag SIZE=$LAG_SIZE RATES=$RATES RUNTIME=$RUNTIME LAG_NETNS=bw-src \
            LAG_CACHE=s3://tern-test/lag-$$-$name LAG_SHIP_ARGS=$extra LAG_ENABLE_ARGS="${ENABLE_ARGS[*]}" \
            AWS_ENDPOINT_URL=http://10.77.1.2:8333 \
            WORK=$WORK/lag-$name TERN=$RESULTS/tern scripts/bench-ship.sh >"$RESULTS/lag-$name.log" 2>&1 ||
            log "  bench-ship.sh reported a failure ($RESULTS/lag-$name.log)"
        cp "$WORK/lag-$name/summary.json" "$RESULTS/lag-$name.json"
        printf 'lag\t-\t%s\ts3\t-\t-\t%s\n' "$limit" "$RESULTS/lag-$name.json" >>"$TSV"
    done
    wan_down
fi

bench_py - "$TSV" "$SIZE" "$WRITE_MB" "${SEGMENT_SIZE:-8MiB (the default)}" <<'PY' | tee "$RESULTS/summary.md"
import json, sys
from benchlib import median_spread, read_tsv, fnum
rows = read_tsv(sys.argv[1])
print(f"segment size {sys.argv[4]}\n")
sync = [r for r in rows if r["part"] == "sync"]
if sync:
    print(f"initial sync of a {sys.argv[2]} disk (half random, half zeros), MB/s of disk, median (min–max)\n")
    print("| where | ship | apply at the target | bytes sent per byte written |")
    print("|---|---:|---:|---:|")
    for store, name in (("s3", "SeaweedFS across the WAN"), ("dir", "a directory on the source host")):
        cells = []
        for step in ("ship", "apply"):
            got = [int(r["bytes"]) / float(r["seconds"]) / 1e6 for r in sync if r["store"] == store and r["step"] == step]
            cells.append(median_spread(got, lambda v: f"{v:.1f}") if got else "—")
        ratio = [int(r["sent"]) / int(r["bytes"]) for r in sync if r["store"] == store and r["step"] == "ship"]
        cells.append(median_spread(ratio, lambda v: f"{v:.2f}"))
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
fo = [r for r in rows if r["part"] == "failover"]
if fo:
    secs = [float(r["seconds"]) for r in fo]
    caught = [float(r["sent"]) for r in fo]
    print(f"failover at the target with the source host destroyed, after {sys.argv[3]} MiB of writes: "
          f"{median_spread(secs, lambda v: f'{v:.1f}')} s (`tern failover --latest`; {len(fo)} rounds); "
          f"the replica had caught up {median_spread(caught, lambda v: f'{v:.1f}')} s after fio ended\n")
lag = [r for r in rows if r["part"] == "lag"]
if lag:
    print("| fio --rate | tern ship | fio wrote MB/s | shipped MB/s | ratio | lag p50 ms | lag p99 ms | lag max ms | overflow | drain after fio s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in lag:
        data = json.load(open(r["sent"]))
        for x in data.get("lag", []):
            ship = "unlimited" if r["step"] == "none" else f"--max-rate {r['step']}"
            print(f"| {x['rate']} | {ship} | {fnum(x.get('fio_mb_s'), 1)} | {fnum(x.get('ship_mb_s_during'), 1)} | "
                  f"{fnum(x.get('ratio'), 2)} | {fnum(x.get('lag_p50_ms'), 0)} | {fnum(x.get('lag_p99_ms'), 0)} | "
                  f"{fnum(x.get('lag_max_ms'), 0)} | {'yes' if x.get('overflow') else 'no'} | {fnum(x.get('drain_s'), 1)} |")
PY
log "results in $RESULTS"
