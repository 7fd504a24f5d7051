//! The fleet's lifecycle, end to end with real processes: signed over-the-air updates
//! by rollout, rollback of a release that does not come up, refusals of tampered,
//! untrusted, expired and older releases by both the backend and the agent, a
//! download that resumes after a partition, remote settings that cut an agent off
//! and are reverted, and self-updates of an agent installed from its .deb and .ipk.
//!
//! The agents are the static firmware builds of `cross/build.sh`
//! (`target/firmware/full/TRIPLE/imn-agent`), and the newer release they update to is
//! the same agent built again stamped one version on (`imn-agent-next`). The aarch64
//! agent runs under qemu-user through binfmt_misc (registered here when it is not,
//! as Debian's binfmt-support would), so its supervisor can start the release it
//! downloaded as a plain program, as on a Raspberry Pi. Each agent reaches `imn up`'s
//! broker through a proxy on loopback (`imn_tests::proxy`), which the tests take down
//! to make the broker unreachable, and which counts the bytes on the wire.
//!
//! They print the figures the closing note reports (update time, bytes on the wire,
//! bytes written): `cargo test -p imn-tests --test lifecycle -- --nocapture`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use imn_proto::release::{self, SigningKey};
use imn_proto::wire::{self, CommandKind, Envelope, Kind};
use imn_tests::proxy::TcpProxy;
use imn_tests::*;
use serde_json::{json, Value};

struct Target {
    triple: &'static str,
    /// `std::env::consts::ARCH` of its binaries.
    arch: &'static str,
    /// ELF e_machine.
    machine: u16,
    /// The binfmt_misc entry that runs it here (None: native).
    binfmt: Option<&'static str>,
}

const X86_64: Target = Target {
    triple: "x86_64-unknown-linux-musl",
    arch: "x86_64",
    machine: 0x3e,
    binfmt: None,
};

const AARCH64: Target = Target {
    triple: "aarch64-unknown-linux-musl",
    arch: "aarch64",
    machine: 0xb7,
    binfmt: Some("qemu-aarch64"),
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A firmware binary of `cross/build.sh`.
fn firmware(t: &Target, name: &str) -> PathBuf {
    let p = root()
        .join("target/firmware/full")
        .join(t.triple)
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: run `bash cross/build.sh` first (the README's test command does)",
        p.display()
    );
    p
}

/// The version the agent's `--version` prints.
fn version_of(bin: &Path) -> String {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .expect("--version");
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .strip_prefix("imn-agent ")
        .unwrap_or_else(|| panic!("{} --version said {text:?}", bin.display()))
        .to_string()
}

/// Makes the kernel run `t`'s binaries through qemu-user, as binfmt-support does on
/// Debian. Root only; idempotent. The entry is left registered (as a package would).
fn ensure_binfmt(t: &Target) {
    let Some(name) = t.binfmt else { return };
    let dir = Path::new("/proc/sys/fs/binfmt_misc");
    if !dir.join("register").exists() {
        let ok = Command::new("mount")
            .args([
                "-t",
                "binfmt_misc",
                "binfmt_misc",
                "/proc/sys/fs/binfmt_misc",
            ])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot mount binfmt_misc (this test runs as root)");
    }
    if dir.join(name).exists() {
        return;
    }
    // Debian's own description of the entry (qemu-user-static ships it).
    let spec = std::fs::read_to_string(format!("/usr/share/binfmts/{name}")).unwrap_or_else(|e| {
        panic!("/usr/share/binfmts/{name}: {e} (cross/build.sh installs qemu-user-static)")
    });
    let field = |k: &str| {
        spec.lines()
            .find_map(|l| l.strip_prefix(&format!("{k} ")))
            .unwrap_or_else(|| panic!("{k} in /usr/share/binfmts/{name}"))
            .to_string()
    };
    let qemu = program(&format!("{name}-static")).expect("qemu-user-static");
    // F: the interpreter is opened now, so it works in any mount namespace.
    let line = format!(
        ":{name}:M:{}:{}:{}:{}:F",
        field("offset"),
        field("magic"),
        field("mask"),
        qemu.display()
    );
    match std::fs::write(dir.join("register"), line) {
        Ok(()) => {}
        // Another test registered it meanwhile.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => panic!("register the binfmt_misc entry: {e}"),
    }
    assert!(
        dir.join(name).exists(),
        "binfmt_misc has no {name} after registering it"
    );
}

/// A minimal static ELF for `t` whose only code is `exit(3)`: a real program that
/// dies at once.
fn exits_at_start(t: &Target) -> Vec<u8> {
    let code: Vec<u8> = match t.machine {
        // mov x0, #3; mov x8, #93 (exit); svc #0
        0xb7 => [0xd280_0060u32, 0xd280_0ba8, 0xd400_0001]
            .iter()
            .flat_map(|i| i.to_le_bytes())
            .collect(),
        // mov edi, 3; mov eax, 60 (exit); syscall
        0x3e => vec![0xbf, 3, 0, 0, 0, 0xb8, 60, 0, 0, 0, 0x0f, 0x05],
        m => panic!("no code for machine {m:#x}"),
    };
    let base: u64 = 0x40_0000;
    let total = 64 + 56 + code.len() as u64;
    let mut e = Vec::new();
    e.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&t.machine.to_le_bytes());
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(base + 64 + 56).to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // flags
    for v in [64u16, 56, 1, 64, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R X
    e.extend_from_slice(&0u64.to_le_bytes()); // offset
    e.extend_from_slice(&base.to_le_bytes());
    e.extend_from_slice(&base.to_le_bytes());
    e.extend_from_slice(&total.to_le_bytes());
    e.extend_from_slice(&total.to_le_bytes());
    e.extend_from_slice(&0x1000u64.to_le_bytes());
    e.extend_from_slice(&code);
    e
}

const DAY_MS: i64 = 86_400_000;

/// `imn up` with release keys, a proxy in front of its broker, and an operator key.
/// With `IMN_WRITE_GOLDEN=1`, an MQTT tap on the broker, whose lifecycle messages
/// [`Lab::write_goldens`] adds to `modules/tests/golden/` (the wire samples of the
/// lifecycle envelopes were made that way).
struct Lab {
    up: Up,
    proxy: TcpProxy,
    key: SigningKey,
    public: String,
    tap: Option<imn_tests::wire_compat::MqttTap>,
}

/// The variant path of a lifecycle envelope, as `modules/tests/wire_golden.rs` names it.
fn lifecycle_path(env: &Envelope) -> Option<&'static str> {
    Some(match env {
        Envelope::Update(wire::UpdateUp::Status(_)) => "Update/Status",
        Envelope::Update(wire::UpdateUp::Fetch { .. }) => "Update/Fetch",
        Envelope::Chunk(_) => "Chunk",
        Envelope::Command(c) => match c.kind {
            CommandKind::Update { .. } => "Command/Update",
            CommandKind::Settings { .. } => "Command/Settings",
            _ => return None,
        },
        _ => return None,
    })
}

