//! The module catalog: what each module is called, its version, and the JSON Schema
//! (draft 2020-12) its parameters must satisfy. The backend validates against these
//! schemas; the agent reports their hashes in its hello.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::kinds::{self, rate_of, str_param, u64_param, Examples};
use crate::policy::{Demand, Target};

/// One module as the catalog describes it.
#[derive(Debug, Clone)]
pub struct ModuleSpec {
    pub name: &'static str,
    pub version: &'static str,
    pub description: &'static str,
    /// How long a run may take before the agent cancels it, unless the request says.
    pub default_timeout_ms: u64,
    schema: fn() -> Value,
    examples: fn() -> Examples,
    /// Where a run sends packets, how many and how fast (see [`Demand`]). Every module
    /// declares it: the backend's policy, limits and budgets and the agent's budgets
    /// read nothing else.
    demand: fn(&Value) -> Demand,
}

impl ModuleSpec {
    /// The JSON Schema of the module's parameters.
    pub fn schema(&self) -> Value {
        (self.schema)()
    }

    /// Parameters the schema must accept, and parameters it must refuse naming a field.
    pub fn examples(&self) -> Examples {
        (self.examples)()
    }

    /// What a run with these (validated) parameters asks of the network. Never panics,
    /// whatever the value: a field of the wrong type counts as absent.
    pub fn demand(&self, params: &Value) -> Demand {
        (self.demand)(params)
    }

