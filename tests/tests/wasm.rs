//! Issue 29: WebAssembly modules end to end. Real processes: `imn up` (backend and
//! broker), `imn-agent` processes connected through TCP proxies the test can cut, the
//! `imn` CLI for keys, signing and adding, and real peers on loopback (a STUN
//! responder and an SMTP greeting in this test, dnsmasq over TCP).
//!
//! 1. Each example module (`modules/wasm/examples`) is signed, added, loaded on two
//!    agents, run one-off, and run as a schedule that keeps running while one agent is
//!    cut off; every slot arrives exactly once.
//! 2. Hostile modules (`modules/wasm/hostile`), each a real `.wasm`, are stopped with
//!    the limit named, and packages with a bad signature are refused by the backend
//!    and by the agent; meanwhile the agent's heartbeats and a built-in schedule keep
//!    their timing.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use imn_tests::peers::Dnsmasq;
use imn_tests::proxy::TcpProxy;
use imn_tests::wasm::{example_manifest, examples, hostile, keygen, manifest, sign, sign_code};
use imn_tests::{all_results, bin, ms_of, spawn_agent, wait_for, Api, Proc, TempDir, Up};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

/// A STUN server (RFC 5389 binding responses with XOR-MAPPED-ADDRESS and SOFTWARE) on
/// loopback: its port and the source addresses it answered.
fn stun_responder() -> (u16, Arc<Mutex<Vec<SocketAddr>>>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if n < 20 || buf[0..2] != [0, 1] || buf[4..8] != [0x21, 0x12, 0xa4, 0x42] {
                continue;
            }
            seen2.lock().unwrap().push(from);
            let SocketAddr::V4(v4) = from else { continue };
            let mut attrs = Vec::new();
            // XOR-MAPPED-ADDRESS: family 1, port ^ 0x2112, address ^ the cookie.
            attrs.extend_from_slice(&[0x00, 0x20, 0x00, 0x08, 0x00, 0x01]);
            attrs.extend_from_slice(&(v4.port() ^ 0x2112).to_be_bytes());
            let ip = u32::from(*v4.ip()) ^ 0x2112_a442;
            attrs.extend_from_slice(&ip.to_be_bytes());
            let software = b"imn-test-stun";
            attrs.extend_from_slice(&[0x80, 0x22]);
            attrs.extend_from_slice(&(software.len() as u16).to_be_bytes());
            attrs.extend_from_slice(software);
            while attrs.len() % 4 != 0 {
                attrs.push(0);
            }
            let mut resp = vec![0x01, 0x01];
            resp.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
            resp.extend_from_slice(&buf[4..20]);
            resp.extend_from_slice(&attrs);
            let _ = sock.send_to(&resp, from);
        }
    });
    (port, seen)
}

const GREETING: &str = "220 mail.imn.test ESMTP imn-test";

/// An SMTP server's greeting on loopback: its port and how many connections it took.
fn smtp_greeter() -> (u16, Arc<Mutex<u32>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let n = Arc::new(Mutex::new(0));
    let n2 = n.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            *n2.lock().unwrap() += 1;
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let _ = s.write_all(format!("{GREETING}\r\n").as_bytes());
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut b = [0u8; 64];
                let _ = s.read(&mut b);
            });
        }
    });
    (port, n)
}

/// `imn up` with no local agents, trusting `keys` for releases and modules.
async fn up(keys: &str, extra: &[&str]) -> Up {
    let mut args = vec!["--release-keys", keys];
    args.extend_from_slice(extra);
    Up::start(0, &args).await
}

/// An agent process reaching the broker through a proxy the test can cut.
fn agent(up: &Up, id: &str, proxy: &TcpProxy, module_keys: &str) -> Proc {
    spawn_agent(
        &bin("imn-agent"),
        id,
        &proxy.url(),
        &up.dir.path().join(id),
        &[
            "--heartbeat-ms",
            "500",
            "--resend-timeout-ms",
            "2000",
            "--keepalive-s",
            "5",
            "--module-keys",
            module_keys,
        ],
        up.dir.path(),
    )
}

