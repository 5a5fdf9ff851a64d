#!/usr/bin/env bash
# bench-group.sh — what a group point costs the writers (issue 22), and
# how soon it exists at the target.
#
# Per member count in MEMBERS: that many VMs in one state directory, each
# served (`tern serve`, its own process) and shipped into a directory
# cache, with `tern apply` running at the target (all on a btrfs loop
# file system); fio writes 4 KiB at
# random at queue depth 4 to every member at once (the nbd engine, one job
# per VM). Two runs of RUNTIME seconds each, in turn, ROUNDS times: with a
# group point cut every INTERVAL (`tern tag --group`) and without. Reported:
#   held     how long the cut kept the barriers closed (first closed to
#            last opened), as `tern tag --group` prints it: the most any
#            write waited for it; p50 / p99 / max over every cut
#   write    fio's write completion latency, p99 and max over the jobs,
#            with cuts and without (the writers' view)
#   lag      from a cut to its group point listed at the target (`tern
#            points --group`, polled every 0.2 s), p50 / max over the cuts
#
# Usage: scripts/bench-group.sh
# Knobs [defaults]: MEMBERS ["2 8"], RUNTIME [15], INTERVAL [0.5] (s),
#   ROUNDS [2], WORK [/var/tmp/tern-bench-group], TERN [built first].
set -euo pipefail
# shellcheck source=lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"
cd "$BENCH_ROOT"
MEMBERS=${MEMBERS:-"2 8"}
RUNTIME=${RUNTIME:-15}
INTERVAL=${INTERVAL:-0.5}
ROUNDS=${ROUNDS:-2}
WORK=${WORK:-/var/tmp/tern-bench-group}
TERN=${TERN:-target/release/tern}

need_fio_nbd
need_tools python3
build_tern
need_tern
mkdir -p "$WORK"
make_results
tern_snapshot "$RESULTS/tern"
fingerprint "$RESULTS/version.txt" fio
TERN=$RESULTS/tern
export TERN_RING_DIR=/dev/shm/tern-bench-group
PIDS=()
on_exit 'for p in "${PIDS[@]}"; do stop_pid "$p" tern 30; done; rm -rf "$TERN_RING_DIR"'
trap_interrupts
# Images, cache and target on btrfs (reflinked points, as a target should
# have them), a loop file under WORK.
MNT=$WORK/mnt
on_exit umount_loops
on_exit 'rm -f "$WORK/fs.img"'
truncate -s 40G "$WORK/fs.img"
loop_fs btrfs "$WORK/fs.img" "$MNT"

TSV=$RESULTS/runs.tsv
printf 'members\tround\tcuts\tmetric\tvalue_ms\n' >"$TSV"

# one_run N ROUND CUTS(0|1): fio on N served VMs, cutting group points or not.
one_run() {
    local n=$1 round=$2 cuts=$3 run=$MNT/run vms=() i
    for p in "${PIDS[@]}"; do stop_pid "$p" tern 30; done
    PIDS=()
    rm -rf "$run" "$TERN_RING_DIR"
    mkdir -p "$run/cache" "$run/target"
    for ((i = 1; i <= n; i++)); do
        vms+=("vm$i")
        truncate -s 256M "$run/vm$i.img"
        "$TERN" -q --state "$run/state" enable "vm$i" --disk "disk0=$run/vm$i.img" --cache "$run/cache" \
            --target "$run/target" --journal-size 128MiB >/dev/null
    done
    "$TERN" -q --state "$run/state" group create g "${vms[@]}" >/dev/null
    local jobs=()
    for vm in "${vms[@]}"; do
        "$TERN" --state "$run/state" serve "$vm" --listen "unix:$run/$vm.sock" 2>"$run/serve-$vm.log" &
        PIDS+=($!)
        wait_for_socket "$run/$vm.sock" 20 "$run/serve-$vm.log" "$!" || die "tern serve $vm did not start"
        "$TERN" --state "$run/state" ship "$vm" 2>"$run/ship-$vm.log" &
        PIDS+=($!)
        jobs+=(--name="$vm" --uri="nbd+unix:///disk0?socket=$run/$vm.sock")
    done
    "$TERN" apply --cache "$run/cache" --target "$run/target" 2>"$run/apply.log" &
    PIDS+=($!)
    fio --ioengine=nbd --rw=randwrite --bs=4k --iodepth=4 --time_based --runtime="$RUNTIME" --size=256m \
        --randrepeat=0 --output-format=json --output="$RESULTS/fio-$n-$round-$cuts.json" "${jobs[@]}" &
    local fio=$! cut=0 poller=""
    if [[ $cuts == 1 ]]; then
        # When each group point is first listed at the target (every 0.2 s).
        (
            while :; do
                "$TERN" points --group g --target "$run/target" --json 2>/dev/null |
                    grep -o '"id": "[0-9]*"' | tr -dc '0-9\n' | sed "s/^/$EPOCHREALTIME /" || true
                sleep 0.2
            done
        ) >>"$RESULTS/listed-$n-$round.txt" &
        poller=$!
        PIDS+=("$poller")
        sleep 1
        while kill -0 "$fio" 2>/dev/null; do
            cut=$((cut + 1))
            # "... writes held 0.85 ms" and when it was cut
            if out=$("$TERN" --state "$run/state" tag --group g "cut-$cut" 2>&1); then
                echo "$EPOCHREALTIME $out" >>"$RESULTS/cuts-$n-$round.txt"
            else
                echo "$EPOCHREALTIME FAILED $out" >>"$RESULTS/cuts-$n-$round.txt"
            fi
            sleep "$INTERVAL"
        done
    fi
    wait "$fio" || die "fio failed ($n members, round $round)"
    if [[ -n $poller ]]; then
        sleep 10 # the last cuts reach the target
        stop_pid "$poller"
    fi
}

