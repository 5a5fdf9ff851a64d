#!/bin/bash
# The `bench` scenario of scripts/vm-test.sh (what scripts/bench-vm.sh
# runs), inside the Debian guest: fio through tern's two front-ends and on
# a virtio disk directly, in one guest and one run; then the longest stall
# a writer sees while `tern serve --ublk` is killed with SIGKILL and
# started again.
#
#   ublk      fio -> /dev/ublkb0 -> tern serve --ublk -> an image file on
#             ext4 on /dev/vdb (virtio)
#   nbd       fio -> /dev/nbd0 (the kernel's NBD client, nbd-client -unix)
#             -> tern serve --listen unix:… -> the same image
#   virtio    fio -> /dev/vdc (virtio, raw, no filesystem)
#
# Each is measured ROUNDS times, in rotating order; the journal is drained
# by `tern ship --once` after each job (not timed).
# Results are lines `bench: …` on the console, read by the host. The ring
# (512 MiB) is drained after each job, so no job overflows it.
set -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
H=/root/harness
SCENARIO=bench
# shellcheck source=lib.sh
source "$H/tests/vm/lib.sh"
ROUNDS=2 RESTARTS=10 RUNTIME=10
for w in $(cat /proc/cmdline); do
    case $w in
    tern.rounds=*) ROUNDS=${w#*=} ;;
    tern.restarts=*) RESTARTS=${w#*=} ;;
    tern.runtime=*) RUNTIME=${w#*=} ;;
    tern.monitor=*) MONITOR=${w#*=} ;;
    esac
done
# tern.monitor=N: every N s, memory and what tern, fio and nbd-client wait
# on (to see where a run hangs).
if ((${MONITOR:-0} > 0)); then
    while sleep "$MONITOR"; do
        echo "guest: monitor: $(free -m | awk '/Mem:/ { print "used " $3 " MiB, free " $4 " MiB" }')"
        for p in $(pgrep -x 'tern|fio|nbd-client'); do
            ps -L -o pid=,tid=,stat=,wchan:24=,etimes=,comm= -p "$p" | sed 's/^/guest: monitor: /'
        done
        tail -n 2 /tmp/ship.log 2>/dev/null | sed 's/^/guest: monitor: ship.log: /'
    done &
fi
IMG=/srv/images/vm1-disk0.img
STATE=/srv/state
export TERN_RING_DIR=/dev/shm/tern

fail() {
    echo "guest: FAILED: $*"
    echo w >/proc/sysrq-trigger # the blocked tasks' stacks, on the console
    tail -n 20 /tmp/serve.log 2>/dev/null | sed 's/^/guest:   [serve] /'
    tail -n 10 /tmp/ship.log 2>/dev/null | sed 's/^/guest:   [ship] /'
    finish 1 "$*"
}
tern() { "$H/tern" -q --state "$STATE" "$@"; }

SERVE=""
serve() { # serve ARGS...: tern serve in the background until its device or socket answers
    "$H/tern" --state "$STATE" serve vm1 "$@" 2>>/tmp/serve.log &
    SERVE=$!
}
stop_serve() {
    say "stopping tern serve"
    kill -TERM "$SERVE"
    local n=0
    while kill -0 "$SERVE" 2>/dev/null; do
        n=$((n + 1)); ((n < 600)) || fail "tern serve did not stop within 60 s of SIGTERM"; sleep 0.1
    done
    wait "$SERVE" || fail "tern serve exited non-zero on SIGTERM"
}
drain() { # what was journaled, to the cache (not timed), so the ring never overflows
    local t=$SECONDS
    timeout 600 "$H/tern" --state "$STATE" ship vm1 --once --progress-interval 10s 2>&1 |
        tee -a /tmp/ship.log | grep --line-buffered -E 'waiting|resync|overflow' | sed -u 's/^/guest: ship: /'
    ((PIPESTATUS[0] == 0)) || fail "tern ship --once"
    say "drained the journal in $((SECONDS - t)) s"
}
wait_for() { # wait_for TEST...: up to 30 s
    local n=0
    until "$@"; do
        n=$((n + 1)); ((n < 300)) || fail "timed out waiting for: $*"; sleep 0.1
    done
}
readable() { dd if="$1" of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null; }

# fio_run DEV JOB: one fio job on DEV; prints "KiB/s IOPS max-latency-us".
fio_run() {
    local dev=$1 job=$2 args
    case $job in
    randwrite-4k-qd32) args=(--rw=randwrite --bs=4k --iodepth=32 --size=512m --time_based) ;;
    write-1m) args=(--rw=write --bs=1m --iodepth=4 --size=384m) ;;
    esac
    fio --name="$job" --filename="$dev" --ioengine=libaio --direct=1 --runtime="$RUNTIME" \
        --randrepeat=0 --minimal "${args[@]}" 2>/tmp/fio.err >/tmp/fio.out || { cat /tmp/fio.err; fail "fio $job on $dev"; }
    # terse v3: write KiB/s (48), IOPS (49), total latency max in us (80)
    awk -F';' '{ print $48, $49, $80 }' /tmp/fio.out
}