    /// First 16 hex digits of the SHA-256 of the schema's canonical JSON.
    pub fn schema_hash(&self) -> String {
        let digest = Sha256::digest(self.schema().to_string().as_bytes());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

pub(crate) const DRAFT: &str = "https://json-schema.org/draft/2020-12/schema";

fn echo_schema() -> Value {
    json!({
        "$schema": DRAFT,
        "title": "echo_module parameters",
        "type": "object",
        "properties": {
            "message": {
                "type": "string",
                "maxLength": 4096,
                "description": "Text the agent sends back; at most 4096 bytes of UTF-8."
            }
        },
        "required": ["message"],
        "additionalProperties": false
    })
}

fn ping_schema() -> Value {
    let host = json!({
        "type": "string", "minLength": 1, "maxLength": 253,
        "description": "Host name or IPv4/IPv6 address; the agent resolves names itself."
    });
    json!({
        "$schema": DRAFT,
        "title": "ping_module parameters",
        "description": "Exactly one of host and targets is required.",
        "type": "object",
        "properties": {
            "host": host,
            "targets": {
                "type": "array", "items": host, "minItems": 1, "maxItems": 65536,
                "description": "Many hosts, probed concurrently by one engine."
            },
            "count": {"type": "integer", "minimum": 1, "maximum": 100, "default": 4},
            "interval_ms": {"type": "integer", "minimum": 1, "maximum": 60000, "default": 1000,
                "description": "Time between two probes to the same target."},
            "timeout_ms": {"type": "integer", "minimum": 10, "maximum": 60000, "default": 1000},
            "size": {"type": "integer", "minimum": 0, "maximum": 65000, "default": 56},
            "ttl": {"type": "integer", "minimum": 1, "maximum": 255},
            "rate": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000000,
                "description": "Probes per second across all targets."}
        },
        "additionalProperties": false
    })
}

fn tcping_schema() -> Value {
    json!({
        "$schema": DRAFT,
        "title": "tcping parameters",
        "type": "object",
        "properties": {
            "host": {"type": "string", "minLength": 1, "maxLength": 253},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "count": {"type": "integer", "minimum": 1, "maximum": 100, "default": 4},
            "timeout_ms": {"type": "integer", "minimum": 10, "maximum": 60000, "default": 1000},
            "interval_ms": {"type": "integer", "minimum": 0, "maximum": 60000, "default": 1000}
        },
        "required": ["host", "port"],
        "additionalProperties": false
    })
}

fn faulty_schema() -> Value {
    json!({
        "$schema": DRAFT,
        "title": "faulty_module parameters",
        "description": "Simulates failures, to test the agent's supervisor and the whole path.",
        "type": "object",
        "properties": {
            "message": {"type": "string", "maxLength": 4096},
            "delay": {"type": "number", "minimum": 0, "maximum": 3600,
                "description": "Seconds to sleep before answering."},
            "crash": {"type": "boolean", "default": false, "description": "Panic inside the module."},
            "hang": {"type": "boolean", "default": false, "description": "Never return."},
            "error": {"type": "boolean", "default": false, "description": "Return an error."}
        },
        "required": ["message"],
        "additionalProperties": false
    })
}

fn heartbeat_schema() -> Value {
    json!({
        "$schema": DRAFT,
        "title": "heartbeat parameters",
        "description": "No parameters: returns the agent's system metrics now.",
        "type": "object",
        "properties": {},
        "additionalProperties": false
    })
}

fn echo_examples() -> Examples {
    Examples {
        valid: vec![json!({"message": "hello"})],
        invalid: vec![
            (json!({}), "/message"),
            (json!({"message": 7}), "/message"),
            (json!({"message": "x", "extra": 1}), "/extra"),
        ],
    }
}

fn ping_examples() -> Examples {
    Examples {
        valid: vec![
            json!({"host": "127.0.0.1"}),
            json!({"targets": ["127.0.0.1", "::1"], "count": 3, "interval_ms": 10, "rate": 500}),
        ],
        invalid: vec![
            (json!({"host": "127.0.0.1", "count": 0}), "/count"),
            (json!({"host": ""}), "/host"),
            (json!({"host": "127.0.0.1", "size": 70000}), "/size"),
        ],
    }
}

fn tcping_examples() -> Examples {
    Examples {
        valid: vec![json!({"host": "127.0.0.1", "port": 22, "count": 2})],
        invalid: vec![
            (json!({"host": "127.0.0.1"}), "/port"),
            (json!({"host": "127.0.0.1", "port": 70000}), "/port"),
        ],
    }
}

fn faulty_examples() -> Examples {
    Examples {
        valid: vec![json!({"message": "m", "delay": 0.5, "error": true})],
        invalid: vec![(json!({"message": "m", "delay": -1}), "/delay")],
    }
}

fn heartbeat_examples() -> Examples {
    Examples {
        valid: vec![json!({})],
        invalid: vec![(json!({"verbose": true}), "/verbose")],
    }
}

/// Where a ping run sends: `host`, or each of `targets`; `count` probes each, at `rate`
/// or one target's interval spread over all targets.
fn ping_demand(params: &Value) -> Demand {
    let mut targets = Vec::new();
    if let Some(h) = str_param(params, "host") {
        targets.push(Target::new("/host", h));
    }
    if let Some(list) = params.get("targets").and_then(Value::as_array) {
        for (i, t) in list.iter().enumerate() {
            if let Some(h) = t.as_str() {
                targets.push(Target::new(format!("/targets/{i}"), h));
            }
        }
    }
    let count = u64_param(params, "count", 4);
    let n = targets.len() as u64;
    let rate = params
        .get("rate")
        .and_then(Value::as_f64)
        .or_else(|| (n > 0).then(|| rate_of(n, u64_param(params, "interval_ms", 1000))));
    Demand {
        targets,
        count: Some(count),
        probes: count.saturating_mul(n),
        rate,
        redirects: false,
    }
}

/// Where a tcping run connects: `host`; `count` connects, one per interval.
fn tcping_demand(params: &Value) -> Demand {
    let count = u64_param(params, "count", 4);
    Demand {
        targets: str_param(params, "host")
            .map(|h| vec![Target::new("/host", h)])
            .unwrap_or_default(),
        count: Some(count),
        probes: count,
        rate: Some(rate_of(1, u64_param(params, "interval_ms", 1000))),
        redirects: false,
    }
}

/// echo, faulty and heartbeat send nothing.
fn no_demand(_: &Value) -> Demand {
    Demand::none()
}

static CATALOG: [ModuleSpec; 11] = [
    ModuleSpec {
        name: "echo_module",
        version: "1.0.0",
        description: "Sends the message back; proves the whole path works.",
        default_timeout_ms: 5_000,
        schema: echo_schema,
        examples: echo_examples,
        demand: no_demand,
    },
    ModuleSpec {
        name: "ping_module",
        version: "0.1.0",
        description: "ICMP echo to one host or many: per-probe RTTs, loss and jitter.",
        default_timeout_ms: 300_000,
        schema: ping_schema,
        examples: ping_examples,
        demand: ping_demand,
    },
    ModuleSpec {
        name: "tcping",
        version: "1.0.0",
        description: "TCP connect time to host:port, with the kernel's RTT and availability.",
        default_timeout_ms: 300_000,
        schema: tcping_schema,
        examples: tcping_examples,
        demand: tcping_demand,
    },
    ModuleSpec {
        name: "faulty_module",
        version: "1.0.0",
        description: "Delays, panics, hangs or errors on request: tests fault handling.",
        default_timeout_ms: 10_000,
        schema: faulty_schema,
        examples: faulty_examples,
        demand: no_demand,
    },
    ModuleSpec {
        name: "heartbeat",
        version: "1.0.0",
        description: "CPU, memory, swap, load, uptime, disk and interface counters.",
        default_timeout_ms: 10_000,
        schema: heartbeat_schema,
        examples: heartbeat_examples,
        demand: no_demand,
    },
    ModuleSpec {
        name: "traceroute",
        version: "1.0.0",
        description: "Paris traceroute over ICMP, UDP or TCP: every hop's addresses, RTTs, ICMP type and MPLS labels.",
        default_timeout_ms: 300_000,
        schema: kinds::traceroute::traceroute_schema,
        examples: kinds::traceroute::traceroute_examples,
        demand: kinds::traceroute::traceroute_demand,
    },
    ModuleSpec {
        name: "mtr",
        version: "1.0.0",
        description: "Repeated Paris traceroutes: per-hop loss, RTT statistics and jitter, as mtr shows.",
        default_timeout_ms: 600_000,
        schema: kinds::traceroute::mtr_schema,
        examples: kinds::traceroute::mtr_examples,
        demand: kinds::traceroute::mtr_demand,
    },
    ModuleSpec {
        name: "dns",
        version: "1.0.0",
        description: "One DNS query over UDP or TCP: rcode, flags, every section, and the raw answer.",
        default_timeout_ms: 60_000,
        schema: kinds::dns::dns_schema,
        examples: kinds::dns::dns_examples,
        demand: kinds::dns::dns_demand,
    },
    ModuleSpec {
        name: "http",
        version: "1.0.0",
        description: "One HTTP/1.1 or HTTP/2 request, with DNS, connect, TLS and first-byte timings and the TLS details.",
        default_timeout_ms: 60_000,
        schema: kinds::http::http_schema,
        examples: kinds::http::http_examples,
        demand: kinds::http::http_demand,
    },
    ModuleSpec {
        name: "tls_cert",
        version: "1.0.0",
        description: "A TLS handshake: the server's certificate chain, version and cipher, as Atlas's sslcert.",
        default_timeout_ms: 60_000,
        schema: kinds::http::tls_cert_schema,
        examples: kinds::http::tls_cert_examples,
        demand: kinds::http::tls_cert_demand,
    },
    ModuleSpec {
        name: "ntp",
        version: "1.0.0",
        description: "NTP client exchanges with a server: offset, delay, stratum, reference id and leap status.",
        default_timeout_ms: 60_000,
        schema: kinds::ntp::ntp_schema,
        examples: kinds::ntp::ntp_examples,
        demand: kinds::ntp::ntp_demand,
    },
];

/// Every module IMN knows.
pub fn catalog() -> &'static [ModuleSpec] {
    &CATALOG
}

