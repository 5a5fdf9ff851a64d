#!/usr/bin/env bash
# check-units.sh — `systemd-analyze verify` of tern's units as
# scripts/install.sh installs them (into a scratch root): the templates as
# instances, and tern-apply@ with the mounts drop-in `install.sh apply`
# writes. ExecStart is pointed at the built binary (verify checks that it
# exists). systemd-analyze exits 0 on warnings, so any output counts as a
# failure here. Then each unit's hardening: its exposure score from
# `systemd-analyze security` at most 5.0.
set -euo pipefail
# shellcheck source=lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"
cd "$BENCH_ROOT"
BENCH_NAME=check-units.sh BENCH_LOG=plain BENCH_ERROR=""   # check-units.sh: ...
TERN=${TERN:-$PWD/target/release/tern}
need_tern
need_tools systemd-analyze
root=$(mktemp -d)
on_exit 'rm -rf "$root"'
ROOT=$root TERN=$TERN scripts/install.sh 2>/dev/null
ROOT=$root scripts/install.sh apply site-a --cache /srv/tern/cache --target /srv/tern/target 2>/dev/null
units=$root/etc/systemd/system
sed -i "s|/usr/local/bin/tern|$TERN|" "$units"/*.service
grep -q '^RequiresMountsFor=/srv/tern/target /srv/tern/cache$' "$units/tern-apply@site-a.service.d/mounts.conf" ||
    die "install.sh apply wrote no RequiresMountsFor for the target and the cache"
[[ $(stat -c %a "$root/etc/tern/apply/site-a.env") == 600 ]] || die "install.sh apply left site-a.env readable by others"
instances=(tern-serve@vm1.service tern-ship@vm1.service tern-apply@site-a.service tern-group@shop.service)
out=$(SYSTEMD_UNIT_PATH=$units: systemd-analyze verify "${instances[@]}" 2>&1) || { echo "$out" >&2; exit 1; }
if [[ -n $out ]]; then
    log "systemd-analyze verify complained:"
    echo "$out" >&2
    exit 1
fi
# Hardening: systemd's own exposure score (0 best, 10 worst; 9.6 before
# the units were hardened) must stay in its "OK" band.
scores=()
for i in "${instances[@]}"; do
    cp "$units/${i%%@*}@.service" "$root/$i"
    score=$(systemd-analyze security --offline=true --no-pager "$root/$i" 2>&1 |
        sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
    [[ -n $score ]] || die "systemd-analyze security gave no score for $i"
    awk -v s="$score" 'BEGIN { exit !(s <= 5.0) }' || die "$i: exposure $score, above 5.0 (systemd-analyze security --offline=true)"
    scores+=("$i $score")
done
echo "check-units.sh: ${#instances[@]} units as installed verified (${instances[*]}); exposure: $(IFS=,; echo "${scores[*]}")"
