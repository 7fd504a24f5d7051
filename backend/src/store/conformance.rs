//! The store test suite: every function here runs against each [`Store`]
//! implementation (`sqlite_store` and `postgres_store` below), so both keep the same
//! contract. PostgreSQL comes from `IMN_TEST_POSTGRES` (the test script's cluster) or
//! a cluster of the test's own (see [`super::pg_cluster`]).

use super::*;
use imn_modules::results::{EchoResult, ModuleOutcome, ModuleOutput};
use imn_modules::wire::{Batch, ModuleResult, Record, RecordBody, StateChange};

/// The seqs of an agent's results, newest first.
pub async fn result_seqs(s: &dyn Store, agent: &str) -> Vec<u64> {
    let rows = s.results(agent, 10).await.unwrap();
    rows.iter().map(|r| r.seq).collect()
}

pub fn new_request(id: &str, key: Option<&str>) -> NewRequest {
    NewRequest {
        id: id.into(),
        agent_id: "a".into(),
        module: "echo_module".into(),
        params_json: r#"{"message":"m"}"#.into(),
        traceparent: None,
        measurement_id: None,
        created_ms: 1,
        deadline_ms: 1_000,
        timeout_ms: 5_000,
        idempotency_key: key.map(str::to_string),
        dispatch: false,
    }
}

pub fn batch(epoch: u64, seqs: &[u64]) -> Batch {
    Batch {
        epoch,
        records: seqs
            .iter()
            .map(|&seq| Record {
                seq,
                at_ms: 10 + seq as i64,
                body: if seq % 2 == 1 {
                    RecordBody::State(StateChange {
                        request_id: "r1".into(),
                        state: RequestState::Running,
                        detail: None,
                    })
                } else {
                    RecordBody::Result(ModuleResult {
                        request_id: "r1".into(),
                        module: "echo_module".into(),
                        received_ms: 5,
                        started_ms: 6,
                        finished_ms: 7,
                        outcome: ModuleOutcome::Ok(ModuleOutput::Echo(EchoResult {
                            message: "m".into(),
                        })),
                    })
                },
            })
            .collect(),
    }
}

