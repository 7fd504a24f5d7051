#!/usr/bin/env bash
# The power-cut rig (tests/tests/powercut.rs): a qemu VM that runs the static x86_64
# agent with its data on an ext4 virtio disk, and whose only network is one forwarded
# port to the host's loopback. Killing qemu with SIGKILL is the power cut; booting
# again on the same disk image is the power coming back.
#
#   tests/powercut/vm.sh prepare WORKDIR AGENT_BINARY   # kernel, initramfs, disk
#   tests/powercut/vm.sh boot WORKDIR HOST_MQTT_PORT PROBE_PORT [DISK]
#       boots in the background (pid in WORKDIR/qemu.pid, console in WORKDIR/vm.log).
#       Each guest connection to 10.0.2.100:1883 runs `busybox nc 127.0.0.1 PORT` on
#       the host: a fresh TCP connection per MQTT session. slirp's restrict=on drops
#       everything else the guest sends; at boot the guest tries 10.0.2.2:PROBE_PORT
#       (slirp's alias for the host, where the test listens) and prints ISOLATED or
#       NOT-ISOLATED. DISK is the drive's file (default disk.img; an nbd:// URL for
#       the volatile-cache disk of tests/src/nbd.rs). cache=writeback: qemu passes the
#       guest's flushes on (to the image file with fdatasync, or as NBD flushes).
#
# TCG, not KVM (KVM hung at boot here): about 3 s of guest time to the agent, 9 to
# 14 s of wall time on this machine. Needs qemu-system-x86, busybox-static,
# e2fsprogs, and Debian's kernel package (downloaded with apt-get, not installed).
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
    for a in sh mount insmod ip cat echo ls sleep nc; do ln -sf busybox "ir/bin/$a"; done
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
probe=0
for w in \$(cat /proc/cmdline); do case \$w in imn.probe=*) probe=\${w#imn.probe=};; esac; done
if nc -w 2 10.0.2.2 \$probe </dev/null >/dev/null 2>&1; then echo "NOT-ISOLATED"; else echo "ISOLATED"; fi
echo "IMN-BOOTED \$(cat /proc/uptime)"
# Sectors the guest wrote to its disk (the 7th field), for flash writes per result.
(while true; do echo "VDA-STAT \$(cat /proc/uptime) \$(cat /sys/block/vda/stat)"; sleep 5; done) &
exec /bin/imn-agent --id vm1 --broker mqtt://10.0.2.100:1883 --data /data/agent --heartbeat-ms 1000 --resend-timeout-ms 3000 --keepalive-s 5 > /dev/console 2>&1
INIT
    chmod +x ir/init
    (cd ir && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > ../initrd.gz)
    rm -f disk.img && truncate -s 64M disk.img && mkfs.ext4 -q -F disk.img
    ;;
  boot)
    PORT="$3"; PROBE="$4"; DISK="${5:-disk.img}"; cd "$W"
    # restrict=on: the guest reaches nothing but the guestfwd to the host's loopback.
    qemu-system-x86_64 -machine q35,accel=tcg -m 256 -smp 1 \
      -kernel k/boot/vmlinuz-* -initrd initrd.gz \
      -append "console=ttyS0 panic=-1 loglevel=3 imn.probe=$PROBE" -nographic -no-reboot \
      -drive "file=$DISK,if=virtio,format=raw,cache=writeback" \
      -netdev "user,id=n,restrict=on,guestfwd=tcp:10.0.2.100:1883-cmd:busybox nc 127.0.0.1 $PORT" \
      -device virtio-net-pci,netdev=n >>vm.log 2>&1 </dev/null &
    echo $! > qemu.pid
    ;;
esac
