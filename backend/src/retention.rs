//! What the store keeps, and for how long, enforced in the background without
//! holding up ingest: every pass deletes in bounded batches and yields between them.
//!
//! - **Raw records** (results, states, events) by age, per module and a default
//!   (`--retention ping_module=7d --retention default=90d`; none given: kept), by
//!   the backend's clock (when they arrived, not the agent's word), and by total
//!   size (`--max-store-size`): past it the oldest go until the store is at 90 % of
//!   it. Only records the rollup pass has added to their hours' rollups are ever
//!   deleted, so the rollups answer for what is gone. SQLite then returns free pages
//!   to the file system (incremental vacuum); PostgreSQL drops whole monthly
//!   partitions once their month is past the longest age and rolled up.
//! - **Rollups** (see [`crate::rollup`]) by their own, longer age
//!   (`--rollup-retention`, default 400d).
//! - **Heartbeat history** (one point per agent a minute, so the dashboard's charts
//!   survive a restart) by `--heartbeat-retention` (default 2d).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::registry::{HeartbeatPoint, HEARTBEAT_HISTORY, HEARTBEAT_STORE_EVERY_MS};
use crate::service::Backend;
use crate::store::{HeartbeatRow, PruneRecords};

/// How long things are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Stored heartbeat points older than this are deleted.
    pub heartbeats: Duration,
    /// Raw records of these modules older than their age are deleted.
    pub modules: Vec<(String, Duration)>,
    /// Raw records of every other module (and states and events) older than this;
    /// None: kept.
    pub default: Option<Duration>,
    /// Rollups of hours older than this are deleted.
    pub rollups: Duration,
    /// Past this many bytes, the oldest raw records go.
    pub max_store_bytes: Option<u64>,
    /// How often a pass runs.
    pub every: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            heartbeats: Duration::from_secs(2 * 86_400),
            modules: Vec::new(),
            default: None,
            rollups: Duration::from_secs(400 * 86_400),
            max_store_bytes: None,
            every: Duration::from_secs(60),
        }
    }
}

/// Retention flags, shared by `imn up` and `imn-backend`.
#[derive(Debug, Clone, clap::Args)]
pub struct RetentionFlags {
    /// How long raw results (and states and events) are kept: MODULE=AGE for one
    /// module, default=AGE for the rest (e.g. ping_module=7d,default=90d). None
    /// given: kept until --max-store-size needs the room. Rolled-up hours stay.
    #[arg(long, env = "IMN_RETENTION", value_delimiter = ',', value_parser = parse_rule)]
    pub retention: Vec<(String, Duration)>,
    /// How long hourly rollups are kept.
    #[arg(long, env = "IMN_ROLLUP_RETENTION", default_value = "400d", value_parser = parse_age)]
    pub rollup_retention: Duration,
    /// Largest store, in bytes (suffixes K, M, G, T: powers of 1024); past it the
    /// oldest raw records go, down to 90 % of it.
    #[arg(long, env = "IMN_MAX_STORE_SIZE", value_parser = parse_size)]
    pub max_store_size: Option<u64>,
    /// How long stored heartbeat history is kept (one point per agent a minute), e.g.
    /// 48h or 7d.
    #[arg(long, env = "IMN_HEARTBEAT_RETENTION", default_value = "2d", value_parser = parse_age)]
    pub heartbeat_retention: Duration,
    /// How often retention and rollups run (1s to 1h).
    #[arg(long, env = "IMN_RETENTION_EVERY", default_value = "60s", value_parser = parse_every)]
    pub retention_every: Duration,
}

impl RetentionFlags {
    pub fn settings(&self) -> Settings {
        let default = self
            .retention
            .iter()
            .rev()
            .find(|(m, _)| m == "default")
            .map(|(_, d)| *d);
        let mut modules: Vec<(String, Duration)> = Vec::new();
        for (m, d) in &self.retention {
            if m != "default" {
                modules.retain(|(n, _)| n != m);
                modules.push((m.clone(), *d));
            }
        }
        Settings {
            heartbeats: self.heartbeat_retention,
            modules,
            default,
            rollups: self.rollup_retention,
            max_store_bytes: self.max_store_size,
            every: self.retention_every,
        }
    }
}

/// `MODULE=AGE` or `default=AGE`.
pub fn parse_rule(s: &str) -> Result<(String, Duration), String> {
    let (m, age) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: give MODULE=AGE or default=AGE, e.g. ping_module=7d"))?;
    let m = m.trim();
    if m != "default" && imn_proto::catalog::find(m).is_none() {
        return Err(format!(
            "{m:?}: no such module; modules: {}, or default",
            imn_proto::catalog::names().join(", ")
        ));
    }
    Ok((m.to_string(), parse_age(age)?))
}

