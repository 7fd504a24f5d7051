//! `imn-bench drain` and `imn-bench outbox`: how fast a backlog drains after a
//! partition, and what the outbox costs on disk under insert-then-ack.

use std::path::Path;
use std::time::{Duration, Instant};

use imn_agent::outbox::{Outbox, OutboxLimits, SledOutbox};
use imn_proto::wire::{Ack, RecordBody};
use serde_json::{json, Value};

use crate::{bin, Proc, Up};

fn result_record(i: usize) -> RecordBody {
    crate::sim::echo_result(
        format!("drain-{i:08}"),
        &format!("result {i} made while partitioned"),
    )
}

/// Peak resident memory (VmHWM) of a process, in KiB.
pub fn peak_rss_kib(pid: i32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// Current resident memory (VmRSS) of a process, in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    status_kib(pid, "VmRSS:")
}

fn status_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Bytes of all files under `dir`.
pub fn du(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                total += du(&p);
            } else if let Ok(m) = e.metadata() {
                total += m.len();
            }
        }
    }
    total
}

/// Writes `n` results into the outbox in `data`, as a partition leaves it: the same
/// `SledOutbox` the agent opens when it starts.
pub fn prefill_outbox(data: &Path, n: usize) {
    let mut ob = SledOutbox::open(data, OutboxLimits::default()).expect("outbox");
    for i in 0..n {
        ob.append(imn_proto::now_ms(), result_record(i));
    }
    ob.flush();
    assert_eq!(ob.depth(), n as u64, "the backlog fits the outbox");
}

/// Polls `f` on `tick` until it answers (for a start time finer than `wait_for`'s).
async fn wait_for_fast<F, Fut>(tick: &mut tokio::time::Interval, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<()>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while f().await.is_none() {
        assert!(Instant::now() < deadline, "the agent never said hello");
        tick.tick().await;
    }
}

/// An agent whose outbox holds `buffered` results made while it was partitioned
/// reconnects; the drain is timed until every result is stored and acked.
///
/// The backlog is written straight into the agent's outbox (the same `SledOutbox` the
/// agent uses) before the real `imn-agent` binary starts: that is what a partition
/// leaves behind, without making the benchmark wait for 100,000 module runs.
pub async fn drain(buffered: usize) -> Value {
    let up = Up::start(0, &[]).await;
    let data = up.dir.path().join("edge-drain");
    prefill_outbox(&data, buffered);
    let t0 = Instant::now();
    let agent = Proc::spawn(
        "edge-drain",
        &bin("imn-agent"),
        &[
            "--id",
            "edge-drain",
            "--broker",
            &up.broker_url(),
            "--data",
            data.to_str().unwrap(),
            "--heartbeat-ms",
            "1000",
        ],
        up.dir.path(),
    );
    let pid = agent.pid();
    let api = up.api.clone();
    let mut peak = 0;
    // The agent reconnects once its outbox is open: the backend has its hello.
    let mut hello_poll = tokio::time::interval(Duration::from_millis(5));
    wait_for_fast(&mut hello_poll, || {
        let api = api.clone();
        async move {
            let r = api.try_get("/agents/edge-drain").await?;
            (r.status == 200).then_some(())
        }
    })
    .await;
    let t_connected = Instant::now();
    // Polled every 10 ms: records_stored is a counter kept with each batch, not a scan.
    let mut poll = tokio::time::interval(Duration::from_millis(10));
    let deadline = Instant::now() + Duration::from_secs(600);
    let stored = loop {
        poll.tick().await;
        peak = peak.max(peak_rss_kib(pid));
        let n = api
            .try_get("/agents/edge-drain")
            .await
            .and_then(|a| a.body["records_stored"].as_u64())
            .unwrap_or(0);
        if n >= buffered as u64 {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "the backlog did not drain in 600 s"
        );
    };
    let drain_s = t_connected.elapsed().as_secs_f64();
    let total_s = t0.elapsed().as_secs_f64();
    peak = peak.max(peak_rss_kib(pid));
    // Every result exactly once: rows and distinct request ids in the backend's store
    // (read-only, beside the running backend; the API pages at 10,000).
    let db = up.dir.path().join("data/backend/backend.sqlite");
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("backend store");
    let (rows, distinct): (i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), COUNT(DISTINCT request_id) FROM records WHERE agent_id = 'edge-drain' AND kind = 'result'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("count results");
    let (rows, distinct) = (rows as usize, distinct as usize);
    drop(agent);
    json!({
        "scenario": "drain",
        "buffered": buffered,
        "drain_s": drain_s,
        "drain_results_per_s": buffered as f64 / drain_s,
        "start_to_drained_s": total_s,
        "stored": stored,
        "lost": buffered.saturating_sub(distinct),
        "duplicates_stored": rows - distinct,
        "peak_agent_rss_kib": peak,
        "note": "drain_s: from the backend's first sight of the reconnected agent (hello) until it stored every result, polled every 10 ms; start_to_drained_s adds the agent's start and outbox open",
    })
}

/// Insert-then-ack cycles against the outbox, with `lag` records unacked at any time;
/// reports the store's size on disk beside the live data size.
pub fn outbox_cycles(cycles: usize, lag: usize) -> Value {
    let dir = std::env::temp_dir().join(format!("imn-bench-outbox-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut ob = SledOutbox::open(&dir, OutboxLimits::default()).expect("outbox");
    let epoch = ob.epoch();
    let mut max_disk = 0u64;
    let t0 = Instant::now();
    // As the agent does: records arrive, one flush per batch of 100 before it is sent,
    // the backend's ack covers a batch, and acked records are deleted.
    let mut acked_upto = 0u64;
    for i in 0..cycles {
        let r = ob.append(imn_proto::now_ms(), result_record(i));
        if i % 100 == 99 {
            ob.flush();
            let upto = r.seq.saturating_sub(lag as u64);
            if upto > acked_upto {
                ob.ack(&Ack {
                    epoch,
                    ranges: vec![(acked_upto + 1, upto)],
                });
                acked_upto = upto;
            }
            // The agent deletes acked records on its tick (every 250 ms, or sooner
            // when idle); here, after every batch.
            ob.compact(usize::MAX);
        }
        if i % 50_000 == 0 {
            max_disk = max_disk.max(du(&dir));
        }
    }
    ob.flush();
    let elapsed = t0.elapsed().as_secs_f64();
    let disk = du(&dir);
    let out = json!({
        "scenario": "outbox",
        "cycles": cycles,
        "lag": lag,
        "cycles_per_s": cycles as f64 / elapsed,
        "live_records": ob.depth(),
        "live_bytes": ob.live_bytes(),
        "disk_bytes_end": disk,
        "disk_bytes_max": max_disk.max(disk),
        "sled_size_on_disk": ob.disk_usage(),
        "rss_kib": rss_kib(std::process::id() as i32),
    });
    drop(ob);
    let _ = std::fs::remove_dir_all(&dir);
    out
}
