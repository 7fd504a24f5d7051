#!/usr/bin/env bash
# The API's conformance fuzzing: schemathesis (PyPI, pinned below) generates requests
# from /openapi.json, for every operation, and checks every answer against the
# document: no server error, a documented status code, content type and headers, a
# body matching the documented schema, and schema-invalid input refused. It runs
# coverage, fuzzing and stateful phases (following the document's links) with a fixed
# seed and a bounded number of cases.
#
# The target is a real `imn up` (backend, broker, bridge and two agents), run inside a
# network namespace of its own where only loopback is up: whatever target the fuzzer
# invents for a measurement cannot leave the machine. The namespace's routes are
# checked before anything starts.
#
# Usage: tests/api-fuzz/run.sh [IMN_BINARY]   (root: it creates a namespace)
# Env: IMN_FUZZ_EXAMPLES (cases per operation and phase, default 25), IMN_FUZZ_SEED
# (default 31), IMN_FUZZ_KEEP=1 keeps the work directory, IMN_FUZZ_ARGS more
# arguments for `st run` (to look into one operation: --include-path /admin/tokens).
set -euo pipefail
cd "$(dirname "$0")/../.."

imn="${1:-target/debug/imn}"
examples="${IMN_FUZZ_EXAMPLES:-25}"
seed="${IMN_FUZZ_SEED:-31}"
version="4.32.5"
venv="target/api-fuzz-venv"
checks="not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection"

[ -x "$imn" ] || { echo "api-fuzz: no $imn (cargo build --bin imn first)"; exit 1; }

# schemathesis in a venv of Debian's own Python (3.11.2): Python 3.11.7, which pyenv
# may put first in PATH, fails inside hypothesis ("AST constructor recursion depth
# mismatch", a CPython regression).
py=/usr/bin/python3
# What is installed is pinned, dependencies included (requirements.txt).
stamp="$venv/requirements.txt"
if ! cmp -s tests/api-fuzz/requirements.txt "$stamp" || ! "$venv/bin/st" --version 2>/dev/null | grep -q "$version"; then
  echo "== api-fuzz: installing schemathesis $version and its pinned dependencies (PyPI) into $venv"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --no-deps -r tests/api-fuzz/requirements.txt
  "$venv/bin/pip" check
  cp tests/api-fuzz/requirements.txt "$stamp"
fi

work="$(mktemp -d /tmp/imn-api-fuzz.XXXXXX)"
ns="imn-apifuzz-$$"
# A run killed outright (SIGKILL) leaves its namespace and processes: remove those of
# runs whose shell is gone.
for old in $(ip netns list 2>/dev/null | awk '/^imn-apifuzz-/ {print $1}'); do
  if ! kill -0 "${old#imn-apifuzz-}" 2>/dev/null; then
    pids="$(ip netns pids "$old" 2>/dev/null || true)"
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    ip netns del "$old" 2>/dev/null || true
    rm -rf "/etc/netns/$old"
  fi
