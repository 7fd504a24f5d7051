//! Every module's contract, one file per module (or per pair that shares its types:
//! traceroute and mtr, http and tls_cert): its catalog entry (`SPEC`: name, version,
//! JSON Schema, examples, the targets it declares for the policy, the checks a schema
//! cannot express), its typed parameters and result, and the result's one-line
//! [`Summary`], and, for a module RIPE Atlas has a kind for, its Atlas form
//! (`<module>/atlas.rs`, feature `atlas`). The code that runs a module is in
//! `imn-probes`. `docs/modules.md` walks through adding one.
//!
//! Results cross the device link as postcard, which is not self-describing: result
//! types use plain fields and `Option`, never `skip_serializing_if`, `flatten`,
//! untagged enums or `serde_json::Value`.

// Without feature `catalog` (the agent) the schemas, examples and checks are left out,
// and the helpers only they use go unused.
#![cfg_attr(not(feature = "catalog"), allow(dead_code, unused_imports))]

pub mod dns;
pub mod echo;
pub mod faulty;
pub mod heartbeat;
pub mod http;
pub mod ntp;
pub mod ping;
pub mod tcping;
pub mod traceroute;

use serde_json::Value;

pub(crate) use crate::params::parse;
pub(crate) use crate::summary::ms;
pub use crate::summary::Summary;

use crate::params::ParamError;
use crate::policy::Demand;

/// A module that sends nothing (echo, faulty, heartbeat).
pub(crate) fn no_demand(_: &Value) -> Demand {
    Demand::none()
}

/// A module with no rule beyond its schema.
pub(crate) fn no_check(_: &Value) -> Result<(), ParamError> {
    Ok(())
}

/// Examples of a module's parameters, checked against its schema by the backend's
/// tests: every `valid` one is accepted, every `invalid` one is refused naming the
/// JSON pointer given beside it.
#[derive(Debug, Clone, Default)]
pub struct Examples {
    pub valid: Vec<Value>,
    pub invalid: Vec<(Value, &'static str)>,
}

/// A string parameter.
pub(crate) fn str_param<'a>(params: &'a Value, key: &str) -> Option<&'a str> {
    params.get(key).and_then(Value::as_str)
}

/// An integer parameter, or its default.
pub(crate) fn u64_param(params: &Value, key: &str, default: u64) -> u64 {
    params.get(key).and_then(Value::as_u64).unwrap_or(default)
}

/// Probes per second of `per_interval` probes sent every `interval_ms`.
pub(crate) fn rate_of(per_interval: u64, interval_ms: u64) -> f64 {
    per_interval as f64 * 1000.0 / interval_ms.max(1) as f64
}
