//! The dashboard in a real browser (Debian's headless chromium through chromedriver)
//! against `imn up`: the fleet page, a ping measurement made with the form and its
//! results and chart arriving live, and a schema error shown on its field. Screenshots
//! are saved to target/test-artifacts/dashboard/.

use std::path::PathBuf;
use std::time::Duration;

use imn_tests::webdriver::Browser;
use imn_tests::*;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts/dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_runs_a_measurement_live_and_names_bad_fields() {
    let up = Up::start(2, &[]).await;
    up.api.wait_alive(&["agent-1", "agent-2"], T).await;
    let base = format!("http://127.0.0.1:{}", up.http_port);
    let b = Browser::start().await;
    let shots = artifacts();

    // 1. The fleet page: both agents alive.
    b.goto(&format!("{base}/#/")).await;
    b.wait_true(
        "two agents alive",
        "return document.getElementById('count-alive')?.textContent === '2' \
         && document.querySelectorAll('#agents tbody tr td.alive').length === 2",
        T,
    )
    .await;
    assert_eq!(b.text("#count-offline").await, "0");
    b.screenshot(&shots.join("1-fleet.png")).await;

    // 2. The measurement page: the form is built from ping_module's schema.
    b.click("#nav-measure").await;
    b.wait_find("#p-count").await;
    // Marks this page load: if anything reloads the page, the mark is gone.
    b.eval("window.__imnMark = 42; return true;").await;
    assert_eq!(
        b.eval("return document.getElementById('module').value")
            .await,
        json!("ping_module")
    );
    b.fill("#p-host", "127.0.0.1").await;
    b.fill("#p-count", "3").await;
    b.fill("#p-interval_ms", "100").await;
    b.click("#submit").await;

    // 3. Results and the chart appear without a reload.
    b.wait_true(
        "the measurement page",
        "return location.hash.startsWith('#/m/')",
        T,
    )
    .await;
    b.wait_true(
        "two results in the table, live",
        "return document.querySelectorAll('#results tbody tr').length === 2",
        T,
    )
    .await;
    b.wait_true(
        "an RTT series per agent in the chart",
        "return document.querySelectorAll('#rtt-chart svg path.series').length === 2",
        T,
    )
    .await;
    b.wait_true(
        "the measurement complete",
        "return document.getElementById('summary').textContent.includes('2/2 agents reported')",
        T,
    )
    .await;
    assert_eq!(
        b.eval("return window.__imnMark").await,
        json!(42),
        "the page reloaded"
    );
    let rows = b
        .eval("return [...document.querySelectorAll('#results tbody tr')].map(r => r.textContent).join('\\n')")
        .await;
    let rows = rows.as_str().unwrap();
    assert!(
        rows.contains("agent-1") && rows.contains("agent-2"),
        "{rows}"
    );
    assert!(rows.contains("3/3 received"), "{rows}");
    // The chart has axes with units.
    let labels = b
        .eval("return [...document.querySelectorAll('#rtt-chart svg text')].map(t => t.textContent).join('|')")
        .await;
    let labels = labels.as_str().unwrap();
    assert!(
        labels.contains("RTT (ms)") && labels.contains("probe #"),
        "{labels}"
    );
    // Hovering over the chart shows the nearest value, with its unit.
    b.eval(
        "const svg = document.querySelector('#rtt-chart svg'); const r = svg.getBoundingClientRect(); \
         const dot = svg.querySelector('circle').getBoundingClientRect(); \
         svg.dispatchEvent(new MouseEvent('mousemove', {clientX: dot.x + dot.width / 2, clientY: dot.y + dot.height / 2, bubbles: true})); \
         return r.width > 0;",
    )
    .await;
    let tip = b
        .eval("const t = document.getElementById('tip'); return t.hidden ? '' : t.textContent")
        .await;
    let tip = tip.as_str().unwrap();
    assert!(
        tip.contains(" ms") && tip.contains("agent-"),
        "hover shows {tip:?}"
    );
    b.screenshot(&shots.join("2-measurement.png")).await;

    // Request lookup by id: one of this measurement's requests.
    let request = b
        .eval("return decodeURIComponent(document.querySelector('#agent-states a.mono').getAttribute('href').split('/').pop())")
        .await;
    let request = request.as_str().unwrap().to_string();
    b.fill("#lookup-id", &request).await;
    b.click("#lookup button").await;
    b.wait_true(
        "the request's page",
        "return document.getElementById('request-state')?.textContent === 'succeeded'",
        T,
    )
    .await;
    let page = b
        .eval("return document.getElementById('view').textContent")
        .await;
    let page = page.as_str().unwrap();
    assert!(
        page.contains(&request) && page.contains("dispatched"),
        "{page}"
    );

    // 4. An invalid value: the schema's error is shown on its field.
    b.click("#nav-measure").await;
    b.wait_find("#p-count").await;
    b.fill("#p-host", "127.0.0.1").await;
    b.fill("#p-count", "0").await;
    b.click("#submit").await;
    b.wait_true(
        "the error under count",
        "return document.getElementById('err-count')?.textContent.includes('/count')",
        T,
    )
    .await;
    assert!(
        b.eval("return document.getElementById('p-count').classList.contains('invalid')")
            .await
            == json!(true)
    );
    assert!(
        b.text("#err-host").await.is_empty(),
        "only the bad field has an error"
    );
    b.screenshot(&shots.join("3-field-error.png")).await;

    // The agent page draws its heartbeat charts, and the docs list every operation.
    b.goto(&format!("{base}/#/agent/agent-1")).await;
    b.wait_true(
        "heartbeat charts",
        "return document.querySelectorAll('#heartbeat-charts svg').length === 4",
        T,
    )
    .await;
    b.screenshot(&shots.join("4-agent.png")).await;
    b.goto(&format!("{base}/docs")).await;
    b.wait_true(
        "the docs",
        "return document.querySelectorAll('details').length > 30",
        T,
    )
    .await;
    // The docs send a request and show the answer.
    b.click("#getAgents summary").await;
    b.click("#getAgents button").await;
    b.wait_true(
        "the docs' answer",
        "return document.querySelector('#getAgents pre').textContent.startsWith('200')",
        T,
    )
    .await;
    let answer = b.text("#getAgents pre").await;
    assert!(answer.contains("agent-1"), "{answer}");
    b.screenshot(&shots.join("5-docs.png")).await;
    b.quit().await;
}

