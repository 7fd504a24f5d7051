//! The agent's own gauges, kept by the agent loop. With the `metrics` feature (left
//! out of firmware builds) and `metrics_listen` set, they are served as a Prometheus
//! `/metrics` page; the backend has the same figures from heartbeats either way.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
    pub fn render(&self, agent: &str) -> String {
        let l = format!("{{agent=\"{agent}\"}}");
        let rows: [(&str, &str, &str, f64); 5] = [
            (
                "imn_agent_outbox_depth",
                "gauge",
                "Records in the outbox waiting for the backend's ack.",
                self.outbox_depth.load(Ordering::Relaxed) as f64,
            ),
            (
                "imn_agent_outbox_oldest_age_seconds",
                "gauge",
                "Age of the oldest unacked record.",
                self.outbox_oldest_age_ms.load(Ordering::Relaxed) as f64 / 1000.0,
            ),
            (
                "imn_agent_outbox_dropped_records",
                "gauge",
                "Records the outbox evicted since it was created.",
                self.outbox_dropped.load(Ordering::Relaxed) as f64,
            ),
            (
                "imn_agent_results_total",
                "counter",
                "Module results this agent process produced.",
                self.results.load(Ordering::Relaxed) as f64,
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
        let mut out = String::new();
        for (name, kind, help, v) in rows {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{l} {v}\n"
            ));
        }
        out
    }
}
