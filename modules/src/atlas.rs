//! RIPE Atlas result format (feature `atlas`, which the backend turns on), so tooling
//! that reads Atlas results (for example ripe.atlas.sagan) reads ours. Each module with
//! an Atlas form converts in its own folder (`kinds/<module>/atlas.rs`) and names the
//! converter in its catalog entry; this file holds what they share.
//!
//! Atlas ids are integers; IMN's are not. `msm_id` and `prb_id` are the first 31 bits
//! of the SHA-256 of the request id and the agent id: stable, and the original ids are
//! kept beside them under `imn`.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// A stored result, as much of it as an Atlas result needs. The result is borrowed
/// from the stored row (a list of 10,000 can be large); tests own theirs.
#[derive(Debug, Clone)]
pub struct AtlasRow<'a> {
    pub agent_id: String,
    pub request_id: String,
    pub module: String,
    /// The result as the API shows it.
    pub result: std::borrow::Cow<'a, Value>,
    pub started_ms: i64,
    pub finished_ms: i64,
    pub stored_ms: i64,
    /// A scheduled run's slot time.
    pub scheduled_ms: Option<i64>,
}

/// A module's converter: its Atlas results, or None when the stored result has none.
pub type Convert = fn(&AtlasRow<'_>) -> Option<Vec<Value>>;

/// Modules whose results have an Atlas format.
pub fn modules() -> Vec<&'static str> {
    crate::catalog::catalog()
        .iter()
        .filter(|m| m.atlas.is_some())
        .map(|m| m.name)
        .collect()
}

/// The Atlas results of a stored result, or None when Atlas defines no format for its
/// module (or the run produced no result).
pub fn convert(r: &AtlasRow) -> Option<Vec<Value>> {
    (crate::catalog::find(&r.module)?.atlas?)(r)
}

/// What every Atlas result carries: ids, times and IMN's own ids.
pub struct Meta {
    pub msm_id: u32,
    pub prb_id: u32,
    pub measurement: Option<String>,
}

impl Meta {
    pub fn of(r: &AtlasRow) -> Meta {
        // A scheduled run belongs to its recurring measurement (`{measurement}@{slot}`),
        // as every result of an Atlas measurement carries that measurement's id.
        let measurement = r
            .scheduled_ms
            .and_then(|_| r.request_id.rsplit_once('@'))
            .map(|(m, _)| m.to_string());
        Meta {
            msm_id: numeric_id(measurement.as_deref().unwrap_or(&r.request_id)),
            prb_id: numeric_id(&r.agent_id),
            measurement,
        }
    }

    /// Adds the fields every Atlas result has to `v` (an object).
    pub fn fill(&self, r: &AtlasRow, kind: &str, v: &mut Value) {
        if let Some(o) = v.as_object_mut() {
            o.insert("fw".into(), json!(FW));
            o.insert("type".into(), json!(kind));
            o.insert("timestamp".into(), json!(r.started_ms / 1000));
            o.insert("stored_timestamp".into(), json!(r.stored_ms / 1000));
            o.insert("msm_id".into(), json!(self.msm_id));
            o.insert("group_id".into(), json!(self.msm_id));
            o.insert("prb_id".into(), json!(self.prb_id));
            o.insert("lts".into(), json!(-1));
            o.insert(
                "imn".into(),
                json!({"request_id": r.request_id, "agent_id": r.agent_id, "measurement_id": self.measurement}),
            );
        }
    }
}

/// The firmware version we claim: the ping format of 4750 and later.
pub const FW: u32 = 5080;

/// A stable positive 31-bit id for a string id.
pub fn numeric_id(s: &str) -> u32 {
    let d = Sha256::digest(s.as_bytes());
    u32::from_be_bytes([d[0], d[1], d[2], d[3]]) & 0x7fff_ffff
}

pub(crate) fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// A stored result of `module` for the tests: agent-1, request `req`, started at
/// 1,700,000,000.5 s, finished half a second later, stored a second after that.
#[cfg(test)]
pub(crate) fn test_row(module: &str, result: Value) -> AtlasRow<'static> {
    AtlasRow {
        agent_id: "agent-1".into(),
        request_id: "req".into(),
        module: module.into(),
        result: std::borrow::Cow::Owned(result),
        started_ms: 1_700_000_000_500,
        finished_ms: 1_700_000_001_000,
        stored_ms: 1_700_000_002_000,
        scheduled_ms: None,
    }
}

/// Runs a Python script that reads `input` as JSON on stdin with RIPE's parser,
/// ripe.atlas.sagan, and returns what it prints as JSON: the tests' proof that Atlas
/// tooling reads our output. `tests/run.sh` installs sagan.
#[cfg(test)]
pub(crate) fn sagan(script: &str, input: &Value) -> Value {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (tests/run.sh installs it with ripe.atlas.sagan)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sagan could not parse {input}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the script prints JSON")
}
