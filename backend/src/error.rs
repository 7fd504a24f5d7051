//! The API's error type: each variant owns its HTTP status and JSON body
//! `{"error": code, "message": ..., "field": ...}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("{message}")]
    InvalidParams {
        field: String,
        rule: String,
        message: String,
    },
    /// A query parameter, header or field out of its rule (400).
    #[error("{message}")]
    BadQuery {
        field: String,
        rule: String,
        message: String,
    },
    #[error("no agent {0:?} is registered")]
    UnknownAgent(String),
    #[error("no module {module:?}; modules: {}", .known.join(", "))]
    UnknownModule { module: String, known: Vec<String> },
    #[error("module {module:?} is not loaded on agent {agent:?}; loaded: {}", .loaded.join(", "))]
    ModuleNotLoaded {
        agent: String,
        module: String,
        loaded: Vec<String>,
    },
    #[error("agent {0:?} is not connected")]
    AgentOffline(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
    /// No token, or one that is unknown or revoked.
    #[error("{0}")]
    Unauthorized(String),
    /// A token without the scope the route needs.
    #[error("{message}")]
    Forbidden { rule: String, message: String },
    /// A token over its rate.
    #[error("{message}")]
    RateLimited { retry_after_s: u64, message: String },
    /// A request over one of the configured input limits.
    #[error("{message}")]
    OverLimit {
        limit: &'static str,
        field: String,
        message: String,
    },
    /// The request body is over `max_body_bytes`.
    #[error("the request body is over the limit max_body_bytes = {limit}")]
    BodyTooLarge { limit: usize },
    /// Too many unfinished requests for one agent.
    #[error("{message}")]
    QueueFull { message: String },
    /// A measurement against the measurement policy.
    #[error("{message}")]
    PolicyDenied { rule: String, message: String },
    #[error("{0}")]
    Conflict(String),
    /// A token over one of its budgets (probes a day, recurring measurements).
    #[error("{message}")]
    OverBudget {
        budget: &'static str,
        retry_after_s: u64,
        message: String,
    },
    /// Busy for this caller now (too many open streams): retry later.
    #[error("{message}")]
    Busy {
        limit: &'static str,
        retry_after_s: u64,
        message: String,
    },
    /// An `Idempotency-Key` reused for a different request.
    #[error("{0}")]
    IdempotencyMismatch(String),
    /// The route exists, but not with this method.
    #[error("method {method} is not allowed here; allowed: {allowed}")]
    MethodNotAllowed { method: String, allowed: String },
    /// A refusal the HTTP layer made before any handler ran (a body that could not be
    /// read, for one): its status, kept, with the layer's words.
    #[error("{message}")]
    Refused { status: u16, message: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => ApiError::Unavailable(e.to_string()),
            e => ApiError::Internal(e.to_string()),
        }
    }
}

