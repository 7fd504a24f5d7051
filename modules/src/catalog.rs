//! The module catalog: what each module is called, its version, and the JSON Schema
//! (draft 2020-12) its parameters must satisfy. The backend validates against these
//! schemas; the agent reports their hashes in its hello. Each entry (`SPEC`) is
//! defined beside its module in [`crate::kinds`] and registered, with the module's
//! output variant, in one line of `results::modules!`.

use serde_json::Value;
#[cfg(feature = "catalog")]
use sha2::{Digest, Sha256};

#[cfg(feature = "catalog")]
use crate::kinds::Examples;
#[cfg(feature = "catalog")]
use crate::params::ParamError;
use crate::policy::Demand;

/// One module as the catalog describes it.
#[derive(Debug, Clone)]
pub struct ModuleSpec {
    pub name: &'static str,
    pub version: &'static str,
    pub description: &'static str,
    /// How long a run may take before the agent cancels it, unless the request says.
    pub default_timeout_ms: u64,
    /// First 16 hex digits of the SHA-256 of the schema's canonical JSON, as hello
    /// reports it. Written in the source so that a build without the schemas (the
    /// agent's firmware: feature `catalog` off) reports the same hash; the test
    /// `schema_hashes_are_current` recomputes every one and names the new value.
    pub schema_hash: &'static str,
    /// Whether the parameters have a `rate` (an agent's `max_rate` caps it there);
    /// checked against the schema by the same test.
    pub takes_rate: bool,
    #[cfg(feature = "catalog")]
    pub(crate) schema: fn() -> Value,
    #[cfg(feature = "catalog")]
    pub(crate) examples: fn() -> Examples,
    /// Where a run sends packets, how many and how fast (see [`Demand`]). Every module
    /// declares it: the backend's policy, limits and budgets and the agent's budgets
    /// read nothing else.
    pub(crate) demand: fn(&Value) -> Demand,
    /// The rules a JSON Schema cannot express (a length in bytes, one of two fields),
    /// checked by the backend after the schema.
    #[cfg(feature = "catalog")]
    pub(crate) check: fn(&Value) -> Result<(), ParamError>,
    /// The module's results in RIPE Atlas's format (`kinds/<module>/atlas.rs`), for a
    /// module Atlas has a kind for.
    #[cfg(feature = "atlas")]
    pub(crate) atlas: Option<crate::atlas::Convert>,
}

impl ModuleSpec {
    /// The JSON Schema of the module's parameters.
    #[cfg(feature = "catalog")]
    pub fn schema(&self) -> Value {
        (self.schema)()
    }

    /// Parameters the schema must accept, and parameters it must refuse naming a field.
    #[cfg(feature = "catalog")]
    pub fn examples(&self) -> Examples {
        (self.examples)()
    }

    /// What a run with these (validated) parameters asks of the network. Never panics,
    /// whatever the value: a field of the wrong type counts as absent.
    pub fn demand(&self, params: &Value) -> Demand {
        (self.demand)(params)
    }

    /// Checks what the schema cannot, on parameters that passed it.
    #[cfg(feature = "catalog")]
    pub fn check(&self, params: &Value) -> Result<(), ParamError> {
        (self.check)(params)
    }

    /// First 16 hex digits of the SHA-256 of the schema's canonical JSON.
    pub fn schema_hash(&self) -> String {
        self.schema_hash.to_string()
    }

    /// The schema hash computed from the schema (what `schema_hash` must equal).
    #[cfg(feature = "catalog")]
    pub fn computed_schema_hash(&self) -> String {
        let digest = Sha256::digest(self.schema().to_string().as_bytes());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

pub(crate) const DRAFT: &str = "https://json-schema.org/draft/2020-12/schema";

/// Every module IMN knows.
pub fn catalog() -> &'static [ModuleSpec] {
    crate::results::SPECS
}

/// The spec of the named module.
pub fn find(name: &str) -> Option<&'static ModuleSpec> {
    catalog().iter().find(|m| m.name == name)
}

/// Names of every module, for error messages.
pub fn names() -> Vec<&'static str> {
    catalog().iter().map(|m| m.name).collect()
}

#[cfg(all(test, feature = "catalog"))]
mod tests {
    use super::*;

    /// The hash and `takes_rate` written in each SPEC are the schema's: a schema edited
    /// without them fails here, naming the value to write.
    #[test]
    fn schema_hashes_are_current() {
        let mut stale = Vec::new();
        for spec in catalog() {
            let h = spec.computed_schema_hash();
            if spec.schema_hash != h {
                stale.push(format!("{}: schema_hash: \"{h}\"", spec.name));
            }
            let rate = spec.schema().pointer("/properties/rate").is_some();
            if spec.takes_rate != rate {
                stale.push(format!("{}: takes_rate: {rate}", spec.name));
            }
        }
        assert!(
            stale.is_empty(),
            "stale fields in SPEC:\n{}",
            stale.join("\n")
        );
    }
    use crate::policy::Target;
    use serde_json::json;

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