done
cleanup() {
  local pids
  pids="$(ip netns pids "$ns" 2>/dev/null || true)"
  if [ -n "$pids" ]; then
    kill $pids 2>/dev/null || true
    sleep 1
    kill -9 $pids 2>/dev/null || true
  fi
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "/etc/netns/$ns"
  if [ "${IMN_FUZZ_KEEP:-0}" = 1 ]; then echo "api-fuzz: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# Names, too, stay inside: `ip netns exec` mounts /etc/netns/NS/* over /etc, so its
# processes resolve from /etc/hosts, then a name server on the namespace's own
# loopback (none answers), never through a host daemon's UNIX socket (nscd,
# systemd-resolved), which a network namespace does not cut off.
mkdir -p "/etc/netns/$ns"
printf 'nameserver 127.0.0.1\n' > "/etc/netns/$ns/resolv.conf"
printf 'hosts: files dns\n' > "/etc/netns/$ns/nsswitch.conf"
ip netns add "$ns"
ip -n "$ns" link set lo up
# Only loopback: one link, no IPv4 route in the main table, IPv6's only ::1, and no
# route to any address outside.
links="$(ip -n "$ns" -o link show | awk -F': ' '{print $2}' | tr '\n' ' ')"
v4="$(ip -n "$ns" -4 route show table main)"
v6="$(ip -n "$ns" -6 route show table main | grep -v '^::1 dev lo ' || true)"
if [ "$links" != "lo " ] || [ -n "$v4" ] || [ -n "$v6" ] \
   || ip -n "$ns" route get 192.0.2.1 >/dev/null 2>&1 \
   || ip -n "$ns" -6 route get 2001:db8::1 >/dev/null 2>&1; then
  echo "api-fuzz: namespace $ns is not loopback-only (links: $links; v4: $v4; v6: $v6); not starting"
  exit 1
fi
if [ "$(ip netns exec "$ns" cat /etc/resolv.conf)" != "nameserver 127.0.0.1" ]; then
  echo "api-fuzz: the namespace's resolv.conf is not its own; not starting"
  exit 1
fi
echo "== api-fuzz: namespace $ns: links: $links; no route out, names resolved on its own loopback (checked)"

port=8000
ip netns exec "$ns" "$imn" up --http "127.0.0.1:$port" --mqtt 127.0.0.1:1883 \
  --data "$work/data" --agents 2 --heartbeat-ms 1000 > "$work/imn-up.log" 2>&1 &
up_pid=$!
ready=0
for _ in $(seq 120); do
  if ip netns exec "$ns" "$venv/bin/python" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null; then
    ready=1; break
  fi
  kill -0 "$up_pid" 2>/dev/null || break
  sleep 0.5
done
if [ "$ready" != 1 ]; then
  echo "api-fuzz: imn up did not answer /health"; tail -50 "$work/imn-up.log"; exit 1
fi

# The configuration: ours (tests/api-fuzz/schemathesis.toml), plus what exists on
# this server, read from its API (its agents and modules) or made through it (a run,
# a one-off and a recurring measurement, an alert rule). The fuzzer draws half of the
# ids and most module names from these, so that its requests reach things that
# exist instead of stopping at 404.
ip netns exec "$ns" "$venv/bin/python" - "$port" tests/api-fuzz/schemathesis.toml "$work/schemathesis.toml" <<'PY'
import json, sys, urllib.request
port, ours, out = sys.argv[1], sys.argv[2], sys.argv[3]
base = f"http://127.0.0.1:{port}"
get = lambda p: json.load(urllib.request.urlopen(base + p, timeout=10))
def post(p, body):
    req = urllib.request.Request(base + p, json.dumps(body).encode(), {"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=30))
json.dump(get("/openapi.json"), open(out.replace("schemathesis.toml", "openapi.json"), "w"))
agents = [a["id"] for a in get("/agents")]
modules = [m["name"] for m in get("/modules")]
assert agents and modules, (agents, modules)
echo = {"message": "api-fuzz"}
run = post(f"/agent/{agents[0]}/echo_module?wait=10", echo)["request_id"]
once = post("/v1/measurements", {"module": "echo_module", "agents": {"all": True}, "params": echo})["id"]
every = post("/v1/measurements", {"module": "echo_module", "agents": {"ids": agents[:1]}, "params": echo, "schedule": {"interval_s": 60}})["id"]
rule = post("/v1/alert-rules", {"name": "api-fuzz", "measurement_id": once})["id"]
ids = agents + [once, every, rule]
# The dashboard's assets, as its page names them.
import re
page = urllib.request.urlopen(base + "/", timeout=10).read().decode()
assets = sorted(set(re.findall(r'/ui/([A-Za-z0-9_.-]+)', page))) or ["app.js"]
with open(out, "w") as f:
    f.write(open(ours).read())
    f.write('"path.id" = { dictionary = "ids", probability = 0.5 }\n')
    f.write('"path.request_id" = { dictionary = "requests", probability = 0.5 }\n')
    f.write('"path.module" = { dictionary = "modules", probability = 0.7 }\n')
    f.write('"path.file" = { dictionary = "assets", probability = 0.5 }\n')
    f.write('"body.module" = { dictionary = "modules", probability = 0.7 }\n')
    f.write('"body.measurement_id" = { dictionary = "measurements", probability = 0.7 }\n')
    f.write('"query.measurement" = { dictionary = "measurements", probability = 0.5 }\n')
    f.write("\n[dictionaries.ids]\nvalues = %s\n" % json.dumps(ids))
    f.write("\n[dictionaries.requests]\nvalues = %s\n" % json.dumps([run]))
    f.write("\n[dictionaries.measurements]\nvalues = %s\n" % json.dumps([once, every]))
    f.write("\n[dictionaries.modules]\nvalues = %s\n" % json.dumps(modules))
    f.write("\n[dictionaries.assets]\nvalues = %s\n" % json.dumps(assets))
print(f"== api-fuzz: agents {agents}; modules {modules}; made run {run}, measurements {once} and {every}, alert rule {rule}")
PY

echo "== api-fuzz: schemathesis $version, seed $seed, $examples cases per operation and phase; checks: $checks"
set +e
(cd "$work" && ip netns exec "$ns" "$OLDPWD/$venv/bin/st" --config-file "$work/schemathesis.toml" run "http://127.0.0.1:$port/openapi.json" \
  --checks "$checks" \
  --phases coverage,fuzzing,stateful \
  --seed "$seed" --max-examples "$examples" --workers 2 \
  --request-timeout 20 \
  --report junit,ndjson --report-junit-path "$work/junit.xml" --report-ndjson-path "$work/events.ndjson" \
  --no-color ${IMN_FUZZ_ARGS:-}) > "$work/st.log" 2>&1
rc=$?
set -e
# The summary: operations, cases, failures; then per operation, from the events.
sed -n '/= SUMMARY =/,$p' "$work/st.log"
"$venv/bin/python" tests/api-fuzz/summary.py "$work/events.ndjson" "$work/openapi.json" || rc=1
if [ "$rc" != 0 ]; then
  echo "api-fuzz: schemathesis failed (exit $rc); its whole output:"
  cat "$work/st.log"
  echo "--- imn up's log (last 80 lines)"
  tail -80 "$work/imn-up.log"
  exit "$rc"
fi
if ! kill -0 "$up_pid" 2>/dev/null; then
  echo "api-fuzz: imn up exited during the run"; tail -80 "$work/imn-up.log"; exit 1
fi
if grep -q "panicked" "$work/imn-up.log"; then
  echo "api-fuzz: imn up panicked"; grep -n -A5 panicked "$work/imn-up.log" | head -40; exit 1
fi
echo "== api-fuzz: passed"
