//! The API's own extractors for the query string and path parameters. axum's `Query`
//! and `Path` answer a value that does not parse with a `text/plain` 400; these answer
//! with the API's error (`bad_request`, JSON), naming the parameter and the rule, as
//! every other refusal does. Every handler takes them (`api/mod.rs` imports them in
//! place of axum's), so no framework rejection of a query or path reaches a client.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The query string, deserialized into `T`. A refusal names the parameter (`field`)
/// and the rule: `type` (the value does not parse as the parameter's type), `unknown`
/// (a parameter the operation does not take), `duplicate` (given twice), `required`.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parse_query(parts.uri.query().unwrap_or("")).map(Query)
    }
}

/// Deserializes a query string into `T`; the error names the parameter and the rule.
pub fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde's messages about a parameter itself name it in backticks.
        let named = |prefix: &str| {
            inner
                .strip_prefix(prefix)
                .and_then(|rest| rest.split('`').next())
                .map(str::to_string)
        };
        let at = |name: Option<String>| match name {
            Some(n) if path.is_empty() || path == "." => n,
            _ if path.is_empty() || path == "." => "query".to_string(),
            _ => path.clone(),
        };
        let (field, rule) = if let Some(f) = named("unknown field `") {
            (at(Some(f)), "unknown")
        } else if let Some(f) = named("duplicate field `") {
            (at(Some(f)), "duplicate")
        } else if let Some(f) = named("missing field `") {
            (at(Some(f)), "required")
        } else if path.is_empty() || path == "." {
            (at(None), "syntax")
        } else {
            (path.clone(), "type")
        };
        ApiError::BadQuery {
            message: format!("query parameter {field}: {inner}"),
            field,
            rule: rule.into(),
        }
    })
}

/// Path parameters, deserialized into `T` (a `String`, or a tuple of them). A
/// refusal (a segment that is not UTF-8 once percent-decoded, or not of the type)
/// names the parameter and the rule (`utf8`, `type`).
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => {
                let message = e.body_text();
                let (field, rule) = match e.into_kind() {
                    ErrorKind::InvalidUtf8InPathParam { key } => (key, "utf8"),
                    ErrorKind::ParseErrorAtKey { key, .. }
                    | ErrorKind::DeserializeError { key, .. } => (key, "type"),
                    ErrorKind::ParseErrorAtIndex { index, .. } => {
                        (format!("path parameter {index}"), "type")
                    }
                    ErrorKind::UnsupportedType { .. }
                    | ErrorKind::WrongNumberOfParameters { .. } => {
                        return Err(ApiError::Internal(message))
                    }
                    _ => ("path".to_string(), "type"),
                };
                Err(ApiError::BadQuery {
                    message: format!("path parameter {field}: {message}"),
                    field,
                    rule: rule.into(),
                })
            }
            Err(e) => Err(ApiError::Internal(e.body_text())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Q {
        limit: Option<usize>,
        wait: Option<f64>,
        alive: Option<bool>,
        name: String,
    }

    fn refusal(q: &str) -> (String, String) {
        match parse_query::<Q>(q) {
            Err(ApiError::BadQuery { field, rule, .. }) => (field, rule),
            other => panic!("{q}: {other:?}"),
        }
    }

    #[test]
    fn every_query_refusal_names_its_parameter_and_rule() {
        let pair = |f: &str, r: &str| (f.to_string(), r.to_string());
        assert_eq!(refusal("name=a&limit=null"), pair("limit", "type"));
        assert_eq!(refusal("name=a&limit=-1"), pair("limit", "type"));
        assert_eq!(refusal("name=a&wait=null"), pair("wait", "type"));
        assert_eq!(refusal("name=a&alive=yes"), pair("alive", "type"));
        assert_eq!(refusal("name=a&x-other=1"), pair("x-other", "unknown"));
        assert_eq!(
            refusal("name=a&limit=1&limit=2"),
            pair("limit", "duplicate")
        );
        assert_eq!(refusal("limit=1"), pair("name", "required"));
        let ok: Q = parse_query("name=a&limit=5&wait=1.5&alive=true").unwrap();
        assert_eq!(
            (ok.limit, ok.wait, ok.alive),
            (Some(5), Some(1.5), Some(true))
        );
    }
}
