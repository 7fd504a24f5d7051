//! The edge agent does not trust what reaches it (issue 23): with the real `imn-agent`
//! binary against `imn up`, the test plays the backend and publishes commands straight
//! to the agent's command topic (without `--auth` the embedded broker has no ACL and
//! nothing is signed), then reads what the agent did through the backend's API.
//!
//! - a fresh run works, and the same command id is not run twice;
//! - control commands with no issue time, or an hour old, or repeated, are refused with
//!   a `command_refused` event;
//! - `--max-runs 2`: 20 one-second runs sent at once never run more than two at a time,
//!   and all finish;
//! - schedules with interval 0 or jitter `u64::MAX` (which used to hang or panic the
//!   agent) are refused with events, the rest of the set applies, and the agent keeps
//!   serving;
//! - a run's policy reaches the module: tcping to a denied 127.0.0.1 fails with
//!   `policy_denied`;
//! - the token is read from a file, never shown by `--print-config` or in the process's
//!   arguments, and the data directory is the agent's alone.

use std::path::Path;
use std::time::Duration;

use imn_proto::now_ms;
use imn_proto::policy::{Cidr, Rule, TargetPolicy};
use imn_proto::wire::{self, Command, CommandKind, Envelope, Kind, Schedule};
use imn_tests::{bin, ms_of, spawn_agent, wait_for, Api, Proc, TempDir, Up};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(30);

/// `imn up` with no agents of its own, one `imn-agent`, and an MQTT client that
/// speaks for the backend.
struct Bench {
    up: Up,
    agent: Proc,
    id: String,
    backend: AsyncClient,
    /// What the test's client receives (the agent's hellos, once subscribed).
    received: mpsc::UnboundedReceiver<Vec<u8>>,
}

impl Bench {
    async fn start(id: &str, extra: &[&str]) -> Bench {
        let up = Up::start(0, &[]).await;
        let agent = agent_proc(&up, id, extra);
        up.api.wait_alive(&[id], T).await;
        let (backend, received) = mqtt_client(up.mqtt_port, &format!("guard-backend-{id}")).await;
        backend
            .subscribe(wire::topic(id, Kind::Hello), QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        // rumqttc gives no handle to the SubAck; give the router a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Bench {
            up,
            agent,
            id: id.to_string(),
            backend,
            received,
        }
    }

    /// Starts the agent again (same id and data directory).
    fn spawn_agent(&self, extra: &[&str]) -> Proc {
        agent_proc(&self.up, &self.id, extra)
    }

    /// The agent's next hello.
    async fn hello(&mut self) -> wire::Hello {
        loop {
            let bytes = tokio::time::timeout(T, self.received.recv())
                .await
                .expect("a hello within 30 s")
                .expect("client running");
            if let Ok(Envelope::Hello(h)) = wire::decode(&bytes) {
                return h;
            }
        }
    }

    fn api(&self) -> &Api {
        &self.up.api
    }

    /// Publishes a command on the agent's command topic, as the backend would.
    async fn send(&self, cmd: Command) {
        let payload = wire::encode(&Envelope::Command(cmd));
        self.backend
            .publish(
                wire::topic(&self.id, Kind::Cmd),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .expect("publish a command");
    }

    async fn results(&self) -> Vec<Value> {
        let r = self
            .api()
            .get(&format!("/agents/{}/results?limit=10000", self.id))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.body.as_array().cloned().unwrap_or_default()
    }

    async fn results_of(&self, request_id: &str) -> Vec<Value> {
        self.results()
            .await
            .into_iter()
            .filter(|r| r["request_id"] == request_id)
            .collect()
    }

    /// Waits for a result that `f` accepts.
    async fn result_where(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, T, || async {
            self.results().await.into_iter().find(|r| f(r))
        })
        .await
    }

    /// Waits for the result of a request and returns it.
    async fn result(&self, request_id: &str) -> Value {
        let what = format!("the result of {request_id}");
        wait_for(&what, T, || async {
            self.results_of(request_id).await.into_iter().next()
        })
        .await
    }

    async fn events(&self) -> Vec<Value> {
        let r = self
            .api()
            .get(&format!("/agents/{}/events?limit=10000", self.id))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.body.as_array().cloned().unwrap_or_default()
    }

    /// Waits for an event of `kind` whose message contains `text`.
    async fn event(&self, kind: &str, text: &str) -> Value {
        let what = format!("a {kind} event with {text:?}");
        wait_for(&what, T, || async {
            self.events()
                .await
                .into_iter()
                .find(|e| e["kind"] == kind && e["message"].as_str().unwrap_or("").contains(text))
        })
        .await
    }

