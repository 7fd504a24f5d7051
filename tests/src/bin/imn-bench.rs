//! `imn-bench`: IMN's benchmark harness. Each scenario starts what it needs (real
//! binaries on free loopback ports), prints a human summary, and with `--json` one
//! JSON object on the last line.

use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use imn_tests::{percentile, Api, Up};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(name = "imn-bench", about = "IMN benchmark harness")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// Print one JSON object on the last line.
    #[arg(long, global = true)]
    json: bool,
    /// A tiny run of the scenario, so CI keeps the harness working.
    #[arg(long, global = true)]
    quick: bool,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// REST round trips of `POST /agent/{id}/echo_module?wait=…` under `imn up`.
    Api {
        /// Requests to send.
        #[arg(long, default_value_t = 1000)]
        requests: usize,
        /// Requests per second; 0 sends them back to back, each after the last answer.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Concurrent clients for the `max_rps` phase.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Seconds of the `max_rps` phase.
        #[arg(long, default_value_t = 10.0)]
        max_seconds: f64,
        /// Use a running backend instead of starting `imn up`.
        #[arg(long)]
        url: Option<String>,
        /// With `--url`: a file holding the API token to send (a backend with
        /// `--auth`; a measure token's requests pass its budget check).
        #[arg(long)]
        token_file: Option<std::path::PathBuf>,
    },
    /// The cost of tracing: echo round trips per second under `imn up` without OTLP,
    /// exporting to a real OTLP receiver, and with that receiver gone, in one run.
    Otel {
        /// Concurrent clients.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Seconds of each phase.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// The ping engine: a paced loopback sweep against fping, RTT accuracy, and a
    /// 20 ms ICMP responder in a network namespace of its own (needs root).
    Ping {
        /// Loopback addresses (127.1.x.y) to sweep, one probe each.
        #[arg(long, default_value_t = 10_000)]
        targets: usize,
        /// Probes per second of the sweep.
        #[arg(long, default_value_t = 100_000.0)]
        rate: f64,
    },
    /// WebAssembly modules: a built-in ping of TARGETS loopback addresses against the
    /// same measurement as a WebAssembly module through the host's ICMP call, on one
    /// agent in one run (time and agent CPU per run), and the agent's RSS with modules.
    Wasm {
        #[arg(long, default_value_t = 100)]
        targets: usize,
        /// Runs of each, alternated.
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
    /// An agent with a backlog made while partitioned reconnects under `imn up`:
    /// drain rate, lost, duplicates, peak agent RSS.
    Drain {
        /// Results waiting in the agent's outbox.
        #[arg(long, default_value_t = 100_000)]
        buffered: usize,
    },
    /// The agent as firmware: binary size, start to first heartbeat, RSS idle and with
    /// 10,000 results buffered, bytes written per heartbeat and per result.
    Firmware {
        /// Agent binary (default: cross/build.sh's static x86_64 musl build, full profile).
        #[arg(long)]
        agent: Option<std::path::PathBuf>,
        /// Another agent binary (an older build) to measure in the same run, in the
        /// order this, baseline, baseline, this; prints both and their ratios.
        #[arg(long)]
        baseline: Option<std::path::PathBuf>,
    },
    /// Simulated agents send results through broker, bridge, bus and backend to the
    /// store: results/s stored and acked, lost, duplicates, and raw broker throughput
    /// of the same messages for comparison.
    Ingest {
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        /// Results in all.
        #[arg(long, default_value_t = 200_000)]
        results: u64,
        /// Split processes over NATS JetStream instead of `imn up`.
        #[arg(long)]
        nats: bool,
        /// Results per MQTT message.
        #[arg(long, default_value_t = 1)]
        per_message: usize,
        /// Run twice, without and with auth (enrolled agents, signed messages), and
        /// give the ratio.
        #[arg(long)]
        auth: bool,
        /// Run twice over NATS: one backend on the embedded store, then two backends
        /// sharing PostgreSQL (a cluster made with initdb for the run, fsync on);
        /// results/s and stored bytes per result of each, and their ratio.
        #[arg(long, conflicts_with = "auth")]
        postgres: bool,
        /// With --postgres: the numbers of backends to run, one after the other, each
        /// writing in parallel into one PostgreSQL while a client pages the results
        /// (instead of the embedded-against-two-backends comparison).
        #[arg(long, value_delimiter = ',', requires = "postgres")]
        backends: Vec<usize>,
        /// A directory with an earlier build's `imn`: run the embedded ingest against
        /// it and against this build (this, baseline, baseline, this), and give the
        /// ratio (new code against old).
        #[arg(long, conflicts_with_all = ["auth", "postgres", "nats"])]
        baseline: Option<std::path::PathBuf>,
    },
    /// Simulated agents connect and heartbeat: connect time, alive count, heartbeat
    /// lag, memory.
    Fleet {
        #[arg(long, default_value_t = 20_000)]
        agents: usize,
        /// Heartbeat interval, seconds.
        #[arg(long, default_value_t = 30.0)]
        hb_interval: f64,
        /// Seconds to hold the fleet connected before measuring.
        #[arg(long, default_value_t = 65.0)]
        hold: f64,
        /// Bridges; more than one splits the system over NATS (a broker process holds
        /// at most its descriptor limit in connections).
        #[arg(long, default_value_t = 1)]
        bridges: usize,
    },
    /// (Used by `fleet`.) Runs simulated agents until stdin closes.
    #[command(hide = true)]
    SimWorker {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        agents: usize,
        #[arg(long, default_value_t = 0)]
        offset: usize,
        #[arg(long, default_value_t = 30.0)]
        hb_interval: f64,
    },
    /// Insert-then-ack cycles against the agent's outbox: size on disk beside the live
    /// data size.
    Outbox {
        #[arg(long, default_value_t = 1_000_000)]
        cycles: usize,
        /// Records unacked at any moment.
        #[arg(long, default_value_t = 1_000)]
        lag: usize,
    },
}

async fn api_scenario(
    requests: usize,
    rate: f64,
    url: Option<String>,
    token: Option<String>,
    concurrency: usize,
    max_seconds: f64,
) -> serde_json::Value {
    let (_up, api) = match url {
        Some(u) => {
            let port = u
                .rsplit(':')
                .next()
                .and_then(|p| p.trim_end_matches('/').parse().ok());
            let api = Api::new(port.expect("--url http://127.0.0.1:PORT"));
            (None, token.map_or(api.clone(), |t| api.with_token(&t)))
        }
        None => {
            let up = Up::start(1, &[]).await;
            let api = up.api.clone();
            (Some(up), api)
        }
    };
    api.wait_alive(&["agent-1"], Duration::from_secs(30)).await;
    // Warm up connections and caches.
    for _ in 0..20 {
        api.post(
            "/agent/agent-1/echo_module?wait=10",
            r#"{"message":"warm"}"#,
            &[],
        )
        .await;
    }
    let mut rtts = Vec::with_capacity(requests);
    let mut failures = 0usize;
    let start = Instant::now();
    for i in 0..requests {
        if rate > 0.0 {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let t0 = Instant::now();
        let r = api
            .post(
                "/agent/agent-1/echo_module?wait=10",
                r#"{"message":"bench"}"#,
                &[],
            )
            .await;
        let dt = t0.elapsed().as_secs_f64() * 1000.0;
        if r.status == 200 && r.body["state"] == "succeeded" {
            rtts.push(dt);
        } else {
            failures += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    rtts.sort_by(f64::total_cmp);
    let (max_rps, max_failures) = max_rps(&api, concurrency, max_seconds).await;
    json!({
        "scenario": "api",
        "requests": requests,
        "succeeded": rtts.len(),
        "failures": failures,
        "rate_requested": rate,
        "achieved_rps": requests as f64 / elapsed,
        "rtt_p50_ms": percentile(&rtts, 50.0),
        "rtt_p99_ms": percentile(&rtts, 99.0),
        "rtt_max_ms": rtts.last().copied().unwrap_or(f64::NAN),
        "max_rps": max_rps,
        "max_rps_concurrency": concurrency,
        "max_rps_failures": max_failures,
    })
}

/// Echo round trips per second without OTLP, with export to a live receiver, and with
/// the receiver stopped (each its own `imn up`, one agent).
async fn otel_scenario(concurrency: usize, seconds: f64) -> serde_json::Value {
    async fn phase(extra: &[&str], concurrency: usize, seconds: f64) -> (Up, f64, u64) {
        let env = [
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("OTEL_BLRP_SCHEDULE_DELAY", "200"),
        ];
        let up = Up::start_env(1, extra, &env).await;
        up.api
            .wait_alive(&["agent-1"], Duration::from_secs(30))
            .await;
        // Warm up connections and caches.
        max_rps(&up.api, concurrency, (seconds / 5.0).min(1.0)).await;
        let (rps, failed) = max_rps(&up.api, concurrency, seconds).await;
        (up, rps, failed)
    }
    let (off, rps_off, failed_off) = phase(&[], concurrency, seconds).await;
    drop(off);
    let otlp = imn_tests::otlp::OtlpReceiver::start().expect("OTLP receiver");
    let endpoint = otlp.endpoint();
    let (up, rps_on, failed_on) =
        phase(&["--otlp-endpoint", &endpoint], concurrency, seconds).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = otlp.spans().len();
    let logs = otlp.logs().len();
    otlp.stop();
    let (rps_dead, failed_dead) = max_rps(&up.api, concurrency, seconds).await;
    println!(
        "echo round trips/s, {concurrency} clients, {seconds} s each: no OTLP {rps_off:.0}, exporting {rps_on:.0} ({:.2}x), collector dead {rps_dead:.0} ({:.2}x); {spans} spans and {logs} logs received",
        rps_on / rps_off,
        rps_dead / rps_off
    );
    json!({
        "scenario": "otel",
        "concurrency": concurrency,
        "seconds": seconds,
        "rps_no_otlp": rps_off,
        "rps_exporting": rps_on,
        "rps_collector_dead": rps_dead,
        "ratio_exporting": rps_on / rps_off,
        "ratio_collector_dead": rps_dead / rps_off,
        "spans_received": spans,
        "logs_received": logs,
        "failures": failed_off + failed_on + failed_dead,
    })
}

/// Completed echo round trips per second with `concurrency` clients sending back to
/// back for `seconds`.
async fn max_rps(api: &Api, concurrency: usize, seconds: f64) -> (f64, u64) {
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            while Instant::now() < stop {
                let r = api
                    .post(
                        "/agent/agent-1/echo_module?wait=10",
                        r#"{"message":"max"}"#,
                        &[],
                    )
                    .await;
                if r.status == 200 && r.body["state"] == "succeeded" {
                    ok += 1;
                } else {
                    failed += 1;
                }
            }
            (ok, failed)
        }));
    }
    let (mut ok, mut failed) = (0, 0);
    for t in tasks {
        let (o, f) = t.await.unwrap_or((0, 0));
        ok += o;
        failed += f;
    }
    (ok as f64 / start.elapsed().as_secs_f64(), failed)
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let out = match cli.scenario {
        Scenario::Api {
            requests,
            rate,
            url,
            token_file,
            concurrency,
            max_seconds,
        } => {
            let (n, secs) = if cli.quick {
                (requests.min(50), max_seconds.min(1.0))
            } else {
                (requests, max_seconds)
            };
            let token = token_file.map(|f| {
                std::fs::read_to_string(&f)
                    .unwrap_or_else(|e| panic!("--token-file {}: {e}", f.display()))
            });
            api_scenario(n, rate, url, token, concurrency.max(1), secs).await
        }
        Scenario::Otel {
            concurrency,
            seconds,
        } => {
            let secs = if cli.quick { seconds.min(1.0) } else { seconds };
            otel_scenario(concurrency.max(1), secs.max(0.1)).await
        }
        Scenario::Ping { targets, rate } => {
            let opts = if cli.quick {
                imn_tests::bench_ping::Options::quick()
            } else {
                imn_tests::bench_ping::Options::full(targets.clamp(1, 65_536), rate)
            };
            imn_tests::bench_ping::run(opts).await
        }
        Scenario::Firmware { agent, baseline } => {
            let agent = agent.unwrap_or_else(imn_tests::bench_firmware::default_agent);
            match baseline {
                Some(old) => imn_tests::bench_firmware::against(&agent, &old, cli.quick).await,
                None => imn_tests::bench_firmware::firmware(&agent, cli.quick).await,
            }
        }
        Scenario::Wasm { targets, rounds } => {
            let (t, r) = if cli.quick {
                (targets.min(5), rounds.min(2))
            } else {
                (targets.clamp(1, 1000), rounds.max(1))
            };
            imn_tests::bench_wasm::run_bench(t, r).await
        }
        Scenario::Drain { buffered } => {
            imn_tests::bench_drain::drain(if cli.quick { 2_000 } else { buffered }).await
        }
        Scenario::Ingest {
            agents,
            results,
            nats,
            per_message,
            auth,
            postgres,
            backends,
            baseline,
        } => {
            let (a, r) = if cli.quick {
                (agents.min(20), results.min(2_000))
            } else {
                (agents, results)
            };
            if let Some(dir) = baseline {
                imn_tests::bench_ingest::ingest_baseline(
                    a.max(1),
                    r.max(1),
                    per_message.max(1),
                    &dir,
                )
                .await
            } else if postgres && !backends.is_empty() {
                imn_tests::bench_ingest::ingest_postgres_backends(
                    a.max(1),
                    r.max(1),
                    per_message.max(1),
                    &backends,
                )
                .await
            } else if postgres {
                imn_tests::bench_ingest::ingest_postgres(a.max(1), r.max(1), per_message.max(1))
                    .await
            } else {
                imn_tests::bench_ingest::ingest(a.max(1), r.max(1), nats, per_message.max(1), auth)
                    .await
            }
        }
        Scenario::Fleet {
            agents,
            hb_interval,
            hold,
            bridges,
        } => {
            let (a, hb, h) = if cli.quick {
                (agents.min(50), 1.0, 3.0)
            } else {
                (agents, hb_interval, hold)
            };
            imn_tests::bench_ingest::fleet(
                a.max(1),
                Duration::from_secs_f64(hb.max(0.1)),
                Duration::from_secs_f64(h.max(0.0)),
                bridges.max(1),
            )
            .await
        }
        Scenario::SimWorker {
            port,
            agents,
            offset,
            hb_interval,
        } => {
            imn_tests::bench_ingest::sim_worker(
                port,
                agents,
                offset,
                Duration::from_secs_f64(hb_interval.max(0.1)),
            )
            .await;
            return;
        }
        Scenario::Outbox { cycles, lag } => {
            let (c, l) = if cli.quick {
                (20_000, 100)
            } else {
                (cycles, lag)
            };
            tokio::task::spawn_blocking(move || imn_tests::bench_drain::outbox_cycles(c, l))
                .await
                .expect("outbox scenario")
        }
    };
    if let Some(obj) = out.as_object() {
        for (k, v) in obj {
            println!("{k:>16}: {v}");
        }
    }
    if cli.json {
        println!("{out}");
    }
}
