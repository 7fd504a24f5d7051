//! The `traceroute`, `mtr` module(s): parameters, result and schema (scaffold: to be filled in).

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::Examples;
use crate::params::ParamError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracerouteParams {
    pub host: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TracerouteResult {
    pub host: String,
}

pub fn traceroute_schema() -> Value {
    json!({
        "$schema": crate::catalog::DRAFT,
        "title": "traceroute parameters",
        "type": "object",
        "properties": {"host": {"type": "string", "minLength": 1, "maxLength": 253}},
        "required": ["host"],
        "additionalProperties": false
    })
}

pub fn traceroute_examples() -> Examples {
    Examples {
        valid: vec![json!({"host": "127.0.0.1"})],
        invalid: vec![(json!({}), "/host")],
    }
}

/// Rules the schema cannot express.
pub fn traceroute_check(params: &Value) -> Result<(), ParamError> {
    crate::params::parse::<TracerouteParams>(params).map(|_| ())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtrParams {
    pub host: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MtrResult {
    pub host: String,
}

pub fn mtr_schema() -> Value {
    json!({
        "$schema": crate::catalog::DRAFT,
        "title": "mtr parameters",
        "type": "object",
        "properties": {"host": {"type": "string", "minLength": 1, "maxLength": 253}},
        "required": ["host"],
        "additionalProperties": false
    })
}

pub fn mtr_examples() -> Examples {
    Examples {
        valid: vec![json!({"host": "127.0.0.1"})],
        invalid: vec![(json!({}), "/host")],
    }
}

/// Rules the schema cannot express.
pub fn mtr_check(params: &Value) -> Result<(), ParamError> {
    crate::params::parse::<MtrParams>(params).map(|_| ())
}
