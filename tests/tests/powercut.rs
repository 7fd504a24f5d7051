//! Power cuts. The static x86_64 agent runs in a qemu VM (TCG, Debian's kernel, a
//! busybox initramfs) with its data on an ext4 virtio disk; its only network is one
//! forwarded port to a proxy on the host's loopback, in front of `imn up`'s broker.
//! Killing qemu with SIGKILL is the power cut: unlike a killed process, the guest's
//! page cache is gone. What the guest had written to its disk is kept, flushed or not
//! (qemu wrote it to the image file, in the host's page cache). The second test puts
//! a volatile write cache in front of the disk (tests/src/nbd.rs), which also loses
//! what the guest wrote but did not flush, as an SD card or eMMC with a cache can.
//!
//! Schedules of 1 s and 30 s run, and a 1 s filler of 4 KB results grows the outbox.
//! The cuts come at random moments and right after the backend stored a result, half
//! of them with the broker down (the proxy refuses the guest). Then, per slot: no slot
//! is stored twice (and the backend dropped no second result either), every gap is
//! named by a `schedule_missed` event, an interrupted run is reported as failed with
//! `run_interrupted`, and no outbox is replaced without an event.
//!
//! `IMN_POWER_CUTS` sets the number of cuts (10 by default; the figures in the README
//! are from 50). The guest's disk statistics give the flash written per heartbeat
//! (idle) and per result (busy): `POWERCUT-FLASH` in the output. The rig is
//! tests/powercut/vm.sh.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use imn_tests::*;
use serde_json::json;
use tokio::net::TcpListener;

const T: Duration = Duration::from_secs(120);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The broker as the VM sees it: a proxy in front of `imn up`'s broker (refusing the
/// guest while the broker is "down").
use imn_tests::proxy::TcpProxy as Proxy;

struct Vm {
    dir: PathBuf,
    proxy_port: u16,
    probe_port: u16,
    boots: usize,
    /// The disk behind a volatile write cache, or None for the image file as is.
    volatile: Option<imn_tests::nbd::VolatileDisk>,
}

impl Vm {
    fn sh(&self, args: &[&str]) {
        let out = std::process::Command::new("bash")
            .arg(root().join("tests/powercut/vm.sh"))
            .args(args)
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "vm.sh {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("vm.log")).unwrap_or_default()
    }

    /// Boots on the same disk and waits for the guest's init to report.
    async fn boot(&mut self) {
        self.boots += 1;
        let before = self.log().matches("IMN-BOOTED").count();
        let (p, probe) = (self.proxy_port.to_string(), self.probe_port.to_string());
        let disk = match &self.volatile {
            Some(d) => format!("nbd://127.0.0.1:{}", d.port()),
            None => "disk.img".to_string(),
        };
        self.sh(&["boot", self.dir.to_str().unwrap(), &p, &probe, &disk]);
        let dir = self.dir.clone();
        wait_for("the VM to boot", T, || {
            let dir = dir.clone();
            async move {
                let log = std::fs::read_to_string(dir.join("vm.log")).unwrap_or_default();
                (log.matches("IMN-BOOTED").count() > before).then_some(())
            }
        })
        .await;
        let log = self.log();
        assert!(
            !log.contains("NOT-ISOLATED"),
            "the guest reached the host beyond its one forwarded port"
        );
        assert_eq!(
            log.matches("ISOLATED").count(),
            self.boots,
            "every boot checks that the guest reaches nothing else:\n{log}"
        );
        assert!(!log.contains("MOUNT FAILED"), "{log}");
    }

