//! The store test suite: every function here runs against each [`Store`]
//! implementation (`sqlite_store` and `postgres_store` below), so both keep the same
//! contract. PostgreSQL is a cluster of the test's own (see [`super::pg_cluster`]).

use super::*;
use async_trait::async_trait;
use imn_proto::results::{EchoResult, ModuleOutcome, ModuleOutput};
use imn_proto::wire::{Batch, ModuleResult, Record, RecordBody, StateChange};

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
        idempotency_hash: None,
        dispatch: false,
        charge: None,
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
                    // One result per run: seq 2 is r1's, each other even seq a
                    // run of its own.
                    RecordBody::Result(ModuleResult {
                        request_id: match seq {
                            2 => "r1".into(),
                            _ => format!("r1.{seq}"),
                        },
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
        owner: None,
        daily_probes: 0,
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
        body: RecordBody::ScheduledResult(imn_proto::wire::ScheduledRun {
            measurement_id: "m1".into(),
            scheduled_ms: slot,
            result: ModuleResult {
                request_id: imn_proto::wire::ScheduledRun::run_id("m1", slot),
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
    // An agent the measurement does not run on names it: its record is stored as its
    // own and counts nowhere in the measurement.
    let intruder = Batch {
        epoch: 9,
        records: vec![run(1, 6000)],
    };
    let out = s
        .store_batch("intruder", prepare(&intruder), 11)
        .await
        .unwrap();
    assert_eq!(out.stored, 1);
    assert_eq!(s.results("intruder", 10).await.unwrap().len(), 1);
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
    // Newest first, from a position back.
    let newest = s.schedule_results_newest("m1", None, 10).await.unwrap();
    let slots: Vec<Option<i64>> = newest.iter().map(|(_, r)| r.scheduled_ms).collect();
    assert_eq!(slots, vec![Some(4000), Some(2000)]);
    assert_eq!(newest[0].0, page[1].0, "the same positions as a page");
    let older = s
        .schedule_results_newest("m1", Some(newest[0].0), 10)
        .await
        .unwrap();
    assert_eq!(older.len(), 1);
    assert_eq!(older[0].1.scheduled_ms, Some(2000));
    assert_eq!(
        s.schedule_results_newest("m1", None, 1)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(s
        .schedule_results_newest("m2", None, 10)
        .await
        .unwrap()
        .is_empty());
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

/// A second result for a run (a scheduled slot, or a one-off request) is dropped as a
/// duplicate whatever its record id: an agent that lost its outbox's progress (a power
/// cut, a new epoch) and ran the slot again, or a hostile one. Within one group and
/// across groups, per agent, and counted apart from resends.
pub async fn one_result_per_slot_and_per_request(s: &dyn Store) {
    let slot = |seq: u64, m: &str, at: i64| Record {
        seq,
        at_ms: at + 5 + seq as i64,
        body: RecordBody::ScheduledResult(imn_proto::wire::ScheduledRun {
            measurement_id: m.into(),
            scheduled_ms: at,
            result: ModuleResult {
                request_id: imn_proto::wire::ScheduledRun::run_id(m, at),
                module: "echo_module".into(),
                received_ms: at,
                started_ms: at + 1,
                finished_ms: at + 2,
                outcome: ModuleOutcome::Ok(ModuleOutput::Echo(EchoResult {
                    message: format!("{m}@{at}#{seq}"),
                })),
            },
        }),
    };
    let first = Batch {
        epoch: 1,
        records: vec![
            slot(1, "m1", 2000),
            slot(2, "m1", 4000),
            result_record(3, 5000, "req-1", "echo_module"),
            // The same slot again within the batch: a rerun with a new seq.
            slot(4, "m1", 4000),
        ],
    };
    let out = s.store_batch("a", prepare(&first), 10).await.unwrap();
    assert_eq!(
        (out.stored, out.duplicates, out.run_duplicates),
        (3, 1, 1),
        "{out:?}"
    );
    // A new epoch (the store was lost), new seqs, the same runs: all duplicates; a new
    // slot and another agent's same slot are stored.
    let again = Batch {
        epoch: 2,
        records: vec![
            slot(1, "m1", 2000),
            result_record(2, 6000, "req-1", "echo_module"),
            slot(3, "m1", 6000),
            slot(4, "m2", 2000),
        ],
    };
    let out = s
        .store_batches(
            vec![("a".into(), prepare(&again)), ("b".into(), prepare(&first))],
            11,
        )
        .await
        .unwrap();
    let got: Vec<(u64, u64, u64)> = out
        .iter()
        .map(|o| (o.stored, o.duplicates, o.run_duplicates))
        .collect();
    assert_eq!(got, vec![(2, 2, 2), (3, 1, 1)]);
    // A plain resend is a duplicate by record id, not a second run.
    let out = s.store_batch("a", prepare(&again), 12).await.unwrap();
    assert_eq!((out.stored, out.duplicates), (0, 4));
    // What is stored: each run once, the first copy.
    let rows = s.results("a", 100).await.unwrap();
    let mut runs: Vec<(String, u64, u64)> = rows
        .iter()
        .map(|r| (r.request_id.clone(), r.epoch, r.seq))
        .collect();
    runs.sort();
    assert_eq!(
        runs,
        vec![
            ("m1@2000".to_string(), 1, 1),
            ("m1@4000".to_string(), 1, 2),
            ("m1@6000".to_string(), 2, 3),
            ("m2@2000".to_string(), 2, 4),
            ("req-1".to_string(), 1, 3),
        ]
    );
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

pub(crate) fn result_record(seq: u64, at_ms: i64, request: &str, module: &str) -> Record {
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
                body: RecordBody::Event(imn_proto::wire::AgentEvent {
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

/// Retention's bookkeeping: runs' duplicate guards, finished requests with their
/// transitions, and closed sessions from before a time go, a batch at a time;
/// unfinished requests, open sessions and anything newer stay.
pub async fn bookkeeping_is_pruned_by_age_and_unfinished_work_stays(s: &dyn Store) {
    s.create_request(new_request("old-done", None))
        .await
        .unwrap();
    assert!(s
        .transition("old-done", RequestState::Succeeded, 50, "agent", None)
        .await
        .unwrap());
    s.create_request(new_request("old-open", None))
        .await
        .unwrap();
    s.create_request(NewRequest {
        created_ms: 5_000,
        ..new_request("new-done", None)
    })
    .await
    .unwrap();
    assert!(s
        .transition("new-done", RequestState::Failed, 5_000, "agent", None)
        .await
        .unwrap());
    // Results of runs at 10 and 6,000 (their duplicate guards).
    let result = |seq: u64, at_ms: i64, request: &str| Record {
        seq,
        at_ms,
        body: RecordBody::Result(ModuleResult {
            request_id: request.into(),
            module: "echo_module".into(),
            received_ms: at_ms,
            started_ms: at_ms,
            finished_ms: at_ms,
            outcome: ModuleOutcome::Ok(ModuleOutput::Echo(EchoResult {
                message: "m".into(),
            })),
        }),
    };
    let b = Batch {
        epoch: 1,
        records: vec![result(1, 10, "old-done"), result(2, 6_000, "new-done")],
    };
    s.store_batch("a", prepare(&b), 6_000).await.unwrap();
    s.session_open("a", 100, 100).await.unwrap();
    s.session_close("a", 400).await.unwrap();
    s.session_open("a", 600, 600).await.unwrap();

    // One request (with all its transitions), guard and session a call: the guard
    // at 10, old-done and its 3 transitions (made, succeeded, its result's), the
    // session closed at 400; then nothing more before 1,000.
    assert_eq!(s.transitions("old-done").await.unwrap().len(), 3);
    let mut calls = Vec::new();
    loop {
        let n = s.prune_bookkeeping(1_000, 1).await.unwrap();
        calls.push(n);
        if n == 0 || calls.len() > 10 {
            break;
        }
    }
    assert_eq!(calls, vec![6, 0], "rows deleted per call");
    assert!(s.request("old-done").await.unwrap().is_none());
    assert!(s.transitions("old-done").await.unwrap().is_empty());
    assert!(s.request("old-open").await.unwrap().is_some());
    assert!(s.request("new-done").await.unwrap().is_some());
    assert!(!s.transitions("new-done").await.unwrap().is_empty());
    assert_eq!(s.sessions("a", 0).await.unwrap(), vec![(600, None)]);
    // The records themselves are retention's other pass: still there.
    assert_eq!(s.agent_record_count("a").await.unwrap(), 2);
    // The newer guard still refuses a second result for its run.
    let again = Batch {
        epoch: 2,
        records: vec![result(1, 6_000, "new-done")],
    };
    let out = s.store_batch("a", prepare(&again), 7_000).await.unwrap();
    assert_eq!(out.run_duplicates, 1);
}

/// Retention deletes raw records by module (or all but some), by the time they were
/// stored, only up to a position (what was rolled up), a bounded batch at a time.
pub async fn records_are_pruned_by_module_age_and_position(s: &dyn Store) {
    let result = |seq: u64, module: &str| Record {
        seq,
        at_ms: 10 + seq as i64,
        body: RecordBody::Result(ModuleResult {
            request_id: format!("r.{seq}"),
            module: module.into(),
            received_ms: 5,
            started_ms: 6,
            finished_ms: 7,
            outcome: ModuleOutcome::Ok(ModuleOutput::Echo(EchoResult {
                message: "m".into(),
            })),
        }),
    };
    let event = |seq: u64| Record {
        seq,
        at_ms: 10 + seq as i64,
        body: RecordBody::Event(imn_proto::wire::AgentEvent {
            kind: "log".into(),
            message: "e".into(),
        }),
    };
    // Stored at 100: two ping, one echo, an event; at 1,000: one of each again.
    let old = Batch {
        epoch: 1,
        records: vec![
            result(1, "ping_module"),
            result(2, "ping_module"),
            result(3, "echo_module"),
            event(4),
        ],
    };
    s.store_batch("a", prepare(&old), 100).await.unwrap();
    let new = Batch {
        epoch: 1,
        records: vec![result(5, "ping_module"), result(6, "echo_module"), event(7)],
    };
    s.store_batch("a", prepare(&new), 1_000).await.unwrap();
    let positions: Vec<i64> = s
        .results_page(ResultFilter {
            after: 0,
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .iter()
        .map(|(p, _, _)| *p)
        .collect();
    assert_eq!(positions.len(), 5);
    let stats = s.store_stats().await.unwrap();
    assert!(stats.bytes > 0);
    assert_eq!(stats.oldest_result_ms, Some(100));
    let rule = |only: Option<&str>, except: &[&str], limit: u32| PruneRecords {
        only: only.map(str::to_string),
        except: except.iter().map(|m| m.to_string()).collect(),
        stored_before_ms: 500,
        after: 0,
        up_to: i64::MAX,
        limit,
    };
    // Only up to a position: nothing past it goes.
    let (n, _) = s
        .prune_records(PruneRecords {
            up_to: positions[0] - 1,
            ..rule(Some("ping_module"), &[], 10)
        })
        .await
        .unwrap();
    assert_eq!(n, 0);
    // ping_module, a batch of one at a time: the oldest first.
    let (n, last) = s
        .prune_records(rule(Some("ping_module"), &[], 1))
        .await
        .unwrap();
    assert_eq!((n, last), (1, positions[0]));
    let (n, _) = s
        .prune_records(PruneRecords {
            after: last,
            ..rule(Some("ping_module"), &[], 10)
        })
        .await
        .unwrap();
    assert_eq!(n, 1);
    // Everything else but ping_module stored before 500: the echo result and the
    // event.
    let (n, _) = s
        .prune_records(rule(None, &["ping_module"], 10))
        .await
        .unwrap();
    assert_eq!(n, 2);
    let left = s
        .results_page(ResultFilter {
            after: 0,
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let modules: Vec<&str> = left.iter().map(|(_, r, _)| r.module.as_str()).collect();
    assert_eq!(modules, vec!["ping_module", "echo_module"]);
    assert_eq!(s.events("a", 10).await.unwrap().len(), 1);
    assert_eq!(s.store_stats().await.unwrap().oldest_result_ms, Some(1_000));
    // Positions only grow, whatever was deleted: everything old goes (the newest
    // record too, where the store can keep its position), and a new record still
    // lands after every position handed out.
    let newest = s.latest_position().await.unwrap();
    s.prune_records(PruneRecords {
        stored_before_ms: i64::MAX,
        ..rule(None, &[], 100)
    })
    .await
    .unwrap();
    let later = Batch {
        epoch: 1,
        records: vec![result(8, "echo_module")],
    };
    s.store_batch("a", prepare(&later), 1_500).await.unwrap();
    let page = s
        .results_page(ResultFilter {
            after: newest,
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.len(), 1, "a new record after the newest position");
    assert!(page[0].0 > newest);
    // A resend of a pruned result is still a duplicate: its run stays claimed. (An
    // event resent after retention took it may be stored again on PostgreSQL, whose
    // record ids live in the records' own index.)
    let before = s
        .results_page(ResultFilter {
            after: 0,
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .len();
    s.store_batch("a", prepare(&old), 2_000).await.unwrap();
    let again = s
        .results_page(ResultFilter {
            after: 0,
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(again.len(), before);
}

/// Rollups merge into existing rows, and the cursor moves only from where it is:
/// a second pass from the same place (another backend) writes nothing.
pub async fn rollups_merge_under_a_cursor_that_moves_once(s: &dyn Store) {
    use crate::rollup::Rollup;
    let body = |rtts: &[f64]| {
        let mut r = Rollup::default();
        r.add(&imn_proto::figures::Figures {
            target: "t".into(),
            sent: rtts.len() as u32,
            received: rtts.len() as u32,
            rtts_ms: rtts.to_vec(),
            ..Default::default()
        });
        serde_json::to_string(&r).unwrap()
    };
    let row = |agent: &str, hour: i64, b: String| RollupRow {
        agent_id: agent.into(),
        module: "ping_module".into(),
        target: "h\0x".into(),
        hour_ms: hour,
        body: b,
    };
    assert_eq!(s.rollup_cursor().await.unwrap(), 0);
    assert!(s
        .merge_rollups(
            0,
            10,
            vec![row("a", 0, body(&[1.0])), row("b", 3_600_000, body(&[5.0]))]
        )
        .await
        .unwrap());
    assert!(
        !s.merge_rollups(0, 20, vec![row("a", 0, body(&[99.0]))])
            .await
            .unwrap(),
        "the cursor is at 10 now"
    );
    assert!(s
        .merge_rollups(10, 20, vec![row("a", 0, body(&[3.0]))])
        .await
        .unwrap());
    assert_eq!(s.rollup_cursor().await.unwrap(), 20);
    let all = s
        .rollups(RollupFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 2);
    let a: Rollup = serde_json::from_str(&all[0].body).unwrap();
    assert_eq!(
        (all[0].agent_id.as_str(), a.results, a.rtt_min, a.rtt_max),
        ("a", 2, Some(1.0), Some(3.0))
    );
    let only_b = s
        .rollups(RollupFilter {
            agent: Some("b".into()),
            module: Some("ping_module".into()),
            since_ms: Some(3_600_000),
            until_ms: Some(7_200_000),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(only_b.len(), 1);
    // Paging: after a row, in (hour, agent, module, target) order, the target with
    // its NUL as stored.
    let mut more = vec![row("c", 0, body(&[1.0])), row("a", 0, body(&[1.0]))];
    more[1].target = "h\0y".into();
    more[1].module = "ping_module".into();
    assert!(s.merge_rollups(20, 30, more).await.unwrap());
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = s
            .rollups(RollupFilter {
                after: after.clone(),
                limit: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        let Some(r) = page.last() else { break };
        seen.push((r.hour_ms, r.agent_id.clone(), r.target.clone()));
        after = Some((
            r.hour_ms,
            r.agent_id.clone(),
            r.module.clone(),
            r.target.clone(),
        ));
    }
    // The same rows, in the same order, as one listing.
    let everything: Vec<(i64, String, String)> = s
        .rollups(RollupFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.hour_ms, r.agent_id, r.target))
        .collect();
    assert_eq!(seen, everything);
    let names: Vec<(i64, &str)> = seen.iter().map(|(h, a, _)| (*h, a.as_str())).collect();
    assert_eq!(names, [(0, "a"), (0, "a"), (0, "c"), (3_600_000, "b")]);
    assert!(seen[0].2 < seen[1].2, "{seen:?}");
    assert_eq!(s.prune_rollups(3_600_000, 10).await.unwrap(), 3);
    assert_eq!(
        s.rollups(RollupFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .len(),
        1
    );
}

/// Heartbeat points: a point stored twice is one row; reads are by time, oldest
/// first and bounded; pruning takes the oldest, a bounded batch at a time.
pub async fn heartbeat_history_is_stored_once_read_by_time_and_pruned_in_batches(s: &dyn Store) {
    let row = |a: &str, at: i64| HeartbeatRow {
        agent_id: a.into(),
        at_ms: at,
        point_json: format!("{{\"at_ms\":{at},\"agent\":\"{a}\"}}"),
    };
    s.put_heartbeats(vec![row("a", 100), row("b", 100), row("a", 200)])
        .await
        .unwrap();
    // Again (a flush retried after a timeout), with a different body: kept as it was.
    let mut again = row("a", 200);
    again.point_json = "{}".into();
    s.put_heartbeats(vec![again, row("a", 300)]).await.unwrap();
    s.put_heartbeats(vec![]).await.unwrap();
    let all = s.heartbeats_since(0, 100).await.unwrap();
    assert_eq!(
        all,
        vec![row("a", 100), row("b", 100), row("a", 200), row("a", 300)]
    );
    assert_eq!(
        s.heartbeats_since(150, 100).await.unwrap(),
        vec![row("a", 200), row("a", 300)]
    );
    assert_eq!(s.heartbeats_since(0, 1).await.unwrap(), vec![row("a", 100)]);
    assert_eq!(s.prune_heartbeats(250, 2).await.unwrap(), 2);
    assert_eq!(s.prune_heartbeats(250, 2).await.unwrap(), 1);
    assert_eq!(s.prune_heartbeats(250, 2).await.unwrap(), 0);
    assert_eq!(
        s.heartbeats_since(0, 100).await.unwrap(),
        vec![row("a", 300)]
    );
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
        schedule_policy: 0,
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
        budget_json: None,
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
        owner: None,
        daily_probes: 0,
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

/// What some tests need beyond [`Store`]: SQL of their own on the store's database,
/// as an operator or another program would run it.
#[async_trait]
pub trait RawSql: Store {
    /// The most ranges of stored seqs the store keeps per agent and epoch, if it keeps
    /// ranges at all.
    const SEQ_RANGE_CAP: Option<usize>;
    /// Runs `sqlite` on the embedded store (over a connection of its own to the same
    /// file), `postgres` on PostgreSQL.
    async fn sql(&self, sqlite: &str, postgres: &str);
}

#[async_trait]
impl RawSql for SqliteStore {
    const SEQ_RANGE_CAP: Option<usize> = Some(MAX_SEQ_RANGES);
    async fn sql(&self, sqlite: &str, _: &str) {
        self.execute_elsewhere(sqlite).unwrap();
    }
}

#[async_trait]
impl RawSql for PostgresStore {
    const SEQ_RANGE_CAP: Option<usize> = None;
    async fn sql(&self, _: &str, postgres: &str) {
        self.execute_sql(postgres).await.unwrap();
    }
}

/// (stored, duplicates, dead-lettered) of each batch.
fn counts(out: &[BatchOutcome]) -> Vec<(u64, u64, u64)> {
    out.iter()
        .map(|o| (o.stored, o.duplicates, o.dead_lettered))
        .collect()
}

/// Makes the database refuse agent `p`'s records of seq 3, as it refuses a record it
/// cannot hold.
async fn poison_seq_3_of_agent_p<S: RawSql>(s: &S) {
    s.sql(
        "CREATE TRIGGER poisoned_on_purpose BEFORE INSERT ON records
         WHEN NEW.agent_id = 'p' AND NEW.seq = 3
         BEGIN SELECT RAISE(ABORT, 'poisoned_on_purpose'); END;",
        "ALTER TABLE records ADD CONSTRAINT poisoned_on_purpose CHECK (NOT (agent_id = 'p' AND seq = 3))",
    )
    .await;
}

/// A record the database refuses (made unstorable on purpose) goes to the dead letters
/// with the database's reason; the rest of its group is stored, other agents' batches
/// and its own batch alike; a resend of it is a duplicate.
pub async fn a_poison_record_is_dead_lettered_and_blocks_nothing<S: RawSql>(s: &S) {
    s.create_request(new_request("r1", None)).await.unwrap();
    poison_seq_3_of_agent_p(s).await;
    let group: Vec<(String, PreparedBatch)> = vec![
        ("a".into(), prepare(&batch(7, &[1, 2]))),
        ("p".into(), prepare(&batch(1, &[1, 2, 3, 4]))),
        ("b".into(), prepare(&batch(2, &[5]))),
    ];
    let out = s.store_batches(group.clone(), 100).await.unwrap();
    assert_eq!(counts(&out), vec![(2, 0, 0), (3, 0, 1), (1, 0, 0)]);
    assert_eq!(out[0].finished, vec!["r1".to_string()]);
    assert!(out.iter().all(|o| o.refused.is_empty()));
    assert_eq!(s.agent_record_count("p").await.unwrap(), 3);
    assert_eq!(s.record_count().await.unwrap(), 6);
    assert_eq!(
        s.request("r1").await.unwrap().unwrap().state,
        RequestState::Succeeded
    );
    assert_eq!(result_seqs(s, "p").await, vec![4, 2]);

    let dead = s.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(
        (
            d.agent_id.as_str(),
            d.epoch,
            d.seq,
            d.at_ms,
            d.kind.as_str()
        ),
        ("p", 1, 3, 13, "state")
    );
    assert!(d.reason.contains("poisoned_on_purpose"), "{}", d.reason);
    assert_eq!(d.body, group[1].1.rows[2].body_json);
    assert_eq!(d.stored_ms, 100);
    assert_eq!(s.dead_letters(Some("p"), 10).await.unwrap(), dead);
    assert!(s.dead_letters(Some("a"), 10).await.unwrap().is_empty());
    assert_eq!(s.dead_letter_count().await.unwrap(), 1);

    // The whole group again: every record, the poison one too, is a duplicate.
    let again = s.store_batches(group, 101).await.unwrap();
    assert_eq!(counts(&again), vec![(0, 2, 0), (0, 4, 0), (0, 1, 0)]);
    // Alone, as the only record of the only batch.
    let alone = s
        .store_batch("p", prepare(&batch(1, &[3])), 102)
        .await
        .unwrap();
    assert_eq!(counts(&[alone]), vec![(0, 1, 0)]);
    // Another epoch's seq 3 is another record: dead-lettered, and listed first. Its
    // seq 4 is the second result of run r1.4 (stored from epoch 1): a duplicate.
    let other = s
        .store_batch("p", prepare(&batch(9, &[3, 4])), 103)
        .await
        .unwrap();
    assert_eq!(counts(std::slice::from_ref(&other)), vec![(0, 1, 1)]);
    assert_eq!(other.run_duplicates, 1);
    let dead = s.dead_letters(Some("p"), 10).await.unwrap();
    let ids: Vec<(u64, u64)> = dead.iter().map(|d| (d.epoch, d.seq)).collect();
    assert_eq!(ids, vec![(9, 3), (1, 3)], "newest first");
    assert_eq!(s.dead_letters(None, 1).await.unwrap().len(), 1);
    assert_eq!(s.dead_letter_count().await.unwrap(), 2);
    assert_eq!(s.record_count().await.unwrap(), 6);
}

/// A dead letter that cannot be written either is an outage, not a poison record: the
/// call fails (the caller retries), and a later resend completes it, storing each
/// record once.
pub async fn an_unwritable_dead_letter_fails_the_call_and_a_resend_completes_it<S: RawSql>(s: &S) {
    poison_seq_3_of_agent_p(s).await;
    s.sql(
        "CREATE TRIGGER no_dead_letters BEFORE INSERT ON dead_letters
         BEGIN SELECT RAISE(ABORT, 'no_dead_letters'); END;",
        "ALTER TABLE dead_letters ADD CONSTRAINT no_dead_letters CHECK (seq < 0)",
    )
    .await;
    let group: Vec<(String, PreparedBatch)> = vec![
        ("a".into(), prepare(&batch(7, &[1, 2]))),
        ("p".into(), prepare(&batch(1, &[1, 2, 3, 4]))),
        ("b".into(), prepare(&batch(2, &[5]))),
    ];
    let e = s
        .store_batches(group.clone(), 100)
        .await
        .expect_err("no dead letter, no success");
    assert!(e.to_string().contains("no_dead_letters"), "{e}");
    assert_eq!(s.dead_letter_count().await.unwrap(), 0);
    s.sql(
        "DROP TRIGGER no_dead_letters",
        "ALTER TABLE dead_letters DROP CONSTRAINT no_dead_letters",
    )
    .await;
    let out = s.store_batches(group, 101).await.unwrap();
    let handled: Vec<u64> = out
        .iter()
        .map(|o| o.stored + o.duplicates + o.dead_lettered)
        .collect();
    assert_eq!(handled, vec![2, 4, 1], "every record handled");
    assert_eq!(out[1].dead_lettered, 1);
    assert_eq!(s.record_count().await.unwrap(), 6, "none stored twice");
    assert_eq!(s.dead_letter_count().await.unwrap(), 1);
}

fn module_result(seq: u64, request: &str, module: &str, outcome: ModuleOutcome) -> Record {
    Record {
        seq,
        at_ms: 1_000 + seq as i64,
        body: RecordBody::Result(ModuleResult {
            request_id: request.into(),
            module: module.into(),
            received_ms: 5,
            started_ms: 6,
            finished_ms: 7,
            outcome,
        }),
    }
}

/// An HTTP result whose body preview holds NUL bytes (a binary body).
fn http_with_nul() -> ModuleOutput {
    use imn_proto::kinds::http::*;
    ModuleOutput::Http(Box::new(HttpResult {
        url: "http://192.0.2.1/pixel.gif".into(),
        method: HttpMethod::Get,
        addr: Some("192.0.2.1:80".into()),
        af: Some(4),
        local_addr: Some("192.0.2.9:40000".into()),
        timing: HttpTiming {
            dns_ms: Some(0.5),
            connect_ms: Some(1.25),
            tls_ms: None,
            ttfb_ms: Some(2.5),
            total_ms: 3.75,
        },
        response: Some(Box::new(HttpResponse {
            http_version: "HTTP/1.1".into(),
            status: 200,
            reason: Some("OK".into()),
            headers: vec![HttpHeader {
                name: "content-type".into(),
                value: "image/gif".into(),
            }],
            headers_truncated: false,
            header_bytes: 64,
            content_length: Some(14),
            body_bytes: 14,
            body_truncated: false,
            body_preview: Some("GIF89a\u{1}\0\u{1}\0\u{80}\0\0\u{ff}".into()),
            location: None,
        })),
        tls: None,
        error: None,
        error_phase: None,
        redirects: vec![],
    }))
}

/// A DNS result with a TXT record whose second string holds a zero byte.
fn dns_with_nul() -> ModuleOutput {
    use imn_proto::kinds::dns::*;
    ModuleOutput::Dns(Box::new(DnsResult {
        server: "192.0.2.53".into(),
        port: 53,
        server_source: ServerSource::Params,
        src_addr: Some("192.0.2.9".into()),
        protocol: DnsProtocol::Udp,
        tcp_after_truncation: false,
        qname: "example.test.".into(),
        qtype: "TXT".into(),
        qclass: "IN".into(),
        qbuf: "AAE=".into(),
        attempts: 1,
        timeout_ms: 5000,
        error: None,
        reply: Some(Box::new(DnsReply {
            rt_ms: 1.5,
            tcp_connect_ms: None,
            size: 80,
            abuf: "AAE=".into(),
            message: Some(DnsMessage {
                id: 1,
                opcode: 0,
                rcode: 0,
                rcode_name: "NOERROR".into(),
                flags: DnsFlags {
                    qr: true,
                    rd: true,
                    ra: true,
                    ..Default::default()
                },
                qdcount: 1,
                ancount: 1,
                nscount: 0,
                arcount: 0,
                question: vec![DnsQuestion {
                    name: "example.test.".into(),
                    qtype: "TXT".into(),
                    class: "IN".into(),
                }],
                answer: vec![DnsRecord {
                    name: "example.test.".into(),
                    rtype: "TXT".into(),
                    type_code: 16,
                    class: "IN".into(),
                    ttl: 300,
                    rdlength: 17,
                    rdata: "\"v=spf1\" \"zero\\000byte\"".into(),
                    data: RData::Txt {
                        strings: vec!["v=spf1".into(), "zero\0byte".into()],
                    },
                }],
                authority: vec![],
                additional: vec![],
                edns: None,
            }),
        })),
    }))
}

/// Agent text with NUL in it is stored, not refused: results read back as the JSON
/// the agent sent (NUL included), an event's message too; a column of its own (request
/// id, module, a state's detail) holds it escaped as `␀` (see `nul_free`).
pub async fn text_with_nul_is_stored_and_read_back_exactly(s: &dyn Store) {
    for id in ["rn1", "rn2", "rn3", "rn4"] {
        let mut r = new_request(id, None);
        r.agent_id = "n".into();
        s.create_request(r).await.unwrap();
    }
    let echo = ModuleOutput::Echo(EchoResult {
        message: "a\0b".into(),
    });
    let (http, dns) = (http_with_nul(), dns_with_nul());
    let b = Batch {
        epoch: 1,
        records: vec![
            module_result(1, "rn1", "echo_module", ModuleOutcome::Ok(echo.clone())),
            module_result(2, "rn2", "http", ModuleOutcome::Ok(http.clone())),
            module_result(3, "rn3", "dns", ModuleOutcome::Ok(dns.clone())),
            Record {
                seq: 4,
                at_ms: 1_004,
                body: RecordBody::State(StateChange {
                    request_id: "rn4".into(),
                    state: RequestState::Running,
                    detail: Some("half\0way".into()),
                }),
            },
            Record {
                seq: 5,
                at_ms: 1_005,
                body: RecordBody::Event(imn_proto::wire::AgentEvent {
                    kind: "log".into(),
                    message: "boot\0ed".into(),
                }),
            },
            module_result(
                6,
                "rn4",
                "echo_module",
                ModuleOutcome::Failed("refused\0here".into()),
            ),
            module_result(7, "x\0y", "echo\0module", ModuleOutcome::Ok(echo.clone())),
        ],
    };
    let out = s.store_batch("n", prepare(&b), 100).await.unwrap();
    assert_eq!(
        counts(std::slice::from_ref(&out)),
        vec![(7, 0, 0)],
        "{out:?}"
    );
    assert_eq!(s.dead_letter_count().await.unwrap(), 0);

    for (id, output) in [("rn1", &echo), ("rn2", &http), ("rn3", &dns)] {
        let r = s.result("n", id).await.unwrap().expect(id);
        assert_eq!(r.result, output.to_json(), "{id}");
    }
    let r = s.result("n", "rn1").await.unwrap().unwrap();
    assert_eq!(r.result["message"].as_str(), Some("a\0b"));
    let page = s
        .results_page(ResultFilter {
            agent: Some("n".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.len(), 5);
    assert_eq!(page[1].1.result, http.to_json());
    let failed = s.result("n", "rn4").await.unwrap().unwrap();
    assert_eq!(failed.state, RequestState::Failed);
    assert_eq!(failed.error.as_deref(), Some("refused\0here"));
    // Columns of their own: escaped.
    let odd = &page[4].1;
    assert_eq!(
        (odd.request_id.as_str(), odd.module.as_str()),
        ("x\u{2400}y", "echo\u{2400}module")
    );
    assert_eq!(odd.result, echo.to_json());
    let details: Vec<Option<String>> = s
        .transitions("rn4")
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.detail)
        .collect();
    assert_eq!(
        details,
        vec![
            None,
            Some("half\u{2400}way".to_string()),
            Some("refused\u{2400}here".to_string())
        ]
    );
    // A detail from the backend itself is escaped the same way.
    s.transition("rn1", RequestState::Expired, 2_000, "backend", Some("x\0"))
        .await
        .unwrap();
    let last = s.transitions("rn1").await.unwrap().pop().unwrap();
    assert_eq!(last.detail.as_deref(), Some("x\u{2400}"));
    assert_eq!(
        s.events("n", 5).await.unwrap(),
        vec![(1_005, "log".to_string(), "boot\0ed".to_string())]
    );
    // And a resend is a duplicate, as for any record.
    let again = s.store_batch("n", prepare(&b), 101).await.unwrap();
    assert_eq!(counts(&[again]), vec![(0, 7, 0)]);
}

/// Far-apart seqs: the embedded store keeps at most [`MAX_SEQ_RANGES`] ranges of
/// stored seqs per agent and epoch, and refuses (stores nothing, reports the seq) a
/// record that would open one more; once the agent's other seqs close the gaps, the
/// refused ones are taken. PostgreSQL has no such ranges and takes everything at once.
pub async fn far_apart_seqs_are_refused_past_the_range_cap_until_gaps_close<S: RawSql>(s: &S) {
    let n = MAX_SEQ_RANGES as u64 + 100;
    // Descending and never adjacent: each would be a range of its own.
    let evens: Vec<u64> = (1..=n).rev().map(|i| 2 * i).collect();
    let out = s
        .store_batch("h", prepare(&batch(1, &evens)), 100)
        .await
        .unwrap();
    assert_eq!(out.duplicates + out.dead_lettered, 0);
    assert_eq!(out.stored + out.refused.len() as u64, n);
    assert_eq!(
        out.refused,
        evens[out.stored as usize..].to_vec(),
        "the seqs past the cap, in the batch's order"
    );
    match S::SEQ_RANGE_CAP {
        Some(cap) => assert_eq!(out.stored, cap as u64, "one range per record, to the cap"),
        None => assert!(out.refused.is_empty()),
    }
    assert_eq!(
        s.record_count().await.unwrap(),
        out.stored,
        "refused: not stored"
    );
    assert_eq!(s.dead_letter_count().await.unwrap(), 0, "nor dead-lettered");
    // The odd seqs, ascending as an outbox sends them, join the ranges.
    let odds: Vec<u64> = (0..=n).map(|i| 2 * i + 1).collect();
    let out2 = s
        .store_batch("h", prepare(&batch(1, &odds)), 101)
        .await
        .unwrap();
    assert_eq!(out2.stored + out2.refused.len() as u64, n + 1);
    // Everything refused, sent again, is taken now.
    let resend: Vec<u64> = out.refused.iter().chain(&out2.refused).copied().collect();
    let out3 = s
        .store_batch("h", prepare(&batch(1, &resend)), 102)
        .await
        .unwrap();
    assert!(out3.refused.is_empty(), "{:?}", out3.refused);
    assert_eq!(out3.stored, resend.len() as u64);
    assert_eq!(s.agent_record_count("h").await.unwrap(), 2 * n + 1);
    let all: Vec<u64> = (1..=2 * n + 1).collect();
    let again = s
        .store_batch("h", prepare(&batch(1, &all)), 103)
        .await
        .unwrap();
    assert_eq!((again.stored, again.duplicates), (0, 2 * n + 1));
}

fn schedule_row(
    id: &str,
    owner: Option<&str>,
    daily_probes: u64,
    deadline_ms: i64,
) -> MeasurementRow {
    MeasurementRow {
        id: id.into(),
        module: "echo_module".into(),
        params_json: "{}".into(),
        selection_json: "{}".into(),
        description: None,
        created_ms: 1,
        deadline_ms,
        schedule_json: Some(
            r#"{"interval_ms":60000,"start_ms":0,"stop_ms":null,"jitter_ms":0}"#.into(),
        ),
        stopped_ms: None,
        owner: owner.map(str::to_string),
        daily_probes,
    }
}

fn schedule_part(id: &str) -> AgentSchedule {
    AgentSchedule {
        measurement_id: id.into(),
        module: "echo_module".into(),
        params_json: "{}".into(),
        timeout_ms: 1000,
        schedule_json: r#"{"interval_ms":60000,"start_ms":0,"stop_ms":null,"jitter_ms":0}"#.into(),
    }
}

/// A schedule version at the end of its range (put there before versions were
/// bounded) starts again at 1 instead of overflowing, so the agent's schedules can
/// still change and stop; an agent cannot report a version past the bound.
pub async fn a_schedule_version_at_the_end_of_its_range_starts_again<S: RawSql>(s: &S) {
    s.sql(
        "INSERT INTO schedule_versions (agent_id, version) VALUES ('a', 9223372036854775806), ('b', -5)",
        "INSERT INTO schedule_versions (agent_id, version) VALUES ('a', 9223372036854775806), ('b', -5)",
    )
    .await;
    let v = s
        .create_schedule(
            schedule_row("m1", None, 0, i64::MAX),
            vec![
                ("a".into(), schedule_part("m1")),
                ("b".into(), schedule_part("m1")),
            ],
        )
        .await
        .unwrap();
    assert_eq!(v, vec![("a".to_string(), 1), ("b".to_string(), 1)]);
    assert_eq!(
        s.stop_schedule("m1", 10).await.unwrap(),
        vec![("a".to_string(), 2), ("b".to_string(), 2)]
    );
    assert!(s
        .raise_schedule_version("a", MAX_SCHEDULE_VERSION + 1)
        .await
        .is_err());
    assert!(s.raise_schedule_version("a", u64::MAX).await.is_err());
    assert_eq!(s.agent_schedules("a").await.unwrap().0, 2, "unchanged");
    assert_eq!(s.raise_schedule_version("a", 41).await.unwrap(), 42);
    assert_eq!(
        s.raise_schedule_version("c", MAX_SCHEDULE_VERSION)
            .await
            .unwrap(),
        MAX_SCHEDULE_VERSION + 1
    );
    // A stored version past the bound is replaced by a raise, too.
    s.sql(
        "UPDATE schedule_versions SET version = 9223372036854775807 WHERE agent_id = 'b'",
        "UPDATE schedule_versions SET version = 9223372036854775807 WHERE agent_id = 'b'",
    )
    .await;
    assert_eq!(s.raise_schedule_version("b", 6).await.unwrap(), 7);
}

/// A measurement keeps its owner and daily charge; a token's usage is its day's spend
/// and its running schedules.
pub async fn measurements_owners_and_token_usage(s: &dyn Store) {
    let mut one_off = schedule_row("m0", Some("t1"), 0, 60_000);
    one_off.schedule_json = None;
    s.create_measurement(one_off.clone()).await.unwrap();
    let got = s.measurement("m0").await.unwrap().unwrap();
    assert_eq!((got.owner.as_deref(), got.daily_probes), (Some("t1"), 0));
    let part = |id: &str| vec![("a".to_string(), schedule_part(id))];
    for (id, owner, daily, deadline) in [
        ("s1", Some("t1"), 500, i64::MAX),
        ("s2", Some("t1"), 700, i64::MAX),
        ("s3", Some("t1"), 900, 50),
        ("s4", Some("t2"), 300, i64::MAX),
        ("s5", Some("t3"), u64::MAX, i64::MAX),
        ("s6", Some("t3"), 10, i64::MAX),
        ("s7", None, 10, i64::MAX),
    ] {
        s.create_schedule(schedule_row(id, owner, daily, deadline), part(id))
            .await
            .unwrap();
    }
    s.stop_schedule("s2", 60).await.unwrap();
    let s1 = s.measurement("s1").await.unwrap().unwrap();
    assert_eq!((s1.owner.as_deref(), s1.daily_probes), (Some("t1"), 500));
    assert_eq!(s.measurement("s7").await.unwrap().unwrap().owner, None);
    assert_eq!(
        s.measurement("s5").await.unwrap().unwrap().daily_probes,
        i64::MAX as u64,
        "kept at the store's largest integer"
    );
    let usage = |t: &'static str| async move { s.token_usage(t, 20_000, 100).await.unwrap() };
    assert_eq!(
        usage("t1").await,
        TokenUsage {
            one_off_probes: 0,
            schedules: 1,
            schedule_daily_probes: 500
        },
        "one-off, stopped and past-deadline measurements are not standing charges"
    );
    assert_eq!(usage("t2").await.schedule_daily_probes, 300);
    assert_eq!(
        usage("t3").await,
        TokenUsage {
            one_off_probes: 0,
            schedules: 2,
            schedule_daily_probes: i64::MAX as u64
        },
        "saturating"
    );
    assert_eq!(usage("nobody").await, TokenUsage::default());
    // At an earlier time, s3 was still running.
    assert_eq!(s.token_usage("t1", 20_000, 10).await.unwrap().schedules, 2);

    assert_eq!(s.add_spend("t1", 20_000, 5).await.unwrap(), 5);
    assert_eq!(s.add_spend("t1", 20_000, 7).await.unwrap(), 12);
    assert_eq!(s.add_spend("t1", 20_001, 1).await.unwrap(), 1);
    assert_eq!(s.add_spend("t2", 20_000, 0).await.unwrap(), 0);
    assert_eq!(usage("t1").await.one_off_probes, 12);
    assert_eq!(
        s.token_usage("t1", 20_001, 100)
            .await
            .unwrap()
            .one_off_probes,
        1
    );
    assert_eq!(
        s.add_spend("t1", 20_000, u64::MAX).await.unwrap(),
        i64::MAX as u64
    );
    assert_eq!(
        s.add_spend("t1", 20_000, 1).await.unwrap(),
        i64::MAX as u64,
        "saturating, never overflowing"
    );
    // Adds at once are all counted.
    let adds = (0..50).map(|_| s.add_spend("t4", 7, 2));
    let totals = futures::future::join_all(adds).await;
    let mut totals: Vec<u64> = totals.into_iter().map(Result::unwrap).collect();
    totals.sort_unstable();
    assert_eq!(totals, (1..=50).map(|i| 2 * i).collect::<Vec<u64>>());

    // A new request charges its token in the same transaction; a replay of its
    // idempotency key charges nothing.
    let charge = Some(crate::store::Charge {
        token: "t5".into(),
        day: 7,
        probes: 30,
    });
    let first = NewRequest {
        charge: charge.clone(),
        ..new_request("charged-1", Some("charged-key"))
    };
    assert!(matches!(
        s.create_request(first.clone()).await.unwrap(),
        Created::New(_)
    ));
    let again = NewRequest {
        id: "charged-2".into(),
        ..first
    };
    assert!(matches!(
        s.create_request(again).await.unwrap(),
        Created::Existing(_)
    ));
    let free = NewRequest {
        charge: Some(crate::store::Charge {
            probes: 0,
            ..charge.clone().unwrap()
        }),
        ..new_request("charged-3", None)
    };
    assert!(matches!(
        s.create_request(free).await.unwrap(),
        Created::New(_)
    ));
    assert_eq!(
        s.token_usage("t5", 7, 100).await.unwrap().one_off_probes,
        30
    );
}

/// The idempotency hash is stored with the request, and comes back with the request
/// an idempotency key finds (so a replay with another body can be told), never in the
/// API's JSON.
/// ...and the request a key made is found by the key.
pub async fn an_idempotency_hash_comes_back_with_the_existing_request(s: &dyn Store) {
    let mut first = new_request("r1", Some("k"));
    first.idempotency_hash = Some("h1".into());
    let Created::New(row) = s.create_request(first).await.unwrap() else {
        panic!("a new key makes a request");
    };
    assert_eq!(row.idempotency_hash.as_deref(), Some("h1"));
    let mut replay = new_request("r2", Some("k"));
    replay.idempotency_hash = Some("h2".into());
    match s.create_request(replay).await.unwrap() {
        Created::Existing(r) => {
            assert_eq!(
                (r.id.as_str(), r.idempotency_hash.as_deref()),
                ("r1", Some("h1"))
            )
        }
        Created::New(_) => panic!("same key made a second request"),
    }
    let r = s.request("r1").await.unwrap().unwrap();
    assert_eq!(r.idempotency_hash.as_deref(), Some("h1"));
    // Found by its key, before anything else is checked (a retry of a request that
    // spent the budget must find it, not be refused).
    let by_key = s.request_by_key("k").await.unwrap().unwrap();
    assert_eq!(
        (by_key.id.as_str(), by_key.idempotency_hash.as_deref()),
        ("r1", Some("h1"))
    );
    assert!(s.request_by_key("nope").await.unwrap().is_none());
    assert!(serde_json::to_value(&r)
        .unwrap()
        .get("idempotency_hash")
        .is_none());
    s.create_request(new_request("r3", None)).await.unwrap();
    assert_eq!(
        s.request("r3").await.unwrap().unwrap().idempotency_hash,
        None
    );
}

/// An API token's budget is stored with its credential, as the text it was given.
pub async fn credentials_keep_their_budget(s: &dyn Store) {
    let mut cred = CredentialRow {
        kind: "api".into(),
        id: "t1".into(),
        secret_hash: "h1".into(),
        message_key: None,
        scopes: vec!["measure".into()],
        tags: vec![],
        rate_per_min: None,
        created_ms: 1,
        revoked_ms: None,
        budget_json: Some(r#"{"daily_probes":1000,"max_schedules":3}"#.into()),
    };
    s.put_credential(cred.clone()).await.unwrap();
    assert_eq!(s.credentials().await.unwrap(), vec![cred.clone()]);
    cred.budget_json = None;
    s.put_credential(cred.clone()).await.unwrap();
    assert_eq!(s.credentials().await.unwrap(), vec![cred]);
}

/// `n` pseudo-random bytes (xorshift), the same for the same seed.
fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn release_row(name: &str, version: &str, arch: &str, sha: char, added_ms: i64) -> ReleaseRow {
    ReleaseRow {
        name: name.into(),
        version: version.into(),
        arch: arch.into(),
        sha256: sha.to_string().repeat(64),
        size: 0,
        manifest: format!("{name} {version} {arch} {}", sha.to_string().repeat(64)),
        signature: "ab".repeat(32),
        rollback: false,
        expires_ms: added_ms + 86_400_000,
        added_ms,
    }
}

/// Releases: stored once by sha256 (the same again is Ok(false) and changes nothing),
/// another file for a stored (name, version, arch) refused and the first kept; listed
/// newest added first, found by (version, arch) under the agent's name, and their
/// files read back byte for byte.
pub async fn releases_are_stored_once_by_file_and_found_by_version_and_arch(s: &dyn Store) {
    let big = pseudo_random(300 * 1024, 0x5eed);
    let mut r1 = release_row("imn-agent", "1.2.0", "x86_64", 'a', 100);
    r1.size = big.len() as u64;
    r1.rollback = true;
    assert!(s.put_release(r1.clone(), big.clone()).await.unwrap());
    assert!(!s.put_release(r1.clone(), big.clone()).await.unwrap());
    // The same file again, signed otherwise: still already stored, nothing changes.
    let mut resigned = r1.clone();
    resigned.manifest.push_str(" again");
    resigned.signature = "cd".repeat(32);
    resigned.added_ms = 999;
    assert!(!s.put_release(resigned, vec![1, 2, 3]).await.unwrap());
    assert_eq!(s.releases().await.unwrap(), vec![r1.clone()]);
    assert_eq!(
        s.release_bytes(&r1.sha256).await.unwrap().as_deref(),
        Some(&big[..])
    );

    // Another file for the same release: refused, and the first stays.
    let other = release_row("imn-agent", "1.2.0", "x86_64", 'b', 150);
    match s.put_release(other.clone(), vec![9; 10]).await {
        Err(StoreError::Db(e)) => assert_eq!(
            e,
            format!(
                "release imn-agent 1.2.0 for x86_64 is already stored with another file (sha256 {})",
                r1.sha256
            )
        ),
        other => panic!("another file for a stored release: {other:?}"),
    }
    assert_eq!(s.releases().await.unwrap(), vec![r1.clone()]);
    assert_eq!(s.release_bytes(&other.sha256).await.unwrap(), None);
    assert_eq!(
        s.release("1.2.0", "x86_64").await.unwrap(),
        Some(r1.clone())
    );
    // The stored file under another release: refused too (one row per file).
    let same_file = release_row("imn-agent", "1.2.1", "x86_64", 'a', 160);
    assert!(matches!(
        s.put_release(same_file, big.clone()).await,
        Err(StoreError::Db(_))
    ));
    assert_eq!(s.release("1.2.1", "x86_64").await.unwrap(), None);
    // Text is kept exactly or not at all: NUL is refused, not escaped.
    let mut nul = release_row("imn-agent", "1.4.0", "x86_64", 'f', 170);
    nul.manifest = "imn-agent 1.4.0\0".into();
    assert!(matches!(
        s.put_release(nul.clone(), vec![0]).await,
        Err(StoreError::Db(_))
    ));
    assert_eq!(s.release("1.4.0", "x86_64").await.unwrap(), None);

    let r2 = release_row("imn-agent", "1.3.0", "x86_64", 'c', 200);
    let r3 = release_row("imn-agent", "1.3.0", "aarch64", 'e', 300);
    // Added at the same time as r3: the smaller sha256 first.
    let r4 = release_row("imn-agent", "1.3.0", "armv7", 'd', 300);
    let tool = release_row("imn-tool", "0.1.0", "x86_64", '0', 50);
    let small = pseudo_random(1000, 7);
    assert!(s.put_release(r2.clone(), small.clone()).await.unwrap());
    assert!(s.put_release(r3.clone(), Vec::new()).await.unwrap());
    assert!(s.put_release(r4.clone(), vec![0; 3]).await.unwrap());
    assert!(s.put_release(tool.clone(), vec![0, 0, 0, 1]).await.unwrap());
    assert_eq!(
        s.releases().await.unwrap(),
        vec![r4.clone(), r3.clone(), r2.clone(), r1.clone(), tool.clone()]
    );
    assert_eq!(
        s.release("1.3.0", "aarch64").await.unwrap(),
        Some(r3.clone())
    );
    assert_eq!(
        s.release("1.3.0", "x86_64").await.unwrap(),
        Some(r2.clone())
    );
    assert_eq!(s.release("1.3.0", "mips").await.unwrap(), None);
    assert_eq!(s.release("9.9.9", "x86_64").await.unwrap(), None);
    assert_eq!(
        s.release("0.1.0", "x86_64").await.unwrap(),
        None,
        "only the agent's releases"
    );
    assert_eq!(s.release("1.2.0\0", "x86_64").await.unwrap(), None);

    assert_eq!(s.release_bytes(&r1.sha256).await.unwrap(), Some(big));
    assert_eq!(s.release_bytes(&r2.sha256).await.unwrap(), Some(small));
    assert_eq!(s.release_bytes(&r3.sha256).await.unwrap(), Some(vec![]));
    assert_eq!(
        s.release_bytes(&tool.sha256).await.unwrap(),
        Some(vec![0, 0, 0, 1])
    );
    assert_eq!(s.release_bytes(&"9".repeat(64)).await.unwrap(), None);
    assert_eq!(s.release_bytes("").await.unwrap(), None);
}

/// Fleet documents: put replaces (kind, key); a kind lists only its own, by key
/// (byte-wise in both stores); text round-trips, NUL escaped as other columns of their
/// own (see `nul_free`), non-ASCII whole, a JSON `\u0000` escape as written.
pub async fn fleet_docs_are_replaced_and_listed_by_kind_and_key(s: &dyn Store) {
    assert_eq!(s.doc("rollout", "r1").await.unwrap(), None);
    assert!(s.docs("rollout").await.unwrap().is_empty());
    s.put_doc("rollout", "r1", r#"{"v":1}"#, 1).await.unwrap();
    assert_eq!(
        s.doc("rollout", "r1").await.unwrap().as_deref(),
        Some(r#"{"v":1}"#)
    );
    s.put_doc("rollout", "r1", r#"{"v":2}"#, 2).await.unwrap();
    assert_eq!(
        s.doc("rollout", "r1").await.unwrap().as_deref(),
        Some(r#"{"v":2}"#)
    );
    assert_eq!(
        s.docs("rollout").await.unwrap(),
        vec![("r1".to_string(), r#"{"v":2}"#.to_string())]
    );

    for key in ["b", "é", "a", "B", "a0", "_"] {
        s.put_doc("agent_state", key, &format!(r#"{{"k":"{key}"}}"#), 3)
            .await
            .unwrap();
    }
    s.put_doc("config", "a", "{}", 3).await.unwrap();
    s.put_doc("agent_states", "a", "{}", 3).await.unwrap();
    let keys: Vec<String> = s
        .docs("agent_state")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, d)| {
            assert_eq!(d, format!(r#"{{"k":"{k}"}}"#));
            k
        })
        .collect();
    assert_eq!(keys, vec!["B", "_", "a", "a0", "b", "é"]);
    // Some keys at once: only those of the kind, by key; absent keys are skipped.
    let some: Vec<String> = ["é", "a", "zz", "B"]
        .iter()
        .map(|k| k.to_string())
        .collect();
    let got: Vec<String> = s
        .docs_of("agent_state", &some)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, d)| {
            assert_eq!(d, format!(r#"{{"k":"{k}"}}"#));
            k
        })
        .collect();
    assert_eq!(got, vec!["B", "a", "é"]);
    assert!(s.docs_of("agent_state", &[]).await.unwrap().is_empty());
    assert_eq!(s.docs_of("config", &some).await.unwrap().len(), 1);
    // Deleting removes that (kind, key) only, once.
    assert!(s.delete_doc("agent_state", "a0").await.unwrap());
    assert!(!s.delete_doc("agent_state", "a0").await.unwrap());
    assert!(!s.delete_doc("agent_states", "b").await.unwrap());
    assert_eq!(s.doc("agent_state", "a0").await.unwrap(), None);
    assert_eq!(s.docs("agent_state").await.unwrap().len(), 5);
    assert_eq!(
        s.doc("agent_states", "a").await.unwrap().as_deref(),
        Some("{}")
    );
    s.put_doc("agent_state", "a0", r#"{"k":"a0"}"#, 3)
        .await
        .unwrap();
    // Compare and set: only over what was expected.
    assert!(s.swap_doc("lease", "x", None, "one", 4).await.unwrap());
    assert!(!s.swap_doc("lease", "x", None, "two", 4).await.unwrap());
    assert!(!s
        .swap_doc("lease", "x", Some("two"), "three", 4)
        .await
        .unwrap());
    assert!(s
        .swap_doc("lease", "x", Some("one"), "four", 4)
        .await
        .unwrap());
    assert!(!s
        .swap_doc("lease", "y", Some("one"), "five", 4)
        .await
        .unwrap());
    assert_eq!(s.doc("lease", "x").await.unwrap().as_deref(), Some("four"));
    assert_eq!(s.doc("lease", "y").await.unwrap(), None);
    assert!(s.delete_doc("lease", "x").await.unwrap());
    assert_eq!(
        s.docs("rollout").await.unwrap().len(),
        1,
        "only its own kind"
    );
    assert_eq!(s.doc("agent_state", "c").await.unwrap(), None);
    assert_eq!(s.doc("nothing", "a").await.unwrap(), None);
    assert!(s.docs("agent").await.unwrap().is_empty());

    // NUL (escaped, as in every column of its own) and non-ASCII text.
    let text = "{\"m\":\"a\0b ünïcödé 日本語 🚀\"}";
    s.put_doc("config", "k\0ey", text, 4).await.unwrap();
    let escaped = "{\"m\":\"a\u{2400}b ünïcödé 日本語 🚀\"}";
    assert_eq!(
        s.doc("config", "k\0ey").await.unwrap().as_deref(),
        Some(escaped)
    );
    assert_eq!(
        s.docs("config").await.unwrap(),
        vec![
            ("a".to_string(), "{}".to_string()),
            ("k\u{2400}ey".to_string(), escaped.to_string()),
        ]
    );
    // JSON's own escape for NUL is plain text: kept as written.
    let json = serde_json::json!({"m": "a\0b"}).to_string();
    assert!(json.contains("\\u0000"), "{json}");
    s.put_doc("config", "json", &json, 5).await.unwrap();
    assert_eq!(s.doc("config", "json").await.unwrap(), Some(json));
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
    one_result_per_slot_and_per_request,
    results_pages_resume_and_filter,
    agents_sessions_credentials_and_measurements,
    a_poison_record_is_dead_lettered_and_blocks_nothing,
    an_unwritable_dead_letter_fails_the_call_and_a_resend_completes_it,
    text_with_nul_is_stored_and_read_back_exactly,
    far_apart_seqs_are_refused_past_the_range_cap_until_gaps_close,
    a_schedule_version_at_the_end_of_its_range_starts_again,
    measurements_owners_and_token_usage,
    an_idempotency_hash_comes_back_with_the_existing_request,
    credentials_keep_their_budget,
    releases_are_stored_once_by_file_and_found_by_version_and_arch,
    fleet_docs_are_replaced_and_listed_by_kind_and_key,
    heartbeat_history_is_stored_once_read_by_time_and_pruned_in_batches,
    rollups_merge_under_a_cursor_that_moves_once,
    records_are_pruned_by_module_age_and_position,
    bookkeeping_is_pruned_by_age_and_unfinished_work_stays,
);

/// PostgreSQL only: retention drops a whole monthly partition once its month is past
/// the cutoff and every record in it was rolled up, and the month can be written
/// again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_drops_whole_monthly_partitions_once_rolled_up() {
    let (_cluster, url) = crate::store::pg_cluster::fresh_database().await.unwrap();
    let s = crate::store::PostgresStore::connect(&url).await.unwrap();
    let now = imn_proto::now_ms();
    const DAY: i64 = 86_400_000;
    let record = |seq: u64, at_ms: i64| Record {
        seq,
        at_ms,
        body: RecordBody::Result(ModuleResult {
            request_id: format!("r.{seq}"),
            module: "echo_module".into(),
            received_ms: at_ms,
            started_ms: at_ms,
            finished_ms: at_ms,
            outcome: ModuleOutcome::Ok(ModuleOutput::Echo(EchoResult {
                message: "m".into(),
            })),
        }),
    };
    // Measured three months ago, stored two months ago; and one of today.
    let b = Batch {
        epoch: 1,
        records: vec![record(1, now - 92 * DAY), record(2, now - 92 * DAY + 1)],
    };
    assert_eq!(
        s.store_batch("a", prepare(&b), now - 60 * DAY)
            .await
            .unwrap()
            .stored,
        2
    );
    let b = Batch {
        epoch: 1,
        records: vec![record(3, now)],
    };
    assert_eq!(
        s.store_batch("a", prepare(&b), now).await.unwrap().stored,
        1
    );
    let all = |s: &crate::store::PostgresStore| {
        let s = s.clone();
        async move {
            s.results_page(ResultFilter {
                after: 0,
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap()
        }
    };
    let before = all(&s).await;
    let newest = before.iter().map(|(p, _, _)| *p).max().unwrap();
    let oldest = before.iter().map(|(p, _, _)| *p).min().unwrap();
    // Not yet rolled up: nothing goes.
    assert!(s
        .release_space(0, now - 31 * DAY, oldest - 1)
        .await
        .unwrap()
        .is_empty());
    let done = s.release_space(0, now - 31 * DAY, newest).await.unwrap();
    assert_eq!(done.len(), 1, "{done:?}");
    assert!(
        done[0].starts_with("dropped partition records_y"),
        "{done:?}"
    );
    let after = all(&s).await;
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].1.at_ms, now);
    // This month's partition stays (its month is not past the cutoff).
    assert!(s
        .release_space(0, now - 31 * DAY, newest)
        .await
        .unwrap()
        .is_empty());
    // The dropped month can be written again: its partition is made anew. A backlog
    // that arrives now for that month is kept, however old its month: ages are by
    // arrival.
    let late = Batch {
        epoch: 2,
        records: vec![record(4, now - 92 * DAY)],
    };
    assert_eq!(
        s.store_batch("a", prepare(&late), now)
            .await
            .unwrap()
            .stored,
        1
    );
    let newest = s.latest_position().await.unwrap();
    assert!(s
        .release_space(0, now - 31 * DAY, newest)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(all(&s).await.len(), 2);
}

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
    let now = imn_proto::now_ms();
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

/// PostgreSQL only: a month's partition is made on first use, and agent times far from
/// the backend's clock (a device that booted without a clock) land in the default
/// partition.
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
    // The backend's clock: January 2025 (partitions are made near it only).
    let now = 1_737_900_000_000; // 2025-01-26
    let out = s.store_batch("p", prepare(&batch), now).await.unwrap();
    assert_eq!(out.stored, 2);
    let names = s.partition_names().await.unwrap();
    assert!(names.contains(&"records_y2025m01".to_string()), "{names:?}");
    assert!(names.contains(&"records_default".to_string()), "{names:?}");
    // Both are found by the API's queries, and a resend of either is a duplicate.
    assert_eq!(result_seqs(&s, "p").await, vec![2, 1]);
    let again = s.store_batch("p", prepare(&batch), now + 1).await.unwrap();
    assert_eq!((again.stored, again.duplicates), (0, 2));
    let (records, db) = s.sizes().await.unwrap();
    assert!(records > 0 && db > records, "{records} {db}");
}

const YEAR_MS: i64 = 365 * 86_400_000;

/// PostgreSQL only: agent times far from the backend's clock (1970, 2090, five years
/// ago) make no partition: they go to the default partition, are read like any
/// other, and a resend of each is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_agent_times_far_from_the_clock_make_no_partition() {
    let (_cluster, url) = crate::store::pg_cluster::fresh_database().await.unwrap();
    let s = crate::store::PostgresStore::connect(&url).await.unwrap();
    let now = imn_proto::now_ms();
    let before = s.partition_names().await.unwrap();
    let batch = Batch {
        epoch: 1,
        records: vec![
            result_record(1, 5_000, "y1970", "echo_module"),
            result_record(2, 3_786_912_000_000, "y2090", "echo_module"),
            result_record(3, now - 5 * YEAR_MS, "five_years_ago", "echo_module"),
        ],
    };
    let out = s.store_batch("f", prepare(&batch), now).await.unwrap();
    assert_eq!(out.stored, 3);
    assert_eq!(s.partition_names().await.unwrap(), before, "no new table");
    assert_eq!(s.rows_in("records_default").await.unwrap(), 3);
    assert_eq!(result_seqs(&s, "f").await, vec![3, 2, 1]);
    let page = s
        .results_page(ResultFilter {
            since_ms: Some(3_000_000_000_000),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].1.request_id, "y2090");
    let again = s.store_batch("f", prepare(&batch), now + 1).await.unwrap();
    assert_eq!((again.stored, again.duplicates), (0, 3));
    assert_eq!(s.partition_names().await.unwrap(), before);
}

/// PostgreSQL only: a month stored while far from the clock is in the default
/// partition; when the clock comes near, the month gets its partition and its rows
/// move there, still found (a request's result included) and still deduplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_month_near_the_clock_takes_its_rows_from_the_default_partition() {
    let (_cluster, url) = crate::store::pg_cluster::fresh_database().await.unwrap();
    let s = crate::store::PostgresStore::connect(&url).await.unwrap();
    let march_2031 = 1_930_089_600_000; // 2031-03-01
    let mut req = new_request("mv1", None);
    req.agent_id = "mv".into();
    s.create_request(req).await.unwrap();
    let early = Batch {
        epoch: 1,
        records: vec![
            result_record(1, march_2031 + 9 * 86_400_000, "mv1", "echo_module"),
            result_record(2, march_2031 - 86_400_000, "feb", "echo_module"),
        ],
    };
    // Now: years before March 2031.
    let out = s
        .store_batch("mv", prepare(&early), imn_proto::now_ms())
        .await
        .unwrap();
    assert_eq!(out.stored, 2);
    assert!(!s
        .partition_names()
        .await
        .unwrap()
        .contains(&"records_y2031m03".to_string()));
    assert_eq!(s.rows_in("records_default").await.unwrap(), 2);
    // Now: March 2031.
    let late = Batch {
        epoch: 1,
        records: vec![result_record(
            3,
            march_2031 + 19 * 86_400_000,
            "mar",
            "echo_module",
        )],
    };
    let out = s
        .store_batch("mv", prepare(&late), march_2031 + 86_400_000)
        .await
        .unwrap();
    assert_eq!(out.stored, 1);
    let names = s.partition_names().await.unwrap();
    assert!(names.contains(&"records_y2031m03".to_string()), "{names:?}");
    assert!(
        !names.contains(&"records_y2031m02".to_string()),
        "only months that are written get a partition"
    );
    assert_eq!(s.rows_in("records_y2031m03").await.unwrap(), 2, "moved");
    assert_eq!(s.rows_in("records_default").await.unwrap(), 1, "February's");
    assert_eq!(result_seqs(&s, "mv").await, vec![3, 2, 1]);
    let r = s
        .result("mv", "mv1")
        .await
        .unwrap()
        .expect("the moved result");
    assert_eq!((r.seq, r.result["message"].as_str()), (1, Some("mv1#1")));
    let again = s
        .store_batch("mv", prepare(&early), march_2031 + 2 * 86_400_000)
        .await
        .unwrap();
    assert_eq!((again.stored, again.duplicates), (0, 2));
    // Another backend, which never saw the partition made, finds it.
    let t = crate::store::PostgresStore::connect(&url).await.unwrap();
    let again = t
        .store_batch("mv", prepare(&late), march_2031 + 2 * 86_400_000)
        .await
        .unwrap();
    assert_eq!((again.stored, again.duplicates), (0, 1));
    assert_eq!(t.record_count().await.unwrap(), 3);
}

/// PostgreSQL only: `--store-ca` (or `sslmode=require`) connects over TLS and checks
/// the server's certificate; another CA's certificate is refused, and so is a server
/// without TLS when TLS was asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_checks_the_servers_certificate() {
    let dir = std::env::temp_dir().join(format!("imn-pgtls-{:08x}", rand::random::<u32>()));
    crate::test_pki::generate(&dir.join("a"), &["127.0.0.1"], &[]);
    crate::test_pki::generate(&dir.join("b"), &["127.0.0.1"], &[]);
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
