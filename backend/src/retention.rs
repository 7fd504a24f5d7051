//! What the store keeps, and for how long: heartbeat history (so the dashboard's
//! charts survive a restart), pruned by age in bounded batches in the background,
//! never in the way of ingest.

use std::sync::Arc;
use std::time::Duration;

use crate::registry::{HeartbeatPoint, HEARTBEAT_HISTORY, HEARTBEAT_STORE_EVERY_MS};
use crate::service::Backend;
use crate::store::HeartbeatRow;

/// How long things are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Stored heartbeat points older than this are deleted.
    pub heartbeats: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            heartbeats: Duration::from_secs(2 * 86_400),
        }
    }
}

/// Retention flags, shared by `imn up` and `imn-backend`.
#[derive(Debug, Clone, clap::Args)]
pub struct RetentionFlags {
    /// How long stored heartbeat history is kept (one point per agent a minute), e.g.
    /// 48h or 7d.
    #[arg(long, env = "IMN_HEARTBEAT_RETENTION", default_value = "2d", value_parser = parse_age)]
    pub heartbeat_retention: Duration,
}

impl RetentionFlags {
    pub fn settings(&self) -> Settings {
        Settings {
            heartbeats: self.heartbeat_retention,
        }
    }
}

/// An age such as `90s`, `30m`, `48h` or `7d`, at least a minute and at most ten
/// years.
pub fn parse_age(s: &str) -> Result<Duration, String> {
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
        .filter(|v| (60..=10 * 366 * 86_400).contains(v))
        .ok_or_else(|| format!("{s:?}: must be from 1 minute to 10 years"))?;
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

/// Writes sampled heartbeat points every [`FLUSH_EVERY`] and prunes old ones every
/// [`PRUNE_EVERY`]. A store that fails keeps the points in memory (bounded) for the
/// next round.
pub async fn keep_heartbeats(b: Arc<Backend>) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune = tokio::time::Instant::now()
        .checked_sub(PRUNE_EVERY)
        .unwrap_or_else(tokio::time::Instant::now);
    loop {
        tick.tick().await;
        flush_heartbeats(&b).await;
        if last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = tokio::time::Instant::now();
            prune_heartbeats(&b).await;
        }
    }
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
