//! What the backend says about itself: `/health`, `/metrics`, the OpenAPI document
//! and the module catalog.

use super::*;

/// A module package: its code, its manifest line and signature.
pub const MAX_MODULE_BODY: usize =
    imn_proto::wasm::MAX_WASM as usize + imn_proto::wasm::MAX_HEADER + 4096;

/// `/metrics`: the Prometheus text format.
pub(super) async fn metrics(State(b): State<Arc<Backend>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            imn_cloud::telemetry::prom::CONTENT_TYPE,
        )],
        b.prometheus().await,
    )
        .into_response()
}

pub(super) async fn health(State(b): State<Arc<Backend>>) -> Result<Json<Value>, ApiError> {
    use std::sync::atomic::Ordering::Relaxed;
    let now = now_ms();
    let (known, alive) = b.registry.counts(now);
    Ok(Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "agents_known": known,
        "agents_alive": alive,
        "records_stored": b.record_count().await?,
        "duplicates_dropped": b.stats.duplicates_dropped.load(Relaxed),
        "run_duplicates_dropped": b.stats.run_duplicates_dropped.load(Relaxed),
        "undecodable_messages": b.stats.undecodable.load(Relaxed),
        "store_errors": b.stats.store_errors.load(Relaxed),
        "acks_sent": b.stats.acks_sent.load(Relaxed),
        "store_groups": b.stats.store_groups.load(Relaxed),
        "store_busy_ms": b.stats.store_busy_us.load(Relaxed) / 1000,
        // Records the store could not take, kept with their reason
        // (GET /admin/dead-letters); counted over the store's life.
        "dead_letters": b.dead_letter_count().await?,
        // The store's size (bytes in use) and when its oldest result arrived, read
        // now (the metrics have them as of the last retention pass).
        "store": b.read_store_stats().await.ok().map(|s| json!({
            "bytes": s.bytes,
            "oldest_result": s.oldest_result_ms.map(crate::api::rfc3339),
            "max_bytes": b.retention().max_store_bytes,
        })),
        // Result streams, and the store reads they cost: one shared read per commit
        // however many are open, plus each stream's own while it catches up.
        "streams": {
            "open": b.feed.open_streams(),
            "shared_reads": b.feed.shared_reads.load(Relaxed),
            "catch_up_reads": b.feed.catch_up_reads.load(Relaxed),
        },
        "ingest": {
            "shed": b.stats.shed.load(Relaxed),
            "hellos_throttled": b.stats.hellos_throttled.load(Relaxed),
            "events_deferred": b.stats.events_deferred.load(Relaxed),
            "dead_lettered": b.stats.dead_lettered.load(Relaxed),
            "records_refused": b.stats.records_refused.load(Relaxed),
        },
        "rejected": *b.stats.rejected.lock().unwrap_or_else(|e| e.into_inner()),
        "bridge": b.bridge_stats.get().map(|s| s.health()),
        "auth": ({
            let a = &b.security.bridge().stats;
            json!({
                "enabled": b.security.enabled(),
                "logins_refused": a.logins_refused.load(Relaxed),
                "publish_denied": a.publish_denied.load(Relaxed),
                "subscribe_denied": a.subscribe_denied.load(Relaxed),
                "will_denied": a.will_denied.load(Relaxed),
                "unsigned_or_forged": a.unsigned_or_forged.load(Relaxed),
            })
        }),
    })))
}

pub(super) async fn openapi(State(b): State<Arc<Backend>>) -> Json<Value> {
    Json(crate::openapi::served(b.fault_injection).clone())
}

pub(super) async fn modules(State(b): State<Arc<Backend>>) -> Json<Value> {
    Json(Value::Array(
        catalog::catalog()
            .iter()
            .map(|m| {
                json!({
                    "name": m.name,
                    "version": m.version,
                    "description": m.description,
                    "kind": "built_in",
                    "schema_hash": m.schema_hash(),
                    "schema": m.schema(),
                })
            })
            .chain(b.wasm_modules_json())
            .collect(),
    ))
}

/// `POST /admin/modules[?load_on_hello=true]`: a signed WebAssembly module package
/// (the file `imn modules sign` writes), checked against the release keys and stored.
/// 201 when new, 200 when it replaced a version.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AddModuleQuery {
    /// Also send it to every agent that can run it: those connected now, and each
    /// at its hello.
    #[serde(default)]
    load_on_hello: bool,
}

pub(super) async fn add_module(
    State(b): State<Arc<Backend>>,
    Query(q): Query<AddModuleQuery>,
    body: axum::body::Bytes,
) -> Result<(axum::http::StatusCode, Json<Value>), ApiError> {
    let (module, replaced) = b.add_wasm_module(body.to_vec(), q.load_on_hello).await?;
    let status = if replaced {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::CREATED
    };
    Ok((
        status,
        Json(json!({"module": module, "replaced": replaced})),
    ))
}

/// `DELETE /admin/modules/{name}`: forgets an added module. Agents that loaded it
/// keep it until it is unloaded from them.
pub(super) async fn delete_module(
    State(b): State<Arc<Backend>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if catalog::find(&name).is_some() {
        return Err(ApiError::Conflict(format!(
            "{name:?} is built into the agents; unload it from an agent instead"
        )));
    }
    if !b.delete_wasm_module(&name).await? {
        return Err(ApiError::NotFound(format!(
            "no WebAssembly module {name:?}"
        )));
    }
    Ok(Json(json!({"deleted": name})))
}
