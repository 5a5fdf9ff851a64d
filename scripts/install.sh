#!/usr/bin/env bash
# install.sh — installs tern as systemd services on this host.
#
#   scripts/install.sh
#       the binary (/usr/local/bin/tern, from target/release or TERN), the
#       units (/etc/systemd/system), /etc/default/tern (an existing one is
#       kept) and the README the units name (/usr/share/doc/tern).
#   scripts/install.sh apply NAME --cache CACHE --target DIR [--keys DIR]
#       one applier (a direction arriving at this site, as tern-apply@NAME):
#       /etc/tern/apply/NAME.env, and a drop-in that starts it only with the
#       target (and a directory cache) mounted. Store credentials go in
#       /etc/default/tern, or in NAME.env when they differ per direction.
#
# ROOT=DIR installs below DIR instead of / and runs no systemctl (packaging,
# and scripts/check-units.sh, which verifies what this writes).
set -euo pipefail
# shellcheck source=lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"
cd "$BENCH_ROOT"
BENCH_LOG=plain BENCH_ERROR=""
ROOT=${ROOT:-}
TERN=${TERN:-target/release/tern}
UNITS=$ROOT/etc/systemd/system

reload() {
    if [[ -z $ROOT ]]; then systemctl daemon-reload; fi
}

# mount_path PATH: PATH if it is a directory path (not a bucket URL).
mount_path() {
    case $1 in
    s3://* | az://*) ;;
    *) echo "$1" ;;
    esac
}

install_base() {
    [[ -x $TERN ]] || die "no tern binary at $TERN: run cargo build --release first, or set TERN"
    install -D -m 755 "$TERN" "$ROOT/usr/local/bin/tern"
    for unit in dist/systemd/*.service; do
        install -D -m 644 "$unit" "$UNITS/$(basename "$unit")"
    done
    if [[ -e $ROOT/etc/default/tern ]]; then
        log "kept the existing $ROOT/etc/default/tern (the new template: dist/systemd/tern.default)"
    else
        install -D -m 644 dist/systemd/tern.default "$ROOT/etc/default/tern"
    fi
    install -D -m 644 README.md "$ROOT/usr/share/doc/tern/README.md"
    if [[ -e $UNITS/tern-apply.service ]]; then
        log "$UNITS/tern-apply.service is from an older tern: each direction is now tern-apply@NAME" \
            "(scripts/install.sh apply NAME …); disable and remove the old one"
    fi
    reload
    log "installed tern $("$ROOT/usr/local/bin/tern" --version 2>/dev/null | cut -d' ' -f2) and its units;" \
        "next: systemctl enable --now tern-serve@VM tern-ship@VM at the source, scripts/install.sh apply … at the target"
}

install_apply() {
    local name=${1:-} cache="" target="" keys=""
    [[ $name =~ ^[A-Za-z0-9_.-]+$ ]] || die "usage: install.sh apply NAME --cache CACHE --target DIR [--keys DIR] (NAME: letters, digits, . _ -)"
    shift
    while (($#)); do
        case $1 in
        --cache) cache=${2:?--cache needs a value} && shift 2 ;;
        --target) target=${2:?--target needs a value} && shift 2 ;;
        --keys) keys=${2:?--keys needs a value} && shift 2 ;;
        *) die "install.sh apply: unknown argument '$1'" ;;
        esac
    done
    [[ -n $cache && -n $target ]] || die "install.sh apply $name: --cache and --target are both needed"
    for p in "$cache" "$target" "$keys"; do
        [[ $p != *[[:space:]]* ]] || die "install.sh apply $name: '$p' has white space, which a unit file cannot name"
    done
    [[ $target == /* ]] || die "install.sh apply $name: --target must be an absolute path (got '$target')"
    local dir=$ROOT/etc/tern/apply
    install -d -m 755 "$dir"
    # 0600: it may hold a store's credentials.
    (
        umask 077
        {
            echo "# tern-apply@$name: the direction arriving from $cache (scripts/install.sh apply)"
            echo "TERN_CACHE=$cache"
            echo "TERN_TARGET=$target"
            [[ -z $keys ]] || echo "TERN_KEYS=$keys"
        } >"$dir/$name.env"
    )
    local dropin=$UNITS/tern-apply@$name.service.d
    install -d -m 755 "$dropin"
    {
        echo "# The mounts holding what tern-apply@$name writes (scripts/install.sh apply)."
        echo "[Unit]"
        echo "RequiresMountsFor=$target $(mount_path "$cache")"
    } >"$dropin/mounts.conf"
    reload
    log "wrote $dir/$name.env and $dropin/mounts.conf; next: systemctl enable --now tern-apply@$name"
}

case ${1:-} in
"") install_base ;;
apply) shift && install_apply "$@" ;;
*) die "usage: install.sh | install.sh apply NAME --cache CACHE --target DIR [--keys DIR]" ;;
esac
