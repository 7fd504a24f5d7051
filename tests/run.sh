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
if [ "${#need[@]}" -gt 0 ]; then
  echo "== installing: ${need[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}"
fi

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build (the end-to-end tests start these binaries)"
cargo build --workspace --bins
echo "== cargo test"
cargo test --workspace