/// Bytes from `500M`, `4G`, `1T` or a plain number.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (n, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    n.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|v| *v >= 1 << 20)
        .ok_or_else(|| format!("{s:?}: give a size of at least 1M, such as 500M or 4G"))
}

/// An interval from 1 s to an hour, as `parse_age` reads it.
pub fn parse_every(s: &str) -> Result<Duration, String> {
    let d = parse_duration_any(s)?;
    if !(1..=3_600).contains(&d.as_secs()) {
        return Err(format!("{s:?}: must be from 1s to 1h"));
    }
    Ok(d)
}

/// An age such as `90s`, `30m`, `48h` or `7d`, at least a minute and at most ten
/// years.
pub fn parse_age(s: &str) -> Result<Duration, String> {
    let d = parse_duration_any(s)?;
    if !(60..=10 * 366 * 86_400).contains(&d.as_secs()) {
        return Err(format!("{s:?}: must be from 1 minute to 10 years"));
    }
    Ok(d)
}

fn parse_duration_any(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?}: give a unit, as in 90s, 30m, 48h or 7d"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: not a whole number followed by s, m, h or d"))?;
    let per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    let secs = n
        .checked_mul(per)
        .ok_or_else(|| format!("{s:?}: too long"))?;
    Ok(Duration::from_secs(secs))
}

/// How often points waiting in memory are written.
const FLUSH_EVERY: Duration = Duration::from_secs(10);
/// How often old points are pruned, and how many one statement deletes.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
const PRUNE_BATCH: u32 = 5_000;
/// The most points read back at start.
const RESTORE_MAX: u32 = 2_000_000;

/// Reads the stored heartbeat history of the last [`HEARTBEAT_HISTORY`] minutes into
/// the registry (for agents it knows).
pub async fn restore_heartbeats(b: &Backend) -> Result<usize, crate::store::StoreError> {
    let span = HEARTBEAT_STORE_EVERY_MS.saturating_mul(HEARTBEAT_HISTORY as i64);
    let since = imn_proto::now_ms().saturating_sub(span);
    let rows = b.store.heartbeats_since(since, RESTORE_MAX).await?;
    let n = rows.len();
    let mut per: std::collections::HashMap<String, Vec<HeartbeatPoint>> = Default::default();
    for r in rows {
        // A row that does not parse (written by another version) is skipped.
        if let Ok(p) = serde_json::from_str::<HeartbeatPoint>(&r.point_json) {
            per.entry(r.agent_id).or_default().push(p);
        }
    }
    for (id, points) in per {
        b.registry.restore_history(&id, points);
    }
    Ok(n)
}

/// The background work: writes sampled heartbeat points every [`FLUSH_EVERY`],
/// runs a retention pass ([`pass`]) every `Settings::every`, and prunes old
/// heartbeat points every [`PRUNE_EVERY`]. A store that fails keeps heartbeat points
/// in memory (bounded) and the pass for next time.
pub async fn keep(b: Arc<Backend>) {
    let every = b.retention().every;
    let mut tick = tokio::time::interval(every.min(FLUSH_EVERY));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = tokio::time::Instant::now();
    let (mut last_flush, mut last_pass, mut last_prune) = (start, None, None);
    let mut marks = Marks::default();
    loop {
        tick.tick().await;
        let now = tokio::time::Instant::now();
        if now.duration_since(last_flush) >= FLUSH_EVERY {
            last_flush = now;
            flush_heartbeats(&b).await;
        }
        if last_pass.is_none_or(|t: tokio::time::Instant| now.duration_since(t) >= every) {
            last_pass = Some(now);
            if let Err(e) = pass(&b, &mut marks).await {
                tracing::warn!(error = %e, "retention pass failed; next time");
            }
        }
        if last_prune.is_none_or(|t: tokio::time::Instant| now.duration_since(t) >= PRUNE_EVERY) {
            last_prune = Some(now);
            prune_heartbeats(&b).await;
        }
    }
}

