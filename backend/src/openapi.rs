//! The API described as OpenAPI 3.1, served at `/openapi.json`. Module parameters use
//! the modules' own JSON Schemas (draft 2020-12, which OpenAPI 3.1 speaks), so the
//! document cannot drift from what the backend validates. A unit test checks that every
//! route in the router is here, and the end-to-end test that every operation here is
//! served.

use imn_proto::catalog;
use serde_json::{json, Map, Value};

/// A parameter: `name`, where (`query`, `path`, `header`), its schema, description.
fn param(name: &str, at: &str, schema: Value, description: &str) -> Value {
    json!({
        "name": name,
        "in": at,
        "required": at == "path",
        "schema": schema,
        "description": description,
    })
}

fn path_id(name: &str, what: &str) -> Value {
    param(name, "path", json!({"type": "string"}), what)
}

fn string() -> Value {
    json!({"type": "string"})
}

fn integer(min: i64) -> Value {
    json!({"type": "integer", "minimum": min})
}

/// A selection that names some agents, as every operation that acts on a selection
/// requires.
fn chosen_agents() -> Value {
    json!({"allOf": [schema_ref("Selection"), {"description": "at least one criterion", "anyOf": [
        {"required": ["ids"], "properties": {"ids": {"minItems": 1}}},
        {"required": ["tags"], "properties": {"tags": {"minItems": 1}}},
        {"required": ["country"], "properties": {"country": {"type": "string"}}},
        {"required": ["asn"], "properties": {"asn": {"type": "integer"}}},
        {"required": ["all"], "properties": {"all": {"const": true}}},
    ]}]})
}

/// The longest run timeout an operator may set on a module: a day.
const MAX_MODULE_TIMEOUT_MS: u64 = 86_400_000;

/// The largest integer a JSON number holds exactly (2^53 - 1): the bound of counts
/// and sizes a client may give.
const MAX_SAFE: u64 = 9_007_199_254_740_991;

/// An agent's (or token's) id: what `wire::valid_agent_id` takes.
fn agent_id() -> Value {
    json!({"type": "string", "pattern": format!("^[A-Za-z0-9_-]{{1,{}}}$", imn_proto::wire::MAX_AGENT_ID_LEN)})
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// A Server-Sent Events stream, described by its events (as OpenAPI 3.2 does, and
/// schemathesis checks each event against): `event` one of `kinds`, `id` matching
/// `id`, `data` JSON of `data`'s schema.
fn sse_content(kinds: &[&str], id: &str, data: Value) -> Value {
    json!({"text/event-stream": {"schema": {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"type": "string", "enum": kinds},
            "id": {"type": "string", "pattern": id},
            "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data},
        },
    }}})
}

fn list(item: &str) -> Value {
    json!({"type": "array", "items": schema_ref(item)})
}

fn json_content(schema: Value) -> Value {
    json!({"application/json": {"schema": schema}})
}

/// An operation: summary, the scope it needs, parameters, a JSON body schema, the
/// success response (status, description, content), and the error statuses it can
/// answer with (each the `Error` object).
struct Op {
    summary: &'static str,
    scope: Option<&'static str>,
    params: Vec<Value>,
    body: Option<Value>,
    ok: (u16, &'static str, Value),
    errors: &'static [u16],
}

impl Op {
    /// Whether an empty body is taken (as "no settings").
    fn body_optional(&self) -> bool {
        self.body == Some(schema_ref("ModuleSettings"))
    }

