//! The dashboard and the API docs: static files compiled into the backend, so they
//! need no CDN, no internet and no build step. They call the same REST API as every
//! other client, with the token the user enters (kept in the browser's localStorage).

use crate::api::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

const INDEX: &str = include_str!("../ui/index.html");
const DOCS: &str = include_str!("../ui/docs.html");

/// (name, content type, body)
pub(crate) const ASSETS: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/app.js"),
    ),
    (
        "charts.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/charts.js"),
    ),
    (
        "views.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/views.js"),
    ),
    (
        "world.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/world.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("../ui/app.css"),
    ),
    (
        "docs.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/docs.js"),
    ),
];

fn page(body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            // Only our own scripts and styles; the API is same-origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

/// `GET /`: the fleet dashboard.
pub async fn dashboard() -> Response {
    page(INDEX)
}

/// `GET /docs`: interactive API documentation, from `/openapi.json`.
pub async fn docs() -> Response {
    page(DOCS)
}

/// `GET /ui/{file}`.
pub async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    let (_, ty, body) = ASSETS
        .iter()
        .find(|(name, _, _)| *name == file)
        .ok_or_else(|| ApiError::NotFound(format!("no asset {file}")))?;
    Ok((
        [
            (header::CONTENT_TYPE, *ty),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        *body,
    )
        .into_response())
}
