#!/usr/bin/env bash
# Builds static imn-agent firmware (musl) and its packages, and checks the size budgets.
#
#   cross/build.sh [--no-packages] [--no-next] [--profile full|router|all] [TARGET...]
#   cross/build.sh --check-only    # no build: rewrite the ledger, check the budgets
#
# TARGET is a short name or a Rust triple: aarch64, armv7, x86_64 (default: all three).
# Profiles (default: all): `full` has every module; `router` leaves out http and
# tls_cert (hyper, h2, x509-parser). Installs the toolchain from Debian's archive when
# it is missing (rustc 1.85 from rustc-web and its std sources, musl for each
# architecture, the GNU cross linkers musl's wrappers drive, LLVM's libunwind,
# qemu-user-static); safe to rerun.
#
# Output: target/firmware/PROFILE/TRIPLE/imn-agent (stripped; `imn-agent.unstripped`
# beside it keeps the symbols), packages in target/packages/, and the size ledger
# cross/sizes.md (binary, packages and the biggest crates per target and profile).
# With the full profile, aarch64 and x86_64 also get `imn-agent-next`: the same agent
# stamped one version on, which the over-the-air update tests install (--no-next: not).
# Exits non-zero when a binary or package is over its budget in cross/budgets.txt.
# IMN_BUDGETS and IMN_LEDGER name other files for the budgets and the ledger.
#
# std is rebuilt for size (`-Z build-std`, `optimize_for_size`, `panic_immediate_abort`,
# no backtrace printer) and panics carry no source locations (`-Z location-detail`):
# that needs RUSTC_BOOTSTRAP=1 with Debian's stable rustc 1.85, as distributions do
# for such builds. This script is the only place that sets it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

RUST_V="1.85.0+dfsg3-1~deb12u3"
# The packages' names, versions and place are this script's (the ledger and the
# budgets look for them there); relabel a package with cross/package.sh itself.
unset IPK_ARCH IMN_PKG_VERSION IMN_PKG_OUT
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

packages=1
build=1
next=1
BUDGETS="${IMN_BUDGETS:-cross/budgets.txt}"
LEDGER="${IMN_LEDGER:-cross/sizes.md}"
profiles=(full router)
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-packages) packages=0 ;;
    --no-next) next=0 ;;
    --check-only) build=0 ;;
    --profile)
      shift
      case "${1:-}" in
        full | router) profiles=("$1") ;;
        all) profiles=(full router) ;;
        *) echo "cross/build.sh: --profile wants full, router or all (got '${1:-}')" >&2; exit 2 ;;
      esac ;;
    aarch64 | aarch64-unknown-linux-musl) targets+=(aarch64-unknown-linux-musl) ;;
    armv7 | armv7-unknown-linux-musleabihf) targets+=(armv7-unknown-linux-musleabihf) ;;
    x86_64 | x86_64-unknown-linux-musl) targets+=(x86_64-unknown-linux-musl) ;;
    -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "cross/build.sh: unknown target or flag: $1 (want aarch64, armv7, x86_64, --profile, --no-packages, --no-next)" >&2; exit 2 ;;
  esac
  shift
done
if [ "${#targets[@]}" -eq 0 ]; then
  targets=(aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf x86_64-unknown-linux-musl)
fi
ALL_TARGETS=(aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf x86_64-unknown-linux-musl)

# The version stamped on imn-agent-next: the package's with one more part (0.1.0 → 0.1.0.1).
next_version() {
  echo "$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1).1"
}

# Debian architecture, musl's gcc wrapper, and the binutils prefix for each triple.
deb_arch() {
  case "$1" in aarch64-*) echo arm64 ;; armv7-*) echo armhf ;; x86_64-*) echo amd64 ;; esac
}
musl_gcc() {
  case "$1" in
    aarch64-*) echo aarch64-linux-musl-gcc ;; armv7-*) echo arm-linux-musleabihf-gcc ;; x86_64-*) echo x86_64-linux-musl-gcc ;;
  esac
}
binutils() {
  case "$1" in aarch64-*) echo aarch64-linux-gnu- ;; armv7-*) echo arm-linux-gnueabihf- ;; x86_64-*) echo "" ;; esac
}
musl_libdir() {
  case "$1" in
    aarch64-*) echo /usr/lib/aarch64-linux-musl ;; armv7-*) echo /usr/lib/arm-linux-musleabihf ;; x86_64-*) echo /usr/lib/x86_64-linux-musl ;;
  esac
}

