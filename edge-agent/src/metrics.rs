//! The agent's own gauges, kept by the agent loop. With the `metrics` feature (left
//! out of firmware builds) and `metrics_listen` set, they are served as a Prometheus
//! `/metrics` page; the backend has the same figures from heartbeats either way.

use std::sync::atomic::{AtomicBool, AtomicU64};

#[derive(Debug, Default)]
pub struct Gauges {
    pub outbox_depth: AtomicU64,
    pub outbox_oldest_age_ms: AtomicU64,
    pub outbox_dropped: AtomicU64,
    pub results: AtomicU64,
    pub connected: AtomicBool,
}

impl Gauges {
    /// The page, in the Prometheus text format.
    #[cfg(feature = "metrics")]
    pub fn render(&self, agent: &str) -> String {
        use std::sync::atomic::Ordering;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let rows: [(&str, &str, &str, f64); 5] = [
            (
                "imn_agent_outbox_depth",
                "gauge",
                "Records in the outbox waiting for the backend's ack.",
                load(&self.outbox_depth),
            ),
            (
                "imn_agent_outbox_oldest_age_seconds",
                "gauge",
                "Age of the oldest unacked record.",
                load(&self.outbox_oldest_age_ms) / 1000.0,
            ),
            (
                "imn_agent_outbox_dropped_records",
                "gauge",
                "Records the outbox evicted since it was created.",
                load(&self.outbox_dropped),
            ),
            (
                "imn_agent_results_total",
                "counter",
                "Module results this agent process produced.",
                load(&self.results),
            ),
            (
                "imn_agent_mqtt_connected",
                "gauge",
                "1 while the agent is connected to its broker.",
                if self.connected.load(Ordering::Relaxed) {
                    1.0
                } else {
                    0.0
                },
            ),
        ];
        let mut page = imn_prom::Exposition::new();
        for (name, kind, help, v) in rows {
            page.family(name, kind, help);
            page.sample(name, &[("agent", agent)], v);
        }
        page.finish()
    }
}
