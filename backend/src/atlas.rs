//! RIPE Atlas result format, so tooling that reads Atlas results (for example
//! ripe.atlas.sagan) reads ours. Each module converts its own results beside its other
//! code (`imn_proto::kinds::<module>::atlas`, feature `atlas`); this only hands a
//! stored result over.
//!
//! Atlas ids are integers; IMN's are not. `msm_id` and `prb_id` are the first 31 bits
//! of the SHA-256 of the request id and the agent id: stable, and the original ids are
//! kept beside them under `imn`.

use serde_json::Value;

use crate::store::ResultRow;

/// Modules whose results have an Atlas format.
pub fn modules() -> Vec<&'static str> {
    imn_proto::atlas::modules()
}

/// The Atlas results of a stored result, or None when Atlas defines no format for its
/// module (or the run produced no result).
pub fn convert(r: &ResultRow) -> Option<Vec<Value>> {
    imn_proto::atlas::convert(&imn_proto::atlas::AtlasRow {
        agent_id: r.agent_id.clone(),
        request_id: r.request_id.clone(),
        module: r.module.clone(),
        result: std::borrow::Cow::Borrowed(&r.result),
        started_ms: r.started_ms,
        finished_ms: r.finished_ms,
        stored_ms: r.stored_ms,
        scheduled_ms: r.scheduled_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored row reaches its module's converter with the fields Atlas reads.
    #[test]
    fn a_stored_ping_converts_and_other_modules_do_not() {
        let mut r = ResultRow {
            agent_id: "agent-1".into(),
            request_id: "req".into(),
            module: "ping_module".into(),
            epoch: 1,
            seq: 2,
            state: imn_proto::wire::RequestState::Succeeded,
            result: serde_json::json!({"socket": "raw", "src_addr": null, "targets": [{
                "host": "h", "addr": "127.0.0.1", "size": 56, "reply_ttl": 64, "sent": 1,
                "received": 1, "duplicates": 0, "rtts_ms": [0.5], "min_ms": 0.5,
                "avg_ms": 0.5, "max_ms": 0.5}]}),
            error: None,
            received_ms: 1_700_000_000_000,
            started_ms: 1_700_000_000_500,
            finished_ms: 1_700_000_001_000,
            stored_ms: 1_700_000_002_000,
            scheduled_ms: Some(1_700_000_000_000),
            at_ms: 1_700_000_001_000,
        };
        r.request_id = "m1@1700000000000".into();
        let a = &convert(&r).unwrap()[0];
        assert_eq!(a["type"], "ping");
        assert_eq!(a["timestamp"], 1_700_000_000);
        assert_eq!(a["stored_timestamp"], 1_700_000_002);
        assert_eq!(a["msm_id"], imn_proto::atlas::numeric_id("m1"));
        assert_eq!(a["imn"]["measurement_id"], "m1");
        r.module = "echo_module".into();
        assert!(convert(&r).is_none());
        assert_eq!(
            modules(),
            [
                "ping_module",
                "traceroute",
                "dns",
                "http",
                "tls_cert",
                "ntp"
            ]
        );
    }
}
