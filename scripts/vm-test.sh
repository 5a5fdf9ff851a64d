#!/usr/bin/env bash
# End-to-end proof with real VMs: a Linux guest (software emulation, no KVM)
# writes a known pattern to a disk that is tern's, makes an ext4 filesystem
# and writes files on it; then the journal, replayed onto a copy of the
# original image, must reproduce the image byte for byte, and e2fsck must
# accept the image. Scenarios, each printing `TERN-VM-OK <name>`:
#
#   nbd         the guest's virtio disk is tern's NBD export, through
#               qemu's own NBD client on the host
#   kernel-nbd  the guest's kernel nbd driver (nbd-client) attaches to
#               `tern serve` on the host over TCP (qemu user networking:
#               the host is 10.0.2.2); afterwards the host ships and
#               applies, and the replica must equal the image
#   ublk        tern itself runs in the guest: `tern serve --ublk` presents
#               the disk (an image on the guest's virtio disk) as
#               /dev/ublkb0; after the pattern, ext4 and files, `tern ship`
#               in the guest writes the cache there, and the host applies
#               it: the replica must equal the image and fsck clean; the
#               host fails over (--test --latest) and a second guest finds
#               the failed-over disk fsck clean and every file the first
#               wrote with its checksum
#   ublk-restart  as ublk, but a shell loop writes 64 KiB blocks with
#               O_DIRECT to /dev/ublkb0 while `tern serve --ublk` is killed
#               with SIGKILL and started again, three times: no write may
#               fail, every block must read back as written, and the
#               replica applied on the host must equal the image
#   net         tern's failover onto the target network, in a network
#               namespace of its own (the host's network is untouched): a
#               "source network" bridge br-src and a "DR" bridge br-dr, each
#               with a peer 10.0.0.1 in a namespace of its own, and an
#               isolated bridge br-iso. `tern enable --nic br-src,mac=...
#               --network br-src=br-dr` with a direct kernel boot of this
#               guest; `tern failover --test --boot --test-network br-iso`
#               must start it with its recorded MAC on br-iso (the bridge
#               learned it on the tap port), unable to reach 10.0.0.1; the
#               controls: on br-src it reaches 10.0.0.1, the real failover
#               comes up on br-dr and reaches the DR peer, and a bridge that
#               does not exist is refused, naming it, with nothing started
#   systemd     a Debian guest whose PID 1 is systemd (its root filesystem
#               built once with mmdebstrap, cached): scripts/install.sh
#               installs tern and its units, which run it (serve over ublk
#               and NBD at once, ship, apply) with READY and watchdog
#               pings; `systemctl kill -s KILL` of the front-end under fio
#               loses nothing; `systemctl stop` is clean (tests/vm/systemd.sh)
#   freeze      a Debian guest with the qemu guest agent writes to ext4 on
#               tern's NBD export without pause; the host tags through the
#               agent (`tern tag --freeze qga:`): that point's filesystem
#               is clean (no recovery needed, e2fsck -fn clean) while a
#               crash point under the same load needs recovery; an agent
#               whose freeze hangs: the tag is crash-consistent after the
#               10 s deadline and the guest thaws (tests/vm/freeze.sh)
#
# Run only when named:
#   bench       fio through /dev/ublkb0, the kernel's NBD client and the
#               virtio disk in one Debian guest, and the writer's stall
#               across kill -9 restarts (tests/vm/bench.sh; what
#               scripts/bench-vm.sh runs)
#
# Usage: scripts/vm-test.sh [SCENARIO...]   (all but bench when none is named)
#
# TERN_VM_APPEND: more words for the guest's kernel command line (the bench
# scenario's knobs: tern.rounds=, tern.runtime=, tern.restarts=).
# TERN_FREEZE_ROUNDS: the freeze scenario times this many more frozen tags
# under its load (scripts/bench-freeze.sh), lines `bench: freeze` in
# BENCH_OUT.
#
# Needs root (apt, /var/cache). The Debian 6.12 kernel from bookworm-backports
# is downloaded once and unpacked under /var/cache/tern-vm (TERN_VM_CACHE).
# The guest boots in seconds: a busybox initramfs with the few modules and
# tools the scenarios need.
set -euo pipefail
# shellcheck source=lib/bench.sh
source "$(dirname "$0")/lib/bench.sh"
cd "$BENCH_ROOT"
REPO=$PWD
START=$(date +%s.%N)
BENCH_LOG=plain BENCH_ERROR=FAIL   # vm-test: FAIL: ...

ALL_SCENARIOS=(nbd kernel-nbd ublk ublk-restart net systemd freeze)
SCENARIOS=("$@")
((${#SCENARIOS[@]})) || SCENARIOS=("${ALL_SCENARIOS[@]}")
for s in "${SCENARIOS[@]}"; do
    [[ " ${ALL_SCENARIOS[*]} bench " == *" $s "* ]] || die "unknown scenario '$s' (known: ${ALL_SCENARIOS[*]} bench)"
done
# Scenarios whose guest is Debian with systemd, not the busybox initramfs.
DEBIAN_GUEST=0
for s in "${SCENARIOS[@]}"; do [[ $s == systemd || $s == bench || $s == freeze ]] && DEBIAN_GUEST=1; done

CACHE=${TERN_VM_CACHE:-/var/cache/tern-vm}
TERN=$REPO/target/release/tern
QEMU_TIMEOUT=${TERN_VM_TIMEOUT:-300}

# --- 1. host packages -------------------------------------------------------
step "host packages"
need=()
for p in qemu-system-x86 qemu-utils busybox-static cpio xz-utils e2fsprogs nbd-client mmdebstrap; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || need+=("$p")
done
if ((${#need[@]})); then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${need[@]}" >/dev/null ||
        { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; } ||
        die "apt-get install ${need[*]} failed"
fi

# --- 2. the guest kernel (cached) --------------------------------------------
step "guest kernel"
mkdir -p "$CACHE"
kroot=$CACHE/current
if ! compgen -G "$kroot/boot/vmlinuz-*" >/dev/null; then
    src=/etc/apt/sources.list.d/bookworm-backports.sources
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        # The mirror (and keyring) of the stanza / line that carries 'bookworm'.
        mirror="" keyring=""
        for f in /etc/apt/sources.list.d/*.sources; do
            [[ -e $f ]] || continue
            read -r mirror keyring < <(awk '
                BEGIN { RS=""; FS="\n" }
                {
                    uri=""; suites=""; key=""
                    for (i = 1; i <= NF; i++) {
                        if ($i ~ /^URIs:/)      { uri = $i; sub(/^URIs:[ \t]*/, "", uri); split(uri, u, " "); uri = u[1] }
                        if ($i ~ /^Suites:/)    { suites = " " $i " " }
                        if ($i ~ /^Signed-By:/) { key = $i; sub(/^Signed-By:[ \t]*/, "", key) }
                    }
                    if (uri != "" && suites ~ / bookworm /) { print uri, key; exit }
                }' "$f") || true
            [[ -n $mirror ]] && break
        done
        if [[ -z $mirror && -e /etc/apt/sources.list ]]; then
            mirror=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { if ($(i+1) == "bookworm") { print $i; exit } } }' \
                /etc/apt/sources.list)
        fi
        [[ -n $mirror ]] || die "no bookworm mirror found in /etc/apt/sources.list{,.d}"
        [[ -n $keyring ]] || keyring=/usr/share/keyrings/debian-archive-keyring.gpg
        echo "adding bookworm-backports from $mirror ($src)"
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
            "$mirror" "$keyring" >"$src"
    fi
    apt-get update >/dev/null || die "apt-get update failed"
    pkg=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$' | awk '{print $1}' | sort -V | tail -n1)
    [[ -n $pkg ]] || die "no linux-image-6.12.*-amd64-unsigned in the apt lists"
    echo "downloading $pkg"
    dl=$(mktemp -d)
    chown _apt "$dl" 2>/dev/null || true # so apt need not download unsandboxed
    (cd "$dl" && apt-get download "$pkg" >/dev/null) || die "apt-get download $pkg failed"
    rm -rf "$CACHE/$pkg.tmp"
    dpkg -x "$dl"/*.deb "$CACHE/$pkg.tmp" || die "dpkg -x failed"
    rm -rf "$dl" "$CACHE/$pkg"
    mv "$CACHE/$pkg.tmp" "$CACHE/$pkg"
    ln -sfn "$pkg" "$kroot"
fi
vmlinuz=$(compgen -G "$kroot/boot/vmlinuz-*" | head -n1)
kver=${vmlinuz##*/vmlinuz-}
moddir=$(find "$kroot/" -maxdepth 4 -type d -path "*/lib/modules/$kver" | head -n1)
[[ -n $moddir ]] || die "no modules directory for $kver under $kroot"
echo "kernel $kver (cached in $(readlink -f "$kroot"))"

