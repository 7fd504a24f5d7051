//! `faulty_module`: delays, panics, hangs or errors on request, to test the agent's
//! supervisor and the whole path. Sends nothing to the network.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{no_demand, parse, Examples, Summary};
use crate::catalog::{ModuleSpec, DRAFT};
use crate::params::ParamError;

pub const SPEC: ModuleSpec = ModuleSpec {
    name: "faulty_module",
    version: "1.0.0",
    description: "Delays, panics, hangs or errors on request: tests fault handling.",
    default_timeout_ms: 10_000,
    schema_hash: "b87574fb4b1c3bf4",
    takes_rate: false,
    #[cfg(feature = "catalog")]
    schema,
    #[cfg(feature = "catalog")]
    examples,
    demand: no_demand,
    #[cfg(feature = "catalog")]
    check,
    #[cfg(feature = "atlas")]
    atlas: None,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultyParams {
    pub message: String,
    /// Seconds to sleep before answering.
    #[serde(default)]
    pub delay: f64,
    #[serde(default)]
    pub crash: bool,
    #[serde(default)]
    pub hang: bool,
    #[serde(default)]
    pub error: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultyResult {
    pub message: String,
    /// Seconds the module slept before answering.
    pub delayed_s: f64,
}

impl Summary for FaultyResult {
    fn summary(&self) -> String {
        format!("{} (after {} s)", self.message, self.delayed_s)
    }
}

fn schema() -> Value {
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

fn examples() -> Examples {
    Examples {
        valid: vec![json!({"message": "m", "delay": 0.5, "error": true})],
        invalid: vec![(json!({"message": "m", "delay": -1}), "/delay")],
    }
}

fn check(params: &Value) -> Result<(), ParamError> {
    parse::<FaultyParams>(params).map(|_| ())
}
