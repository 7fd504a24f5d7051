//! The `dns` module(s): parameters, result and schema (scaffold: to be filled in).

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::Examples;
use crate::params::ParamError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsParams {
    pub host: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DnsResult {
    pub host: String,
}

pub fn dns_schema() -> Value {
    json!({
        "$schema": crate::catalog::DRAFT,
        "title": "dns parameters",
        "type": "object",
        "properties": {"host": {"type": "string", "minLength": 1, "maxLength": 253}},
        "required": ["host"],
        "additionalProperties": false
    })
}

pub fn dns_examples() -> Examples {
    Examples {
        valid: vec![json!({"host": "127.0.0.1"})],
        invalid: vec![(json!({}), "/host")],
    }
}

/// Rules the schema cannot express.
pub fn dns_check(params: &Value) -> Result<(), ParamError> {
    crate::params::parse::<DnsParams>(params).map(|_| ())
}