    /// A run of echo_module that must succeed: the agent still serves.
    async fn echo_works(&self, id: &str) {
        self.send(run(id, "echo_module", json!({"message": id}), now_ms()))
            .await;
        let r = self.result(id).await;
        assert_eq!(r["state"], "succeeded", "{r}");
        assert_eq!(r["result"]["message"], id, "{r}");
    }
}

/// An `imn-agent` for `up`, its data in `up`'s directory.
fn agent_proc(up: &Up, id: &str, extra: &[&str]) -> Proc {
    let mut flags = vec!["--heartbeat-ms", "500", "--resend-timeout-ms", "2000"];
    flags.extend_from_slice(extra);
    spawn_agent(
        &bin("imn-agent"),
        id,
        &up.broker_url(),
        &up.dir.path().join(id),
        &flags,
        up.dir.path(),
    )
}

/// A connected MQTT client, and the payloads it receives.
async fn mqtt_client(port: u16, id: &str) -> (AsyncClient, mpsc::UnboundedReceiver<Vec<u8>>) {
    let mut mo = MqttOptions::new(id, "127.0.0.1", port);
    mo.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(4 << 20, 4 << 20);
    let (c, mut el) = AsyncClient::new(mo, 256);
    let (ready_tx, mut ready) = mpsc::unbounded_channel();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = ready_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(p.payload.to_vec());
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(T, ready.recv())
        .await
        .expect("the test's MQTT client connects");
    (c, rx)
}

fn command(id: &str, kind: CommandKind, issued_ms: i64) -> Command {
    Command {
        id: id.into(),
        kind,
        traceparent: None,
        deadline_ms: None,
        issued_ms,
        policy: None,
    }
}

fn run(id: &str, module: &str, params: Value, issued_ms: i64) -> Command {
    command(
        id,
        CommandKind::Run {
            module: module.into(),
            params_json: params.to_string(),
            timeout_ms: 5_000,
        },
        issued_ms,
    )
}

fn schedule(measurement: &str, interval_ms: u64, jitter_ms: u64) -> Schedule {
    Schedule {
        measurement_id: measurement.into(),
        module: "echo_module".into(),
        params_json: json!({"message": measurement}).to_string(),
        timeout_ms: 1_000,
        interval_ms,
        start_ms: now_ms() - 60_000,
        stop_ms: None,
        jitter_ms,
    }
}

