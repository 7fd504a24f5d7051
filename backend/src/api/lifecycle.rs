//! Releases, rollouts and remote settings (see `service::lifecycle`).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;

use super::Path;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::fleet::Selection;
use crate::service::lifecycle::NewRollout;
use crate::service::Backend;

/// The largest release file accepted (the manifest's limit, and its header).
pub const MAX_RELEASE_BODY: usize = imn_proto::release::MAX_SIZE as usize + 8192;

/// `POST /admin/releases`: the signed file's bytes as the body.
pub(super) async fn add_release(
    State(b): State<Arc<Backend>>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (release, stored) = b.add_release(&body).await?;
    let status = if stored {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!({"release": release, "stored": stored}))))
}

/// `GET /releases`.
pub(super) async fn releases(State(b): State<Arc<Backend>>) -> Result<Json<Value>, ApiError> {
    Ok(Json(b.releases_json().await?))
}

/// `POST /admin/rollouts`.
pub(super) async fn start_rollout(
    State(b): State<Arc<Backend>>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: NewRollout = super::json_body(&body)?;
    Ok((StatusCode::CREATED, Json(b.start_rollout(req).await?)))
}

/// `GET /rollouts`.
pub(super) async fn rollouts(State(b): State<Arc<Backend>>) -> Result<Json<Value>, ApiError> {
    Ok(Json(b.rollouts_json().await?))
}

/// `GET /rollouts/{id}`.
pub(super) async fn rollout(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(b.rollout_json(&id).await?))
}

/// `POST /admin/rollouts/{id}/{action}`: pause, resume or abort.
pub(super) async fn rollout_action(
    State(b): State<Arc<Backend>>,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    if !matches!(action.as_str(), "pause" | "resume" | "abort") {
        return Err(ApiError::NotFound(format!(
            "no rollout action {action:?} (pause, resume, abort)"
        )));
    }
    Ok(Json(b.rollout_action(&id, &action).await?))
}

/// Body of `POST /admin/settings`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SetSettings {
    agents: Selection,
    settings: BTreeMap<String, String>,
}

/// `POST /admin/settings`.
pub(super) async fn set_settings(
    State(b): State<Arc<Backend>>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: SetSettings = super::json_body(&body)?;
    Ok(Json(b.set_settings(&req.agents, req.settings).await?))
}
