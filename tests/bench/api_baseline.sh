#!/usr/bin/env bash
# Echo round trips with an API token under `imn up --auth`: this build against an
# earlier one, in the order this, old, old, this (see README, Benchmarks).
#
#   tests/bench/api_baseline.sh OLD_RELEASE_DIR           # a measure token (budgeted)
#   ADMIN=1 tests/bench/api_baseline.sh OLD_RELEASE_DIR   # the admin token (no budget)
#
# OLD_RELEASE_DIR holds the earlier build's `imn`; this build's `imn` and `imn-bench`
# come from target/release (cargo build --release --workspace --bins). Loopback only.
set -euo pipefail
cd "$(dirname "$0")/../.."
OLD="$1/imn"
NEW="$PWD/target/release"
free() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
for which in this old old this; do
  if [ "$which" = this ]; then B="$NEW/imn"; else B="$OLD"; fi
  D="$(mktemp -d /tmp/imn-api-baseline.XXXXXX)"; P="$(free)"; Q="$(free)"
  "$B" up --auth --agents 1 --http "127.0.0.1:$P" --mqtt "127.0.0.1:$Q" --data "$D/data" >"$D/log" 2>&1 &
  pid=$!
  for _ in $(seq 150); do
    [ -s "$D/data/admin-token" ] && curl -sf "http://127.0.0.1:$P/livez" >/dev/null && break
    sleep 0.2
  done
  if [ "${ADMIN:-}" = 1 ]; then
    cp "$D/data/admin-token" "$D/tok"
  else
    "$B" tokens add bench --scopes read,measure --rate-per-min 1000000 \
      --url "http://127.0.0.1:$P" --token-file "$D/data/admin-token" |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])' >"$D/tok"
  fi
  "$NEW/imn-bench" api --url "http://127.0.0.1:$P" --token-file "$D/tok" \
    --requests 1000 --rate 100 --json 2>/dev/null | tail -1 |
    python3 -c "import json, sys; d = json.load(sys.stdin); print('$which', {k: d[k] for k in ('rtt_p50_ms', 'rtt_p99_ms', 'max_rps', 'failures', 'max_rps_failures')})"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$D"
done
