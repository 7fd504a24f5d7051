#!/usr/bin/env bash
# Builds static imn-agent firmware and its packages.
#
#   cross/build.sh [--no-packages] [TARGET...]
#
# TARGET is a Rust triple or a short name: aarch64, armv7, x86_64 (default: all three).
# Installs the cross toolchain from Debian's archive when it is missing (rustc 1.85 from
# rustc-web, the GNU cross linkers, the target standard libraries, qemu-user-static);
# safe to rerun. Binaries go to target/TRIPLE/release/imn-agent, packages to
# target/packages/, and a size report to target/packages/sizes.txt.
#
# The build uses Debian's rustc 1.85 (the agent's MSRV) with cargo's `firmware` profile
# (opt-level z, fat LTO, one codegen unit, stripped) and `-C target-feature=+crt-static`,
# so each binary has no dynamic dependencies and runs on glibc and musl systems alike.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

RUST_V="1.85.0+dfsg3-1~deb12u3"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

packages=1
targets=()
for a in "$@"; do
  case "$a" in
    --no-packages) packages=0 ;;
    aarch64 | aarch64-unknown-linux-gnu) targets+=(aarch64-unknown-linux-gnu) ;;
    armv7 | armv7-unknown-linux-gnueabihf) targets+=(armv7-unknown-linux-gnueabihf) ;;
    x86_64 | x86_64-unknown-linux-gnu) targets+=(x86_64-unknown-linux-gnu) ;;
    -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "cross/build.sh: unknown target or flag: $a (want aarch64, armv7, x86_64)" >&2; exit 2 ;;
  esac
done
if [ "${#targets[@]}" -eq 0 ]; then
  targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf x86_64-unknown-linux-gnu)
fi

# Debian architecture, GNU linker and rustlib folder for each triple.
deb_arch() {
  case "$1" in
    aarch64-*) echo arm64 ;; armv7-*) echo armhf ;; x86_64-*) echo amd64 ;;
  esac
}
linker() {
  case "$1" in
    aarch64-*) echo aarch64-linux-gnu-gcc ;; armv7-*) echo arm-linux-gnueabihf-gcc ;; x86_64-*) echo gcc ;;
  esac
}

apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then
    $SUDO apt-get update -q || true # a foreign security index may fail; that does no harm
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "$@"
}