/// (a) a fresh run works; (b) the same command id again is not run twice; (c) control
/// commands with no issue time, an hour old, or repeated, are refused with events,
/// while a fresh one is applied; after a restart the agent still knows both ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_commands_run_once_and_stale_or_repeated_ones_are_refused() {
    let mut b = Bench::start("guard-fresh", &[]).await;

    // (a)
    let cmd = run(
        "run-1",
        "echo_module",
        json!({"message": "fresh"}),
        now_ms(),
    );
    b.send(cmd.clone()).await;
    let r = b.result("run-1").await;
    assert_eq!(r["state"], "succeeded", "{r}");
    assert_eq!(r["result"]["message"], "fresh", "{r}");

    // (b) The same command again, as sent, and with a new issue time: the agent's
    // command log knows the id. A run sent after them has its result stored once
    // they were handled (one connection, in order).
    b.send(cmd.clone()).await;
    b.send(Command {
        issued_ms: now_ms(),
        ..cmd.clone()
    })
    .await;
    b.echo_works("marker-1").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(b.results_of("run-1").await.len(), 1, "run-1 ran twice");

    // (c) A fresh control command is applied...
    let unload = CommandKind::Unload {
        module: "tcping".into(),
    };
    b.send(command("ctl-fresh", unload.clone(), now_ms())).await;
    b.event("module_unloaded", "tcping").await;
    // Its hello (sent as the modules changed) is version 2: what the agent enforces,
    // and its budget.
    let h = b.hello().await;
    assert!(!h.modules.iter().any(|m| m.name == "tcping"), "{h:?}");
    for f in [
        wire::features::POLICY,
        wire::features::BUDGETS,
        wire::features::FRESH_COMMANDS,
    ] {
        assert!(h.has(f), "feature {f} not announced: {:?}", h.features);
    }
    assert_eq!(
        (
            h.limits.max_runs,
            h.limits.max_queued_runs,
            h.limits.max_probe_rate
        ),
        (4, 1000, 2000.0)
    );
    // ...not twice (a replay within the window), nor with no issue time (a version 1
    // backend, or a forged command), nor an hour old.
    b.send(command("ctl-fresh", unload.clone(), now_ms())).await;
    b.event("command_refused", "ctl-fresh was received before")
        .await;
    let load = CommandKind::Load {
        module: "tcping".into(),
    };
    b.send(command("ctl-v1", load.clone(), 0)).await;
    let e = b.event("command_refused", "ctl-v1").await;
    assert!(
        e["message"].as_str().unwrap().contains("no_issue_time"),
        "{e}"
    );
    b.send(command("ctl-old", load.clone(), now_ms() - 3_600_000))
        .await;
    let e = b.event("command_refused", "ctl-old").await;
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("stale") && msg.contains("before the newest command this agent accepted"),
        "{e}"
    );
    // A run with no issue time is refused too.
    b.send(run("run-v1", "echo_module", json!({"message": "v1"}), 0))
        .await;
    b.event("command_refused", "run-v1").await;
    // None of the refused ones was applied: no hello came (a load would send one),
    // and tcping is still unloaded.
    b.echo_works("marker-2").await;
    assert!(b.results_of("run-v1").await.is_empty());
    assert!(
        b.received.try_recv().is_err(),
        "a refused command was applied"
    );
    let a = b.api().get("/agents/guard-fresh").await.body;
    let modules: Vec<&str> = a["modules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert!(!modules.contains(&"tcping"), "{modules:?}");
    // The refusal is logged with the skew: how far it was issued before the newest
    // command the agent accepted (ctl-fresh, a moment before ctl-old's "now").
    let log = b.agent.log_text();
    let skew: i64 = log
        .split("skew_ms=")
        .nth(1)
        .and_then(|s| s.split(|c: char| !(c == '-' || c.is_ascii_digit())).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no skew_ms in the log: {log}"));
    assert!((-3_600_000..=-3_500_000).contains(&skew), "skew_ms={skew}");

    // A restart forgets neither: the control command and the run are refused again.
    b.agent
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(10));
    b.api().wait_not_alive("guard-fresh", T).await;
    b.agent = b.spawn_agent(&[]);
    b.api().wait_alive(&["guard-fresh"], T).await;
    b.send(command("ctl-fresh", unload, now_ms())).await;
    b.send(Command {
        issued_ms: now_ms(),
        ..cmd
    })
    .await;
    b.echo_works("marker-3").await;
    let repeats = wait_for("the second refusal of ctl-fresh", T, || async {
        let n = b
            .events()
            .await
            .iter()
            .filter(|e| {
                e["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("ctl-fresh was received before")
            })
            .count();
        (n >= 2).then_some(n)
    })
    .await;
    assert_eq!(repeats, 2);
    assert_eq!(b.results_of("run-1").await.len(), 1, "run-1 ran again");
}

/// Runs' [started, finished) intervals: the most that overlap at any time.
fn max_overlap(results: &[Value]) -> usize {
    let mut edges: Vec<(i64, i32)> = Vec::new();
    for r in results {
        edges.push((ms_of(&r["started_at"]), 1));
        edges.push((ms_of(&r["finished_at"]), -1));
    }
    // At the same millisecond a run that ends goes before one that starts.
    edges.sort();
    let (mut now, mut max) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        max = max.max(now);
    }
    max as usize
}

/// (d) 20 one-second runs sent at once with `--max-runs 2`: never more than two run
/// at once, and all 20 finish; one more, cancelled while it waits, never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_runs_bounds_the_runs_at_once_and_all_finish() {
    let mut b = Bench::start("guard-budget", &["--max-runs", "2"]).await;
    let ids: Vec<String> = (0..20).map(|i| format!("slow-{i:02}")).collect();
    for id in &ids {
        b.send(run(
            id,
            "faulty_module",
            json!({"message": id, "delay": 1.0}),
            now_ms(),
        ))
        .await;
    }
    // One more, cancelled while it waits: it leaves the queue and never runs.
    b.send(run(
        "slow-cancelled",
        "faulty_module",
        json!({"message": "cancelled", "delay": 1.0}),
        now_ms(),
    ))
    .await;
    b.send(command(
        "cancel-1",
        CommandKind::Cancel {
            request_id: "slow-cancelled".into(),
        },
        now_ms(),
    ))
    .await;
    let results = wait_for("all 20 results", Duration::from_secs(60), || async {
        let all: Vec<Value> = b
            .results()
            .await
            .into_iter()
            .filter(|r| r["request_id"].as_str().unwrap_or("").starts_with("slow-"))
            .collect();
        (all.len() >= 20).then_some(all)
    })
    .await;
    assert_eq!(results.len(), 20, "each run once");
    for r in &results {
        assert_eq!(r["state"], "succeeded", "{r}");
    }
    let most = max_overlap(&results);
    assert_eq!(most, 2, "runs at once: {most}");
    let first = results
        .iter()
        .map(|r| ms_of(&r["started_at"]))
        .min()
        .unwrap();
    let last = results
        .iter()
        .map(|r| ms_of(&r["finished_at"]))
        .max()
        .unwrap();
    assert!(
        last - first >= 10_000,
        "20 × 1 s two at a time: {} ms",
        last - first
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        b.results_of("slow-cancelled").await.is_empty(),
        "a cancelled queued run ran"
    );
    // The hello reports the budget (a load of a loaded module sends one).
    let load = CommandKind::Load {
        module: "echo_module".into(),
    };
    b.send(command("ctl-load", load, now_ms())).await;
    assert_eq!(b.hello().await.limits.max_runs, 2);
}

