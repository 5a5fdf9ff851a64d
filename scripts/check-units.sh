#!/usr/bin/env bash
# check-units.sh — `systemd-analyze verify` of tern's unit files
# (dist/systemd/), with ExecStart pointed at the built binary (verify
# checks that it exists). systemd-analyze exits 0 on warnings, so any
# output counts as a failure here.
set -euo pipefail
# shellcheck source=lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"
cd "$BENCH_ROOT"
BENCH_NAME=check-units.sh BENCH_LOG=plain BENCH_ERROR=""   # check-units.sh: ...
TERN=${TERN:-$PWD/target/release/tern}
need_tern
need_tools systemd-analyze
dir=$(mktemp -d)
on_exit 'rm -rf "$dir"'
for unit in dist/systemd/*.service; do
    name=$(basename "$unit")
    name=${name/@.service/@vm1.service}   # a template is checked as an instance
    sed "s|/usr/local/bin/tern|$TERN|" "$unit" >"$dir/$name"
done
out=$(systemd-analyze verify "$dir"/*.service 2>&1) || { echo "$out" >&2; exit 1; }
if [[ -n $out ]]; then
    log "systemd-analyze verify complained:"
    echo "$out" >&2
    exit 1
fi
echo "check-units.sh: $(ls "$dir" | wc -l) unit files verified"
