//! `ping_module` in RIPE Atlas's `ping` format (firmware 4750 and later).

use serde_json::{json, Value};

use crate::atlas::{round3, AtlasRow, Meta};

/// One Atlas ping result per target of a stored `ping_module` result; None for any
/// other module.
pub fn ping(r: &AtlasRow) -> Option<Vec<Value>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atlas::{numeric_id, test_row};

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