    fn to_json(&self, id: String) -> Value {
        let mut responses = Map::new();
        responses.insert(
            self.ok.0.to_string(),
            json!({"description": self.ok.1, "content": self.ok.2}),
        );
        // Every route can be refused by auth and rate limits when auth is on.
        let mut errors: Vec<u16> = self.errors.to_vec();
        // A parameter that does not parse is refused before the handler runs (400,
        // naming it); a body that is not JSON (400), over the limit (413), or outside
        // its schema (422).
        if !self.params.is_empty() || self.body.is_some() {
            errors.push(400);
        }
        if self.body.is_some() {
            errors.extend([413, 422]);
        }
        if self.scope.is_some() {
            errors.extend([401, 403, 429]);
        }
        errors.push(500);
        errors.sort_unstable();
        errors.dedup();
        for e in errors {
            responses.insert(
                e.to_string(),
                json!({"$ref": format!("#/components/responses/E{e}")}),
            );
        }
        let mut op = json!({
            "operationId": id,
            "summary": self.summary,
            "parameters": self.params,
            "responses": responses,
        });
        match self.scope {
            Some(scope) => {
                op["x-imn-scope"] = json!(scope);
                op["security"] = json!([{"bearer": []}, {}]);
            }
            None => op["security"] = json!([{}]),
        }
        if let Some(b) = &self.body {
            op["requestBody"] =
                json!({"required": !self.body_optional(), "content": json_content(b.clone())});
        }
        op
    }
}

fn ok_json(status: u16, what: &'static str, schema: Value) -> (u16, &'static str, Value) {
    (status, what, json_content(schema))
}

/// A status check's answer, in each of its formats.
fn status_check_content() -> Value {
    json!({
        "application/json": {"schema": schema_ref("StatusCheck")},
        "text/plain": {"schema": {"type": "string"}},
    })
}

fn text(what: &'static str, media: &str) -> (u16, &'static str, Value) {
    (200, what, json!({media: {"schema": {"type": "string"}}}))
}

/// The filters of alert and anomaly event lists (`stream`: the stream's).
fn event_params(stream: bool) -> Vec<Value> {
    let mut v = vec![
        param(
            "after",
            "query",
            json!({"type": "string", "pattern": "^e[0-9]+$"}),
            "an event id: events after it",
        ),
        param("rule", "query", string(), "alert rule id"),
        param("measurement", "query", string(), "measurement id"),
        param("agent", "query", string(), "agent id (anomalies)"),
    ];
    if stream {
        v.push(param(
            "type",
            "query",
            json!({"type": "string", "enum": ["alert", "anomaly"]}),
            "only this kind",
        ));
    } else {
        v.push(param(
            "limit",
            "query",
            json!({"type": "integer", "minimum": 1, "maximum": 1000}),
            "at most this many (default 100)",
        ));
        v.push(param(
            "order",
            "query",
            json!({"type": "string", "enum": ["oldest", "newest"]}),
            "which `limit` events after `after`: the oldest (default) or the newest; listed oldest first either way",
        ));
    }
    v
}

/// Every operation: (method, path, operation).
fn operations() -> Vec<(&'static str, &'static str, Op)> {
    let read = Some("read");
    let measure = Some("measure");
    let admin = Some("admin");
    let agent = || path_id("id", "agent id");
    let limit = |max: i64| {
        param(
            "limit",
            "query",
            json!({"type": "integer", "minimum": 1, "maximum": max}),
            "at most this many",
        )
    };
    // An agent's newest results or events: more than 10,000 reads as 10,000.
    let newest = || {
        param(
            "limit",
            "query",
            json!({"type": "integer", "minimum": 1, "maximum": u32::MAX}),
            "at most this many (default 100; more than 10,000 is read as 10,000)",
        )
    };
    let after = || {
        param(
            "after",
            "query",
            string(),
            "the last agent id of the page before (as the Link header gives it)",
        )
    };
    let format = || {
        param(
            "format",
            "query",
            json!({"type": "string", "enum": ["native", "atlas"]}),
            "atlas: RIPE Atlas's result format (ping results)",
        )
    };
    let filters = || {
        vec![
            param("agent", "query", string(), "agent id"),
            param("module", "query", string(), "module name"),
            param("measurement", "query", string(), "measurement id"),
            param(
                "since",
                "query",
                string(),
                "RFC 3339 or ms since the epoch (agent time), inclusive",
            ),
            param(
                "until",
                "query",
                string(),
                "RFC 3339 or ms since the epoch, exclusive",
            ),
        ]
    };
    let sse = || {
        (
            200,
            "Server-Sent Events: event `result`, id = the result's cursor, data = a Result",
            sse_content(&["result"], "^c[0-9]+$", schema_ref("Result")),
        )
    };
    let max_s = || {
        param(
            "max_s",
            "query",
            json!({"type": "number", "exclusiveMinimum": 0, "maximum": 86400}),
            "end the stream after this many seconds (reconnect with Last-Event-ID to go on); default: until the client leaves",
        )
    };
    let last_event_id = || {
        param(
            "Last-Event-ID",
            "header",
            string(),
            "resume after this event id (EventSource sends it on reconnect)",
        )
    };
    let object = || json!({"type": "object"});
    let mut results_params = filters();
    results_params.extend([
        limit(1000),
        param(
            "cursor",
            "query",
            string(),
            "next_cursor of the page before",
        ),
        format(),
    ]);
    let mut stream_params = filters();
    stream_params.extend([
        param(
            "cursor",
            "query",
            string(),
            "start after this cursor (default: now)",
        ),
        last_event_id(),
        max_s(),
    ]);
    vec![
        (
            "get",
            "/",
            Op {
                summary: "The fleet dashboard (HTML)",
                scope: None,
                params: vec![],
                body: None,
                ok: text("the dashboard", "text/html"),
                errors: &[],
            },
        ),
        (
            "get",
            "/ui/{file}",
            Op {
                summary: "Dashboard and docs assets",
                scope: None,
                params: vec![param("file", "path", json!({"type": "string", "examples": crate::ui::ASSETS.iter().map(|a| a.0).collect::<Vec<_>>()}), "asset name")],
                body: None,
                // Each asset's own type, as the server sends it.
                ok: (200, "the asset", {
                    let mut types = Map::new();
                    for (_, ty, _) in crate::ui::ASSETS {
                        let media = ty.split(';').next().unwrap_or(ty).trim();
                        types.insert(media.to_string(), json!({"schema": {"type": "string"}}));
                    }
                    Value::Object(types)
                }),
                errors: &[404],
            },
        ),
        (
            "get",
            "/docs",
            Op {
                summary: "Interactive API documentation (HTML)",
                scope: None,
                params: vec![],
                body: None,
                ok: text("the docs page", "text/html"),
                errors: &[],
            },
        ),
        (
            "get",
            "/openapi.json",
            Op {
                summary: "This document",
                scope: None,
                params: vec![],
                body: None,
                ok: ok_json(200, "OpenAPI 3.1", object()),
                errors: &[],
            },
        ),
        (
            "get",
            "/health",
            Op {
                summary: "Backend health: agents, requests, store and bus",
                scope: read,
                params: vec![],
                body: None,
                ok: ok_json(200, "health", schema_ref("Health")),
                errors: &[503],
            },
        ),
        (
            "get",
            "/livez",
            Op {
                summary: "Liveness probe (no auth)",
                scope: None,
                params: vec![],
                body: None,
                ok: text("ok", "text/plain"),
                errors: &[],
            },
        ),
        (
            "get",
            "/metrics",
            Op {
                summary: "Prometheus metrics",
                scope: read,
                params: vec![],
                body: None,
                ok: text("Prometheus text format 0.0.4", "text/plain"),
                errors: &[],
            },
        ),
        (
            "get",
            "/agents",
            Op {
                summary: "Agents, optionally selected",
                scope: read,
                params: vec![
                    param(
                        "tag",
                        "query",
                        string(),
                        "comma-separated; the agent has them all",
                    ),
                    param("country", "query", string(), "ISO 3166-1 alpha-2"),
                    param("asn", "query", integer(0), "AS number"),
                    param(
                        "alive",
                        "query",
                        json!({"type": "boolean"}),
                        "alive now, or not",
                    ),
                    limit(10_000),
                    after(),
                ],
                body: None,
                ok: ok_json(
                    200,
                    "the agents matching, by id: a page of `limit` (default 1,000), the Link header names the next",
                    list("Agent"),
                ),
                errors: &[400],
            },
        ),
        (
            "get",
            "/agents/alive",
            Op {
                summary: "Agents alive now",
                scope: read,
                params: vec![limit(10_000), after()],
                body: None,
                ok: ok_json(
                    200,
                    "the agents alive now, by id: a page of `limit` (default 1,000), the Link header names the next",
                    list("Agent"),
                ),
                errors: &[400],
            },
        ),
        (
            "get",
            "/agents/{id}",
            Op {
                summary: "One agent",
                scope: read,
                params: vec![agent()],
                body: None,
                ok: ok_json(200, "the agent", schema_ref("Agent")),
                errors: &[404],
            },
        ),
        (
            "get",
            "/agents/{id}/results",
            Op {
                summary: "An agent's results, newest first",
                scope: read,
                params: vec![agent(), newest(), format()],
                body: None,
                ok: ok_json(200, "results (format=atlas: RIPE Atlas results)", json!({"anyOf": [list("Result"), list("AtlasResult")]})),
                errors: &[400, 404],
            },
        ),
        (
            "get",
            "/agents/{id}/results/{request_id}",
            Op {
                summary: "One result by request id",
                scope: read,
                params: vec![agent(), path_id("request_id", "request id"), format()],
                body: None,
                ok: ok_json(200, "the result (format=atlas: its RIPE Atlas results)", json!({"anyOf": [schema_ref("Result"), list("AtlasResult")]})),
                errors: &[400, 404],
            },
        ),
        (
            "get",
            "/agents/{id}/status",
            Op {
                summary:
                    "Connection history: intervals, first/last connected, status since, uptime %",
                scope: read,
                params: vec![
                    agent(),
                    param(
                        "window_s",
                        "query",
                        integer(1),
                        "seconds back from now (default 86400)",
                    ),
                ],
                body: None,
                ok: ok_json(200, "status history", schema_ref("StatusHistory")),
                errors: &[400, 404],
            },
        ),
        (
            "get",
            "/agents/{id}/events",
            Op {
                summary: "An agent's events, newest first",
                scope: read,
                params: vec![agent(), newest()],
                body: None,
                ok: ok_json(200, "events", json!({"type": "array", "items": object()})),
                errors: &[400, 404],
            },
        ),
        (
            "get",
            "/agents/{id}/heartbeats",
            Op {
                summary: "An agent's recent heartbeats (CPU, memory, load, network), oldest first",
                scope: read,
                params: vec![agent()],
                body: None,
                ok: ok_json(
                    200,
                    "heartbeats",
                    json!({"type": "array", "items": {"type": "object", "properties": {
                "at_ms": {"type": "integer"}, "cpu_pct": {"type": "number"},
                "mem_used_kib": {"type": "integer"}, "mem_total_kib": {"type": "integer"},
                "load1": {"type": "number"}, "rx_bytes": {"type": "integer"}, "tx_bytes": {"type": "integer"}}}}),
                ),
                errors: &[404],
            },
        ),
        (
            "put",
            "/agents/{id}/modules/{module}",
            Op {
                summary: "Load (and configure) a module on a connected agent (operator settings: admin)",
                scope: admin,
                params: vec![agent(), path_id("module", "module name")],
                body: Some(schema_ref("ModuleSettings")),
                ok: ok_json(202, "command sent", schema_ref("ModuleCommand")),
                errors: &[400, 404, 409, 422],
            },
        ),
        (
            "delete",
            "/agents/{id}/modules/{module}",
            Op {
                summary: "Unload a module from a connected agent (operator settings: admin)",
                scope: admin,
                params: vec![agent(), path_id("module", "module name")],
                body: None,
                ok: ok_json(202, "command sent", schema_ref("ModuleCommand")),
                errors: &[404, 409],
            },
        ),
        (
            "post",
            "/agent/{id}/{module}",
            Op {
                summary: "Run a module on one agent",
                scope: measure,
                params: vec![
                    agent(),
                    path_id("module", "module name (see /modules)"),
                    param(
                        "wait",
                        "query",
                        json!({"type": "number", "minimum": 0, "maximum": 300}),
                        "seconds to wait for the result",
                    ),
                    param(
                        "deadline",
                        "query",
                        json!({"type": "number", "minimum": 0.001, "maximum": 604800}),
                        "seconds the request may wait for its agent (default 86400)",
                    ),
                    param(
                        "Idempotency-Key",
                        "header",
                        json!({"type": "string", "minLength": 1, "maxLength": 256, "pattern": "^[\\t\\x20-\\x7e]+$"}),
                        "a retry with the same key returns the first request",
                    ),
                ],
                body: Some(
                    json!({"oneOf": catalog::names().iter().map(|m| schema_ref(&format!("params.{m}"))).collect::<Vec<_>>()}),
                ),
                ok: ok_json(
                    202,
                    "accepted (200 with the result when ?wait saw it finish)",
                    schema_ref("Request"),
                ),
                errors: &[400, 404, 409, 413, 422],
            },
        ),
        (
            "get",
            "/modules",
            Op {
                summary: "The module catalog with each module's parameter schema",
                scope: read,
                params: vec![],
                body: None,
                ok: ok_json(200, "modules", list("Module")),
                errors: &[],
            },
        ),
        (
            "get",
            "/modules/states/{request_id}",
            Op {
                summary: "A request's state and every transition",
                scope: read,
                params: vec![path_id("request_id", "request id")],
                body: None,
                ok: ok_json(200, "request with transitions", schema_ref("Request")),
                errors: &[404],
            },
        ),
        (
            "post",
            "/v1/measurements",
            Op {
                summary: "A measurement on many agents: one-off, or recurring with a schedule",
                scope: measure,
                params: vec![],
                body: Some(schema_ref("NewMeasurement")),
                ok: ok_json(
                    202,
                    "created; Location header names it",
                    schema_ref("MeasurementCreated"),
                ),
                errors: &[400, 404, 409, 413, 422],
            },
        ),
        (
            "get",
            "/v1/measurements/{id}",
            Op {
                summary: "Status, progress and per-agent states",
                scope: read,
                params: vec![path_id("id", "measurement id")],
                body: None,
                ok: ok_json(200, "the measurement", schema_ref("Measurement")),
                errors: &[404],
            },
        ),
        (
            "delete",
            "/v1/measurements/{id}",
            Op {
                summary: "Cancel what has not finished, or stop a schedule on every agent (the token that made it, or admin)",
                scope: measure,
                params: vec![path_id("id", "measurement id")],
                body: None,
                ok: ok_json(200, "stopped", json!({"type": "object", "required": ["id"], "properties": {"id": string(), "cancelled": integer(0)}})),
                errors: &[404],
            },
        ),
        (
            "get",
            "/v1/measurements/{id}/stream",
            Op {
                summary: "A measurement's results from its first, live",
                scope: read,
                params: vec![path_id("id", "measurement id"), last_event_id(), max_s()],
                body: None,
                ok: sse(),
                errors: &[400, 404],
            },
        ),
        (
            "get",
            "/v1/measurements/{id}/status-check",
            Op {
                summary: "Is the measurement's target healthy from every agent? 200 healthy, 503 not; for monitoring systems (format json, nagios or prometheus)",
                scope: read,
                params: {
                    let mut v = vec![path_id("id", "measurement id")];
                    for (name, what) in crate::checks::PARAMS {
                        let schema = match *name {
                            "max_breaching" => integer(0),
                            "window_s" => json!({"type": "integer", "minimum": 1, "maximum": crate::checks::MAX_WINDOW_S}),
                            "rtt_percentile" => json!({"type": "number", "minimum": 1, "maximum": 100}),
                            "max_loss" => json!({"type": "number", "minimum": 0, "maximum": 100}),
                            "reached" => json!({"type": "boolean", "const": true}),
                            "format" => json!({"type": "string", "enum": ["json", "nagios", "prometheus"]}),
                            "http_status" | "dns_rcode" => string(),
                            _ => json!({"type": "number"}),
                        };
                        v.push(param(name, "query", schema, what));
                    }
                    v
                },
                body: None,
                ok: (
                    200,
                    "healthy: no more agents breach than max_breaching (X-IMN-Check: ok or warning)",
                    status_check_content(),
                ),
                errors: &[400, 404, 503],
            },
        ),
        (
            "post",
            "/v1/alert-rules",
            Op {
                summary: "An alert rule on a measurement: status-check thresholds or anomalies, held for for_s before firing and gone for recovery_s before resolving; alerts go to a signed webhook",
                scope: measure,
                params: vec![],
                body: Some(schema_ref("AlertRuleInput")),
                ok: ok_json(201, "created; Location header names it", schema_ref("AlertRule")),
                errors: &[400, 413, 422],
            },
        ),
        (
            "get",
            "/v1/alert-rules",
            Op {
                summary: "Every alert rule with its state (ok, pending, firing, recovering)",
                scope: read,
                params: vec![],
                body: None,
                ok: ok_json(200, "rules", schema_ref("AlertRules")),
                errors: &[],
            },
        ),
        (
            "get",
            "/v1/alert-rules/{id}",
            Op {
                summary: "One alert rule with its state",
                scope: read,
                params: vec![path_id("id", "rule id")],
                body: None,
                ok: ok_json(200, "the rule", schema_ref("AlertRule")),
                errors: &[404],
            },
        ),
        (
            "delete",
            "/v1/alert-rules/{id}",
            Op {
                summary: "Delete an alert rule (the token that made it, or admin); its events stay",
                scope: measure,
                params: vec![path_id("id", "rule id")],
                body: None,
                ok: ok_json(200, "deleted", object()),
                errors: &[404],
            },
        ),
        (
            "get",
            "/v1/alerts",
            Op {
                summary: "Alert events (a rule fired or resolved), oldest first after `after`",
                scope: read,
                params: event_params(false),
                body: None,
                ok: ok_json(200, "a page of events", schema_ref("Events")),
                errors: &[400],
            },
        ),
        (
            "get",
            "/v1/anomalies",
            Op {
                summary: "Anomaly events (RTT level shifts, loss bursts, path changes) with their evidence, oldest first after `after`",
                scope: read,
                params: event_params(false),
                body: None,
                ok: ok_json(200, "a page of events", schema_ref("Events")),
                errors: &[400],
            },
        ),
        (
            "get",
            "/v1/alerts/stream",
            Op {
                summary: "Alert and anomaly events as they happen (event alert or anomaly, id e{seq}); resumes after Last-Event-ID",
                scope: read,
                params: {
                    let mut v = event_params(true);
                    v.push(last_event_id());
                    v.push(max_s());
                    v
                },
                body: None,
                ok: (
                    200,
                    "Server-Sent Events: event `alert` or `anomaly`, id `e{seq}`, data = the event (as /v1/alerts lists them)",
                    sse_content(&["alert", "anomaly"], "^e[0-9]+$", json!({"type": "object", "required": ["id", "type", "at"]})),
                ),
                errors: &[400, 503],
            },
        ),
        (
            "get",
            "/v1/results",
            Op {
                summary: "Results in stored order, a page at a time",
                scope: read,
                params: results_params,
                body: None,
                ok: ok_json(200, "a page", schema_ref("ResultsPage")),
                errors: &[400],
            },
        ),
        (
            "get",
            "/v1/rollups",
            Op {
                summary: "Hourly rollups per agent, module, target and hour (count, failures, loss, RTT min/median/p95/max), kept after raw results go",
                scope: read,
                params: vec![
                    param("agent", "query", string(), "agent id"),
                    param("module", "query", string(), "module name"),
                    param("target", "query", string(), "target, as the results name it"),
                    param("since", "query", string(), "RFC 3339 or ms since the epoch (the hour it falls in counts)"),
                    param("until", "query", string(), "RFC 3339 or ms since the epoch, exclusive"),
                    param("after", "query", string(), "next_after of the page before: the rollups after it"),
                    param("limit", "query", json!({"type": "integer", "minimum": 1, "maximum": 10000}), "most rollups (default 1000)"),
                ],
                body: None,
                ok: ok_json(200, "rollups, oldest hour first", schema_ref("Rollups")),
                errors: &[400],
            },
        ),
        (
            "get",
            "/v1/results/stream",
            Op {
                summary: "Results as they are stored, live",
                scope: read,
                params: stream_params,
                body: None,
                ok: sse(),
                errors: &[400],
            },
        ),
        (
            "get",
            "/admin/agents",
            Op {
                summary: "Enrolled agents",
                scope: admin,
                params: vec![],
                body: None,
                ok: ok_json(200, "enrolled agents", list("EnrolledAgent")),
                errors: &[],
            },
        ),
        (
            "post",
            "/admin/agents",
            Op {
                summary: "Enroll an agent; its token is shown once",
                scope: admin,
                params: vec![],
                body: Some(json!({
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["id"],
                    "properties": {
                        "id": {"allOf": [agent_id(), {"not": {"pattern": "^imn-"}, "description": "ids starting with imn- are reserved"}]},
                        "tags": {"type": "array", "maxItems": crate::ingest::MAX_TAGS, "items": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[^,]*$"}},
                    },
                })),
                ok: ok_json(201, "enrolled, with the token", schema_ref("Enrolled")),
                errors: &[400, 409, 422],
            },
        ),
        (
            "post",
            "/admin/agents/{id}/rotate",
            Op {
                summary: "A new token for an agent",
                scope: admin,
                params: vec![agent()],
                body: None,
                ok: ok_json(200, "the new token", schema_ref("NewSecret")),
                errors: &[404],
            },
        ),
        (
            "post",
            "/admin/agents/{id}/revoke",
            Op {
                summary: "Revoke an agent",
                scope: admin,
                params: vec![agent()],
                body: None,
                ok: ok_json(200, "revoked", schema_ref("Revoked")),
                errors: &[404],
            },
        ),
        (
            "get",
            "/admin/dead-letters",
            Op {
                summary: "Records the store could not take, newest first, with the reason",
                scope: admin,
                params: vec![
                    param("agent", "query", string(), "only this agent's"),
                    limit(1000),
                ],
                body: None,
                ok: ok_json(
                    200,
                    "dead letters",
                    json!({"type": "array", "items": object()}),
                ),
                errors: &[400],
            },
        ),
        (
            "get",
            "/admin/tokens",
            Op {
                summary: "API tokens",
                scope: admin,
                params: vec![],
                body: None,
                ok: ok_json(200, "tokens", list("Token")),
                errors: &[],
            },
        ),
        (
            "post",
            "/admin/tokens",
            Op {
                summary: "Create an API token; shown once",
                scope: admin,
                params: vec![],
                body: Some(json!({
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["scopes"],
                    "properties": {
                        "id": {"type": ["string", "null"], "pattern": agent_id()["pattern"], "description": "default: tok- and 12 random characters"},
                        "scopes": {"type": "array", "minItems": 1, "maxItems": 3, "uniqueItems": true, "items": {"enum": ["read", "measure", "admin"]}},
                        "rate_per_min": {"type": ["number", "null"], "exclusiveMinimum": 0},
                        "budget": schema_ref("Budget"),
                    },
                })),
                ok: ok_json(201, "the token", schema_ref("TokenCreated")),
                errors: &[400, 409, 422],
            },
        ),
        (
            "post",
            "/admin/tokens/{id}/rotate",
            Op {
                summary: "A new secret for a token",
                scope: admin,
                params: vec![path_id("id", "token id")],
                body: None,
                ok: ok_json(200, "the new token", schema_ref("NewSecret")),
                errors: &[404],
            },
        ),
        (
            "post",
            "/admin/tokens/{id}/revoke",
            Op {
                summary: "Revoke a token",
                scope: admin,
                params: vec![path_id("id", "token id")],
                body: None,
                ok: ok_json(200, "revoked", schema_ref("Revoked")),
                errors: &[404],
            },
        ),
        (
            "post",
            "/admin/releases",
            Op {
                summary: "Add a signed agent release (the body is the file `imn releases sign` made); refused unless signed by a --release-keys key, unexpired, its hash matching, and not older than a stored release of its architecture unless signed as a rollback",
                scope: admin,
                params: vec![],
                body: None,
                ok: ok_json(201, "the release (200 with stored=false: it was stored already)", object()),
                errors: &[400, 413],
            },
        ),
        (
            "post",
            "/admin/modules",
            Op {
                summary: "Add a signed WebAssembly module package (the body is the file `imn modules sign` made); refused unless signed by a --release-keys key, its code matching its hash, its schemas valid, and not older than the stored version. With load_on_hello, every agent that can run it gets it: those connected now, the others at their hello",
                scope: admin,
                params: vec![json!({"name": "load_on_hello", "in": "query", "required": false, "schema": {"type": "boolean"}})],
                body: None,
                ok: ok_json(201, "the module (200 with replaced=true: it replaced an older version)", object()),
                errors: &[400, 409, 413, 422],
            },
        ),
        (
            "delete",
            "/admin/modules/{name}",
            Op {
                summary: "Forget an added WebAssembly module (agents that loaded it keep it until it is unloaded)",
                scope: admin,
                params: vec![path_id("name", "module name")],
                body: None,
                ok: ok_json(200, "the module was deleted", object()),
                errors: &[404, 409],
            },
        ),
        (
            "get",
            "/releases",
            Op {
                summary: "Stored agent releases, newest first",
                scope: read,
                params: vec![],
                body: None,
                ok: ok_json(200, "releases", object()),
                errors: &[],
            },
        ),
        (
            "post",
            "/admin/rollouts",
            Op {
                summary: "Start a rollout of a release to selected agents: a canary wave, then waves, halted past max_failures_pct",
                scope: admin,
                params: vec![],
                body: Some(json!({"type": "object", "additionalProperties": false, "required": ["version", "agents"], "properties": {
                    "version": {"type": "string", "maxLength": 64, "pattern": "^[0-9]{1,9}(\\.[0-9]{1,9}){0,3}(-[0-9A-Za-z.-]+)?(\\+[0-9A-Za-z.+-]*)?$", "description": "a stored release's version (numbers separated by dots, like 1.4.2 or 1.4.2-rc1)"},
                    "agents": chosen_agents(),
                    "canary_pct": {"type": "number", "minimum": 0, "maximum": 100},
                    "waves": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 100}},
                    "max_failures_pct": {"type": "number", "minimum": 0, "maximum": 100}}})),
                ok: ok_json(201, "the rollout", object()),
                errors: &[400, 422],
            },
        ),
        (
            "get",
            "/rollouts",
            Op {
                summary: "Rollouts, newest first",
                scope: read,
                params: vec![],
                body: None,
                ok: ok_json(200, "rollouts", object()),
                errors: &[],
            },
        ),
        (
            "get",
            "/rollouts/{id}",
            Op {
                summary: "A rollout: its waves, each agent's state and failures",
                scope: read,
                params: vec![path_id("id", "rollout id")],
                body: None,
                ok: ok_json(200, "the rollout", object()),
                errors: &[404],
            },
        ),
        (
            "post",
            "/admin/rollouts/{id}/{action}",
            Op {
                summary: "Pause, resume or abort a rollout",
                scope: admin,
                params: vec![
                    path_id("id", "rollout id"),
                    param("action", "path", json!({"enum": ["pause", "resume", "abort"]}), "what to do"),
                ],
                body: None,
                ok: ok_json(200, "the rollout", object()),
                errors: &[404, 409],
            },
        ),
        (
            "post",
            "/admin/settings",
            Op {
                summary: "Change selected agents' remote settings (desired state with a version; an empty value removes a key); each agent tries them and reverts if it cannot reconnect",
                scope: admin,
                params: vec![],
                body: Some(json!({"type": "object", "additionalProperties": false, "required": ["agents", "settings"], "properties": {
                    "agents": chosen_agents(),
                    "settings": {
                        "type": "object",
                        "minProperties": 1,
                        "maxProperties": crate::service::lifecycle::MAX_SETTINGS,
                        "propertyNames": {"enum": imn_proto::wire::REMOTE_SETTINGS},
                        "additionalProperties": {"type": "string", "maxLength": crate::service::lifecycle::MAX_SETTING_LEN, "description": "at most this many bytes of UTF-8; empty removes the key"},
                    }}})),
                ok: ok_json(200, "each agent's new settings version", object()),
                errors: &[400, 422],
            },
        ),
        (
            "post",
            "/debug/hold-acks",
            Op {
                summary:
                    "Fault injection, only with --fault-injection: store batches but hold acks",
                scope: admin,
                params: vec![param(
                    "on",
                    "query",
                    json!({"type": "boolean"}),
                    "hold or release",
                )],
                body: None,
                ok: ok_json(200, "the setting", object()),
                errors: &[400],
            },
        ),
    ]
}

