//! `echo_module`: sends the message back. It proves the whole path works (API, bus,
//! broker, agent, outbox, ack) and sends nothing to the network.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{no_demand, parse, Examples, Summary};
use crate::catalog::{ModuleSpec, DRAFT};
use crate::params::ParamError;

pub const SPEC: ModuleSpec = ModuleSpec {
    name: "echo_module",
    version: "1.0.0",
    description: "Sends the message back; proves the whole path works.",
    default_timeout_ms: 5_000,
    schema_hash: "5a20e17d997bb47a",
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
pub struct EchoParams {
    pub message: String,
}

pub const ECHO_MAX_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EchoResult {
    pub message: String,
}

impl Summary for EchoResult {
    fn summary(&self) -> String {
        self.message.clone()
    }
}

fn schema() -> Value {
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

fn examples() -> Examples {
    Examples {
        valid: vec![json!({"message": "hello"})],
        invalid: vec![
            (json!({}), "/message"),
            (json!({"message": 7}), "/message"),
            (json!({"message": "x", "extra": 1}), "/extra"),
        ],
    }
}

/// The schema counts characters; the limit is in bytes of UTF-8.
fn check(params: &Value) -> Result<(), ParamError> {
    let p: EchoParams = parse(params)?;
    if p.message.len() > ECHO_MAX_BYTES {
        return Err(ParamError {
            field: "/message".into(),
            rule: "maxBytes",
            message: format!(
                "must be at most {ECHO_MAX_BYTES} bytes of UTF-8, got {}",
                p.message.len()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_counts_bytes_not_chars() {
        let ok = "é".repeat(2048); // 4096 bytes
        assert!(check(&json!({"message": ok})).is_ok());
        let long = "é".repeat(2049);
        let err = check(&json!({"message": long})).unwrap_err();
        assert_eq!(err.field, "/message");
    }
}
