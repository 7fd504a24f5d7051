//! Wire and storage compatibility across builds.
//!
//! - `old_outbox_drains_on_the_current_build` (always runs): an agent data directory
//!   and a backend database written by an older build (commit 0cb083c), committed as
//!   `tests/fixtures/old-outbox-0cb083c.tar.gz`, are opened by the current backend,
//!   bridge and agent. The old agent left records unsent (its bridge was killed while
//!   its schedules kept running, runs finished offline, a restart interrupted one);
//!   the current agent must open its old outbox (same epoch), send every record, and
//!   the current backend must store every result exactly once, with no dead letter.
//!   `tests/fixtures/old-outbox-0cb083c.manifest.json` says what the fixture holds.
//!
//! - `make_old_outbox_fixture` (ignored: a generator) made that fixture, and
//!   `capture_wire_golden` (ignored: a generator) made the golden wire files that
//!   `modules/tests/wire_golden.rs` checks. Both need root (network namespaces, raw
//!   sockets), nats-server, dnsmasq and openssl. The committed ones were made with
//!   the build of commit 0cb083c, in a worktree of that commit with this file and
//!   `src/wire_compat.rs` copied in (the crate `imn_proto` was called `imn_modules`
//!   then), built in its own target directory:
//!
//!   ```sh
//!   REPO=$(git rev-parse --show-toplevel)
//!   WT=$(mktemp -d)/wt-0cb083c
//!   git worktree add "$WT" 0cb083c
//!   for f in tests/tests/wire_compat.rs tests/src/wire_compat.rs; do
//!       sed 's/imn_proto/imn_modules/g' "$REPO/$f" > "$WT/$f"
//!   done
//!   echo 'pub mod wire_compat;' >> "$WT/tests/src/lib.rs"
//!   cd "$WT" && export CARGO_TARGET_DIR="$WT-target"
//!   cargo build --workspace --bins
//!   IMN_FIXTURE_OUT="$REPO/tests/fixtures" cargo test -p imn-tests --test wire_compat \
//!       -- --ignored --nocapture make_old_outbox_fixture
//!   IMN_GOLDEN_OUT="$REPO/modules/tests/golden" cargo test -p imn-tests --test wire_compat \
//!       -- --ignored --nocapture capture_wire_golden
//!   ```
//!
//!   (`IMN_FIXTURE_OUT` and `IMN_GOLDEN_OUT` default to this checkout's
//!   `tests/fixtures` and `modules/tests/golden`.) The golden generator writes only
//!   files that do not exist yet: golden files are never regenerated (see
//!   `modules/tests/wire_golden.rs`); a new variant gets its sample from a run of the
//!   current build (`cargo build --workspace --bins`, then the last command above in
//!   this checkout), after a step that produces it is added below. The fixture
//!   generator refuses to replace an existing fixture; a new one is named after the
//!   build that made it.
//!
//! All traffic stays on 127.0.0.0/8, ::1 and the tests' own network namespaces.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use imn_proto::results::ModuleOutcome;
use imn_proto::wire::{self, Batch, CommandKind, Envelope, RecordBody, RequestState};
use imn_tests::netns::{Chain, Netns};
use imn_tests::peers::{self, Dnsmasq, NtpBehaviour, OpensslServer};
use imn_tests::wire_compat::{
    closed_port, dnsmasq_records, malformed_dns_udp, open_tcp, write_golden, MqttTap, SilentUdp,
    Stack, WebPeer,
};
use imn_tests::{bin, spawn_agent, wait_for, Api, TempDir};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(90);

/// The fixture this build must read.
const FIXTURE: &str = "old-outbox-0cb083c";

/// The measurement policy both generators give the backend: loopback and the tests'
/// benchmarking networks are allowed (so the built-in rule is on, and opened for
/// them), documentation networks are denied. Commands and schedule sets carry it.
const POLICY: &str = r#"builtin_deny = true

[[rule]]
name = "lab"
allow = ["127.0.0.0/8", "::1/128", "198.18.0.0/15", "2001:2::/48"]

[[rule]]
name = "no-docs"
deny = ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"]
"#;

// ---------------------------------------------------------------------------------
// Shared helpers.

/// Runs a module once and waits for its end; with a W3C `traceparent`, the result
/// comes back as a traced result.
async fn run(api: &Api, agent: &str, module: &str, params: &Value, tp: Option<&str>) -> Value {
    let headers: Vec<(&str, &str)> = tp.map(|t| ("traceparent", t)).into_iter().collect();
    let r = api
        .post(
            &format!("/agent/{agent}/{module}?wait=60"),
            &params.to_string(),
            &headers,
        )
        .await;
    assert_eq!(r.status, 200, "{module} {params}: {:?}", r.body);
    let state = r.body["state"].as_str().unwrap_or_default();
    println!(
        "{module}: {state}{}",
        r.body["error"]
            .as_str()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    );
    assert!(
        ["succeeded", "failed", "timeout"].contains(&state),
        "{module} {params}: {}",
        r.body
    );
    r.body
}

/// Submits a run without waiting; returns its request id.
async fn submit(api: &Api, agent: &str, module: &str, params: &Value, tp: Option<&str>) -> String {
    let headers: Vec<(&str, &str)> = tp.map(|t| ("traceparent", t)).into_iter().collect();
    let r = api
        .post(
            &format!("/agent/{agent}/{module}"),
            &params.to_string(),
            &headers,
        )
        .await;
    assert_eq!(r.status, 202, "{module} {params}: {:?}", r.body);
    r.body["request_id"].as_str().unwrap().to_string()
}

/// A recurring measurement on one agent; returns its id.
async fn every(
    api: &Api,
    agent: &str,
    module: &str,
    params: &Value,
    interval_s: u64,
    stop_ms: Option<i64>,
) -> String {
    let mut schedule = json!({"interval_s": interval_s, "jitter_s": 0});
    if let Some(stop) = stop_ms {
        schedule["stop"] = json!(stop / 1000);
    }
    let body = json!({"module": module, "params": params, "agents": {"ids": [agent]},
        "schedule": schedule, "description": format!("wire compat: {module} every {interval_s} s")});
    let r = api.post("/v1/measurements", &body.to_string(), &[]).await;
    assert_eq!(r.status, 202, "{body}: {:?}", r.body);
    r.body["id"].as_str().unwrap().to_string()
}

/// Waits until a measurement has a stored result.
async fn first_result(api: &Api, measurement: &str) {
    let api = api.clone();
    let m = measurement.to_string();
    wait_for(&format!("a result of {measurement}"), T, || {
        let api = api.clone();
        let m = m.clone();
        async move {
            let r = api.try_get(&format!("/v1/results?measurement={m}")).await?;
            (!r.body["results"].as_array()?.is_empty()).then_some(())
        }
    })
    .await
}

/// A W3C trace context, different for each `n`.
fn traceparent(n: u64) -> String {
    format!(
        "00-{:032x}-{:016x}-01",
        0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4700u128 + u128::from(n),
        0x00f0_67aa_0ba9_0200u64 + n
    )
}

/// Waits for the agent's hello to show a module's configuration, or its absence.
async fn wait_module(api: &Api, agent: &str, module: &str, present: bool, config: bool) {
    let api = api.clone();
    let (agent, module) = (agent.to_string(), module.to_string());
    wait_for(&format!("{module} loaded={present} on {agent}"), T, || {
        let api = api.clone();
        let (agent, module) = (agent.clone(), module.clone());
        async move {
            let a = api.try_get(&format!("/agents/{agent}")).await?;
            let m = a.body["modules"]
                .as_array()?
                .iter()
                .find(|m| m["name"] == module.as_str())
                .cloned();
            let ok = match (&m, present) {
                (None, false) => true,
                (Some(m), true) => !config || !m["config"].is_null(),
                _ => false,
            };
            ok.then_some(())
        }
    })
    .await
}

/// The short commit of this checkout: the build a generator runs with.
fn build_id() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new("git")
        .args(["-C", dir, "rev-parse", "--short", "HEAD"])
        .output()
        .expect("git");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

// ---------------------------------------------------------------------------------
// The golden wire files.