/// The error statuses and what they mean.
const ERRORS: &[(u16, &str)] = &[
    (
        400,
        "Malformed JSON or a bad query parameter (field and rule named)",
    ),
    (401, "No or wrong token (auth on)"),
    (
        403,
        "The token lacks the scope, or the measurement policy refuses it (rule named)",
    ),
    (404, "Unknown agent, module, request, measurement or route"),
    (
        409,
        "The agent is offline, the module is not loaded, or the id exists",
    ),
    (413, "Body over max_body_bytes"),
    (
        422,
        "Invalid parameters or over a limit (field and rule named)",
    ),
    (
        429,
        "Rate limited, over a budget (`over_budget`, budget named), the agent's queue is full, or too many open streams (Retry-After)",
    ),
    (500, "Internal error"),
    (503, "The store or the bus is unavailable"),
];

/// The schemas of alert rules and events.
fn alert_schemas() -> Value {
    json!({
        "AlertRuleInput": {
            "type": "object",
            "additionalProperties": false,
            "required": ["name", "measurement_id"],
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 128},
                "measurement_id": {"type": "string", "minLength": 1, "maxLength": 128},
                "thresholds": {"type": "object", "maxProperties": 32, "description": "status-check parameters (as GET /v1/measurements/{id}/status-check takes them, but format), each a string or number", "additionalProperties": {"type": ["string", "number", "boolean"]}},
                "anomalies": {"type": ["array", "null"], "maxItems": 5, "items": {"type": "string", "enum": ["rtt_shift_up", "rtt_shift_down", "loss_burst", "loss_recovered", "path_change"]}, "description": "given (even empty: rtt_shift_up, loss_burst, path_change), the rule watches anomalies, not thresholds"},
                "for_s": {"type": "integer", "minimum": 0, "maximum": crate::alerts::MAX_HOLD_S},
                "recovery_s": {"type": "integer", "minimum": 0, "maximum": crate::alerts::MAX_HOLD_S},
                "webhook": {
                    "type": ["object", "null"],
                    "additionalProperties": false,
                    "required": ["url", "secret"],
                    "properties": {
                        "url": {"type": "string", "maxLength": crate::alerts::webhook::MAX_URL, "description": "http or https; special-purpose addresses (loopback, private, link-local) only where the backend's --webhook-allow names them"},
                        "secret": {"type": "string", "minLength": 16, "maxLength": 256, "description": "HMAC-SHA256 key: X-IMN-Signature: t=T,v1=hex(HMAC(secret, T + '.' + body))"},
                    },
                },
            },
        },
        "AlertRule": {
            "type": "object",
            "required": ["id", "name", "measurement_id", "module", "kind", "thresholds", "anomalies", "for_s", "recovery_s", "state"],
            "properties": {
                "id": string(), "name": string(), "measurement_id": string(), "module": string(),
                "kind": {"type": "string", "enum": ["threshold", "anomaly"]},
                "thresholds": {"type": "object", "additionalProperties": string()},
                "anomalies": {"type": "array", "items": string()},
                "for_s": integer(0), "recovery_s": integer(0),
                "webhook": {"type": ["object", "null"], "properties": {"url": string(), "secret_set": {"type": "boolean"}}},
                "created": string(),
                "state": {"type": "string", "enum": ["ok", "pending", "firing", "recovering"]},
                "since": {"type": ["string", "null"]},
            },
        },
        "AlertRules": {
            "type": "object",
            "required": ["rules", "firing"],
            "properties": {"rules": {"type": "array", "items": schema_ref("AlertRule")}, "firing": integer(0)},
        },
        "Events": {
            "type": "object",
            "required": ["events"],
            "properties": {
                "events": {"type": "array", "items": {
                    "type": "object",
                    "required": ["id", "type", "at"],
                    "description": "an alert (rule_id, rule_name, measurement_id, state firing or resolved, since, summary, breaches or anomalies) or an anomaly (anomaly kind, agent, target, module, measurement_id, message, evidence, result_refs)",
                    "properties": {"id": string(), "type": {"type": "string", "enum": ["alert", "anomaly"]}, "at": string()},
                }},
                "next_after": {"type": ["string", "null"]},
            },
        },
    })
}

