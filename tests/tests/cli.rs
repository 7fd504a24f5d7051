//! The `imn` client against `imn up` (two agents) and one extra agent that goes
//! offline: every command, its table and `--json` output, and its exit status.

use std::process::Output;
use std::time::Duration;

use imn_tests::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

/// Runs `imn ARGS` against the API at `url` (through IMN_URL, as users configure it).
async fn imn(url: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(bin("imn"));
    cmd.args(args).env("IMN_URL", url).env_remove("IMN_TOKEN");
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("imn finished within 2 min")
        .expect("imn runs")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn explain(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        text(o),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn json_of(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", explain(o)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_command_with_tables_json_and_exit_statuses() {
    let up = Up::start(2, &[]).await;
    let url = format!("http://127.0.0.1:{}", up.http_port);
    // A third agent, tagged, that will go offline.
    let mut gone = spawn_agent(
        &bin("imn-agent"),
        "cli-gone",
        &up.broker_url(),
        &up.dir.path().join("cli-gone"),
        &["--heartbeat-ms", "500", "--tags", "far"],
        up.dir.path(),
    );
    up.api
        .wait_alive(&["agent-1", "agent-2", "cli-gone"], T)
        .await;

    // imn agents: a table, --json, and the filters.
    let o = imn(&url, &["agents"]).await;
    assert!(o.status.success(), "{}", explain(&o));
    let t = text(&o);
    assert!(t.starts_with("AGENT"), "{t}");
    for a in ["agent-1", "agent-2", "cli-gone"] {
        assert!(
            t.lines().any(|l| l.starts_with(a) && l.contains("alive")),
            "{t}"
        );
    }
    let o = imn(&url, &["agents", "--tag", "far", "--json"]).await;
    let list = json_of(&o);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["id"], "cli-gone");

    // imn measure: progress on stderr, a results table, exit 0 when all reported.
    let o = imn(
        &url,
        &[
            "measure",
            "ping_module",
            "127.0.0.1",
            "--agents",
            "id:agent-1,id:agent-2",
            "--count",
            "2",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", explain(&o));
    let t = text(&o);
    assert!(t.starts_with("AGENT"), "{t}");
    for a in ["agent-1", "agent-2"] {
        assert!(
            t.lines()
                .any(|l| l.starts_with(a) && l.contains("succeeded") && l.contains("2/2 received")),
            "{t}"
        );
    }
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("2/2 agents reported"),
        "{}",
        explain(&o)
    );
    let o = imn(
        &url,
        &[
            "measure",
            "echo_module",
            "hello",
            "--agents",
            "id:agent-1",
            "--json",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", explain(&o));
    let m = json_of(&o);
    assert_eq!(m["state"], "complete", "{m}");
    assert_eq!(m["agents"][0]["result"]["message"], "hello", "{m}");
    let measurement = m["id"].as_str().unwrap().to_string();

    // A bad parameter: exit 1 and the field named.
    let o = imn(
        &url,
        &["measure", "ping_module", "127.0.0.1", "--count", "0"],
    )
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", explain(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("/count"),
        "{}",
        explain(&o)
    );

    // One agent offline: the measurement completes at its timeout, exit 1.
    gone.kill9();
    up.api.wait_not_alive("cli-gone", T).await;
    let o = imn(
        &url,
        &[
            "measure",
            "echo_module",
            "x",
            "--agents",
            "id:agent-1,id:cli-gone",
            "--timeout",
            "3s",
            "--json",
        ],
    )
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", explain(&o));
    let m = json_of(&o);
    assert_eq!(m["progress"]["reported"], 1, "{m}");
    let states: Vec<&str> = m["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["state"].as_str().unwrap())
        .collect();
    assert!(states.contains(&"expired"), "{m}");

    // imn results with the API's filters.
    let o = imn(&url, &["results", "--measurement", &measurement, "--json"]).await;
    assert!(o.status.success(), "{}", explain(&o));
    let rs = json_of(&o);
    assert_eq!(rs.as_array().unwrap().len(), 1, "{rs}");
    assert_eq!(rs[0]["result"]["message"], "hello");
    let o = imn(&url, &["results", "--module", "ping_module"]).await;
    let t = text(&o);
    assert_eq!(
        t.lines().filter(|l| l.contains("ping_module")).count(),
        2,
        "{t}"
    );
    let o = imn(&url, &["results", "--since", "yesterday"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", explain(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("since"),
        "{}",
        explain(&o)
    );

    // imn status: a request's transitions; a measurement's progress; unknown: exit 1.
    let request = m["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent_id"] == "agent-1")
        .unwrap()["request_id"]
        .as_str()
        .unwrap()
        .to_string();
    let o = imn(&url, &["status", &request]).await;
    assert!(o.status.success(), "{}", explain(&o));
    let t = text(&o);
    assert!(t.contains("succeeded on agent-1"), "{t}");
    assert!(t.contains("dispatched") && t.contains("running"), "{t}");
    let o = imn(&url, &["status", &measurement]).await;
    assert!(
        text(&o).contains("complete (1/1 agents reported)"),
        "{}",
        explain(&o)
    );
    let o = imn(&url, &["status", "no-such-id"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", explain(&o));

    // imn measure --every and imn watch: a recurring measurement's runs, streamed.
    let o = imn(
        &url,
        &[
            "measure",
            "echo_module",
            "tick",
            "--agents",
            "id:agent-2",
            "--every",
            "1s",
            "--json",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", explain(&o));
    let every = json_of(&o)["id"].as_str().unwrap().to_string();
    let o = imn(
        &url,
        &["watch", "--measurement", &every, "--count", "3", "--json"],
    )
    .await;
    assert!(o.status.success(), "{}", explain(&o));
    let runs: Vec<Value> = text(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(runs.len(), 3);
    for r in &runs {
        assert_eq!(
            (r["agent_id"].clone(), r["result"]["message"].clone()),
            (json!("agent-2"), json!("tick"))
        );
        assert!(r["scheduled_at"].is_string(), "{r}");
    }
    // The live stream (from now), as a table.
    let o = imn(&url, &["watch", "--agent", "agent-2", "--count", "1"]).await;
    assert!(o.status.success(), "{}", explain(&o));
    let t = text(&o);
    assert!(t.starts_with("STARTED") && t.contains("tick"), "{t}");
    assert_eq!(
        up.api
            .delete(&format!("/v1/measurements/{every}"))
            .await
            .status,
        200
    );

    // Nothing listening: a clear error, exit 1.
    let o = imn(&format!("http://127.0.0.1:{}", free_port()), &["agents"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", explain(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--url"),
        "{}",
        explain(&o)
    );
}

/// The operator's release flow through `imn` alone: a key, a signed release of the
/// x86_64 firmware's newer build, its upload and listing, a rollout to a supervised
/// agent (the host build) followed to `done` with `imn rollout status`, and settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_rollouts_and_settings_from_the_command_line() {
    let dir = TempDir::new("cli-release");
    let key = dir.path().join("ops.key");
    let o = imn(
        "http://127.0.0.1:9",
        &["releases", "keygen", "--out", key.to_str().unwrap()],
    )
    .await;
    assert!(o.status.success(), "{}", explain(&o));
    let public = std::fs::read_to_string(dir.path().join("ops.key.pub")).unwrap();
    let public = public.trim().to_string();
    assert!(text(&o).contains(&public), "{}", explain(&o));
    let again = imn(
        "http://127.0.0.1:9",
        &["releases", "keygen", "--out", key.to_str().unwrap()],
    )
    .await;
    assert!(!again.status.success(), "keygen never overwrites a key");

    let up = Up::start(0, &["--release-keys", &public]).await;
    let url = format!("http://127.0.0.1:{}", up.http_port);
    let data = up.dir.path().join("cli-sup");
    let _agent = spawn_agent(
        &bin("imn-agent"),
        "cli-sup",
        &up.broker_url(),
        &data,
        &[
            "--heartbeat-ms",
            "500",
            "--update-keys",
            &public,
            "--update-rate",
            "8000000",
        ],
        up.dir.path(),
    );
    up.api.wait_alive(&["cli-sup"], T).await;

    let next = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/firmware/full/x86_64-unknown-linux-musl/imn-agent-next");
    assert!(next.exists(), "{}: run cross/build.sh", next.display());
    let version = String::from_utf8_lossy(
        &std::process::Command::new(&next)
            .arg("--version")
            .output()
            .unwrap()
            .stdout,
    )
    .trim()
    .trim_start_matches("imn-agent ")
    .to_string();
    let signed = dir.path().join("imn-agent-next.signed");
    let o = imn(
        &url,
        &[
            "releases",
            "sign",
            next.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--version",
            &version,
            "--out",
            signed.to_str().unwrap(),
        ],
    )
    .await;
    assert!(o.status.success(), "{}", explain(&o));
    assert!(
        text(&o).contains("x86_64"),
        "the arch from the ELF header: {}",
        explain(&o)
    );
    let o = imn(&url, &["releases", "add", signed.to_str().unwrap()]).await;
    assert!(o.status.success(), "{}", explain(&o));
    let o = imn(&url, &["releases", "list", "--json"]).await;
    let list = json_of(&o);
    assert_eq!(list["releases"][0]["version"], json!(version), "{list}");
    // A file that is not a signed release fails before it is sent.
    let o = imn(&url, &["releases", "add", next.to_str().unwrap()]).await;
    assert!(!o.status.success(), "{}", explain(&o));

    let o = imn(
        &url,
        &[
            "rollout",
            "start",
            &version,
            "--agents",
            "id:cli-sup",
            "--canary",
            "100%",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", explain(&o));
    let all = json_of(&imn(&url, &["rollout", "status", "--json"]).await);
    let id = all["rollouts"][0]["id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let r = json_of(&imn(&url, &["rollout", "status", &id, "--json"]).await);
        if r["state"] == json!("done") {
            assert_eq!(r["agents"][0]["state"], json!("healthy"), "{r}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{r}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let o = imn(&url, &["rollout", "status", &id]).await;
    assert!(
        text(&o).contains("cli-sup") && text(&o).contains("healthy"),
        "{}",
        explain(&o)
    );
    let a = up.api.get("/agents/cli-sup").await.body;
    assert_eq!(a["version"], json!(version), "{a}");
    // A finished rollout cannot be paused.
    let o = imn(&url, &["rollout", "pause", &id]).await;
    assert!(!o.status.success(), "{}", explain(&o));

    let o = imn(
        &url,
        &[
            "settings",
            "set",
            "--agents",
            "id:cli-sup",
            "heartbeat_ms=800",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", explain(&o));
    assert!(text(&o).contains("cli-sup"), "{}", explain(&o));
    let api = up.api.clone();
    wait_for("the new settings", Duration::from_secs(60), || {
        let api = api.clone();
        async move {
            let a = api.get("/agents/cli-sup").await.body;
            (a["config_version"] == json!(1) && a["heartbeat_interval_ms"] == json!(800))
                .then_some(())
        }
    })
    .await;
    let o = imn(
        &url,
        &["settings", "set", "--agents", "id:cli-sup", "data=/tmp/x"],
    )
    .await;
    assert!(!o.status.success(), "{}", explain(&o));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        err.contains("/settings/data") && err.contains("\"data\" is not allowed here"),
        "{}",
        explain(&o)
    );
}
