# What the Debian guests' scenario scripts share (sourced): how a result
# leaves the guest, and the console's line prefix. The script sets
# SCENARIO first.
# shellcheck shell=bash

# finish CODE [WHY]: prints TERN-VM-OK SCENARIO (CODE 0) or TERN-VM-FAIL,
# then powers off through isa-debug-exit (qemu exits (CODE << 1) | 1).
finish() {
    if [[ $1 == 0 ]]; then echo "TERN-VM-OK $SCENARIO"; else echo "TERN-VM-FAIL $SCENARIO: $2"; fi
    sync
    printf "\\$(printf %o "$1")" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
    systemctl poweroff --force --force
}

say() { echo "guest: $*"; }