/// Schedules: each change gives the agents a new version; a stopped schedule
/// leaves the agents' sets; scheduled runs are found by their measurement and
/// counted per agent; a version reported from elsewhere moves the store's past it.
pub async fn schedules_version_each_agents_set_and_runs_are_found_by_measurement(s: &dyn Store) {
    let part = |params: &str| AgentSchedule {
        measurement_id: "m1".into(),
        module: "echo_module".into(),
        params_json: params.into(),
        timeout_ms: 1000,
        schedule_json: r#"{"interval_ms":2000,"start_ms":0,"stop_ms":null,"jitter_ms":0}"#.into(),
    };
    let row = MeasurementRow {
        id: "m1".into(),
        module: "echo_module".into(),
        params_json: "{}".into(),
        selection_json: "{}".into(),
        description: None,
        created_ms: 1,
        deadline_ms: i64::MAX,
        schedule_json: Some(part("").schedule_json),
        stopped_ms: None,
    };
    let v = s
        .create_schedule(
            row,
            vec![
                ("a".into(), part(r#"{"x":1}"#)),
                ("b".into(), part(r#"{"x":2}"#)),
            ],
        )
        .await
        .unwrap();
    assert_eq!(v, vec![("a".to_string(), 1), ("b".to_string(), 1)]);
    let (va, set) = s.agent_schedules("a").await.unwrap();
    assert_eq!((va, set.len()), (1, 1));
    assert_eq!(
        set[0].params_json, r#"{"x":1}"#,
        "each agent keeps its own params"
    );
    assert_eq!(s.agent_schedules("c").await.unwrap(), (0, vec![]));

    let run = |seq: u64, slot: i64| Record {
        seq,
        at_ms: slot + 5,
        body: RecordBody::ScheduledResult(imn_modules::wire::ScheduledRun {
            measurement_id: "m1".into(),
            scheduled_ms: slot,
            result: ModuleResult {
                request_id: imn_modules::wire::ScheduledRun::run_id("m1", slot),
                module: "echo_module".into(),
                received_ms: slot,
                started_ms: slot + 1,
                finished_ms: slot + 2,
                outcome: ModuleOutcome::Ok(ModuleOutput::Echo(EchoResult {
                    message: "m".into(),
                })),
            },
        }),
    };
    let b = Batch {
        epoch: 1,
        records: vec![run(1, 2000), run(2, 4000)],
    };
    s.store_batch("a", prepare(&b), 10).await.unwrap();
    let page = s
        .results_page(ResultFilter {
            measurement: Some("m1".into()),
            after: 0,
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.len(), 2);
    assert_eq!(page[0].2.as_deref(), Some("m1"));
    assert_eq!(page[1].1.scheduled_ms, Some(4000));
    assert_eq!(page[1].1.request_id, "m1@4000");
    let progress = s.schedule_progress("m1").await.unwrap();
    let runs: Vec<(String, u64, Option<i64>)> = progress
        .into_iter()
        .map(|p| (p.agent_id, p.runs, p.last_scheduled_ms))
        .collect();
    assert_eq!(
        runs,
        vec![("a".to_string(), 2, Some(4000)), ("b".to_string(), 0, None)]
    );

    assert_eq!(
        s.stop_schedule("m1", 50).await.unwrap(),
        vec![("a".to_string(), 2), ("b".to_string(), 2)]
    );
    assert!(
        s.stop_schedule("m1", 60).await.unwrap().is_empty(),
        "stopped once"
    );
    assert_eq!(s.agent_schedules("a").await.unwrap(), (2, vec![]));
    assert_eq!(
        s.measurement("m1").await.unwrap().unwrap().stopped_ms,
        Some(50)
    );
    assert_eq!(s.raise_schedule_version("a", 7).await.unwrap(), 8);
    assert_eq!(s.raise_schedule_version("a", 3).await.unwrap(), 8);
    assert_eq!(s.raise_schedule_version("z", 0).await.unwrap(), 1);
}

/// An agent's batch naming another agent's request is stored as its own record
/// and moves nothing; the request's own agent still can.
pub async fn an_agent_cannot_move_another_agents_request(s: &dyn Store) {
    s.create_request(new_request("r1", None)).await.unwrap();
    let out = s
        .store_batch("intruder", prepare(&batch(7, &[1, 2])), 100)
        .await
        .unwrap();
    assert_eq!(out.stored, 2);
    assert!(out.finished.is_empty());
    let r = s.request("r1").await.unwrap().unwrap();
    assert_eq!(r.state, RequestState::Pending);
    assert_eq!(s.transitions("r1").await.unwrap().len(), 1);
    assert!(s.result("a", "r1").await.unwrap().is_none());
    let out = s
        .store_batch("a", prepare(&batch(7, &[2])), 101)
        .await
        .unwrap();
    assert_eq!(out.finished, vec!["r1".to_string()]);
    assert_eq!(
        s.request("r1").await.unwrap().unwrap().state,
        RequestState::Succeeded
    );
}

pub async fn batches_are_stored_once_per_record_id(s: &dyn Store) {
    s.create_request(new_request("r1", None)).await.unwrap();
    let first = s
        .store_batch("a", prepare(&batch(7, &[1, 2])), 100)
        .await
        .unwrap();
    assert_eq!((first.stored, first.duplicates), (2, 0));
    assert_eq!(first.finished, vec!["r1".to_string()]);
    // The same batch again, and an overlapping one: only seq 3 is new.
    let again = s
        .store_batch("a", prepare(&batch(7, &[1, 2, 3])), 101)
        .await;
    let again = again.unwrap();
    assert_eq!((again.stored, again.duplicates), (1, 2));
    assert!(
        again.finished.is_empty(),
        "a finished request does not finish twice"
    );
    // Another epoch is another set of ids.
    assert_eq!(
        s.store_batch("a", prepare(&batch(8, &[1])), 102)
            .await
            .unwrap()
            .stored,
        1
    );
    assert_eq!(s.record_count().await.unwrap(), 4);
    assert_eq!(s.agent_record_count("a").await.unwrap(), 4);
    assert_eq!(s.agent_record_count("b").await.unwrap(), 0);
    assert_eq!(s.results("a", 10).await.unwrap().len(), 1);
    let r = s.result("a", "r1").await.unwrap().unwrap();
    assert_eq!((r.state, r.epoch, r.seq), (RequestState::Succeeded, 7, 2));
    assert_eq!(r.result["message"], "m");
}

pub async fn states_only_move_forward(s: &dyn Store) {
    s.create_request(new_request("r1", None)).await.unwrap();
    assert!(s
        .transition("r1", RequestState::Running, 2, "agent", None)
        .await
        .unwrap());
    assert!(!s
        .transition("r1", RequestState::Received, 3, "agent", None)
        .await
        .unwrap());
    assert!(s
        .transition("r1", RequestState::Failed, 4, "agent", Some("boom"))
        .await
        .unwrap());
    assert!(!s
        .transition("r1", RequestState::Expired, 5, "backend", None)
        .await
        .unwrap());
    assert_eq!(
        s.request("r1").await.unwrap().unwrap().state,
        RequestState::Failed
    );
    // Every observation is kept in the history, even those that changed nothing.
    assert_eq!(s.transitions("r1").await.unwrap().len(), 5);
    assert!(
        s.overdue(10_000).await.unwrap().is_empty(),
        "terminal requests never expire"
    );
}

pub async fn idempotency_key_returns_the_first_request(s: &dyn Store) {
    assert!(matches!(
        s.create_request(new_request("r1", Some("k")))
            .await
            .unwrap(),
        Created::New(_)
    ));
    match s
        .create_request(new_request("r2", Some("k")))
        .await
        .unwrap()
    {
        Created::Existing(r) => assert_eq!(r.id, "r1"),
        Created::New(_) => panic!("same key made a second request"),
    }
    assert!(s.request("r2").await.unwrap().is_none());
    assert_eq!(s.undelivered("a").await.unwrap().len(), 1);
    assert_eq!(s.overdue(2_000).await.unwrap().len(), 1);
}

pub async fn duplicates_are_dropped_across_groups_and_within_one(s: &dyn Store) {
    let b1 = prepare(&batch(3, &[2, 4, 6]));
    let b2 = prepare(&batch(3, &[4, 6, 8]));
    let b3 = prepare(&batch(9, &[4]));
    let out = s
        .store_batches(
            vec![("a".into(), b1.clone()), ("a".into(), b2), ("b".into(), b3)],
            100,
        )
        .await
        .unwrap();
    let got: Vec<(u64, u64)> = out.iter().map(|o| (o.stored, o.duplicates)).collect();
    assert_eq!(got, vec![(3, 0), (1, 2), (1, 0)]);
    let again = s.store_batches(vec![("a".into(), b1)], 101).await.unwrap();
    assert_eq!((again[0].stored, again[0].duplicates), (0, 3));
    assert_eq!(s.agent_record_count("a").await.unwrap(), 4);
    assert_eq!(s.agent_record_count("b").await.unwrap(), 1);
    // Newest first, by arrival.
    assert_eq!(result_seqs(s, "a").await, vec![8, 6, 4, 2]);
}

fn result_record(seq: u64, at_ms: i64, request: &str, module: &str) -> Record {
    Record {
        seq,
        at_ms,
        body: RecordBody::Result(ModuleResult {
            request_id: request.into(),
            module: module.into(),
            received_ms: at_ms - 3,
            started_ms: at_ms - 2,
            finished_ms: at_ms - 1,
            outcome: ModuleOutcome::Ok(ModuleOutput::Echo(EchoResult {
                message: format!("{request}#{seq}"),
            })),
        }),
    }
}

/// Pages of results: in arrival order, resumed after a position, filtered by agent,
/// module, measurement and agent time; events and the latest position beside them.
pub async fn results_pages_resume_and_filter(s: &dyn Store) {
    assert_eq!(s.latest_position().await.unwrap(), 0);
    let mut req = new_request("q1", None);
    req.measurement_id = Some("m9".into());
    s.create_request(req).await.unwrap();
    let a = Batch {
        epoch: 1,
        records: (1..=6)
            .map(|i| result_record(i, 1_000 * i as i64, &format!("x{i}"), "echo_module"))
            .chain([result_record(7, 7_000, "q1", "ping")])
            .chain([Record {
                seq: 8,
                at_ms: 8_000,
                body: RecordBody::Event(imn_modules::wire::AgentEvent {
                    kind: "boot".into(),
                    message: "hello".into(),
                }),
            }])
            .collect(),
    };
    let b = Batch {
        epoch: 4,
        records: vec![result_record(1, 3_500, "y1", "echo_module")],
    };
    s.store_batches(
        vec![("a".into(), prepare(&a)), ("b".into(), prepare(&b))],
        50,
    )
    .await
    .unwrap();
    let page = |f: ResultFilter| async move { s.results_page(f).await.unwrap() };
    let all = page(ResultFilter {
        limit: 100,
        ..Default::default()
    })
    .await;
    assert_eq!(
        all.len(),
        8,
        "7 results of a, 1 of b; events are not results"
    );
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "positions rise");
    let ids: Vec<&str> = all.iter().map(|r| r.1.request_id.as_str()).collect();
    assert_eq!(ids, ["x1", "x2", "x3", "x4", "x5", "x6", "q1", "y1"]);
    // Resume after the third: the rest, none twice.
    let rest = page(ResultFilter {
        after: all[2].0,
        limit: 3,
        ..Default::default()
    })
    .await;
    let ids: Vec<&str> = rest.iter().map(|r| r.1.request_id.as_str()).collect();
    assert_eq!(ids, ["x4", "x5", "x6"]);
    let only_b = page(ResultFilter {
        agent: Some("b".into()),
        limit: 10,
        ..Default::default()
    })
    .await;
    assert_eq!((only_b.len(), only_b[0].1.epoch), (1, 4));
    let ping = page(ResultFilter {
        module: Some("ping".into()),
        limit: 10,
        ..Default::default()
    })
    .await;
    assert_eq!(ping.len(), 1);
    assert_eq!(
        ping[0].2.as_deref(),
        Some("m9"),
        "the request's measurement"
    );
    let by_measurement = page(ResultFilter {
        measurement: Some("m9".into()),
        limit: 10,
        ..Default::default()
    })
    .await;
    assert_eq!(by_measurement.len(), 1);
    let window = page(ResultFilter {
        since_ms: Some(2_000),
        until_ms: Some(4_000),
        limit: 10,
        ..Default::default()
    })
    .await;
    let ids: Vec<&str> = window.iter().map(|r| r.1.request_id.as_str()).collect();
    assert_eq!(ids, ["x2", "x3", "y1"], "agent time in [2000, 4000)");
    let r = &all[0].1;
    assert_eq!(r.result["message"], "x1#1");
    assert_eq!(
        (r.received_ms, r.started_ms, r.finished_ms),
        (997, 998, 999)
    );
    assert_eq!(r.stored_ms, 50);
    assert_eq!(s.latest_position().await.unwrap(), {
        // The event came after a's results, before b's.
        all.last().unwrap().0.max(all[6].0 + 1)
    });
    assert_eq!(
        s.events("a", 5).await.unwrap(),
        vec![(8_000, "boot".to_string(), "hello".to_string())]
    );
    assert_eq!(s.record_count().await.unwrap(), 9);
    let newest: Vec<u64> = s
        .results("a", 2)
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(newest, vec![7, 6]);
}

/// Agents, sessions, credentials and one-off measurements.
pub async fn agents_sessions_credentials_and_measurements(s: &dyn Store) {
    let hello = Hello {
        agent_id: "a".into(),
        version: "0.1".into(),
        arch: "x86_64".into(),
        modules: vec![],
        tags: vec![],
        location: None,
        schedule_version: 0,
        outbox_epoch: 1,
        outbox_depth: 0,
        dropped: 0,
        heartbeat_interval_ms: 10_000,
        sent_at_ms: 0,
        features: vec![],
        limits: Default::default(),
    };
    s.upsert_agent("a", &hello, 10).await.unwrap();
    s.upsert_agent("a", &hello, 20).await.unwrap();
    let agents = s.agents().await.unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!((agents[0].first_seen_ms, agents[0].last_hello_ms), (10, 20));

    assert_eq!(s.first_connected("a").await.unwrap(), None);
    s.session_open("a", 100, 100).await.unwrap();
    // A second open closes the first where the agent was last seen.
    s.session_open("a", 300, 250).await.unwrap();
    s.session_close("a", 400).await.unwrap();
    s.session_close("a", 500).await.unwrap();
    assert_eq!(
        s.sessions("a", 0).await.unwrap(),
        vec![(100, Some(250)), (300, Some(400))]
    );
    assert_eq!(s.sessions("a", 260).await.unwrap(), vec![(300, Some(400))]);
    assert_eq!(s.first_connected("a").await.unwrap(), Some(100));

    let mut cred = CredentialRow {
        kind: "api".into(),
        id: "t1".into(),
        secret_hash: "h1".into(),
        message_key: None,
        scopes: vec!["read".into(), "measure".into()],
        tags: vec![],
        rate_per_min: Some(90.5),
        created_ms: 1,
        revoked_ms: None,
    };
    s.put_credential(cred.clone()).await.unwrap();
    cred.revoked_ms = Some(9);
    s.put_credential(cred.clone()).await.unwrap();
    assert_eq!(s.credentials().await.unwrap(), vec![cred]);

    let m = MeasurementRow {
        id: "m1".into(),
        module: "echo_module".into(),
        params_json: "{}".into(),
        selection_json: r#"{"agents":["a","b"]}"#.into(),
        description: Some("two".into()),
        created_ms: 5,
        deadline_ms: 60_000,
        schedule_json: None,
        stopped_ms: None,
    };
    s.create_measurement(m).await.unwrap();
    for (id, agent) in [("ra", "a"), ("rb", "b")] {
        let mut r = new_request(id, None);
        r.agent_id = agent.into();
        r.measurement_id = Some("m1".into());
        r.dispatch = true;
        s.create_request(r).await.unwrap();
    }
    assert_eq!(
        s.request("ra").await.unwrap().unwrap().state,
        RequestState::Dispatched
    );
    let done = Batch {
        epoch: 1,
        records: vec![result_record(1, 40, "ra", "echo_module")],
    };
    let out = s.store_batch("a", prepare(&done), 41).await.unwrap();
    assert_eq!(out.finished, vec!["ra".to_string()]);
    let reqs = s.measurement_requests("m1").await.unwrap();
    let got: Vec<(&str, RequestState, bool)> = reqs
        .iter()
        .map(|(r, res)| (r.id.as_str(), r.state, res.is_some()))
        .collect();
    assert_eq!(
        got,
        [
            ("ra", RequestState::Succeeded, true),
            ("rb", RequestState::Dispatched, false)
        ]
    );
    let (req, res) = s.request_and_result("ra").await.unwrap().unwrap();
    assert_eq!((req.id.as_str(), res.unwrap().seq), ("ra", 1));
    assert_eq!(
        s.measurement("m1")
            .await
            .unwrap()
            .unwrap()
            .description
            .as_deref(),
        Some("two")
    );
    assert_eq!(s.open_requests("b").await.unwrap(), 1);
    assert_eq!(s.open_requests("a").await.unwrap(), 0);
    let mut counts = s.request_state_counts().await.unwrap();
    counts.sort_by_key(|(st, _)| st.rank());
    assert_eq!(
        counts,
        vec![(RequestState::Dispatched, 1), (RequestState::Succeeded, 1)]
    );
    let states: Vec<RequestState> = s
        .transitions("ra")
        .await
        .unwrap()
        .iter()
        .map(|t| t.state)
        .collect();
    assert_eq!(
        states,
        [
            RequestState::Pending,
            RequestState::Dispatched,
            RequestState::Succeeded
        ]
    );
}

/// Runs each suite function against a fresh store of each kind.
macro_rules! for_each_store {
    ($($name:ident),* $(,)?) => {
        mod sqlite_store {
            $(
                #[tokio::test]
                async fn $name() {
                    let dir = std::env::temp_dir().join(format!(
                        "imn-store-{}-{}",
                        std::process::id(),
                        rand::random::<u32>()
                    ));
                    std::fs::create_dir_all(&dir).unwrap();
                    let s = crate::store::SqliteStore::open(&dir.join("s.sqlite")).unwrap();
                    super::$name(&s).await;
                    drop(s);
                    let _ = std::fs::remove_dir_all(&dir);
                }
            )*
        }
        mod postgres_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (_cluster, url) = crate::store::pg_cluster::fresh_database()
                        .await
                        .expect("a PostgreSQL database for the store suite");
                    let s = crate::store::PostgresStore::connect(&url).await.unwrap();
                    super::$name(&s).await;
                }
            )*
        }
    };
}

for_each_store!(
    schedules_version_each_agents_set_and_runs_are_found_by_measurement,
    an_agent_cannot_move_another_agents_request,
    batches_are_stored_once_per_record_id,
    states_only_move_forward,
    idempotency_key_returns_the_first_request,
    duplicates_are_dropped_across_groups_and_within_one,
    results_pages_resume_and_filter,
    agents_sessions_credentials_and_measurements,
);

/// PostgreSQL only: two stores (two backends) write at once while a reader pages by
/// position. Positions become visible in order, so the reader, which never goes back,
/// sees every result exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_writers_on_two_backends_never_make_a_reader_skip() {
    let (_cluster, url) = crate::store::pg_cluster::fresh_database().await.unwrap();
    let a = crate::store::PostgresStore::connect(&url).await.unwrap();
    let b = crate::store::PostgresStore::connect(&url).await.unwrap();
    const BATCHES: u64 = 40;
    const PER: u64 = 25;
    // This month: its partition exists from `connect`.
    let now = imn_modules::now_ms();
    let writer = |s: crate::store::PostgresStore, agent: &'static str| {
        tokio::spawn(async move {
            let now = now;
            for i in 0..BATCHES {
                let batch = Batch {
                    epoch: 1,
                    records: (0..PER)
                        .map(|k| {
                            let seq = i * PER + k + 1;
                            result_record(
                                seq,
                                now + seq as i64,
                                &format!("{agent}{seq}"),
                                "echo_module",
                            )
                        })
                        .collect(),
                };
                s.store_batch(agent, prepare(&batch), 1).await.unwrap();
            }
        })
    };
    let wa = writer(a.clone(), "wa");
    let wb = writer(b.clone(), "wb");
    let mut after = 0;
    let mut seen = std::collections::HashSet::new();
    let mut pages = 0;
    loop {
        let done = wa.is_finished() && wb.is_finished();
        let page = a
            .results_page(ResultFilter {
                after,
                limit: 37,
                ..Default::default()
            })
            .await
            .unwrap();
        pages += 1;
        for (pos, r, _) in &page {
            assert!(*pos > after);
            after = *pos;
            assert!(seen.insert(r.request_id.clone()), "{} twice", r.request_id);
        }
        if page.is_empty() && done {
            break;
        }
    }
    assert_eq!(
        seen.len() as u64,
        2 * BATCHES * PER,
        "the reader skipped results"
    );
    assert!(pages > 2);
    assert_eq!(a.record_count().await.unwrap(), 2 * BATCHES * PER);
}

