//! The `http`, `tls_cert` module(s): parameters, result and schema (scaffold: to be filled in).

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::Examples;
use crate::params::ParamError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpParams {
    pub host: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpResult {
    pub host: String,
}

pub fn http_schema() -> Value {
    json!({
        "$schema": crate::catalog::DRAFT,
        "title": "http parameters",
        "type": "object",
        "properties": {"host": {"type": "string", "minLength": 1, "maxLength": 253}},
        "required": ["host"],
        "additionalProperties": false
    })
}

pub fn http_examples() -> Examples {
    Examples {
        valid: vec![json!({"host": "127.0.0.1"})],
        invalid: vec![(json!({}), "/host")],
    }
}

/// Rules the schema cannot express.
pub fn http_check(params: &Value) -> Result<(), ParamError> {
    crate::params::parse::<HttpParams>(params).map(|_| ())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCertParams {
    pub host: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TlsCertResult {
    pub host: String,
}

pub fn tls_cert_schema() -> Value {
    json!({
        "$schema": crate::catalog::DRAFT,
        "title": "tls_cert parameters",
        "type": "object",
        "properties": {"host": {"type": "string", "minLength": 1, "maxLength": 253}},
        "required": ["host"],
        "additionalProperties": false
    })
}

pub fn tls_cert_examples() -> Examples {
    Examples {
        valid: vec![json!({"host": "127.0.0.1"})],
        invalid: vec![(json!({}), "/host")],
    }
}

/// Rules the schema cannot express.
pub fn tls_cert_check(params: &Value) -> Result<(), ParamError> {
    crate::params::parse::<TlsCertParams>(params).map(|_| ())
}
