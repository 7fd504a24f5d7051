#!/usr/bin/env bash
# The whole test suite: installs the real peers the tests start (from Debian's
# archive, when missing), then formatting, lints, the build, and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
have nats-server   || need+=(nats-server)
have mosquitto     || need+=(mosquitto)
have mosquitto_pub || need+=(mosquitto-clients)
have fping         || need+=(fping)
have ip            || need+=(iproute2)
have nft           || need+=(nftables)
have dnsmasq       || need+=(dnsmasq-base)
# The tls_cert and http modules' end-to-end peer: `openssl s_server`.
have openssl       || need+=(openssl)
have python3       || need+=(python3 python3-pip)
# The API conformance fuzzing (tests/api-fuzz) runs schemathesis in a venv of
# Debian's own Python.
[ -x /usr/bin/python3 ] || need+=(python3)
venv_check="$(mktemp -d)"
/usr/bin/python3 -m venv "$venv_check/v" >/dev/null 2>&1 || need+=(python3-venv)
rm -rf "$venv_check"
# The WebAssembly example in C (modules/wasm/examples-c): clang and wasm-ld.
have clang         || need+=(clang)
have wasm-ld       || need+=(lld)
have promtool      || need+=(prometheus)
# The dashboard's browser test: Debian's chromium, driven by its chromedriver.
have chromium      || need+=(chromium)
have chromedriver  || need+=(chromium-driver)
# The power-cut test (tests/powercut/vm.sh): qemu (TCG), a static busybox for the
# guest's initramfs, mkfs.ext4 for its disk. Debian's kernel is downloaded by the test.
have qemu-system-x86_64 || need+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
have mkfs.ext4     || need+=(e2fsprogs)
# The PostgreSQL store's tests and the scale-out tests: Debian's server programs.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ "${#need[@]}" -gt 0 ]; then
  echo "== installing: ${need[*]}"
  # One index that fails to download (a foreign architecture's security index while its
  # mirror syncs, once cross/build.sh has added arm64 and armhf) must not stop the
  # suite: the install below still fails, and so does the suite, if a package it needs
  # cannot be had from what was fetched.
  if ! $SUDO apt-get update -q; then
    echo "== apt-get update reported a failure (above); installing from the indexes it did fetch"
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}"
fi

# The WebAssembly modules' tests build the example guests (modules/wasm): Rust's
# wasm32 target, from rustup's own distribution server.
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  echo "== installing the Rust target wasm32-unknown-unknown (rustup)"
  rustup target add wasm32-unknown-unknown
fi

# RIPE's own Atlas result parser, to prove our Atlas output reads as Atlas's.
if ! python3 -c "import ripe.atlas.sagan" >/dev/null 2>&1; then
  echo "== installing ripe.atlas.sagan (PyPI)"
  python3 -m pip install -q ripe.atlas.sagan || python3 -m pip install -q --break-system-packages ripe.atlas.sagan
fi
# The reference validator of OpenAPI documents, for /openapi.json.
if ! python3 -c "import openapi_spec_validator" >/dev/null 2>&1; then
  echo "== installing openapi-spec-validator (PyPI)"
  python3 -m pip install -q openapi-spec-validator || python3 -m pip install -q --break-system-packages openapi-spec-validator
fi

# PostgreSQL: every store test and scale-out test starts a throwaway cluster of its
# own (initdb on a free loopback port, as the `postgres` user). Not one shared server:
# readers by position wait for the oldest transaction anywhere in their cluster, so a
# test reading right after writing must not share one with other tests.

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build (the end-to-end tests start these binaries)"
cargo build --workspace --bins
echo "== firmware: static musl agents for aarch64, armv7, x86_64 in profiles full and router, their .deb and .ipk, size ledger and budgets (cross/build.sh)"
bash cross/build.sh
echo "== fuzz targets build (they are run by hand: see tests/fuzz/Cargo.toml)"
cargo check --manifest-path tests/fuzz/Cargo.toml --bins
echo "== benchmark harness, tiny runs (figures come from full runs; see README)"
./target/debug/imn-bench ping --quick --json
./target/debug/imn-bench drain --quick --json
./target/debug/imn-bench outbox --quick --json
./target/debug/imn-bench api --quick --json
./target/debug/imn-bench otel --quick --json
./target/debug/imn-bench ingest --quick --json
./target/debug/imn-bench ingest --nats --quick --json
./target/debug/imn-bench ingest --auth --quick --json
./target/debug/imn-bench ingest --postgres --quick --json
./target/debug/imn-bench ingest --postgres --backends 1,3 --quick --json
./target/debug/imn-bench fleet --quick --json
./target/debug/imn-bench firmware --quick --json
./target/debug/imn-bench wasm --quick --json
echo "== API conformance fuzzing: schemathesis against imn up in a loopback-only network namespace (tests/api-fuzz)"
bash tests/api-fuzz/run.sh target/debug/imn
echo "== vendored crates' own tests"
# Outside the workspace (its `exclude`), so `cargo test --workspace` does not run them;
# see each crate's IMN-PATCH.md.
cargo test -p rumqttd
cargo test -p sled --lib
cargo test -p rumqttc --lib
echo "== the WebAssembly guest library and examples' own tests (native; modules/wasm is a workspace of its own)"
cargo test --locked --manifest-path modules/wasm/Cargo.toml
echo "== cargo test"
log="$(mktemp)"
cargo test --workspace 2>&1 | tee "$log"
# One closing line for the whole suite (cargo's own last line is a doc-test crate's).
awk '/^test result:/ {p += $4; f += $6} END {printf "total: %d passed, %d failed\n", p, f}' "$log"
rm -f "$log"