# --- 2b. the Debian root filesystem of the systemd and bench guests (cached) --
# Bookworm, as the host (tern's libraries are the host's), with systemd as
# PID 1 and what the guest scripts use. Its name carries ROOTFS_VERSION:
# change the package list, bump it.
ROOTFS_VERSION=2
ROOTFS_PACKAGES=systemd,systemd-sysv,udev,kmod,e2fsprogs,fio,nbd-client,procps,util-linux,qemu-guest-agent
rootfs=$CACHE/rootfs-bookworm-v$ROOTFS_VERSION.img
if [[ $DEBIAN_GUEST == 1 && ! -e $rootfs ]]; then
    step "Debian root filesystem (mmdebstrap, once)"
    mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [[ -n $mirror ]] || mirror=$(awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
    [[ -n $mirror ]] || die "no Debian mirror found in /etc/apt/sources.list{,.d} for mmdebstrap"
    tree=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    # The guest's fstab, hostname and a root without password (the console).
    mmdebstrap --variant=minbase --include="$ROOTFS_PACKAGES" \
        --customize-hook='echo "/dev/vda / ext4 rw,errors=remount-ro 0 1" > "$1/etc/fstab"' \
        --customize-hook='echo tern-guest > "$1/etc/hostname"' \
        --customize-hook='chroot "$1" passwd -d root' \
        bookworm "$tree" "$mirror" >"$CACHE/mmdebstrap.log" 2>&1 ||
        { tail -n 20 "$CACHE/mmdebstrap.log"; rm -rf "$tree"; die "mmdebstrap failed (log: $CACHE/mmdebstrap.log)"; }
    mkfs.ext4 -q -F -L root -d "$tree" "$rootfs.tmp" 2G || { rm -rf "$tree"; die "mkfs.ext4 -d of the root filesystem failed"; }
    rm -rf "$tree"
    mv "$rootfs.tmp" "$rootfs"
    echo "root filesystem: $rootfs"
fi

step "build tern"
BENCH_TERN_GIVEN=""   # always built: TERN is no knob here
build_tern
need_tern

# --- scratch directory, cleaned up on exit ----------------------------------
D=$(mktemp -d /tmp/tern-vm.XXXXXX)
# The journal's live ring in memory, as in production; removed with $D.
export TERN_RING_DIR="/dev/shm/${D##*/}.rings"
SERVE_PID="" BG_PIDS=()
on_exit 'stop_pid "$SERVE_PID"; for p in "${BG_PIDS[@]}"; do stop_pid "$p"; done'
on_exit 'if [[ ${TERN_VM_KEEP:-0} == 1 ]]; then echo "kept $D and $TERN_RING_DIR"; else rm -rf "$D" "$TERN_RING_DIR"; fi'

# --- 3. initramfs -----------------------------------------------------------
step "initramfs"
IR=$D/ir
mkdir -p "$IR"/{bin,sbin,etc,proc,sys,dev,tmp,mnt,lib/modules}

# Modules in load order: dependencies (from each .ko's modinfo) first.
declare -A modfile=() loaded=()
while IFS= read -r f; do
    n=${f##*/}; n=${n%.ko.xz}; n=${n%.ko}; n=${n//-/_}
    modfile[$n]=$f
done < <(find "$moddir" -name '*.ko.xz' -o -name '*.ko')
order=()
add_mod() { # name [optional]
    local n=${1//-/_} d deps
    [[ -n ${loaded[$n]:-} ]] && return 0
    if [[ -z ${modfile[$n]:-} ]]; then
        [[ ${2:-} == optional ]] && return 0
        # Built in? Then nothing to load.
        grep -qs "/$n.ko" "$moddir/modules.builtin" && return 0
        die "module $n not found for $kver"
    fi
    loaded[$n]=1
    deps=$(xz -dcf "${modfile[$n]}" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1)
    for d in ${deps//,/ }; do add_mod "$d"; done
    xz -dcf "${modfile[$n]}" >"$IR/lib/modules/$n.ko"
    # '?' marks a module whose load may fail (e.g. a CPU-specific driver).
    if [[ ${2:-} == optional ]]; then order+=("?$n"); else order+=("$n"); fi
}
# crc32c providers first (ext4 asks the crypto API for "crc32c", a soft dep).
add_mod crc32c_generic optional
add_mod crc32c_intel optional
add_mod virtio_blk
add_mod ext4
add_mod virtio_net # kernel-nbd and net: the guest's network
add_mod nbd
add_mod ublk_drv # ublk: tern serve --ublk in the guest
echo "modules: ${order[*]}"

cp /bin/busybox "$IR/bin/busybox"
for a in $("$IR/bin/busybox" --list); do
    [[ $a == busybox ]] || ln -sf busybox "$IR/bin/$a"
done
# copy_bin PATH: a host binary into the guest, with its libraries.
copy_bin() {
    cp "$1" "$IR/sbin/"
    local l
    for l in $(ldd "$1" | grep -o '/[^ ]*'); do
        mkdir -p "$IR$(dirname "$l")"
        cp -L "$l" "$IR$l"
    done
}
HAVE_MKE2FS=0
if [[ -x /sbin/mke2fs && -x /sbin/e2fsck ]]; then
    HAVE_MKE2FS=1
    copy_bin /sbin/mke2fs
    copy_bin /sbin/e2fsck
    ln -sf mke2fs "$IR/sbin/mkfs.ext4"
    [[ -e /etc/mke2fs.conf ]] && cp /etc/mke2fs.conf "$IR/etc/"
fi
copy_bin "$(command -v nbd-client)"
copy_bin "$TERN" # ublk: tern runs in the guest (without its debug lines)
strip -o "$IR/sbin/tern" "$TERN"
echo "$HAVE_MKE2FS" >"$IR/etc/have-mke2fs"
# The Debian guests' harness (copied into their root by /init): the guest
# scripts, tern, and what scripts/install.sh installs from a checkout.
mkdir -p "$IR/harness/scripts/lib" "$IR/harness/dist" "$IR/harness/tests"
ln "$IR/sbin/tern" "$IR/harness/tern"
cp scripts/install.sh "$IR/harness/scripts/"
cp scripts/lib/bench.sh "$IR/harness/scripts/lib/"
cp -r dist/systemd "$IR/harness/dist/"
cp README.md "$IR/harness/"
cp -r tests/vm "$IR/harness/tests/"
printf '%s\n' "${order[@]}" >"$IR/etc/modules"

cat >"$IR/init" <<'EOF'
#!/bin/sh
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

SCENARIO=nbd PORT=10809
for w in $(cat /proc/cmdline); do
    case $w in
        tern.scenario=*) SCENARIO=${w#tern.scenario=} ;;
        tern.port=*) PORT=${w#tern.port=} ;;
    esac
done

# Carry a result out through isa-debug-exit (qemu exits with (v<<1)|1),
# and power off in case the port is not there.
finish() {
    if [ "$1" = 0 ]; then echo "TERN-VM-OK $SCENARIO"; else echo "TERN-VM-FAIL $SCENARIO: $2"; fi
    sync
    printf "\\$(printf %o "$1")" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
    poweroff -f
    sleep 5
}
fail() { finish 1 "$*"; }

for m in $(cat /etc/modules); do
    case $m in
        \?*) insmod /lib/modules/${m#?}.ko 2>/dev/null || echo "guest: optional ${m#?} not loaded" ;;
        *) insmod /lib/modules/$m.ko || fail "insmod $m" ;;
    esac
done
# The Debian guests: their root is the first virtio disk; the harness goes
# into it, with a unit that runs the scenario's script once systemd is up.
case $SCENARIO in
    systemd | bench | freeze)
        mkdir -p /newroot
        mount -t ext4 /dev/vda /newroot || fail "mount the Debian root filesystem"
        rm -rf /newroot/root/harness
        cp -a /harness /newroot/root/harness || fail "copy the harness"
        cat >/newroot/etc/systemd/system/tern-vm-test.service <<UNIT
[Unit]
Description=tern VM test: $SCENARIO
After=basic.target
[Service]
Type=oneshot
ExecStart=/root/harness/tests/vm/$SCENARIO.sh
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
UNIT
        mkdir -p /newroot/etc/systemd/system/multi-user.target.wants
        # A getty on the console would hang up the script's output.
        ln -sf /dev/null /newroot/etc/systemd/system/serial-getty@ttyS0.service
        ln -sf ../tern-vm-test.service /newroot/etc/systemd/system/multi-user.target.wants/
        umount /proc /sys
        umount /dev 2>/dev/null
        exec switch_root /newroot /sbin/init ;;
    net) # a failed-over VM on the bridge tern chose: its MAC, and whether
        # it reaches 10.0.0.1; then it waits for the host to look and kill it
        ip link set lo up
        ip link set eth0 up || fail "no eth0"
        ip addr add 10.0.0.2/24 dev eth0 || fail "address eth0"
        echo "guest: eth0 mac $(cat /sys/class/net/eth0/address)"
        n=1 result=unreachable
        while [ $n -le 5 ]; do
            if ping -c 1 -W 1 10.0.0.1 >/dev/null 2>&1; then result=reached; break; fi
            n=$((n + 1))
        done
        [ $result = reached ] || n=5
        # Which 10.0.0.1 answered: the host knows each peer's MAC.
        echo "guest: neighbour $(ip neigh show 10.0.0.1 | grep -o 'lladdr [0-9a-f:]*' || echo none)"
        echo "guest: ping 10.0.0.1: $result ($n attempt(s))"
        sleep 3600
        fail "not stopped by the host" ;;
    ublk-check) # the ublk scenario's second guest: the failed-over disk
        # (vda) and the first guest's work disk (vdb, its checksums)
        mkdir -p /work
        mount -t ext4 -o ro /dev/vdb /work || fail "mount the first guest's work disk"
        e2fsck -fn /dev/vda >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "e2fsck -fn of the failed-over disk"; }
        mount -t ext4 -o ro /dev/vda /mnt || fail "mount the failed-over disk"
        (cd /mnt && sha256sum -c /work/sums) >/tmp/sums.log 2>&1 || { cat /tmp/sums.log; fail "files differ on the failed-over disk"; }
        echo "guest: the failed-over disk: e2fsck -fn clean, all $(wc -l </work/sums) files with their checksums"
        finish 0 ;;
