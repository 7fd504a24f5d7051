//! Issue 23, trust boundaries: one hostile agent cannot stall or flood the system.
//!
//! Each test starts its own cloud with auth on, a real `imn-agent` as the honest agent
//! and a hostile agent (an enrolled identity with a valid token, signing every message
//! with its own key, driven by the test through `imn_tests::hostile`), times the honest
//! agent's echo round trips through the API before and during the attack, and asserts
//! the attack's outcome, that the honest results kept arriving within the harness's
//! bounds (`ROUND_TRIP_MAX`, `ROUND_TRIP_P50_MAX`, `ONE_ROUND_TRIP_PER`) and, where the
//! attack is about volume, that the backend's memory stayed within `RSS_GROWTH_MAX_MIB`.
//!
//! The tests run one at a time (they measure latency on a shared two-core machine).

use std::time::{Duration, Instant};

use imn_proto::results::{ModuleOutcome, ModuleOutput};
use imn_proto::wire::{Envelope, Heartbeat, Kind, Record, RecordBody, RequestState, StateChange};
use imn_tests::hostile::*;
use imn_tests::{prom_value, wait_for, TempDir};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

/// One test at a time: each measures the honest agent's latency.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The `/metrics` page stays under this through the label bomb. Each instrument keeps
/// at most 64 series per agent with labels of at most 128 bytes: the histograms with
/// an agent label (ping RTT, HTTP time) hold at most 2 × 64 series × 17 lines of
/// ~250 bytes ≈ 550 kB of the hostile agent's. Without the series cap the 3,000 hosts
/// alone would make ~13 MB; without the label cap, hundreds of MB.
const METRICS_PAGE_MAX: usize = 1024 * 1024;

/// A cloud on `store` (with `extra` flags), the honest agent `honest` (a real
/// imn-agent), the hostile agent `hostile`, and a probe timing the honest agent's round
/// trips; the baseline round trips are printed.
async fn scene(store: StoreKind, extra: &[&str]) -> (Cloud, HostileAgent, Probe) {
    let mut cloud = Cloud::start(store, extra).await;
    cloud.honest("honest").await;
    let hostile = cloud.hostile("hostile").await;
    let probe = Probe::start(&cloud.admin, "honest");
    let base = probe.baseline(5).await;
    println!("baseline ({store:?}): honest {}", base.describe());
    base.assert_kept_arriving("baseline");
    (cloud, hostile, probe)
}

/// A record of `body` at time 1 (the smallest encoding: attacks that need many records
/// in one message under the broker's 512 KiB limit).
fn tiny(seq: u64, body: RecordBody) -> Record {
    Record {
        seq,
        at_ms: 1,
        body,
    }
}

fn tiny_event(seq: u64) -> Record {
    tiny(
        seq,
        RecordBody::Event(imn_proto::wire::AgentEvent {
            kind: String::new(),
            message: String::new(),
        }),
    )
}

fn tiny_result(seq: u64) -> Record {
    tiny(
        seq,
        RecordBody::Result(imn_proto::wire::ModuleResult {
            request_id: String::new(),
            module: String::new(),
            received_ms: 0,
            started_ms: 0,
            finished_ms: 0,
            outcome: ModuleOutcome::Timeout,
        }),
    )
}

// =====================================================================================
// a. NUL in results
// =====================================================================================