fn components() -> Value {
    let mut schemas = Map::new();
    for m in catalog::catalog() {
        let mut s = m.schema();
        if let Some(o) = s.as_object_mut() {
            o.remove("$schema");
            o.remove("$id");
        }
        schemas.insert(format!("params.{}", m.name), s);
    }
    let more = json!({
        "Error": {
            "type": "object",
            "required": ["error", "message"],
            "properties": {
                "error": {"type": "string", "description": "a stable code: invalid_params, unknown_agent, policy_denied, …"},
                "message": {"type": "string"},
                "field": {"type": "string", "description": "the field at fault, as a JSON pointer"},
                "rule": {"type": "string", "description": "the rule it broke"},
                "limit": {"type": "string"},
            },
        },
        "Agent": {
            "type": "object",
            "properties": {
                "id": {"type": "string"}, "alive": {"type": "boolean"},
                "status": {"enum": ["online", "offline"]},
                "first_seen": {"type": "string", "format": "date-time"},
                "last_seen": {"type": "string", "format": "date-time"},
                "version": {"type": "string"}, "arch": {"type": "string"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "location": {"type": ["object", "null"]},
                "schedule_version": {"type": "integer"},
                "features": {"type": "array", "items": {"type": "string"}, "description": "policy, budgets, fresh_commands: what the agent enforces itself"},
                "limits": {"type": "object", "description": "the agent's budget: max_runs, max_queued_runs, max_probe_rate"},
                "wire_version": {"type": "integer"},
                "outbox": {"type": "object"}, "heartbeat": {"type": ["object", "null"]},
            },
        },
        "Module": {
            "type": "object",
            "description": "A module: built into the agents (`kind` built_in), or a signed WebAssembly module an operator added (`kind` wasm, with its result schema, the parameters naming its targets, its limits and its package's hash and key).",
            "required": ["name", "version", "kind", "schema_hash", "schema"],
            "properties": {"name": {"type": "string"}, "version": {"type": "string"}, "description": {"type": "string"}, "kind": {"enum": ["built_in", "wasm"]}, "schema_hash": {"type": "string"}, "schema": {"type": "object"},
                "result_schema": {"type": "object"}, "targets": {"type": "array", "items": {"type": "string"}}, "limits": {"type": "object"}, "timeout_ms": {"type": "integer"}, "sha256": {"type": "string"}, "size": {"type": "integer"}, "key": {"type": "string"}, "signed_ms": {"type": "integer"}, "added_ms": {"type": "integer"}},
        },
        "Budget": {
            "type": ["object", "null"],
            "additionalProperties": false,
            "description": "What a token may spend; absent fields are unlimited (null: none of its own).",
            "properties": {
                "probes_per_day": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_SAFE, "description": "probes a UTC day across the fleet (count × targets × agents; recurring measurements reserve theirs daily)"},
                "max_schedules": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_SAFE, "description": "recurring measurements at once"},
                "min_interval_s": {"type": "object", "propertyNames": {"enum": std::iter::once("*").chain(catalog::names().iter().copied()).collect::<Vec<_>>()}, "additionalProperties": {"type": "number", "minimum": 0}, "description": "shortest interval per module; \"*\" for the others"},
            },
        },
        "ModuleSettings": {
            "type": "object",
            "additionalProperties": false,
            "description": "optional: an empty body loads the module with its defaults",
            "properties": {
                "defaults": {"type": ["object", "null"], "description": "parameters merged under each request's own"},
                "max_rate": {"type": ["number", "null"], "exclusiveMinimum": 0, "description": "cap on the module's rate parameter (modules that have one)"},
                "timeout_ms": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_MODULE_TIMEOUT_MS},
            },
        },
        "Request": {
            "type": "object",
            "required": ["request_id", "agent_id", "module", "state"],
            "properties": {
                "request_id": {"type": "string"}, "agent_id": {"type": "string"}, "module": {"type": "string"},
                "state": {"enum": ["pending", "dispatched", "received", "running", "succeeded", "failed", "timeout", "expired", "cancelled"]},
                "trace_id": {"type": "string"}, "result": {}, "transitions": {"type": "array", "items": {"type": "object"}},
            },
        },
        "Result": {
            "type": "object",
            "required": ["request_id", "agent_id", "module", "state", "result", "error"],
            "properties": {
                "request_id": {"type": "string"}, "agent_id": {"type": "string"}, "module": {"type": "string"},
                "measurement_id": {"type": ["string", "null"]},
                "state": {"type": "string"}, "result": {}, "error": {"type": ["string", "null"]},
                "summary": {"type": ["string", "null"], "description": "the result in one line (the module's summary), or the error of a failed run"},
                "received_at": {"type": "string", "format": "date-time"},
                "started_at": {"type": "string", "format": "date-time"},
                "finished_at": {"type": "string", "format": "date-time"},
                "stored_at": {"type": "string", "format": "date-time"},
                "scheduled_at": {"type": "string", "format": "date-time", "description": "a scheduled run's slot"},
                "cursor": {"type": "string"},
            },
        },
        "Rollups": {
            "type": "object",
            "required": ["rollups"],
            "properties": {"next_after": {"type": ["string", "null"], "description": "a full page: pass it as after for the next"}, "rollups": {"type": "array", "items": {
                "type": "object",
                "required": ["agent_id", "module", "target", "hour", "results", "failed"],
                "properties": {
                    "agent_id": string(), "module": string(), "target": string(), "hour": string(),
                    "results": integer(0), "failed": integer(0), "sent": integer(0), "received": integer(0),
                    "loss_pct": {"type": ["number", "null"]},
                    "rtt_samples": integer(0),
                    "rtt_min_ms": {"type": ["number", "null"]}, "rtt_median_ms": {"type": ["number", "null"]},
                    "rtt_p95_ms": {"type": ["number", "null"]}, "rtt_max_ms": {"type": ["number", "null"]},
                    "statuses": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "reached": integer(0),
                    "ntp_offset_mean_ms": {"type": "number"}, "ntp_offset_min_ms": {"type": ["number", "null"]},
                    "ntp_offset_max_ms": {"type": ["number", "null"]}, "cert_not_after_ms": {"type": "integer"},
                },
            }}},
        },
        "StatusCheck": {
            "type": "object",
            "required": ["measurement_id", "module", "status", "healthy", "agents", "breaching_agents", "max_breaching", "breaches", "per_agent", "summary"],
            "properties": {
                "measurement_id": string(), "module": string(),
                "status": {"type": "string", "enum": ["ok", "warning", "critical"]},
                "healthy": {"type": "boolean"},
                "window": {"type": "object"},
                "thresholds": {"type": "object"},
                "agents": integer(0), "breaching_agents": integer(0), "max_breaching": integer(0),
                "results": integer(0), "truncated": {"type": "boolean"},
                "breaches": {"type": "array", "items": {
                    "type": "object",
                    "required": ["agent_id", "check", "message"],
                    "properties": {
                        "agent_id": string(), "target": string(), "check": string(),
                        "value": {}, "threshold": {}, "message": string(),
                    },
                }},
                "breaches_listed": integer(0),
                "per_agent": {"type": "array", "items": {
                    "type": "object",
                    "properties": {
                        "agent_id": string(), "results": integer(0), "breaching": {"type": "boolean"},
                        "targets": {"type": "object", "additionalProperties": {"type": "object"}},
                    },
                }},
                "summary": string(),
            },
        },
        "ResultsPage": {
            "type": "object",
            "required": ["results"],
            "properties": {"results": {"anyOf": [list("Result"), list("AtlasResult")], "description": "format=atlas: RIPE Atlas results"}, "next_cursor": {"type": "string"}, "more": {"type": "boolean"}},
        },
        "AtlasResult": {
            "type": "object",
            "description": "a result in RIPE Atlas's result format (https://atlas.ripe.net/docs/apis/result-format/)",
            "required": ["type", "timestamp"],
            "properties": {"type": string(), "timestamp": integer(0), "prb_id": {"type": "integer"}, "msm_id": {"type": "integer"}, "fw": {"type": "integer"}},
        },
        "Selection": {
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "ids": {"type": "array", "maxItems": 100_000, "items": {"type": "string"}},
                "tags": {"type": "array", "maxItems": crate::ingest::MAX_TAGS, "items": {"type": "string"}},
                "country": {"type": ["string", "null"], "description": "ISO 3166-1 alpha-2, any case"},
                "asn": {"type": ["integer", "null"], "minimum": 0, "maximum": u32::MAX},
                "all": {"type": "boolean"}, "alive": {"type": ["boolean", "null"]},
                "limit": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_SAFE},
            },
        },
        "Schedule": {
            "type": ["object", "null"],
            "description": "null or absent: a one-off measurement",
            "additionalProperties": false,
            "required": ["interval_s"],
            "properties": {
                "interval_s": {"type": "number", "minimum": crate::fleet::MIN_INTERVAL_S, "maximum": crate::fleet::MAX_INTERVAL_S},
                "start": {"type": ["string", "number", "null"], "format": "date-time", "minimum": 0, "exclusiveMaximum": 4e11, "description": "RFC 3339 or seconds since the epoch; default now"},
                "stop": {"type": ["string", "number", "null"], "format": "date-time", "minimum": 0, "exclusiveMaximum": 4e11, "description": "RFC 3339 or seconds since the epoch, after start and in the future; default never"},
                "jitter_s": {"type": ["number", "null"], "minimum": 0, "description": "less than interval_s; default 10 % of it, at most 60"},
            },
        },
        "NewMeasurement": {
            "type": "object",
            "additionalProperties": false,
            "required": ["module", "agents"],
            "properties": {
                "module": {"type": "string", "description": "a module of /modules"},
                "params": {"type": ["object", "null"], "description": "the module's parameters: its params.* schema, checked by the module"},
                "agents": chosen_agents(),
                "schedule": schema_ref("Schedule"),
                "description": {"type": ["string", "null"]},
                "deadline_s": {"type": ["number", "null"], "minimum": 0.001, "maximum": 604800, "description": "one-off measurements only: with a schedule, 422 with rule one_off_only"},
            },
        },
        "Health": {
            "type": "object",
            "required": ["status", "version", "agents_alive", "agents_known", "records_stored", "dead_letters"],
            "properties": {
                "status": {"type": "string"}, "version": string(),
                "agents_alive": integer(0), "agents_known": integer(0),
                "records_stored": integer(0), "dead_letters": integer(0),
                "auth": {"type": "object"}, "bridge": {"type": "object"}, "ingest": {"type": "object"},
                "store": {"type": "object"}, "streams": {"type": "object"}, "rejected": {"type": "object"},
            },
        },
        "StatusHistory": {
            "type": "object",
            "required": ["agent_id", "status", "intervals", "window_s"],
            "properties": {
                "agent_id": string(),
                "status": {"type": "string", "enum": ["connected", "disconnected"]},
                "status_since": {"type": ["string", "null"]},
                "first_connected": {"type": ["string", "null"]}, "last_connected": {"type": ["string", "null"]},
                "observed_from": {"type": ["string", "null"]}, "observed_s": {"type": "number"},
                "uptime_pct": {"type": ["number", "null"]}, "window_s": integer(1),
                "intervals": {"type": "array", "items": {
                    "type": "object",
                    "required": ["from", "status", "until"],
                    "properties": {"from": string(), "status": {"type": "string", "enum": ["connected", "disconnected"]}, "until": {"type": ["string", "null"]}},
                }},
            },
        },
        "ModuleCommand": {
            "type": "object",
            "required": ["action", "agent_id", "module", "commands"],
            "properties": {"action": {"type": "string", "enum": ["load", "unload"]}, "agent_id": string(), "module": string(), "commands": {"type": "array", "items": string()}},
        },
        "EnrolledAgent": {
            "type": "object",
            "required": ["id", "tags", "created_at", "revoked_at"],
            "properties": {"id": string(), "tags": {"type": "array", "items": string()}, "created_at": string(), "revoked_at": {"type": ["string", "null"]}},
        },
        "Enrolled": {
            "type": "object",
            "required": ["id", "tags", "token"],
            "properties": {"id": string(), "tags": {"type": "array", "items": string()}, "token": {"type": "string", "description": "shown once; the agent's MQTT password"}},
        },
        "NewSecret": {
            "type": "object",
            "required": ["id", "token"],
            "properties": {"id": string(), "token": {"type": "string", "description": "shown once; the old one stops working"}},
        },
        "Revoked": {
            "type": "object",
            "required": ["id", "revoked"],
            "properties": {"id": string(), "revoked": {"const": true}},
        },
        "Token": {
            "type": "object",
            "required": ["id", "scopes", "created_at"],
            "properties": {
                "id": string(), "scopes": {"type": "array", "items": {"enum": ["read", "measure", "admin"]}},
                "rate_per_min": {"type": ["number", "null"]}, "created_at": string(), "revoked_at": {"type": ["string", "null"]},
                "budget": {"type": ["object", "null"]}, "budget_source": {"type": ["string", "null"]}, "spend_today": {"type": "object"},
            },
        },
        "TokenCreated": {
            "type": "object",
            "required": ["id", "scopes", "token"],
            "properties": {"id": string(), "scopes": {"type": "array", "items": {"enum": ["read", "measure", "admin"]}}, "token": {"type": "string", "description": "shown once"}},
        },
        "MeasurementCreated": {
            "type": "object",
            "required": ["id", "location", "agents", "refused"],
            "properties": {"id": {"type": "string"}, "location": {"type": "string"}, "agents": {"type": "array", "items": {"type": "string"}}, "refused": {"type": "array", "items": {"type": "object"}}},
        },
        "Measurement": {
            "type": "object",
            "properties": {
                "id": {"type": "string"}, "module": {"type": "string"},
                "state": {"enum": ["running", "complete", "scheduled", "finished", "stopped"]},
                "progress": {"type": "object", "properties": {"summary": {"type": "string"}}},
                "agents": {"type": "array", "items": {"type": "object"}},
                "schedule": {"type": ["object", "null"]},
            },
        },
    });
    for part in [more, alert_schemas()] {
        if let Value::Object(m) = part {
            schemas.extend(m);
        }
    }
    let responses: Map<String, Value> = ERRORS
        .iter()
        .map(|(code, what)| {
            (
                format!("E{code}"),
                json!({"description": what, "content": json_content(schema_ref("Error"))}),
            )
        })
        .collect();
    json!({
        "schemas": schemas,
        "responses": responses,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "an API token (imn tokens add); needed when the backend runs with --auth"}},
    })
}