/// Loads `module` on `agents` and waits until each hello names it.
async fn load(api: &Api, agents: &[&str], module: &str) {
    for a in agents {
        let r = api
            .put_json(&format!("/agents/{a}/modules/{module}"), &json!({}))
            .await;
        assert_eq!(r.status, 202, "load {module} on {a}: {}", r.body);
    }
    wait_loaded(api, agents, module).await;
}

/// Waits until each of `agents` names `module` in its hello.
async fn wait_loaded(api: &Api, agents: &[&str], module: &str) {
    for a in agents {
        let (api, a2, m) = (api.clone(), a.to_string(), module.to_string());
        wait_for(&format!("{a} to load {module}"), T, || {
            let (api, a2, m) = (api.clone(), a2.clone(), m.clone());
            async move {
                let v = api.get(&format!("/agents/{a2}")).await.body;
                v["modules"]
                    .as_array()?
                    .iter()
                    .any(|x| x["name"] == json!(m))
                    .then_some(())
            }
        })
        .await;
    }
}

async fn run(api: &Api, agent: &str, module: &str, params: Value) -> Value {
    let r = api
        .post(
            &format!("/agent/{agent}/{module}?wait=30"),
            &params.to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{module} on {agent} {params}: {}", r.body);
    r.body
}

/// A measurement of `module` every `interval_s` on `agents`; its id.
async fn every(api: &Api, module: &str, params: Value, agents: &[&str], interval_s: f64) -> String {
    let r = api
        .post(
            "/v1/measurements",
            &json!({"module": module, "params": params, "agents": {"ids": agents},
                "schedule": {"interval_s": interval_s}})
            .to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 202, "{module}: {}", r.body);
    r.body["id"].as_str().unwrap().to_string()
}

/// Every slot of `agent` from its first to its last arrived exactly once; the slots.
fn slots_once(results: &[Value], agent: &str, interval_ms: i64, what: &str) -> Vec<i64> {
    let mut slots: Vec<i64> = results
        .iter()
        .filter(|r| r["agent_id"] == json!(agent))
        .map(|r| ms_of(&r["scheduled_at"]))
        .collect();
    slots.sort_unstable();
    let n = slots.len();
    slots.dedup();
    assert_eq!(slots.len(), n, "{what} {agent}: a slot arrived twice");
    assert!(n >= 2, "{what} {agent}: {n} results");
    for w in slots.windows(2) {
        assert_eq!(
            w[1] - w[0],
            interval_ms,
            "{what} {agent}: slots missing between {} and {}",
            w[0],
            w[1]
        );
    }
    slots
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_modules_run_one_off_and_through_a_partition_exactly_once() {
    let keys = TempDir::new("wasm-keys");
    let (key, public) = keygen(keys.path(), "modules.key");
    let out = examples();
    let up = up(&public, &[]).await;
    let api = up.api.clone();
    let proxies = [
        TcpProxy::start(up.mqtt_port).await,
        TcpProxy::start(up.mqtt_port).await,
    ];
    let agents = ["wasm-a", "wasm-b"];
    let _procs: Vec<Proc> = agents
        .iter()
        .zip(&proxies)
        .map(|(id, p)| agent(&up, id, p, &public))
        .collect();
    api.wait_alive(&agents, T).await;
    for a in agents {
        let v = api.get(&format!("/agents/{a}")).await.body;
        assert!(
            v["features"].as_array().unwrap().contains(&json!("wasm")),
            "{a} says it runs WebAssembly: {v}"
        );
    }

    // Signed with `imn modules sign`; added with `imn modules add` (stun) and the API.
    for name in ["stun", "tcp_banner", "dns_tcp"] {
        let package = sign(
            &out.join(format!("{name}.wasm")),
            &example_manifest(name),
            &key,
            &keys.path().join(format!("{name}.imnmod")),
        );
        if name == "stun" {
            let r = std::process::Command::new(bin("imn"))
                .args(["modules", "add"])
                .arg(keys.path().join("stun.imnmod"))
                .args(["--url", &format!("http://127.0.0.1:{}", up.http_port)])
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&r.stdout);
            assert!(
                r.status.success(),
                "{said} {}",
                String::from_utf8_lossy(&r.stderr)
            );
            assert!(said.starts_with("added: stun 1."), "{said}");
        } else if name == "tcp_banner" {
            // Sent to every agent that can run it, now and at each hello.
            let r = api
                .post_bytes("/admin/modules?load_on_hello=true", package)
                .await;
            assert_eq!(r.status, 201, "{name}: {}", r.body);
            assert_eq!(r.body["module"]["load_on_hello"], true, "{}", r.body);
        } else {
            let r = api.post_bytes("/admin/modules", package).await;
            assert_eq!(r.status, 201, "{name}: {}", r.body);
            assert_eq!(r.body["module"]["kind"], "wasm", "{}", r.body);
        }
    }
    let listed = api.get("/modules").await.body;
    for name in ["stun", "tcp_banner", "dns_tcp"] {
        let m = listed
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == json!(name))
            .unwrap_or_else(|| panic!("{name} in /modules: {listed}"));
        assert_eq!(m["kind"], "wasm");
        assert!(m["schema"]["properties"].is_object(), "{m}");
        if name == "tcp_banner" {
            wait_loaded(&api, &agents, name).await;
        } else {
            load(&api, &agents, name).await;
        }
    }

    // Parameters are checked against the module's own schema, the field named.
    let r = api
        .post(
            "/agent/wasm-a/stun?wait=10",
            &json!({"port": 3478}).to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.body["field"], "/server", "{}", r.body);
    let r = api
        .post(
            "/agent/wasm-a/tcp_banner?wait=10",
            &json!({"host": "127.0.0.1", "port": 70000}).to_string(),
            &[],
        )
        .await;
    assert_eq!(
        (r.status, r.body["field"].clone()),
        (422, json!("/port")),
        "{}",
        r.body
    );

    // One-off runs against real peers.
    let (stun_port, stun_seen) = stun_responder();
    let (smtp_port, smtp_conns) = smtp_greeter();
    let dns = Dnsmasq::start(&["--host-record=svc.imn.test,192.0.2.44"]);
    let stun_params = json!({"server": "127.0.0.1", "port": stun_port, "timeout_ms": 1000});
    let banner_params = json!({"host": "127.0.0.1", "port": smtp_port});
    let dns_params =
        json!({"server": "127.0.0.1", "port": dns.port, "name": "svc.imn.test", "type": "A"});
    for a in agents {
        let b = run(&api, a, "stun", stun_params.clone()).await;
        assert_eq!(b["state"], "succeeded", "{b}");
        let r = &b["result"];
        assert_eq!(r["mapped_address"], "127.0.0.1", "{r}");
        assert_eq!(r["software"], "imn-test-stun", "{r}");
        let port = r["mapped_port"].as_u64().unwrap() as u16;
        assert!(
            stun_seen.lock().unwrap().iter().any(|s| s.port() == port),
            "the mapped port {port} is one the responder saw"
        );
        assert!(r["rtt_ms"].as_f64().unwrap() >= 0.0, "{r}");

        let b = run(&api, a, "tcp_banner", banner_params.clone()).await;
        assert_eq!(b["state"], "succeeded", "{b}");
        let r = &b["result"];
        assert_eq!(r["banner"], GREETING, "{r}");
        assert_eq!(r["protocol"], "smtp", "{r}");
        // Stored with a one-line summary made of its own fields.
        let rid = b["request_id"].as_str().unwrap();
        let stored = api.get(&format!("/agents/{a}/results/{rid}")).await.body;
        assert!(
            stored["summary"]
                .as_str()
                .is_some_and(|s| s.contains("protocol=smtp") && s.contains(GREETING)),
            "{stored}"
        );
        assert!(r["connect_ms"].as_f64().unwrap() >= 0.0, "{r}");

        let b = run(&api, a, "dns_tcp", dns_params.clone()).await;
        assert_eq!(b["state"], "succeeded", "{b}");
        let r = &b["result"];
        assert_eq!(r["rcode"], "NOERROR", "{r}");
        assert_eq!(r["answers"], json!(["192.0.2.44"]), "{r}");
    }
    assert!(*smtp_conns.lock().unwrap() >= 2);
    // An agent that connects later gets tcp_banner at its hello, and runs it.
    let late_proxy = TcpProxy::start(up.mqtt_port).await;
    let _late = agent(&up, "wasm-late", &late_proxy, &public);
    api.wait_alive(&["wasm-late"], T).await;
    wait_loaded(&api, &["wasm-late"], "tcp_banner").await;
    let b = run(&api, "wasm-late", "tcp_banner", banner_params.clone()).await;
    assert_eq!(b["result"]["banner"], GREETING, "{b}");

    // Schedules, with wasm-b cut off for 12 s in the middle.
    const INTERVAL_MS: i64 = 2000;
    let ids = [
        ("stun", every(&api, "stun", stun_params, &agents, 2.0).await),
        (
            "tcp_banner",
            every(&api, "tcp_banner", banner_params, &agents, 2.0).await,
        ),
        (
            "dns_tcp",
            every(&api, "dns_tcp", dns_params, &agents, 2.0).await,
        ),
    ];
    tokio::time::sleep(Duration::from_secs(5)).await;
    proxies[1].set_down(true);
    let down_at = imn_proto::now_ms();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let up_at = imn_proto::now_ms();
    proxies[1].set_down(false);
    api.wait_alive(&["wasm-b"], T).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    for (_, id) in &ids {
        let r = api.delete(&format!("/v1/measurements/{id}")).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // What ran before the stop still arrives.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut epochs = BTreeSet::new();
    for (module, id) in &ids {
        let results = all_results(&api, id).await;
        for a in agents {
            let slots = slots_once(&results, a, INTERVAL_MS, module);
            eprintln!("{module} on {a}: {} slots, each once", slots.len());
        }
        for r in &results {
            assert_eq!(r["state"], "succeeded", "{r}");
            assert_eq!(r["module"], json!(module), "{r}");
            if let Some(e) = r["record"]["epoch"].as_u64() {
                epochs.insert(e);
            }
        }
        // wasm-b ran through the partition; those runs were stored after it.
        let during: Vec<&Value> = results
            .iter()
            .filter(|r| {
                let t = ms_of(&r["started_at"]);
                r["agent_id"] == "wasm-b" && t > down_at + 500 && t < up_at - 500
            })
            .collect();
        assert!(
            during.len() >= 4,
            "{module}: {} runs during the partition",
            during.len()
        );
        for r in &during {
            assert!(
                ms_of(&r["stored_at"]) >= up_at,
                "{module}: stored during the partition: {r}"
            );
        }
        eprintln!(
            "{module}: wasm-b ran {} times while cut off, all stored after",
            during.len()
        );
    }
}

/// Submits a run without waiting; its request id.
async fn submit(api: &Api, agent: &str, module: &str, params: Value) -> String {
    let r = api
        .post(
            &format!("/agent/{agent}/{module}"),
            &params.to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 202, "{module}: {}", r.body);
    r.body["request_id"]
        .as_str()
        .or(r.body["id"].as_str())
        .unwrap_or_else(|| panic!("a request id: {}", r.body))
        .to_string()
}

/// The request's final answer (state, error, result).
async fn outcome(api: &Api, agent: &str, id: &str) -> Value {
    let (api, path) = (api.clone(), format!("/agents/{agent}/results/{id}"));
    wait_for(&format!("the result of {id}"), T, || {
        let (api, path) = (api.clone(), path.clone());
        async move {
            let r = api.try_get(&path).await?;
            (r.status == 200 && r.body["state"].is_string()).then_some(r.body)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_modules_are_stopped_by_name_and_the_agent_keeps_its_timing() {
    let keys = TempDir::new("wasm-hostile-keys");
    let (key, trusted) = keygen(keys.path(), "trusted.key");
    let (other_key, other) = keygen(keys.path(), "other.key");
    let policy = keys.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nname = \"lab\"\nallow = [\"127.0.0.0/8\"]\ndeny = [\"127.0.0.9/32\"]\n",
    )
    .unwrap();
    // The backend trusts both keys; the agent only the first.
    let up = up(
        &format!("{trusted},{other}"),
        &["--policy", policy.to_str().unwrap()],
    )
    .await;
    let api = up.api.clone();
    let proxy = TcpProxy::start(up.mqtt_port).await;
    let mut guard = spawn_agent(
        &bin("imn-agent"),
        "guard-1",
        &proxy.url(),
        &up.dir.path().join("guard-1"),
        &[
            "--heartbeat-ms",
            "500",
            "--module-keys",
            &trusted,
            // Room for every attack at once beside the canary: a queued canary would
            // measure the queue, not the sandbox.
            "--max-runs",
            "16",
        ],
        up.dir.path(),
    );
    api.wait_alive(&["guard-1"], T).await;

    // The attacks, each a real .wasm from its text, signed and added as an operator
    // would: (module, code, limits, timeout).
    let attacks: Vec<(&str, &str, Value, u64)> = vec![
        ("h_loop", "loop", json!({"fuel": 20_000_000}), 20_000),
        // Two of these keep both of this machine's cores interpreting for 8 s.
        ("h_spin", "loop", json!({"fuel": 5_000_000_000u64}), 8_000),
        ("h_alloc", "alloc", json!({}), 10_000),
        ("h_denied", "denied", json!({}), 10_000),
        ("h_flood", "flood", json!({}), 10_000),
        ("h_trap", "trap", json!({}), 10_000),
    ];
    for (name, code, limits, timeout) in &attacks {
        let package = sign_code(
            keys.path(),
            &hostile(code),
            &manifest(name, *timeout, limits.clone()),
            &key,
        );
        let r = api.post_bytes("/admin/modules", package).await;
        assert_eq!(r.status, 201, "{name}: {}", r.body);
        load(&api, &["guard-1"], name).await;
    }

    // Wrong signatures. The backend refuses a package altered after signing, naming
    // what does not match.
    let good = sign_code(
        keys.path(),
        &hostile("trap"),
        &manifest("h_forged", 10_000, json!({})),
        &key,
    );
    let text = String::from_utf8_lossy(&good).into_owned();
    let forged = text
        .replacen("\"sockets\":4", "\"sockets\":16", 1)
        .into_bytes();
    assert_ne!(forged, good);
    let r = api.post_bytes("/admin/modules", forged).await;
    assert_eq!(
        (r.status, r.body["field"].clone()),
        (422, json!("package")),
        "{}",
        r.body
    );
    assert!(
        r.body["message"].as_str().unwrap().contains("signature"),
        "{}",
        r.body
    );
    let mut swapped = good.clone();
    let last = swapped.len() - 1;
    swapped[last] ^= 0x55;
    let r = api.post_bytes("/admin/modules", swapped).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(
        r.body["message"].as_str().unwrap().contains("sha256"),
        "{}",
        r.body
    );
    // Signed by a key the backend trusts and the agent does not: the agent refuses it.
    let package = sign_code(
        keys.path(),
        &hostile("trap"),
        &manifest("h_other", 10_000, json!({})),
        &other_key,
    );
    let r = api.post_bytes("/admin/modules", package).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = api
        .put_json("/agents/guard-1/modules/h_other", &json!({}))
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let refusal = wait_for("guard-1 to refuse h_other", T, || {
        let api = api.clone();
        async move {
            let ev = api.get("/agents/guard-1/events?limit=100").await.body;
            ev.as_array()?
                .iter()
                .find(|e| e["kind"] == "module_command_refused")
                .cloned()
        }
    })
    .await;
    assert!(
        refusal["message"]
            .as_str()
            .unwrap()
            .contains("not trusted here"),
        "{refusal}"
    );
    let r = api.post("/agent/guard-1/h_other?wait=5", "{}", &[]).await;
    assert_eq!(
        (r.status, r.body["error"].clone()),
        (409, json!("module_not_loaded")),
        "{}",
        r.body
    );

    // A canary: a built-in ping every second, before, during and after the attacks.
    let canary = every(
        &api,
        "ping_module",
        json!({"host": "127.0.0.1", "count": 1}),
        &["guard-1"],
        1.0,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let attack_from = imn_proto::now_ms();
    let mut ids = Vec::new();
    for (name, ..) in &attacks {
        ids.push((*name, submit(&api, "guard-1", name, json!({})).await));
    }
    ids.push(("h_spin", submit(&api, "guard-1", "h_spin", json!({})).await));
    let mut outcomes = Vec::new();
    for (name, id) in &ids {
        outcomes.push((*name, outcome(&api, "guard-1", id).await));
    }
    let attack_to = imn_proto::now_ms();
    // Each stopped, with what stopped it named.
    let expect = [
        ("h_loop", "failed", "limit fuel:"),
        ("h_alloc", "failed", "limit memory_pages:"),
        ("h_denied", "failed", "policy_denied: lab.deny"),
        ("h_flood", "failed", "limit bytes_sent:"),
        ("h_trap", "failed", "trap: "),
    ];
    for (name, o) in &outcomes {
        eprintln!(
            "{name}: {} after {} ms: {}",
            o["state"],
            ms_of(&o["finished_at"]) - ms_of(&o["started_at"]),
            o["error"]
        );
        if *name == "h_spin" {
            // Past its 8 s deadline: cut off by the agent as any module is (`timeout`)
            // or by the sandbox at its next slice of fuel (`limit deadline`).
            let ok = o["state"] == "timeout"
                || o["error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("limit deadline:"));
            assert!(ok, "{o}");
            assert!(
                ms_of(&o["finished_at"]) - ms_of(&o["started_at"]) < 10_000,
                "{o}"
            );
            continue;
        }
        let (_, state, why) = expect.iter().find(|(n, ..)| n == name).unwrap();
        assert_eq!(o["state"], json!(state), "{name}: {o}");
        assert!(
            o["error"].as_str().unwrap_or_default().contains(why),
            "{name}: {o}"
        );
    }
    let trap = &outcomes.iter().find(|(n, _)| *n == "h_trap").unwrap().1;
    assert!(
        trap["error"]
            .as_str()
            .unwrap()
            .contains("last log: before trap"),
        "{trap}"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let r = api.delete(&format!("/v1/measurements/{canary}")).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // The canary and the heartbeats kept their timing through the attacks.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let runs = all_results(&api, &canary).await;
    let late = |r: &Value| ms_of(&r["started_at"]) - ms_of(&r["scheduled_at"]);
    let during: Vec<i64> = runs
        .iter()
        .filter(|r| (attack_from..=attack_to).contains(&ms_of(&r["scheduled_at"])))
        .map(late)
        .collect();
    let before: Vec<i64> = runs
        .iter()
        .filter(|r| ms_of(&r["scheduled_at"]) < attack_from)
        .map(late)
        .collect();
    assert!(runs.iter().all(|r| r["state"] == "succeeded"), "{runs:?}");
    assert!(!during.is_empty(), "no canary run during the attacks");
    let slots = slots_once(&runs, "guard-1", 1000, "canary");
    let hb: Vec<i64> = api
        .get("/agents/guard-1/heartbeats")
        .await
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["at_ms"].as_i64().unwrap())
        .collect();
    let gaps = |from: i64, to: i64| -> Vec<i64> {
        hb.windows(2)
            .filter(|w| w[1] >= from && w[0] <= to)
            .map(|w| w[1] - w[0])
            .collect()
    };
    let hb_during = gaps(attack_from, attack_to);
    let hb_before = gaps(0, attack_from);
    eprintln!(
        "attacks {} ms; canary: {} slots, late before max {} ms, during {} runs max {} ms; heartbeat gaps before max {} ms, during {} gaps max {} ms",
        attack_to - attack_from,
        slots.len(),
        before.iter().max().unwrap_or(&0),
        during.len(),
        during.iter().max().unwrap_or(&0),
        hb_before.iter().max().unwrap_or(&0),
        hb_during.len(),
        hb_during.iter().max().unwrap_or(&0),
    );
    // Every second slot ran, within a second of its time (the schedule's jitter is
    // none), and no heartbeat came more than a second and a half late.
    assert!(during.iter().all(|&l| (0..1000).contains(&l)), "{during:?}");
    assert!(
        !hb_during.is_empty() && hb_during.iter().all(|&g| g < 1500),
        "{hb_during:?}"
    );
    // The agent is the same process throughout, and still answers.
    assert!(
        guard.wait_exit(Duration::from_millis(10)).is_none(),
        "the agent exited"
    );
    let b = run(
        &api,
        "guard-1",
        "ping_module",
        json!({"host": "127.0.0.1", "count": 1}),
    )
    .await;
    assert_eq!(b["state"], "succeeded", "{b}");
}
