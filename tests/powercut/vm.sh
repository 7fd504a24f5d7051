#!/usr/bin/env bash
# PROTOTYPE (issue 24, work in progress): a qemu VM that runs the static x86_64 agent
# with its data on an ext4 virtio disk, and whose only network is one forwarded port
# to a broker on the host's loopback. Killing qemu with SIGKILL is the power cut.
#
#   tests/powercut/vm.sh prepare WORKDIR AGENT_BINARY   # kernel, initramfs, disk
#   tests/powercut/vm.sh boot WORKDIR HOST_MQTT_PORT     # boots in the background; pid in WORKDIR/qemu.pid
#
# Tried by hand on 2026-12-05: TCG boots to the agent in about 3 s of guest time (the
# agent was alive at the backend 9 s after qemu started). Needs qemu-system-x86,
# busybox-static, e2fsprogs, and Debian's kernel package (downloaded, not installed).
set -euo pipefail
cmd="$1"; W="$2"
case "$cmd" in
  prepare)
    AGENT="$3"
    mkdir -p "$W" && cd "$W"
    if [ ! -d k ]; then
      pkg="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')"
      apt-get download "$pkg" >/dev/null 2>&1
      dpkg-deb -x "$pkg"_*.deb k
    fi
    M="$(ls -d "$W"/k/lib/modules/*/kernel)"
    rm -rf ir && mkdir -p ir/{bin,proc,sys,dev,data,lib/modules}
    cp /bin/busybox ir/bin/busybox
    for a in sh mount insmod ip cat echo ls sleep; do ln -sf busybox "ir/bin/$a"; done
    # In dependency order (modinfo -F depends).
    mods="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk crc16 crc32c_generic libcrc32c mbcache jbd2 ext4 failover net_failover virtio_net"
    for m in $mods; do cp "$(find "$M" -name "$m.ko" | head -1)" ir/lib/modules/; done
    cp "$AGENT" ir/bin/imn-agent
    cat > ir/init <<INIT
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $mods; do insmod /lib/modules/\$m.ko || echo "INSMOD FAILED \$m"; done
ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2
mount -t ext4 /dev/vda /data || echo "MOUNT FAILED"
echo "IMN-BOOTED \$(cat /proc/uptime)"
exec /bin/imn-agent --id vm1 --broker mqtt://10.0.2.100:1883 --data /data/agent --heartbeat-ms 1000 > /dev/console 2>&1
INIT
    chmod +x ir/init
    (cd ir && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > ../initrd.gz)
    rm -f disk.img && truncate -s 64M disk.img && mkfs.ext4 -q -F disk.img
    ;;
  boot)
    PORT="$3"; cd "$W"
    # restrict=on: the guest reaches nothing but the guestfwd to the host's loopback.
    qemu-system-x86_64 -machine q35,accel=tcg -m 256 -smp 1 \
      -kernel k/boot/vmlinuz-* -initrd initrd.gz \
      -append "console=ttyS0 panic=-1 loglevel=3" -nographic -no-reboot \
      -drive file=disk.img,if=virtio,format=raw,cache=writeback \
      -netdev "user,id=n,restrict=on,guestfwd=tcp:10.0.2.100:1883-tcp:127.0.0.1:$PORT" \
      -device virtio-net-pci,netdev=n >>vm.log 2>&1 &
    echo $! > qemu.pid
    ;;
esac