/// Where each age rule's deletions stopped: the position to go on from, so rows a
/// rule keeps are not read again on every pass.
#[derive(Debug, Default)]
pub struct Marks {
    by_rule: HashMap<String, i64>,
    size: i64,
    warned_size: bool,
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct PassReport {
    pub rolled_up: usize,
    pub deleted_by_age: u64,
    pub deleted_by_size: u64,
    pub rollups_deleted: u64,
    /// Rows records left behind (duplicate guards, finished requests and their
    /// transitions, closed sessions).
    pub bookkeeping_deleted: u64,
    pub released: Vec<String>,
    pub bytes: u64,
}

/// Batches one rule deletes per pass, at most (the rest waits for the next pass).
const MAX_BATCHES: usize = 100;
const BATCH: u32 = 5_000;
/// Records the size cap deletes between two reads of the store's size.
const SIZE_BATCH: u32 = 500;
/// Rounds of [`SIZE_BATCH`] one pass may delete for the size cap.
const MAX_SIZE_ROUNDS: usize = 400;

fn ms_ago(now: i64, d: Duration) -> i64 {
    now.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// One retention pass: rolls up what arrived, then deletes what is past its age or
/// over the size cap (only what is rolled up), gives space back, and prunes old
/// rollups. Bounded batches, yielding between them.
pub async fn pass(b: &Backend, marks: &mut Marks) -> Result<PassReport, crate::store::StoreError> {
    let cfg = b.retention();
    let mut report = PassReport::default();
    // Roll up first: only what is rolled up may go. Until caught up, or for half the
    // interval between passes (at least 5 s), so the cursor keeps up with ingest; a
    // store upgraded with years of results catches up over several passes.
    let budget = (cfg.every / 2).max(Duration::from_secs(5));
    let started = tokio::time::Instant::now();
    loop {
        let n = crate::rollup::roll_up(b, 20).await?;
        report.rolled_up += n;
        if n < 10_000 || started.elapsed() >= budget {
            break;
        }
    }
    let up_to = b.store.rollup_cursor().await?;
    let now = imn_proto::now_ms();
    let mut rules: Vec<(Option<String>, Duration)> = cfg
        .modules
        .iter()
        .map(|(m, d)| (Some(m.clone()), *d))
        .collect();
    if let Some(d) = cfg.default {
        rules.push((None, d));
    }
    let except: Vec<String> = cfg.modules.iter().map(|(m, _)| m.clone()).collect();
    for (only, age) in &rules {
        let key = only.clone().unwrap_or_else(|| "default".into());
        let mut after = marks.by_rule.get(&key).copied().unwrap_or(0);
        for _ in 0..MAX_BATCHES {
            let (n, last) = b
                .store
                .prune_records(PruneRecords {
                    only: only.clone(),
                    except: if only.is_none() {
                        except.clone()
                    } else {
                        Vec::new()
                    },
                    stored_before_ms: ms_ago(now, *age),
                    after,
                    up_to,
                    limit: BATCH,
                })
                .await?;
            report.deleted_by_age += n;
            after = last;
            if n < u64::from(BATCH) {
                break;
            }
            tokio::task::yield_now().await;
        }
        marks.by_rule.insert(key, after);
    }
    // The size cap: the oldest go, whatever their module, down to 90 % of it.
    let mut stats = b.store.store_stats().await?;
    if cfg.max_store_bytes.is_some() && !stats.shrinks_on_delete {
        // PostgreSQL keeps its size after a DELETE (the space is reused): deleting
        // by size would find the store never smaller and take every record. There
        // the ages (and dropped partitions) bound the store.
        if !marks.warned_size {
            marks.warned_size = true;
            tracing::warn!("--max-store-size applies to the embedded store; on PostgreSQL, bound the store with --retention ages");
        }
    } else if let Some(cap) = cfg.max_store_bytes {
        let target = cap / 10 * 9;
        let mut rounds = 0;
        while stats.bytes > cap || (report.deleted_by_size > 0 && stats.bytes > target) {
            if rounds >= MAX_SIZE_ROUNDS {
                break;
            }
            rounds += 1;
            let (n, last) = b
                .store
                .prune_records(PruneRecords {
                    only: None,
                    except: Vec::new(),
                    stored_before_ms: i64::MAX,
                    after: marks.size,
                    up_to,
                    // Small steps, the size read after each: a store settles near
                    // 90 % of its cap, not far below it.
                    limit: SIZE_BATCH,
                })
                .await?;
            marks.size = last;
            report.deleted_by_size += n;
            report
                .released
                .extend(b.store.release_space(2_000, i64::MIN, up_to).await?);
            let was = stats.bytes;
            stats = b.store.store_stats().await?;
            if n > 0 && stats.bytes >= was {
                // Deleting did not make it smaller (the space is in tables retention
                // does not prune): stop rather than delete everything.
                tracing::warn!(
                    bytes = stats.bytes,
                    cap,
                    "store over its size cap, and deleting raw records does not shrink it"
                );
                break;
            }
            if n == 0 {
                // Nothing rolled up is left to delete: the cap waits for the rollups.
                tracing::warn!(
                    bytes = stats.bytes,
                    cap,
                    "store over its size cap, and nothing rolled up is left to delete"
                );
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    // What records leave behind, from more than a day before the oldest result still
    // stored: runs' duplicate guards, finished requests with their transitions,
    // closed connection sessions. Only where records go at all.
    if !rules.is_empty() || cfg.max_store_bytes.is_some() {
        if let Some(oldest) = b.store.store_stats().await?.oldest_result_ms {
            let before = oldest.saturating_sub(86_400_000);
            for _ in 0..MAX_BATCHES {
                let n = b.store.prune_bookkeeping(before, BATCH).await?;
                report.bookkeeping_deleted += n;
                if n == 0 {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
    }
    // Space back: SQLite's free pages; PostgreSQL's partitions past the longest age.
    let longest = rules
        .iter()
        .map(|(_, d)| *d)
        .max()
        .filter(|_| cfg.default.is_some());
    let before = longest.map_or(i64::MIN, |d| ms_ago(now, d));
    report
        .released
        .extend(b.store.release_space(10_000, before, up_to).await?);
    loop {
        let n = b
            .store
            .prune_rollups(crate::rollup::hour_of(ms_ago(now, cfg.rollups)), BATCH)
            .await?;
        report.rollups_deleted += n;
        if n < u64::from(BATCH) {
            break;
        }
        tokio::task::yield_now().await;
    }
    let stats = b.store.store_stats().await?;
    report.bytes = stats.bytes;
    b.set_store_stats(stats);
    if report.deleted_by_age
        + report.deleted_by_size
        + report.rollups_deleted
        + report.bookkeeping_deleted
        > 0
    {
        tracing::info!(
            deleted_by_age = report.deleted_by_age,
            deleted_by_size = report.deleted_by_size,
            rollups_deleted = report.rollups_deleted,
            bookkeeping_deleted = report.bookkeeping_deleted,
            bytes = report.bytes,
            "retention pass"
        );
    }
    Ok(report)
}

/// Writes the points waiting in memory; on failure they wait for the next round.
pub async fn flush_heartbeats(b: &Backend) {
    let (points, dropped) = b.registry.take_to_store();
    if dropped > 0 {
        tracing::warn!(
            dropped,
            "heartbeat history: points dropped, too many waited for the store"
        );
    }
    if points.is_empty() {
        return;
    }
    let rows = points
        .iter()
        .filter_map(|(agent, at, p)| {
            Some(HeartbeatRow {
                agent_id: agent.clone(),
                at_ms: *at,
                point_json: serde_json::to_string(p).ok()?,
            })
        })
        .collect();
    if let Err(e) = b.store.put_heartbeats(rows).await {
        tracing::warn!(error = %e, points = points.len(), "heartbeat history: not stored, retrying");
        b.registry.return_to_store(points);
    }
}

/// Deletes points older than the retention, a bounded batch at a time.
pub async fn prune_heartbeats(b: &Backend) -> u64 {
    let keep = b.retention().heartbeats;
    let before =
        imn_proto::now_ms().saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
    let mut total = 0;
    loop {
        match b.store.prune_heartbeats(before, PRUNE_BATCH).await {
            Ok(n) => {
                total += n;
                if n < u64::from(PRUNE_BATCH) {
                    break;
                }
                // Let ingest have the store between batches.
                tokio::task::yield_now().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat history: pruning failed");
                break;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use imn_proto::results::{ModuleOutcome, ModuleOutput, PingOutput, PingResult};
    use imn_proto::wire::{Batch, ModuleResult, Record, RecordBody};

    async fn backend(s: Settings) -> Arc<Backend> {
        let dir = std::env::temp_dir().join(format!(
            "imn-ret-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store = crate::store::SqliteStore::open(&dir.join("s.sqlite")).unwrap();
        let b = Backend::new(
            Arc::new(store),
            Arc::new(imn_cloud::bus::LocalBus::new(8)),
            false,
            crate::security::Security::new(
                Arc::new(imn_cloud::AgentCredentials::disabled()),
                crate::security::Limits::default(),
                crate::security::Policy::default(),
            ),
        )
        .await
        .unwrap();
        b.set_retention(s);
        b
    }

    fn ping(seq: u64, at_ms: i64, rtt: f64) -> Record {
        let mut t = PingResult::new("h", "192.0.2.1", 56);
        t.rtts_ms = vec![Some(rtt), None];
        t.summarise();
        Record {
            seq,
            at_ms,
            body: RecordBody::Result(ModuleResult {
                request_id: format!("p.{seq}"),
                module: "ping_module".into(),
                received_ms: at_ms,
                started_ms: at_ms,
                finished_ms: at_ms,
                outcome: ModuleOutcome::Ok(ModuleOutput::Ping(PingOutput {
                    socket: "raw".into(),
                    src_addr: None,
                    targets: vec![t],
                })),
            }),
        }
    }

    fn echo(seq: u64, at_ms: i64) -> Record {
        Record {
            seq,
            at_ms,
            body: RecordBody::Result(ModuleResult {
                request_id: format!("e.{seq}"),
                module: "echo_module".into(),
                received_ms: at_ms,
                started_ms: at_ms,
                finished_ms: at_ms,
                outcome: ModuleOutcome::Ok(ModuleOutput::Echo(imn_proto::results::EchoResult {
                    message: "m".into(),
                })),
            }),
        }
    }

    /// A pass rolls up what arrived, then deletes raw records past their module's
    /// age (ping: 1 h) or the default (echo: 1 day), never what is younger; the
    /// rollups still answer for the hour whose raw results went.
    #[tokio::test]
    async fn a_pass_deletes_by_module_age_and_rollups_answer_for_what_went() {
        let hour = 3_600_000;
        let b = backend(Settings {
            modules: vec![("ping_module".into(), Duration::from_secs(3600))],
            default: Some(Duration::from_secs(86_400)),
            ..Settings::default()
        })
        .await;
        let now = imn_proto::now_ms();
        // Two hours ago: two pings and an echo; now: one of each.
        let old = Batch {
            epoch: 1,
            records: vec![
                ping(1, now - 2 * hour, 10.0),
                ping(2, now - 2 * hour, 30.0),
                echo(3, now - 2 * hour),
            ],
        };
        b.store
            .store_batch("a", crate::store::prepare(&old), now - 2 * hour)
            .await
            .unwrap();
        let new = Batch {
            epoch: 1,
            records: vec![ping(4, now, 20.0), echo(5, now)],
        };
        b.store
            .store_batch("a", crate::store::prepare(&new), now)
            .await
            .unwrap();
        let mut marks = Marks::default();
        let r = pass(&b, &mut marks).await.unwrap();
        assert_eq!(r.rolled_up, 5);
        assert_eq!(
            r.deleted_by_age, 2,
            "the two old pings; the old echo is under a day"
        );
        let left = b
            .store
            .results_page(crate::store::ResultFilter {
                after: 0,
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        let left: Vec<(&str, i64)> = left
            .iter()
            .map(|(_, r, _)| (r.module.as_str(), r.at_ms))
            .collect();
        assert_eq!(
            left,
            vec![
                ("echo_module", now - 2 * hour),
                ("ping_module", now),
                ("echo_module", now)
            ]
        );
        // The old hour's rollup: both pings, 2 of 4 probes lost, RTTs 10 and 30.
        let rows = b
            .store
            .rollups(crate::store::RollupFilter {
                module: Some("ping_module".into()),
                until_ms: Some(crate::rollup::hour_of(now)),
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        let j = serde_json::from_str::<crate::rollup::Rollup>(&rows[0].body)
            .unwrap()
            .to_json();
        assert_eq!(
            (j["results"].as_u64(), j["loss_pct"].as_f64()),
            (Some(2), Some(50.0))
        );
        assert_eq!(
            (j["rtt_min_ms"].as_f64(), j["rtt_max_ms"].as_f64()),
            (Some(10.0), Some(30.0))
        );
        // A second pass finds nothing more, and the rule starts where it stopped.
        let again = pass(&b, &mut marks).await.unwrap();
        assert_eq!((again.rolled_up, again.deleted_by_age), (0, 0));
    }

    #[test]
    fn ages_need_a_unit_and_stay_in_range() {
        assert_eq!(parse_age("48h"), Ok(Duration::from_secs(48 * 3600)));
        assert_eq!(parse_age("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_age("90s"), Ok(Duration::from_secs(90)));
        for bad in ["", "10", "5s", "1w", "-1d", "99999999999999999999d", "1.5h"] {
            assert!(parse_age(bad).is_err(), "{bad}");
        }
    }
}