apt_updated=0
apt_update() {
  if [ "$apt_updated" -eq 0 ]; then
    $SUDO apt-get update -q || true # a foreign security index may fail; that does no harm
    apt_updated=1
  fi
}
apt_install() {
  apt_update
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
  [ -d /usr/lib/rustlib/src/rust/library/std ] || need+=("rust-web-src=$RUST_V")
  for t in "${targets[@]}"; do
    a="$(deb_arch "$t")"
    command -v "$(musl_gcc "$t")" >/dev/null || {
      if [ "$a" = amd64 ]; then need+=(musl-tools musl-dev); else need+=("musl-dev:$a"); fi
    }
    case "$t" in
      aarch64-*) command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
                 command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static) ;;
      armv7-*) command -v arm-linux-gnueabihf-gcc >/dev/null || need+=(gcc-arm-linux-gnueabihf)
               command -v qemu-arm-static >/dev/null || need+=(qemu-user-static) ;;
    esac
  done
  command -v file >/dev/null || need+=(file)
  command -v python3 >/dev/null || need+=(python3)
  if [ "${#need[@]}" -gt 0 ]; then
    echo "== installing: ${need[*]}"
    apt_install $(printf '%s\n' "${need[@]}" | sort -u)
  fi
  # LLVM's libunwind, which std links for musl targets (-lunwind). The GNU one that comes
  # with the glibc cross compilers needs glibc's _dl_find_object. Debian's
  # libunwind-14-dev is not co-installable across architectures, so each one is
  # unpacked into target/cross/ instead.
  for t in "${targets[@]}"; do
    a="$(deb_arch "$t")"
    local dir="target/cross/libunwind-$a"
    if [ ! -e "$dir/libunwind.a" ]; then
      echo "== unpacking LLVM's libunwind for $a"
      apt_update
      local tmp
      tmp="$(mktemp -d)"
      chmod 0755 "$tmp" # apt's download sandbox user must be able to write here
      (cd "$tmp" && apt-get download -q "libunwind-14-dev:$a" && dpkg -x ./*.deb x)
      mkdir -p "$dir"
      cp "$tmp/x/usr/lib/llvm-14/lib/libunwind.a" "$dir/libunwind.a"
      rm -rf "$tmp"
    fi
  done
}

build_one() {
  # $3: a version to stamp (IMN_AGENT_VERSION) on a build written as imn-agent-next.
  local t="$1" profile="$2" stamp="${3:-}" up feats out name=imn-agent
  if [ -n "$stamp" ]; then name=imn-agent-next; fi
  up="$(echo "$t" | tr 'a-z-' 'A-Z_')"
  case "$profile" in
    full) feats=(--features full) ;;
    router) feats=(--no-default-features --features router) ;;
  esac
  out="target/firmware/$profile/$t"
  # armv7: Thumb-2 code (as OpenWrt and Debian's armhf build), not the target's
  # default A32: the same instructions in less space.
  local arch_flags=""
  case "$t" in armv7-*) arch_flags="-C target-feature=+thumb-mode" ;; esac
  echo "== building $name${stamp:+ (version $stamp)} for $t, profile $profile (rustc $(/usr/bin/rustc --version | cut -d' ' -f2), musl, std built for size)"
  # Static and not position-independent (a static PIE relocates itself at start);
  # musl's own start files and libc, found by its gcc wrapper, not Rust's copy
  # (link-self-contained=no). std is built for size and aborts at once on a panic
  # (panic_immediate_abort: no panic messages or hook, 130 KiB; the restarted agent
  # still reports the interrupted run, see edge-agent/src/crash.rs), and no code keeps
  # its source location (-Z location-detail=none: 130 KiB of file names and lines).
  # No RELRO: in a static binary it protects a few pointers, and its page alignment
  # pads the file by up to 64 KiB (28 KiB on aarch64).
  # Symbols are kept here and stripped below, so the ledger measures the file that ships.
  env "CARGO_TARGET_${up}_LINKER=$(musl_gcc "$t")" \
      "CARGO_TARGET_${up}_RUSTFLAGS=-C target-feature=+crt-static -C link-self-contained=no -C relocation-model=static -L $ROOT/target/cross/libunwind-$(deb_arch "$t") -Z location-detail=none -C link-arg=-Wl,-z,norelro $arch_flags --remap-path-prefix=$HOME/.cargo/registry/src= --remap-path-prefix=$ROOT=imn" \
      CARGO_PROFILE_FIRMWARE_STRIP=false \
      RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 ${stamp:+IMN_AGENT_VERSION="$stamp"} \
      /usr/bin/cargo build --locked -q --profile firmware --target "$t" -p imn-agent "${feats[@]}" \
      -Z build-std=std,panic_abort -Z build-std-features=optimize_for_size,panic_immediate_abort
  mkdir -p "$out"
  local bin="$out/$name"
  if [ -n "$stamp" ]; then
    "$(binutils "$t")strip" --strip-all -o "$bin" "target/$t/firmware/imn-agent"
  else
    cp "target/$t/firmware/imn-agent" "$out/imn-agent.unstripped"
    "$(binutils "$t")strip" --strip-all -o "$bin" "$out/imn-agent.unstripped"
  fi
  # Static means no interpreter and no shared libraries.
  if readelf -l "$bin" | grep -q 'Requesting program interpreter' || readelf -d "$bin" | grep -q NEEDED; then
    echo "cross/build.sh: $bin is not static:" >&2
    readelf -d "$bin" | grep NEEDED >&2 || true
    exit 1
  fi
}

# The ledger: one section per profile and target that has been built (this run or an
# earlier one), with the biggest crates measured on the unstripped binary.
write_ledger() {
  local f="$LEDGER" p t a bin ring c_args
  {
    echo "# Firmware size ledger"
    echo
    echo "Written by \`bash cross/build.sh\`; commit it with the change that moved it."
    echo "Budgets are in \`cross/budgets.txt\`. Code by crate is \`cross/ledger.py\` on the"
    echo "unstripped binary (functions with a symbol; \`[outlined]\` is code the machine"
    echo "outliner shared between crates)."
    echo
    echo "| profile | target | binary | .ipk | .deb |"
    echo "|---|---|---:|---:|---:|"
    for p in full router; do
      for t in "${ALL_TARGETS[@]}"; do
        bin="target/firmware/$p/$t/imn-agent"
        [ -e "$bin" ] || continue
        printf '| %s | %s | %s | %s | %s |\n' "$p" "$t" "$(fmt_size "$bin")" \
          "$(fmt_size "$(pkg_path ipk "$p" "$t")")" "$(fmt_size "$(pkg_path deb "$p" "$t")")"
      done
    done
    for p in full router; do
      for t in "${ALL_TARGETS[@]}"; do
        bin="target/firmware/$p/$t/imn-agent.unstripped"
        [ -e "$bin" ] || continue
        # ring's C and assembly, from every ring build left (none after a clean).
        c_args=()
        while read -r ring; do
          [ -n "$ring" ] && c_args+=(--c "ring=$ring")
        done < <(compgen -G "target/$t/firmware/build/ring-*/out/libring_core*.a" || true)
        echo
        echo "## $p, $t"
        echo
        python3 cross/ledger.py "$(binutils "$t")nm" "$bin" --top 15 \
          --c "libc=$(musl_libdir "$t")/libc.a" "${c_args[@]}" \
          --c "libunwind=target/cross/libunwind-$(deb_arch "$t")/libunwind.a"
      done
    done
  } >"$f.new"
  mv "$f.new" "$f"
}