/// The spec of the named module.
pub fn find(name: &str) -> Option<&'static ModuleSpec> {
    CATALOG.iter().find(|m| m.name == name)
}

/// Names of every module, for error messages.
pub fn names() -> Vec<&'static str> {
    CATALOG.iter().map(|m| m.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_hashes_stable() {
        let mut names = names();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), catalog().len());
        let spec = find("echo_module").unwrap();
        assert_eq!(spec.schema_hash(), spec.schema_hash());
        assert_eq!(spec.schema_hash().len(), 16);
        assert_ne!(
            spec.schema_hash(),
            find("ping_module").unwrap().schema_hash()
        );
    }

    /// Parameters that name where packets go. A module whose schema has one of them
    /// must declare it as a target in its demand, or the policy would never see it.
    const TARGET_FIELDS: &[&str] = &["host", "targets", "url", "resolve", "server"];

    /// Every module declares the targets its parameters name: for each valid example,
    /// every target-like field present shows up among the demand's targets (a new
    /// module with a `host` it forgot to declare fails here), and a module whose schema
    /// has no such field declares none.
    #[test]
    fn every_module_declares_its_targets() {
        for spec in catalog() {
            let schema = spec.schema();
            let props = schema["properties"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            let fields: Vec<&str> = TARGET_FIELDS
                .iter()
                .copied()
                .filter(|f| props.contains_key(*f))
                .collect();
            for ex in spec.examples().valid {
                let d = spec.demand(&ex);
                let declared: Vec<&str> = d.targets.iter().map(|t| t.field.as_str()).collect();
                for f in &fields {
                    let Some(v) = ex.get(*f) else { continue };
                    // `url` is not a target when `resolve` says where to connect.
                    if *f == "url" && ex.get("resolve").is_some() {
                        continue;
                    }
                    let want: Vec<String> = match v.as_array() {
                        Some(list) => (0..list.len()).map(|i| format!("/{f}/{i}")).collect(),
                        None => vec![format!("/{f}")],
                    };
                    for w in want {
                        assert!(
                            declared.contains(&w.as_str()),
                            "{}: {ex} names {w}, which its demand does not declare ({declared:?})",
                            spec.name
                        );
                    }
                }
                if fields.is_empty() {
                    assert!(d.targets.is_empty(), "{}: {d:?}", spec.name);
                }
                assert!(
                    d.targets.is_empty() || d.probes > 0,
                    "{}: a run with targets sends probes: {d:?}",
                    spec.name
                );
            }
        }
    }

    #[test]
    fn demands_count_probes_and_rate() {
        let ping = find("ping_module").unwrap();
        let d = ping.demand(&json!({"targets": ["a", "b"], "count": 3, "interval_ms": 100}));
        assert_eq!(
            d.targets,
            vec![
                Target::new("/targets/0", "a"),
                Target::new("/targets/1", "b")
            ]
        );
        assert_eq!((d.count, d.probes, d.rate), (Some(3), 6, Some(20.0)));
        assert_eq!(
            ping.demand(&json!({"host": "a", "rate": 5.0})).rate,
            Some(5.0)
        );
        let http = find("http").unwrap();
        let d = http.demand(&json!({"url": "http://[::1]:8080/x?y", "follow_redirects": true}));
        assert_eq!((d.targets[0].host.as_str(), d.probes), ("::1", 6));
        let d = http.demand(&json!({"url": "https://a.test/", "resolve": "127.0.0.1"}));
        assert_eq!(d.targets, vec![Target::new("/resolve", "127.0.0.1")]);
        let dns = find("dns").unwrap();
        let d = dns.demand(&json!({"name": "a.test", "server": "127.0.0.1:5353"}));
        assert_eq!(d.targets, vec![Target::new("/server", "127.0.0.1")]);
        assert!(dns.demand(&json!({"name": "a.test"})).targets.is_empty());
        let tr = find("traceroute").unwrap();
        assert_eq!(tr.demand(&json!({"host": "h", "max_ttl": 10})).probes, 30);
        // Junk of any type never panics and counts as absent.
        for spec in catalog() {
            for v in [
                json!(null),
                json!({"host": 5, "targets": "x", "count": -1}),
                json!([1]),
            ] {
                let _ = spec.demand(&v);
            }
        }
        assert!(find("echo_module")
            .unwrap()
            .demand(&json!({"message": "m"}))
            .targets
            .is_empty());
    }
}