for n in $MEMBERS; do
    for ((round = 1; round <= ROUNDS; round++)); do
        for cuts in $(rotate "$round" 1 0); do
            log "$n members, round $round, $([[ $cuts == 1 ]] && echo "cutting every ${INTERVAL}s" || echo "no cuts")"
            one_run "$n" "$round" "$cuts"
        done
    done
done
for p in "${PIDS[@]}"; do stop_pid "$p" tern 30; done
PIDS=()

log "results in $RESULTS (command: $(knob_command scripts/bench-group.sh MEMBERS RUNTIME INTERVAL ROUNDS))"
bench_py - "$RESULTS" "$MEMBERS" "$ROUNDS" <<'EOF' | tee "$RESULTS/summary.txt"
import glob, json, os, re, sys
res, members, rounds = sys.argv[1], sys.argv[2].split(), int(sys.argv[3])

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")

print(f"{'members':>7} {'cuts':>5} {'held p50/p99/max ms':>22} {'write p99 ms (cuts / none)':>28} {'write max ms (cuts / none)':>28} {'lag p50/max s':>14}")
for n in members:
    held, failed, lags = [], 0, []
    for r in range(1, rounds + 1):
        path = f"{res}/cuts-{n}-{r}.txt"
        if not os.path.exists(path):
            continue
        cut_at = {}
        for line in open(path):
            t, rest = line.split(" ", 1)
            m = re.search(r"group point (\d+).*writes held ([0-9.]+) ms", rest)
            if not m:
                failed += 1
                continue
            held.append(float(m.group(2)))
            cut_at[m.group(1)] = float(t)
        # lag: a group point's id is the cut's time in ms; when the
        # target first listed it (polled every 0.2 s).
        seen = {}
        path = f"{res}/listed-{n}-{r}.txt"
        if os.path.exists(path):
            for line in open(path):
                t, pid = line.split()
                seen.setdefault(pid, float(t))
        lags += [seen[pid] - int(pid) / 1000 for pid in cut_at if pid in seen]
    def lat(cuts):
        p99s, maxes = [], []
        for f in glob.glob(f"{res}/fio-{n}-*-{cuts}.json"):
            for job in json.load(open(f))["jobs"]:
                cl = job["write"]["clat_ns"]
                p99s.append(cl["percentile"]["99.000000"] / 1e6)
                maxes.append(cl["max"] / 1e6)
        return max(p99s), max(maxes)
    (cp99, cmax), (np99, nmax) = lat(1), lat(0)
    lag = f"{pct(lags, 50):.1f}/{max(lags):.1f}" if lags else "-"
    print(f"{n:>7} {len(held):>5} {pct(held, 50):>8.2f}/{pct(held, 99):.2f}/{max(held):.2f} "
          f"{cp99:>13.2f} / {np99:<12.2f} {cmax:>13.1f} / {nmax:<12.1f} {lag:>14}"
          + (f"  ({failed} cuts failed)" if failed else ""))
EOF
