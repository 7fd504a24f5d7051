//! Atlas traceroute format (firmware 4750 and later): one Atlas result per stored
//! `traceroute` result, with a hop per TTL and, per probe, the answer (`from`, `rtt`,
//! `size`, `ttl`, `err`, `ittl`, `flags`, `icmpext` with MPLS labels) or `{"x": "*"}`.

use serde_json::{json, Map, Value};

use crate::atlas::AtlasRow;
use crate::atlas::{round3, Meta};

/// The Atlas `traceroute` result of a stored result; None if it has none.
pub fn traceroute(r: &AtlasRow) -> Option<Vec<Value>> {
    if r.module != "traceroute" {
        return None;
    }
    let t = &r.result;
    let hops = t["hops"].as_array()?;
    let result: Vec<Value> = hops
        .iter()
        .map(|h| {
            let packets: Vec<Value> = h["probes"]
                .as_array()
                .map(|ps| ps.iter().map(packet).collect())
                .unwrap_or_default();
            json!({"hop": h["ttl"], "result": packets})
        })
        .collect();
    let proto = match t["protocol"].as_str() {
        Some("udp") => "UDP",
        Some("tcp") => "TCP",
        _ => "ICMP",
    };
    // The end of the trace as the agent measured it, else when the run finished.
    let endtime = match (t["started_ms"].as_f64(), t["duration_ms"].as_f64()) {
        (Some(s), Some(d)) => ((s + d) / 1000.0) as i64,
        _ => r.finished_ms / 1000,
    };
    let mut v = json!({
        "af": t["af"],
        "dst_addr": t["dst_addr"],
        "dst_name": t["host"],
        "src_addr": t["src_addr"],
        "from": t["src_addr"],
        "proto": proto,
        "paris_id": t["paris_id"],
        "size": t["size"],
        "endtime": endtime,
        "result": result,
    });
    if proto != "ICMP" {
        v["dst_port"] = t["port"].clone();
    }
    Meta::of(r).fill(r, "traceroute", &mut v);
    Some(vec![v])
}

