#!/usr/bin/env bash
# Packages a built agent: cross/package.sh deb|ipk TRIPLE [PROFILE]
# (cross/build.sh calls this; the binary must be at target/firmware/PROFILE/TRIPLE/imn-agent;
# PROFILE is full, the default, or router). `cross/package.sh ipk-arch TRIPLE` prints the
# OpenWrt architecture a package for TRIPLE is labelled with.
#
# .deb: dpkg-deb from Debian, the full profile, package `imn-agent`. .ipk: OpenWrt's
# layout, built as OpenWrt's ipkg-build does (a gzipped tar of debian-binary,
# control.tar.gz and data.tar.gz), with the same tar: the router profile is package
# `imn-agent`, the full one `imn-agent-full` (Provides and Conflicts: imn-agent, as
# OpenWrt names its variants). Files are owned by root, and every archive is
# reproducible (fixed mtime and order).
set -euo pipefail
cd "$(dirname "$0")/.."
kind="$1"
triple="$2"
profile="${3:-full}"
ipk_arch() {
  # OpenWrt architecture names; override with IPK_ARCH for a specific target's name.
  case "$1" in
    aarch64-*) echo "${IPK_ARCH:-aarch64_generic}" ;;
    armv7-*) echo "${IPK_ARCH:-arm_cortex-a7_neon-vfpv4}" ;;
    x86_64-*) echo "${IPK_ARCH:-x86_64}" ;;
    *) echo "no OpenWrt architecture for $1" >&2; exit 1 ;;
  esac
}
if [ "$kind" = ipk-arch ]; then ipk_arch "$triple"; exit 0; fi
case "$profile" in full | router) ;; *) echo "cross/package.sh: profile is full or router (got $profile)" >&2; exit 2 ;; esac
# IMN_PKG_BIN packages another build (the update tests package imn-agent-next as a
# later version, with IMN_PKG_VERSION and IMN_PKG_OUT).
bin="${IMN_PKG_BIN:-target/firmware/$profile/$triple/imn-agent}"
[ -x "$bin" ] || { echo "cross/package.sh: $bin missing; run cross/build.sh --profile $profile $triple" >&2; exit 1; }
version="${IMN_PKG_VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)}"
out="${IMN_PKG_OUT:-target/packages}"
# The Ed25519 public keys (hex, comma- or space-separated) whose signed releases the
# packaged agent installs: written into its config.
keys="$(echo "${IMN_UPDATE_KEYS:-}" | tr ',' ' ')"
for k in $keys; do
  case "$k" in
    *[!0-9a-fA-F]*) echo "cross/package.sh: IMN_UPDATE_KEYS: $k is not hex" >&2; exit 2 ;;
  esac
  [ "${#k}" -eq 64 ] || { echo "cross/package.sh: IMN_UPDATE_KEYS: $k is not 64 hex digits" >&2; exit 2; }
done
mkdir -p "$out"
# SOURCE_DATE_EPOCH pins every timestamp (reproducible builds); the last commit's time.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}"
TAR=(tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH")
maintainer="IMN developers <imn@example.org>"
if [ "$profile" = full ]; then
  modules="ping, tcping, traceroute, mtr, dns, http, tls_cert, ntp, echo"
else
  modules="ping, tcping, traceroute, mtr, dns, ntp, echo (no http or tls_cert: see imn-agent-full)"
fi
description="IMN measurement agent ($profile): $modules; keeps every result in an on-disk outbox and syncs it over MQTT."
size_kb=$(( ($(stat -c %s "$bin") + 1023) / 1024 ))

case "$kind" in
deb)
  [ "$profile" = full ] || { echo "cross/package.sh: the .deb is the full profile" >&2; exit 2; }
  case "$triple" in
    aarch64-*) arch=arm64 ;; armv7-*) arch=armhf ;; x86_64-*) arch=amd64 ;;
    *) echo "no Debian architecture for $triple" >&2; exit 1 ;;
  esac
  root="$(mktemp -d)"
  trap 'rm -rf "$root"' EXIT
  install -D -m 0755 "$bin" "$root/usr/bin/imn-agent"
  install -D -m 0644 cross/deb/imn-agent.service "$root/lib/systemd/system/imn-agent.service"
  install -D -m 0640 cross/deb/agent.toml "$root/etc/imn/agent.toml"
  if [ -n "$keys" ]; then
    toml_keys="$(printf '"%s", ' $keys)"
    sed -i "s/^update_keys = \[\]$/update_keys = [${toml_keys%, }]/" "$root/etc/imn/agent.toml"
  fi
  install -D -m 0644 cross/README.md "$root/usr/share/doc/imn-agent/README"
  install -d -m 0755 "$root/DEBIAN"
  install -m 0755 cross/deb/postinst cross/deb/prerm cross/deb/postrm "$root/DEBIAN/"
  echo /etc/imn/agent.toml >"$root/DEBIAN/conffiles"
  chmod 0644 "$root/DEBIAN/conffiles"
  cat >"$root/DEBIAN/control" <<CONTROL
Package: imn-agent
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $size_kb
Pre-Depends: passwd
Section: net
Priority: optional
Homepage: https://github.com/imn/imn
Description: $description
 A static binary with no library dependencies. Runs as the imn-agent user with only
 CAP_NET_RAW; config in /etc/imn/agent.toml, outbox in /var/lib/imn-agent.
CONTROL
  find "$root" -type d -exec chmod 0755 {} +
  f="$out/imn-agent_${version}_${arch}.deb"
  dpkg-deb --root-owner-group -Zxz --build "$root" "$f" >/dev/null
  echo "$f"
  ;;
ipk)
  arch="$(ipk_arch "$triple")"
  name=imn-agent
  variant=""
  if [ "$profile" = full ]; then
    name=imn-agent-full
    variant="Provides: imn-agent
Conflicts: imn-agent
"
  fi
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  d="$work/data" c="$work/control"
  install -D -m 0755 "$bin" "$d/usr/bin/imn-agent"
  install -D -m 0755 cross/openwrt/imn-agent.init "$d/etc/init.d/imn-agent"
  install -D -m 0600 cross/openwrt/imn.config "$d/etc/config/imn"
  for k in $keys; do
    printf "\tlist update_keys '%s'\n" "$k" >>"$d/etc/config/imn"
  done
  install -d -m 0755 "$c"
  install -m 0755 cross/openwrt/postinst cross/openwrt/prerm "$c/"
  echo /etc/config/imn >"$c/conffiles"
  cat >"$c/control" <<CONTROL
Package: $name
Version: $version
${variant}Source: imn
SourceName: $name
License: MIT
Section: net
Architecture: $arch
Installed-Size: $(( size_kb * 1024 ))
Maintainer: $maintainer
Description: $description
CONTROL
  chmod 0644 "$c/control" "$c/conffiles"
  find "$d" "$c" -type d -exec chmod 0755 {} +
  echo "2.0" >"$work/debian-binary"
  (cd "$d" && "${TAR[@]}" -cf - . | gzip -9n >"$work/data.tar.gz")
  (cd "$c" && "${TAR[@]}" -cf - . | gzip -9n >"$work/control.tar.gz")
  f="$out/${name}_${version}_${arch}.ipk"
  case "$f" in /*) dest="$f" ;; *) dest="$PWD/$f" ;; esac
  (cd "$work" && "${TAR[@]}" -cf - ./debian-binary ./control.tar.gz ./data.tar.gz | gzip -9n >"$dest")
  echo "$f"
  ;;
*) echo "usage: cross/package.sh deb|ipk TRIPLE" >&2; exit 2 ;;
esac
