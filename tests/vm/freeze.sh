#!/bin/bash
# The `freeze` scenario of scripts/vm-test.sh, the guest's half, run inside
# a Debian guest (systemd as PID 1) with the qemu guest agent installed.
# Its second disk (/dev/vdb) is tern's: an NBD export of `tern serve` on
# the host, which also holds the agent's channel and takes the points.
#
#   1. ext4 on /dev/vdb, and a writer that never stops: files rewritten,
#      some fsynced, a log appended. `load running` tells the host, which
#      takes an app point through the agent (`tern tag --freeze`) and a
#      crash point under the same load, then writes `hang` to the control
#      port (org.tern.control).
#   2. The agent is restarted with a freeze hook that sleeps 15 s: it
#      answers nothing within tern's 10 s deadline. `agent hangs` tells
#      the host, which tags again (crash-consistent after the deadline,
#      the thaw queued behind the freeze), then writes `check`.
#   3. The guest must be thawed: the hook ran for the thaw, and a write
#      with fsync completes. The writer saw no error. Unmounted cleanly.
#
# Prints `TERN-VM-OK freeze` or `TERN-VM-FAIL freeze: why`.
set -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
H=/root/harness
SCENARIO=freeze
# shellcheck source=lib.sh
source "$H/tests/vm/lib.sh"
DEV=/dev/vdb
CTL=/dev/virtio-ports/org.tern.control
AGENT_PORT=/dev/virtio-ports/org.qemu.guest_agent.0

# from_host WORD: waits for the host to write WORD to the control port (it
# repeats it until the guest answers on the console; a read while the
# host is not connected ends at once).
from_host() {
    local line
    while :; do
        line=$(timeout 2 head -n1 "$CTL" 2>/dev/null) || true
        [[ $line == "$1" ]] && return 0
        sleep 0.2
    done
}

for _ in $(seq 100); do [[ -e $AGENT_PORT && -e $CTL ]] && break; sleep 0.1; done
[[ -e $AGENT_PORT ]] || finish 1 "no $AGENT_PORT (virtio-serial)"
systemctl start qemu-guest-agent || finish 1 "qemu-guest-agent does not start"
say "qemu-ga $(qemu-ga --version 2>&1 | head -n1)"

mkfs.ext4 -q -F "$DEV" || finish 1 "mkfs.ext4 $DEV"
mount -t ext4 "$DEV" /mnt || finish 1 "mount $DEV"
# The load: 512 KiB files rewritten in turn, every fifth round fsynced.
(
    i=0
    while [[ ! -e /tmp/stop ]]; do
        dd if=/dev/urandom of=/mnt/f$((i % 40)) bs=64k count=8 status=none || { echo "write $i failed"; exit 1; }
        ((i % 5 == 0)) && { sync -f /mnt || { echo "fsync $i failed"; exit 1; }; }
        echo "$i" >>/mnt/log
        i=$((i + 1))
    done
    echo "$i rounds"
) >/tmp/load.log 2>&1 &
LOAD=$!
say "load running"

from_host hang
cat >/root/hook.sh <<'HOOK'
#!/bin/sh
echo "$1 $(date +%s.%N)" >>/root/hook.log
[ "$1" = freeze ] && sleep 15
exit 0
HOOK
chmod +x /root/hook.sh
systemctl stop qemu-guest-agent
qemu-ga -m virtio-serial -p "$AGENT_PORT" -F/root/hook.sh >/tmp/qga.log 2>&1 &
QGA=$!
sleep 1
kill -0 $QGA 2>/dev/null || { cat /tmp/qga.log; finish 1 "qemu-ga with the hook does not run"; }
say "agent hangs"

from_host check
say "checking the thaw"
# The late freeze, then the thaw queued behind it: the hook hears both.
for _ in $(seq 600); do grep -q '^thaw' /root/hook.log 2>/dev/null && break; sleep 0.1; done
grep -q '^thaw' /root/hook.log || { cat /root/hook.log; finish 1 "the guest was never thawed (no thaw hook within 60 s)"; }
timeout 30 sh -c 'echo after >/mnt/after && sync -f /mnt/after' || finish 1 "a write after the thaw did not complete in 30 s"
say "thawed: $(tr '\n' ';' </root/hook.log) and a write after it completed"
kill $QGA
touch /tmp/stop
wait $LOAD || { cat /tmp/load.log; finish 1 "the writer failed"; }
say "writer: $(cat /tmp/load.log), no error"
umount /mnt || finish 1 "umount"
finish 0