/// (e) Schedules the agent cannot run sanely are refused one by one with events
/// naming the measurement and the field; the rest of the set applies; a set of more
/// than 1,000 is refused whole; the agent keeps serving throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_schedules_are_refused_and_the_agent_keeps_serving() {
    let b = Bench::start("guard-sched", &[]).await;
    let set = vec![
        schedule("zero-interval", 0, 0),
        schedule("max-jitter", 60_000, u64::MAX),
        schedule("good", 1_000, 0),
    ];
    b.send(command(
        "sched-1",
        CommandKind::Schedules {
            version: 1,
            schedules: set,
        },
        now_ms(),
    ))
    .await;
    let e = b.event("schedule_refused", "zero-interval").await;
    assert!(
        e["message"].as_str().unwrap().contains("interval_ms"),
        "{e}"
    );
    let e = b.event("schedule_refused", "max-jitter").await;
    assert!(e["message"].as_str().unwrap().contains("jitter_ms"), "{e}");
    b.event("schedules_updated", "version 1: 1 recurring").await;
    // The good one runs (its current slot at once). (The real backend then answers
    // the hello with its own, empty, set: it never heard of this one.)
    b.result_where("a run of the good schedule", |r| {
        r["result"]["message"] == "good"
    })
    .await;
    b.echo_works("after-hostile").await;

    // More than 1,000: the whole set is refused.
    let many: Vec<Schedule> = (0..1001)
        .map(|i| schedule(&format!("m{i}"), 60_000, 0))
        .collect();
    b.send(command(
        "sched-2",
        CommandKind::Schedules {
            version: 1_000,
            schedules: many,
        },
        now_ms(),
    ))
    .await;
    b.event("schedules_refused", "1001 schedules").await;
    b.echo_works("after-many").await;
    assert!(
        !b.events().await.iter().any(|e| e["message"]
            .as_str()
            .unwrap_or("")
            .contains("version 1000")
            && e["kind"] == "schedules_updated"),
        "the set of 1001 was applied"
    );
}

/// (f) A run's policy is that run's: tcping to 127.0.0.1 under a policy that denies
/// 127.0.0.1/32 fails with `policy_denied`, and the same run without a policy (open)
/// is not denied; a schedule set's policy applies to its scheduled runs.
///
/// The agent hands each run its command's policy (`Context::policy`); the module checks
/// it (`ctx.permit` before tcping connects).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_policy_reaches_the_module() {
    let b = Bench::start("guard-policy", &[]).await;
    let port = b.up.http_port;
    let params = json!({"host": "127.0.0.1", "port": port, "count": 1});
    let mut denied = run("tcp-denied", "tcping", params.clone(), now_ms());
    denied.policy = Some(deny_loopback_host());
    b.send(denied).await;
    let r = b.result("tcp-denied").await;
    assert!(
        r.to_string().contains("policy_denied"),
        "not denied by the run's policy: {r}"
    );
    b.send(run("tcp-open", "tcping", params.clone(), now_ms()))
        .await;
    let r = b.result("tcp-open").await;
    assert!(!r.to_string().contains("policy_denied"), "{r}");
    // A schedule set's policy is every scheduled run's (its current slot runs at once).
    let mut tcp = schedule("tcp-scheduled", 60_000, 0);
    tcp.module = "tcping".into();
    tcp.params_json = params.to_string();
    let mut set = command(
        "sched-policy",
        CommandKind::Schedules {
            version: 1,
            schedules: vec![tcp],
        },
        now_ms(),
    );
    set.policy = Some(deny_loopback_host());
    b.send(set).await;
    let r = b
        .result_where("the scheduled tcping", |r| {
            r["request_id"]
                .as_str()
                .unwrap_or("")
                .contains("tcp-scheduled")
        })
        .await;
    assert!(r.to_string().contains("policy_denied"), "{r}");
}

