//! The dashboard in a real browser (Debian's headless chromium through chromedriver)
//! against `imn up`: the fleet page, a ping measurement made with the form and its
//! results and chart arriving live, a schema error shown on its field, the fleet's
//! lifecycle (versions, rollouts, update failures), and the fleet map of where the
//! agents are. Screenshots are saved to target/test-artifacts/dashboard/.

use std::path::PathBuf;
use std::time::Duration;

use imn_proto::release::SigningKey;
use imn_proto::wire::{Envelope, Kind, LifecycleStatus, UpdateUp};
use imn_tests::hostile::HostileAgent;
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
