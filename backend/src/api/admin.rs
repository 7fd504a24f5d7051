//! Administration: enrolled agents' credentials and API tokens.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EnrollBody {
    id: String,
    #[serde(default)]
    tags: Vec<String>,
}

pub(super) fn enrolled_json(a: &crate::security::EnrolledAgent) -> Value {
    json!({
        "id": a.id,
        "tags": a.tags,
        "created_at": rfc3339(a.created_ms),
        "revoked_at": a.revoked_ms.map(rfc3339),
    })
}

/// `POST /admin/agents {id, tags}`: enrolls an agent. The token is in this answer only.
pub(super) async fn enroll_agent(
    State(b): State<Arc<Backend>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let e: EnrollBody = json_body(&body)?;
    let token = b.enroll_agent(&e.id, e.tags.clone()).await?;
    b.share_credential(&e.id).await?;
    tracing::info!(agent = %e.id, "agent enrolled");
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": e.id, "tags": e.tags, "token": token})),
    )
        .into_response())
}

pub(super) async fn enrolled_agents(State(b): State<Arc<Backend>>) -> Json<Value> {
    Json(Value::Array(
        b.security
            .enrolled_agents()
            .iter()
            .map(enrolled_json)
            .collect(),
    ))
}

pub(super) async fn rotate_agent(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let token = b.rotate_agent(&id).await?;
    b.share_credential(&id).await?;
    tracing::info!(agent = %id, "agent token rotated");
    Ok(Json(json!({"id": id, "token": token})))
}

pub(super) async fn revoke_agent(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    b.revoke_agent(&id).await?;
    b.share_credential(&id).await?;
    // Its connection is closed by the bridge; its will may not pass the signature check.
    b.registry.status(&id, false, now_ms());
    tracing::info!(agent = %id, "agent revoked");
    Ok(Json(json!({"id": id, "revoked": true})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TokenBody {
    id: Option<String>,
    scopes: Vec<String>,
    rate_per_min: Option<f64>,
    /// Its own budget; without one, the policy file's (or the default) for measure
    /// tokens, none for admin tokens.
    budget: Option<crate::security::Budget>,
}

/// A token, its budget (its own or the one it falls under) and what it spent today.
pub(super) async fn token_json(
    b: &Backend,
    t: &crate::security::TokenInfo,
) -> Result<Value, ApiError> {
    let budget = b.security.budget_of(t);
    let now = now_ms();
    let usage = b.token_usage(&t.id, now).await?;
    Ok(json!({
        "id": t.id,
        "scopes": t.scopes,
        "rate_per_min": t.rate_per_min,
        "created_at": rfc3339(t.created_ms),
        "revoked_at": t.revoked_ms.map(rfc3339),
        "budget": budget,
        "budget_source": if t.budget.is_some() { "token" } else if budget.is_some() { "policy" } else { "none" },
        "spend_today": {
            "probes": usage.one_off_probes.saturating_add(usage.schedule_daily_probes),
            "one_off_probes": usage.one_off_probes,
            "schedule_daily_probes": usage.schedule_daily_probes,
            "schedules": usage.schedules,
        },
    }))
}

/// `POST /admin/tokens {id?, scopes, rate_per_min?}`: the secret is in this answer only.
pub(super) async fn create_token(
    State(b): State<Arc<Backend>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let t: TokenBody = json_body(&body)?;
    let mut scopes = Vec::new();
    for (i, s) in t.scopes.iter().enumerate() {
        scopes.push(Scope::parse(s).ok_or_else(|| ApiError::InvalidParams {
            field: format!("/scopes/{i}"),
            rule: "enum".into(),
            message: format!("/scopes/{i}: {s:?} is not one of read, measure, admin"),
        })?);
    }
    let (id, token) = b
        .create_token(t.id, scopes.clone(), t.rate_per_min, t.budget)
        .await?;
    tracing::info!(token = %id, "API token created");
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": id, "scopes": scopes, "token": token})),
    )
        .into_response())
}

pub(super) async fn tokens(State(b): State<Arc<Backend>>) -> Result<Json<Value>, ApiError> {
    let mut out = Vec::new();
    for t in b.security.tokens() {
        out.push(token_json(&b, &t).await?);
    }
    Ok(Json(Value::Array(out)))
}

pub(super) async fn rotate_token(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let token = b.rotate_token(&id).await?;
    tracing::info!(token = %id, "API token rotated");
    Ok(Json(json!({"id": id, "token": token})))
}

pub(super) async fn revoke_token(
    State(b): State<Arc<Backend>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    b.revoke_token(&id).await?;
    tracing::info!(token = %id, "API token revoked");
    Ok(Json(json!({"id": id, "revoked": true})))
}