/// NUL in every text an agent controls, on `store`: the real agent echoes "a\0b", and
/// fetches an HTTP body and a DNS TXT string with zero bytes from peers on loopback
/// (opened by a policy rule); the hostile agent sends a state change, results and an
/// event with NUL in the request id, the module, the detail, the error and the event.
/// Every record is stored and acked (none dead-lettered), reads back with the NUL
/// intact where it is JSON and escaped as U+2400 in the columns, and the real agent's
/// outbox drains.
async fn nul_in_results(store: StoreKind) {
    let _one = SERIAL.lock().await;
    let pdir = TempDir::new("hostile-policy");
    let policy = pdir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nname = \"loopback-peers\"\nallow = [\"127.0.0.0/8\"]\n",
    )
    .unwrap();
    let (cloud, hostile, probe) = scene(store, &["--policy", policy.to_str().unwrap()]).await;
    let api = &cloud.admin;
    let attack = Instant::now();

    // The real agent: echo.
    let r = api
        .post(
            "/agent/honest/echo_module?wait=10",
            &json!({"message": "a\u{0}b"}).to_string(),
            &[],
        )
        .await;
    assert_eq!(r.body["state"], "succeeded", "{}", r.body);
    assert_eq!(r.body["result"]["message"], "a\u{0}b", "{}", r.body);
    let rid = r.body["request_id"].as_str().unwrap().to_string();
    let back = api.get(&format!("/agents/honest/results/{rid}")).await;
    assert_eq!(back.status, 200, "{}", back.body);
    assert_eq!(back.body["result"]["message"], "a\u{0}b", "{}", back.body);

    // The real agent: an HTTP body with zero bytes.
    let port = http_peer(b"a\0b\0c");
    let r = api
        .post(
            "/agent/honest/http?wait=20",
            &json!({"url": format!("http://127.0.0.1:{port}/nul")}).to_string(),
            &[],
        )
        .await;
    assert_eq!(r.body["state"], "succeeded", "{}", r.body);
    assert_eq!(
        r.body["result"]["response"]["body_preview"], "a\u{0}b\u{0}c",
        "{}",
        r.body
    );
    let rid = r.body["request_id"].as_str().unwrap().to_string();
    let back = api.get(&format!("/agents/honest/results/{rid}")).await;
    assert_eq!(
        back.body["result"]["response"]["body_preview"], "a\u{0}b\u{0}c",
        "{}",
        back.body
    );

    // The real agent: a DNS TXT string with a zero byte.
    let port = dns_txt_peer(b"a\0b");
    let r = api
        .post(
            "/agent/honest/dns?wait=20",
            &json!({"name": "nul.imn.test", "type": "TXT", "server": format!("127.0.0.1:{port}"), "edns_size": 0})
                .to_string(),
            &[],
        )
        .await;
    assert_eq!(r.body["state"], "succeeded", "{}", r.body);
    let txt = |v: &Value| {
        v["result"]["reply"]["message"]["answer"][0]["data"]["txt"]["strings"][0].clone()
    };
    assert_eq!(txt(&r.body), "a\u{0}b", "{}", r.body);
    let rid = r.body["request_id"].as_str().unwrap().to_string();
    let back = api.get(&format!("/agents/honest/results/{rid}")).await;
    assert_eq!(txt(&back.body), "a\u{0}b", "{}", back.body);

    // Its outbox drains: every record was acked.
    wait_for("the honest agent's outbox to drain", T, || {
        let api = api.clone();
        async move {
            let a = api.get("/agents/honest").await.body;
            (a["outbox"]["depth"] == 0).then_some(())
        }
    })
    .await;

    // The hostile agent: a request made for it, moved with NUL in its detail, its
    // module and its error; a result with NUL in its request id; an event.
    let r = api
        .post(
            "/agent/hostile/echo_module",
            &json!({"message": "for the hostile agent"}).to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let req = r.body["request_id"].as_str().unwrap().to_string();
    let e = hostile.epoch;
    let records = vec![
        Record {
            seq: 1,
            at_ms: imn_proto::now_ms(),
            body: RecordBody::State(StateChange {
                request_id: req.clone(),
                state: RequestState::Running,
                detail: Some("run\u{0}ning".into()),
            }),
        },
        result(
            2,
            &req,
            "echo\u{0}module",
            ModuleOutcome::Failed("fail\u{0}ed".into()),
        ),
        echo(3, "re\u{0}quest", "x\u{0}y"),
        event(4, "ki\u{0}nd", "mes\u{0}sage"),
    ];
    hostile.batch(e, records).await;
    hostile.wait_acked(e, &[1, 2, 3, 4], T).await;
    assert_eq!(cloud.records_of("hostile").await, 4);

    let st = api.get(&format!("/modules/states/{req}")).await.body;
    assert_eq!(st["state"], "failed", "{st}");
    let details: Vec<&str> = st["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["detail"].as_str())
        .collect();
    assert!(details.contains(&"run\u{2400}ning"), "{st}");
    assert!(details.contains(&"fail\u{2400}ed"), "{st}");
    let results = api.get("/agents/hostile/results?limit=10").await.body;
    let by_rid = |rid: &str| {
        results
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["request_id"] == rid)
            .cloned()
            .unwrap_or_else(|| panic!("no result {rid:?} in {results}"))
    };
    let failed = by_rid(&req);
    assert_eq!(failed["module"], "echo\u{2400}module", "{failed}");
    assert_eq!(failed["error"], "fail\u{0}ed", "{failed}");
    let echoed = by_rid("re\u{2400}quest");
    assert_eq!(echoed["result"]["message"], "x\u{0}y", "{echoed}");
    let events = api.get("/agents/hostile/events").await.body;
    assert_eq!(events[0]["kind"], "ki\u{0}nd", "{events}");
    assert_eq!(events[0]["message"], "mes\u{0}sage", "{events}");

    let h = cloud.health().await;
    assert_eq!(h["dead_letters"], 0, "nothing was dead-lettered: {h}");
    assert_eq!(h["store_errors"], 0, "{h}");
    assert_eq!(hostile.bad_acks(), 0);
    probe
        .after(attack)
        .await
        .assert_kept_arriving("NUL in results");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_in_results_sqlite() {
    nul_in_results(StoreKind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_in_results_postgres() {
    nul_in_results(StoreKind::Postgres).await;
}

// =====================================================================================
// b. A poison record
// =====================================================================================

const POISON: &str = "POISON-7f3a";

/// A record the store refuses on purpose (a trigger on SQLite, a CHECK constraint on
/// PostgreSQL, on bodies carrying a marker) in the middle of a batch: it lands in the
/// dead letters with the database's reason, the rest of the batch is stored, the whole
/// batch is acked, a resend of it is a duplicate, and the honest agent's results keep
/// arriving.
async fn poison_record(store: StoreKind) {
    let _one = SERIAL.lock().await;
    let (cloud, hostile, probe) = scene(store, &[]).await;
    cloud
        .store_sql(&match store {
            StoreKind::Sqlite => format!(
                "CREATE TRIGGER imn_test_poison BEFORE INSERT ON records \
                 WHEN NEW.body_json LIKE '%{POISON}%' \
                 BEGIN SELECT RAISE(ABORT, 'imn_test_poison: refused on purpose'); END;"
            ),
            StoreKind::Postgres => format!(
                "ALTER TABLE records ADD CONSTRAINT imn_test_poison \
                 CHECK (body::text NOT LIKE '%{POISON}%')"
            ),
        })
        .await;
    let attack = Instant::now();
    let e = hostile.epoch;
    let poison_seq = 25;
    let records: Vec<Record> = (1..=50)
        .map(|s| {
            if s == poison_seq {
                echo(s, "poison", POISON)
            } else {
                echo(s, &format!("fine-{s}"), "fine")
            }
        })
        .collect();
    hostile.batch(e, records).await;
    let all: Vec<u64> = (1..=50).collect();
    hostile.wait_acked(e, &all, T).await;

    let dead = cloud.admin.get("/admin/dead-letters?agent=hostile").await;
    assert_eq!(dead.status, 200, "{}", dead.body);
    let dead = dead.body.as_array().unwrap().clone();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let d = &dead[0];
    assert_eq!(d["record"]["seq"], poison_seq, "{d}");
    assert_eq!(d["record"]["epoch"], e, "{d}");
    assert_eq!(d["kind"], "result", "{d}");
    assert!(
        d["reason"].as_str().unwrap().contains("imn_test_poison"),
        "the database's reason: {d}"
    );
    assert!(d["body"].as_str().unwrap().contains(POISON), "{d}");
    let h = cloud.health().await;
    assert!(h["dead_letters"].as_u64().unwrap() >= 1, "{h}");
    assert!(h["ingest"]["dead_lettered"].as_u64().unwrap() >= 1, "{h}");
    assert_eq!(cloud.records_of("hostile").await, 49);
    let results = cloud
        .admin
        .get("/agents/hostile/results?limit=100")
        .await
        .body;
    let stored = results.as_array().unwrap();
    assert_eq!(stored.len(), 49, "{results}");
    assert!(!results.to_string().contains(POISON));

    // Sent again (the agent never saw an ack, say): a duplicate, acked, not kept twice.
    let acks = hostile.acks_received();
    hostile
        .batch(e, vec![echo(poison_seq, "poison", POISON)])
        .await;
    wait_for("the resend's ack", T, || async {
        (hostile.acks_received() > acks).then_some(())
    })
    .await;
    let dead = cloud
        .admin
        .get("/admin/dead-letters?agent=hostile")
        .await
        .body;
    assert_eq!(dead.as_array().unwrap().len(), 1, "{dead}");
    // And the store takes what follows.
    hostile.batch(e, vec![echo(51, "after", "fine")]).await;
    hostile.wait_acked(e, &[51], T).await;
    assert_eq!(cloud.records_of("hostile").await, 50);
    probe
        .after(attack)
        .await
        .assert_kept_arriving("poison record");

    // Kept up for 5 s: five batches a second, each with a poison record, each sending
    // the store down its slow path (the group refused, each batch alone, each record
    // of the poisoned batch alone).
    let sustained = Instant::now();
    let mut seq = 51;
    let mut sent = Vec::new();
    let mut poisoned = 0;
    while sustained.elapsed() < Duration::from_secs(5) {
        let records: Vec<Record> = (0..50)
            .map(|i| {
                seq += 1;
                sent.push(seq);
                if i == 20 {
                    echo(seq, &format!("poison-{seq}"), POISON)
                } else {
                    echo(seq, &format!("fine-{seq}"), "fine")
                }
            })
            .collect();
        hostile.batch(e, records).await;
        poisoned += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    hostile.wait_acked(e, &sent, T).await;
    let dead = cloud
        .admin
        .get("/admin/dead-letters?agent=hostile&limit=1000")
        .await
        .body;
    assert_eq!(dead.as_array().unwrap().len(), 1 + poisoned, "{dead}");
    assert_eq!(cloud.records_of("hostile").await, 50 + 49 * poisoned as u64);
    println!(
        "{poisoned} poisoned batches in {:?}, all acked",
        sustained.elapsed()
    );
    probe
        .after(sustained)
        .await
        .assert_kept_arriving("sustained poison records");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_is_dead_lettered_and_the_rest_flow_sqlite() {
    poison_record(StoreKind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_is_dead_lettered_and_the_rest_flow_postgres() {
    poison_record(StoreKind::Postgres).await;
}

// =====================================================================================
// c. Seq spread
// =====================================================================================

/// Batches whose seqs an outbox could not have sent, each refused whole before the
/// store (counted under `rejected.bounds`, nothing stored, nothing acked), sent over
/// and over for several seconds while the honest agent's round trips stay in bound:
/// 16,000 events with descending, non-adjacent seqs (within the record cap: the seq
/// order refuses it), 40,000 such events (the record cap refuses it), and increasing
/// seqs spanning more than 2^24.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seq_spread_batches_are_refused_whole() {
    let _one = SERIAL.lock().await;
    let (cloud, hostile, probe) = scene(StoreKind::Sqlite, &[]).await;
    let bounds = cloud.counter("/rejected/bounds").await;
    let stored = cloud.counter("/records_stored").await;
    let mem = cloud.memory();
    let attack = Instant::now();
    let e = hostile.epoch;
    let descending =
        |n: u64| -> Vec<Record> { (0..n).map(|i| tiny_event(1_000_000_000 - 2 * i)).collect() };
    let shapes: [(&str, Vec<Record>); 3] = [
        ("(increasing)", descending(16_000)),
        ("(maxItems)", descending(40_000)),
        (
            "(seqSpread)",
            (0..1000).map(|i| tiny_event(1 + i * (1 << 15))).collect(),
        ),
    ];
    let shed = cloud.counter("/ingest/shed").await;
    let mut sent = 0u64;
    let mut bytes = 0usize;
    let rounds = 10;
    for _ in 0..rounds {
        for (_, records) in &shapes {
            bytes += hostile.batch(e, records.clone()).await;
            sent += 1;
        }
    }
    // Under load a batch can go missing before it is looked at: past this agent's
    // share of the ingest queue it is shed (unacked, counted under `ingest.shed`), and
    // a bridge that falls behind the broker's in-memory log may lose it there (one CI
    // run on 2 busy cores saw 29 of 30 refused and the last never counted; which of the
    // two it was is not known). Either way it is never acked, and an agent sends it
    // again. This client does the same, with
    // the biggest shape, once the counts stop moving.
    let mut total = sent;
    let (mut refused, mut shed_n);
    let mut attempts = 0;
    loop {
        let (mut last, mut still) = (u64::MAX, Instant::now());
        loop {
            let h = cloud.health().await;
            let n = |p: &str| h.pointer(p).and_then(Value::as_u64).unwrap_or(0);
            refused = n("/rejected/bounds") - bounds;
            shed_n = n("/ingest/shed") - shed;
            if refused + shed_n >= total || still.elapsed() > Duration::from_secs(10) {
                break;
            }
            if refused + shed_n != last {
                (last, still) = (refused + shed_n, Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            refused + shed_n <= total,
            "{refused} refused + {shed_n} shed of {total} sent: one counted twice"
        );
        if refused >= sent {
            break;
        }
        attempts += 1;
        assert!(
            attempts <= 5,
            "{refused} of {sent} refused after {total} sends"
        );
        for _ in refused..sent {
            bytes += hostile.batch(e, shapes[1].1.clone()).await;
            total += 1;
        }
    }
    println!(
        "sent {sent} refused-shape batches and {} again ({shed_n} shed, {} lost before the backend), {:.1} MB",
        total - sent,
        total - refused - shed_n,
        bytes as f64 / 1e6
    );
    // Each batch refused at least once (the loop's exit), none counted twice (the
    // assertion in it); without a resend, exactly once.
    let took = attack.elapsed();
    hostile.sync(T).await;
    assert!(
        hostile.acked(e).is_empty(),
        "refused batches were acked: {:?}",
        hostile.acked(e).iter().take(10).collect::<Vec<_>>()
    );
    // Only the sync record of the hostile agent is stored.
    assert_eq!(cloud.records_of("hostile").await, 1);
    let log = cloud.backend_log();
    for (rule, _) in &shapes {
        assert!(log.contains(rule), "the log names the rule {rule}");
    }
    assert_eq!(
        cloud.counter("/ingest/records_refused").await,
        0,
        "refused before the store"
    );
    println!(
        "refused in {took:?}; records stored meanwhile (honest): {}",
        cloud.counter("/records_stored").await - stored
    );
    probe
        .after(attack)
        .await
        .assert_kept_arriving("seq-spread batches");
    cloud.assert_memory_bounded("seq-spread batches", mem);
}

/// The same seqs split into valid batches (each increasing, within its spread), every
/// seq apart from the next: on SQLite the store keeps at most 1,024 seq ranges per
/// (agent, epoch) and refuses the records past them (`ingest.records_refused`, those
/// seqs not acked); first 40 batches of 1,000 events, then 10 of 16,000 results (the
/// largest batch allowed), all refused, while the honest agent's round trips stay in
/// bound.
///
/// Fails today: the store refuses the records cheaply, but the backend then builds the
/// batch's ack with `outcome.refused.contains(seq)` for every record of the batch
/// (backend/src/service.rs, `store_group`), quadratic in the refused records: ~1.7 s
/// of the single ingest loop per 16,000-record batch in the debug build, and the
/// honest round trips take 5–9 s. (With a set there, it passes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seq_gaps_past_1024_ranges_are_refused_by_the_store() {
    const RANGES: u64 = 1024;
    let _one = SERIAL.lock().await;
    let (cloud, hostile, probe) = scene(StoreKind::Sqlite, &[]).await;
    let refused = cloud.counter("/ingest/records_refused").await;
    let before = cloud.records_of("hostile").await;
    let mem = cloud.memory();
    let attack = Instant::now();
    let e = hostile.epoch;
    // Odd seqs: no two adjacent, so each stored one is a range of its own.
    let mut next = 1u64;
    let mut take = |n: u64| {
        let s: Vec<u64> = (0..n).map(|i| next + 2 * i).collect();
        next += 2 * n;
        s
    };
    let mut sent = Vec::new();
    for _ in 0..40 {
        let seqs = take(1000);
        sent.extend_from_slice(&seqs);
        hostile
            .batch(e, seqs.into_iter().map(tiny_event).collect())
            .await;
    }
    let events = sent.len() as u64;
    let phase1 = cloud
        .wait_counter(
            "/ingest/records_refused",
            refused + events - RANGES,
            Duration::from_secs(60),
        )
        .await;
    println!(
        "{events} events in 40 batches: {} refused after {:?}",
        phase1 - refused,
        attack.elapsed()
    );
    let phase2_at = Instant::now();
    for _ in 0..10 {
        let seqs = take(16_000);
        sent.extend_from_slice(&seqs);
        hostile
            .batch(e, seqs.into_iter().map(tiny_result).collect())
            .await;
    }
    let total = sent.len() as u64;
    let got = cloud
        .wait_counter(
            "/ingest/records_refused",
            refused + total - RANGES,
            Duration::from_secs(60),
        )
        .await;
    println!(
        "then 160,000 results in 10 batches: refused in {:?}",
        phase2_at.elapsed()
    );
    assert_eq!(got - refused, total - RANGES, "every record past the cap");
    hostile.sync(T).await;
    let acked = hostile.acked(e);
    let want: std::collections::BTreeSet<u64> =
        sent.iter().copied().take(RANGES as usize).collect();
    assert_eq!(acked.len() as u64, RANGES, "acked: the first {RANGES} only");
    assert_eq!(acked, want, "the first {RANGES} seqs, and only them, acked");
    assert_eq!(
        cloud.records_of("hostile").await - before,
        RANGES + 1,
        "the first {RANGES}, and the sync record"
    );
    probe
        .after(attack)
        .await
        .assert_kept_arriving("seq gaps past the range cap");
    cloud.assert_memory_bounded("seq gaps past the range cap", mem);
}

// =====================================================================================
// d. The label bomb
// =====================================================================================

/// Results made to explode the metrics: ping results for 3,000 distinct ~10 kB hosts,
/// HTTP results for 1,000 long URLs with secrets in their query strings, results of
/// 500 modules with 5 kB names. `/metrics` stays under `METRICS_PAGE_MAX`, counts what
/// it dropped (`imn_metric_series_dropped_total`), no label value is longer than the
/// 128-byte cap, none carries a query string, and the hostile agent owns at most 64
/// series of any metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_label_bomb_is_capped() {
    let _one = SERIAL.lock().await;
    let (cloud, hostile, probe) = scene(StoreKind::Sqlite, &[]).await;
    let page_before = cloud.metrics().await;
    let mem = cloud.memory();
    let attack = Instant::now();
    let e = hostile.epoch;
    let mut seq = 0u64;
    let mut next = || {
        seq += 1;
        seq
    };
    let mut batches: Vec<Vec<Record>> = Vec::new();
    let pad = "h".repeat(10_000);
    let mut batch = Vec::new();
    for i in 0..3000 {
        let s = next();
        batch.push(ping(s, &format!("p{s}"), &format!("{i}.{pad}.example")));
        if batch.len() == 40 {
            batches.push(std::mem::take(&mut batch));
        }
    }
    let path = "p".repeat(4000);
    for i in 0..1000 {
        let s = next();
        let url = format!("https://user:pw@h{i}.example/{path}/{i}?token=SECRET{i}&q={path}#frag");
        batch.push(http(s, &format!("h{s}"), &url));
        if batch.len() == 40 {
            batches.push(std::mem::take(&mut batch));
        }
    }
    // Module names up to the 64 bytes ingest takes (longer ones refuse the batch,
    // below): distinct, none in the catalog.
    let name = "m".repeat(56);
    for i in 0..500 {
        let s = next();
        batch.push(result(
            s,
            &format!("m{s}"),
            &format!("{name}-{i}"),
            ModuleOutcome::Ok(ModuleOutput::Echo(imn_proto::results::EchoResult {
                message: "bomb".into(),
            })),
        ));
        if batch.len() == 40 {
            batches.push(std::mem::take(&mut batch));
        }
    }
    batches.push(batch);
    // As an outbox sends: a window of 8 messages, each sent again after 3 s unacked
    // (the backend sheds what is past the agent's share).
    let (sent, resent, bytes) = hostile
        .deliver(
            e,
            batches,
            8,
            Duration::from_secs(3),
            Duration::from_secs(90),
        )
        .await;
    println!(
        "label bomb: {seq} results in {sent} messages ({resent} resent), {:.1} MB, stored and acked in {:?}",
        bytes as f64 / 1e6,
        attack.elapsed()
    );

    let page = cloud.metrics().await;
    println!(
        "/metrics: {} bytes before, {} bytes after (bound {METRICS_PAGE_MAX})",
        page_before.len(),
        page.len()
    );
    assert!(
        page.len() < METRICS_PAGE_MAX,
        "/metrics is {} bytes",
        page.len()
    );
    let dropped = prom_value(&page, "imn_metric_series_dropped_total");
    println!("imn_metric_series_dropped_total {dropped}");
    assert!(dropped > 0.0, "the dropped series are counted");
    let labels = label_values(&page);
    assert!(!labels.is_empty());
    let longest = labels.iter().map(|(_, v)| v.len()).max().unwrap();
    println!("{} label values, the longest {longest} bytes", labels.len());
    for (name, v) in &labels {
        assert!(
            v.len() <= 128,
            "label {name} is {} bytes: {}…",
            v.len(),
            &v[..200.min(v.len())]
        );
        assert!(
            !v.contains('?') && !v.contains("SECRET") && !v.contains("pw@"),
            "label {name} carries a URL's query or user info: {v}"
        );
        if name == "module" {
            assert!(
                imn_proto::catalog::find(v).is_some() || v == "other",
                "module label {v}"
            );
        }
    }
    // At most 64 series of the hostile agent in any metric.
    let mut per_metric: std::collections::HashMap<&str, usize> = Default::default();
    for l in page.lines().filter(|l| l.contains("agent=\"hostile\"")) {
        let name = l.split('{').next().unwrap();
        if name.ends_with("_bucket") || name.ends_with("_sum") {
            continue;
        }
        *per_metric
            .entry(name.trim_end_matches("_count"))
            .or_default() += 1;
    }
    println!("hostile series per metric: {per_metric:?}");
    for (m, n) in &per_metric {
        assert!(*n <= 64, "{m}: {n} series of the hostile agent");
    }
    assert!(
        per_metric.get("imn_ping_rtt_seconds").copied().unwrap_or(0) > 0,
        "some ping series kept: {per_metric:?}"
    );
    probe.after(attack).await.assert_kept_arriving("label bomb");
    cloud.assert_memory_bounded("label bomb", mem);
    // A module name past 64 bytes refuses its batch whole before anything is counted.
    let bounds = cloud.counter("/rejected/bounds").await;
    hostile
        .batch(
            e,
            vec![result(
                u64::MAX / 2,
                "long-module",
                &"m".repeat(5000),
                ModuleOutcome::Ok(ModuleOutput::Echo(imn_proto::results::EchoResult {
                    message: "bomb".into(),
                })),
            )],
        )
        .await;
    cloud
        .wait_counter("/rejected/bounds", bounds + 1, Duration::from_secs(30))
        .await;
}

// =====================================================================================
// e. The schedule-version hello
// =====================================================================================

/// After a normal hello, a hello claiming schedule version 2^64 − 2 is refused whole
/// (`rejected.bounds`), the agent's schedule version is unchanged, and a recurring
/// measurement on it and the honest agent is made (202) and stopped (200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_version_near_the_end_of_its_range_is_refused() {
    let _one = SERIAL.lock().await;
    let (cloud, hostile, probe) = scene(StoreKind::Sqlite, &[]).await;
    let attack = Instant::now();
    let before = cloud.agent("hostile").await;
    assert_eq!(before["schedule_version"], 0, "{before}");
    let bounds = cloud.counter("/rejected/bounds").await;
    // Past the one-a-second hello throttle, so the refusal is the bounds' alone.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut hello = hostile.hello();
    hello.schedule_version = u64::MAX - 1;
    hello.version = "0.0.0-evil".into();
    hostile.send(Kind::Hello, &Envelope::Hello(hello)).await;
    cloud.wait_counter("/rejected/bounds", bounds + 1, T).await;
    hostile.sync(T).await;
    let after = cloud.agent("hostile").await;
    assert_eq!(after["schedule_version"], 0, "{after}");
    assert_eq!(after["version"], before["version"], "{after}");
    assert!(cloud.backend_log().contains("/schedule_version"));

    let r = cloud
        .admin
        .post(
            "/v1/measurements",
            &json!({
                "module": "echo_module",
                "params": {"message": "scheduled"},
                "agents": {"ids": ["hostile", "honest"]},
                "schedule": {"interval_s": 60},
            })
            .to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    // The honest agent has the set (and has said hello with it) before the stop...
    let schedules_updated = |prefix: &'static str| {
        let cloud = &cloud;
        async move {
            wait_for(
                &format!("the honest agent's schedule set {prefix}"),
                T,
                || async {
                    let events = cloud.admin.get("/agents/honest/events").await.body;
                    events
                        .as_array()?
                        .iter()
                        .any(|e| {
                            e["kind"] == "schedules_updated"
                                && e["message"].as_str().unwrap_or("").starts_with(prefix)
                        })
                        .then_some(())
                },
            )
            .await
        }
    };
    schedules_updated("version 1: 1 ").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = cloud.admin.delete(&format!("/v1/measurements/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // ...and the stop reaches it: its set goes to version 2, empty.
    schedules_updated("version 2: 0 ").await;
    let a = cloud.agent("hostile").await;
    println!(
        "schedule versions after the measurement: hostile {}, honest {}",
        a["schedule_version"],
        cloud.agent("honest").await["schedule_version"]
    );
    probe
        .after(attack)
        .await
        .assert_kept_arriving("schedule-version hello");
}

// =====================================================================================
// f. Floods
// =====================================================================================

/// The hostile agent publishes valid batches for 10 s, at `rate` MB/s or as fast as it
/// can: the backend sheds what is past its share (`ingest.shed`), the honest agent's
/// results keep arriving within bound, the backend's memory stays bounded, and
/// afterwards the hostile agent's own messages are taken again.
async fn batch_flood(what: &str, rate: Option<f64>, extra: &[&str]) -> Flooded {
    let _one = SERIAL.lock().await;
    let (cloud, hostile, probe) = scene(StoreKind::Sqlite, extra).await;
    let shed = cloud.counter("/ingest/shed").await;
    let e = hostile.epoch;
    // Prepared ahead (encoded and signed), so the flood is as fast as the broker takes
    // it and the test process's own work takes little CPU from the cloud: 500 valid
    // batches of 250 results of 1 kB each, new seqs each.
    let message = "f".repeat(1000);
    let flood: Vec<Vec<u8>> = (0..500u64)
        .map(|b| {
            let records = (1..=250u64)
                .map(|i| {
                    let seq = b * 250 + i;
                    tiny(
                        seq,
                        RecordBody::Result(imn_proto::wire::ModuleResult {
                            request_id: format!("flood-{seq}"),
                            module: "echo_module".into(),
                            received_ms: 1,
                            started_ms: 2,
                            finished_ms: 3,
                            outcome: ModuleOutcome::Ok(ModuleOutput::Echo(
                                imn_proto::results::EchoResult {
                                    message: message.clone(),
                                },
                            )),
                        }),
                    )
                })
                .collect();
            hostile.sign(
                Kind::Out,
                &imn_proto::wire::encode(&Envelope::Batch(imn_proto::wire::Batch {
                    epoch: e,
                    records,
                })),
            )
        })
        .collect();
    let seq = 500 * 250;
    let mem = cloud.memory();
    let attack = Instant::now();
    let (mut bytes, mut batches) = (0usize, 0u64);
    'flood: loop {
        for m in &flood {
            if attack.elapsed() >= Duration::from_secs(10) {
                break 'flood;
            }
            bytes += m.len();
            batches += 1;
            hostile.send_signed(Kind::Out, m.clone()).await;
            if let Some(rate) = rate {
                let due = Duration::from_secs_f64(bytes as f64 / (rate * 1e6));
                if let Some(wait) = due.checked_sub(attack.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
    let secs = attack.elapsed().as_secs_f64();
    let during = probe.since(attack);
    let shed_now = cloud.counter("/ingest/shed").await;
    let acked = hostile.acked(e).len();
    println!(
        "{what}: {batches} batches, {:.1} MB in {secs:.1} s ({:.1} MB/s); shed {}, records acked {acked} of {seq}",
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / secs,
        shed_now - shed
    );
    let h = cloud.health().await;
    println!(
        "{what}: the bridge forwarded {} uplink messages in all; the hostile agent's connection broke {} times",
        h["bridge"]["up_messages"],
        hostile.connection_errors()
    );
    println!(
        "{what}: honest stage times (command delivery ms, result delivery ms): {:?}",
        stage_times(&cloud.admin, "honest", during.samples.len() + 1).await
    );
    cloud.assert_memory_bounded(what, mem);
    during.assert_kept_arriving(what);
    // Once it stops (and lets go of what its client still queues), its messages are
    // taken again.
    let (id, token) = (hostile.id.clone(), hostile.token.clone());
    drop(hostile);
    HostileAgent::connect(&id, &token, cloud.mqtt_port)
        .await
        .sync(Duration::from_secs(60))
        .await;
    Flooded {
        shed: shed_now - shed,
        mb_per_s: bytes as f64 / 1e6 / secs,
        stored_mb_per_s: acked as f64 * 1.05e3 / 1e6 / secs,
    }
}

/// What a flood did.
struct Flooded {
    /// Messages the backend dropped unacked for the flooder's share.
    shed: u64,
    /// What the flooder handed its MQTT client, MB/s (its client queues what the
    /// broker does not read yet).
    mb_per_s: f64,
    /// What of it the backend stored and acked during the flood, MB/s (records of
    /// about 1.05 kB).
    stored_mb_per_s: f64,
}

/// The broker's default cap on what one client publishes, in MB/s
/// (`imn_bridge::broker::DEFAULT_CLIENT_BYTES_PER_S`, 8 MiB).
const CLIENT_CAP_MB_S: f64 = 8.0 * 1024.0 * 1024.0 / 1e6;

/// A flood of 10 MB/s with the broker's per-client cap off, so everything it sends
/// reaches the backend: about what the debug build's bridge and ingest take on this
/// machine. Whether the backend keeps up or sheds the flooder past its 4 MiB share
/// (70 to 100 messages in some runs, none in others: it depends on what else the
/// machine does), the honest agent's round trips stay in bound (p50 40–200 ms, max
/// about 0.9 s here). The share itself is proved in `backend/src/ingest.rs`'s tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_flood_of_10_mb_s_leaves_the_others_alone() {
    let f = batch_flood(
        "10 MB/s flood, no broker cap",
        Some(10.0),
        &["--max-client-bytes-per-s", "0"],
    )
    .await;
    println!(
        "10 MB/s flood: {:.1} MB/s offered, {} messages shed",
        f.mb_per_s, f.shed
    );
}

/// A flood as fast as the hostile agent can publish (5 to 7 GB in 10 s on loopback).
///
/// Without the broker's per-client cap this stalled everyone: the broker acks each QoS
/// 1 publish once it is in its log for `imn/v1/+/out`, so nothing slowed the flooder;
/// when the bridge fell behind, the broker moved the bridge's read cursor to the head
/// ("Read cursor start jumped"), dropping every agent's messages in between, and the
/// honest agent's round trips stopped. With the cap (8 MiB/s by default) the broker
/// reads the flooder's socket only that fast: TCP slows it, and the others flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_flood_at_full_speed_is_held_to_the_client_cap() {
    let f = batch_flood("full-speed flood", None, &[]).await;
    println!(
        "full-speed flood: offered {:.1} MB/s, stored {:.1} MB/s, shed {}",
        f.mb_per_s, f.stored_mb_per_s, f.shed
    );
    // What reached the store: at most the cap (plus the one second of burst it allows).
    assert!(
        f.stored_mb_per_s < 1.2 * CLIENT_CAP_MB_S,
        "the flooder got {:.1} MB/s stored past a cap of {CLIENT_CAP_MB_S:.1} MB/s",
        f.stored_mb_per_s
    );
}

/// The hostile agent sends hellos as fast as it can for 5 s: those within a second of
/// the last are dropped (`ingest.hellos_throttled`), the honest agent's results keep
/// arriving, and the backend's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_flood_is_throttled() {
    // The backend logs each hello it takes (with or without colour codes).
    fn hellos_taken(cloud: &Cloud) -> usize {
        cloud
            .backend_log()
            .lines()
            .filter(|l| l.contains("agent hello") && l.contains("hostile"))
            .count()
    }
    let _one = SERIAL.lock().await;
    let (cloud, hostile, probe) = scene(StoreKind::Sqlite, &[]).await;
    let throttled = cloud.counter("/ingest/hellos_throttled").await;
    let hellos_before = hellos_taken(&cloud);
    let mem = cloud.memory();
    let attack = Instant::now();
    let mut sent = 0u64;
    while attack.elapsed() < Duration::from_secs(5) {
        let mut h = hostile.hello();
        h.sent_at_ms = imn_proto::now_ms();
        hostile.send(Kind::Hello, &Envelope::Hello(h)).await;
        sent += 1;
    }
    let during = probe.since(attack);
    hostile.sync(T).await;
    // On 2 busy cores the broker and the bridge may still be working through the
    // flood: wait until the backend counted them all, or the count stops moving (a
    // hello shed or lost before the backend costs nothing either).
    let (mut got, mut still, mut last) = (0, Instant::now(), 0);
    while got + 10 < sent && still.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        got = cloud.counter("/ingest/hellos_throttled").await - throttled;
        if got != last {
            (last, still) = (got, Instant::now());
        }
    }
    let passed = hellos_taken(&cloud) - hellos_before;
    println!("hello flood: {sent} hellos in 5 s, {got} throttled, {passed} taken");
    // At most one a second passes, so about 5 of them.
    assert!(passed <= 10, "{passed} of {sent} hellos taken");
    assert!(
        got + 10 >= sent,
        "{got} of {sent} hellos throttled: {}",
        cloud.health().await
    );
    during.assert_kept_arriving("hello flood");
    cloud.assert_memory_bounded("hello flood", mem);
}

// =====================================================================================
// g. Oversized batches, heartbeats and hellos
// =====================================================================================

/// A batch of 2,000 events stores 1,000 (`ingest.events_deferred`), acks only those,
/// and the rest are stored when sent again; a heartbeat with 10,000 interfaces and a
/// hello with 1,000 tags are refused (`rejected.bounds`) and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_event_batches_heartbeats_and_hellos_are_bounded() {
    let _one = SERIAL.lock().await;
    let (cloud, hostile, probe) = scene(StoreKind::Sqlite, &[]).await;
    let attack = Instant::now();
    let e = hostile.epoch;
    let deferred = cloud.counter("/ingest/events_deferred").await;
    let before = cloud.records_of("hostile").await;
    let events: Vec<Record> = (1..=2000).map(|s| event(s, "flood", "event")).collect();
    hostile.batch(e, events.clone()).await;
    let first: Vec<u64> = (1..=1000).collect();
    hostile.wait_acked(e, &first, T).await;
    hostile.sync(T).await;
    assert_eq!(
        hostile.acked(e).len(),
        1000,
        "only the first 1,000 events acked"
    );
    assert_eq!(
        cloud.counter("/ingest/events_deferred").await - deferred,
        1000
    );
    assert_eq!(cloud.records_of("hostile").await - before, 1000 + 1);
    // Sent again, as the agent's outbox does with what was not acked.
    hostile.batch(e, events[1000..].to_vec()).await;
    let rest: Vec<u64> = (1001..=2000).collect();
    hostile.wait_acked(e, &rest, T).await;
    assert_eq!(cloud.records_of("hostile").await - before, 2000 + 1);

    // A heartbeat with 10,000 interfaces.
    let bounds = cloud.counter("/rejected/bounds").await;
    let mut hb = Heartbeat {
        sent_at_ms: imn_proto::now_ms(),
        outbox_depth: 123_456,
        ..Default::default()
    };
    hb.system.interfaces = (0..10_000)
        .map(|i| imn_proto::results::InterfaceStats {
            name: format!("if{i}"),
            rx_bytes: 0,
            rx_packets: 0,
            rx_errors: 0,
            tx_bytes: 0,
            tx_packets: 0,
            tx_errors: 0,
        })
        .collect();
    hostile
        .send(Kind::Heartbeat, &Envelope::Heartbeat(hb))
        .await;
    cloud.wait_counter("/rejected/bounds", bounds + 1, T).await;
    let a = cloud.agent("hostile").await;
    let nics = a["heartbeat"]["system"]["interfaces"]
        .as_array()
        .map_or(0, Vec::len);
    assert!(nics < 10_000, "the heartbeat was taken: {nics} interfaces");
    assert_ne!(a["outbox"]["depth"], 123_456, "{}", a["outbox"]);
    assert!(cloud.backend_log().contains("/system/interfaces"));

    // A hello with 1,000 tags.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut hello = hostile.hello();
    hello.tags = (0..1000).map(|i| format!("tag-{i}")).collect();
    hostile.send(Kind::Hello, &Envelope::Hello(hello)).await;
    cloud.wait_counter("/rejected/bounds", bounds + 2, T).await;
    hostile.sync(T).await;
    let a = cloud.agent("hostile").await;
    assert_eq!(a["tags"], json!(["hostile"]), "{}", a["tags"]);
    assert!(cloud.backend_log().contains("/tags"));
    probe
        .after(attack)
        .await
        .assert_kept_arriving("oversized events, heartbeat and hello");
}
