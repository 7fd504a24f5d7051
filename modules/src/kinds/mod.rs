//! Parameters, results and JSON Schemas of the network measurement modules that came
//! with RIPE Atlas and Globalping parity: traceroute and mtr, DNS, HTTP and TLS
//! certificates, NTP. One file per kind; the code that runs them is in `imn-probes`.
//!
//! Results cross the device link as postcard, which is not self-describing: result
//! types use plain fields and `Option`, never `skip_serializing_if`, `flatten`,
//! untagged enums or `serde_json::Value`.

pub mod dns;
pub mod http;
pub mod ntp;
pub mod traceroute;

use serde_json::Value;

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
