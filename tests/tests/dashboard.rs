//! The dashboard in a real browser (Debian's headless chromium through chromedriver)
//! against `imn up`: the fleet page, a ping measurement made with the form and its
//! results and chart arriving live, a schema error shown on its field, the fleet's
//! lifecycle (versions, rollouts, update failures), the fleet map of where the
//! agents are, and a measurement's views (the RTT heat map, loss over time, and
//! traceroute paths as a graph, through a chain of network namespaces, so that test
//! needs root). Screenshots are saved to target/test-artifacts/dashboard/.

use std::path::PathBuf;
use std::time::Duration;

use imn_proto::release::SigningKey;
use imn_proto::wire::{Envelope, Kind, LifecycleStatus, UpdateUp};
use imn_tests::hostile::HostileAgent;
use imn_tests::netns::Chain;
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

/// A string as a JavaScript literal, for the scripts below.
fn js(s: &str) -> String {
    json!(s).to_string()
}

/// The fleet's lifecycle: each agent's version and settings version in the fleet table,
/// its update phase and last failure marked there, the Rollouts view and a rollout's
/// page (its waves and its agents, the failed one with why), and the agent page's
/// update state. The rollout is of a signed release the local agent refuses (it runs
/// without its supervisor), so it halts. A hostile agent's strings (HTML in its
/// version, tags and update failure) are shown as text, never as markup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_versions_rollouts_and_update_failures() {
    let key = SigningKey::from_pkcs8(&SigningKey::generate().unwrap()).unwrap();
    let public = key.public_hex();
    let up = Up::start(1, &["--release-keys", &public]).await;
    up.api.wait_alive(&["agent-1"], T).await;
    let shots = artifacts();

    // A hostile agent (auth is off: anyone may connect as any agent) with markup in
    // every string it reports.
    const EVIL_VERSION: &str = "<img src=x onerror=\"window.__xss=1\">";
    const EVIL_TAG: &str = "<script>window.__xss=2</script>";
    const EVIL_FAILURE: &str =
        "update_failed: <img src=x onerror=\"window.__xss=3\"> \"quoted\" & <b id=injected>bold</b>";
    let evil = HostileAgent::connect("evil", "no-auth", up.mqtt_port).await;
    evil.online().await;
    let mut hello = evil.hello();
    hello.version = EVIL_VERSION.into();
    hello.tags = vec![EVIL_TAG.into(), "\"><b id=injected>tag</b>".into()];
    evil.send(Kind::Hello, &Envelope::Hello(hello)).await;
    up.api.wait_alive(&["evil"], T).await;
    let status = LifecycleStatus {
        version: EVIL_VERSION.into(),
        arch: std::env::consts::ARCH.into(),
        phase: "trial".into(),
        target: Some("9.9.9".into()),
        last_failure: Some(EVIL_FAILURE.into()),
        failed_version: Some("9.9.8".into()),
        sent_at_ms: imn_proto::now_ms(),
        ..Default::default()
    };
    evil.send(Kind::Update, &Envelope::Update(UpdateUp::Status(status)))
        .await;

    // Both agents' lifecycle reports are in: what the fleet table must show.
    let api = up.api.clone();
    let agents = wait_for("both agents' lifecycle reports", T, || {
        let api = api.clone();
        async move {
            let list = api.get("/agents").await.body;
            let all = list.as_array()?;
            let reported = |id: &str| {
                all.iter()
                    .any(|a| a["id"] == id && a["update_phase"].is_string())
            };
            (reported("agent-1") && reported("evil")).then(|| all.clone())
        }
    })
    .await;
    let listed = |id: &str| agents.iter().find(|a| a["id"] == id).unwrap().clone();
    assert_eq!(listed("evil")["update_failure"], json!(EVIL_FAILURE));
    let agent = up.api.get("/agents/agent-1").await.body;
    let version = agent["version"].as_str().unwrap().to_string();
    let config = agent["config_version"].as_u64().unwrap();
    let arch = listed("agent-1")["arch"].as_str().unwrap().to_string();

    // 1. The fleet table: version and config columns; the hostile agent's phase and
    // failure marked, its markup shown as text.
    let base = format!("http://127.0.0.1:{}", up.http_port);
    let b = Browser::start().await;
    b.goto(&format!("{base}/#/")).await;
    let headers = b
        .eval("return [...document.querySelectorAll('#agents thead th')].map(t => t.textContent)")
        .await;
    assert!(
        headers.as_array().unwrap().contains(&json!("version"))
            && headers.as_array().unwrap().contains(&json!("config")),
        "{headers}"
    );
    b.wait_true(
        "agent-1's version and config version",
        &format!(
            "const r = document.querySelector('#agents tr[data-agent=\"agent-1\"]'); \
             return !!r && r.querySelector('td.version .v').textContent === {} \
             && r.querySelector('td.config').textContent === {}",
            js(&version),
            js(&config.to_string())
        ),
        T,
    )
    .await;
    b.wait_true(
        "the hostile agent's row, its strings as text",
        &format!(
            "const r = document.querySelector('#agents tr[data-agent=\"evil\"]'); \
             if (!r) return false; \
             const badge = r.querySelector('td.version .badge.update-failed'); \
             return r.querySelector('td.version .v').textContent === {} \
             && !!badge && badge.title === {} && badge.textContent === 'update failed' \
             && r.querySelector('td.version .badge.phase')?.textContent === 'trial' \
             && r.textContent.includes({})",
            js(EVIL_VERSION),
            js(EVIL_FAILURE),
            js(EVIL_TAG)
        ),
        T,
    )
    .await;
    assert_eq!(
        b.eval(
            "return [document.querySelectorAll('#agents img, #agents script, #agents b').length, \
             !!document.getElementById('injected'), window.__xss === undefined]"
        )
        .await,
        json!([0, false, true]),
        "markup from the agent became elements"
    );
    b.screenshot(&shots.join("7-fleet-versions.png")).await;

    // 2. A rollout of a signed release to agent-1 and the evil agent. agent-1 runs
    // without its supervisor: skipped, and why. The evil agent, once offered the
    // release, reports that it failed it (what any agent can say of itself), with
    // markup in the reason: the rollout halts at its canary.
    const EVIL_REFUSAL: &str = "update_refused: <img src=x onerror=\"window.__xss=4\"> no";
    let now = imn_proto::now_ms();
    let file = key
        .sign(
            b"not a real agent: no agent here installs it",
            "9.9.9",
            &arch,
            now,
            now + 86_400_000,
            false,
        )
        .unwrap();
    let r = up.api.post_bytes("/admin/releases", file).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = up
        .api
        .post(
            "/admin/rollouts",
            &json!({"version": "9.9.9", "agents": {"ids": ["agent-1", "evil"]}, "canary_pct": 100, "waves": [100]})
                .to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    let api = up.api.clone();
    let path = format!("/rollouts/{id}");
    wait_for("the release offered to the evil agent", T, || {
        let (api, path) = (api.clone(), path.clone());
        async move {
            let r = api.get(&path).await.body;
            r["agents"]
                .as_array()?
                .iter()
                .any(|a| a["id"] == "evil" && a["state"] == "offered")
                .then_some(())
        }
    })
    .await;
    let failed = LifecycleStatus {
        version: EVIL_VERSION.into(),
        arch: std::env::consts::ARCH.into(),
        phase: "idle".into(),
        last_failure: Some(EVIL_REFUSAL.into()),
        failed_version: Some("9.9.9".into()),
        failed_rollout: Some(id.clone()),
        sent_at_ms: imn_proto::now_ms(),
        ..Default::default()
    };
    evil.send(Kind::Update, &Envelope::Update(UpdateUp::Status(failed)))
        .await;
    let rollout = wait_for("the rollout to halt", T, || {
        let (api, path) = (api.clone(), path.clone());
        async move {
            let r = api.get(&path).await.body;
            (r["state"] == "halted").then_some(r)
        }
    })
    .await;
    let row = |who: &str| {
        rollout["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == who)
            .unwrap()
            .clone()
    };
    let a1 = row("agent-1");
    assert_eq!(a1["state"], "skipped", "{rollout}");
    assert!(
        a1["detail"]
            .as_str()
            .unwrap()
            .contains("without its supervisor"),
        "{rollout}"
    );
    let ev = row("evil");
    assert_eq!(ev["state"], "failed", "{rollout}");
    let detail = ev["detail"].as_str().unwrap().to_string();
    assert_eq!(detail, EVIL_REFUSAL);
    let reason = rollout["reason"].as_str().unwrap().to_string();

    // 3. The Rollouts view lists it (the hash without its slash works too).
    b.goto(&format!("{base}/#rollouts")).await;
    b.wait_true(
        "the rollout in the Rollouts view, halted",
        &format!(
            "const r = document.querySelector('#rollouts tr[data-rollout=' + CSS.escape({}) + ']'); \
             return !!r && r.children[2].textContent === 'halted' \
             && r.querySelector('td.failed-count').textContent === '1' \
             && r.querySelector('td.healthy-count').textContent === '0' \
             && document.getElementById('nav-rollouts').className === 'active'",
            js(&id)
        ),
        T,
    )
    .await;
    b.screenshot(&shots.join("8-rollouts.png")).await;
    b.click(&format!("#rollouts tr[data-rollout=\"{id}\"] a"))
        .await;

    // 4. Its page: header, waves, the evil agent failed with why, agent-1 skipped.
    b.wait_true(
        "the rollout's page",
        &format!(
            "return location.hash === '#/rollout/' + encodeURIComponent({}) \
             && document.getElementById('rollout-state')?.textContent === 'halted'",
            js(&id)
        ),
        T,
    )
    .await;
    assert_eq!(b.text("#rollout-id").await, id);
    assert_eq!(b.text("#rollout-version").await, "9.9.9");
    assert_eq!(
        b.eval("return document.getElementById('rollout-reason').textContent")
            .await,
        json!(reason)
    );
    assert_eq!(b.text("#rollout-failed").await, "1");
    // One wave, the canary, current.
    assert_eq!(
        b.eval(
            "return [...document.querySelectorAll('#rollout-waves tbody tr')].map(r => \
             [r.dataset.wave, r.children[1].textContent, r.querySelector('td.reach').textContent, \
             r.classList.contains('current-wave')])"
        )
        .await,
        json!([["0", "canary", "100 % (1 of 1)", true]])
    );
    b.wait_true(
        "the evil agent's row, failed, with its detail as text",
        &format!(
            "const r = document.querySelector('#rollout-agents tr[data-agent=\"evil\"]'); \
             return !!r && r.classList.contains('failed-row') && r.dataset.wave === '0' \
             && r.querySelector('td.failed')?.textContent === 'failed' \
             && r.querySelector('td.detail').textContent === {} \
             && r.querySelector('td.detail').children.length === 0",
            js(&detail)
        ),
        T,
    )
    .await;
    b.screenshot(&shots.join("9-rollout.png")).await;

    b.wait_true(
        "agent-1's row, skipped, with why",
        "const r = document.querySelector('#rollout-agents tr[data-agent=\"agent-1\"]'); \
         return !!r && r.querySelector('td.detail').textContent.includes('without its supervisor')",
        T,
    )
    .await;
    assert_eq!(
        b.eval("return [window.__xss === undefined, !!document.getElementById('injected')]")
            .await,
        json!([true, false]),
        "markup in the refusal became elements"
    );

    // 5. The evil agent's refusal is its last failure, marked in the fleet table;
    // agent-1's page shows its version and settings versions.
    let evil_agent = up.api.get("/agents/evil").await.body;
    assert_eq!(evil_agent["update"]["last_failure"], json!(EVIL_REFUSAL));
    b.click("#nav-fleet").await;
    b.wait_true(
        "the evil agent's refusal marked in the fleet table",
        &format!(
            "const b = document.querySelector('#agents tr[data-agent=\"evil\"] td.version .badge.update-failed'); \
             return !!b && b.title === {} && b.textContent === 'update refused'",
            js(EVIL_REFUSAL)
        ),
        T,
    )
    .await;
    let agent = up.api.get("/agents/agent-1").await.body;
    let failure = agent["update"]["last_failure"]
        .as_str()
        .unwrap_or("-")
        .to_string();
    b.goto(&format!("{base}/#/agent/agent-1")).await;
    b.wait_true(
        "the agent page's lifecycle",
        &format!(
            "const t = document.querySelector('#agent-lifecycle table'); \
             return !!t && t.querySelector('td.version').textContent === {} \
             && t.querySelector('td.config').textContent === {} \
             && t.querySelector('td.desired-config').textContent === {} \
             && t.querySelector('td.failure').textContent === {}",
            js(&version),
            js(&config.to_string()),
            js(&agent["desired_config_version"]
                .as_u64()
                .unwrap()
                .to_string()),
            js(&failure)
        ),
        T,
    )
    .await;
    b.screenshot(&shots.join("10-agent-lifecycle.png")).await;
    b.quit().await;
}

/// The fleet map's projection (app.js `mapX`, `mapY`): equirectangular on a 720 × 360
/// viewBox, longitude -180..180 left to right, latitude 90..-90 top to bottom.
fn map_xy(lat: f64, lon: f64) -> (f64, f64) {
    ((lon + 180.0) * 2.0, (90.0 - lat) * 2.0)
}

/// The fleet map's markers: agent, coordinates, position (as drawn: `cx`/`cy`, and
/// where the browser rendered the dot, in the map's units), status, tooltip and link.
const MARKERS: &str = "const svg = document.getElementById('fleet-map'); \
     const box = svg.getBoundingClientRect(); const k = box.width / 720; \
     return [...svg.querySelectorAll('circle.marker')].map(c => { \
       const b = c.getBoundingClientRect(); \
       return {agent: c.dataset.agent, lat: +c.dataset.lat, lon: +c.dataset.lon, \
         cx: +c.getAttribute('cx'), cy: +c.getAttribute('cy'), \
         sx: (b.x + b.width / 2 - box.x) / k, sy: (b.y + b.height / 2 - box.y) / k, \
         class: c.getAttribute('class'), fill: getComputedStyle(c).fill, \
         title: c.querySelector('title')?.textContent, href: c.closest('a')?.getAttribute('href')}; })";

/// The fleet map: agents with coordinates (real agents configured with `--latitude`
/// and `--longitude`) are dots placed by the map's projection over a world outline
/// that is part of the page, coloured by status like the fleet table, with the agent
/// in a tooltip, linking to its page; an agent with no location is counted but not
/// drawn; two agents at the same place stay apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_map_places_agents_by_their_coordinates() {
    // agent-1 has no location.
    let up = Up::start(1, &[]).await;
    let places = [("amsterdam", 52.37, 4.90), ("sydney", -33.87, 151.21)];
    let mut agents = Vec::new();
    for (id, lat, lon) in places {
        let (lat, lon) = (lat.to_string(), lon.to_string());
        agents.push(spawn_agent(
            &bin("imn-agent"),
            id,
            &up.broker_url(),
            &up.dir.path().join(id),
            &[
                "--heartbeat-ms",
                "500",
                "--latitude",
                &lat,
                "--longitude",
                &lon,
            ],
            up.dir.path(),
        ));
    }
    up.api
        .wait_alive(&["agent-1", "amsterdam", "sydney"], T)
        .await;
    let listed = up.api.get("/agents").await.body;
    for (id, lat, lon) in places {
        let a = listed
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == id)
            .unwrap();
        assert_eq!(a["location"]["latitude"], json!(lat), "{a}");
        assert_eq!(a["location"]["longitude"], json!(lon), "{a}");
    }

    let base = format!("http://127.0.0.1:{}", up.http_port);
    let b = Browser::start().await;
    let shots = artifacts();
    b.goto(&format!("{base}/#/")).await;
    b.wait_true(
        "three agents alive in the table, two dots on the map",
        "return document.querySelectorAll('#agents tbody tr td.alive').length === 3 \
         && document.querySelectorAll('#fleet-map circle.marker.alive').length === 2",
        T,
    )
    .await;

    // The map: an inline SVG of the whole world, its outline from the page itself.
    assert_eq!(
        b.eval(
            "const m = document.getElementById('fleet-map'); \
             return [m.tagName, m.getAttribute('viewBox'), \
             m.querySelector('path.land').getAttribute('d').length > 20000, \
             m.querySelectorAll('image, foreignObject').length]"
        )
        .await,
        json!(["svg", "0 0 720 360", true, 0])
    );
    // The outline and the projection agree: land where there is land (the two cities,
    // inland points, both sides of the antimeridian, Antarctica to the pole), sea
    // where there is sea.
    let inside = |points: &[(f64, f64)]| {
        format!(
            "const land = document.querySelector('#fleet-map path.land'); \
             return {}.map(([lat, lon]) => land.isPointInFill(new DOMPoint((lon + 180) * 2, (90 - lat) * 2)))",
            json!(points)
        )
    };
    let land = [
        (52.37, 4.90),
        (-33.87, 151.21),
        (48.0, 10.0),
        (-25.0, 135.0),
        (40.0, -100.0),
        (66.0, -175.0),
        (66.0, 175.0),
        (-80.0, 0.0),
        (-89.0, -170.0),
    ];
    let sea = [
        (0.0, -30.0),
        (0.0, -160.0),
        (-50.0, 80.0),
        (69.0, -5.0),
        (-17.0, 179.9),
    ];
    assert_eq!(
        b.eval(&inside(&land)).await,
        json!(vec![true; land.len()]),
        "{land:?}"
    );
    assert_eq!(
        b.eval(&inside(&sea)).await,
        json!(vec![false; sea.len()]),
        "{sea:?}"
    );

    // One dot per located agent, where the projection puts it, green, named.
    let markers = b.eval(MARKERS).await;
    let markers = markers.as_array().unwrap();
    assert_eq!(markers.len(), 2, "{markers:?}");
    let marker = |markers: &[serde_json::Value], id: &str| {
        markers
            .iter()
            .find(|m| m["agent"] == id)
            .unwrap_or_else(|| panic!("no marker for {id}: {markers:?}"))
            .clone()
    };
    for (id, lat, lon) in places {
        let m = marker(markers, id);
        let (x, y) = map_xy(lat, lon);
        let at = |k: &str| m[k].as_f64().unwrap();
        assert_eq!((at("lat"), at("lon")), (lat, lon), "{m}");
        assert!(
            (at("cx") - x).abs() <= 1.0 && (at("cy") - y).abs() <= 1.0,
            "{id} drawn at ({}, {}), not at ({x}, {y})",
            at("cx"),
            at("cy")
        );
        assert!(
            (at("sx") - x).abs() <= 1.0 && (at("sy") - y).abs() <= 1.0,
            "{id} rendered at ({}, {}), not at ({x}, {y})",
            at("sx"),
            at("sy")
        );
        assert!(m["class"].as_str().unwrap().contains("alive"), "{m}");
        assert_eq!(m["fill"], "rgb(26, 127, 55)", "{m}");
        assert!(m["title"].as_str().unwrap().starts_with(id), "{m}");
        assert_eq!(m["href"], format!("#/agent/{id}"), "{m}");
    }
    assert!(
        b.text("#fleet-map-caption")
            .await
            .starts_with("2 of 3 agents have a location"),
        "{}",
        b.text("#fleet-map-caption").await
    );
    b.screenshot(&shots.join("11-fleet-map.png")).await;

    // A second agent in Amsterdam: both dots stay visible, apart, and counted.
    let twin = HostileAgent::connect("twin", "no-auth", up.mqtt_port).await;
    twin.online().await;
    let mut hello = twin.hello();
    hello.location = Some(imn_proto::wire::Location {
        latitude: Some(52.37),
        longitude: Some(4.90),
        ..Default::default()
    });
    twin.send(Kind::Hello, &Envelope::Hello(hello)).await;
    up.api.wait_alive(&["twin"], T).await;
    b.wait_true(
        "the twin's dot",
        "return document.querySelectorAll('#fleet-map circle.marker').length === 3 \
         && document.getElementById('fleet-map-caption').textContent.startsWith('3 of 4 ')",
        T,
    )
    .await;
    let markers = b.eval(MARKERS).await;
    let markers = markers.as_array().unwrap();
    let (a, t) = (marker(markers, "amsterdam"), marker(markers, "twin"));
    let (x, y) = map_xy(52.37, 4.90);
    let xy = |m: &serde_json::Value| (m["cx"].as_f64().unwrap(), m["cy"].as_f64().unwrap());
    let apart = ((xy(&a).0 - xy(&t).0).powi(2) + (xy(&a).1 - xy(&t).1).powi(2)).sqrt();
    let near = ((xy(&t).0 - x).powi(2) + (xy(&t).1 - y).powi(2)).sqrt();
    assert!(
        apart >= 6.0 && near <= 20.0,
        "amsterdam at {:?}, twin at {:?}",
        xy(&a),
        xy(&t)
    );
    assert_eq!(
        (t["lat"].clone(), t["lon"].clone()),
        (json!(52.37), json!(4.9))
    );
    assert_eq!(
        b.eval("return [...document.querySelectorAll('#fleet-map text.count')].map(t => t.textContent)")
            .await,
        json!(["2"])
    );

    // Sydney's agent dies: its dot turns red, as its row says offline.
    agents[1].kill9();
    up.api.wait_not_alive("sydney", T).await;
    b.wait_true(
        "sydney's dot red, its row offline",
        "const c = document.querySelector('#fleet-map circle.marker[data-agent=\"sydney\"]'); \
         return !!c && c.classList.contains('offline') && getComputedStyle(c).fill === 'rgb(198, 40, 40)' \
         && !!document.querySelector('#agents tr[data-agent=\"sydney\"] td.offline')",
        T,
    )
    .await;
    assert_eq!(
        b.eval(
            "return [...document.querySelectorAll('#fleet-map circle.marker.alive')].map(c => c.dataset.agent).sort()"
        )
        .await,
        json!(["amsterdam", "twin"])
    );
    b.screenshot(&shots.join("12-fleet-map-offline.png")).await;

    // A dot leads to its agent's page, as the table's link does.
    b.click("#fleet-map circle.marker[data-agent=\"amsterdam\"]")
        .await;
    b.wait_true(
        "amsterdam's page",
        "return location.hash === '#/agent/amsterdam' \
         && document.querySelectorAll('#heartbeat-charts svg').length === 4",
        T,
    )
    .await;
    b.quit().await;
    drop(twin);
}