/// With auth on, the page asks for a token, and works once one is entered (it is kept
/// in the browser for the next visit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_with_auth_once_a_token_is_entered() {
    let up = Up::start(2, &["--auth"]).await;
    let admin = up.admin();
    admin.wait_alive(&["agent-1", "agent-2"], T).await;
    let token = std::fs::read_to_string(up.dir.path().join("data/admin-token")).unwrap();
    // The page, its assets and the API description are open; the data is not.
    for open in ["/", "/ui/app.js", "/docs", "/openapi.json"] {
        let r = up.api.try_get(open).await.expect(open);
        assert_eq!(r.status, 200, "{open}");
    }
    assert_eq!(up.api.get("/agents/agent-1/heartbeats").await.status, 401);
    let base = format!("http://127.0.0.1:{}", up.http_port);
    let b = Browser::start().await;
    b.goto(&format!("{base}/#/")).await;
    b.wait_true(
        "a request for a token",
        "return document.getElementById('banner').textContent.includes('token')",
        T,
    )
    .await;
    assert_ne!(b.text("#count-alive").await, "2");
    b.fill("#token", token.trim()).await;
    b.click("#token-save").await;
    b.wait_true(
        "two agents alive",
        "return document.getElementById('count-alive')?.textContent === '2'",
        T,
    )
    .await;
    // Kept: a new visit needs no token again.
    b.goto(&format!("{base}/#/agent/agent-2")).await;
    b.wait_true(
        "the agent page",
        "return document.querySelectorAll('#heartbeat-charts svg').length === 4",
        T,
    )
    .await;
    b.screenshot(&artifacts().join("6-with-auth.png")).await;
    b.quit().await;
}