/// An operation's id: the method, then the path's words (`getAgentsIdResults`).
fn op_id(method: &str, path: &str) -> String {
    if path == "/" {
        return "getDashboard".to_string();
    }
    format!(
        "{method}{}",
        path.split(['/', '{', '}', '-', '.'])
            .filter(|p| !p.is_empty())
            .map(|p| {
                let mut c = p.chars();
                c.next()
                    .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                    .unwrap_or_default()
            })
            .collect::<String>()
    )
}

/// A link: its name, the method and path of the operation it leads to, and that
/// operation's parameters (name, runtime expression).
type Link<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)]);

/// OpenAPI links from the operations that make (or list) ids to the operations that
/// read or change them, so that generated clients and stateful fuzzers can follow
/// them: (the response they hang on, the links).
fn links(method: &str, path: &str) -> Option<(&'static str, Value)> {
    // (name, method and path of the target, its parameters: name -> runtime expression)
    let to = |targets: &[Link]| -> Value {
        let mut m = Map::new();
        for (name, method, path, params) in targets {
            let params: Map<String, Value> = params
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            m.insert(
                name.to_string(),
                json!({"operationId": op_id(method, path), "parameters": params}),
            );
        }
        Value::Object(m)
    };
    let request = "$response.body#/request_id";
    let id = "$response.body#/id";
    let first = "$response.body#/0/id";
    let (status, links) = match (method, path) {
        ("post", "/agent/{id}/{module}") => (
            "202",
            to(&[
                (
                    "RequestState",
                    "get",
                    "/modules/states/{request_id}",
                    &[("request_id", request)],
                ),
                (
                    "Result",
                    "get",
                    "/agents/{id}/results/{request_id}",
                    &[("id", "$request.path.id"), ("request_id", request)],
                ),
            ]),
        ),
        ("post", "/v1/measurements") => (
            "202",
            to(&[
                ("Measurement", "get", "/v1/measurements/{id}", &[("id", id)]),
                ("Stop", "delete", "/v1/measurements/{id}", &[("id", id)]),
                (
                    "Stream",
                    "get",
                    "/v1/measurements/{id}/stream",
                    &[("id", id)],
                ),
                (
                    "StatusCheck",
                    "get",
                    "/v1/measurements/{id}/status-check",
                    &[("id", id)],
                ),
                ("Results", "get", "/v1/results", &[("measurement", id)]),
            ]),
        ),
        ("post", "/v1/alert-rules") => (
            "201",
            to(&[
                ("Rule", "get", "/v1/alert-rules/{id}", &[("id", id)]),
                ("Delete", "delete", "/v1/alert-rules/{id}", &[("id", id)]),
                ("Alerts", "get", "/v1/alerts", &[("rule", id)]),
            ]),
        ),
        ("post", "/admin/agents") => (
            "201",
            to(&[
                ("Rotate", "post", "/admin/agents/{id}/rotate", &[("id", id)]),
                ("Revoke", "post", "/admin/agents/{id}/revoke", &[("id", id)]),
            ]),
        ),
        ("post", "/admin/tokens") => (
            "201",
            to(&[
                ("Rotate", "post", "/admin/tokens/{id}/rotate", &[("id", id)]),
                ("Revoke", "post", "/admin/tokens/{id}/revoke", &[("id", id)]),
            ]),
        ),
        ("post", "/admin/rollouts") => (
            "201",
            to(&[
                ("Rollout", "get", "/rollouts/{id}", &[("id", id)]),
                (
                    "Action",
                    "post",
                    "/admin/rollouts/{id}/{action}",
                    &[("id", id)],
                ),
            ]),
        ),
        ("post", "/admin/modules") => (
            "201",
            to(&[(
                "Delete",
                "delete",
                "/admin/modules/{name}",
                &[("name", "$response.body#/name")],
            )]),
        ),
        // A list's first agent: what a run, its results and its history are about.
        ("get", "/agents") | ("get", "/agents/alive") => (
            "200",
            to(&[
                ("Agent", "get", "/agents/{id}", &[("id", first)]),
                ("Results", "get", "/agents/{id}/results", &[("id", first)]),
                ("Status", "get", "/agents/{id}/status", &[("id", first)]),
                ("Events", "get", "/agents/{id}/events", &[("id", first)]),
                (
                    "Heartbeats",
                    "get",
                    "/agents/{id}/heartbeats",
                    &[("id", first)],
                ),
                ("Run", "post", "/agent/{id}/{module}", &[("id", first)]),
            ]),
        ),
        ("get", "/v1/alert-rules") => (
            "200",
            to(&[(
                "Rule",
                "get",
                "/v1/alert-rules/{id}",
                &[("id", "$response.body#/rules/0/id")],
            )]),
        ),
        _ => return None,
    };
    Some((status, links))
}