/// One probe's Atlas packet: its answer, or `{"x": "*"}`.
fn packet(p: &Value) -> Value {
    if p.is_null() {
        return json!({"x": "*"});
    }
    let mut o = Map::new();
    o.insert("from".into(), p["from"].clone());
    o.insert(
        "rtt".into(),
        json!(round3(p["rtt_ms"].as_f64().unwrap_or(0.0))),
    );
    o.insert("size".into(), p["size"].clone());
    o.insert("ttl".into(), p["ttl"].clone());
    if let Some(e) = p["err"].as_str() {
        o.insert("err".into(), json!(e));
    }
    // Atlas writes the quoted TTL only when it is not the expected 1.
    if let Some(q) = p["quoted_ttl"].as_u64().filter(|&q| q != 1) {
        o.insert("ittl".into(), json!(q));
    }
    if let Some(f) = p["tcp_flags"].as_str() {
        o.insert("flags".into(), json!(f));
    }
    if let Some(ext) = p["icmp_ext"].as_object() {
        let mpls: Vec<Value> = ext
            .get("mpls")
            .and_then(Value::as_array)
            .map(|ls| {
                ls.iter()
                    .map(|l| {
                        json!({
                            "label": l["label"],
                            "exp": l["exp"],
                            "s": u8::from(l["s"].as_bool().unwrap_or(false)),
                            "ttl": l["ttl"],
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let obj: Vec<Value> = if mpls.is_empty() {
            Vec::new()
        } else {
            vec![json!({"class": 1, "type": 1, "mpls": mpls})]
        };
        let rfc = ext.get("rfc4884").and_then(Value::as_bool).unwrap_or(false);
        o.insert(
            "icmpext".into(),
            json!({"version": 2, "rfc4884": u8::from(rfc), "obj": obj}),
        );
    }
    Value::Object(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::traceroute::{
        IcmpExtension, MplsLabel, TraceHop, TraceProtocol, TraceReply, TracerouteResult,
    };

    fn hop_reply(from: &str, rtt_ms: f64, icmp_type: u8, code: u8) -> TraceReply {
        TraceReply {
            from: from.into(),
            rtt_ms,
            ttl: 63,
            size: 76,
            icmp_type: Some(icmp_type),
            icmp_code: Some(code),
            tcp_flags: None,
            err: None,
            quoted_ttl: Some(1),
            icmp_ext: None,
        }
    }

    fn result() -> TracerouteResult {
        let mut mpls_hop = hop_reply("198.19.250.18", 0.5004, 11, 0);
        mpls_hop.icmp_ext = Some(IcmpExtension {
            rfc4884: true,
            mpls: vec![MplsLabel {
                label: 24_007,
                exp: 0,
                s: true,
                ttl: 1,
            }],
        });
        mpls_hop.quoted_ttl = Some(2);
        let mut last = hop_reply("198.19.250.50", 0.9, 3, 3);
        last.ttl = 61;
        TracerouteResult {
            host: "dest.example".into(),
            dst_addr: "198.19.250.50".into(),
            src_addr: "198.19.250.1".into(),
            af: 4,
            protocol: TraceProtocol::Udp,
            port: 33434,
            src_port: 40_003,
            icmp_checksum: 0,
            paris_id: 3,
            size: 48,
            first_ttl: 1,
            max_ttl: 30,
            probes_per_hop: 2,
            timeout_ms: 1000,
            destination_reached: true,
            stop_reason: "destination".into(),
            hops: vec![
                TraceHop {
                    ttl: 1,
                    probes: vec![
                        Some(hop_reply("198.19.250.2", 0.2, 11, 0)),
                        Some(hop_reply("198.19.250.2", 0.3, 11, 0)),
                    ],
                },
                TraceHop {
                    ttl: 2,
                    probes: vec![Some(mpls_hop), None],
                },
                TraceHop {
                    ttl: 3,
                    probes: vec![None, None],
                },
                TraceHop {
                    ttl: 4,
                    probes: vec![Some(last.clone()), Some(last)],
                },
            ],
            started_ms: 1_700_000_000_200,
            duration_ms: 2_500.0,
        }
    }

    fn row(r: &TracerouteResult) -> AtlasRow<'static> {
        let mut row = crate::atlas::test_row("traceroute", serde_json::to_value(r).unwrap());
        row.finished_ms = 1_700_000_003_000;
        row
    }

    #[test]
    fn fields_match_the_native_result() {
        let r = result();
        let a = &traceroute(&row(&r)).unwrap()[0];
        assert_eq!(a["type"], "traceroute");
        assert_eq!(
            (a["af"].as_u64(), a["proto"].as_str()),
            (Some(4), Some("UDP"))
        );
        assert_eq!(a["dst_addr"], "198.19.250.50");
        assert_eq!(a["dst_name"], "dest.example");
        assert_eq!(a["src_addr"], "198.19.250.1");
        assert_eq!(
            (a["paris_id"].as_u64(), a["size"].as_u64()),
            (Some(3), Some(48))
        );
        assert_eq!(a["endtime"], 1_700_000_002);
        assert_eq!(a["timestamp"], 1_700_000_000);
        let hops = a["result"].as_array().unwrap();
        assert_eq!(hops.len(), 4);
        assert_eq!(hops[0]["hop"], 1);
        assert_eq!(
            hops[0]["result"][0],
            json!({"from": "198.19.250.2", "rtt": 0.2, "size": 76, "ttl": 63})
        );
        assert_eq!(
            hops[1]["result"][0]["icmpext"],
            json!({"version": 2, "rfc4884": 1, "obj": [{"class": 1, "type": 1,
                   "mpls": [{"label": 24007, "exp": 0, "s": 1, "ttl": 1}]}]})
        );
        assert_eq!(hops[1]["result"][0]["rtt"], 0.5);
        assert_eq!(hops[1]["result"][0]["ittl"], 2);
        assert_eq!(hops[1]["result"][1], json!({"x": "*"}));
        assert_eq!(hops[2]["result"], json!([{"x": "*"}, {"x": "*"}]));
        // The destination's port unreachable is no error.
        assert!(hops[3]["result"][0].get("err").is_none());
        let mut other = row(&r);
        other.module = "mtr".into();
        assert!(traceroute(&other).is_none());
    }

    #[test]
    fn errors_and_tcp_flags_are_written_as_atlas_does() {
        let mut r = result();
        r.protocol = TraceProtocol::Tcp;
        r.port = 443;
        r.hops[3].probes[0].as_mut().unwrap().icmp_type = None;
        r.hops[3].probes[0].as_mut().unwrap().tcp_flags = Some("SA".into());
        r.hops[2].probes[0] = Some(TraceReply {
            err: Some("H".into()),
            ..hop_reply("198.19.250.34", 3000.0, 3, 1)
        });
        let a = &traceroute(&row(&r)).unwrap()[0];
        assert_eq!(
            (a["proto"].as_str(), a["dst_port"].as_u64()),
            (Some("TCP"), Some(443))
        );
        assert_eq!(a["result"][2]["result"][0]["err"], "H");
        assert_eq!(a["result"][3]["result"][0]["flags"], "SA");
    }

    /// ripe.atlas.sagan, RIPE's parser of Atlas results, reads ours.
    #[test]
    fn sagan_parses_it() {
        let a = traceroute(&row(&result())).unwrap().remove(0);
        let script = r#"
import json, sys
from ripe.atlas.sagan import TracerouteResult
r = TracerouteResult(sys.stdin.read(), on_error=TracerouteResult.ACTION_FAIL)
h2 = r.hops[1].packets[0]
print(json.dumps({
    "total_hops": r.total_hops,
    "destination_address": r.destination_address,
    "source_address": r.source_address,
    "is_success": r.is_success,
    "destination_ip_responded": r.destination_ip_responded,
    "protocol": r.protocol,
    "paris_id": r.paris_id,
    "ip_path": r.ip_path,
    "rtt": h2.rtt,
    "mpls": h2.icmp_header.objects,
    "rfc4884": h2.icmp_header.rfc4884,
    "end_time": r.end_time_timestamp,
}))
"#;
        let out = crate::atlas::sagan(script, &a);
        assert_eq!(out["total_hops"], 4);
        assert_eq!(out["destination_address"], "198.19.250.50");
        assert_eq!(out["source_address"], "198.19.250.1");
        assert_eq!(out["is_success"], true);
        assert_eq!(out["destination_ip_responded"], true);
        assert_eq!(out["protocol"], "UDP");
        assert_eq!(out["paris_id"], 3);
        assert_eq!(out["rtt"], 0.5);
        assert_eq!(out["rfc4884"], true);
        assert_eq!(out["mpls"][0]["mpls"][0]["label"], 24007);
        assert_eq!(out["end_time"], 1_700_000_002);
        assert_eq!(
            out["ip_path"],
            json!([
                ["198.19.250.2", "198.19.250.2"],
                ["198.19.250.18", null],
                [null, null],
                ["198.19.250.50", "198.19.250.50"]
            ])
        );

        // A trace that ends at a router saying "host unreachable": not a success.
        let mut r = result();
        r.hops.truncate(3);
        r.hops[2].probes = vec![Some(TraceReply {
            err: Some("H".into()),
            ..hop_reply("198.19.250.34", 1.0, 3, 1)
        })];
        r.destination_reached = false;
        let a = traceroute(&row(&r)).unwrap().remove(0);
        let script = r#"
import json, sys
from ripe.atlas.sagan import TracerouteResult
r = TracerouteResult(sys.stdin.read())
print(json.dumps({"is_success": r.is_success, "responded": r.destination_ip_responded,
                  "errors": r.last_hop_errors, "total_hops": r.total_hops}))
"#;
        let out = crate::atlas::sagan(script, &a);
        assert_eq!(
            out,
            json!({"is_success": false, "responded": false,
                   "errors": ["Destination unreachable"], "total_hops": 3})
        );
    }
}
