//! What the backend reports about itself as metrics: the families of `/metrics`
//! (Prometheus text) and of OTLP, read from current state on each scrape.
//!
//! Invariant: both exports read the same families ([`Backend::metric_families`]), so
//! a figure on `/metrics` is the figure OTLP sends; counters come from
//! [`super::Stats`], which only ever grow.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use imn_proto::now_ms;

use super::Backend;

impl Backend {
    /// Every metric family read from current state (the in-process bridge's too).
    pub fn metric_families(&self) -> Vec<imn_cloud::telemetry::prom::Family> {
        let mut f = self.metrics.families(&self.registry.all(), now_ms());
        match self.bridge_stats.get() {
            Some(b) => f.extend(b.families()),
            None => f.push(
                imn_cloud::telemetry::prom::Family::new(
                    "imn_metric_series_dropped_total",
                    "imn.metric.series_dropped",
                    "{series}",
                    imn_cloud::telemetry::prom::FamilyKind::Counter,
                    "Label sets not recorded because an instrument had too many.",
                )
                .value(imn_cloud::telemetry::prom::series_dropped() as f64),
            ),
        }
        f.push(
            imn_cloud::telemetry::prom::Family::new(
                "imn_records_stored_total",
                "imn.records.stored",
                "{record}",
                imn_cloud::telemetry::prom::FamilyKind::Counter,
                "Outbox records stored (results, state changes, events), duplicates not counted.",
            )
            .value(self.stats.records_stored.load(Ordering::Relaxed) as f64),
        );
        // The store's size and age, from the last retention pass (also in /health).
        if let Some(st) = self.store_stats() {
            f.push(
                imn_cloud::telemetry::prom::Family::new(
                    "imn_store_bytes",
                    "imn.store.bytes",
                    "By",
                    imn_cloud::telemetry::prom::FamilyKind::Gauge,
                    "Bytes the store holds (SQLite: pages in use; PostgreSQL: the database).",
                )
                .value(st.bytes as f64),
            );
            if let Some(oldest) = st.oldest_result_ms {
                f.push(
                    imn_cloud::telemetry::prom::Family::new(
                        "imn_store_oldest_result_age_seconds",
                        "imn.store.oldest_result_age",
                        "s",
                        imn_cloud::telemetry::prom::FamilyKind::Gauge,
                        "How long ago the oldest stored result arrived.",
                    )
                    .value(imn_proto::now_ms().saturating_sub(oldest) as f64 / 1000.0),
                );
            }
        }
        f.push(
            imn_cloud::telemetry::prom::Family::new(
                "imn_alerts_firing",
                "imn.alerts.firing",
                "{rule}",
                imn_cloud::telemetry::prom::FamilyKind::Gauge,
                "Alert rules that fired and have not resolved.",
            )
            .value(self.alerts.firing() as f64),
        );
        let c = &self.alerts.counters;
        for (name, otel, unit, help, v) in [
            (
                "imn_anomalies_total",
                "imn.anomalies",
                "{anomaly}",
                "Anomalies the detector found in stored results (RTT shifts, loss bursts and their ends, path changes).",
                &c.anomalies,
            ),
            (
                "imn_anomaly_results_judged_total",
                "imn.anomaly.results_judged",
                "{result}",
                "Stored results the anomaly detector read.",
                &c.results_judged,
            ),
            (
                "imn_alert_webhook_delivered_total",
                "imn.alert.webhook.delivered",
                "{call}",
                "Alerts a webhook receiver took (answered 2xx).",
                &c.delivered,
            ),
            (
                "imn_alert_webhook_failed_total",
                "imn.alert.webhook.failed",
                "{call}",
                "Webhook calls that failed (refused, timed out, not 2xx); each is retried.",
                &c.failed_attempts,
            ),
            (
                "imn_alert_webhook_gaps_total",
                "imn.alert.webhook.gaps",
                "{gap}",
                "Times a webhook found alerts gone from the ring (10,000 alerts) before it could send them.",
                &c.gaps,
            ),
        ] {
            f.push(
                imn_cloud::telemetry::prom::Family::new(
                    name,
                    otel,
                    unit,
                    imn_cloud::telemetry::prom::FamilyKind::Counter,
                    help,
                )
                .value(v.load(Ordering::Relaxed) as f64),
            );
        }
        // What ingest kept out, and why: each is also in /health → ingest.
        for (name, otel, unit, help, v) in [
            (
                "imn_dead_lettered_total",
                "imn.ingest.dead_lettered",
                "{record}",
                "Records the store could not take, kept in the dead letters with the reason (acked).",
                &self.stats.dead_lettered,
            ),
            (
                "imn_ingest_shed_total",
                "imn.ingest.shed",
                "{message}",
                "Uplink messages dropped unacked because their agent had its share of the ingest queue waiting (the agent resends).",
                &self.stats.shed,
            ),
            (
                "imn_ingest_records_refused_total",
                "imn.ingest.records_refused",
                "{record}",
                "Records the store refused (too many seq ranges for one outbox epoch), left unacked.",
                &self.stats.records_refused,
            ),
            (
                "imn_ingest_events_deferred_total",
                "imn.ingest.events_deferred",
                "{record}",
                "Events held back past the per-batch cap (the agent sends them again).",
                &self.stats.events_deferred,
            ),
            (
                "imn_ingest_hellos_throttled_total",
                "imn.ingest.hellos_throttled",
                "{message}",
                "Hellos that came within a second of their agent's last (the newest is handled when its turn comes).",
                &self.stats.hellos_throttled,
            ),
        ] {
            f.push(
                imn_cloud::telemetry::prom::Family::new(
                    name,
                    otel,
                    unit,
                    imn_cloud::telemetry::prom::FamilyKind::Counter,
                    help,
                )
                .value(v.load(Ordering::Relaxed) as f64),
            );
        }
        f
    }

    /// Feeds the families of [`Self::metric_families`] to OTLP (when on). Call once,
    /// after the in-process bridge (if any) is attached.
    pub fn observe_metrics(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        imn_cloud::telemetry::prom::observe(Arc::new(move || {
            weak.upgrade()
                .map(|b| b.metric_families())
                .unwrap_or_default()
        }));
    }

    /// `/metrics`: the Prometheus text format.
    pub async fn prometheus(&self) -> String {
        self.refresh_request_states().await;
        let mut e = imn_cloud::telemetry::prom::Exposition::new();
        for f in self.metric_families() {
            f.write(&mut e);
        }
        self.metrics.write(&mut e);
        e.finish()
    }
}