/// The document as a backend serves it: the `/debug` routes only when it runs with
/// them (`--fault-injection`). Built once.
pub fn served(debug_routes: bool) -> &'static Value {
    static FULL: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    static PUBLIC: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    if debug_routes {
        FULL.get_or_init(document)
    } else {
        PUBLIC.get_or_init(|| {
            let mut doc = document();
            if let Some(paths) = doc["paths"].as_object_mut() {
                paths.retain(|p, _| !p.starts_with("/debug/"));
            }
            doc
        })
    }
}

/// The whole document.
pub fn document() -> Value {
    let mut paths: Map<String, Value> = Map::new();
    for (method, path, op) in operations() {
        let mut op = op.to_json(op_id(method, path));
        if let Some((status, links)) = links(method, path) {
            op["responses"][status]["links"] = links;
        }
        if (method, path) == ("post", "/agent/{id}/{module}") {
            op["responses"]["200"] = json!({
                "description": "with ?wait: the request finished within it, with its result",
                "content": json_content(schema_ref("Request")),
            });
        }
        if path == "/agents" || path == "/agents/alive" {
            op["responses"]["200"]["headers"] = json!({
                "X-Total-Count": {
                    "description": "agents matching in all, on every page",
                    "schema": {"type": "integer", "minimum": 0},
                },
                "Link": {
                    "description": "RFC 8288 `<URL>; rel=\"next\"`: the same query continued after this page's last id; absent on the last page",
                    "schema": {"type": "string"},
                },
            });
        }
        if path == "/v1/measurements/{id}/status-check" {
            op["responses"]["200"]["headers"] = json!({"X-IMN-Check": {
                "description": "ok, warning (some agents breach, no more than max_breaching) or critical",
                "schema": {"type": "string", "enum": ["ok", "warning", "critical"]},
            }});
            // Unhealthy is an answer, not an error: the report, as for 200 (or the
            // Error object when the store itself is unavailable).
            op["responses"]["503"] = json!({
                "description": "not healthy: more agents breach than max_breaching (X-IMN-Check: critical; format=prometheus answers 200 instead, as scrapers need); or the store is unavailable (an Error)",
                "headers": {"X-IMN-Check": {"schema": {"type": "string", "enum": ["critical"]}}},
                "content": {
                    "application/json": {"schema": {"oneOf": [schema_ref("StatusCheck"), schema_ref("Error")]}},
                    "text/plain": {"schema": {"type": "string"}},
                },
            });
        }
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "IMN API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The Internet Measurement Network's backend: agents, measurements, results and their streams. With --auth, send `Authorization: Bearer TOKEN`; each operation's x-imn-scope names the scope it needs.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": components(),
    })
}