impl ApiError {
    /// A 400 naming the field (or parameter, or `body`) and its rule.
    pub fn refused(field: &str, rule: &str, message: String) -> ApiError {
        ApiError::BadQuery {
            field: field.into(),
            rule: rule.into(),
            message,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MalformedJson(_) | ApiError::BadQuery { .. } => StatusCode::BAD_REQUEST,
            ApiError::InvalidParams { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::UnknownAgent(_) | ApiError::UnknownModule { .. } | ApiError::NotFound(_) => {
                StatusCode::NOT_FOUND
            }
            ApiError::ModuleNotLoaded { .. }
            | ApiError::AgentOffline(_)
            | ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } | ApiError::PolicyDenied { .. } => StatusCode::FORBIDDEN,
            ApiError::RateLimited { .. }
            | ApiError::QueueFull { .. }
            | ApiError::OverBudget { .. }
            | ApiError::Busy { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::OverLimit { .. } | ApiError::IdempotencyMismatch(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Refused { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST)
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::InvalidParams { .. } => "invalid_params",
            ApiError::BadQuery { .. } => "bad_request",
            ApiError::UnknownAgent(_) => "unknown_agent",
            ApiError::UnknownModule { .. } => "unknown_module",
            ApiError::ModuleNotLoaded { .. } => "module_not_loaded",
            ApiError::AgentOffline(_) => "agent_offline",
            ApiError::NotFound(_) => "not_found",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden { .. } => "forbidden",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::OverLimit { .. }
            | ApiError::BodyTooLarge { .. }
            | ApiError::QueueFull { .. }
            | ApiError::Busy { .. } => "over_limit",
            ApiError::OverBudget { .. } => "over_budget",
            ApiError::IdempotencyMismatch(_) => "idempotency_key_reused",
            ApiError::PolicyDenied { .. } => "policy_denied",
            ApiError::Conflict(_) => "conflict",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::Refused { .. } => "bad_request",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn body(&self) -> Value {
        let mut body = json!({"error": self.code(), "message": self.to_string()});
        match self {
            ApiError::InvalidParams { field, rule, .. }
            | ApiError::BadQuery { field, rule, .. } => {
                body["field"] = json!(field);
                body["rule"] = json!(rule);
            }
            ApiError::UnknownModule { known, .. } => body["modules"] = json!(known),
            ApiError::ModuleNotLoaded { loaded, .. } => body["modules"] = json!(loaded),
            ApiError::UnknownAgent(_) => body["field"] = json!("agent_id"),
            ApiError::MalformedJson(_) => {
                body["field"] = json!("body");
                body["rule"] = json!("json");
            }
            ApiError::Unauthorized(_) => {
                body["field"] = json!("Authorization");
                body["rule"] = json!("bearer_token");
            }
            ApiError::Forbidden { rule, .. } | ApiError::PolicyDenied { rule, .. } => {
                body["rule"] = json!(rule)
            }
            ApiError::OverLimit { limit, field, .. } => {
                body["limit"] = json!(limit);
                body["field"] = json!(field);
            }
            ApiError::BodyTooLarge { limit } => {
                body["field"] = json!("body");
                body["rule"] = json!("max_body_bytes");
                body["limit"] = json!("max_body_bytes");
                body["max"] = json!(limit);
            }
            ApiError::QueueFull { .. } => body["limit"] = json!("max_queued_per_agent"),
            ApiError::RateLimited { retry_after_s, .. } => {
                body["retry_after_s"] = json!(retry_after_s)
            }
            ApiError::OverBudget {
                budget,
                retry_after_s,
                ..
            } => {
                body["budget"] = json!(budget);
                body["retry_after_s"] = json!(retry_after_s);
            }
            ApiError::Busy {
                limit,
                retry_after_s,
                ..
            } => {
                body["limit"] = json!(limit);
                body["retry_after_s"] = json!(retry_after_s);
            }
            ApiError::IdempotencyMismatch(_) => {
                body["field"] = json!("Idempotency-Key");
                body["rule"] = json!("same_request");
            }
            ApiError::MethodNotAllowed { .. } => {
                body["field"] = json!("method");
                body["rule"] = json!("allowed_methods");
            }
            ApiError::Refused { .. } => {
                body["field"] = json!("request");
                body["rule"] = json!("http");
            }
            _ => {}
        }
        body
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if matches!(self, ApiError::Internal(_)) {
            tracing::error!(error = %self, "internal API error");
        }
        let mut resp = (self.status(), Json(self.body())).into_response();
        let headers = resp.headers_mut();
        match &self {
            ApiError::Unauthorized(_) => {
                headers.insert(
                    axum::http::header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static("Bearer"),
                );
            }
            ApiError::RateLimited { retry_after_s, .. }
            | ApiError::OverBudget { retry_after_s, .. }
            | ApiError::Busy { retry_after_s, .. } => {
                headers.insert(
                    axum::http::header::RETRY_AFTER,
                    axum::http::HeaderValue::from(*retry_after_s),
                );
            }
            ApiError::QueueFull { .. } => {
                headers.insert(
                    axum::http::header::RETRY_AFTER,
                    axum::http::HeaderValue::from(5u64),
                );
            }
            ApiError::MethodNotAllowed { allowed, .. } if !allowed.is_empty() => {
                if let Ok(v) = axum::http::HeaderValue::from_str(allowed) {
                    headers.insert(axum::http::header::ALLOW, v);
                }
            }
            _ => {}
        }
        resp
    }
}
