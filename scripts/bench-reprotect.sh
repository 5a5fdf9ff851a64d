#!/usr/bin/env bash
# bench-reprotect.sh — re-protect after a failover (issue 5): time and bytes
# shipped when RP_PERCENT of the disk changed, against a full copy and
# against the bytes that changed.
#
# For each filesystem in RP_FS (loop-mounted, fresh) and each CHUNK:REGION
# in RP_CASES: a dense RP_SIZE disk of random bytes is protected (enable,
# ship --once, apply --once), fails over for real and is committed; then
# the old source and the failed-over disk each get RP_PERCENT/2 % of the
# disk rewritten in CHUNK-sized pieces at random aligned offsets (the two
# sets never overlap). Timed: `tern reprotect` (at the failover site, its
# own --state, --region-size REGION), the first sync back (`tern ship
# --once` with `tern apply` answering the hash request beside it), and the
# apply of what it sent. The replica back must equal the failed-over disk.
#
# Usage (root: loop mounts, drop_caches):
#   scripts/bench-reprotect.sh
#   RP_FS=btrfs RP_CASES="64k:64k" RP_SIZE=256m scripts/bench-reprotect.sh
#
# Knobs [defaults]: RP_FS ["btrfs xfs"], RP_SIZE [2g], RP_PERCENT [1],
#   RP_CASES ["64k:64k 4k:64k 4k:4k"], FS_SIZE [16G], WORK
#   [/var/tmp/tern-bench-reprotect], TERN [target/release/tern].
# Output: $WORK/results-<stamp>/reprotect.tsv and summary.md (also stdout).
set -euo pipefail
# shellcheck source=lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"
cd "$BENCH_ROOT"
RP_FS=${RP_FS-"btrfs xfs"}
RP_SIZE=${RP_SIZE:-2g}
RP_PERCENT=${RP_PERCENT:-1}
RP_CASES=${RP_CASES-"64k:64k 4k:64k 4k:4k"}
FS_SIZE=${FS_SIZE:-16G}
WORK=${WORK:-/var/tmp/tern-bench-reprotect}
TERN=${TERN:-target/release/tern}
HELPER=scripts/bench-lifecycle.py

BENCH_LOG=utc
need_root "loop mounts, drop_caches"
need_tern

make_results
tern_snapshot "$RESULTS/tern"
fingerprint "$RESULTS/version.txt" mkfs.btrfs mkfs.xfs
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'), git $(git rev-parse --short HEAD)"
    echo "machine: $(machine_desc)"
    echo "command: RP_FS=\"$RP_FS\" RP_SIZE=$RP_SIZE RP_PERCENT=$RP_PERCENT RP_CASES=\"$RP_CASES\" scripts/bench-reprotect.sh"
} >"$RESULTS/run.txt"
cat "$RESULTS/run.txt" >&2

# The VMs' journal rings (memory) in a directory of this run's, removed at
# the end: deleting a state directory by hand does not free them.
export TERN_RING_DIR="/dev/shm/tern-bench-reprotect-$$"
MNT=""
APPLY_PID=""
on_exit 'rm -rf "$TERN_RING_DIR"'
on_exit 'stop_pid "$APPLY_PID"'
on_exit umount_loops
on_exit '[[ -z $MNT ]] || rm -f "$MNT.img"'

