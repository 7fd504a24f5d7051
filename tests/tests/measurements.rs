//! The measurement modules of RIPE Atlas and Globalping parity, end to end: requested
//! through the API of `imn up`, run by a real agent against real peers on loopback
//! (dnsmasq, `openssl s_server`, the backend's own HTTP API, the kernel, the tests' NTP
//! responder), stored, and read back both natively and in RIPE Atlas's format, which
//! RIPE's own parser (ripe.atlas.sagan) must read with the values the native result has.

use std::time::Duration;

use imn_tests::peers::{self, sagan, Dnsmasq, OpensslServer};
use imn_tests::{http_get_text, prom_value, Api, Up};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

/// Runs a module on agent-1 and returns the native result, after checking it succeeded.
async fn run(api: &Api, module: &str, params: Value) -> Value {
    let r = api
        .post(
            &format!("/agent/agent-1/{module}?wait=25"),
            &params.to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{module} {params}: {:?}", r.body);
    assert_eq!(r.body["state"], "succeeded", "{module}: {}", r.body);
    r.body
}

/// The Atlas form of a stored result, from the API.
async fn atlas(api: &Api, done: &Value) -> Value {
    let rid = done["request_id"].as_str().unwrap();
    let r = api
        .get(&format!("/agents/agent-1/results/{rid}?format=atlas"))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_new_module_end_to_end_with_atlas_output() {
    let up = Up::start(1, &[]).await;
    up.api.wait_alive(&["agent-1"], T).await;
    let api = &up.api;

    // NTP: the responder's clock is 1.5 s ahead.
    let ntp_port = peers::ntp_responder("127.0.0.1:0", peers::NtpBehaviour::Offset(1.5));
    let b = run(
        api,
        "ntp",
        json!({"host": "127.0.0.1", "port": ntp_port, "packets": 3, "interval_ms": 10}),
    )
    .await;
    let offset = b["result"]["offset_ms"].as_f64().unwrap();
    assert!((offset - 1500.0).abs() < 50.0, "{b}");
    let a = atlas(api, &b).await;
    let p = sagan(
        r#"
import json, sys
from ripe.atlas.sagan import NtpResult
r = NtpResult(json.load(sys.stdin)[0], on_error=NtpResult.ACTION_FAIL)
print(json.dumps([r.destination_address, r.stratum, r.offset_median, len(r.packets)]))
"#,
        &a,
    );
    assert_eq!(p[0], "127.0.0.1");
    assert_eq!((p[1].as_u64(), p[3].as_u64()), (Some(2), Some(3)));
    assert!((p[2].as_f64().unwrap() - 1.5).abs() < 0.05, "{p}");

    // Traceroute over loopback: one hop, the destination itself, in Atlas format.
    let b = run(
        api,
        "traceroute",
        json!({"host": "127.0.0.1", "protocol": "icmp", "max_ttl": 4, "probes": 2, "timeout_ms": 500}),
    )
    .await;
    let r = &b["result"];
    assert_eq!(r["destination_reached"], true, "{b}");
    assert_eq!(r["hops"].as_array().unwrap().len(), 1, "{b}");
    let a = atlas(api, &b).await;
    let p = sagan(
        r#"
import json, sys
from ripe.atlas.sagan import TracerouteResult
r = TracerouteResult(json.load(sys.stdin)[0], on_error=TracerouteResult.ACTION_FAIL)
print(json.dumps([r.destination_address, r.total_hops, r.is_success, r.ip_path, r.protocol]))
"#,
        &a,
    );
    assert_eq!(
        p,
        json!(["127.0.0.1", 1, true, [["127.0.0.1", "127.0.0.1"]], "ICMP"])
    );

    // mtr: the same path, twice; Atlas has no mtr format, so the API refuses that form.
    let b = run(
        api,
        "mtr",
        json!({"host": "127.0.0.1", "count": 2, "interval_ms": 10, "timeout_ms": 500}),
    )
    .await;
    let hop = &b["result"]["hops"][0];
    assert_eq!(
        (hop["sent"].as_u64(), hop["received"].as_u64()),
        (Some(2), Some(2)),
        "{b}"
    );
    assert_eq!(hop["loss_pct"], 0.0);
    let rid = b["request_id"].as_str().unwrap();
    let r = api
        .get(&format!("/agents/agent-1/results/{rid}?format=atlas"))
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);

    // DNS to dnsmasq, over UDP and TCP.
    let dns = Dnsmasq::start(&[
        "--host-record=www.imn.test,192.0.2.10",
        "--mx-host=imn.test,mail.imn.test,10",
    ]);
    let server = format!("127.0.0.1:{}", dns.port);
    for (qtype, protocol, want) in [
        ("A", "udp", "192.0.2.10"),
        ("MX", "tcp", "10 mail.imn.test."),
    ] {
        let name = if qtype == "A" {
            "www.imn.test"
        } else {
            "imn.test"
        };
        let b = run(
            api,
            "dns",
            json!({"name": name, "type": qtype, "server": server, "protocol": protocol}),
        )
        .await;
        let m = &b["result"]["reply"]["message"];
        assert_eq!(m["rcode_name"], "NOERROR", "{b}");
        assert_eq!(m["answer"][0]["rdata"], want, "{b}");
        let a = atlas(api, &b).await;
        let p = sagan(
            r#"
import json, sys
from ripe.atlas.sagan import DnsResult
r = DnsResult(json.load(sys.stdin)[0], on_error=DnsResult.ACTION_FAIL)
resp = r.responses[0]
print(json.dumps([resp.protocol, resp.abuf.header.return_code, len(resp.abuf.answers),
                  resp.abuf.answers[0].type]))
"#,
            &a,
        );
        assert_eq!(
            p,
            json!([protocol.to_uppercase(), "NOERROR", 1, qtype]),
            "{a}"
        );
    }

    // HTTP to the backend's own API (hyper/axum), plain HTTP/1.1.
    let port: u16 = api.base.rsplit(':').next().unwrap().parse().unwrap();
    let b = run(
        api,
        "http",
        json!({"url": format!("http://127.0.0.1:{port}/livez"), "method": "GET"}),
    )
    .await;
    let r = &b["result"];
    assert_eq!(r["response"]["status"], 200, "{b}");
    assert!(r["timing"]["total_ms"].as_f64().unwrap() > 0.0);
    let a = atlas(api, &b).await;
    let p = sagan(
        r#"
import json, sys
from ripe.atlas.sagan import HttpResult
r = HttpResult(json.load(sys.stdin)[0], on_error=HttpResult.ACTION_FAIL)
x = r.responses[0]
print(json.dumps([r.method, x.code, x.destination_address, x.body_size]))
"#,
        &a,
    );
    assert_eq!(p[0], "GET");
    assert_eq!(p[1], 200);
    assert_eq!(p[2], "127.0.0.1");
    assert_eq!(p[3], r["response"]["body_bytes"]);

    // TLS from another implementation: OpenSSL's s_server. Trusted through ca_pem, the
    // chain verifies; without it, the certificate error is reported with the chain.
    let tls = OpensslServer::start();
    let b = run(
        api,
        "tls_cert",
        json!({"host": "localhost", "port": tls.port, "ca_pem": tls.ca_pem}),
    )
    .await;
    let t = &b["result"]["tls"];
    assert_eq!(t["verify_error"], Value::Null, "{b}");
    assert_eq!(t["chain"][0]["subject_cn"], "localhost", "{b}");
    let a = atlas(api, &b).await;
    let p = sagan(
        r#"
import json, sys
from ripe.atlas.sagan import SslResult
r = SslResult(json.load(sys.stdin)[0], on_error=SslResult.ACTION_FAIL)
print(json.dumps([r.destination_name, r.port, len(r.certificates), r.certificates[0].subject_cn,
                  r.certificates[0].checksum_sha256]))
"#,
        &a,
    );
    assert_eq!(p[0], "localhost");
    assert_eq!(p[1].as_u64(), Some(u64::from(tls.port)));
    assert_eq!((p[2].as_u64(), &p[3]), (Some(1), &json!("localhost")));
    let b = run(
        api,
        "tls_cert",
        json!({"host": "localhost", "port": tls.port}),
    )
    .await;
    let err = b["result"]["tls"]["verify_error"]
        .as_str()
        .unwrap_or_default();
    assert!(err.contains("UnknownIssuer"), "{b}");
    assert_eq!(b["result"]["tls"]["chain"][0]["subject_cn"], "localhost");
    // And an HTTPS GET to it (s_server -www answers with a status page).
    let b = run(
        api,
        "http",
        json!({"url": format!("https://localhost:{}/", tls.port), "ca_pem": tls.ca_pem}),
    )
    .await;
    let r = &b["result"];
    assert_eq!(r["response"]["status"], 200, "{b}");
    assert!(
        r["tls"]["version"]
            .as_str()
            .unwrap_or_default()
            .contains("1.3"),
        "{b}"
    );
    let tm = &r["timing"];
    let order: Vec<f64> = ["dns_ms", "connect_ms", "tls_ms", "ttfb_ms", "total_ms"]
        .iter()
        .map(|k| tm[k].as_f64().unwrap())
        .collect();
    assert!(order.windows(2).all(|w| w[0] <= w[1]), "{tm}");

    // The backend's metrics follow the results: NTP offset, traceroute hops, DNS and
    // HTTP times.
    let page = http_get_text(port, "/metrics").unwrap();
    let at = |series: &str| prom_value(&page, series);
    let offset = at(r#"imn_ntp_offset_seconds{agent="agent-1",target="127.0.0.1"}"#);
    assert!((offset - 1.5).abs() < 0.05, "{offset}");
    assert_eq!(
        at(r#"imn_traceroute_hops{agent="agent-1",target="127.0.0.1"}"#),
        1.0
    );
    assert_eq!(
        at(r#"imn_traceroute_destination_reached{agent="agent-1",target="127.0.0.1"}"#),
        1.0
    );
    let dns_count = format!(
        r#"imn_dns_response_time_seconds_count{{agent="agent-1",server="127.0.0.1:{}"}}"#,
        dns.port
    );
    assert_eq!(at(&dns_count), 2.0, "{page}");
    let http_count = format!(
        r#"imn_http_total_time_seconds_count{{agent="agent-1",target="http://127.0.0.1:{port}/livez"}}"#
    );
    assert_eq!(at(&http_count), 1.0, "{page}");
}