/// PostgreSQL only: a month's partition is made on first use, and agent times outside
/// 2000-2100 (a device that booted without a clock) land in the default partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_partitions_by_month_of_agent_time() {
    let (_cluster, url) = crate::store::pg_cluster::fresh_database().await.unwrap();
    let s = crate::store::PostgresStore::connect(&url).await.unwrap();
    let batch = Batch {
        epoch: 1,
        records: vec![
            result_record(1, 1_736_000_000_000, "jan2025", "echo_module"), // 2025-01-04
            result_record(2, 5_000, "clockless", "echo_module"),           // 1970
        ],
    };
    let out = s.store_batch("p", prepare(&batch), 1).await.unwrap();
    assert_eq!(out.stored, 2);
    let names = s.partition_names().await.unwrap();
    assert!(names.contains(&"records_y2025m01".to_string()), "{names:?}");
    assert!(names.contains(&"records_default".to_string()), "{names:?}");
    // Both are found by the API's queries, and a resend of either is a duplicate.
    assert_eq!(result_seqs(&s, "p").await, vec![2, 1]);
    let again = s.store_batch("p", prepare(&batch), 2).await.unwrap();
    assert_eq!((again.stored, again.duplicates), (0, 2));
    let (records, db) = s.sizes().await.unwrap();
    assert!(records > 0 && db > records, "{records} {db}");
}

