#!/usr/bin/env bash
# check-units.sh — `systemd-analyze verify` of tern's unit files
# (dist/systemd/), with ExecStart pointed at the built binary (verify
# checks that it exists). systemd-analyze exits 0 on warnings, so any
# output counts as a failure here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TERN=${TERN:-$PWD/target/release/tern}
[[ -x $TERN ]] || { echo "check-units.sh: build tern first ($TERN)" >&2; exit 1; }
command -v systemd-analyze >/dev/null || { echo "check-units.sh: systemd-analyze missing" >&2; exit 1; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for unit in dist/systemd/*.service; do
    name=$(basename "$unit")
    name=${name/@.service/@vm1.service}   # a template is checked as an instance
    sed "s|/usr/local/bin/tern|$TERN|" "$unit" >"$dir/$name"
done
out=$(systemd-analyze verify "$dir"/*.service 2>&1) || { echo "$out" >&2; exit 1; }
if [[ -n $out ]]; then
    echo "check-units.sh: systemd-analyze verify complained:" >&2
    echo "$out" >&2
    exit 1
fi
echo "check-units.sh: $(ls "$dir" | wc -l) unit files verified"