fmt_size() {
  if [ -n "$1" ] && [ -e "$1" ]; then
    local b
    b="$(stat -c %s "$1")"
    printf "%d B (%d KiB)" "$b" "$(( (b + 512) / 1024 ))"
  else
    echo "—"
  fi
}

# Where package.sh puts each package (empty: none for this profile).
pkg_path() {
  local kind="$1" p="$2" t="$3" v
  v="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
  case "$kind" in
    deb) [ "$p" = full ] && echo "target/packages/imn-agent_${v}_$(deb_arch "$t").deb" ;;
    ipk)
      local name=imn-agent
      [ "$p" = full ] && name=imn-agent-full
      echo "target/packages/${name}_${v}_$(IPK_ARCH= bash cross/package.sh ipk-arch "$t").ipk" ;;
  esac
}

# Budgets: `PROFILE TARGET WHAT MAX_BYTES [# comment]` lines, WHAT being bin, ipk or deb.
# A file this run built must be there; with --no-packages the packages are not checked
# (those on disk may be older than the binaries); --check-only checks what it finds,
# and fails if that is nothing.
built_now() {
  local p="$1" t="$2" x
  [ "$build" -eq 1 ] || return 1
  for x in "${profiles[@]}"; do [ "$x" = "$p" ] && break; x=""; done
  [ -n "$x" ] || return 1
  for x in "${targets[@]}"; do [ "$x" = "$t" ] && return 0; done
  return 1
}
check_budgets() {
  local over=0 checked=0 p t what max f size
  while read -r p t what max _; do
    case "$p" in '' | '#'*) continue ;; esac
    if ! [[ "$max" =~ ^[0-9]+$ ]] || ! [[ "$what" =~ ^(bin|ipk|deb)$ ]]; then
      echo "cross/build.sh: $BUDGETS: cannot read the line '$p $t $what $max' (want PROFILE TARGET bin|ipk|deb BYTES)" >&2
      return 1
    fi
    case "$what" in
      bin) f="target/firmware/$p/$t/imn-agent" ;;
      *) [ "$build" -eq 1 ] && [ "$packages" -eq 0 ] && continue
         f="$(pkg_path "$what" "$p" "$t")" ;;
    esac
    [ -n "$f" ] || continue
    if [ ! -e "$f" ]; then
      if built_now "$p" "$t"; then
        echo "cross/build.sh: $f is missing, though this run built $p $t" >&2
        over=1
      fi
      continue
    fi
    checked=$((checked + 1))
    size="$(stat -c %s "$f")"
    if [ "$size" -gt "$max" ]; then
      echo "cross/build.sh: OVER BUDGET: $p $t $what is $size bytes, budget $max ($BUDGETS)" >&2
      over=1
    else
      printf '   %-7s %-32s %-4s %9d of %9d bytes (%d%%)\n' "$p" "$t" "$what" "$size" "$max" $(( size * 100 / max ))
    fi
  done <"$BUDGETS"
  if [ "$checked" -eq 0 ]; then
    echo "cross/build.sh: no file of $BUDGETS was there to check" >&2
    return 1
  fi
  return "$over"
}

if [ "$build" -eq 1 ]; then
  ensure_toolchain
  mkdir -p target/packages
  for t in "${targets[@]}"; do
    for p in "${profiles[@]}"; do
      build_one "$t" "$p"
      if [ "$packages" -eq 1 ]; then
        if [ "$p" = full ]; then bash cross/package.sh deb "$t" full; fi
        bash cross/package.sh ipk "$t" "$p"
      fi
    done
    # The over-the-air update tests (tests/tests/lifecycle.rs) install a newer build
    # of the same agent: this one, stamped one version on (`VERSION.1`). Only the
    # agent crate is rebuilt for it.
    if [ "$next" -eq 1 ] && [[ " ${profiles[*]} " == *" full "* ]]; then
      case "$t" in aarch64-* | x86_64-*) build_one "$t" full "$(next_version)" ;; esac
    fi
  done
fi
write_ledger
echo "== size ledger ($LEDGER)"
sed -n '/^| profile/,/^$/p' "$LEDGER"
echo "== budgets ($BUDGETS)"
check_budgets
