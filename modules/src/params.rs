//! Typed parameters of each module, parsed from the JSON that passed the schema, plus
//! the rules a JSON Schema cannot express (such as a length in bytes).

use serde::Deserialize;
use serde_json::Value;

/// A rule the parameters broke, beyond the schema.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ParamError {
    /// JSON pointer of the offending field.
    pub field: String,
    /// The rule's name, like a JSON Schema keyword (`required`, `maxBytes`).
    pub rule: &'static str,
    /// The rule, in words.
    pub message: String,
}

pub use crate::kinds::echo::{EchoParams, ECHO_MAX_BYTES};
pub use crate::kinds::faulty::FaultyParams;
pub use crate::kinds::ping::{PingParams, PING_MAX_TARGETS};
pub use crate::kinds::tcping::TcpingParams;

pub(crate) fn parse<T: for<'de> Deserialize<'de>>(params: &Value) -> Result<T, ParamError> {
    serde_json::from_value(params.clone()).map_err(|e| ParamError {
        field: String::new(),
        rule: "type",
        message: e.to_string(),
    })
}

/// Checks what the schema cannot: called by the backend after schema validation.
/// Each module's rules are its spec's `check`; an unknown module has none.
#[cfg(feature = "catalog")]
pub fn check(module: &str, params: &Value) -> Result<(), ParamError> {
    match crate::catalog::find(module) {
        Some(spec) => spec.check(params),
        None => Ok(()),
    }
}

#[cfg(all(test, feature = "catalog"))]
mod tests {
    use super::*;
    use serde_json::json;

    /// `check` reaches each module's own rules by name.
    #[test]
    fn check_dispatches_by_module_name() {
        let long = "é".repeat(2049);
        assert_eq!(
            check("echo_module", &json!({"message": long}))
                .unwrap_err()
                .field,
            "/message"
        );
        let both = json!({"host": "a", "targets": ["b"], "count": 1});
        assert_eq!(check("ping_module", &both).unwrap_err().field, "/host");
        assert!(check("no_such_module", &json!({"anything": 1})).is_ok());
    }
}
