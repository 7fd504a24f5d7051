//! Parameter validation: each module's JSON Schema compiled once, then the rules a
//! schema cannot express. Errors name the JSON pointer of the field and the rule.

use std::collections::HashMap;

use imn_proto::{catalog, params};
use serde_json::Value;

use crate::error::ApiError;

pub struct Validators {
    by_module: HashMap<&'static str, jsonschema::Validator>,
}

impl Validators {
    /// Compiles every catalog schema.
    pub fn new() -> Result<Validators, ApiError> {
        let mut by_module = HashMap::new();
        for spec in catalog::catalog() {
            let v = jsonschema::validator_for(&spec.schema()).map_err(|e| {
                ApiError::Internal(format!("schema of {} does not compile: {e}", spec.name))
            })?;
            by_module.insert(spec.name, v);
        }
        Ok(Validators { by_module })
    }

    /// Validates parameters against the module's schema, then the rules a schema
    /// cannot express. Never panics, whatever the input.
    pub fn validate(&self, module: &str, params: &Value) -> Result<(), ApiError> {
        let validator = self
            .by_module
            .get(module)
            .ok_or_else(|| ApiError::UnknownModule {
                module: module.to_string(),
                known: catalog::names().iter().map(|s| s.to_string()).collect(),
            })?;
        check_schema(validator, params)?;
        params::check(module, params).map_err(|e| ApiError::InvalidParams {
            message: e.to_string(),
            rule: e.rule.into(),
            field: e.field,
        })
    }
}

/// Checks `params` against one compiled schema: the first error, naming the JSON
/// pointer of the field and the rule. Never panics, whatever the input.
///
/// It stops at the first error (`validate`, not `iter_errors`, which would judge every
/// item of a long array first), and its message shows at most [`MAX_SHOWN`] characters
/// of the value at fault, however large.
pub fn check_schema(validator: &jsonschema::Validator, params: &Value) -> Result<(), ApiError> {
    if validator.is_valid(params) {
        return Ok(());
    }
    if let Err(err) = validator.validate(params) {
        let mut field = err.instance_path.to_string();
        match &err.kind {
            jsonschema::error::ValidationErrorKind::Required { property } => {
                field = format!("{field}/{}", property.as_str().unwrap_or_default());
            }
            jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected } => {
                if let Some(p) = unexpected.first() {
                    field = format!("{field}/{p}");
                }
            }
            _ => {}
        }
        let rule = err
            .schema_path
            .to_string()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let shown = if field.is_empty() {
            "/".to_string()
        } else {
            field.clone()
        };
        let mut said = err.to_string();
        if said.chars().count() > MAX_SHOWN {
            said = said.chars().take(MAX_SHOWN).collect::<String>() + "…";
        }
        // A key that is not allowed (`propertyNames`): the field is the key itself, and
        // the message lists the keys that are.
        let inner = match &err.kind {
            jsonschema::error::ValidationErrorKind::PropertyNames { error } => Some(error),
            _ => None,
        };
        let (shown, rule) = match inner.map(|e| (&e.kind, e.instance.as_str())) {
            Some((jsonschema::error::ValidationErrorKind::Enum { options }, Some(key))) => {
                let at = format!("{}/{}", field, key.replace('~', "~0").replace('/', "~1"));
                let allowed: Vec<&str> = options
                    .as_array()
                    .map(|o| o.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let key: String = key.chars().take(64).collect();
                said = format!(
                    "{key:?} is not allowed here; allowed: {}",
                    allowed.join(", ")
                );
                (at, "propertyNames".to_string())
            }
            _ => (shown, rule),
        };
        return Err(ApiError::InvalidParams {
            message: format!("{shown}: {said} (rule: {rule})"),
            field: shown,
            rule,
        });
    }
    Ok(())
}

/// The most characters of a schema error's own words an answer carries (they quote
/// the value at fault, which may be as large as the body).
pub const MAX_SHOWN: usize = 300;
