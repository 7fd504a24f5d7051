#!/usr/bin/env bash
# Builds the example WebAssembly modules (release, wasm32-unknown-unknown, from the
# committed Cargo.lock) and copies them to modules/wasm/out/ (not committed), printing
# their sizes. Runs from any directory: cargo reads this workspace's
# .cargo/config.toml (the small stack) only when run from here.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

target=wasm32-unknown-unknown
modules=(stun tcp_banner dns_tcp)

if command -v rustup >/dev/null 2>&1 \
    && ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    echo "build.sh: the Rust target $target is not installed (rustup target add $target)" >&2
    exit 1
fi

cargo build --release --locked --target "$target"

mkdir -p out
for m in "${modules[@]}"; do
    cp "target/$target/release/$m.wasm" "out/$m.wasm"
done

echo
echo "modules in $here/out:"
for m in "${modules[@]}"; do
    size=$(wc -c <"out/$m.wasm")
    printf '  %-16s %8d bytes (%d KiB)\n' "$m.wasm" "$size" $(((size + 1023) / 1024))
done