impl Lab {
    async fn start() -> Lab {
        let key = SigningKey::from_pkcs8(&SigningKey::generate().unwrap()).unwrap();
        let public = key.public_hex();
        let up = Up::start(0, &["--release-keys", &public, "--fault-injection"]).await;
        let proxy = TcpProxy::start(up.mqtt_port).await;
        let tap = match std::env::var_os("IMN_WRITE_GOLDEN") {
            Some(_) => Some(imn_tests::wire_compat::MqttTap::start(up.mqtt_port).await),
            None => None,
        };
        Lab {
            up,
            proxy,
            key,
            public,
            tap,
        }
    }

    /// Writes a golden file for each lifecycle variant the tap saw that has none: the
    /// smallest message of each.
    async fn write_goldens(&self, agent: &str, what: &str) {
        let Some(tap) = &self.tap else { return };
        // The backend's answer for a release it does not have (a Chunk with an error
        // and no data): the small sample of a Chunk. Asked as the agent would.
        {
            let mut mo = rumqttc::MqttOptions::new(
                format!("{agent}-golden"),
                "127.0.0.1",
                self.up.mqtt_port,
            );
            mo.set_max_packet_size(1 << 20, 1 << 20);
            let (client, mut ev) = rumqttc::AsyncClient::new(mo, 16);
            let fetch = Envelope::Update(wire::UpdateUp::Fetch {
                sha256: "0".repeat(64),
                offset: 0,
                len: 4096,
            });
            client
                .publish(
                    wire::topic(agent, Kind::Update),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    wire::encode(&fetch),
                )
                .await
                .unwrap();
            let until = Instant::now() + Duration::from_secs(3);
            while Instant::now() < until {
                let _ = tokio::time::timeout(Duration::from_millis(200), ev.poll()).await;
            }
        }
        let dir = root().join("modules/tests/golden");
        let mut best: std::collections::BTreeMap<&str, Vec<u8>> = Default::default();
        for m in tap.messages() {
            let Ok(env) = wire::decode(&m.payload) else {
                continue;
            };
            if let Some(path) = lifecycle_path(&env) {
                let e = best.entry(path).or_insert_with(|| m.payload.clone());
                if m.payload.len() < e.len() {
                    *e = m.payload.clone();
                }
            }
        }
        for (path, bytes) in best {
            let source = format!(
                "captured: tapped on imn up's MQTT broker between a static x86_64 imn-agent (firmware build), run by its supervisor, and the backend, in tests/tests/lifecycle.rs ({what}): {}",
                if path == "Chunk" {
                    "the backend's answer to a fetch of a release it does not have, which the test asks as the agent"
                } else {
                    "the smallest message of this variant"
                }
            );
            if imn_tests::wire_compat::write_golden(&dir, path, &source, &bytes) {
                eprintln!("wrote the golden sample {path}");
            }
        }
    }

    fn sign(&self, bin: &[u8], version: &str, t: &Target, rollback: bool) -> Vec<u8> {
        let now = imn_proto::now_ms();
        self.key
            .sign(bin, version, t.arch, now, now + DAY_MS, rollback)
            .unwrap()
    }

    fn data(&self, id: &str) -> PathBuf {
        self.up.dir.path().join(id)
    }

    /// A supervised agent (`program`, through the proxy) trusting the lab's key.
    fn agent(&self, id: &str, program: &Path, trial_s: u64, rate: u64) -> Proc {
        let data = self.data(id);
        let (trial, rate) = (trial_s.to_string(), rate.to_string());
        Proc::spawn(
            id,
            program,
            &[
                "--id",
                id,
                "--broker",
                &self.proxy.url(),
                "--data",
                data.to_str().unwrap(),
                "--heartbeat-ms",
                "500",
                "--resend-timeout-ms",
                "2000",
                "--update-keys",
                &self.public,
                "--trial-s",
                &trial,
                "--update-rate",
                &rate,
            ],
            self.up.dir.path(),
        )
    }

    /// A packaged agent (`program` from a package's root, its `config` as shipped via
    /// `--config` or `--uci`), with the lab's broker and key as flags.
    fn packaged(
        &self,
        id: &str,
        program: &Path,
        config: (&str, &Path),
        data: &Path,
        logs: &Path,
    ) -> Proc {
        Proc::spawn(
            id,
            program,
            &[
                config.0,
                config.1.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--id",
                id,
                "--broker",
                &self.proxy.url(),
                "--heartbeat-ms",
                "500",
                "--update-keys",
                &self.public,
                "--update-rate",
                "8000000",
            ],
            logs,
        )
    }

    async fn add_release(&self, file: Vec<u8>) -> Reply {
        self.up.api.post_bytes("/admin/releases", file).await
    }

    async fn rollout(&self, body: Value) -> String {
        let r = self
            .up
            .api
            .post("/admin/rollouts", &body.to_string(), &[])
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        r.body["id"].as_str().unwrap().to_string()
    }

    async fn agent_json(&self, id: &str) -> Value {
        self.up.api.get(&format!("/agents/{id}")).await.body
    }

