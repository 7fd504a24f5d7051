//! RIPE Atlas result format, so tooling that reads Atlas results (for example
//! ripe.atlas.sagan) reads ours: ping (firmware 4750 and later) here, and one file per
//! other kind Atlas defines (traceroute, dns, http, sslcert, ntp).
//!
//! Atlas ids are integers; IMN's are not. `msm_id` and `prb_id` are the first 31 bits
//! of the SHA-256 of the request id and the agent id: stable, and the original ids are
//! kept beside them under `imn`.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::store::ResultRow;

mod dns;
mod http;
mod ntp;
mod traceroute;

/// Modules whose results have an Atlas format.
pub const MODULES: &[&str] = &[
    "ping_module",
    "traceroute",
    "dns",
    "http",
    "tls_cert",
    "ntp",
];

/// The Atlas results of a stored result, or None when Atlas defines no format for its
/// module (or the run produced no result).
pub fn convert(r: &ResultRow) -> Option<Vec<Value>> {
    match r.module.as_str() {
        "ping_module" => ping(r),
        "traceroute" => traceroute::traceroute(r),
        "dns" => dns::dns(r),
        "http" => http::http(r),
        "tls_cert" => http::sslcert(r),
        "ntp" => ntp::ntp(r),
        _ => None,
    }
}

/// What every Atlas result carries: ids, times and IMN's own ids.
pub(crate) struct Meta {
    pub msm_id: u32,
    pub prb_id: u32,
    pub measurement: Option<String>,
}

impl Meta {
    pub fn of(r: &ResultRow) -> Meta {
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
    pub fn fill(&self, r: &ResultRow, kind: &str, v: &mut Value) {
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

/// One Atlas ping result per target of a stored `ping_module` result; None for any
/// other module.
pub fn ping(r: &ResultRow) -> Option<Vec<Value>> {
    if r.module != "ping_module" {
        return None;
    }
    let src = r.result["src_addr"].as_str().unwrap_or("");
    let meta = Meta::of(r);
    let targets = r.result["targets"].as_array()?;
    Some(
        targets
            .iter()
            .map(|t| {
                let addr = t["addr"].as_str().unwrap_or("");
                let af = if addr.contains(':') { 6 } else { 4 };
                let ms = |k: &str| t[k].as_f64().map(round3).unwrap_or(-1.0);
                let results: Vec<Value> = t["rtts_ms"]
                    .as_array()
                    .map(|rtts| {
                        rtts.iter()
                            .map(|rtt| match rtt.as_f64() {
                                Some(v) => json!({"rtt": round3(v)}),
                                None => json!({"x": "*"}),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let mut v = json!({
                    "af": af,
                    "dst_addr": addr,
                    "dst_name": t["host"],
                    "src_addr": src,
                    "from": src,
                    "proto": "ICMP",
                    "size": t["size"],
                    "ttl": t["reply_ttl"],
                    "sent": t["sent"],
                    "rcvd": t["received"],
                    "dup": t["duplicates"],
                    "min": ms("min_ms"),
                    "avg": ms("avg_ms"),
                    "max": ms("max_ms"),
                    "result": results,
                    "step": null,
                });
                meta.fill(r, "ping", &mut v);
                v
            })
            .collect(),
    )
}

pub(crate) fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// A stored result of `module` for the tests: agent-1, request `req`, started at
/// 1,700,000,000.5 s, finished half a second later, stored a second after that.
#[cfg(test)]
pub(crate) fn test_row(module: &str, result: Value) -> ResultRow {
    ResultRow {
        agent_id: "agent-1".into(),
        request_id: "req".into(),
        module: module.into(),
        epoch: 1,
        seq: 2,
        state: imn_proto::wire::RequestState::Succeeded,
        result,
        error: None,
        received_ms: 1_700_000_000_000,
        started_ms: 1_700_000_000_500,
        finished_ms: 1_700_000_001_000,
        stored_ms: 1_700_000_002_000,
        scheduled_ms: None,
        at_ms: 1_700_000_001_000,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_fields_match_the_native_result() {
        let r = test_row(
            "ping_module",
            json!({"socket": "raw", "src_addr": null, "targets": [{
                "host": "localhost", "addr": "127.0.0.1", "size": 56, "reply_ttl": 64,
                "sent": 3, "received": 2, "duplicates": 0,
                "rtts_ms": [0.0412345, null, 0.05],
                "min_ms": 0.0412345, "avg_ms": 0.04561725, "max_ms": 0.05
            }]}),
        );
        let a = &ping(&r).unwrap()[0];
        assert_eq!(a["af"], 4);
        assert_eq!(a["dst_name"], "localhost");
        assert_eq!((a["sent"].as_u64(), a["rcvd"].as_u64()), (Some(3), Some(2)));
        assert_eq!(
            a["result"],
            json!([{"rtt": 0.041}, {"x": "*"}, {"rtt": 0.05}])
        );
        assert_eq!(a["timestamp"], 1_700_000_000);
        assert_eq!(a["msm_id"], numeric_id("req"));
        assert!(a["fw"].as_u64().unwrap() >= 4750);
        let mut other = r.clone();
        other.module = "echo_module".into();
        assert!(ping(&other).is_none());
    }
}
