//! RIPE Atlas NTP result format: one result per measurement, one entry per packet,
//! offsets and round trips in seconds, timestamps in NTP seconds since 1900.

use serde_json::{json, Value};

use crate::atlas::AtlasRow;
use crate::atlas::Meta;

/// The Atlas `ntp` result of a stored `ntp` result.
pub fn ntp(r: &AtlasRow) -> Option<Vec<Value>> {
    let n = &r.result;
    let addr = n["addr"].as_str()?;
    let secs = |v: &Value| v.as_f64().map(|ms| ms / 1000.0);
    let packets: Vec<Value> = n["packets"]
        .as_array()?
        .iter()
        .map(
            |p| match (secs(&p["offset_ms"]), secs(&p["delay_ms"]), &p["error"]) {
                (Some(offset), Some(rtt), Value::Null) => json!({
                    "origin-ts": p["origin_ts"],
                    "receive-ts": p["receive_ts"],
                    "transmit-ts": p["transmit_ts"],
                    "final-ts": p["final_ts"],
                    "offset": offset,
                    "rtt": rtt,
                }),
                _ => json!({"x": "*"}),
            },
        )
        .collect();
    let mut v = json!({
        "af": if addr.contains(':') { 6 } else { 4 },
        "dst_addr": addr,
        "dst_name": n["host"],
        "src_addr": n["src_addr"],
        "from": n["src_addr"],
        "proto": "UDP",
        "version": n["version"],
        "endtime": r.finished_ms / 1000,
        "result": packets,
    });
    if let (Some(s), Some(o)) = (n["server"].as_object(), v.as_object_mut()) {
        o.insert("li".into(), s["leap"].clone());
        o.insert("mode".into(), s["mode"].clone());
        o.insert("stratum".into(), s["stratum"].clone());
        o.insert(
            "poll".into(),
            json!(2f64.powi(s["poll"].as_i64().unwrap_or(0) as i32)),
        );
        o.insert("precision".into(), s["precision_s"].clone());
        o.insert("ref-id".into(), s["ref_id"].clone());
        o.insert("ref-ts".into(), s["ref_ts"].clone());
        o.insert(
            "root-delay".into(),
            json!(s["root_delay_ms"].as_f64().unwrap_or(0.0) / 1000.0),
        );
        o.insert(
            "root-dispersion".into(),
            json!(s["root_dispersion_ms"].as_f64().unwrap_or(0.0) / 1000.0),
        );
    }
    Meta::of(r).fill(r, "ntp", &mut v);
    Some(vec![v])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::ntp::{NtpPacket, NtpResult, NtpServerInfo};

    fn row() -> AtlasRow<'static> {
        let mut n = NtpResult {
            host: "ntp.test".into(),
            addr: "127.0.0.1".into(),
            port: 123,
            src_addr: Some("127.0.0.1".into()),
            version: 4,
            packets: vec![
                NtpPacket {
                    origin_ts: 3_973_000_000.25,
                    receive_ts: Some(3_973_000_001.750_2),
                    transmit_ts: Some(3_973_000_001.750_4),
                    final_ts: Some(3_973_000_000.250_6),
                    offset_ms: Some(1500.0),
                    delay_ms: Some(0.4),
                    error: None,
                },
                NtpPacket {
                    origin_ts: 3_973_000_001.25,
                    receive_ts: None,
                    transmit_ts: None,
                    final_ts: None,
                    offset_ms: None,
                    delay_ms: None,
                    error: Some("timeout".into()),
                },
            ],
            sent: 0,
            received: 0,
            offset_ms: None,
            delay_ms: None,
            min_delay_ms: None,
            max_delay_ms: None,
            median_offset_ms: None,
            server: Some(NtpServerInfo {
                leap: "no".into(),
                stratum: 2,
                mode: "server".into(),
                version: 4,
                poll: 3,
                precision_s: 2f64.powi(-23),
                root_delay_ms: 31.25,
                root_dispersion_ms: 62.5,
                ref_id: "127.0.0.53".into(),
                ref_ts: 3_972_999_985.0,
            }),
            rx_timestamps: "kernel".into(),
        };
        n.summarise();
        crate::atlas::test_row("ntp", serde_json::to_value(&n).unwrap())
    }

    #[test]
    fn packets_and_header_in_atlas_units() {
        let a = &ntp(&row()).unwrap()[0];
        assert_eq!(a["type"], "ntp");
        assert_eq!(a["result"][0]["offset"], 1.5);
        assert_eq!(a["result"][0]["rtt"], 0.0004);
        assert_eq!(a["result"][1], json!({"x": "*"}));
        assert_eq!(a["root-delay"], 0.03125);
        assert_eq!(a["poll"], 8.0);
        assert_eq!(a["ref-id"], "127.0.0.53");
        assert_eq!(a["endtime"], 1_700_000_001);
    }

    /// RIPE's own parser reads our output with the values we meant.
    #[test]
    fn ripe_atlas_sagan_parses_it() {
        let a = ntp(&row()).unwrap().remove(0);
        let script = r#"
import json, sys
from ripe.atlas.sagan import NtpResult
r = NtpResult(json.load(sys.stdin), on_error=NtpResult.ACTION_FAIL)
print(json.dumps([r.stratum, r.reference_id, r.offset_median, r.rtt_min, len(r.packets),
                  r.packets[0].offset, r.packets[1].rtt, r.leap_second_indicator]))
"#;
        let out = crate::atlas::sagan(script, &a);
        assert_eq!(out, json!([2, "127.0.0.53", 1.5, 0.0, 2, 1.5, null, "no"]));
    }
}
