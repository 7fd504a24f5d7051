"""Summary of an api-fuzz run, from schemathesis's ndjson events and the document.

Prints one line per operation (cases, statuses answered, whether a success answer was
checked against its documented schema), then the totals: operations, cases, checks
run and failed, and how many documented success responses were checked against live
answers. Exits 1 if any check failed. Usage: summary.py EVENTS.ndjson OPENAPI.json
"""
import collections
import json
import sys

events, doc_path = sys.argv[1], sys.argv[2]
doc = json.load(open(doc_path))
documented = {}
for path, ops in doc["paths"].items():
    for method, op in ops.items():
        documented[f"{method.upper()} {path}"] = sorted(s for s in op["responses"] if s.startswith("2"))

cases = collections.Counter()
statuses = collections.defaultdict(collections.Counter)
checks = collections.Counter()
failed = collections.Counter()
# (operation, 2xx status) whose body response_schema_conformance checked.
schema_checked = set()
for line in open(events):
    e = json.loads(line)
    f = e.get("ScenarioFinished")
    if not f:
        continue
    rec = f["recorder"]
    label = rec["label"]
    # Stateful scenarios are labelled by their steps; count each by its own operation.
    for case_id, inter in rec.get("interactions", {}).items():
        resp = inter.get("response") or {}
        code = resp.get("status_code")
        req = inter.get("request", {})
        op = label if label in documented else None
        if op is None:
            case = rec["cases"].get(case_id, {}).get("value", {})
            op = f'{case.get("method", req.get("method", "?"))} {case.get("path", "?")}'
        cases[op] += 1
        if code is not None:
            statuses[op][code] += 1
        for c in rec.get("checks", {}).get(case_id, []):
            checks[c["name"]] += 1
            if c["status"] != "success":
                failed[c["name"]] += 1
            if c["name"] == "response_schema_conformance" and c["status"] == "success" and code and 200 <= code < 300:
                schema_checked.add((op, str(code)))

width = max(len(k) for k in documented)
print(f'{"operation".ljust(width)}  cases  statuses answered')
for op in sorted(documented):
    seen = " ".join(f"{s}×{n}" for s, n in sorted(statuses[op].items()))
    ok = [s for s in documented[op] if (op, s) in schema_checked]
    mark = ("schema checked: " + ",".join(ok)) if ok else "no success answer checked"
    print(f"{op.ljust(width)}  {cases[op]:5}  {seen}   [{mark}]")
all_success = {(op, s) for op, ss in documented.items() for s in ss}
print()
print(f"operations: {len(documented)} documented, {sum(1 for op in documented if cases[op])} exercised")
print(f"cases (requests): {sum(cases.values())}")
print("checks run: " + ", ".join(f"{k} {v}" for k, v in sorted(checks.items())))
print(f"checks failed: {sum(failed.values())}" + (" (" + ", ".join(f"{k} {v}" for k, v in failed.items()) + ")" if failed else ""))
print(f"documented success responses checked against live answers: {len(schema_checked & all_success)} of {len(all_success)}")
sys.exit(1 if failed else 0)
