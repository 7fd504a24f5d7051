//! `heartbeat`: the machine's health now (CPU, memory, swap, load, uptime, disk and
//! interface counters). The same snapshot rides in every heartbeat record.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{no_check, no_demand, Examples, Summary};
use crate::catalog::{ModuleSpec, DRAFT};

pub const SPEC: ModuleSpec = ModuleSpec {
    name: "heartbeat",
    version: "1.0.0",
    description: "CPU, memory, swap, load, uptime, disk and interface counters.",
    default_timeout_ms: 10_000,
    schema_hash: "e0623c376cf84768",
    takes_rate: false,
    #[cfg(feature = "catalog")]
    schema,
    #[cfg(feature = "catalog")]
    examples,
    demand: no_demand,
    #[cfg(feature = "catalog")]
    check: no_check,
    #[cfg(feature = "atlas")]
    atlas: None,
};

/// The machine's health: sent in every heartbeat, and by the `heartbeat` module.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SystemSnapshot {
    pub uptime_s: u64,
    /// Whole-machine CPU use since the previous sample, 0..=100.
    pub cpu_pct: f32,
    /// The same per core.
    pub cpu_per_core_pct: Vec<f32>,
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    pub swap_total_kib: u64,
    pub swap_free_kib: u64,
    pub load: [f32; 3],
    /// The filesystem holding the agent's data directory.
    pub disk_total_kib: u64,
    pub disk_free_kib: u64,
    pub interfaces: Vec<InterfaceStats>,
}

/// Counters of one network interface since boot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InterfaceStats {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
}

impl Summary for SystemSnapshot {
    fn summary(&self) -> String {
        format!(
            "up {} s, cpu {:.0}%, load {:.2}, memory {}/{} MiB free, disk {}/{} MiB free",
            self.uptime_s,
            self.cpu_pct,
            self.load[0],
            self.mem_available_kib / 1024,
            self.mem_total_kib / 1024,
            self.disk_free_kib / 1024,
            self.disk_total_kib / 1024
        )
    }
}

fn schema() -> Value {
    json!({
        "$schema": DRAFT,
        "title": "heartbeat parameters",
        "description": "No parameters: returns the agent's system metrics now.",
        "type": "object",
        "properties": {},
        "additionalProperties": false
    })
}

fn examples() -> Examples {
    Examples {
        valid: vec![json!({})],
        invalid: vec![(json!({"verbose": true}), "/verbose")],
    }
}
