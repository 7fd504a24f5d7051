//! `/openapi.json` against the running backend: a valid OpenAPI 3.1 document (checked
//! by openapi-spec-validator from PyPI, which tests/run.sh installs), and every
//! operation in it is served. (The backend's unit test checks the other direction:
//! every route of the router is in the document.)

use std::time::Duration;

use imn_tests::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_valid_and_every_operation_is_served() {
    // --fault-injection: the /debug routes it documents are served too.
    let up = Up::start(1, &["--fault-injection"]).await;
    let doc = up.api.get("/openapi.json").await.body;
    assert_eq!(doc["openapi"], "3.1.0");
    let file = up.dir.path().join("openapi.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg("import json, sys\nfrom openapi_spec_validator import validate\nvalidate(json.load(open(sys.argv[1])))\nprint('valid')")
        .arg(&file)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "openapi-spec-validator refused the document (is it installed? tests/run.sh installs it):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let base = format!("http://127.0.0.1:{}", up.http_port);
    let mut checked = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let concrete = path.replace("{file}", "app.js").replace(['{', '}'], "");
            let url = format!("{base}{concrete}");
            let req = match method.as_str() {
                "get" => http.get(&url),
                "post" => http.post(&url),
                "put" => http.put(&url),
                "delete" => http.delete(&url),
                other => panic!("{other} {path}"),
            };
            let resp = req
                .send()
                .await
                .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
            let status = resp.status().as_u16();
            assert_ne!(status, 405, "{method} {path}: method not allowed");
            let streams = op["responses"]["200"]["content"]
                .get("text/event-stream")
                .is_some();
            if !streams {
                let body = resp.text().await.unwrap_or_default();
                let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                assert!(
                    !(status == 404 && v["message"] == "no such route"),
                    "{method} {path} is documented but not routed"
                );
                // Every status it answered with is documented.
                assert!(
                    op["responses"].get(status.to_string()).is_some(),
                    "{method} {path} answered {status}, which is not documented: {body}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 30, "only {checked} operations");
    eprintln!("{checked} operations served");
}
