//! Parameters, results and JSON Schemas of the network measurement modules that came
//! with RIPE Atlas and Globalping parity: traceroute and mtr, DNS, HTTP and TLS
//! certificates, NTP. One file per kind; the code that runs them is in `exec`.
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