esac

# serve_ublk: tern serve --ublk in the background ($SERVE), until $DEV
# answers.
serve_ublk() {
    tern --state /work/state serve vm1 --ublk 2>>/work/serve.log &
    SERVE=$!
    n=0
    until [ -b $DEV ] && dd if=$DEV of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null; do
        n=$((n + 1)); [ $n -gt 300 ] && { cat /work/serve.log; fail "no $DEV"; }; sleep 0.1
    done
}

# restart_test: 200 blocks of 64 KiB written with O_DIRECT while tern
# serve is killed and started again three times; each write must succeed
# and each block read back as written.
restart_test() {
    i=0
    while [ $i -lt 200 ]; do
        dd if=/dev/urandom of=/tmp/b$i bs=64k count=1 2>/dev/null
        i=$((i + 1))
    done
    (
        i=0
        while [ $i -lt 200 ]; do
            dd if=/tmp/b$i of=$DEV bs=64k seek=$i count=1 oflag=direct conv=notrunc 2>/tmp/w.err ||
                { echo "write $i failed: $(cat /tmp/w.err)"; exit 1; }
            i=$((i + 1))
        done
    ) >/tmp/writer.log 2>&1 &
    WRITER=$!
    k=0
    while [ $k -lt 3 ]; do
        sleep 1
        kill -9 $SERVE; wait $SERVE 2>/dev/null
        [ -b $DEV ] || fail "$DEV went away with tern serve (restart $k)"
        sleep 0.5
        serve_ublk
        k=$((k + 1))
    done
    wait $WRITER || { cat /tmp/writer.log; fail "a write failed across the restarts"; }
    i=0
    while [ $i -lt 200 ]; do
        [ "$(dd if=$DEV bs=64k skip=$i count=1 iflag=direct 2>/dev/null | sha256sum)" = "$(sha256sum < /tmp/b$i)" ] ||
            fail "block $i reads back other bytes"
        i=$((i + 1))
    done
    grep -c "re-attached" /work/serve.log > /tmp/reattached
    echo "guest: 200 writes across 3 kill -9 restarts of tern serve, none failed, all read back ($(cat /tmp/reattached) re-attached)"
}