/// A golden file to write from the tapped traffic: the result record of a request.
struct Want {
    /// The golden file's name: the variant path, and `+what` for an extra sample.
    name: String,
    /// The request whose result (or traced result) it holds.
    request: String,
    /// What was measured, in words, for the file's `source`.
    about: String,
}

/// The variant path of one record body (as `modules/tests/wire_golden.rs` names it).
fn record_path(b: &RecordBody) -> String {
    let outcome = |o: &ModuleOutcome| match o {
        ModuleOutcome::Ok(out) => format!("Ok/{}", output_name(out)),
        ModuleOutcome::Failed(_) => "Failed".into(),
        ModuleOutcome::Timeout => "Timeout".into(),
    };
    match b {
        RecordBody::State(s) => format!("State/{:?}", s.state),
        RecordBody::Result(r) => format!("Result/{}", outcome(&r.outcome)),
        RecordBody::Event(_) => "Event".into(),
        RecordBody::TracedResult(r, _) => format!("TracedResult/{}", outcome(&r.outcome)),
        RecordBody::ScheduledResult(s) => format!("ScheduledResult/{}", outcome(&s.result.outcome)),
    }
}

fn output_name(o: &imn_proto::results::ModuleOutput) -> &'static str {
    use imn_proto::results::ModuleOutput as O;
    match o {
        O::Echo(_) => "Echo",
        O::Ping(_) => "Ping",
        O::Tcping(_) => "Tcping",
        O::Faulty(_) => "Faulty",
        O::Heartbeat(_) => "Heartbeat",
        O::Traceroute(_) => "Traceroute",
        O::Mtr(_) => "Mtr",
        O::Dns(_) => "Dns",
        O::Http(_) => "Http",
        O::TlsCert(_) => "TlsCert",
        O::Ntp(_) => "Ntp",
        O::Wasm(_) => "Wasm",
    }
}

fn command_name(k: &CommandKind) -> &'static str {
    match k {
        CommandKind::Run { .. } => "Run",
        CommandKind::Cancel { .. } => "Cancel",
        CommandKind::Load { .. } => "Load",
        CommandKind::Unload { .. } => "Unload",
        CommandKind::Configure { .. } => "Configure",
        CommandKind::Schedules { .. } => "Schedules",
        CommandKind::Update { .. } => "Update",
        CommandKind::Settings { .. } => "Settings",
        CommandKind::LoadWasm { .. } => "LoadWasm",
    }
}

/// One tapped message, decoded.
struct Seen {
    topic: String,
    bytes: Vec<u8>,
    env: Envelope,
    retained: bool,
}