ensure_toolchain() {
  local need=() t a
  for t in "${targets[@]}"; do
    a="$(deb_arch "$t")"
    if [ "$a" != amd64 ] && ! dpkg --print-foreign-architectures | grep -qx "$a"; then
      $SUDO dpkg --add-architecture "$a"
      apt_updated=0
    fi
  done
  if ! /usr/bin/rustc --version 2>/dev/null | grep -q '^rustc 1\.85\.'; then
    need+=("rustc-web=$RUST_V" "cargo-web=$RUST_V" "libstd-rust-web-dev=$RUST_V" "libstd-rust-web-1.85=$RUST_V")
  fi
  for t in "${targets[@]}"; do
    case "$t" in
      aarch64-*) command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
                 command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static) ;;
      armv7-*) command -v arm-linux-gnueabihf-gcc >/dev/null || need+=(gcc-arm-linux-gnueabihf) ;;
      x86_64-*) [ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev) ;;
    esac
  done
  command -v file >/dev/null || need+=(file)
  if [ "${#need[@]}" -gt 0 ]; then
    echo "== installing: ${need[*]}"
    apt_install "${need[@]}"
  fi
  # The target standard libraries: Debian ships them per architecture, and they are not
  # co-installable with the host's, so unpack them next to it.
  for t in "${targets[@]}"; do
    a="$(deb_arch "$t")"
    [ "$a" = amd64 ] && continue
    if [ ! -d "/usr/lib/rustlib/$t/lib" ]; then
      echo "== unpacking the $t standard library"
      local tmp
      tmp="$(mktemp -d)"
      if [ "$apt_updated" -eq 0 ]; then $SUDO apt-get update -q || true; apt_updated=1; fi
      (cd "$tmp" && apt-get download "libstd-rust-web-dev:$a=$RUST_V" && dpkg -x ./*.deb x)
      $SUDO cp -r "$tmp/x/usr/lib/rustlib/$t" /usr/lib/rustlib/
      rm -rf "$tmp"
    fi
  done
}

# The linker's own default script for a static executable, changed to drop the unwind
# tables (.eh_frame, .eh_frame_hdr; 390 KiB of the aarch64 agent). Nothing unwinds in
# firmware: it aborts on panic, and a backtrace just comes out empty. Only the C runtime's
# start files keep their (empty) frame, which crtbegin registers at start.
linker_script() {
  local t="$1" out="target/cross/$1-no-unwind.ld"
  mkdir -p target/cross
  "$(linker "$t")" -static -no-pie -Wl,--verbose -x c /dev/null -o /dev/null 2>/dev/null |
    sed -n '/^=\{50\}$/,/^=\{50\}$/p' | sed '1d;$d' |
    sed -e '/^  \.eh_frame_hdr /d' \
        -e 's|^  \.eh_frame       : ONLY_IF_RO .*|  .eh_frame       : ONLY_IF_RO { KEEP (*crtbegin*.o(.eh_frame)) KEEP (*crtend*.o(.eh_frame)) }|' \
        -e '/^  \.eh_frame       : ONLY_IF_RW/d' \
        -e 's|^  /DISCARD/ : { \(.*\)}|  /DISCARD/ : { \1 *(.eh_frame) *(.eh_frame.*) *(.eh_frame_hdr) }|' >"$out.new" || true
  if ! grep -q 'KEEP (\*crtbegin\*.o(.eh_frame))' "$out.new" || ! grep -q '/DISCARD/.*eh_frame_hdr' "$out.new"; then
    echo "cross/build.sh: could not derive a linker script from $(linker "$t")'s default" >&2
    exit 1
  fi
  mv "$out.new" "$out"
  echo "$ROOT/$out"
}

build_one() {
  local t="$1" up script
  up="$(echo "$t" | tr 'a-z-' 'A-Z_')"
  script="$(linker_script "$t")"
  echo "== building imn-agent for $t (rustc $(/usr/bin/rustc --version | cut -d' ' -f2), profile firmware)"
  # Static, not position-independent (x86_64 would make a static PIE: bigger, and its
  # start-up relocates itself), and no unwind tables.
  env "CARGO_TARGET_${up}_LINKER=$(linker "$t")" \
      "CARGO_TARGET_${up}_RUSTFLAGS=-C target-feature=+crt-static -C relocation-model=static -C force-unwind-tables=no -C link-arg=-Wl,-T,$script -C link-arg=-Wl,--no-eh-frame-hdr --remap-path-prefix=$HOME/.cargo/registry/src= --remap-path-prefix=$ROOT=imn" \
      RUSTC=/usr/bin/rustc \
      cargo build --locked -q --profile firmware --target "$t" -p imn-agent
  mkdir -p "target/$t/release"
  cp "target/$t/firmware/imn-agent" "target/$t/release/imn-agent"
  local bin="target/$t/release/imn-agent"
  # Static means no interpreter and no shared libraries.
  if readelf -l "$bin" | grep -q 'Requesting program interpreter' || readelf -d "$bin" | grep -q NEEDED; then
    echo "cross/build.sh: $bin is not static:" >&2
    readelf -d "$bin" | grep NEEDED >&2 || true
    exit 1
  fi
}

ensure_toolchain
mkdir -p target/packages
report="target/packages/sizes.txt"
: >"$report.new"
for t in "${targets[@]}"; do
  build_one "$t"
  if [ "$packages" -eq 1 ]; then
    bash cross/package.sh deb "$t"
    bash cross/package.sh ipk "$t"
  fi
done
# The report covers every target built so far, not only this run's.
for t in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf x86_64-unknown-linux-gnu; do
  b="target/$t/release/imn-agent"
  [ -e "$b" ] && printf '%-44s %9d bytes  %s\n' "$t" "$(stat -c %s "$b")" "$(file -b "$b" | cut -d, -f1-2)" >>"$report.new"
done
for f in target/packages/*.deb target/packages/*.ipk; do
  [ -e "$f" ] && printf '%-44s %9d bytes\n' "$(basename "$f")" "$(stat -c %s "$f")" >>"$report.new"
done
mv "$report.new" "$report"
echo "== sizes ($ROOT/$report)"
cat "$report"
