#!/usr/bin/env bash
# The uplink fuzz target for a while on one store (see fuzz_targets/uplink.rs):
#
#   tests/fuzz/uplink.sh sqlite   [SECONDS] [CORPUS_DIR]
#   tests/fuzz/uplink.sh postgres [SECONDS] [CORPUS_DIR]
#
# SECONDS defaults to 600, CORPUS_DIR to tests/fuzz/corpus/uplink; crashes go to
# tests/fuzz/artifacts/uplink. Stable Rust: RUSTC_BOOTSTRAP=1 lets it take
# cargo-fuzz's -Z flags, and no sanitizer (the code under test is safe Rust; SQLite's
# C is not instrumented either way), which also doubles the speed. For PostgreSQL, a
# throwaway cluster is started as tests/run.sh does (initdb into a temporary directory
# as the `postgres` user, a free loopback port, fsync off) and stopped at the end,
# unless IMN_FUZZ_POSTGRES already names a server. One fuzzing job: the machine is
# shared.
set -euo pipefail
cd "$(dirname "$0")/../.."

store="${1:-sqlite}"
secs="${2:-600}"
corpus="${3:-tests/fuzz/corpus/uplink}"
export RUSTC_BOOTSTRAP=1

cargo fuzz build --fuzz-dir tests/fuzz --sanitizer none uplink

case "$store" in
  sqlite) unset IMN_FUZZ_POSTGRES ;;
  postgres)
    if [ -z "${IMN_FUZZ_POSTGRES:-}" ]; then
      PGBIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
      PGDIR="$(mktemp -d /tmp/imn-fuzz-pg.XXXXXX)"
      PGPORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
      as_pg=()
      if [ "$(id -u)" -eq 0 ]; then chown postgres: "$PGDIR"; as_pg=(runuser -u postgres --); fi
      "${as_pg[@]}" "$PGBIN/initdb" -D "$PGDIR/data" -U imn --auth=trust -E UTF8 --no-sync >/dev/null
      "${as_pg[@]}" "$PGBIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/log" -w \
        -o "-p $PGPORT -k $PGDIR -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off" \
        start >/dev/null
      trap '"${as_pg[@]}" "$PGBIN/pg_ctl" -D "$PGDIR/data" -m fast stop >/dev/null 2>&1; rm -rf "$PGDIR"' EXIT
      export IMN_FUZZ_POSTGRES="postgres://imn@127.0.0.1:$PGPORT/postgres"
    fi
    echo "== PostgreSQL at $IMN_FUZZ_POSTGRES"
    ;;
  *) echo "usage: $0 sqlite|postgres [SECONDS] [CORPUS_DIR]" >&2; exit 2 ;;
esac

mkdir -p "$corpus"
cargo fuzz run --fuzz-dir tests/fuzz --sanitizer none uplink "$corpus" -- \
  -max_total_time="$secs" -max_len=16384 -timeout=60 -rss_limit_mb=4096 -print_final_stats=1
