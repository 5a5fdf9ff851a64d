#!/bin/bash
# The `systemd` scenario of scripts/vm-test.sh, run inside a Debian guest
# whose PID 1 is systemd (as the unit tern-vm-test.service): tern installed
# by scripts/install.sh, run by its own units, as an operator would.
#
#   1. install.sh installs tern and its units; `install.sh apply local`
#      the applier of this (one-host) site; /etc/tern/serve/vm1.env asks
#      for ublk and NBD at once.
#   2. systemctl start tern-serve@vm1 tern-ship@vm1 tern-apply@local: each
#      is Type=notify, so start returns once READY: /dev/ublkb0 and the NBD
#      socket are there by then. Watchdog pings arrive.
#   3. fio writes to /dev/ublkb0 (verify=crc32c) while `systemctl kill -s
#      KILL tern-serve@vm1` kills the front-end: systemd restarts it, the
#      new one re-attaches to the device, fio sees no error, every block
#      verifies. Both front-ends serve one disk: what fio wrote reads the
#      same through the kernel's NBD client; a write through NBD reads back
#      through ublk.
#   4. systemctl stop of each unit is clean (result success, the device
#      removed), and the replica the applier unit made equals the image.
#
# Prints `TERN-VM-OK systemd` or `TERN-VM-FAIL systemd: why`, then powers
# the guest off through isa-debug-exit (qemu exits (code << 1) | 1).
set -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
H=/root/harness
SCENARIO=systemd
# shellcheck source=lib.sh
source "$H/tests/vm/lib.sh"
IMG=/srv/images/vm1-disk0.img
CACHE=/srv/tern/cache TARGET=/srv/tern/target
UNITS=(tern-serve@vm1 tern-ship@vm1 tern-apply@local)

fail() {
    echo "guest: FAILED: $*"
    for u in "${UNITS[@]}"; do
        systemctl status --no-pager --lines=0 "$u" 2>&1 | sed 's/^/guest:   /'
        journalctl --no-pager -o cat -n 15 -u "$u" 2>&1 | sed "s/^/guest:   [$u] /"
    done
    finish 1 "$*"
}
prop() { systemctl show -P "$2" "$1"; }

# --- 1. install ---------------------------------------------------------------
mkfs.ext4 -q -F /dev/vdb || fail "mkfs.ext4 /dev/vdb"
mount /dev/vdb /srv || fail "mount /srv"
mkdir -p /srv/images "$CACHE" "$TARGET"
TERN=$H/tern "$H/scripts/install.sh" >/tmp/install.log 2>&1 || { cat /tmp/install.log; fail "scripts/install.sh"; }
"$H/scripts/install.sh" apply local --cache "$CACHE" --target "$TARGET" >>/tmp/install.log 2>&1 ||
    { cat /tmp/install.log; fail "scripts/install.sh apply"; }
truncate -s 256M "$IMG"
tern -q enable vm1 --disk "disk0=$IMG" --cache "$CACHE" --target "$TARGET" --journal-size 64MiB ||
    fail "tern enable"
mkdir -p /etc/tern/serve
echo "TERN_SERVE_ARGS=--ublk --listen unix:/run/tern-vm1.sock" >/etc/tern/serve/vm1.env
say "installed: $(tern --version), units $(systemctl list-unit-files 'tern-*' --no-legend | awk '{print $1}' | xargs)"

# --- 2. start: READY means serving -------------------------------------------
systemctl start "${UNITS[@]}" || fail "systemctl start ${UNITS[*]}"
# Type=notify: start returned after READY=1, so the device is there now.
[[ -b /dev/ublkb0 ]] || fail "systemctl start returned (READY) before /dev/ublkb0 was there"
[[ -S /run/tern-vm1.sock ]] || fail "systemctl start returned (READY) before the NBD socket was there"
for u in "${UNITS[@]}"; do
    [[ $(prop "$u" Type) == notify ]] || fail "$u is not Type=notify"
    [[ $(prop "$u" ActiveState) == active ]] || fail "$u is $(prop "$u" ActiveState) after start"
    say "$u: active, status \"$(prop "$u" StatusText)\", watchdog $(prop "$u" WatchdogUSec)"
done
# The watchdog: pings arrive (a ping sets WatchdogTimestamp).
first=$(prop tern-serve@vm1 WatchdogTimestampMonotonic)
sleep 9
second=$(prop tern-serve@vm1 WatchdogTimestampMonotonic)
((second > first && first > 0)) || fail "no watchdog ping from tern-serve@vm1 in 9 s ($first, then $second)"
say "watchdog pings arrive (tern-serve@vm1: $(((second - first) / 1000)) ms between the two looks)"