case $SCENARIO in
    nbd) # qemu's NBD client on the host makes tern's export our virtio disk
        DEV=/dev/vda
        n=0
        while [ ! -b $DEV ]; do
            n=$((n + 1)); [ $n -gt 100 ] && fail "no $DEV"; sleep 0.1
        done ;;
    kernel-nbd) # our own nbd driver, to tern serve on the host
        ip link set lo up
        ip link set eth0 up || fail "no eth0"
        ip addr add 10.0.2.15/24 dev eth0 || fail "address eth0"
        DEV=/dev/nbd0
        nbd-client -N disk0 10.0.2.2 "$PORT" $DEV >/tmp/nbd-client.log 2>&1 ||
            { cat /tmp/nbd-client.log; fail "nbd-client to 10.0.2.2:$PORT"; }
        n=0
        while [ "$(cat /sys/block/nbd0/size)" = 0 ]; do
            n=$((n + 1)); [ $n -gt 100 ] && fail "$DEV has no size"; sleep 0.1
        done ;;
    ublk | ublk-restart) # tern in the guest, its state and the image on the virtio disk
        mkdir -p /work /dev/shm
        mount -t tmpfs tmpfs /dev/shm || fail "tmpfs /dev/shm"
        mount -t ext4 /dev/vda /work || fail "mount the work disk"
        mkdir -p /work/cache /work/target
        truncate -s 256M /work/disk0.img || fail "make the image"
        tern -q --state /work/state enable vm1 --disk disk0=/work/disk0.img --cache /work/cache \
            --target /work/target --journal-size 64MiB || fail "tern enable"
        DEV=/dev/ublkb0
        serve_ublk ;;
    *) fail "unknown scenario" ;;