/// The median as the page computes it: the middle value, or the mean of the two.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// A measurement's results once it is stopped and nothing more arrives for 2 s.
async fn settled_results(api: &Api, id: &str) -> Vec<serde_json::Value> {
    let mut results = all_results(api, id).await;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let again = all_results(api, id).await;
        if again.len() == results.len() {
            return again;
        }
        results = again;
    }
}

/// The heat map's cells as the page draws them.
const CELLS: &str = "return [...document.querySelectorAll('#rtt-heatmap rect.cell')].map(c => ({\
     agent: c.dataset.agent, t: Number(c.dataset.t), rtt: c.dataset.rtt, results: Number(c.dataset.results), \
     class: c.getAttribute('class'), fill: c.getAttribute('fill'), row: c.closest('g.row').dataset.agent, \
     title: c.querySelector('title')?.textContent}))";

/// A recurring ping's page: an RTT heat map with a row per agent and a column per time
/// bucket, each cell the median of the RTTs of that agent's results in the bucket (the
/// test computes them from the API's results), with a colour legend from the scale's
/// min to its max; loss over time, a line per agent; grey for a bucket with no result
/// and violet for runs that failed or lost every probe; and, when the page loads fewer
/// results than there are, a note saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_measurement_page_draws_an_rtt_heat_map_and_loss() {
    let up = Up::start(2, &[]).await;
    up.api.wait_alive(&["agent-1", "agent-2"], T).await;
    let body = json!({"module": "ping_module", "params": {"host": "127.0.0.1", "count": 3, "interval_ms": 100},
        "agents": {"ids": ["agent-1", "agent-2"]}, "schedule": {"interval_s": 1, "jitter_s": 0}});
    let r = up
        .api
        .post("/v1/measurements", &body.to_string(), &[])
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    let api = up.api.clone();
    wait_for("four runs of each agent", Duration::from_secs(60), || {
        let (api, id) = (api.clone(), id.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let rs = all_results(&api, &id).await;
            let n = |a: &str| rs.iter().filter(|r| r["agent_id"] == a).count();
            (n("agent-1") >= 4 && n("agent-2") >= 4).then_some(())
        }
    })
    .await;
    // Stopped, so that the page and the test see the same results.
    let r = up.api.delete(&format!("/v1/measurements/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let results = settled_results(&up.api, &id).await;

    let base = format!("http://127.0.0.1:{}", up.http_port);
    let b = Browser::start().await;
    let shots = artifacts();
    b.goto(&format!("{base}/#/m/{id}")).await;
    b.wait_true(
        "the heat map of every result",
        &format!(
            "return !!document.getElementById('rtt-heatmap') \
             && document.getElementById('results-note').dataset.loaded === '{}'",
            results.len()
        ),
        T,
    )
    .await;
    assert_eq!(
        b.eval("return document.getElementById('results-note').dataset.capped")
            .await,
        json!("false")
    );
    // An inline SVG, a row per agent.
    assert_eq!(
        b.eval(
            "const m = document.getElementById('rtt-heatmap'); \
             return [m.tagName, [...m.querySelectorAll('g.row')].map(r => r.dataset.agent)]"
        )
        .await,
        json!(["svg", ["agent-1", "agent-2"]])
    );
    let size = b
        .eval("return Number(document.getElementById('rtt-heatmap').dataset.bucketMs)")
        .await
        .as_i64()
        .unwrap();
    assert!(size >= 1000, "buckets of {size} ms");

    // The medians, from the API's results: every RTT of an agent's results whose start
    // falls in the bucket.
    let mut want: std::collections::BTreeMap<(String, i64), Vec<f64>> = Default::default();
    for r in &results {
        let t = ms_of(&r["started_at"]);
        let key = (
            r["agent_id"].as_str().unwrap().to_string(),
            t.div_euclid(size) * size,
        );
        let rtts = want.entry(key).or_default();
        for target in r["result"]["targets"].as_array().into_iter().flatten() {
            rtts.extend(
                target["rtts_ms"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|v| v.as_f64()),
            );
        }
    }
    let cells = b.eval(CELLS).await;
    let cells = cells.as_array().unwrap().clone();
    let columns = cells.len() / 2;
    assert_eq!(
        cells.iter().filter(|c| c["row"] == "agent-1").count(),
        columns,
        "as many cells in each row"
    );
    let (mut lo, mut hi, mut with_rtt) = (f64::MAX, f64::MIN, 0);
    for c in &cells {
        assert_eq!(c["agent"], c["row"], "{c}");
        let agent = c["agent"].as_str().unwrap().to_string();
        let t = c["t"].as_i64().unwrap();
        assert_eq!(t % size, 0, "{c}");
        match want.get_mut(&(agent, t)) {
            Some(rtts) => {
                let m = median(rtts);
                let shown: f64 = c["rtt"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap_or_else(|_| panic!("{c}"));
                assert!((shown - m).abs() <= 0.01, "cell {c}: median {m}");
                assert!(c["class"].as_str().unwrap().contains("ok"), "{c}");
                assert!(c["title"].as_str().unwrap().contains(" ms"), "{c}");
                (lo, hi, with_rtt) = (lo.min(m), hi.max(m), with_rtt + 1);
            }
            None => {
                assert_eq!(c["rtt"], "", "a bucket with no result: {c}");
                assert_eq!(c["results"], 0, "{c}");
                assert!(c["title"].as_str().unwrap().contains("no result"), "{c}");
            }
        }
    }
    assert_eq!(with_rtt, want.len(), "a cell for each bucket with results");
    // The legend: the scale's min and max.
    let legend = b
        .eval(
            "const m = document.getElementById('rtt-heatmap'); \
             return [Number(m.dataset.min), Number(m.dataset.max), \
             m.querySelector('.legend-min').textContent, m.querySelector('.legend-max').textContent, \
             m.querySelector('.legend').textContent]",
        )
        .await;
    assert!(
        (legend[0].as_f64().unwrap() - lo).abs() <= 0.01
            && (legend[1].as_f64().unwrap() - hi).abs() <= 0.01,
        "{legend} vs {lo}..{hi}"
    );
    let text = legend[4].as_str().unwrap();
    assert!(
        legend[2].as_str().unwrap().ends_with(" ms")
            && legend[3].as_str().unwrap().ends_with(" ms")
            && text.contains("no result")
            && text.contains("failed"),
        "{legend}"
    );
    // Loss over time: a line per agent, on a 0 to 100 % axis, none lost over loopback.
    let loss = b
        .eval(
            "const c = document.getElementById('loss-chart'); \
             return [c.querySelectorAll('svg path.series').length, c.textContent]",
        )
        .await;
    assert_eq!(loss[0], 2, "{loss}");
    let text = loss[1].as_str().unwrap();
    assert!(
        text.contains("loss (%)")
            && text.contains("100")
            && text.contains("agent-1")
            && text.contains("agent-2"),
        "{text}"
    );
    b.eval("document.getElementById('measurement-views').scrollIntoView(); return true")
        .await;
    b.screenshot(&shots.join("13-heatmap.png")).await;

    // Runs that failed and a ping that lost everything are violet; a bucket with no
    // result grey; strings from agents are text.
    let drawn = b
        .eval(
            "const t0 = 1700000000000, at = (s) => new Date(t0 + s * 1000).toISOString(); \
             const rs = [\
               {agent_id: 'a', module: 'ping_module', state: 'succeeded', started_at: at(0), result: {targets: [{sent: 3, received: 3, rtts_ms: [1, 2, 9]}]}}, \
               {agent_id: 'a', module: 'ping_module', state: 'succeeded', started_at: at(2), result: {targets: [{sent: 3, received: 0, rtts_ms: [null, null, null]}]}}, \
               {agent_id: '<b>x</b>', module: 'ping_module', state: 'timeout', error: 'timeout', started_at: at(0), result: null}]; \
             const svg = rttHeatmap(bucketize(rs, [], 1000)); \
             document.body.appendChild(svg); svg.id = 'synthetic-heatmap'; \
             const cell = (a, s) => svg.querySelector(`rect.cell[data-agent=\"${a}\"][data-t=\"${t0 + s * 1000}\"]`); \
             const out = [cell('a', 0).dataset.rtt, cell('a', 0).getAttribute('class'), \
               cell('a', 1).getAttribute('class'), cell('a', 1).getAttribute('fill'), \
               cell('a', 2).getAttribute('class'), cell('a', 2).dataset.rtt, cell('a', 2).dataset.loss, cell('a', 2).getAttribute('fill'), \
               cell('<b>x</b>', 0).getAttribute('class'), svg.querySelectorAll('b').length, \
               [...svg.querySelectorAll('g.row')].map(r => r.dataset.agent)]; \
             svg.remove(); return out",
        )
        .await;
    assert_eq!(
        drawn,
        json!([
            "2",
            "cell ok",
            "cell empty",
            "#e3e6eb",
            "cell fail",
            "",
            "100",
            "#7048e8",
            "cell fail",
            0,
            ["<b>x</b>", "a"]
        ])
    );

    // At most 3 results: the newest 3, and a note that says so.
    b.goto(&format!("{base}/?max_results=3#/m/{id}")).await;
    b.wait_true(
        "the capped note",
        "return document.getElementById('results-note')?.dataset.capped === 'true' && !!document.getElementById('rtt-heatmap')",
        T,
    )
    .await;
    let note = b.text("#results-note").await;
    assert!(
        note.contains(&format!("newest 3 of {} results", results.len())),
        "{note}"
    );
    let newest: std::collections::BTreeSet<(String, i64)> = results[results.len() - 3..]
        .iter()
        .map(|r| {
            (
                r["agent_id"].as_str().unwrap().to_string(),
                ms_of(&r["started_at"]),
            )
        })
        .collect();
    let cells = b.eval(CELLS).await;
    let shown: i64 = cells
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["results"].as_i64().unwrap())
        .sum();
    assert_eq!(shown, 3, "{cells}");
    let size = b
        .eval("return Number(document.getElementById('rtt-heatmap').dataset.bucketMs)")
        .await
        .as_i64()
        .unwrap();
    for c in cells.as_array().unwrap() {
        let (agent, t) = (c["agent"].as_str().unwrap(), c["t"].as_i64().unwrap());
        let n = newest
            .iter()
            .filter(|(a, s)| a == agent && s.div_euclid(size) * size == t)
            .count() as i64;
        assert_eq!(c["results"].as_i64().unwrap(), n, "{c}");
    }
    b.quit().await;
}

/// The path graph's hops as the page draws them, with where they are on screen.
const HOPS: &str = "return [...document.querySelectorAll('#path-graph g.node.hop')].map(g => ({\
     addr: g.dataset.addr, ttl: g.dataset.ttl, class: g.getAttribute('class'), \
     x: g.getBoundingClientRect().x, text: g.querySelector('text').textContent}))";

/// A traceroute from two agents through a chain of two routers (network namespaces):
/// the page draws the paths as a graph, the agents as sources, then each router and
/// the destination, left to right by hop; both agents' paths are the same, so nothing
/// is marked as diverging. Paths that differ (given to the page's own functions) mark
/// the hops and links not on every path and the first hop where they part; a hop with
/// no answer is `*`; an address that is HTML stays text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_measurement_page_draws_traceroute_paths_as_a_graph() {
    let chain = Chain::create(236, 2);
    let up = Up::start(2, &[]).await;
    up.api.wait_alive(&["agent-1", "agent-2"], T).await;
    let body = json!({"module": "traceroute",
        "params": {"host": chain.dest_ip, "probes": 2, "timeout_ms": 1000, "max_ttl": 8},
        "agents": {"ids": ["agent-1", "agent-2"]}, "deadline_s": 60});
    let r = up
        .api
        .post("/v1/measurements", &body.to_string(), &[])
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    let api = up.api.clone();
    let m = wait_for("both traces", Duration::from_secs(60), || {
        let (api, id) = (api.clone(), id.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let m = api.get(&format!("/v1/measurements/{id}")).await.body;
            (m["state"] == "complete").then_some(m)
        }
    })
    .await;
    for a in m["agents"].as_array().unwrap() {
        assert_eq!(a["state"], "succeeded", "{m}");
        assert_eq!(a["result"]["destination_reached"], true, "{m}");
    }

    let base = format!("http://127.0.0.1:{}", up.http_port);
    let b = Browser::start().await;
    let shots = artifacts();
    b.goto(&format!("{base}/#/m/{id}")).await;
    b.wait_true(
        "the path graph",
        "return document.querySelectorAll('#path-graph g.node.hop').length >= 3",
        T,
    )
    .await;
    let hops = b.eval(HOPS).await;
    let hops = hops.as_array().unwrap();
    assert_eq!(hops.len(), chain.hops.len(), "{hops:?}");
    let mut last_x = f64::MIN;
    for (i, addr) in chain.hops.iter().enumerate() {
        let n = hops
            .iter()
            .find(|n| n["addr"] == addr.as_str())
            .unwrap_or_else(|| panic!("no node for {addr}: {hops:?}"));
        assert_eq!(n["ttl"], (i + 1).to_string(), "{n}");
        assert_eq!(n["text"], addr.as_str(), "{n}");
        let x = n["x"].as_f64().unwrap();
        assert!(x > last_x, "hop {} at x {x}, left of the one before", i + 1);
        last_x = x;
        let class = n["class"].as_str().unwrap();
        assert!(!class.contains("diverge"), "{n}");
        assert_eq!(class.contains("destination"), *addr == chain.dest_ip, "{n}");
    }
    // The agents are the sources, left of the first hop; an edge from each to it, then
    // one between consecutive hops; none diverges.
    let graph = b
        .eval(
            "const g = document.getElementById('path-graph'); \
             const first = g.querySelector('g.node.hop[data-ttl=\"1\"]').getBoundingClientRect().x; \
             return [g.tagName, [...g.querySelectorAll('g.node.agent')].map(a => [a.dataset.agent, a.getBoundingClientRect().x < first]), \
               [...g.querySelectorAll('path.edge')].map(e => e.dataset.from + '>' + e.dataset.to).sort(), \
               g.querySelectorAll('.diverge').length, g.dataset.firstDiverge]",
        )
        .await;
    let (h1, h2, d) = (&chain.hops[0], &chain.hops[1], &chain.dest_ip);
    let mut edges = vec![
        format!("agent-1>{h1}"),
        format!("agent-2>{h1}"),
        format!("{h1}>{h2}"),
        format!("{h2}>{d}"),
    ];
    edges.sort();
    assert_eq!(
        graph,
        json!(["svg", [["agent-1", true], ["agent-2", true]], edges, 0, ""])
    );
    assert!(
        b.text("#path-graph-box")
            .await
            .contains("paths are the same"),
        "{}",
        b.text("#path-graph-box").await
    );
    b.eval("document.getElementById('path-graph-box').scrollIntoView(); return true")
        .await;
    b.screenshot(&shots.join("14-path-graph.png")).await;

    // Paths that part at hop 2: agent a through r2, agent b through an address that is
    // HTML; c hears nothing past r1 and never reaches the destination.
    let drawn = b
        .eval(
            "const tr = (agent, hops, reached) => ({agent_id: agent, module: 'traceroute', state: 'succeeded', \
               started_at: '2024-01-01T00:00:00Z', result: {dst_addr: '198.51.100.9', destination_reached: reached, \
               hops: hops.map((from, i) => ({ttl: i + 1, probes: [from ? {from, rtt_ms: 1} : null, null]}))}}); \
             const evil = '<img src=x onerror=\"window.__pwned=1\">'; \
             const svg = pathGraph(newestPaths([\
               tr('a', ['10.0.0.1', '10.0.1.1', '198.51.100.9'], true), \
               tr('b', ['10.0.0.1', evil, '198.51.100.9'], true), \
               tr('c', ['10.0.0.1', null, null], false)])); \
             svg.id = 'synthetic-paths'; document.body.appendChild(svg); \
             const node = (addr, ttl) => svg.querySelector(`g.node.hop[data-ttl=\"${ttl}\"][data-addr=\"${CSS.escape(addr)}\"]`); \
             const cls = (addr, ttl) => node(addr, ttl)?.getAttribute('class'); \
             const out = [svg.dataset.firstDiverge, cls('10.0.0.1', 1), cls('10.0.1.1', 2), cls(evil, 2), \
               node(evil, 2).querySelector('text').textContent, cls('*', 2), cls('*', 3), \
               svg.querySelector('g.node.unreached')?.dataset.addr, \
               [...svg.querySelectorAll('path.edge.diverge')].map(e => e.dataset.from + '>' + e.dataset.to).sort(), \
               svg.querySelectorAll('img').length, window.__pwned === undefined]; \
             svg.scrollIntoView(); return out",
        )
        .await;
    let evil = "<img src=x onerror=\"window.__pwned=1\">";
    let mut diverging = vec![
        "10.0.0.1>10.0.1.1".to_string(),
        format!("10.0.0.1>{evil}"),
        "10.0.1.1>198.51.100.9".to_string(),
        format!("{evil}>198.51.100.9"),
        "10.0.0.1>*".to_string(),
        "*>*".to_string(),
    ];
    diverging.sort();
    assert_eq!(
        drawn,
        json!([
            "2",
            "node hop",
            "node hop diverge",
            "node hop diverge",
            evil,
            "node hop star diverge",
            "node hop star diverge",
            "198.51.100.9",
            diverging,
            0,
            true
        ])
    );
    b.screenshot(&shots.join("15-path-graph-diverge.png")).await;
    b.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alerts_page_shows_rules_their_state_and_events_live() {
    let up = Up::start(1, &["--alert-every", "1s"]).await;
    up.api.wait_alive(&["agent-1"], T).await;
    let body = json!({"module": "ping_module", "params": {"host": "127.0.0.1", "count": 2, "interval_ms": 50},
        "agents": {"ids": ["agent-1"]}, "schedule": {"interval_s": 1, "jitter_s": 0}});
    let r = up
        .api
        .post("/v1/measurements", &body.to_string(), &[])
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let m = r.body["id"].as_str().unwrap().to_string();
    let rule = |name: &str, max: f64| {
        let api = up.api.clone();
        let body = json!({"name": name, "measurement_id": m,
            "thresholds": {"max_rtt_median": max, "window_s": 5}});
        async move {
            let r = api.post("/v1/alert-rules", &body.to_string(), &[]).await;
            assert_eq!(r.status, 201, "{}", r.body);
            r.body["id"].as_str().unwrap().to_string()
        }
    };
    // Loopback answers in microseconds: over 1 µs, under 1 s.
    let breached = rule("over a microsecond", 0.001).await;
    let fine = rule("over a second", 1000.0).await;
    let api = up.api.clone();
    let first = wait_for("the first alert", T, || {
        let api = api.clone();
        async move {
            let r = api.get("/v1/alerts").await;
            r.body["events"].as_array()?.first().cloned()
        }
    })
    .await;
    assert_eq!(first["rule_id"], json!(breached), "{first}");

    let base = format!("http://127.0.0.1:{}", up.http_port);
    let b = Browser::start().await;
    b.goto(&format!("{base}/#/")).await;
    b.wait_true(
        "one alert firing on the fleet page",
        "return document.getElementById('alerts-firing')?.textContent === '1'",
        T,
    )
    .await;
    b.click("#nav-alerts").await;
    b.wait_true(
        "the rules with their states, and the alert",
        &format!(
            "return !!document.querySelector('#alert-rules tr[data-rule=\"{breached}\"] td.firing') \
             && !!document.querySelector('#alert-rules tr[data-rule=\"{fine}\"] td.ok') \
             && !!document.querySelector('#alert-events tr.alert-row[data-event=\"{}\"] td.firing')",
            first["id"].as_str().unwrap()
        ),
        T,
    )
    .await;
    b.eval("window.__imnMark = 7; return true;").await;
    // A new rule fires while the page is open: its alert arrives on the stream.
    let late = rule("made later", 0.002).await;
    let api = up.api.clone();
    let late_alert = wait_for("the later rule's alert", T, || {
        let (api, late) = (api.clone(), late.clone());
        async move {
            let r = api.get(&format!("/v1/alerts?rule={late}")).await;
            r.body["events"].as_array()?.first().cloned()
        }
    })
    .await;
    b.wait_true(
        "the later alert on the page, without a reload",
        &format!(
            "return window.__imnMark === 7 \
             && document.querySelector('#alert-events tbody tr')?.dataset.event === '{}'",
            late_alert["id"].as_str().unwrap()
        ),
        T,
    )
    .await;
    let text = b.text("#alert-events tbody tr").await;
    assert!(
        text.contains("made later") && text.contains("firing"),
        "{text}"
    );
    b.screenshot(&artifacts().join("16-alerts.png")).await;
}