/// The operations whose body the server checks against the schema documented here,
/// before their handler runs: each compiled once, against this document's components
/// (so a `$ref` means what it means in the document). `POST /agent/{id}/{module}` is
/// not among them: its body is the module's parameters, checked by the module's own
/// schema (the `params.*` schemas here are those same schemas), which also covers
/// WebAssembly modules added at run time.
///
/// With it, whether an empty body is taken (the operation's body is optional).
pub fn body_validator(method: &str, path: &str) -> Option<&'static (jsonschema::Validator, bool)> {
    static VALIDATORS: std::sync::OnceLock<
        std::collections::HashMap<(String, String), (jsonschema::Validator, bool)>,
    > = std::sync::OnceLock::new();
    VALIDATORS
        .get_or_init(|| {
            body_schemas()
                .into_iter()
                .filter_map(|(m, p, schema, optional)| {
                    // A schema that does not compile is a bug, found by the unit test
                    // below; the server then checks that body by its handler alone.
                    let v = jsonschema::validator_for(&schema).ok()?;
                    Some(((m.to_string(), p.to_string()), (v, optional)))
                })
                .collect()
        })
        .get(&(method.to_ascii_lowercase(), path.to_string()))
}

/// Each checked operation's body schema as a whole schema: the documented one, with
/// the document's components beside it for its references.
fn body_schemas() -> Vec<(&'static str, &'static str, Value, bool)> {
    let components = components();
    operations()
        .into_iter()
        .filter(|(_, path, _)| *path != "/agent/{id}/{module}")
        .filter_map(|(method, path, op)| {
            let optional = op.body_optional();
            let body = op.body?;
            Some((
                method,
                path,
                json!({
                    "$schema": "https://json-schema.org/draft/2020-12/schema",
                    "components": {"schemas": components["schemas"].clone()},
                    "allOf": [body],
                }),
                optional,
            ))
        })
        .collect()
}