/// A batch holding one record: the tapped bytes when the batch held only it, else
/// the record alone in a batch of the same epoch (encoded by this build).
fn alone(batch: &Batch, i: usize, bytes: &[u8]) -> (Vec<u8>, &'static str) {
    if batch.records.len() == 1 {
        (bytes.to_vec(), "the batch as tapped")
    } else {
        let b = Batch {
            epoch: batch.epoch,
            records: vec![batch.records[i].clone()],
        };
        (
            wire::encode(&Envelope::Batch(b)),
            "the record alone in a batch of its epoch (tapped in a batch of several)",
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "generator: writes modules/tests/golden (see modules/tests/wire_golden.rs)"]
async fn capture_wire_golden() {
    const AGENT: &str = "lab-golden-1";
    let out_dir = std::env::var("IMN_GOLDEN_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_path("modules/tests/golden"));
    let build = build_id();
    let dir = TempDir::new("wire-golden");

    // Peers: DNS, NTP, TLS, HTTP, TCP and UDP on loopback; a host that drops
    // everything and a chain of three routers (the second one silent) in namespaces.
    let records = dnsmasq_records();
    let record_refs: Vec<&str> = records.iter().map(String::as_str).collect();
    let dns = Dnsmasq::start(&record_refs);
    let ntp_port = peers::ntp_responder("127.0.0.1:0", NtpBehaviour::Offset(0.25));
    let kiss_port = peers::ntp_responder("127.0.0.1:0", NtpBehaviour::Kiss(b"RATE"));
    let tls = OpensslServer::start();
    let web = WebPeer::start(&format!("https://localhost:{}/", tls.port));
    let open = open_tcp();
    let closed = closed_port();
    let silent = SilentUdp::start();
    let garbage = malformed_dns_udp();
    let dropper = Netns::create("wg", 18);
    dropper.drop_all_input();
    let chain = Chain::create(77, 3);
    chain.silence_router(2);

    // A WebAssembly module (tcp_banner), signed by a key both ends trust.
    let (module_key, module_pub) = imn_tests::wasm::keygen(dir.path(), "modules.key");
    let banner = imn_tests::wasm::sign(
        &imn_tests::wasm::examples().join("tcp_banner.wasm"),
        &imn_tests::wasm::example_manifest("tcp_banner"),
        &module_key,
        &dir.path().join("tcp_banner.imnmod"),
    );
    let greeting = imn_tests::wire_compat::greeting_tcp("220 mail.imn.test ESMTP wire golden");

    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let dns_addr = format!("127.0.0.1:{}", dns.port);
    let mut stack = Stack::start(
        dir.path(),
        &dir.path().join("backend"),
        &[
            "--policy",
            policy.to_str().unwrap(),
            "--nameserver",
            &dns_addr,
            "--release-keys",
            &module_pub,
        ],
    )
    .await;
    let tap = MqttTap::start(stack.mqtt_port).await;
    let agent_dir = dir.path().join(AGENT);
    let agent_flags = [
        "--heartbeat-ms",
        "1000",
        "--resend-timeout-ms",
        "2000",
        "--tags",
        "lab,rack-3,golden",
        "--country",
        "DE",
        "--city",
        "Berlin",
        "--latitude",
        "52.52",
        "--longitude",
        "13.405",
        "--asn",
        "64500",
        "--nameservers",
        &dns_addr,
        "--max-runs",
        "16",
        "--module-keys",
        &module_pub,
    ];
    let start_agent = |stack: &Stack| {
        spawn_agent(
            &bin("imn-agent"),
            AGENT,
            &stack.broker(),
            &agent_dir,
            &agent_flags,
            dir.path(),
        )
    };
    let mut agent = start_agent(&stack);
    let api = stack.api.clone();
    api.wait_alive(&[AGENT], T).await;

    // Module commands: load with a configuration, unload, load.
    let r = api
        .put_json(
            &format!("/agents/{AGENT}/modules/faulty_module"),
            &json!({"defaults": {"message": "from the module's defaults"}, "timeout_ms": 1500}),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    wait_module(&api, AGENT, "faulty_module", true, true).await;
    let r = api
        .put_json(
            &format!("/agents/{AGENT}/modules/ping_module"),
            &json!({"defaults": {"size": 48}, "max_rate": 200, "timeout_ms": 20000}),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    wait_module(&api, AGENT, "ping_module", true, true).await;
    let r = api
        .delete(&format!("/agents/{AGENT}/modules/tls_cert"))
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    wait_module(&api, AGENT, "tls_cert", false, false).await;
    let r = api
        .put_json(&format!("/agents/{AGENT}/modules/tls_cert"), &json!({}))
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    wait_module(&api, AGENT, "tls_cert", true, false).await;
    // A WebAssembly module: added, then loaded (the package travels in the command).
    let r = api.post_bytes("/admin/modules", banner).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let r = api
        .put_json(&format!("/agents/{AGENT}/modules/tcp_banner"), &json!({}))
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    wait_module(&api, AGENT, "tcp_banner", true, false).await;
    // And a tiny one (a few hundred bytes), the sample of the LoadWasm command.
    let tiny = imn_tests::wasm::sign_code(
        dir.path(),
        &imn_tests::wasm::hostile("trap"),
        &imn_tests::wasm::manifest("golden_tiny", 1000, json!({})),
        &module_key,
    );
    let r = api.post_bytes("/admin/modules", tiny).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let r = api
        .put_json(&format!("/agents/{AGENT}/modules/golden_tiny"), &json!({}))
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    wait_module(&api, AGENT, "golden_tiny", true, false).await;

    // One sample of each module, run once plainly, once traced and on a schedule.
    let drop_ip = dropper.peer_ip.clone();
    let dest = chain.dest_ip.clone();
    let main: Vec<(&str, &str, Value, String)> = vec![
        ("Echo", "echo_module", json!({"message": "Grüße aus dem Labor 🛰 — wire golden"}),
            "echo_module".into()),
        ("Ping", "ping_module",
            json!({"targets": ["127.0.0.1", "::1", drop_ip, "nx.imn.test"], "count": 3,
                   "interval_ms": 200, "timeout_ms": 500, "size": 64}),
            "ping_module to 127.0.0.1, ::1, a namespace host that drops everything, and a name dnsmasq does not know".into()),
        ("Tcping", "tcping",
            json!({"host": "127.0.0.1", "port": open, "count": 3, "interval_ms": 100, "timeout_ms": 1000}),
            "tcping to an open port on 127.0.0.1".into()),
        ("Faulty", "faulty_module", json!({"message": "slow but fine", "delay": 0.3}),
            "faulty_module with a delay".into()),
        ("Heartbeat", "heartbeat", json!({}), "heartbeat (the agent's system snapshot)".into()),
        ("Traceroute", "traceroute",
            json!({"host": dest, "protocol": "icmp", "max_ttl": 8, "probes": 3, "timeout_ms": 400}),
            "ICMP traceroute through a chain of three namespace routers, the second one silent".into()),
        ("Mtr", "mtr",
            json!({"host": dest, "count": 4, "interval_ms": 100, "timeout_ms": 400}),
            "mtr through the same chain".into()),
        ("Dns", "dns",
            json!({"name": "alias.imn.test", "type": "A", "server": dns_addr, "do": true, "nsid": true}),
            "dns query for a CNAME to an A record, to dnsmasq".into()),
        ("Http", "http",
            json!({"url": format!("http://127.0.0.1:{}/start", web.port), "follow_redirects": true,
                   "ca_pem": tls.ca_pem, "headers": {"X-Imn-Probe": "golden"}, "max_body_bytes": 40}),
            "http GET following a 302 and a 301 from a local server to openssl s_server over TLS".into()),
        ("TlsCert", "tls_cert",
            json!({"host": "localhost", "port": tls.port, "ca_pem": tls.ca_pem, "alpn": ["h2", "http/1.1"]}),
            "tls_cert against openssl s_server, trusted through ca_pem".into()),
        ("Ntp", "ntp",
            json!({"host": "127.0.0.1", "port": ntp_port, "packets": 4, "interval_ms": 50}),
            "ntp against the tests' stratum-2 responder, 250 ms ahead".into()),
        ("Wasm", "tcp_banner", json!({"host": "127.0.0.1", "port": greeting}),
            "the tcp_banner WebAssembly module (modules/wasm/examples) against an SMTP greeting on 127.0.0.1".into()),
    ];
    let failing: Vec<(&str, Value, String)> = vec![
        (
            "Failed",
            json!({"message": "kaboom", "crash": true}),
            "faulty_module that panics".into(),
        ),
        (
            "Timeout",
            json!({"message": "zzz", "hang": true}),
            "faulty_module that hangs past its configured 1.5 s deadline".into(),
        ),
    ];
    let mut wants: Vec<Want> = Vec::new();
    let mut tp_n = 0;
    let mut traced_run_id = String::new();
    for (name, module, params, about) in &main {
        let b = run(&api, AGENT, module, params, None).await;
        wants.push(Want {
            name: format!("Batch/Result/Ok/{name}"),
            request: b["request_id"].as_str().unwrap().into(),
            about: about.clone(),
        });
        tp_n += 1;
        let b = run(&api, AGENT, module, params, Some(&traceparent(tp_n))).await;
        let rid = b["request_id"].as_str().unwrap().to_string();
        if *name == "Http" {
            traced_run_id = rid.clone();
        }
        wants.push(Want {
            name: format!("Batch/TracedResult/Ok/{name}"),
            request: rid,
            about: format!("{about}, requested with a traceparent"),
        });
    }
    for (name, params, about) in &failing {
        let b = run(&api, AGENT, "faulty_module", params, None).await;
        wants.push(Want {
            name: format!("Batch/Result/{name}"),
            request: b["request_id"].as_str().unwrap().into(),
            about: about.clone(),
        });
        tp_n += 1;
        let b = run(
            &api,
            AGENT,
            "faulty_module",
            params,
            Some(&traceparent(tp_n)),
        )
        .await;
        wants.push(Want {
            name: format!("Batch/TracedResult/{name}"),
            request: b["request_id"].as_str().unwrap().into(),
            about: format!("{about}, requested with a traceparent"),
        });
    }
    let b = run(
        &api,
        AGENT,
        "faulty_module",
        &json!({"message": "m", "error": true}),
        None,
    )
    .await;
    wants.push(Want {
        name: "Batch/Result/Failed+error".into(),
        request: b["request_id"].as_str().unwrap().into(),
        about: "faulty_module that returns an error".into(),
    });

    // Extra samples for the enums nested in results.
    let server = dns_addr.clone();
    let extras: Vec<(&str, &str, Value, &str)> = vec![
        ("Tcping+refused", "tcping", json!({"host": "127.0.0.1", "port": closed, "count": 2, "interval_ms": 100}),
            "tcping to a closed port on 127.0.0.1"),
        ("Tcping+timeout", "tcping", json!({"host": drop_ip, "port": 80, "count": 2, "interval_ms": 100, "timeout_ms": 300}),
            "tcping to a namespace host that drops everything"),
        ("Tcping+unreachable", "tcping", json!({"host": chain.unused_ip, "port": 80, "count": 1, "timeout_ms": 8000}),
            "tcping to an address of the chain's last subnet that no host has (ICMP host unreachable)"),
        ("Traceroute+udp", "traceroute", json!({"host": dest, "protocol": "udp", "max_ttl": 8, "probes": 2, "timeout_ms": 400}),
            "UDP traceroute through the chain"),
        ("Traceroute+tcp", "traceroute", json!({"host": dest, "protocol": "tcp", "port": 80, "max_ttl": 8, "probes": 2, "timeout_ms": 400}),
            "TCP SYN traceroute through the chain to a closed port"),
        ("Dns+aaaa", "dns", json!({"name": "www.imn.test", "type": "AAAA", "server": server}), "dns AAAA to dnsmasq"),
        ("Dns+mx-tcp", "dns", json!({"name": "imn.test", "type": "MX", "server": server, "protocol": "tcp"}), "dns MX over TCP to dnsmasq"),
        ("Dns+soa", "dns", json!({"name": "imn.test", "type": "SOA", "server": server}), "dns SOA to dnsmasq"),
        ("Dns+txt-truncated", "dns", json!({"name": "big.imn.test", "type": "TXT", "server": server, "edns_size": 0}),
            "dns TXT too long for UDP without EDNS: truncated, asked again over TCP"),
        ("Dns+srv", "dns", json!({"name": "_imn._tcp.imn.test", "type": "SRV", "server": server}), "dns SRV to dnsmasq"),
        ("Dns+caa", "dns", json!({"name": "imn.test", "type": "CAA", "server": server}), "dns CAA to dnsmasq"),
        ("Dns+https", "dns", json!({"name": "www.imn.test", "type": "HTTPS", "server": server}), "dns HTTPS (SVCB) to dnsmasq"),
        ("Dns+ds", "dns", json!({"name": "imn.test", "type": "DS", "server": server, "do": true}), "dns DS to dnsmasq"),
        ("Dns+dnskey", "dns", json!({"name": "imn.test", "type": "DNSKEY", "server": server, "do": true}), "dns DNSKEY to dnsmasq"),
        ("Dns+tlsa-other", "dns", json!({"name": "_443._tcp.www.imn.test", "type": "TLSA", "server": server}),
            "dns TLSA to dnsmasq (a type kept as presentation text only)"),
        ("Dns+system-server", "dns", json!({"name": "www.imn.test"}), "dns A to the agent's configured name server (dnsmasq)"),
        ("Dns+error-timeout", "dns", json!({"name": "www.imn.test", "server": format!("127.0.0.1:{}", silent.port), "timeout_ms": 300, "retries": 1}),
            "dns to a UDP port that never answers"),
        ("Dns+error-network", "dns", json!({"name": "www.imn.test", "server": format!("127.0.0.1:{closed}")}),
            "dns to a closed UDP port (ICMP port unreachable)"),
        ("Dns+error-malformed", "dns", json!({"name": "www.imn.test", "server": format!("127.0.0.1:{garbage}")}),
            "dns to a UDP responder whose answer is cut short"),
        ("Http+head", "http", json!({"url": format!("http://127.0.0.1:{}/page", web.port), "method": "HEAD"}), "http HEAD to a local server"),
        ("Http+options", "http", json!({"url": format!("http://127.0.0.1:{}/page", web.port), "method": "OPTIONS"}), "http OPTIONS to a local server"),
        ("Http+error-dns", "http", json!({"url": "http://nx.imn.test/"}), "http to a name dnsmasq does not know"),
        ("Http+error-connect", "http", json!({"url": format!("http://127.0.0.1:{closed}/")}), "http to a closed port"),
        ("Http+error-tls", "http", json!({"url": format!("https://localhost:{}/", tls.port)}),
            "https to openssl s_server without its CA: the certificate does not verify"),
        ("Http+error-response", "http", json!({"url": format!("http://127.0.0.1:{}/no-answer", web.port), "timeout_ms": 3000}),
            "http to a server that closes without answering"),
        ("Http+error-body", "http", json!({"url": format!("http://127.0.0.1:{}/short-body", web.port)}),
            "http to a server that sends less body than it said"),
        ("TlsCert+untrusted", "tls_cert", json!({"host": "localhost", "port": tls.port}),
            "tls_cert against openssl s_server without its CA"),
        ("TlsCert+error-connect", "tls_cert", json!({"host": "127.0.0.1", "port": closed}), "tls_cert to a closed port"),
        ("Ntp+kiss", "ntp", json!({"host": "127.0.0.1", "port": kiss_port, "packets": 2, "interval_ms": 50}),
            "ntp against a responder that sends the kiss code RATE"),
    ];
    for (name, module, params, about) in &extras {
        let b = run(&api, AGENT, module, params, None).await;
        wants.push(Want {
            name: format!("Batch/Result/Ok/{name}"),
            request: b["request_id"].as_str().unwrap().into(),
            about: about.to_string(),
        });
    }

    // Every module on a schedule, and the failing ones.
    let mut measurements = Vec::new();
    for (name, module, params, about) in &main {
        let m = every(&api, AGENT, module, params, 5, None).await;
        measurements.push((
            format!("Batch/ScheduledResult/Ok/{name}"),
            m,
            format!("{about}, on a 5 s schedule"),
        ));
    }
    for (name, params, about) in &failing {
        let m = every(&api, AGENT, "faulty_module", params, 5, None).await;
        measurements.push((
            format!("Batch/ScheduledResult/{name}"),
            m,
            format!("{about}, on a 5 s schedule"),
        ));
    }
    for (_, m, _) in &measurements {
        first_result(&api, m).await;
    }
    // A one-off measurement cancelled while it runs.
    let r = api
        .post(
            "/v1/measurements",
            &json!({"module": "ping_module", "params": {"host": "127.0.0.1", "count": 60, "interval_ms": 500},
                "agents": {"ids": [AGENT]}})
            .to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let cancel_m = r.body["id"].as_str().unwrap().to_string();
    let a2 = api.clone();
    let cm = cancel_m.clone();
    wait_for("the measurement to be cancelled to run", T, || {
        let api = a2.clone();
        let m = cm.clone();
        async move {
            let r = api.try_get(&format!("/v1/measurements/{m}")).await?;
            (r.body["agents"][0]["state"] == "running").then_some(())
        }
    })
    .await;
    let r = api.delete(&format!("/v1/measurements/{cancel_m}")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // The agent restarted without warning while its schedules run: the broker sends
    // its last will, and it says hello again with its schedule set and modules.
    tokio::time::sleep(Duration::from_secs(2)).await;
    agent.kill9();
    api.wait_not_alive(AGENT, T).await;
    agent = start_agent(&stack);
    api.wait_alive(&[AGENT], T).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (_, m, _) in &measurements {
        let r = api.delete(&format!("/v1/measurements/{m}")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    drop(agent);
    stack.kill_bridge();

    // Every message decodes, and encodes back to its own bytes.
    let mut seen = Vec::new();
    for t in tap.messages() {
        let (version, env) =
            wire::decode_versioned(&t.payload).unwrap_or_else(|e| panic!("{}: {e}", t.topic));
        assert_eq!(version, wire::WIRE_VERSION, "{}", t.topic);
        assert_eq!(wire::encode(&env), t.payload, "{}: not canonical", t.topic);
        seen.push(Seen {
            topic: t.topic,
            bytes: t.payload,
            env,
            retained: t.retained,
        });
    }
    println!("tapped {} messages", seen.len());
    let origin = format!(
        "captured: tapped on the bridge's MQTT broker between imn-agent, imn-bridge and imn-backend (build {build}), agent {AGENT}"
    );
    let mut written = BTreeMap::<String, String>::new();
    let mut put = |name: &str, source: String, bytes: &[u8]| {
        if write_golden(&out_dir, name, &source, bytes) {
            written.insert(name.to_string(), source);
        } else {
            println!("kept the existing {name}");
        }
    };

    // Results.
    let mut picked_ping: Option<Vec<u8>> = None;
    let mut picked_running: Option<(Vec<u8>, wire::Record, u64)> = None;
    let mut picked_tcping_refused: Option<(wire::Record, u64)> = None;
    let mut picked_traceroute: Option<(wire::Record, u64)> = None;
    for w in &wants {
        let found = seen.iter().find_map(|s| {
            let Envelope::Batch(b) = &s.env else {
                return None;
            };
            b.records.iter().enumerate().find_map(|(i, r)| {
                let hit = match &r.body {
                    RecordBody::Result(x) | RecordBody::TracedResult(x, _) => {
                        x.request_id == w.request
                    }
                    _ => false,
                };
                hit.then_some((b, i, &s.bytes))
            })
        });
        let (b, i, bytes) = found.unwrap_or_else(|| panic!("{}: no record tapped", w.name));
        let path = format!("Batch/{}", record_path(&b.records[i].body));
        let base = w.name.split('+').next().unwrap();
        assert_eq!(path, base, "{}: the run gave another variant", w.name);
        let (one, how) = alone(b, i, bytes);
        put(&w.name, format!("{origin}: {}; {how}", w.about), &one);
        match w.name.as_str() {
            "Batch/Result/Ok/Ping" => picked_ping = Some(one.clone()),
            "Batch/Result/Ok/Tcping+refused" => {
                picked_tcping_refused = Some((b.records[i].clone(), b.epoch))
            }
            "Batch/Result/Ok/Traceroute" => {
                picked_traceroute = Some((b.records[i].clone(), b.epoch))
            }
            _ => {}
        }
    }
    for (name, m, about) in &measurements {
        let (b, i, bytes) = seen
            .iter()
            .find_map(|s| {
                let Envelope::Batch(b) = &s.env else {
                    return None;
                };
                b.records.iter().position(|r| {
                    matches!(&r.body, RecordBody::ScheduledResult(run) if &run.measurement_id == m
                        && format!("Batch/{}", record_path(&r.body)) == *name)
                })
                .map(|i| (b, i, &s.bytes))
            })
            .unwrap_or_else(|| panic!("{name}: no scheduled result of {m} tapped"));
        let (one, how) = alone(b, i, bytes);
        put(name, format!("{origin}: {about}; {how}"), &one);
    }

    // States and events.
    let mut states_seen = BTreeSet::new();
    let mut event_done = false;
    for s in &seen {
        let Envelope::Batch(b) = &s.env else { continue };
        for (i, r) in b.records.iter().enumerate() {
            match &r.body {
                RecordBody::State(st) if states_seen.insert(format!("{:?}", st.state)) => {
                    let (one, how) = alone(b, i, &s.bytes);
                    if st.state == RequestState::Running {
                        picked_running = Some((one.clone(), r.clone(), b.epoch));
                    }
                    put(
                        &format!("Batch/State/{:?}", st.state),
                        format!(
                            "{origin}: the agent's {:?} state of request {}; {how}",
                            st.state, st.request_id
                        ),
                        &one,
                    );
                }
                RecordBody::Event(e) if !event_done && e.kind == "schedules_updated" => {
                    event_done = true;
                    let (one, how) = alone(b, i, &s.bytes);
                    put(
                        "Batch/Event",
                        format!("{origin}: the agent's event {:?}; {how}", e.kind),
                        &one,
                    );
                }
                _ => {}
            }
        }
    }
    assert!(event_done, "no schedules_updated event tapped");

    // The other envelopes.
    let pick = |f: &dyn Fn(&Seen) -> bool| seen.iter().filter(|s| f(s)).collect::<Vec<&Seen>>();
    let hellos = pick(&|s| matches!(s.env, Envelope::Hello(_)));
    let hello = hellos
        .iter()
        .max_by_key(|s| {
            let Envelope::Hello(h) = &s.env else {
                unreachable!()
            };
            (
                h.schedule_policy != 0,
                h.modules.iter().filter(|m| m.config.is_some()).count(),
                h.schedule_version,
            )
        })
        .expect("a hello");
    put(
        "Hello",
        format!(
            "{origin}: its hello after a restart, with schedules, a policy and a configured module"
        ),
        &hello.bytes,
    );
    let hb = pick(&|s| matches!(s.env, Envelope::Heartbeat(_)));
    let hb = hb.last().expect("a heartbeat");
    put("Heartbeat", format!("{origin}: a heartbeat"), &hb.bytes);
    let acks = pick(&|s| matches!(s.env, Envelope::Ack(_)));
    let ack = acks
        .iter()
        .rev()
        .max_by_key(|s| {
            let Envelope::Ack(a) = &s.env else {
                unreachable!()
            };
            a.ranges.len()
        })
        .expect("an ack");
    put(
        "Ack",
        format!("{origin}: the backend's ack on {}", ack.topic),
        &ack.bytes,
    );
    let online = pick(&|s| matches!(&s.env, Envelope::Status(st) if st.online) && !s.retained);
    put(
        "Status",
        format!("{origin}: the agent's online status"),
        &online.first().expect("online").bytes,
    );
    let offline = pick(&|s| matches!(&s.env, Envelope::Status(st) if !st.online));
    put(
        "Status+offline",
        format!(
            "{origin}: the agent's last will, published by the broker when the agent was killed"
        ),
        &offline.first().expect("the last will").bytes,
    );
    let mut commands: BTreeMap<&str, &Seen> = BTreeMap::new();
    for s in &seen {
        let Envelope::Command(c) = &s.env else {
            continue;
        };
        let name = command_name(&c.kind);
        let better = match (name, commands.get(name)) {
            (_, None) => true,
            ("Run", Some(_)) => c.id == traced_run_id,
            // The smallest package: the sample holds every byte of it.
            ("LoadWasm", Some(prev)) => s.bytes.len() < prev.bytes.len(),
            ("Configure", Some(_)) => {
                matches!(&c.kind, CommandKind::Configure { config, .. } if config.max_rate.is_some())
            }
            ("Schedules", Some(prev)) => {
                let n = |e: &Envelope| match e {
                    Envelope::Command(wire::Command {
                        kind: CommandKind::Schedules { schedules, .. },
                        ..
                    }) => schedules.len(),
                    _ => 0,
                };
                n(&s.env) > n(&prev.env)
            }
            _ => false,
        };
        if better {
            commands.insert(name, s);
        }
    }
    for name in [
        "Run",
        "Cancel",
        "Load",
        "Unload",
        "Configure",
        "Schedules",
        "LoadWasm",
    ] {
        let s = commands
            .get(name)
            .unwrap_or_else(|| panic!("no {name} command tapped"));
        put(
            &format!("Command/{name}"),
            format!(
                "{origin}: the backend's {name} command to the agent, with the policy it checked"
            ),
            &s.bytes,
        );
    }

    // Version 1: what this build writes for a peer that has not been upgraded.
    let v1 = |e: &Envelope| wire::encode_for(wire::LEGACY_WIRE_VERSION, e);
    let v1_origin = format!(
        "{origin}; written again with wire::encode_for(1, ...), as this build writes it for a version 1 peer (the version 1 types drop what version 2 added)"
    );
    put(
        "v1/Hello",
        format!("{v1_origin}: the hello above"),
        &v1(&hello.env),
    );
    put(
        "v1/Heartbeat",
        format!("{v1_origin}: the heartbeat above"),
        &v1(&hb.env),
    );
    put(
        "v1/Ack",
        format!("{v1_origin}: the ack above"),
        &v1(&ack.env),
    );
    put(
        "v1/Status",
        format!("{v1_origin}: the online status above"),
        &v1(&online[0].env),
    );
    for name in ["Run", "Cancel", "Load", "Unload", "Configure", "Schedules"] {
        put(
            &format!("v1/Command/{name}"),
            format!("{v1_origin}: the {name} command above"),
            &v1(&commands[name].env),
        );
    }
    let ping = wire::decode(&picked_ping.expect("the ping result")).unwrap();
    put(
        "v1/Batch/Result/Ok/Ping",
        format!("{v1_origin}: the ping result above"),
        &v1(&ping),
    );
    let (running_bytes, running, epoch) = picked_running.expect("a running state");
    put(
        "v1/Batch/State/Running",
        format!("{v1_origin}: the running state above"),
        &v1(&wire::decode(&running_bytes).unwrap()),
    );

    // Made by hand: variants no run here produces.
    let batch_of = |epoch: u64, r: wire::Record| {
        wire::encode(&Envelope::Batch(Batch {
            epoch,
            records: vec![r],
        }))
    };
    for (state, detail) in [
        (RequestState::Pending, None),
        (RequestState::Dispatched, None),
        (RequestState::Received, None),
        (RequestState::Succeeded, None),
        (RequestState::Failed, Some("policy_denied: no-docs.deny: policy rule \"no-docs\" denies 192.0.2.1 (in 192.0.2.0/24)")),
        (RequestState::Timeout, None),
        (RequestState::Expired, Some("deadline passed before the agent received it")),
        (RequestState::Cancelled, None),
    ] {
        let name = format!("Batch/State/{state:?}");
        if states_seen.contains(&format!("{state:?}")) {
            continue;
        }
        let mut r = running.clone();
        let RecordBody::State(st) = &mut r.body else { unreachable!() };
        st.state = state;
        st.detail = detail.map(str::to_string);
        put(
            &name,
            format!("hand-made: the captured Running state record ({origin}) with state {state:?}{}; no run here made an agent send it, and the enum is read by position", if detail.is_some() { " and a detail" } else { "" }),
            &batch_of(epoch, r),
        );
    }
    let (mut r, epoch) = picked_tcping_refused.expect("tcping refused");
    if let RecordBody::Result(x) = &mut r.body {
        if let ModuleOutcome::Ok(imn_proto::results::ModuleOutput::Tcping(t)) = &mut x.outcome {
            t.attempts[1].outcome = imn_proto::results::TcpOutcome::Error;
            t.attempts[1].error = Some("connect: Address not available (os error 99)".into());
            t.attempts[1].connect_ms = None;
            t.summarise();
        }
    }
    put(
        "Batch/Result/Ok/Tcping+error",
        format!("hand-made: the captured tcping to a closed port ({origin}) with its second attempt turned into an error (no local peer makes connect fail otherwise)"),
        &batch_of(epoch, r),
    );
    let (mut r, epoch) = picked_traceroute.expect("traceroute");
    if let RecordBody::Result(x) = &mut r.body {
        if let ModuleOutcome::Ok(imn_proto::results::ModuleOutput::Traceroute(t)) = &mut x.outcome {
            use imn_proto::kinds::traceroute::{IcmpExtension, MplsLabel};
            for (k, hop) in t.hops.iter_mut().enumerate().take(3) {
                for p in hop.probes.iter_mut().flatten() {
                    p.icmp_ext = Some(IcmpExtension {
                        rfc4884: k != 2,
                        mpls: vec![
                            MplsLabel {
                                label: 16_004 + k as u32,
                                exp: 0,
                                s: false,
                                ttl: 1,
                            },
                            MplsLabel {
                                label: 24_017,
                                exp: 5,
                                s: true,
                                ttl: 254,
                            },
                        ],
                    });
                }
            }
        }
    }
    put(
        "Batch/Result/Ok/Traceroute+mpls",
        format!("hand-made: the captured ICMP traceroute ({origin}) with RFC 4950 MPLS label stacks on the first three hops' replies (Linux routers send no ICMP extensions)"),
        &batch_of(epoch, r),
    );
    let mut h = hb.env.clone();
    if let Envelope::Heartbeat(x) = &mut h {
        x.outbox_depth = 1312;
        x.outbox_oldest_age_ms = 86_400_000;
        x.dropped = 3;
        x.outbox_condition = Some("disk_full".into());
    }
    put(
        "Heartbeat+disk-full",
        format!("hand-made: the captured heartbeat ({origin}) with a day of backlog, evictions and a full disk"),
        &wire::encode(&h),
    );

    println!(
        "wrote {} golden files to {}:",
        written.len(),
        out_dir.display()
    );
    for (name, source) in &written {
        println!("  {name}: {source}");
    }
    drop(stack);
}

// ---------------------------------------------------------------------------------
// The old outbox.

/// The fixture's agent, and the flags it ran with (and runs with again; the name
/// server is the generator's dnsmasq when made, and a closed loopback port when read).
const OLD_AGENT: &str = "field-agent-7";
const OLD_AGENT_FLAGS: &[&str] = &[
    "--heartbeat-ms",
    "1000",
    "--resend-timeout-ms",
    "2000",
    "--tags",
    "field,lte",
    "--country",
    "NL",
    "--city",
    "Utrecht",
    "--asn",
    "1136",
    "--max-runs",
    "16",
];

/// What one record is, for the manifest.
fn describe(r: &wire::Record) -> Value {
    let outcome = |o: &ModuleOutcome| match o {
        ModuleOutcome::Ok(_) => "ok",
        ModuleOutcome::Failed(_) => "failed",
        ModuleOutcome::Timeout => "timeout",
    };
    match &r.body {
        RecordBody::State(s) => json!({"seq": r.seq, "kind": "state",
            "request_id": s.request_id, "state": s.state.as_str()}),
        RecordBody::Event(e) => json!({"seq": r.seq, "kind": "event",
            "event": e.kind, "message": e.message}),
        RecordBody::Result(x) => json!({"seq": r.seq, "kind": "result",
            "request_id": x.request_id, "module": x.module, "outcome": outcome(&x.outcome)}),
        RecordBody::TracedResult(x, tp) => json!({"seq": r.seq, "kind": "traced_result",
            "request_id": x.request_id, "module": x.module, "outcome": outcome(&x.outcome),
            "traceparent": tp}),
        RecordBody::ScheduledResult(s) => json!({"seq": r.seq, "kind": "scheduled_result",
            "request_id": s.result.request_id, "module": s.result.module,
            "outcome": outcome(&s.result.outcome), "measurement_id": s.measurement_id,
            "scheduled_ms": s.scheduled_ms}),
    }
}

/// Runs a shell command, and fails the test if it fails.
fn sh(cmd: &str) -> String {
    let (ok, out) = imn_tests::netns::sh(cmd);
    assert!(ok, "{cmd}: {out}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "generator: writes tests/fixtures/old-outbox-BUILD.* (see this file's header)"]
async fn make_old_outbox_fixture() {
    let out_dir = std::env::var("IMN_FIXTURE_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_path("tests/fixtures"));
    let build = build_id();
    let name = format!("old-outbox-{build}");
    let tar_path = out_dir.join(format!("{name}.tar.gz"));
    let manifest_path = out_dir.join(format!("{name}.manifest.json"));
    assert!(
        !tar_path.exists() && !manifest_path.exists(),
        "{} exists: a fixture is never made again (a new build makes a new one)",
        tar_path.display()
    );
    let dir = TempDir::new("old-outbox");
    let root = dir.path().join("fixture");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("policy.toml"), POLICY).unwrap();

    let records = dnsmasq_records();
    let record_refs: Vec<&str> = records.iter().map(String::as_str).collect();
    let dns = Dnsmasq::start(&record_refs);
    let dns_addr = format!("127.0.0.1:{}", dns.port);
    let ntp_port = peers::ntp_responder("127.0.0.1:0", NtpBehaviour::Offset(-0.4));
    let tls = OpensslServer::start();
    let web = WebPeer::start(&format!("https://localhost:{}/", tls.port));
    let open = open_tcp();

    let mut stack = Stack::start(
        dir.path(),
        &root.join("backend"),
        &[
            "--policy",
            root.join("policy.toml").to_str().unwrap(),
            "--nameserver",
            &dns_addr,
            "--fault-injection",
        ],
    )
    .await;
    let tap = MqttTap::start(stack.mqtt_port).await;
    let agent_dir = root.join("agent");
    let mut flags: Vec<&str> = OLD_AGENT_FLAGS.to_vec();
    flags.extend(["--nameservers", &dns_addr]);
    let start_agent = |stack: &Stack| {
        spawn_agent(
            &bin("imn-agent"),
            OLD_AGENT,
            &stack.broker(),
            &agent_dir,
            &flags,
            dir.path(),
        )
    };
    let mut agent = start_agent(&stack);
    let api = stack.api.clone();
    api.wait_alive(&[OLD_AGENT], T).await;
    let r = api
        .put_json(
            &format!("/agents/{OLD_AGENT}/modules/faulty_module"),
            &json!({"defaults": {"message": "field default"}, "timeout_ms": 4000}),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    wait_module(&api, OLD_AGENT, "faulty_module", true, true).await;

    let modules: Vec<(&str, Value)> = vec![
        ("echo_module", json!({"message": "hello from the field"})),
        (
            "ping_module",
            json!({"targets": ["127.0.0.1", "::1"], "count": 2, "interval_ms": 100, "timeout_ms": 500}),
        ),
        (
            "tcping",
            json!({"host": "127.0.0.1", "port": open, "count": 2, "interval_ms": 100}),
        ),
        (
            "dns",
            json!({"name": "alias.imn.test", "type": "A", "server": dns_addr}),
        ),
        (
            "http",
            json!({"url": format!("http://127.0.0.1:{}/page", web.port), "max_body_bytes": 256}),
        ),
        (
            "tls_cert",
            json!({"host": "localhost", "port": tls.port, "ca_pem": tls.ca_pem}),
        ),
        (
            "ntp",
            json!({"host": "127.0.0.1", "port": ntp_port, "packets": 2, "interval_ms": 50}),
        ),
        (
            "traceroute",
            json!({"host": "127.0.0.1", "protocol": "udp", "max_ttl": 4, "probes": 2, "timeout_ms": 300}),
        ),
        (
            "mtr",
            json!({"host": "::1", "count": 2, "interval_ms": 50, "timeout_ms": 300}),
        ),
        ("heartbeat", json!({})),
        ("faulty_module", json!({"delay": 0.1})),
    ];
    // Stored and acked while the bridge is up.
    for (module, params) in &modules {
        run(&api, OLD_AGENT, module, params, None).await;
    }
    run(
        &api,
        OLD_AGENT,
        "echo_module",
        &json!({"message": "traced"}),
        Some(&traceparent(900)),
    )
    .await;
    // Schedules, which go on while the agent is offline, until they stop.
    let stop_ms = imn_proto::now_ms() + 150_000;
    let mut measurements = Vec::new();
    for (module, params) in &modules {
        measurements.push(every(&api, OLD_AGENT, module, params, 5, Some(stop_ms)).await);
    }
    for params in [
        json!({"message": "boom", "crash": true}),
        json!({"message": "stuck", "hang": true}),
    ] {
        measurements.push(every(&api, OLD_AGENT, "faulty_module", &params, 5, Some(stop_ms)).await);
    }
    for m in &measurements {
        first_result(&api, m).await;
    }
    // Stored by the backend, but its ack never reaches the agent.
    let r = api.post("/debug/hold-acks?on=true", "", &[]).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    for (module, params) in &modules[..4] {
        run(&api, OLD_AGENT, module, params, None).await;
    }
    // Runs that finish while the bridge is down, or that a restart interrupts.
    let long = [
        (
            "ping_module",
            json!({"host": "127.0.0.1", "count": 25, "interval_ms": 1000}),
            Some(traceparent(901)),
        ),
        (
            "tcping",
            json!({"host": "127.0.0.1", "port": open, "count": 15, "interval_ms": 1000}),
            None,
        ),
        (
            "mtr",
            json!({"host": "127.0.0.1", "count": 12, "interval_ms": 1000, "timeout_ms": 300}),
            Some(traceparent(902)),
        ),
        (
            "ping_module",
            json!({"host": "::1", "count": 100, "interval_ms": 1000}),
            None,
        ),
    ];
    let mut long_ids = Vec::new();
    for (module, params, tp) in &long {
        long_ids.push(submit(&api, OLD_AGENT, module, params, tp.as_deref()).await);
    }
    for id in &long_ids {
        api.wait_state(id, "running", T).await;
    }
    stack.kill_bridge();
    println!("bridge killed; the agent runs offline");
    tokio::time::sleep(Duration::from_secs(30)).await;
    agent.kill9();
    agent = start_agent(&stack);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let st = agent.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    assert!(st.is_some(), "the agent did not stop on SIGTERM");
    drop(agent);

    // The backend's view, then the backend stopped cleanly.
    let stored = api
        .get(&format!("/agents/{OLD_AGENT}/results?limit=100000"))
        .await
        .body;
    let agent_view = api.get(&format!("/agents/{OLD_AGENT}")).await.body;
    let health = api.get("/health").await.body;
    stack.stop_backend();
    drop(stack);
    let hello = tap
        .messages()
        .iter()
        .rev()
        .find_map(|t| match wire::decode(&t.payload) {
            Ok(Envelope::Hello(h)) => Some(h),
            _ => None,
        })
        .expect("the agent's last hello");

    // What the outbox holds, read from a copy (opening a store may write to it).
    let copy = dir.path().join("agent-copy");
    sh(&format!("cp -a {} {}", agent_dir.display(), copy.display()));
    let (epoch, pending, dropped) = {
        use imn_agent::outbox::{Outbox, OutboxLimits, SledOutbox};
        let mut ob = SledOutbox::open(&copy, OutboxLimits::default()).expect("the outbox opens");
        let first = ob.first_seq().expect("records waiting");
        let recs = ob.read_from(first, usize::MAX);
        assert_eq!(recs.len() as u64, ob.depth(), "every waiting record read");
        (ob.epoch(), recs, ob.dropped())
    };
    let marker = std::fs::read_to_string(agent_dir.join("outbox.epoch")).unwrap();
    assert_eq!(
        marker.trim(),
        epoch.to_string(),
        "the epoch marker names the store's epoch"
    );
    // Which of them the backend has (stored, ack held back), from its database.
    let db = dir.path().join("backend-copy.sqlite");
    std::fs::copy(root.join("backend/backend.sqlite"), &db).unwrap();
    let stored_seqs: BTreeSet<(u64, u64)> = {
        let c = rusqlite::Connection::open(&db).unwrap();
        let mut st = c
            .prepare("SELECT epoch, seq FROM records WHERE agent_id = ?1")
            .unwrap();
        st.query_map([OLD_AGENT], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    };
    assert_eq!(
        stored_seqs.len() as u64,
        agent_view["records_stored"].as_u64().unwrap(),
        "the database's rows are the records the API counts"
    );
    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    let mut waiting = Vec::new();
    for r in &pending {
        let mut d = describe(r);
        *by_kind
            .entry(d["kind"].as_str().unwrap().to_string())
            .or_default() += 1;
        d["already_stored"] = json!(stored_seqs.contains(&(epoch, r.seq)));
        waiting.push(d);
    }
    let already = waiting
        .iter()
        .filter(|d| d["already_stored"] == true)
        .count();
    let results_waiting = waiting
        .iter()
        .filter(|d| d["kind"].as_str().unwrap().ends_with("result"))
        .count();
    let stored_before: Vec<Value> = stored
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            json!({"request_id": r["request_id"], "module": r["module"], "state": r["state"],
            "epoch": r["record"]["epoch"], "seq": r["record"]["seq"]})
        })
        .collect();
    for k in [
        "state",
        "event",
        "result",
        "traced_result",
        "scheduled_result",
    ] {
        assert!(
            by_kind.get(k).copied().unwrap_or(0) > 0,
            "no {k} record waits: {by_kind:?}"
        );
    }
    assert!(already > 0, "no record is both stored and waiting");
    assert!(
        waiting.iter().any(|w| w["event"] == "run_interrupted"
            && w["message"].as_str().unwrap().starts_with("request ")),
        "no one-off run was interrupted by the restart"
    );

    // The fixture: the agent's data directory, the backend's, the policy.
    sh(&format!("rm -f {}/outbox.lock", agent_dir.display()));
    std::fs::create_dir_all(&out_dir).unwrap();
    sh(&format!(
        "tar --sort=name --owner=0 --group=0 --numeric-owner -C {} -czf {} agent backend policy.toml",
        root.display(),
        tar_path.display()
    ));
    let size = std::fs::metadata(&tar_path).unwrap().len();
    let manifest = json!({
        "what": "An agent data directory whose sled outbox holds records never acked, and the backend's SQLite store of the same run, written by the build named here. tests/tests/wire_compat.rs opens them with the current build.",
        "made_with_build": build,
        "made_by": "cargo test -p imn-tests --test wire_compat -- --ignored --nocapture make_old_outbox_fixture (in a worktree of that build: see tests/tests/wire_compat.rs)",
        "made_at_ms": imn_proto::now_ms(),
        "tarball": format!("{name}.tar.gz"),
        "tarball_bytes": size,
        "layout": {"agent": "the agent's --data directory", "backend": "the backend's --data directory (backend.sqlite)", "policy.toml": "the backend's --policy"},
        "agent_id": OLD_AGENT,
        "agent_flags": OLD_AGENT_FLAGS,
        "backend_flags": ["--policy", "policy.toml"],
        "outbox_epoch": epoch,
        "outbox_epoch_hex": format!("{epoch:016x}"),
        "outbox_dropped": dropped,
        "story": [
            "11 modules run once and 1 traced echo, stored and acked",
            "13 schedules every 5 s (every module, a crashing and a hanging faulty_module), stopping 150 s after they were made",
            "acks held back (--fault-injection): echo, ping, tcping and dns run once, stored but never acked",
            "4 long one-offs started (a traced 25 s ping, a 15 s tcping, a traced 12 s mtr, a 100 s ping); the bridge SIGKILLed once they ran",
            "30 s offline; the agent SIGKILLed and started again (still offline): the 100 s ping and any slot that was running are reported interrupted; 30 s more offline; the agent stopped with SIGTERM (graceful), then the backend with SIGINT (graceful)",
        ],
        "last_hello": {
            "schedule_version": hello.schedule_version,
            "schedule_policy": hello.schedule_policy,
            "modules": hello.modules.iter().map(|m| json!({"name": m.name, "config": m.config})).collect::<Vec<_>>(),
            "tags": hello.tags,
            "location": hello.location,
        },
        "backend": {
            "records_stored_for_agent": stored_seqs.len(),
            "results_stored_for_agent": stored_before.len(),
            "health": {"records_stored": health["records_stored"], "dead_letters": health["dead_letters"],
                "duplicates_dropped": health["duplicates_dropped"]},
            "measurements": measurements,
        },
        "outbox": {
            "records_waiting": pending.len(),
            "results_waiting": results_waiting,
            "already_stored": already,
            "by_kind": by_kind,
            "first_seq": pending.first().map(|r| r.seq),
            "last_seq": pending.last().map(|r| r.seq),
        },
        "waiting": waiting,
        "stored_before": stored_before,
    });
    std::fs::write(
        &manifest_path,
        serde_json::to_string_pretty(&manifest).unwrap() + "\n",
    )
    .unwrap();
    println!(
        "fixture {} ({size} bytes): epoch {epoch:016x}, {} records waiting ({by_kind:?}), {already} of them stored already, {} results stored before",
        tar_path.display(),
        pending.len(),
        stored_before.len()
    );
}

/// The old fixture, opened by this build: nothing lost, nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_outbox_drains_on_the_current_build() {
    let fixtures = repo_path("tests/fixtures");
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join(format!("{FIXTURE}.manifest.json")))
            .expect("the fixture's manifest"),
    )
    .expect("manifest JSON");
    let dir = TempDir::new("old-outbox-read");
    let root = dir.path().join("fixture");
    std::fs::create_dir_all(&root).unwrap();
    sh(&format!(
        "tar -C {} -xzf {}",
        root.display(),
        fixtures.join(format!("{FIXTURE}.tar.gz")).display()
    ));
    let agent_id = manifest["agent_id"].as_str().unwrap();
    let epoch = manifest["outbox_epoch"].as_u64().unwrap();
    let waiting = manifest["waiting"].as_array().unwrap();
    let waiting_seqs: BTreeSet<u64> = waiting.iter().map(|w| w["seq"].as_u64().unwrap()).collect();
    let unstored = waiting
        .iter()
        .filter(|w| w["already_stored"] == false)
        .count() as u64;
    let records_before = manifest["backend"]["records_stored_for_agent"]
        .as_u64()
        .unwrap();

    let mut stack = Stack::start(
        dir.path(),
        &root.join("backend"),
        &["--policy", root.join("policy.toml").to_str().unwrap()],
    )
    .await;
    let tap = MqttTap::start(stack.mqtt_port).await;
    let mut flags: Vec<&str> = manifest["agent_flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    // No name is resolved (no run is due); the closed port keeps the agent off the
    // system's name server all the same.
    let nameserver = format!("127.0.0.1:{}", closed_port());
    flags.extend(["--nameservers", &nameserver]);
    let agent = spawn_agent(
        &bin("imn-agent"),
        agent_id,
        &stack.broker(),
        &root.join("agent"),
        &flags,
        dir.path(),
    );
    let api = stack.api.clone();
    api.wait_alive(&[agent_id], T).await;

    // What the agent sent: records of the old epoch by seq, and new ones.
    let sent = |tap: &MqttTap| {
        let mut old = BTreeSet::new();
        let mut new = BTreeMap::new();
        for t in tap.messages() {
            if !t.topic.ends_with("/out") {
                continue;
            }
            let env = wire::decode(&t.payload)
                .unwrap_or_else(|e| panic!("the agent sent a batch this build cannot read: {e}"));
            let Envelope::Batch(b) = env else { continue };
            for r in b.records {
                if b.epoch == epoch && waiting_seqs.contains(&r.seq) {
                    old.insert(r.seq);
                } else {
                    let kind = describe(&r)["kind"].as_str().unwrap().to_string();
                    new.insert((b.epoch, r.seq), kind);
                }
            }
        }
        (old, new)
    };
    let path = format!("/agents/{agent_id}");
    let n_waiting = waiting_seqs.len();
    let api2 = api.clone();
    let drained = wait_for("the old outbox to drain", T, || {
        let api = api2.clone();
        let path = path.clone();
        let (old, new) = sent(&tap);
        async move {
            let a = api.try_get(&path).await?.body;
            let stored = a["records_stored"].as_u64()?;
            let want = records_before + unstored + new.len() as u64;
            (a["outbox"]["depth"] == 0 && old.len() == n_waiting && stored == want).then_some((
                a,
                old.len(),
                new,
                stored,
            ))
        }
    })
    .await;
    let (agent_view, old_sent, new, records_after) = drained;
    let mut new_kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for k in new.values() {
        *new_kinds.entry(k.as_str()).or_default() += 1;
    }

    // The same outbox: its epoch, nothing evicted, no report of a lost or corrupt store.
    assert_eq!(
        agent_view["outbox"]["epoch"].as_u64(),
        Some(epoch),
        "{agent_view}"
    );
    assert_eq!(
        agent_view["outbox"]["dropped"].as_u64(),
        manifest["outbox_dropped"].as_u64(),
        "records dropped on opening the old outbox: {agent_view}"
    );
    let events = api
        .get(&format!("/agents/{agent_id}/events?limit=10000"))
        .await
        .body;
    let events = events.as_array().unwrap();
    let bad: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "outbox_corrupt" || e["kind"] == "outbox_lost")
        .collect();
    assert!(bad.is_empty(), "the old outbox was not opened: {bad:?}");
    // Its schedule set and modules read back: the first hello says what the old one did.
    let first_hello = tap
        .messages()
        .iter()
        .find_map(|t| match wire::decode(&t.payload) {
            Ok(Envelope::Hello(h)) => Some(h),
            _ => None,
        })
        .expect("a hello");
    let old = &manifest["last_hello"];
    assert_eq!(
        first_hello.schedule_version,
        old["schedule_version"].as_u64().unwrap(),
        "the stored schedule set was not read"
    );
    assert_eq!(
        first_hello.schedule_policy,
        old["schedule_policy"].as_u64().unwrap(),
        "the stored schedule policy was not read"
    );
    let modules: Vec<Value> = first_hello
        .modules
        .iter()
        .map(|m| json!({"name": m.name, "config": m.config}))
        .collect();
    assert_eq!(
        json!(modules),
        old["modules"],
        "the stored module set was not read"
    );
    // Every event that waited arrived.
    for w in waiting.iter().filter(|w| w["kind"] == "event") {
        assert!(
            events
                .iter()
                .any(|e| e["kind"] == w["event"] && e["message"] == w["message"]),
            "event {w} was not stored"
        );
    }

    // Every result exactly once: those stored before, and those that waited.
    let results = api
        .get(&format!("/agents/{agent_id}/results?limit=100000"))
        .await
        .body;
    let mut by_request: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for r in results.as_array().unwrap() {
        by_request
            .entry(r["request_id"].as_str().unwrap().to_string())
            .or_default()
            .push(r);
    }
    let mut lost = Vec::new();
    let mut twice = Vec::new();
    let mut checked = 0;
    let expected = waiting
        .iter()
        .filter(|w| w["kind"].as_str().unwrap().ends_with("result"))
        .map(|w| {
            (
                w["request_id"].clone(),
                w["module"].clone(),
                json!(epoch),
                w["seq"].clone(),
            )
        })
        .chain(
            manifest["stored_before"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    (
                        s["request_id"].clone(),
                        s["module"].clone(),
                        s["epoch"].clone(),
                        s["seq"].clone(),
                    )
                }),
        );
    for (rid, module, ep, seq) in expected {
        checked += 1;
        let rid = rid.as_str().unwrap();
        match by_request.get(rid).map(Vec::as_slice) {
            None | Some([]) => lost.push(rid.to_string()),
            Some([r]) => {
                assert_eq!(r["module"], module, "{r}");
                assert_eq!(
                    (&r["record"]["epoch"], &r["record"]["seq"]),
                    (&ep, &seq),
                    "{r}"
                );
            }
            Some(_) => twice.push(rid.to_string()),
        }
    }
    let health = api.get("/health").await.body;
    let dead = api
        .get(&format!("/admin/dead-letters?agent={agent_id}"))
        .await;
    println!(
        "old outbox {FIXTURE}: {} records waited ({} results, {} already stored), {old_sent} sent again, {} new {new_kinds:?}; {checked} results checked, {} lost, {} twice; records stored {records_before} -> {records_after}; duplicates dropped {}, dead letters {}, undecodable {}",
        waiting.len(),
        manifest["outbox"]["results_waiting"],
        waiting.len() as u64 - unstored,
        new.len(),
        lost.len(),
        twice.len(),
        health["duplicates_dropped"],
        health["dead_letters"],
        health["undecodable_messages"],
    );
    assert!(lost.is_empty(), "results lost: {lost:?}");
    assert!(twice.is_empty(), "results stored twice: {twice:?}");
    assert_eq!(health["dead_letters"], 0, "{health}");
    assert_eq!(health["undecodable_messages"], 0, "{health}");
    assert_eq!(health["store_errors"], 0, "{health}");
    if dead.status == 200 {
        assert_eq!(
            dead.body.as_array().map(Vec::len),
            Some(0),
            "{:?}",
            dead.body
        );
    }
    drop(agent);
    stack.kill_bridge();
}