fn deny_loopback_host() -> TargetPolicy {
    TargetPolicy {
        rules: vec![Rule {
            name: "no-loopback-host".into(),
            allow: vec![],
            deny: vec![Cidr::parse("127.0.0.1/32").unwrap()],
        }],
        builtin: false,
    }
}

/// A policy over the agent's limits is refused before anything runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_policy_fails_the_run() {
    let b = Bench::start("guard-bigpolicy", &[]).await;
    let mut cmd = run(
        "big-policy",
        "echo_module",
        json!({"message": "x"}),
        now_ms(),
    );
    cmd.policy = Some(TargetPolicy {
        rules: (0..300)
            .map(|i| Rule {
                name: format!("r{i}"),
                allow: vec![],
                deny: vec![],
            })
            .collect(),
        builtin: true,
    });
    b.send(cmd).await;
    let r = b.result("big-policy").await;
    assert_eq!(r["state"], "failed", "{r}");
    assert!(r["error"].as_str().unwrap().contains("300 rules"), "{r}");
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// Every file and directory under `dir`, with its mode.
fn modes(dir: &Path, out: &mut Vec<(String, u32, bool)>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let is_dir = p.is_dir();
        out.push((p.display().to_string(), mode(&p), is_dir));
        if is_dir {
            modes(&p, out);
        }
    }
}

/// (g) The token comes from a file: `--print-config` shows "<redacted>", the
/// process's arguments (what `ps` shows) hold no token, the agent logs in with it, and
/// its data directory is its own (0700, files 0600), even one made 0755 before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_stays_in_its_file_and_the_data_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let up = Up::start(0, &["--auth"]).await;
    let admin = up.admin();
    let token = admin.enroll("guard-token").await;
    let dir = TempDir::new("guard-token");
    let file = dir.path().join("agent.token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let common = [
        "--id",
        "guard-token",
        "--broker",
        &up.broker_url(),
        "--data",
        data.to_str().unwrap(),
        "--token-file",
        file.to_str().unwrap(),
    ];

    let out = std::process::Command::new(bin("imn-agent"))
        .args(common)
        .arg("--print-config")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("token = \"<redacted>\""), "{printed}");
    assert!(printed.contains("token_file = "), "{printed}");
    assert!(!printed.contains(&token), "the token is printed: {printed}");
    // Given on the command line, it is redacted too.
    let out = std::process::Command::new(bin("imn-agent"))
        .args(["--id", "x", "--data", data.to_str().unwrap()])
        .args(["--token", &token, "--print-config"])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("<redacted>") && !printed.contains(&token),
        "{printed}"
    );

    let mut args = common.to_vec();
    args.extend(["--heartbeat-ms", "500"]);
    let agent = Proc::spawn("guard-token", &bin("imn-agent"), &args, dir.path());
    admin.wait_alive(&["guard-token"], T).await;
    // What `ps` shows: the arguments.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", agent.pid())).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("--token-file"), "{cmdline}");
    assert!(
        !cmdline.contains(&token),
        "the token is in the arguments: {cmdline}"
    );
    let ps = std::process::Command::new("ps")
        .args(["-ww", "-o", "args=", "-p", &agent.pid().to_string()])
        .output();
    if let Ok(ps) = ps {
        let shown = String::from_utf8_lossy(&ps.stdout);
        assert!(!shown.contains(&token), "ps shows the token: {shown}");
    }
    // It measures (its results need its token's signature to be stored).
    let r = admin
        .post(
            "/agent/guard-token/echo_module?wait=20",
            r#"{"message":"m"}"#,
            &[],
        )
        .await;
    assert_eq!(r.body["state"], "succeeded", "{:?}", r.body);

    assert_eq!(mode(&data), 0o700, "the data directory");
    let mut all = Vec::new();
    modes(&data, &mut all);
    assert!(
        all.iter().any(|(p, _, _)| p.contains("outbox")),
        "no outbox: {all:?}"
    );
    for (p, m, is_dir) in &all {
        let want = if *is_dir { 0o700 } else { 0o600 };
        assert_eq!(m & 0o077, 0, "{p} is {m:o}, want {want:o}");
    }
}