esac
q=/sys/block/${DEV#/dev/}/queue
echo "guest: $DEV is $(cat /sys/block/${DEV#/dev/}/size) sectors; discard_max $(cat $q/discard_max_bytes), write_zeroes_max $(cat $q/write_zeroes_max_bytes), write cache: $(cat $q/write_cache)"

if [ "$SCENARIO" = ublk-restart ]; then
    restart_test
else
# 1. A known pattern at 1 MiB, read back past the page cache.
dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null || fail "make pattern"
dd if=/tmp/pattern of=$DEV bs=1M seek=1 conv=fsync oflag=direct 2>/dev/null || fail "write pattern"
sync
echo 3 > /proc/sys/vm/drop_caches
want=$(sha256sum < /tmp/pattern)
got=$(dd if=$DEV bs=1M skip=1 count=8 iflag=direct 2>/dev/null | sha256sum)
[ "$want" = "$got" ] || fail "pattern read back differs ($want vs $got)"
echo "guest: 8 MiB pattern written at 1 MiB and read back: ${want%% *}"

# 2. A filesystem.
if [ "$(cat /etc/have-mke2fs)" = 1 ]; then
    mkfs.ext4 -q -F $DEV || fail "mkfs.ext4"
    mount -t ext4 $DEV /mnt || fail "mount ext4"
    mkdir -p /mnt/dir || fail "mkdir"
    echo "hello from the guest" > /mnt/hello.txt || fail "write hello"
    cp /tmp/pattern /mnt/dir/pattern || fail "copy pattern"
    i=0
    while [ $i -lt 50 ]; do echo "file $i" > /mnt/dir/f$i || fail "write f$i"; i=$((i + 1)); done
    sync
    umount /mnt || fail "umount"
    echo 3 > /proc/sys/vm/drop_caches
    e2fsck -fn $DEV >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "e2fsck in guest"; }
    mount -t ext4 -o ro $DEV /mnt || fail "remount ext4"
    [ "$(sha256sum < /mnt/dir/pattern)" = "$want" ] || fail "file pattern differs"
    [ "$(cat /mnt/dir/f49)" = "file 49" ] || fail "f49 differs"
    # The ublk scenario's second guest checks these on the failed-over disk.
    if [ "$SCENARIO" = ublk ]; then
        (cd /mnt && sha256sum hello.txt dir/*) >/work/sums || fail "checksums"
    fi
    umount /mnt || fail "umount 2"
    echo "guest: ext4 made, 52 files written, fsck clean, read back"
fi
fi
sync
if [ "$SCENARIO" = kernel-nbd ]; then
    nbd-client -d $DEV >/dev/null 2>&1 || fail "nbd-client -d"
fi
if [ "$SCENARIO" = ublk ] || [ "$SCENARIO" = ublk-restart ]; then
    kill -TERM $SERVE; wait $SERVE || { cat /work/serve.log; fail "tern serve --ublk exited non-zero"; }
    [ ! -e $DEV ] || fail "$DEV is still there after tern serve stopped"
    tern -q --state /work/state ship vm1 --once 2>>/work/serve.log || { cat /work/serve.log; fail "tern ship"; }
    echo "guest: tern serve --ublk stopped, $DEV removed, shipped"
    umount /work || fail "umount the work disk"
fi
finish 0
EOF
chmod +x "$IR/init"
(cd "$IR" && find . | cpio -o -H newc --quiet | gzip -1) >"$D/ir.cpio.gz"

# --- 4. per scenario: tern and the VM ----------------------------------------
# run_scenario NAME: a fresh VM under $D/NAME served by tern, booted, checked.
run_scenario() {
    local name=$1 dir=$D/$1 port="" src=0
    local img=$dir/disk0.img
    mkdir -p "$dir/cache" "$dir/target"
    if [[ $name == ublk* ]]; then
        run_ublk "$name" "$dir"
        return
    fi
    if [[ $name == systemd || $name == bench ]]; then
        run_debian "$name" "$dir"
        return
    fi
    if [[ $name == freeze ]]; then
        run_freeze "$name" "$dir"
        return
    fi
    if [[ $name == net ]]; then
        run_net "$dir"
        return
    fi
    step "$name: tern enable + serve"
    truncate -s 256M "$img"
    "$TERN" -q --state "$dir/state" enable vm1 --disk "disk0=$img" --cache "$dir/cache" --target "$dir/target" \
        --journal-size 1GiB || die "$name: tern enable failed"
    cp --sparse=always "$img" "$dir/original.img"
    local listen=(--listen "unix:$dir/nbd.sock") vm=()
    case $name in
    nbd)
        vm=(-nic none -drive "file=nbd+unix:///disk0?socket=$dir/nbd.sock,format=raw,if=virtio,cache=none,discard=unmap")
        ;;
    kernel-nbd)
        # A free port on the host's loopback; the guest reaches it as
        # 10.0.2.2 through qemu's user networking.
        port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        listen+=(--listen "tcp:127.0.0.1:$port")
        vm=(-nic user,model=virtio-net-pci)
        ;;
    esac
    "$TERN" --state "$dir/state" serve vm1 "${listen[@]}" >"$dir/serve.log" 2>&1 &
    SERVE_PID=$!
    wait_for_socket "$dir/nbd.sock" 10 "$dir/serve.log" "$SERVE_PID" || die "$name: tern serve is not listening"

    BOOT_APPEND=${port:+tern.port=$port} boot "$name" "$dir" "${vm[@]}" ||
        { echo "--- tern serve log (last 20 lines)"; tail -n 20 "$dir/serve.log"; die "$name: the guest failed"; }

    step "$name: stop tern serve"
    kill -TERM "$SERVE_PID"
    wait "$SERVE_PID" || src=$?
    SERVE_PID=""
    if [[ $src != 0 ]]; then
        tail -n 20 "$dir/serve.log"
        die "$name: tern serve exited $src on SIGTERM (expected 0)"
    fi

    step "$name: check: journal replay reproduces the image"
    cp --sparse=always "$dir/original.img" "$dir/replayed.img"
    "$TERN" -q --state "$dir/state" journal replay vm1 --from-start --onto "disk0=$dir/replayed.img" ||
        die "$name: tern journal replay failed"
    cmp "$dir/replayed.img" "$img" || die "$name: the replayed copy differs from the image the VM wrote"
    echo "replayed copy == image ($(du -k --apparent-size "$img" | cut -f1) KiB, $(du -k "$img" | cut -f1) KiB allocated)"
    if [[ $HAVE_MKE2FS == 1 ]]; then
        e2fsck -fn "$img" >"$dir/fsck.log" 2>&1 || { cat "$dir/fsck.log"; die "$name: e2fsck -fn on the image failed"; }
        echo "e2fsck -fn on the image: clean"
    fi
    if [[ $name == kernel-nbd ]]; then
        step "$name: check: shipped and applied, the replica is the image"
        "$TERN" -q --state "$dir/state" ship vm1 --once || die "$name: tern ship --once failed"
        "$TERN" -q apply --cache "$dir/cache" --target "$dir/target" vm1 --once || die "$name: tern apply --once failed"
        cmp "$dir/target/vm1/replica/disk0.img" "$img" || die "$name: the replica differs from the image the VM wrote"
        echo "replica == image"
    fi
    echo "TERN-VM-OK $name"
}

# boot NAME DIR QEMU-ARGS...: boots the guest for scenario NAME (kernel
# command line plus $BOOT_APPEND); returns non-zero, after the console's
# tail and why, unless it reports TERN-VM-OK NAME.
boot() {
    local name=$1 dir=$2 qrc=0
    shift 2
    step "$name: boot the VM (tcg, timeout ${QEMU_TIMEOUT}s)"
    local qemu=(timeout "$QEMU_TIMEOUT" qemu-system-x86_64 -accel tcg -m 1024 -nographic -no-reboot "$@"
        -kernel "$vmlinuz" -initrd "$D/ir.cpio.gz"
        -append "console=ttyS0 quiet panic=-1 tern.scenario=$name ${BOOT_APPEND:-} ${TERN_VM_APPEND:-}"
        -device isa-debug-exit,iobase=0xf4,iosize=0x04)
    if [[ ${BOOT_BACKGROUND:-0} == 1 ]]; then
        # The caller acts while it runs, then waits for $BOOT_PID and calls
        # boot_result.
        "${qemu[@]}" </dev/null >"$dir/console-$name.log" 2>&1 &
        BOOT_PID=$!
        BG_PIDS+=("$BOOT_PID")
        return 0
    fi
    "${qemu[@]}" </dev/null >"$dir/console-$name.log" 2>&1 || qrc=$?
    boot_result "$name" "$dir" "$qrc"
}

# boot_result NAME DIR [QEMU-EXIT]: the guest's lines, and whether it
# reported TERN-VM-OK NAME.
boot_result() {
    local name=$1 dir=$2 qrc=${3:-1}
    grep -a '^guest:' "$dir/console-$name.log" | tr -d '\r' || true
    if ! grep -aq "TERN-VM-OK $name" "$dir/console-$name.log"; then
        echo "--- console (last 40 lines)"; tail -n 40 "$dir/console-$name.log"
        if [[ $qrc == 124 ]]; then
            log "$name: the VM did not finish within ${QEMU_TIMEOUT}s"
        else
            log "$name: the guest did not report TERN-VM-OK (qemu exit $qrc): $(grep -a 'TERN-VM-FAIL' "$dir/console-$name.log" | tr -d '\r' | head -n1)"
        fi
        return 1
    fi
    # isa-debug-exit turns the guest's 0 into qemu's 1.
    [[ $qrc == 1 ]] || echo "note: qemu exited $qrc (expected 1 from isa-debug-exit)"
    echo "guest reported TERN-VM-OK $name (qemu exit $qrc)"
}

# run_ublk DIR: the ublk scenario. The guest's virtio disk holds tern's
# state, the image and the cache; the host reads them afterwards.
run_ublk() {
    local name=$1 dir=$2 mnt=$2/mnt
    truncate -s 1G "$dir/work.img"
    mkfs.ext4 -q -F "$dir/work.img"
    boot "$name" "$dir" -nic none -drive "file=$dir/work.img,format=raw,if=virtio,cache=none" ||
        die "$name: the guest failed (its tern serve log is in the console above)"
    step "$name: check: the host applies the guest's cache, the replica is the image"
    mkdir -p "$mnt"
    mount -o loop "$dir/work.img" "$mnt" || die "$name: cannot mount the guest's disk"
    local why=""
    if ! "$TERN" -q apply --cache "$mnt/cache" --target "$dir/target" vm1 --once; then
        why="tern apply --once failed"
    elif ! cmp "$dir/target/vm1/replica/disk0.img" "$mnt/disk0.img"; then
        why="the replica differs from the image the guest wrote"
    elif [[ $name == ublk ]] && ! e2fsck -fn "$dir/target/vm1/replica/disk0.img" >"$dir/fsck.log" 2>&1; then
        cat "$dir/fsck.log"
        why="e2fsck -fn on the replica failed"
    fi
    local fo=""
    if [[ -z $why && $name == ublk ]]; then
        step "$name: check: a test failover, booted in a second guest"
        if ! fo=$("$TERN" -q failover vm1 --test --latest --cache "$mnt/cache" --target "$dir/target" --json); then
            why="tern failover --test --latest failed"
        else
            fo=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["disks"]["disk0"])' <<<"$fo")
            echo "failed over: $fo"
        fi
    fi
    umount "$mnt"
    [[ -z $why ]] || die "$name: $why"
    echo "replica == image$([[ $name == ublk ]] && echo ", e2fsck -fn clean")"
    if [[ -n $fo ]]; then
        boot ublk-check "$dir" -nic none -drive "file=$fo,format=raw,if=virtio,cache=none,readonly=on" \
            -drive "file=$dir/work.img,format=raw,if=virtio,cache=none,readonly=on" ||
            die "$name: the second guest found the failed-over disk wrong"
    fi
    echo "TERN-VM-OK $name"
}

# run_net DIR: the net scenario, in a network and mount namespace of its
# own (sysfs mounted there shows its interfaces, as tern's bridge check
# reads them); see net_inside.
run_net() {
    local dir=$1
    export NET_DIR=$dir NET_TERN=$TERN NET_KERNEL=$vmlinuz NET_INITRD=$D/ir.cpio.gz NET_TIMEOUT=$QEMU_TIMEOUT
    export BENCH_LOG BENCH_ERROR BENCH_NAME
    unshare --net --mount -- bash -c "set -euo pipefail; $(declare -f log die step net_inside net_boot net_stop); net_inside" ||
        die "net: failed"
    echo "TERN-VM-OK net"
}

# net_inside: runs in the scenario's namespaces.
net_inside() {
    local dir=$NET_DIR t=$NET_TERN mac=52:54:00:7e:12:34
    declare -A peer_mac=()
    # Global: the trap runs after this function's locals are gone.
    NET_KILL=()
    trap 'for p in "${NET_KILL[@]}"; do kill -9 "$p" 2>/dev/null || true; done' EXIT
    mount --make-rprivate /
    mount -t sysfs sysfs /sys
    step "net: bridges br-src, br-dr (each with a peer 10.0.0.1) and br-iso"
    ip link set lo up
    local br peer
    for br in br-src br-dr br-iso; do
        ip link add "$br" type bridge
        ip link set "$br" up
    done
    # Each peer in a namespace of its own, so no other interface answers
    # for 10.0.0.1 across bridges.
    for br in br-src br-dr; do
        unshare --net sleep 100000 &
        peer=$!
        NET_KILL+=("$peer")
        until [[ $(readlink "/proc/$peer/ns/net") != "$(readlink /proc/self/ns/net)" ]]; do sleep 0.05; done
        ip link add "v-$br" type veth peer name "p-$br"
        ip link set "v-$br" master "$br" up
        ip link set "p-$br" netns "/proc/$peer/ns/net"
        nsenter --net="/proc/$peer/ns/net" sh -c "ip link set lo up && ip addr add 10.0.0.1/24 dev p-$br && ip link set p-$br up"
        peer_mac[$br]=$(nsenter --net="/proc/$peer/ns/net" ip -o link show "p-$br" | grep -o 'link/ether [0-9a-f:]*' | cut -d' ' -f2)
        echo "$br: peer 10.0.0.1 is ${peer_mac[$br]}"
    done

    step "net: tern enable (a NIC on br-src, br-src=br-dr, direct kernel boot), ship, apply"
    mkdir -p "$dir/cache" "$dir/target"
    truncate -s 64M "$dir/disk0.img"
    "$t" -q --state "$dir/state" enable vm1 --disk "disk0=$dir/disk0.img" --cache "$dir/cache" --target "$dir/target" \
        --journal-size 64MiB --memory 512MiB --cpus 1 --nic "br-src,mac=$mac" --network br-src=br-dr \
        --kernel "$NET_KERNEL" --initrd "$NET_INITRD" --append "console=ttyS0 quiet panic=-1 tern.scenario=net" ||
        die "net: tern enable failed"
    "$t" -q --state "$dir/state" ship vm1 --once || die "net: tern ship --once failed"
    "$t" -q apply --cache "$dir/cache" --target "$dir/target" vm1 --once || die "net: tern apply --once failed"

    step "net: --test-network br-nope is refused, nothing started"
    local err
    if err=$("$t" -q --state "$dir/state" failover vm1 --test --latest --boot --test-network br-nope 2>&1); then
        die "net: a failover onto br-nope, which does not exist, was not refused: $err"
    fi
    [[ $err == *"no bridge 'br-nope'"*"$mac"* ]] || die "net: the refusal does not name br-nope and the NIC's MAC: $err"
    [[ ! -e $dir/target/vm1/failover ]] || die "net: the refused failover left $(ls "$dir/target/vm1/failover")"
    echo "refused: ${err#*error: }"

    net_boot iso --test --latest --test-network br-iso
    [[ $NET_RESULT == unreachable ]] || die "net: on the isolated bridge br-iso the guest reached 10.0.0.1"
    net_stop
    net_boot src --test --latest --test-network br-src
    [[ $NET_RESULT == reached ]] || die "net: on br-src the guest did not reach the source network's 10.0.0.1"
    net_stop
    net_boot active --latest
    [[ $NET_RESULT == reached ]] || die "net: after the real failover, on br-dr, the guest did not reach the DR peer"
    net_stop
}

# net_boot NAME FAILOVER-ARGS...: `tern failover vm1 --boot --json ARGS`
# (a test one named NAME, or the real one, `active`); waits for the guest's
# report and checks its MAC, on the bridge tern chose, in that bridge's
# forwarding database (learned on the tap port). Sets NET_RESULT (reached
# or unreachable), NET_PID.
net_boot() {
    local name=$1 json bridge console started=$EPOCHREALTIME
    shift
    local args=("$@")
    [[ $name == active ]] || args+=(--name "$name")
    step "net: tern failover vm1 --boot ${args[*]}"
    json=$("$t" -q --state "$dir/state" failover vm1 --boot --json "${args[@]}") || die "net: tern failover --boot failed"
    local fo=$dir/target/vm1/failover/$name
    NET_PID=$(cat "$fo/qemu.pid")
    NET_KILL+=("$NET_PID")
    bridge=$(python3 -c 'import json, sys; n = json.load(sys.stdin)["network"]; assert len(n) == 1, n; print(n[0]["bridge"], n[0]["mac"])' <<<"$json")
    [[ ${bridge#* } == "$mac" ]] || die "net: the failover's NIC has MAC ${bridge#* }, not the recorded $mac"
    bridge=${bridge% *}
    console=$fo/console.log
    local n=0
    until grep -aq '^guest: ping' "$console"; do
        kill -0 "$NET_PID" 2>/dev/null || { tail -n 30 "$console"; die "net: qemu exited before the guest reported"; }
        n=$((n + 1))
        ((n < NET_TIMEOUT * 10)) || { tail -n 30 "$console"; die "net: no report from the guest within ${NET_TIMEOUT}s"; }
        sleep 0.1
    done
    grep -a '^guest:' "$console" | tr -d '\r'
    local got
    got=$(grep -a '^guest: eth0 mac' "$console" | tr -d '\r' | awk '{print $4}')
    [[ $got == "$mac" ]] || die "net: the guest's MAC is $got, not the recorded $mac"
    local fdb
    fdb=$(bridge fdb show br "$bridge" | grep -i "^$mac dev tap" | sed 's/ *$//' || true)
    [[ -n $fdb ]] || { bridge fdb show br "$bridge"; die "net: $mac is not in $bridge's forwarding database on a tap port"; }
    local other
    for other in br-src br-dr br-iso; do
        [[ $other == "$bridge" ]] || ! bridge fdb show br "$other" | grep -qi "^$mac " ||
            die "net: the guest on $bridge was seen on $other too"
    done
    NET_RESULT=$(grep -a '^guest: ping' "$console" | tr -d '\r' | awk '{print $4}')
    if [[ $NET_RESULT == reached ]]; then
        local answered
        answered=$(grep -a '^guest: neighbour' "$console" | tr -d '\r' | awk '{print $4}')
        [[ $answered == "${peer_mac[$bridge]}" ]] ||
            die "net: on $bridge, 10.0.0.1 answered from $answered, not from $bridge's peer (${peer_mac[$bridge]})"
    fi
    echo "on $bridge: $fdb; ping 10.0.0.1: $NET_RESULT ($(awk -v s="$started" -v e="$EPOCHREALTIME" 'BEGIN{printf "%.1f", e-s}')s)"
}

# net_stop: kills the guest net_boot started and waits for it to go.
net_stop() {
    kill -9 "$NET_PID"
    local n=0
    while kill -0 "$NET_PID" 2>/dev/null; do
        n=$((n + 1)); ((n < 100)) || die "net: qemu $NET_PID does not exit"; sleep 0.1
    done
}

# run_debian NAME DIR: a Debian guest (systemd as PID 1) on a copy-on-write
# layer over the cached root filesystem, with a scratch disk (/dev/vdb)
# and, for bench, a raw disk to measure directly (/dev/vdc). The guest's
# script (tests/vm/NAME.sh) does the scenario and reports.
run_debian() {
    local name=$1 dir=$2
    qemu-img create -q -f qcow2 -b "$rootfs" -F raw "$dir/root.qcow2"
    local disks=(-drive "file=$dir/root.qcow2,format=qcow2,if=virtio,cache=unsafe"
        -drive "file=$dir/scratch.img,format=raw,if=virtio,cache=none,aio=threads") mem=()
    if [[ $name == bench ]]; then
        # Its cache store keeps every segment (nothing applies them), its
        # 512 MiB journal ring is in the guest's memory, and it measures a
        # raw virtio disk beside tern's.
        truncate -s 16G "$dir/scratch.img"
        truncate -s 2G "$dir/raw.img"
        disks+=(-drive "file=$dir/raw.img,format=raw,if=virtio,cache=none,aio=threads")
        mem=(-m 2048)
    else
        truncate -s 2G "$dir/scratch.img"
    fi
    boot "$name" "$dir" -nic none -smp 2 "${mem[@]}" "${disks[@]}" || die "$name: the guest failed"
    if [[ $name == bench ]]; then
        grep -a '^bench:' "$dir/console-$name.log" | tr -d '\r' >"${BENCH_OUT:-$D/bench.txt}" || true
    fi
}

# run_freeze NAME DIR: the freeze scenario's host half (the guest's is
# tests/vm/freeze.sh). The Debian guest's second disk is tern's NBD export;
# its agent's channel and a control port are sockets here.
run_freeze() {
    local name=$1 dir=$2 img=$2/disk0.img qga=$2/qga.sock ctl=$2/ctl.sock
    truncate -s 512M "$img"
    "$TERN" -q --state "$dir/state" enable vm1 --disk "disk0=$img" --cache "$dir/cache" --target "$dir/target" \
        --journal-size 256MiB || die "$name: tern enable failed"
    "$TERN" --state "$dir/state" serve vm1 --listen "unix:$dir/nbd.sock" >"$dir/serve.log" 2>&1 &
    SERVE_PID=$!
    wait_for_socket "$dir/nbd.sock" 10 "$dir/serve.log" "$SERVE_PID" || die "$name: tern serve is not listening"
    "$TERN" --state "$dir/state" ship vm1 >"$dir/ship.log" 2>&1 &
    local ship=$!
    "$TERN" apply --cache "$dir/cache" --target "$dir/target" vm1 >"$dir/apply.log" 2>&1 &
    local apply=$!
    BG_PIDS+=("$ship" "$apply")
    qemu-img create -q -f qcow2 -b "$rootfs" -F raw "$dir/root.qcow2"
    BOOT_BACKGROUND=1 boot "$name" "$dir" -nic none -smp 2 \
        -drive "file=$dir/root.qcow2,format=qcow2,if=virtio,cache=unsafe" \
        -drive "file=nbd+unix:///disk0?socket=$dir/nbd.sock,format=raw,if=virtio,cache=none" \
        -chardev "socket,path=$qga,server=on,wait=off,id=qga0" -device virtio-serial \
        -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0 \
        -chardev "socket,path=$ctl,server=on,wait=off,id=ctl0" \
        -device virtserialport,chardev=ctl0,name=org.tern.control
    local console=$dir/console-$name.log
    # to_guest WORD ANSWER: WORD to the guest's control port, again each
    # second until ANSWER is on the console (a word sent while the guest
    # does not read the port may be lost).
    to_guest() {
        local n=0
        until grep -aq "$2" "$console"; do
            ((n++ < 120)) || die "$name: the guest did not answer '$1' with '$2' in 120 s"
            python3 -c 'import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(sys.argv[2].encode() + b"\n"); time.sleep(1); s.close()' "$ctl" "$1" || sleep 1
        done
    }
    wait_console() { # LINE SECONDS
        local n=0
        until grep -aq "$1" "$console"; do
            kill -0 "$BOOT_PID" 2>/dev/null || { tail -n 30 "$console"; die "$name: the guest stopped before '$1'"; }
            ((n++ < $2 * 10)) || { tail -n 30 "$console"; die "$name: no '$1' from the guest in $2 s"; }
            sleep 0.1
        done
    }
    wait_console "guest: load running" 240
    sleep 2 # the load well under way

    step "$name: an app point through the agent, a crash point, under load"
    "$TERN" --state "$dir/state" tag vm1 frozen --freeze "qga:$qga" --json >"$dir/app.json" 2>"$dir/tag.log" ||
        { cat "$dir/tag.log"; die "$name: tern tag --freeze failed"; }
    json() { python3 -c 'import json, sys; v = json.load(open(sys.argv[1])); [v := v[k] for k in sys.argv[2:]]; print(v)' "$@"; }
    [[ $(json "$dir/app.json" consistency) == application ]] || { cat "$dir/app.json" "$dir/tag.log"; die "$name: the frozen tag is not application-consistent"; }
    echo "app point: $(json "$dir/app.json" freeze filesystems) filesystem(s) frozen, freeze answered in $(json "$dir/app.json" freeze freeze_seconds) s, frozen for $(json "$dir/app.json" freeze frozen_seconds) s"
    # scripts/bench-freeze.sh: more frozen tags under the load, timed.
    local i
    for ((i = 1; i <= ${TERN_FREEZE_ROUNDS:-0}; i++)); do
        "$TERN" -q --state "$dir/state" tag vm1 "bench-$i" --freeze "qga:$qga" --json >"$dir/bench.json" ||
            die "$name: frozen tag bench-$i failed"
        [[ $(json "$dir/bench.json" consistency) == application ]] || die "$name: frozen tag bench-$i: $(cat "$dir/bench.json")"
        echo "bench: freeze $(json "$dir/bench.json" freeze freeze_seconds) $(json "$dir/bench.json" freeze frozen_seconds)" |
            tee -a "${BENCH_OUT:-/dev/null}"
        sleep 1
    done
    sleep 2
    "$TERN" -q --state "$dir/state" failover vm1 --test --latest --name crash --json >"$dir/crash.json" ||
        die "$name: a test failover to the newest data (a crash point) failed"
    local app_seq crash_disk
    app_seq=$(json "$dir/app.json" seq)
    crash_disk=$(json "$dir/crash.json" disks disk0)
    (($(json "$dir/crash.json" seq) > app_seq)) || die "$name: the crash point is not past the app point"

    step "$name: an agent whose freeze hangs"
    to_guest hang "guest: agent hangs"
    local t0 t1
    t0=$(date +%s.%N)
    timeout 60 "$TERN" --state "$dir/state" tag vm1 hung --freeze "qga:$qga" --json >"$dir/hung.json" 2>"$dir/tag.log" ||
        { cat "$dir/tag.log"; die "$name: tern tag --freeze with a hung agent did not complete"; }
    t1=$(date +%s.%N)
    [[ $(json "$dir/hung.json" consistency) == crash ]] || { cat "$dir/hung.json"; die "$name: a tag whose freeze was never answered is not marked crash-consistent"; }
    json "$dir/hung.json" freeze reason | grep -q "did not answer guest-fsfreeze-freeze" ||
        { cat "$dir/hung.json"; die "$name: the crash-consistent tag does not say why"; }
    [[ $(json "$dir/hung.json" freeze thaw_confirmed) == True ]] || { cat "$dir/hung.json" "$dir/tag.log"; die "$name: the thaw after the hung freeze was not confirmed"; }
    echo "hung agent: tagged crash-consistent in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') s: $(json "$dir/hung.json" freeze reason)"
    to_guest check "guest: checking the thaw"
    local qrc=0
    wait "$BOOT_PID" || qrc=$?
    boot_result "$name" "$dir" "$qrc" || die "$name: the guest failed"

    step "$name: the points against the guest's filesystem"
    stop_pid "$SERVE_PID"; SERVE_PID=""
    "$TERN" -q --state "$dir/state" ship vm1 --once >>"$dir/ship.log" 2>&1 || true
    local points app_id hung_id
    for _ in $(seq 300); do
        points=$("$TERN" points vm1 --target "$dir/target" --json)
        app_id=$(python3 -c 'import json, sys; print(next((p["id"] for p in json.loads(sys.argv[1]) if p["label"] == sys.argv[2]), ""))' "$points" frozen)
        hung_id=$(python3 -c 'import json, sys; print(next((p["id"] for p in json.loads(sys.argv[1]) if p["label"] == sys.argv[2]), ""))' "$points" hung)
        [[ -n $app_id && -n $hung_id ]] && break
        sleep 0.2
    done
    [[ -n $app_id && -n $hung_id ]] || { tail -n 20 "$dir/apply.log"; die "$name: the applier took no point at the tags ($points)"; }
    "$TERN" points vm1 --target "$dir/target" | grep -E "frozen|hung"
    "$TERN" -q failover vm1 --test --point "$app_id" --name app --target "$dir/target" --cache "$dir/cache" --json >"$dir/appfo.json" ||
        die "$name: a test failover to the app point failed"
    local app_disk
    app_disk=$(json "$dir/appfo.json" disks disk0)
    features() { dumpe2fs -h "$1" 2>/dev/null | sed -n 's/^Filesystem features: *//p'; }
    echo "app point's filesystem features: $(features "$app_disk")"
    echo "crash point's filesystem features: $(features "$crash_disk")"
    [[ " $(features "$app_disk") " != *" needs_recovery "* ]] || die "$name: the app point's filesystem needs journal recovery: the guest was not frozen at the tag"
    e2fsck -fn "$app_disk" >"$dir/fsck-app.log" 2>&1 || { cat "$dir/fsck-app.log"; die "$name: e2fsck -fn of the app point is not clean"; }
    [[ " $(features "$crash_disk") " == *" needs_recovery "* ]] || die "$name: the crash point's filesystem needs no recovery: the check above proves nothing"
    e2fsck -fn "$crash_disk" >"$dir/fsck-crash.log" 2>&1 || true
    python3 -c 'import json, sys; p = {p["id"]: p for p in json.loads(sys.argv[1])}; assert p[sys.argv[2]]["consistency"] == "application", p[sys.argv[2]]; assert p[sys.argv[3]]["consistency"] == "crash", p[sys.argv[3]]' \
        "$points" "$app_id" "$hung_id" || die "$name: the points' consistency is not what the tags said"
    echo "app point $app_id: e2fsck -fn clean, no recovery needed; crash point (seq $(json "$dir/crash.json" seq)): needs recovery ($(grep -m1 -i recovery "$dir/fsck-crash.log" | tr -d '\r'))"
    echo "TERN-VM-OK $name"
}

for s in "${SCENARIOS[@]}"; do
    run_scenario "$s"
done

echo "vm-test: PASS in $(awk -v s="$START" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}')s"