/// The methods the document gives a path (`GET,HEAD,DELETE`), for 405 answers.
pub fn methods_of(path: &str) -> String {
    static BY_PATH: std::sync::OnceLock<std::collections::HashMap<String, String>> =
        std::sync::OnceLock::new();
    BY_PATH
        .get_or_init(|| {
            let mut by: std::collections::HashMap<String, Vec<String>> = Default::default();
            for (m, p) in routes() {
                let v = by.entry(p).or_default();
                v.push(m.to_ascii_uppercase());
                if m == "get" {
                    v.push("HEAD".into());
                }
            }
            by.into_iter().map(|(p, v)| (p, v.join(","))).collect()
        })
        .get(path)
        .cloned()
        .unwrap_or_default()
}

/// Every (method, path) in the document, for tests.
pub fn routes() -> Vec<(String, String)> {
    operations()
        .into_iter()
        .map(|(m, p, _)| (m.to_string(), p.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every route the router in api/mod.rs declares (read from its source, so a new
    /// route without documentation fails here), with every method, is documented, and
    /// nothing documented is missing from the router.
    #[test]
    fn every_route_of_the_router_is_documented() {
        let src = include_str!("api/mod.rs");
        let router = &src[src.find("pub fn router").unwrap()..];
        let router = &router[..router.find("\n}\n").unwrap()];
        let mut declared = std::collections::BTreeSet::new();
        for part in router.split(".route(").skip(1) {
            let path = part.split('"').nth(1).unwrap().to_string();
            let rest = &part[part.find(',').unwrap()..];
            let call = &rest[..rest.find(".route(").unwrap_or(rest.len())];
            for m in ["get", "post", "put", "delete"] {
                if call.contains(&format!("{m}(")) {
                    declared.insert((m.to_string(), path.clone()));
                }
            }
        }
        assert!(declared.len() > 30, "the router was not read: {declared:?}");
        let documented: std::collections::BTreeSet<_> = routes().into_iter().collect();
        let missing: Vec<_> = declared.difference(&documented).collect();
        assert!(
            missing.is_empty(),
            "routes without documentation: {missing:?}"
        );
        let extra: Vec<_> = documented.difference(&declared).collect();
        assert!(extra.is_empty(), "documented but not routed: {extra:?}");
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        for m in catalog::names() {
            assert!(doc["components"]["schemas"][format!("params.{m}")].is_object());
        }
    }

    /// Every documented request body is checked by the server: each compiles, and
    /// each refuses what its schema refuses.
    #[test]
    fn every_documented_body_is_the_one_the_server_checks() {
        let with_body: Vec<(&str, &str)> = operations()
            .into_iter()
            .filter(|(_, _, op)| op.body.is_some())
            .map(|(m, p, _)| (m, p))
            .collect();
        assert!(with_body.len() >= 8, "{with_body:?}");
        for (m, p) in &with_body {
            if *p == "/agent/{id}/{module}" {
                continue;
            }
            let (v, _) = body_validator(m, p).unwrap_or_else(|| panic!("{m} {p}: no validator"));
            assert!(!v.is_valid(&json!("not an object")), "{m} {p}");
        }
        let check = |m: &str, p: &str, body: Value| {
            crate::validation::check_schema(&body_validator(m, p).unwrap().0, &body)
        };
        let field = |r: Result<(), crate::error::ApiError>| match r {
            Err(crate::error::ApiError::InvalidParams { field, rule, .. }) => (field, rule),
            other => panic!("{other:?}"),
        };
        let pair = |f: &str, r: &str| (f.to_string(), r.to_string());
        // What the handlers refused before the document said so.
        assert!(check(
            "post",
            "/admin/agents",
            json!({"id": "pi-1", "tags": ["a"]})
        )
        .is_ok());
        assert_eq!(
            field(check("post", "/admin/agents", json!({"id": "imn-x"}))),
            pair("/id", "not")
        );
        assert_eq!(
            field(check("post", "/admin/agents", json!({"id": "a b"}))),
            pair("/id", "pattern")
        );
        assert_eq!(
            field(check(
                "post",
                "/admin/agents",
                json!({"id": "a", "tags": ["x,y"]})
            )),
            pair("/tags/0", "pattern")
        );
        assert_eq!(
            field(check("post", "/admin/tokens", json!({"scopes": []}))),
            pair("/scopes", "minItems")
        );
        assert_eq!(
            field(check(
                "post",
                "/admin/tokens",
                json!({"scopes": ["read"], "budget": {"min_interval_s": {"nope": 1}}})
            )),
            pair("/budget/min_interval_s/nope", "propertyNames")
        );
        assert_eq!(
            field(check(
                "post",
                "/v1/measurements",
                json!({"module": "ping", "agents": {}})
            )),
            pair("/agents", "anyOf")
        );
        // Null is absent, as the handlers read it.
        assert!(check(
            "post",
            "/admin/tokens",
            json!({"scopes": ["read"], "id": null, "rate_per_min": null, "budget": null})
        )
        .is_ok());
        assert!(check(
            "post",
            "/v1/measurements",
            json!({"module": "ping", "agents": {"all": true}, "params": {"targets": ["127.0.0.1"]}})
        )
        .is_ok());
    }
}