/// PostgreSQL only: `--store-ca` (or `sslmode=require`) connects over TLS and checks
/// the server's certificate; another CA's certificate is refused, and so is a server
/// without TLS when TLS was asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_checks_the_servers_certificate() {
    let dir = std::env::temp_dir().join(format!("imn-pgtls-{:08x}", rand::random::<u32>()));
    let req = |d: &std::path::Path| crate::certs::CertsRequest {
        dir: d.to_path_buf(),
        hosts: vec!["127.0.0.1".into()],
        clients: vec![],
        days: 2,
    };
    crate::certs::generate(&req(&dir.join("a"))).unwrap();
    crate::certs::generate(&req(&dir.join("b"))).unwrap();
    let (cert, key) = (dir.join("a/server.pem"), dir.join("a/server.key"));
    let cluster = tokio::task::spawn_blocking(move || {
        crate::store::pg_cluster::TempCluster::start_with(false, Some((&cert, &key)))
    })
    .await
    .unwrap()
    .unwrap();
    let url = cluster.url("postgres");
    let s = crate::store::PostgresStore::connect_tls(&url, Some(&dir.join("a/ca.pem")))
        .await
        .unwrap();
    assert!(s.uses_tls().await.unwrap(), "--store-ca connects over TLS");
    assert!(!crate::store::PostgresStore::connect(&url)
        .await
        .unwrap()
        .uses_tls()
        .await
        .unwrap());
    let e = crate::store::PostgresStore::connect_tls(&url, Some(&dir.join("b/ca.pem")))
        .await
        .expect_err("another CA's certificate is refused")
        .to_string();
    assert!(
        e.contains("certificate") || e.contains("Certificate"),
        "{e}"
    );
    // A server without TLS, when TLS is asked for.
    let (_plain, plain_url) = crate::store::pg_cluster::fresh_database().await.unwrap();
    let e = crate::store::PostgresStore::connect_tls(
        &format!("{plain_url}?sslmode=require"),
        Some(&dir.join("a/ca.pem")),
    )
    .await
    .expect_err("no TLS, no connection");
    eprintln!("{e}");
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}