    /// The power cut.
    fn cut(&self) {
        let pid = std::fs::read_to_string(self.dir.join("qemu.pid")).unwrap();
        let pid: i32 = pid.trim().parse().unwrap();
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let t = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() && t.elapsed() < Duration::from_secs(10) {
            // A zombie until reaped: reap it (qemu is a child of the bash that exited,
            // so it is re-parented; polling its state is enough).
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.contains(") Z ") {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The device's cache goes with the power: what the guest did not flush is lost.
        if let Some(d) = &self.volatile {
            d.power_cut();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("qemu.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

async fn scheduled_results(api: &Api, measurement: &str) -> usize {
    api.get(&format!("/v1/results?measurement={measurement}&limit=1000"))
        .await
        .body["results"]
        .as_array()
        .map_or(0, Vec::len)
}

fn cuts(default: usize) -> usize {
    std::env::var("IMN_POWER_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_never_lose_repeat_or_misreport_a_result() {
    power_cuts(cuts(10), false).await;
}

/// Stretch: the disk is an NBD server in this process that keeps every write in a
/// volatile cache until the guest flushes it (or writes with FUA), and drops the cache
/// at each cut, as an SD card or eMMC with a write cache does (see tests/src/nbd.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_on_a_disk_that_drops_unflushed_writes() {
    power_cuts(cuts(6), true).await;
}

async fn power_cuts(cuts: usize, volatile: bool) {
    // IMN_POWERCUT_AGENT: another static agent (an earlier build, for its flash figures).
    let agent = std::env::var_os("IMN_POWERCUT_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/firmware/full/x86_64-unknown-linux-musl/imn-agent"));
    assert!(
        agent.exists(),
        "{} is missing: run `bash cross/build.sh` first (tests/run.sh does)",
        agent.display()
    );
    let up = Up::start(0, &[]).await;
    let proxy = Proxy::start(up.mqtt_port).await;
    // Something listens where the guest's isolation probe knocks: reaching it would
    // mean the guest can reach the host beyond its one port.
    let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let probe_port = probe.local_addr().unwrap().port();
    let dir = TempDir::new("powercut");
    let mut vm = Vm {
        dir: dir.path().join("vm"),
        proxy_port: proxy.port,
        probe_port,
        boots: 0,
        volatile: None,
    };
    vm.sh(&["prepare", vm.dir.to_str().unwrap(), agent.to_str().unwrap()]);
    if volatile {
        let d = imn_tests::nbd::VolatileDisk::start(&vm.dir.join("disk.img"))
            .await
            .expect("the volatile-cache disk");
        vm.volatile = Some(d);
    }
    vm.boot().await;
    up.api.wait_alive(&["vm1"], T).await;
    // Idle (heartbeats only), for the flash written per heartbeat.
    tokio::time::sleep(Duration::from_secs(secs("IMN_POWERCUT_IDLE_S", 16))).await;
    let idle = flash_window(&vm.log(), 0, 2);
    let mut ids = BTreeMap::new();
    for (name, interval_s, message) in [
        ("m1", 1, "one".to_string()),
        ("m30", 30, "thirty".to_string()),
        ("filler", 1, "f".repeat(4000)),
    ] {
        let r = up
            .api
            .post(
                "/v1/measurements",
                &json!({"module": "echo_module", "params": {"message": message},
                    "agents": {"ids": ["vm1"]}, "schedule": {"interval_s": interval_s}})
                .to_string(),
                &[],
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.body);
        ids.insert(name, r.body["id"].as_str().unwrap().to_string());
    }
    let m1 = ids["m1"].clone();
    wait_for("the first scheduled result", T, || {
        let (api, m1) = (up.api.clone(), m1.clone());
        async move { (scheduled_results(&api, &m1).await > 0).then_some(()) }
    })
    .await;

    let mut rng = Rng(0x2545f4914f6cdd1d ^ u64::from(std::process::id()));
    let mut after_result = 0;
    for i in 0..cuts {
        let broker_down = i % 2 == 1;
        if i > 0 {
            proxy.set_down(broker_down);
            vm.boot().await;
        }
        if !broker_down && i % 4 == 0 {
            // Right after a result is stored: the run the agent just finished is
            // the one a lost flush would run again.
            let before = scheduled_results(&up.api, &m1).await;
            let (api, m) = (up.api.clone(), m1.clone());
            wait_for("a new stored result", T, || {
                let (api, m) = (api.clone(), m.clone());
                async move { (scheduled_results(&api, &m).await > before).then_some(()) }
            })
            .await;
            after_result += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(2_000 + rng.below(10_000))).await;
        }
        vm.cut();
        eprintln!(
            "cut {} of {cuts} (broker {})",
            i + 1,
            if broker_down { "down" } else { "up" }
        );
    }
    // The power stays on: everything comes back.
    proxy.set_down(false);
    if cuts > 0 {
        vm.boot().await;
    }
    up.api.wait_alive(&["vm1"], T).await;
    let api = up.api.clone();
    wait_for("the outbox to drain", T, || {
        let api = api.clone();
        async move {
            let a = api.try_get("/agents/vm1").await?;
            (a.body["outbox"]["depth"] == 0).then_some(())
        }
    })
    .await;
    // Steady running, for the flash written per result; every slot due by the end
    // has had time to run and arrive.
    let from = vda_stats(&vm.log(), vm.boots - 1).len();
    tokio::time::sleep(Duration::from_secs(secs("IMN_POWERCUT_HOLD_S", 21))).await;
    let busy = flash_window(&vm.log(), vm.boots - 1, from);
    let ended_ms = imn_proto::now_ms() - 6_000;

    let events = up.api.get("/agents/vm1/events?limit=10000").await.body;
    let events = events.as_array().unwrap().clone();
    let kinds = |k: &str| events.iter().filter(|e| e["kind"] == k).count();
    let health = up.api.get("/health").await.body;
    let run_dups = health["run_duplicates_dropped"]
        .as_u64()
        .unwrap_or(u64::MAX);

    let mut total = SlotAudit::default();
    let mut epochs = std::collections::BTreeSet::new();
    for (name, id) in &ids {
        let interval_ms: i64 = if *name == "m30" { 30_000 } else { 1_000 };
        let a = audit_slots(&up.api, id, interval_ms, &events, ended_ms, &mut epochs).await;
        eprintln!("{name}: {a:?}");
        total.add(a);
    }
    let lost = kinds("outbox_lost") + kinds("outbox_corrupt");
    let summary = json!({
        "cuts": cuts,
        "cuts_right_after_a_stored_result": after_result,
        "cuts_with_broker_down": cuts / 2,
        "slots": total.slots,
        "stored_once": total.stored,
        "stored_twice": total.duplicates,
        "second_results_dropped_by_backend": run_dups,
        "missed_and_named": total.missed_explained,
        "unexplained_gaps": total.unexplained.len(),
        "run_interrupted": total.interrupted,
        "run_interrupted_events": kinds("run_interrupted"),
        "outbox_epochs": epochs.len(),
        "outbox_lost_or_corrupt_events": lost,
    });
    println!("POWERCUT {summary}");
    if let Some(d) = &vm.volatile {
        println!("POWERCUT-DISK {:?}", d.stats());
    }
    // Three 1 s results (one of them 4 KB) and one heartbeat a second while busy; one
    // heartbeat a second while idle.
    let flash = json!({
        "idle_bytes_per_heartbeat": idle.map(|b| b.round()),
        "busy_bytes_per_s": busy.map(|b| b.round()),
        "busy_bytes_per_result": busy.zip(idle).map(|(b, i)| ((b - i) / 3.0).round()),
    });
    println!("POWERCUT-FLASH {flash}");
    assert_eq!(total.duplicates, 0, "slots stored twice: {summary}");
    assert_eq!(run_dups, 0, "the agent ran a slot again: {summary}");
    assert!(
        total.unexplained.is_empty(),
        "gaps no event explains: {:?} {summary}",
        total.unexplained
    );
    assert_eq!(
        epochs.len(),
        1 + lost,
        "an outbox replaced without an event: {summary}"
    );
    assert_eq!(lost, 0, "an outbox was lost: {summary}");
    assert_eq!(
        total.interrupted,
        kinds("run_interrupted"),
        "each interrupted run is one event and one failed result: {summary}"
    );
    assert!(total.stored > cuts, "{summary}");
    drop(probe);
}

/// Seconds idle after the first boot, and steady after the last, for the flash
/// figures (`IMN_POWERCUT_IDLE_S`, `IMN_POWERCUT_HOLD_S` make them longer).
fn secs(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The VDA-STAT lines of the guest's boot number `boot` (from 0): guest uptime (s) and
/// sectors written (the 7th field of /sys/block/vda/stat), 5 s apart.
fn vda_stats(log: &str, boot: usize) -> Vec<(f64, u64)> {
    let Some(text) = log.split("IMN-BOOTED").nth(boot + 1) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.strip_prefix("VDA-STAT ")?.split_whitespace().collect();
            // Uptime, idle time, then /sys/block/vda/stat.
            Some((f.first()?.parse().ok()?, f.get(2 + 6)?.parse().ok()?))
        })
        .collect()
}

/// Bytes a second the guest wrote to its disk during boot number `boot`, from its
/// stat line number `from` (the first line is the boot itself: from 1 at least).
fn flash_window(log: &str, boot: usize, from: usize) -> Option<f64> {
    let stats = vda_stats(log, boot);
    let (a, b) = (stats.get(from.max(1))?, stats.last()?);
    (b.0 > a.0).then(|| (b.1 - a.1) as f64 * 512.0 / (b.0 - a.0))
}
