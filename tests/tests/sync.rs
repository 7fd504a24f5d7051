//! Sync behaviour that needs a backlog: live results ahead of it (`--live-first`).

use std::time::{Duration, Instant};

use imn_tests::bench_drain::prefill_outbox;
use imn_tests::{bin, Proc, Up};

const BACKLOG: u64 = 80_000;

/// Starts an agent over a prefilled outbox, asks for one echo as soon as it says
/// hello, and returns how many records the backend held when the echo's result was
/// stored, and the agent's total once drained.
async fn echo_during_drain(live_first: bool) -> (u64, u64) {
    let up = Up::start(0, &[]).await;
    let data = up.dir.path().join("edge-live");
    prefill_outbox(&data, BACKLOG as usize);
    let _agent = Proc::spawn(
        "edge-live",
        &bin("imn-agent"),
        &[
            "--id",
            "edge-live",
            "--broker",
            &up.broker_url(),
            "--data",
            data.to_str().unwrap(),
            "--heartbeat-ms",
            "500",
            "--live-first",
            if live_first { "true" } else { "false" },
            // Live records overtake what is not yet sent; the window's batches in
            // flight (8 x 32 KiB, about 3,400 records here) still go first.
            "--batch-max-bytes",
            "32768",
        ],
        up.dir.path(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while up.api.try_get("/agents/edge-live").await.map(|r| r.status) != Some(200) {
        assert!(Instant::now() < deadline, "the agent never said hello");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = up
        .api
        .post("/agent/edge-live/echo_module", r#"{"message":"live"}"#, &[])
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let rid = r.body["request_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(300);
    let stored_then = loop {
        let st = up.api.get(&format!("/modules/states/{rid}")).await.body;
        if st["state"] == "succeeded" {
            break up.api.get("/agents/edge-live").await.body["records_stored"]
                .as_u64()
                .unwrap();
        }
        assert!(Instant::now() < deadline, "the echo never finished: {st}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let total = loop {
        let n = up.api.get("/agents/edge-live").await.body["records_stored"]
            .as_u64()
            .unwrap();
        if n >= BACKLOG + 3 {
            break n;
        }
        assert!(Instant::now() < deadline, "the backlog never drained ({n})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    (stored_then, total)
}

/// With `--live-first`, a result made after the reconnect is stored while most of the
/// backlog still waits; without it, it comes after the whole backlog. Both drain
/// everything: the backlog, and the echo's received, running and result records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_results_overtake_the_backlog() {
    let (then, total) = echo_during_drain(true).await;
    eprintln!("live-first: echo stored when {then} of {total} records were");
    assert_eq!(total, BACKLOG + 3, "every record stored once");
    assert!(
        then < BACKLOG / 4,
        "live-first: the echo came back after {then} of {BACKLOG} backlog records"
    );
    let (then, total) = echo_during_drain(false).await;
    eprintln!("in order: echo stored when {then} of {total} records were");
    assert_eq!(total, BACKLOG + 3, "every record stored once");
    assert!(
        then >= BACKLOG,
        "in order: the echo came back after the backlog, not after {then}"
    );
}