measure() { # measure FRONTEND
    local dev job r
    case $1 in
    ublk)
        serve --ublk
        dev=/dev/ublkb0
        wait_for readable $dev ;;
    nbd)
        serve --listen unix:/run/tern-vm1.sock
        wait_for test -S /run/tern-vm1.sock
        nbd-client -unix /run/tern-vm1.sock -N disk0 /dev/nbd0 >/tmp/nbd.log 2>&1 || { cat /tmp/nbd.log; fail "nbd-client"; }
        dev=/dev/nbd0
        wait_for readable $dev ;;
    virtio) dev=/dev/vdc ;;
    esac
    for job in randwrite-4k-qd32 write-1m; do
        r=$(fio_run "$dev" "$job")
        echo "bench: fio $job $1 $r"
        [[ $1 == virtio ]] || drain
    done
    case $1 in
    ublk) stop_serve ;;
    nbd)
        say "nbd: disconnecting"
        timeout -k 5 60 nbd-client -d /dev/nbd0 >/dev/null 2>&1 || fail "nbd-client -d"
        stop_serve ;;
    esac
}

mkfs.ext4 -q -F /dev/vdb || fail "mkfs.ext4 /dev/vdb"
mount /dev/vdb /srv || fail "mount /srv"
mkdir -p /srv/images /srv/cache /srv/target
fallocate -l 1G "$IMG" || fail "fallocate the image"
tern enable vm1 --disk "disk0=$IMG" --cache /srv/cache --target /srv/target --journal-size 512MiB ||
    fail "tern enable"
drain # the initial sync, before anything is measured

ORDER=(ublk nbd virtio)
for ((round = 1; round <= ROUNDS; round++)); do
    say "round $round: ${ORDER[*]}"
    for f in "${ORDER[@]}"; do measure "$f"; done
    ORDER=("${ORDER[@]:1}" "${ORDER[0]}")
done

# The restart: a writer (64 KiB random writes, O_DIRECT, QD 1) runs 8 s;
# at 3 s tern serve --ublk is killed with SIGKILL and started again at
# once. The writer's longest write is the stall.
serve --ublk
wait_for readable /dev/ublkb0
for ((k = 1; k <= RESTARTS; k++)); do
    fio --name=restart --filename=/dev/ublkb0 --ioengine=psync --direct=1 --rw=randwrite --bs=64k \
        --size=512m --runtime=8 --time_based --randrepeat=0 --minimal >/tmp/fio.out 2>/tmp/fio.err &
    fio=$!
    sleep 3
    kill -9 "$SERVE"
    wait "$SERVE" 2>/dev/null
    serve --ublk
    wait "$fio" || { cat /tmp/fio.err; fail "the writer failed across restart $k"; }
    err=$(awk -F';' '{ print $5 }' /tmp/fio.out)
    [[ $err == 0 ]] || fail "fio reports error $err across restart $k"
    echo "bench: restart $k $(awk -F';' '{ print $80, $49 }' /tmp/fio.out)"
    wait_for readable /dev/ublkb0
    drain
done
grep -c "re-attached" /tmp/serve.log | sed 's/^/bench: re-attached /'
# A baseline: the same writer, no restart.
fio --name=norestart --filename=/dev/ublkb0 --ioengine=psync --direct=1 --rw=randwrite --bs=64k \
    --size=512m --runtime=8 --time_based --randrepeat=0 --minimal >/tmp/fio.out 2>/tmp/fio.err ||
    fail "the baseline writer"
echo "bench: norestart $(awk -F';' '{ print $80, $49 }' /tmp/fio.out)"
kill -TERM "$SERVE" && wait "$SERVE" || fail "tern serve exited non-zero on SIGTERM"
finish 0