    async fn wait_version(&self, id: &str, version: &str, timeout: Duration) -> Value {
        let api = self.up.api.clone();
        let path = format!("/agents/{id}");
        wait_for(&format!("{id} to report {version}"), timeout, || {
            let (api, path) = (api.clone(), path.clone());
            async move {
                let a = api.get(&path).await.body;
                (a["version"] == json!(version) && a["alive"] == json!(true)).then_some(a)
            }
        })
        .await
    }

    async fn wait_rollout(&self, id: &str, state: &str, timeout: Duration) -> Value {
        let api = self.up.api.clone();
        let path = format!("/rollouts/{id}");
        wait_for(&format!("rollout {id} to be {state}"), timeout, || {
            let (api, path) = (api.clone(), path.clone());
            async move {
                let r = api.get(&path).await.body;
                (r["state"] == json!(state)).then_some(r)
            }
        })
        .await
    }

    async fn events(&self, id: &str, kind: &str) -> Vec<String> {
        let e = self.up.api.get(&format!("/agents/{id}/events")).await.body;
        e.as_array()
            .map(|a| {
                a.iter()
                    .filter(|e| e["kind"] == json!(kind))
                    .map(|e| e["message"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn wait_event(&self, id: &str, kind: &str, containing: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(m) = self
                .events(id, kind)
                .await
                .into_iter()
                .find(|m| m.contains(containing))
            {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "{id}: no {kind} event containing {containing:?}; events: {}",
                self.up.api.get(&format!("/agents/{id}/events")).await.body
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn hold_acks(&self, on: bool) {
        let r = self
            .up
            .api
            .post(&format!("/debug/hold-acks?on={on}"), "", &[])
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
}

/// The time (ms since the epoch) of the first line of an agent's log that holds
/// `what`.
fn logged_at(log: &str, what: &str) -> Option<i64> {
    let line = log.lines().find(|l| l.contains(what))?;
    // The line starts with its RFC 3339 time, maybe inside colour codes.
    let start = line.find("20")?;
    let ts: String = line[start..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '\u{1b}')
        .collect();
    Some(ms_of(&json!(ts)))
}

/// The state file the agent's supervisor keeps.
fn supervisor_state(data: &Path) -> Value {
    let text = std::fs::read_to_string(data.join("update/state.json")).unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// Bytes under a directory (the files an update wrote), recursively.
fn bytes_under(dir: &Path) -> u64 {
    let mut n = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            match e.metadata() {
                Ok(m) if m.is_dir() => n += bytes_under(&p),
                Ok(m) => n += m.len(),
                Err(_) => {}
            }
        }
    }
    n
}

/// v1 → v2 by a rollout, with results buffered while the broker was unreachable: the
/// agent reports v2, and every buffered result is stored exactly once. The results
/// are held unacked across the update (the backend stores them but holds its acks),
/// so the outbox the new release inherits still has every one, and sends them again:
/// what crosses the update is the whole outbox, not a drained one.
async fn update_by_rollout(t: &Target) {
    ensure_binfmt(t);
    let lab = Lab::start().await;
    let v1_bin = firmware(t, "imn-agent");
    let v2_bin = firmware(t, "imn-agent-next");
    let (v1, v2) = (version_of(&v1_bin), version_of(&v2_bin));
    assert_eq!(
        release::compare_versions(&v2, &v1),
        Some(std::cmp::Ordering::Greater),
        "{v2} after {v1}"
    );
    let id = format!("up-{}", t.arch);
    let _agent = lab.agent(&id, &v1_bin, 60, 8 << 20);
    lab.wait_version(&id, &v1, Duration::from_secs(60)).await;
    // The lifecycle status goes on `upd` right after the hello, so it can land a
    // moment after the version does (under qemu, it did).
    let api = lab.up.api.clone();
    let path = format!("/agents/{id}");
    wait_for("the agent's update phase to be idle", Duration::from_secs(30), || {
        let (api, path) = (api.clone(), path.clone());
        async move { (api.get(&path).await.body["update"]["phase"] == json!("idle")).then_some(()) }
    })
    .await;

    // 25 recurring measurements, one run a second each, for 26 s: the agent runs them
    // from its own copy while the broker is unreachable.
    const SCHEDULES: usize = 25;
    let mut measurements = Vec::new();
    let stop_s = imn_proto::now_ms() / 1000 + 26;
    for i in 0..SCHEDULES {
        let r = lab
            .up
            .api
            .post(
                "/v1/measurements",
                &json!({"module": "echo_module", "params": {"message": format!("m{i}")},
                        "agents": {"ids": [id]},
                        "schedule": {"interval_s": 1, "jitter_s": 0, "stop": stop_s}})
                .to_string(),
                &[],
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.body);
        measurements.push(r.body["id"].as_str().unwrap().to_string());
    }
    let api = lab.up.api.clone();
    let path = format!("/agents/{id}");
    wait_for(
        "the agent to run every schedule",
        Duration::from_secs(30),
        || {
            let (api, path) = (api.clone(), path.clone());
            async move {
                let a = api.get(&path).await.body;
                (a["schedule_version"].as_u64() >= Some(SCHEDULES as u64)).then_some(())
            }
        },
    )
    .await;
    lab.hold_acks(true).await;
    lab.proxy.set_down(true);
    let offline_at = Instant::now();

    // While it is offline: the release, and a rollout that waits for it.
    let v2_bytes = std::fs::read(&v2_bin).unwrap();
    let file = lab.sign(&v2_bytes, &v2, t, false);
    let r = lab.add_release(file.clone()).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.body["release"]["sha256"],
        json!(release::sha256_hex(&v2_bytes))
    );
    let again = lab.add_release(file).await;
    assert_eq!(again.status, 200, "the same release again: {}", again.body);
    assert_eq!(again.body["stored"], json!(false));
    let rollout = lab
        .rollout(json!({"version": v2, "agents": {"ids": [id]}, "canary_pct": 100, "waves": [100]}))
        .await;
    let r = lab.up.api.get(&format!("/rollouts/{rollout}")).await.body;
    let state = &r["agents"][0]["state"];
    assert!(state == "waiting" || state == "offered", "{r}");

    // The schedules end 26 s after they began: every slot from here on runs offline.
    tokio::time::sleep(
        Duration::from_secs(26).saturating_sub(offline_at.elapsed()) + Duration::from_secs(3),
    )
    .await;
    let (_, down_before) = lab.proxy.bytes();
    lab.proxy.set_down(false);
    let back = Instant::now();
    let a = lab.wait_version(&id, &v2, Duration::from_secs(180)).await;
    let update_s = back.elapsed().as_secs_f64();
    let (_, down_after) = lab.proxy.bytes();
    assert_eq!(a["arch"], json!(t.arch));
    let r = lab
        .wait_rollout(&rollout, "done", Duration::from_secs(30))
        .await;
    assert_eq!(r["agents"][0]["state"], json!("healthy"), "{r}");
    // The supervisor ends the trial when it sees the child's `healthy` (it looks
    // every 100 ms).
    let data = lab.data(&id);
    let st = wait_for("the trial to pass", Duration::from_secs(10), || {
        let data = data.clone();
        async move {
            let st = supervisor_state(&data);
            (st["trial"] == Value::Null).then_some(st)
        }
    })
    .await;
    assert_eq!(st["current"]["version"], json!(v2), "{st}");
    let written = bytes_under(&lab.data(&id).join("update"));
    let log = std::fs::read_to_string(lab.up.dir.path().join(format!("{id}.log"))).unwrap();
    let offered = logged_at(&log, "downloading a release").expect("the download in the log");
    let staged = logged_at(&log, "release verified and staged").expect("staged in the log");
    let passed = logged_at(&log, "supervisor: trial passed").expect("the trial in the log");

    // Now the acks: the new release sends what the old one buffered; each once.
    lab.hold_acks(false).await;
    wait_for("the outbox to drain", Duration::from_secs(60), || {
        let (api, path) = (api.clone(), path.clone());
        async move {
            let a = api.get(&path).await.body;
            (a["outbox"]["depth"] == json!(0)).then_some(())
        }
    })
    .await;
    let mut total = 0;
    for m in &measurements {
        let results = all_results(&lab.up.api, m).await;
        let mut slots: Vec<i64> = results.iter().map(|r| ms_of(&r["scheduled_at"])).collect();
        slots.sort_unstable();
        let n = slots.len();
        slots.dedup();
        assert_eq!(slots.len(), n, "{m}: a slot stored twice");
        // No slot lost: one a second from the first to the last.
        for w in slots.windows(2) {
            assert_eq!(
                w[1] - w[0],
                1000,
                "{m}: a slot missing between {} and {}",
                w[0],
                w[1]
            );
        }
        assert!(n >= 24, "{m}: {n} runs in 26 s");
        total += n;
    }
    let health = lab.up.api.get("/health").await.body;
    eprintln!(
        "FIGURES {} update: v{v1} -> v{v2}, {} byte release; agent's log: download {:.1} s, staged to trial passed {:.1} s; {update_s:.1} s from the broker coming back to the agent's hello on v{v2} (its reconnect backoff included); {} bytes broker->agent over that time ({:.2}x the release); {} bytes in DATA/update after it; {total} scheduled results, buffered while the broker was unreachable and unacked across the update, stored exactly once; backend duplicates dropped: {}",
        t.arch,
        v2_bytes.len(),
        (staged - offered) as f64 / 1000.0,
        (passed - staged) as f64 / 1000.0,
        down_after - down_before,
        (down_after - down_before) as f64 / v2_bytes.len() as f64,
        written,
        health["duplicates_dropped"]
    );
    assert!(total >= 500, "{total} results");
    lab.write_goldens(&id, "an update by rollout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x86_64_agent_updates_by_rollout_and_keeps_every_buffered_result() {
    update_by_rollout(&X86_64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aarch64_agent_under_qemu_updates_by_rollout_and_keeps_every_buffered_result() {
    update_by_rollout(&AARCH64).await;
}

/// A release whose binary exits at start (a real signed program): the supervisor
/// restores the previous binary within the trial, the agent reports `update_failed`,
/// and the rollout halts at its canary, the other agent never offered it.
async fn broken_release_rolls_back(t: &Target) {
    ensure_binfmt(t);
    let lab = Lab::start().await;
    let v1_bin = firmware(t, "imn-agent");
    let v1 = version_of(&v1_bin);
    let broken = format!("{v1}.9");
    let (a, b) = (format!("one-{}", t.arch), format!("two-{}", t.arch));
    const TRIAL_S: u64 = 40;
    let _pa = lab.agent(&a, &v1_bin, TRIAL_S, 8 << 20);
    let _pb = lab.agent(&b, &v1_bin, TRIAL_S, 8 << 20);
    lab.wait_version(&a, &v1, Duration::from_secs(60)).await;
    lab.wait_version(&b, &v1, Duration::from_secs(60)).await;
    let r = lab
        .add_release(lab.sign(&exits_at_start(t), &broken, t, false))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let rollout = lab
        .rollout(
            json!({"version": broken, "agents": {"ids": [a, b]}, "canary_pct": 50,
                         "waves": [100], "max_failures_pct": 0}),
        )
        .await;
    let started = Instant::now();
    let r = lab
        .wait_rollout(&rollout, "halted", Duration::from_secs(TRIAL_S + 60))
        .await;
    let halted_s = started.elapsed().as_secs_f64();
    let agents = r["agents"].as_array().unwrap();
    let of = |id: &str| {
        agents
            .iter()
            .find(|x| x["id"] == json!(id))
            .unwrap()
            .clone()
    };
    // Which of the two is the canary is the rollout's choice (a hash of its id and
    // the agents'): a is the canary from here on.
    let (a, b) = if of(&a)["wave"] == json!(0) {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(of(&a)["wave"], json!(0), "{r}");
    assert_eq!(of(&a)["state"], json!("failed"), "{r}");
    let detail = of(&a)["detail"].as_str().unwrap_or("").to_string();
    assert!(detail.starts_with("update_failed"), "{detail}");
    assert!(
        detail.contains("exited 3 times within its trial"),
        "{detail}"
    );
    assert_eq!(
        of(&b)["state"],
        json!("waiting"),
        "the second wave never started: {r}"
    );
    assert_eq!(r["current_wave"], json!(0), "{r}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("1 of 1 agents failed in wave 0"),
        "{r}"
    );
    // Back on the previous version, well within the trial period.
    let back = lab.wait_version(&a, &v1, Duration::from_secs(10)).await;
    assert!(halted_s < TRIAL_S as f64, "{halted_s} s");
    assert_eq!(back["update"]["failed_version"], json!(broken), "{back}");
    let st = supervisor_state(&lab.data(&a));
    assert_eq!(
        st["current"],
        Value::Null,
        "back on the packaged binary: {st}"
    );
    assert_eq!(st["trial"], Value::Null, "{st}");
    let ev = lab.wait_event(&a, "update_failed", &broken).await;
    assert!(ev.contains("exited 3 times"), "{ev}");
    assert_eq!(lab.agent_json(&b).await["version"], json!(v1));
    // The failed binary is gone from the device.
    assert!(!lab
        .data(&a)
        .join(format!("update/bin/imn-agent-{broken}"))
        .exists());
    // An operator aborts it: it stays aborted, and the second agent is never offered it.
    let r = lab
        .up
        .api
        .post(&format!("/admin/rollouts/{rollout}/abort"), "{}", &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["state"], json!("aborted"), "{}", r.body);
    let r = lab
        .up
        .api
        .post(&format!("/admin/rollouts/{rollout}/resume"), "{}", &[])
        .await;
    assert_eq!(
        r.status, 409,
        "an aborted rollout does not resume: {}",
        r.body
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = lab.up.api.get(&format!("/rollouts/{rollout}")).await.body;
    let later = r["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == json!(b))
        .unwrap()
        .clone();
    assert_eq!(later["state"], json!("waiting"), "{r}");
    assert!(lab.events(&b, "update_refused").await.is_empty());
    assert!(lab.events(&b, "update_failed").await.is_empty());
    eprintln!(
        "FIGURES {} rollback: release exiting at start rolled back and the rollout halted {halted_s:.1} s after it started (trial period {TRIAL_S} s)",
        t.arch
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x86_64_release_that_exits_at_start_is_rolled_back_and_halts_the_rollout() {
    broken_release_rolls_back(&X86_64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aarch64_release_under_qemu_that_exits_at_start_is_rolled_back_and_halts_the_rollout() {
    broken_release_rolls_back(&AARCH64).await;
}

/// Publishes an `Update` command straight to an agent's command topic, as a backend
/// (or anyone on the broker) could, bypassing the backend's checks.
async fn push_update(broker_port: u16, agent: &str, file: &[u8]) {
    let (signed, _) = release::split(file).unwrap();
    let cmd = Envelope::Command(wire::Command {
        id: format!("push-{}", rand::random::<u32>()),
        kind: CommandKind::Update {
            rollout: "pushed".into(),
            manifest: signed,
        },
        traceparent: None,
        deadline_ms: None,
        issued_ms: imn_proto::now_ms(),
        policy: None,
    });
    let mut mo = rumqttc::MqttOptions::new(
        format!("pusher-{}", rand::random::<u32>()),
        "127.0.0.1",
        broker_port,
    );
    mo.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut ev) = rumqttc::AsyncClient::new(mo, 16);
    client
        .publish(
            wire::topic(agent, Kind::Cmd),
            rumqttc::QoS::AtLeastOnce,
            false,
            wire::encode(&cmd),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("publishing to the broker: {other:?}"),
        }
        assert!(Instant::now() < deadline, "no PUBACK");
    }
    let _ = client.disconnect().await;
}

/// A flipped byte (in the binary, and in the manifest), a release signed by an
/// untrusted key, an expired release and a downgrade: each refused by the backend on
/// upload, and the same bytes pushed straight to an agent refused by the agent. A
/// binary altered in the backend's store after it was accepted is refused by the
/// agent once downloaded, and the rollout halts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_untrusted_expired_and_older_releases_are_refused_by_backend_and_agent() {
    let t = &X86_64;
    let lab = Lab::start().await;
    let v1_bin = firmware(t, "imn-agent");
    let v2_bin = firmware(t, "imn-agent-next");
    let (v1, v2) = (version_of(&v1_bin), version_of(&v2_bin));
    let id = "guarded";
    let _agent = lab.agent(id, &v1_bin, 60, 8 << 20);
    lab.wait_version(id, &v1, Duration::from_secs(60)).await;
    let v2_bytes = std::fs::read(&v2_bin).unwrap();
    let good = lab.sign(&v2_bytes, &v2, t, false);
    let now = imn_proto::now_ms();

    let mut flipped_binary = good.clone();
    let last = flipped_binary.len() - 100;
    flipped_binary[last] ^= 0x01;
    // One bit of the signed manifest: the version's last digit (0.1.0.1 → 0.1.0.0),
    // still a well-formed manifest; only the signature tells.
    let mut flipped_manifest = good.clone();
    let needle = format!("\"version\":\"{v2}\"");
    let at = good
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .expect("the version in the manifest")
        + needle.len()
        - 2;
    flipped_manifest[at] ^= 0x01;
    let stranger = SigningKey::from_pkcs8(&SigningKey::generate().unwrap()).unwrap();
    let untrusted = stranger
        .sign(&v2_bytes, &v2, t.arch, now, now + DAY_MS, false)
        .unwrap();
    let expired = lab
        .key
        .sign(
            &v2_bytes,
            &v2,
            t.arch,
            now - 2 * DAY_MS,
            now - DAY_MS,
            false,
        )
        .unwrap();
    let downgrade = lab.sign(&v2_bytes, "0.0.1", t, false);

    // The backend: each refused, naming the rule.
    for (name, file, want) in [
        ("flipped binary byte", &flipped_binary, "sha256:"),
        (
            "flipped manifest byte",
            &flipped_manifest,
            "does not verify",
        ),
        ("untrusted key", &untrusted, "not trusted"),
        ("expired", &expired, "expired"),
    ] {
        let r = lab.add_release(file.clone()).await;
        assert_eq!(r.status, 400, "{name}: {}", r.body);
        let msg = r.body["message"].as_str().unwrap_or("").to_string();
        assert!(msg.starts_with("release refused: "), "{name}: {}", r.body);
        assert!(msg.contains(want), "{name}: {msg}");
    }
    let r = lab.add_release(good.clone()).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = lab.add_release(downgrade.clone()).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.to_string().contains("not signed as a rollback"),
        "{}",
        r.body
    );
    let listed = lab.up.api.get("/releases").await.body;
    assert_eq!(listed["releases"].as_array().unwrap().len(), 1, "{listed}");

    // The agent: the same bytes pushed straight to it.
    for (name, file, want) in [
        (
            "flipped manifest byte",
            &flipped_manifest,
            "does not verify",
        ),
        ("untrusted key", &untrusted, "not trusted here"),
        ("expired", &expired, "expired"),
        ("downgrade", &downgrade, "older than"),
    ] {
        push_update(lab.up.mqtt_port, id, file).await;
        let ev = lab.wait_event(id, "update_refused", want).await;
        eprintln!("agent refused the {name}: {ev}");
    }
    let msgs = lab.events(id, "update_refused").await;
    assert!(
        msgs.iter()
            .any(|m| m.contains("signature") || m.contains("manifest")),
        "the flipped manifest: {msgs:?}"
    );

    // A binary altered where the backend keeps it: the agent checks what it got.
    {
        let db = lab.up.dir.path().join("data/backend/backend.sqlite");
        assert!(db.exists(), "{}", db.display());
        let c = rusqlite::Connection::open(&db).unwrap();
        let mut altered = v2_bytes.clone();
        altered[4096] ^= 0x01;
        let n = c
            .execute(
                "UPDATE releases SET bytes = ?1 WHERE sha256 = ?2",
                rusqlite::params![altered, release::sha256_hex(&v2_bytes)],
            )
            .unwrap();
        assert_eq!(n, 1);
    }
    let rollout = lab
        .rollout(json!({"version": v2, "agents": {"ids": [id]}, "canary_pct": 100, "waves": [100]}))
        .await;
    let r = lab
        .wait_rollout(&rollout, "halted", Duration::from_secs(60))
        .await;
    let detail = r["agents"][0]["detail"].as_str().unwrap_or("").to_string();
    assert!(detail.starts_with("update_failed: sha256:"), "{r}");
    assert_eq!(lab.agent_json(id).await["version"], json!(v1));
    assert!(!lab
        .data(id)
        .join(format!("update/bin/imn-agent-{v2}"))
        .exists());
    assert_eq!(supervisor_state(&lab.data(id))["current"], Value::Null);
}

/// A 30 s partition in the middle of a download: the download resumes where it
/// stopped. The release is throttled to 256 KiB/s so the cut lands mid-way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_by_a_partition_resumes_where_it_stopped() {
    let t = &X86_64;
    let lab = Lab::start().await;
    let v1_bin = firmware(t, "imn-agent");
    let v2_bin = firmware(t, "imn-agent-next");
    let (v1, v2) = (version_of(&v1_bin), version_of(&v2_bin));
    let id = "resumer";
    const RATE: u64 = 256 * 1024;
    let _agent = lab.agent(id, &v1_bin, 60, RATE);
    lab.wait_version(id, &v1, Duration::from_secs(60)).await;
    let v2_bytes = std::fs::read(&v2_bin).unwrap();
    let size = v2_bytes.len() as u64;
    let r = lab.add_release(lab.sign(&v2_bytes, &v2, t, false)).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let (_, before) = lab.proxy.bytes();
    let started = Instant::now();
    lab.rollout(json!({"version": v2, "agents": {"ids": [id]}, "canary_pct": 100, "waves": [100]}))
        .await;
    // Wait until about 40% is down, then cut the link for 30 s.
    let partial = |data: PathBuf| {
        std::fs::read_dir(data.join("update"))
            .ok()
            .and_then(|d| {
                d.flatten()
                    .find(|e| e.file_name().to_string_lossy().starts_with("partial-"))
            })
            .and_then(|e| e.metadata().ok())
            .map_or(0, |m| m.len())
    };
    let data = lab.data(id);
    let d2 = data.clone();
    wait_for(
        "40% of the release downloaded",
        Duration::from_secs(60),
        || {
            let d2 = d2.clone();
            async move { (partial(d2) >= size * 4 / 10).then_some(()) }
        },
    )
    .await;
    lab.proxy.set_down(true);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let at_cut = partial(data.clone());
    assert!(at_cut < size, "the cut came too late: {at_cut} of {size}");
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert_eq!(
        partial(data.clone()),
        at_cut,
        "nothing arrives while partitioned"
    );
    lab.proxy.set_down(false);
    lab.wait_version(id, &v2, Duration::from_secs(120)).await;
    let took = started.elapsed().as_secs_f64();
    let (_, after) = lab.proxy.bytes();
    let wire = after - before;
    let log =
        std::fs::read_to_string(lab.up.dir.path().join(format!("{id}.log"))).unwrap_or_default();
    // Throttled: the download, less the partition, took at least the time its bytes
    // need at the rate.
    let began = logged_at(&log, "downloading a release").unwrap();
    let staged = logged_at(&log, "release verified and staged").unwrap();
    let active_s = (staged - began) as f64 / 1000.0 - 30.0;
    let floor_s = size as f64 / RATE as f64;
    eprintln!(
        "FIGURES partition: {size} byte release, cut at {at_cut} bytes for 30 s; {wire} bytes broker->agent for the whole update ({:.3}x the release); {took:.1} s from the rollout to v{v2} at {RATE} B/s ({active_s:.1} s downloading outside the partition, {floor_s:.1} s the rate's floor)",
        wire as f64 / size as f64
    );
    assert!(
        active_s >= floor_s * 0.9,
        "{active_s:.1} s downloading for {size} bytes at {RATE} B/s: not throttled"
    );
    // A restart from zero would have carried at least size + at_cut.
    assert!(
        wire < size + at_cut / 2,
        "{wire} bytes on the wire for a {size} byte release cut at {at_cut}: it restarted"
    );
}

/// Settings that point the agent at a dead broker: the agent tries them, cannot
/// reconnect, and its supervisor reverts them within the trial; the agent comes back,
/// reports `settings_failed`, and a later good change applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_cut_the_agent_off_are_reverted_and_good_ones_apply() {
    let t = &X86_64;
    let lab = Lab::start().await;
    let v1_bin = firmware(t, "imn-agent");
    let v1 = version_of(&v1_bin);
    let id = "tuned";
    const TRIAL_S: u64 = 15;
    let _agent = lab.agent(id, &v1_bin, TRIAL_S, 8 << 20);
    lab.wait_version(id, &v1, Duration::from_secs(60)).await;
    let dead = free_port();
    let r = lab
        .up
        .api
        .post(
            "/admin/settings",
            &json!({"agents": {"ids": [id]}, "settings": {"broker": format!("mqtt://127.0.0.1:{dead}")}}).to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["agents"][0]["settings_version"], json!(1));
    let sent = Instant::now();
    lab.up.api.wait_not_alive(id, Duration::from_secs(20)).await;
    let ev = lab.wait_event(id, "settings_failed", "version 1").await;
    let back_s = sent.elapsed().as_secs_f64();
    assert!(ev.contains("did not connect"), "{ev}");
    let a = lab.agent_json(id).await;
    assert_eq!(a["config_version"], json!(0), "{a}");
    assert_eq!(a["desired_config_version"], json!(1), "{a}");
    assert!(
        a["update"]["last_failure"]
            .as_str()
            .unwrap()
            .starts_with("settings_failed"),
        "{a}"
    );
    assert!(!lab.data(id).join("update/settings.next.json").exists());
    // It is not sent that version again: the agent stays connected.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(lab.agent_json(id).await["alive"], json!(true));

    // A good change: a new version (the broker entry removed), applied and kept.
    let r = lab
        .up
        .api
        .post(
            "/admin/settings",
            &json!({"agents": {"ids": [id]}, "settings": {"broker": "", "heartbeat_ms": "700", "tags": "lab,tuned"}}).to_string(),
            &[],
        )
        .await;
    assert_eq!(
        r.body["agents"][0]["settings_version"],
        json!(2),
        "{}",
        r.body
    );
    let api = lab.up.api.clone();
    let a = wait_for("settings version 2", Duration::from_secs(60), || {
        let api = api.clone();
        async move {
            let a = api.get("/agents/tuned").await.body;
            (a["config_version"] == json!(2) && a["alive"] == json!(true)).then_some(a)
        }
    })
    .await;
    assert_eq!(a["heartbeat_interval_ms"], json!(700), "{a}");
    assert_eq!(a["tags"], json!(["lab", "tuned"]), "{a}");
    let kept = lab.data(id).join("update/settings.json");
    wait_for(
        "the supervisor to keep the settings",
        Duration::from_secs(10),
        || {
            let kept = kept.clone();
            async move { kept.exists().then_some(()) }
        },
    )
    .await;
    lab.write_goldens(id, "remote settings").await;
    eprintln!(
        "FIGURES settings: a dead broker reverted and the agent back {back_s:.1} s after the change (trial {TRIAL_S} s)"
    );
}

/// The process tree's child of `pid` (the agent its supervisor started), if any.
fn child_of(pid: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Waits until the supervisor `pid` runs a child whose binary is `exe`.
async fn wait_child_exe(pid: i32, exe: &Path) {
    let exe = exe.canonicalize().unwrap();
    wait_for(
        &format!("the supervisor to run {}", exe.display()),
        Duration::from_secs(60),
        || {
            let exe = exe.clone();
            async move {
                let child = child_of(pid)?;
                let now = std::fs::read_link(format!("/proc/{child}/exe")).ok()?;
                (now == exe).then_some(())
            }
        },
    )
    .await;
}

/// The files of a package's data archive with their SHA-256, from the root they were
/// installed (or unpacked) into.
fn digests(root_dir: &Path, files: &[String]) -> Vec<(String, String)> {
    files
        .iter()
        .map(|f| {
            let bytes =
                std::fs::read(root_dir.join(f.trim_start_matches("./"))).unwrap_or_default();
            (f.clone(), release::sha256_hex(&bytes))
        })
        .collect()
}

/// Self-update of an agent installed from its .deb: releases go to the data directory,
/// so `dpkg --verify` still finds every file of the package as shipped; then a later
/// package is installed over it, and the supervisor it brings runs the packaged
/// binary again (a package upgrade wins over what self-update installed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deb_agent_self_updates_without_touching_dpkg_files_and_a_later_package_wins() {
    use imn_tests::packages::{dpkg, run, scratch_root};
    let t = &X86_64;
    let lab = Lab::start().await;
    let v1 = version_of(&firmware(t, "imn-agent"));
    let v2_bin = firmware(t, "imn-agent-next");
    let v2 = version_of(&v2_bin);
    let deb = root().join(format!("target/packages/imn-agent_{v1}_amd64.deb"));
    assert!(
        deb.exists(),
        "{} is missing: run cross/build.sh",
        deb.display()
    );
    let r = TempDir::new("deb-update");
    scratch_root(r.path());
    dpkg(r.path(), &["-i", deb.to_str().unwrap()]);
    let installed = r.path().join("usr/bin/imn-agent");
    let conf = r.path().join("etc/imn/agent.toml");
    let data = r.path().join("var/lib/imn-agent");
    let shipped = release::sha256_hex(&std::fs::read(&installed).unwrap());
    // The packaged config, unedited (dpkg --verify would report an edited conffile):
    // it turns the supervisor on; the lab's broker and key come as flags.
    let text = std::fs::read_to_string(&conf).unwrap();
    assert!(text.contains("\nsupervise = true\n"), "{text}");
    let start = || {
        lab.packaged(
            "deb-agent",
            &installed,
            ("--config", &conf),
            &data,
            r.path(),
        )
    };
    let mut agent = start();
    lab.wait_version("deb-agent", &v1, Duration::from_secs(60))
        .await;
    let v2_bytes = std::fs::read(&v2_bin).unwrap();
    let resp = lab.add_release(lab.sign(&v2_bytes, &v2, t, false)).await;
    assert_eq!(resp.status, 201, "{}", resp.body);
    lab.rollout(
        json!({"version": v2, "agents": {"ids": ["deb-agent"]}, "canary_pct": 100, "waves": [100]}),
    )
    .await;
    lab.wait_version("deb-agent", &v2, Duration::from_secs(120))
        .await;
    wait_child_exe(
        agent.pid(),
        &data.join(format!("update/bin/imn-agent-{v2}")),
    )
    .await;

    // dpkg's files are as shipped: the release lives in the data directory.
    let verify = dpkg(r.path(), &["--verify", "imn-agent"]);
    assert_eq!(verify.trim(), "", "dpkg --verify after the self-update");
    assert_eq!(
        release::sha256_hex(&std::fs::read(&installed).unwrap()),
        shipped
    );

    // A later package (the same newer build, packaged as its version), installed the
    // way an operator upgrades: dpkg -i, then the service restarts.
    let out = TempDir::new("deb-later");
    run(Command::new("bash")
        .arg(root().join("cross/package.sh"))
        .args(["deb", t.triple, "full"])
        .env("IMN_PKG_BIN", &v2_bin)
        .env("IMN_PKG_VERSION", &v2)
        .env("IMN_PKG_OUT", out.path()));
    let later = out.path().join(format!("imn-agent_{v2}_amd64.deb"));
    dpkg(r.path(), &["-i", later.to_str().unwrap()]);
    assert!(dpkg(r.path(), &["-s", "imn-agent"]).contains(&format!("Version: {v2}")));
    assert_eq!(dpkg(r.path(), &["--verify", "imn-agent"]).trim(), "");
    let st = agent.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    assert!(
        st.is_some_and(|s| s.success()),
        "the supervisor stops cleanly: {st:?}"
    );
    let mut agent = start();
    wait_child_exe(agent.pid(), &installed).await;
    lab.wait_version("deb-agent", &v2, Duration::from_secs(60))
        .await;
    let state = supervisor_state(&data);
    assert_eq!(
        state["current"],
        Value::Null,
        "the packaged binary runs: {state}"
    );
    assert!(
        agent
            .log_text()
            .contains("the package was upgraded; running the packaged binary"),
        "{}",
        agent.log_text()
    );
    agent.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    dpkg(r.path(), &["--purge", "imn-agent"]);
    assert!(
        !data.exists(),
        "purge deletes the data directory, releases included"
    );
}

/// The same for the .ipk layout (opkg unpacks data.tar.gz over the root; procd runs
/// /usr/bin/imn-agent --uci /etc/config/imn): after a self-update every file of the
/// package is as shipped, and a later package unpacked over it runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipk_agent_self_updates_without_touching_package_files_and_a_later_package_wins() {
    use imn_tests::packages::run;
    let t = &X86_64;
    let lab = Lab::start().await;
    let v1 = version_of(&firmware(t, "imn-agent"));
    let v2_bin = firmware(t, "imn-agent-next");
    let v2 = version_of(&v2_bin);
    let ipk = root().join(format!("target/packages/imn-agent-full_{v1}_x86_64.ipk"));
    assert!(
        ipk.exists(),
        "{} is missing: run cross/build.sh",
        ipk.display()
    );
    let r = TempDir::new("ipk-update");
    // opkg's install: the data archive unpacked over the root.
    let unpack = |ipk: &Path, into: &Path| -> Vec<String> {
        let x = TempDir::new("ipk-x");
        run(Command::new("tar")
            .arg("-xzf")
            .arg(ipk)
            .arg("-C")
            .arg(x.path()));
        run(Command::new("tar")
            .arg("-xzf")
            .arg(x.path().join("data.tar.gz"))
            .arg("-C")
            .arg(into));
        run(Command::new("tar")
            .arg("-tzf")
            .arg(x.path().join("data.tar.gz")))
        .lines()
        .filter(|l| !l.ends_with('/'))
        .map(str::to_string)
        .collect()
    };
    let files = unpack(&ipk, r.path());
    let before = digests(r.path(), &files);
    let installed = r.path().join("usr/bin/imn-agent");
    let uci = r.path().join("etc/config/imn");
    assert!(std::fs::read_to_string(&uci)
        .unwrap()
        .contains("option supervise '1'"));
    let data = r.path().join("usr/lib/imn-agent");
    let start = || lab.packaged("ipk-agent", &installed, ("--uci", &uci), &data, r.path());
    let mut agent = start();
    lab.wait_version("ipk-agent", &v1, Duration::from_secs(60))
        .await;
    let v2_bytes = std::fs::read(&v2_bin).unwrap();
    let resp = lab.add_release(lab.sign(&v2_bytes, &v2, t, false)).await;
    assert_eq!(resp.status, 201, "{}", resp.body);
    lab.rollout(
        json!({"version": v2, "agents": {"ids": ["ipk-agent"]}, "canary_pct": 100, "waves": [100]}),
    )
    .await;
    lab.wait_version("ipk-agent", &v2, Duration::from_secs(120))
        .await;
    wait_child_exe(
        agent.pid(),
        &data.join(format!("update/bin/imn-agent-{v2}")),
    )
    .await;
    assert_eq!(
        digests(r.path(), &files),
        before,
        "the package's files are as shipped"
    );

    // A later .ipk unpacked over it (opkg upgrade), and procd's restart.
    let out = TempDir::new("ipk-later");
    run(Command::new("bash")
        .arg(root().join("cross/package.sh"))
        .args(["ipk", t.triple, "full"])
        .env("IMN_PKG_BIN", &v2_bin)
        .env("IMN_PKG_VERSION", &v2)
        .env("IMN_PKG_OUT", out.path()));
    let later = out.path().join(format!("imn-agent-full_{v2}_x86_64.ipk"));
    agent.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    let files = unpack(&later, r.path());
    assert_eq!(
        release::sha256_hex(&std::fs::read(&installed).unwrap()),
        release::sha256_hex(&v2_bytes)
    );
    let mut agent = start();
    wait_child_exe(agent.pid(), &installed).await;
    lab.wait_version("ipk-agent", &v2, Duration::from_secs(60))
        .await;
    assert_eq!(supervisor_state(&data)["current"], Value::Null);
    assert!(!files.is_empty());
    agent.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
}