# change_disk PATH COUNT CHUNK PART: random bytes into COUNT distinct
# CHUNK-aligned blocks of PATH, from one seeded permutation split in two:
# PART 0 and PART 1 never overlap.
change_disk() {
    python3 - "$@" <<'PY'
import os, random, sys
path, count, chunk, part = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
blocks = random.Random(7).sample(range(os.path.getsize(path) // chunk), 2 * count)[part * count:(part + 1) * count]
with open(path, "r+b") as f:
    for b in blocks:
        f.seek(b * chunk)
        f.write(os.urandom(chunk))
    f.flush()
    os.fsync(f.fileno())
PY
}

TSV="$RESULTS/reprotect.tsv"
printf 'fs\tsize\tchunk\tregion\tchanged\tregions_differ\tsent\tsegments\tfull_copy_compressed\treprotect_s\tfirst_sync_s\tapply_s\n' >"$TSV"

# one_case FS CHUNK REGION
one_case() {
    local fs="$1" chunk="$2" region="$3"
    MNT="$WORK/mnt"
    umount "$MNT" 2>/dev/null || true
    rm -f "$MNT.img"; truncate -s "$FS_SIZE" "$MNT.img"
    loop_fs "$fs" "$MNT.img" "$MNT"
    local d="$MNT" size_b chunk_b
    size_b=$(bytes "$RP_SIZE"); chunk_b=$(bytes "$chunk")
    mkdir -p "$d/a" "$d/cache" "$d/target" "$d/cache2" "$d/target2"
    python3 "$HELPER" fill "$d/a/disk0.img" --size "$RP_SIZE" --data "$RP_SIZE" --chunk 1m
    "$TERN" --state "$d/state-a" -q enable vm --disk "disk0=$d/a/disk0.img" --cache "$d/cache" --target "$d/target"
    "$TERN" --state "$d/state-a" -q ship vm --once 2>>"$d/ship-a.log"
    local full_out
    full_out=$(json_get "$d/state-a/vm/ship.json" bytes_out)
    "$TERN" -q apply --cache "$d/cache" --target "$d/target" vm --once 2>>"$d/apply-a.log"
    "$TERN" --state "$d/state-a" -q failover vm >/dev/null
    "$TERN" --state "$d/state-a" -q commit vm >/dev/null
    local count=$(( size_b * RP_PERCENT / 100 / 2 / chunk_b ))
    change_disk "$d/a/disk0.img" "$count" "$chunk_b" 0
    change_disk "$d/target/vm/failover/active/disk0.img" "$count" "$chunk_b" 1
    local changed=$(( 2 * count * chunk_b ))
    drop_caches
    timed "$RESULTS/reprotect.out" "$RESULTS/reprotect.err" "$TERN" --state "$d/state-b" reprotect vm \
        --cache "$d/cache2" --target "$d/target2" --from-target "$d/target" --from-cache "$d/cache" \
        --region-size "$region" || die "reprotect failed: $(cat "$RESULTS/reprotect.err")"
    local t_reprotect=$T_WALL
    "$TERN" apply --keep-segments --cache "$d/cache2" --target "$d/target2" vm 2>"$RESULTS/apply-back-$fs-$chunk-$region.log" &
    APPLY_PID=$!
    timed "$RESULTS/ship.out" "$RESULTS/ship-back-$fs-$chunk-$region.log" "$TERN" --state "$d/state-b" ship vm \
        --once --checksum-timeout 30m || die "the first sync back failed"
    local t_ship=$T_WALL
    stop_pid "$APPLY_PID"; APPLY_PID=""
    timed "$RESULTS/apply.out" "$RESULTS/apply.err" "$TERN" apply --keep-segments --once --cache "$d/cache2" \
        --target "$d/target2" vm || die "applying the sync back failed"
    local t_apply=$T_WALL
    cmp "$d/target2/vm/replica/disk0.img" "$d/target/vm/failover/active/disk0.img" \
        || die "$fs $chunk:$region: the replica back differs from the failed-over disk"
    local differ sent segments
    differ=$(grep -o '[0-9]* of [0-9]* regions differ' "$RESULTS/ship-back-$fs-$chunk-$region.log" | head -1 | cut -d' ' -f1)
    sent=$(json_get "$d/state-b/vm/ship.json" bytes_in)
    segments=$(du -sb --apparent-size "$d/cache2/vm/segments" | cut -f1)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$fs" "$size_b" "$chunk_b" "$(bytes "$region")" \
        "$changed" "$differ" "$sent" "$segments" "$full_out" "$t_reprotect" "$t_ship" "$t_apply" >>"$TSV"
    log "$fs $RP_SIZE, ${RP_PERCENT}% changed in $chunk pieces, region $region: changed $changed B, $differ regions differ, sent $sent B ($segments B of segments; the full copy was $full_out B compressed); reprotect ${t_reprotect}s, first sync ${t_ship}s, apply ${t_apply}s"
    umount_loop "$MNT"; rm -f "$MNT.img"; MNT=""
}

for fs in $RP_FS; do
    for c in $RP_CASES; do
        one_case "$fs" "${c%%:*}" "${c##*:}"
    done
done

bench_py - "$TSV" <<'PY' | tee "$RESULTS/summary.md"
import sys
from benchlib import read_tsv
rows = read_tsv(sys.argv[1])
mib = lambda b: f"{int(b) / 2**20:,.1f} MiB"
print("| fs | changed | pieces | region | regions differ | sent (uncompressed) | sent / changed | segments (compressed) | full copy (compressed) | reprotect | first sync | apply |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    ratio = int(r["sent"]) / int(r["changed"])
    print(f"| {r['fs']} | {mib(r['changed'])} of {int(r['size']) / 2**30:g} GiB | {int(r['chunk']) // 1024} KiB | "
          f"{int(r['region']) // 1024} KiB | {r['regions_differ']} | {mib(r['sent'])} | {ratio:.2f}× | {mib(r['segments'])} | "
          f"{mib(r['full_copy_compressed'])} | {float(r['reprotect_s']):.2f} s | {float(r['first_sync_s']):.2f} s | {float(r['apply_s']):.2f} s |")
PY
log "results in $RESULTS"
