//! Every refusal the HTTP layer can make before a handler runs comes back as the API's
//! error, against a real `imn up`: JSON (`application/json`), the documented status,
//! `error`, `message`, and the `field` at fault with its `rule`. Before, axum answered
//! these in `text/plain`. One case per kind: a query value that does not parse, an
//! unknown or repeated query parameter, a path segment that is not UTF-8, a body that
//! is not JSON, outside its schema, or over the size limit (with and without a declared
//! length), and a method the route does not take.

use imn_tests::*;
use serde_json::Value;

/// Asserts a JSON error with this status, `field` and `rule`; returns the body.
fn refused(what: &str, r: &Reply, status: u16, field: &str, rule: &str) -> Value {
    let ct = r
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert_eq!(r.status, status, "{what}: {:?}", r.body);
    assert!(
        ct.starts_with("application/json"),
        "{what}: content-type {ct:?}, body {:?}",
        r.body
    );
    assert!(r.body["error"].is_string(), "{what}: {:?}", r.body);
    assert!(
        r.body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {:?}",
        r.body
    );
    assert_eq!(r.body["field"], field, "{what}: {:?}", r.body);
    assert_eq!(r.body["rule"], rule, "{what}: {:?}", r.body);
    r.body.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_framework_rejection_is_the_documented_json_error() {
    let up = Up::start(1, &[]).await;
    let api = &up.api;
    // A real request id, for the route that reads one.
    let made = api
        .post(
            "/agent/agent-1/echo_module?wait=10",
            r#"{"message": "hi"}"#,
            &[],
        )
        .await;
    assert!(matches!(made.status, 200 | 202), "{:?}", made.body);
    let rid = made.body["request_id"].as_str().unwrap().to_string();

    // Query values that do not parse, on every route the issue named.
    for (path, field) in [
        ("/agents?limit=null", "limit"),
        ("/agents?alive=maybe", "alive"),
        ("/agents/alive?limit=-3", "limit"),
        ("/agents/agent-1/results?limit=null", "limit"),
        ("/agents/agent-1/status?window_s=null", "window_s"),
        ("/agents/agent-1/events?limit=null", "limit"),
        ("/admin/dead-letters?limit=many", "limit"),
        ("/v1/results?limit=null", "limit"),
        ("/v1/results/stream?limit=null", "limit"),
    ] {
        let r = api.get(path).await;
        let body = refused(path, &r, 400, field, "type");
        assert_eq!(body["error"], "bad_request", "{path}");
    }
    let path = format!("/agents/agent-1/results/{rid}?format=xml");
    refused(&path, &api.get(&path).await, 400, "format", "enum");
    let path = format!("/agents/agent-1/results/{rid}?format=native&format=atlas");
    refused(&path, &api.get(&path).await, 400, "format", "duplicate");
    for path in ["/v1/results?x-unknown=1", "/v1/results/stream?x-unknown=1"] {
        refused(path, &api.get(path).await, 400, "x-unknown", "unknown");
    }
    // And on operations that change things: nothing happens.
    let r = api
        .post(
            "/agent/agent-1/echo_module?wait=null",
            r#"{"message": "x"}"#,
            &[],
        )
        .await;
    refused("wait=null", &r, 400, "wait", "type");
    let r = api
        .post_bytes("/admin/modules?load_on_hello=null", b"{}".to_vec())
        .await;
    refused("load_on_hello=null", &r, 400, "load_on_hello", "type");
    // A misspelt parameter is refused, not ignored.
    let r = api
        .post(
            "/agent/agent-1/echo_module?wiat=10",
            r#"{"message": "x"}"#,
            &[],
        )
        .await;
    refused("wiat=10", &r, 400, "wiat", "unknown");
    let path = "/v1/alerts/stream?max_s=1&max_s=0.5";
    refused(path, &api.get(path).await, 400, "max_s", "duplicate");
    refused(
        "max_s on a page",
        &api.get("/v1/results?max_s=1").await,
        400,
        "max_s",
        "unsupported",
    );

    // A path segment that is not UTF-8 once decoded.
    refused(
        "/agents/%FF",
        &api.get("/agents/%FF").await,
        400,
        "id",
        "utf8",
    );

    // Bodies: not JSON, outside the documented schema, over the limit.
    let r = api
        .post("/agent/agent-1/echo_module", "{not json", &[])
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.body["error"], "malformed_json");
    let r = api.post("/admin/agents", "[1, 2", &[]).await;
    assert_eq!(r.body["error"], "malformed_json", "{:?}", r.body);
    let r = api.post("/admin/agents", r#"{"id": "imn-7"}"#, &[]).await;
    refused("reserved id", &r, 422, "/id", "not");
    let r = api
        .post("/admin/agents", r#"{"id": "pi-7", "tags": "x"}"#, &[])
        .await;
    refused("tags not an array", &r, 422, "/tags", "type");
    let r = api.post("/admin/tokens", r#"{"scopes": []}"#, &[]).await;
    refused("no scopes", &r, 422, "/scopes", "minItems");
    let r = api
        .post(
            "/v1/measurements",
            r#"{"module": "ping", "agents": {"all": false}}"#,
            &[],
        )
        .await;
    refused("no criterion", &r, 422, "/agents", "anyOf");
    // The error quotes at most a few hundred characters of a large value at fault.
    let long = "x".repeat(200_000);
    let r = api
        .post(
            "/v1/measurements",
            &format!(r#"{{"module": "echo_module", "agents": {{"all": true}}, "description": 7, "params": {{"message": "{long}"}}}}"#),
            &[],
        )
        .await;
    refused("description: 7", &r, 422, "/description", "type");
    assert!(
        r.body["message"].as_str().unwrap().len() < 2_000,
        "{}",
        r.body["message"]
    );
    // An optional body may be empty: PUT of a module loads it with its defaults.
    let r = api
        .put_json("/agents/agent-1/modules/echo_module", &Value::Null)
        .await;
    assert_eq!(r.status, 422, "a JSON null is not settings: {:?}", r.body);
    let r = api
        .put_raw("/agents/agent-1/modules/echo_module", "  ")
        .await;
    assert_eq!(
        r.status, 202,
        "an empty body loads with defaults: {:?}",
        r.body
    );
    // Nothing was enrolled by the refused requests.
    let enrolled = api.get("/admin/agents").await.body;
    assert!(
        !enrolled.to_string().contains("imn-7") && !enrolled.to_string().contains("pi-7"),
        "{enrolled}"
    );
    // Over max_body_bytes, declared and streamed without a length.
    let big = vec![b' '; 2 * 1024 * 1024];
    let r = api.post_bytes("/admin/agents", big.clone()).await;
    let body = refused("declared", &r, 413, "body", "max_body_bytes");
    assert_eq!(body["limit"], "max_body_bytes", "{body}");
    for path in ["/admin/agents", "/agent/agent-1/echo_module"] {
        let (head, body) = chunked_post(up.http_port, path, &big).await;
        assert!(head.starts_with("HTTP/1.1 413"), "{path}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{path}: {head}"
        );
        let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        assert_eq!(body["field"], "body", "{path}: {body}");
        assert_eq!(body["rule"], "max_body_bytes", "{path}: {body}");
    }

    // A method the route does not take: 405, naming the methods it does, with Allow.
    let r = api.delete("/agents").await;
    refused("DELETE /agents", &r, 405, "method", "allowed_methods");
    let allow = r.headers["allow"].to_str().unwrap();
    assert!(allow.contains("GET"), "{allow}");
    let r = api.post("/v1/results", "{}", &[]).await;
    refused("POST /v1/results", &r, 405, "method", "allowed_methods");
}

/// POSTs `data` in chunks (`Transfer-Encoding: chunked`, no length declared) over a
/// plain socket; returns the response's head and body. The server may answer and close
/// before it read everything: write errors are then expected, and ignored.
async fn chunked_post(port: u16, path: &str, data: &[u8]) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    let _ = s.write_all(head.as_bytes()).await;
    for c in data.chunks(64 * 1024) {
        if s.write_all(format!("{:x}\r\n", c.len()).as_bytes())
            .await
            .is_err()
            || s.write_all(c).await.is_err()
            || s.write_all(b"\r\n").await.is_err()
        {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).to_string();
    match text.split_once("\r\n\r\n") {
        Some((h, b)) => (h.to_string(), b.to_string()),
        None => (text, String::new()),
    }
}