# --- 3. fio under a SIGKILL of the front-end ---------------------------------
fio --name=kill --filename=/dev/ublkb0 --rw=randwrite --bs=64k --size=128m --direct=1 \
    --ioengine=libaio --iodepth=8 --verify=crc32c --verify_fatal=1 --randrepeat=0 \
    --output=/tmp/fio.log >/dev/null 2>&1 &
FIO=$!
sleep 4
kill -0 $FIO 2>/dev/null || { cat /tmp/fio.log; fail "fio was done before the kill (make it write more)"; }
pid=$(prop tern-serve@vm1 MainPID)
systemctl kill -s KILL tern-serve@vm1 || fail "systemctl kill -s KILL tern-serve@vm1"
say "killed tern-serve@vm1 (pid $pid) with SIGKILL under fio"
n=0
until [[ $(prop tern-serve@vm1 NRestarts) == 1 && $(prop tern-serve@vm1 ActiveState) == active ]]; do
    n=$((n + 1))
    ((n < 600)) || fail "tern-serve@vm1 did not come back within 60 s: $(prop tern-serve@vm1 ActiveState)"
    sleep 0.1
done
[[ $(prop tern-serve@vm1 MainPID) != "$pid" ]] || fail "tern-serve@vm1 has its old pid"
[[ -b /dev/ublkb0 ]] || fail "/dev/ublkb0 went away with the front-end"
journalctl --no-pager -o cat -u tern-serve@vm1 | grep -q "re-attached to /dev/ublkb0" ||
    fail "the restarted front-end did not re-attach to /dev/ublkb0"
say "systemd restarted it (pid $(prop tern-serve@vm1 MainPID)), re-attached to /dev/ublkb0"
wait $FIO || { cat /tmp/fio.log; fail "fio saw an error across the SIGKILL and restart"; }
grep -q "err= 0" /tmp/fio.log || { cat /tmp/fio.log; fail "fio reports errors"; }
say "fio: 128 MiB of random 64 KiB writes, verified, no error ($(grep -o 'WRITE: bw=[^ ]*' /tmp/fio.log))"

# Both front-ends at once: the kernel's NBD client on tern's socket.
nbd-client -unix /run/tern-vm1.sock -N disk0 /dev/nbd0 >/tmp/nbd.log 2>&1 || { cat /tmp/nbd.log; fail "nbd-client"; }
a=$(dd if=/dev/ublkb0 bs=1M count=128 iflag=direct 2>/dev/null | sha256sum)
b=$(dd if=/dev/nbd0 bs=1M count=128 iflag=direct 2>/dev/null | sha256sum)
[[ $a == "$b" ]] || fail "/dev/nbd0 reads other bytes than /dev/ublkb0 ($a vs $b)"
head -c 1M /dev/urandom >/tmp/blk
dd if=/tmp/blk of=/dev/nbd0 bs=1M seek=200 oflag=direct 2>/dev/null || fail "write through /dev/nbd0"
[[ $(dd if=/dev/ublkb0 bs=1M skip=200 count=1 iflag=direct 2>/dev/null | sha256sum) == $(sha256sum </tmp/blk) ]] ||
    fail "a write through NBD does not read back through ublk"
nbd-client -d /dev/nbd0 >/dev/null 2>&1
say "NBD and ublk serve the same disk at once: same 128 MiB, a write through one read through the other"

# --- 4. clean stops; the replica is the image ---------------------------------
systemctl stop tern-serve@vm1 || fail "systemctl stop tern-serve@vm1"
[[ $(prop tern-serve@vm1 Result) == success ]] || fail "tern-serve@vm1 stopped with result $(prop tern-serve@vm1 Result)"
[[ ! -e /dev/ublkb0 ]] || fail "/dev/ublkb0 is still there after systemctl stop"
# The shipper and the applier units catch up by themselves.
n=0
until cmp -s "$TARGET/vm1/replica/disk0.img" "$IMG"; do
    n=$((n + 1))
    ((n < 120)) || fail "the replica did not reach the image within 120 s of the front-end's stop"
    sleep 1
done
say "the replica the units made equals the image ($n s after the stop)"
for u in tern-ship@vm1 tern-apply@local; do
    systemctl stop "$u" || fail "systemctl stop $u"
    [[ $(prop "$u" Result) == success ]] || fail "$u stopped with result $(prop "$u" Result)"
done
[[ $(prop tern-ship@vm1 NRestarts) == 0 && $(prop tern-apply@local NRestarts) == 0 ]] ||
    fail "ship or apply restarted (a watchdog timeout?)"
journalctl --no-pager -o cat -u 'tern-*' | grep -qi "watchdog timeout" && fail "a watchdog timeout"
say "systemctl stop: all three clean (result success), no watchdog timeout"
finish 0
