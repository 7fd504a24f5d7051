//! Atlas `http` and `sslcert` formats, from `http` and `tls_cert` results, as
//! ripe.atlas.sagan's `HttpResult` and `SslResult` read them.
//!
//! Atlas times an HTTP request from the end of name resolution: `ttc` (TCP connected),
//! `ttfb` (first response byte) and `rt` (response read) count from there, and `ttr` is
//! the resolution itself. IMN's times count from the start of the run, so the
//! resolution time is taken off. A TLS handshake is part of `ttfb`, as in Atlas.

use std::net::SocketAddr;

use serde_json::{json, Value};

use crate::atlas::round3;
use crate::atlas::AtlasRow;

/// The address of an `addr:port` (IPv6 as `[addr]:port`), or "".
fn ip_of(local: &Value) -> String {
    local
        .as_str()
        .and_then(|s| s.parse::<SocketAddr>().ok())
        .map(|sa| sa.ip().to_string())
        .unwrap_or_default()
}

/// The Atlas `http` result of a stored result; None if it has none.
pub fn http(r: &AtlasRow) -> Option<Vec<Value>> {
    if r.module != "http" {
        return None;
    }
    let res = &r.result;
    let url = res["url"].as_str()?;
    let meta = crate::atlas::Meta::of(r);
    let src = ip_of(&res["local_addr"]);
    let t = &res["timing"];
    let dns = t["dns_ms"].as_f64();
    let since_dns = |k: &str| t[k].as_f64().map(|v| round3(v - dns.unwrap_or(0.0)));

    let mut one = json!({
        "method": res["method"],
        "dst_addr": res["addr"],
        "src_addr": src,
        "time": r.started_ms / 1000,
    });
    let o = one.as_object_mut()?;
    if let Some(af) = res["af"].as_u64() {
        o.insert("af".into(), json!(af));
    }
    if let Some(d) = dns {
        o.insert("ttr".into(), json!(round3(d)));
    }
    if let Some(ttc) = since_dns("connect_ms") {
        o.insert("ttc".into(), json!(ttc));
    }
    if let Some(ttfb) = since_dns("ttfb_ms") {
        o.insert("ttfb".into(), json!(ttfb));
    }
    let resp = &res["response"];
    if resp.is_object() {
        let ver = resp["http_version"].as_str().unwrap_or("");
        let ver = ver.trim_start_matches("HTTP/");
        o.insert("res".into(), resp["status"].clone());
        o.insert("ver".into(), json!(ver));
        o.insert("hsize".into(), resp["header_bytes"].clone());
        o.insert("bsize".into(), resp["body_bytes"].clone());
        if let Some(rt) = since_dns("total_ms") {
            o.insert("rt".into(), json!(rt));
        }
        // Atlas's header lines: the status line, then `Name: value`.
        let mut lines = vec![json!(format!(
            "HTTP/{ver} {} {}",
            resp["status"],
            resp["reason"].as_str().unwrap_or("")
        )
        .trim_end()
        .to_string())];
        if let Some(hs) = resp["headers"].as_array() {
            lines.extend(hs.iter().map(|h| {
                json!(format!(
                    "{}: {}",
                    h["name"].as_str().unwrap_or(""),
                    h["value"].as_str().unwrap_or("")
                ))
            }));
        }
        o.insert("header".into(), Value::Array(lines));
    }
    if let Some(err) = res["error"].as_str() {
        let key = if res["error_phase"] == "dns" {
            "dnserr"
        } else {
            "err"
        };
        o.insert(key.into(), json!(err));
    }
    let mut v = json!({
        "uri": url,
        "from": src,
        "msm_name": "HTTPGet",
        "result": [one],
    });
    meta.fill(r, "http", &mut v);
    Some(vec![v])
}

/// The Atlas `sslcert` result of a stored result; None if it has none.
pub fn sslcert(r: &AtlasRow) -> Option<Vec<Value>> {
    if r.module != "tls_cert" {
        return None;
    }
    let res = &r.result;
    let host = res["host"].as_str()?;
    let meta = crate::atlas::Meta::of(r);
    let src = ip_of(&res["local_addr"]);
    let tls = &res["tls"];
    let mut v = json!({
        "dst_name": host,
        "dst_addr": res["addr"],
        // Atlas sends the port as a string.
        "dst_port": res["port"].as_u64().map(|p| p.to_string()),
        "src_addr": src,
        "from": src,
        "method": "TLS",
        "msm_name": "SSLCert",
    });
    let o = v.as_object_mut()?;
    if let Some(af) = res["af"].as_u64() {
        o.insert("af".into(), json!(af));
    }
    let connect = res["connect_ms"].as_f64();
    if let Some(c) = connect {
        o.insert("ttc".into(), json!(round3(c)));
    }
    // Atlas's rt: from the start of the connect to the certificates received.
    if let (Some(c), Some(h)) = (connect, res["handshake_ms"].as_f64()) {
        o.insert("rt".into(), json!(round3(c + h)));
    }
    if let Some(ver) = tls["version"].as_str() {
        o.insert("ver".into(), json!(ver.trim_start_matches("TLSv")));
    }
    if let Some(code) = tls["cipher_code"].as_u64() {
        o.insert("server_cipher".into(), json!(format!("0x{code:04X}")));
    }
    let certs: Vec<Value> = tls["chain"]
        .as_array()
        .map(|chain| {
            chain
                .iter()
                .filter_map(|c| c["pem"].as_str())
                .map(|p| json!(p))
                .collect()
        })
        .unwrap_or_default();
    if !certs.is_empty() {
        o.insert("cert".into(), Value::Array(certs));
    }
    if let Some(a) = res["alert"].as_u64() {
        o.insert("alert".into(), json!({"level": 2, "description": a}));
    }
    if let Some(err) = res["error"].as_str() {
        let key = if res["error_phase"] == "dns" {
            "dnserr"
        } else {
            "err"
        };
        o.insert(key.into(), json!(err));
    }
    meta.fill(r, "sslcert", &mut v);
    Some(vec![v])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::http::{
        CertInfo, HttpHeader, HttpMethod, HttpPhase, HttpResponse, HttpResult, HttpTiming,
        TlsCertResult, TlsInfo,
    };
    use sha2::{Digest, Sha256};

    fn row(module: &str, result: Value) -> AtlasRow<'static> {
        crate::atlas::test_row(module, result)
    }

    fn http_result() -> HttpResult {
        HttpResult {
            url: "https://localhost:8443/".into(),
            method: HttpMethod::Get,
            addr: Some("127.0.0.1".into()),
            af: Some(4),
            local_addr: Some("127.0.0.1:40000".into()),
            timing: HttpTiming {
                dns_ms: Some(1.0),
                connect_ms: Some(1.5),
                tls_ms: Some(4.0),
                ttfb_ms: Some(6.0),
                total_ms: 6.5,
            },
            response: Some(Box::new(HttpResponse {
                http_version: "HTTP/2".into(),
                status: 200,
                reason: Some("OK".into()),
                headers: vec![HttpHeader {
                    name: "content-length".into(),
                    value: "5".into(),
                }],
                headers_truncated: false,
                header_bytes: 38,
                content_length: Some(5),
                body_bytes: 5,
                body_truncated: false,
                body_preview: Some("hello".into()),
                location: None,
            })),
            tls: None,
            error: None,
            error_phase: None,
            redirects: vec![],
        }
    }

    /// A generated certificate as `tls_cert` reports it, and its SHA-256 as sagan
    /// prints it.
    fn cert(cn: &str) -> (CertInfo, String) {
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let c = p.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap();
        let sha = Sha256::digest(c.der())
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        let info = CertInfo {
            subject: format!("CN={cn}"),
            issuer: format!("CN={cn}"),
            subject_cn: Some(cn.into()),
            issuer_cn: Some(cn.into()),
            serial: "01".into(),
            not_before: "1975-01-01T00:00:00Z".into(),
            not_after: "4096-01-01T00:00:00Z".into(),
            not_before_unix: 157_766_400,
            not_after_unix: 67_768_036_800,
            dns_names: vec!["localhost".into()],
            ip_addrs: vec![],
            is_ca: false,
            sha256: sha.clone(),
            key_algorithm: "EC P-256".into(),
            key_bits: Some(256),
            signature_algorithm: "ecdsa-with-SHA256".into(),
            pem: Some(c.pem().replace("\r\n", "\n")),
            parse_error: None,
        };
        (info, sha)
    }

    fn tls_cert_result() -> (TlsCertResult, String) {
        let (leaf, sha) = cert("sagan leaf");
        let (inter, _) = cert("sagan intermediate");
        let r = TlsCertResult {
            host: "localhost".into(),
            port: 8443,
            addr: Some("::1".into()),
            af: Some(6),
            local_addr: Some("[::1]:40000".into()),
            dns_ms: Some(0.2),
            connect_ms: Some(0.5),
            handshake_ms: Some(2.25),
            tls: Box::new(TlsInfo {
                server_name: Some("localhost".into()),
                version: Some("TLSv1.3".into()),
                cipher: Some("TLS_AES_256_GCM_SHA384".into()),
                cipher_code: Some(0x1302),
                kx_group: Some("X25519".into()),
                alpn: None,
                chain: vec![leaf, inter],
                verify_error: Some("UnknownIssuer".into()),
                trust_anchors: 1,
            }),
            error: None,
            error_phase: None,
            alert: None,
        };
        (r, sha)
    }

    #[test]
    fn http_fields() {
        let r = row("http", serde_json::to_value(http_result()).unwrap());
        let a = &http(&r).unwrap()[0];
        assert_eq!(a["type"], "http");
        assert_eq!(a["uri"], "https://localhost:8443/");
        let one = &a["result"][0];
        assert_eq!(one["af"], 4);
        assert_eq!(one["method"], "GET");
        assert_eq!(
            (one["res"].as_u64(), one["ver"].as_str()),
            (Some(200), Some("2"))
        );
        assert_eq!(
            (one["hsize"].as_u64(), one["bsize"].as_u64()),
            (Some(38), Some(5))
        );
        assert_eq!(
            (one["dst_addr"].as_str(), one["src_addr"].as_str()),
            (Some("127.0.0.1"), Some("127.0.0.1"))
        );
        // From the end of name resolution.
        assert_eq!(
            (
                one["ttc"].as_f64(),
                one["ttfb"].as_f64(),
                one["rt"].as_f64()
            ),
            (Some(0.5), Some(5.0), Some(5.5))
        );
        assert_eq!(one["ttr"], 1.0);
        assert_eq!(one["header"], json!(["HTTP/2 200 OK", "content-length: 5"]));
        assert!(one.get("err").is_none());
        assert_eq!(one["time"], 1_700_000_000);

        let mut failed = http_result();
        failed.response = None;
        failed.timing.connect_ms = None;
        failed.timing.ttfb_ms = None;
        failed.error = Some("cannot resolve \"x.test\": no such name".into());
        failed.error_phase = Some(HttpPhase::Dns);
        let a = &http(&row("http", serde_json::to_value(&failed).unwrap())).unwrap()[0];
        let one = &a["result"][0];
        assert!(one["dnserr"].as_str().unwrap().contains("no such name"));
        assert!(one.get("res").is_none() && one.get("ttc").is_none());
        failed.error_phase = Some(HttpPhase::Tls);
        let a = &http(&row("http", serde_json::to_value(&failed).unwrap())).unwrap()[0];
        assert!(a["result"][0]["err"].is_string());

        assert!(http(&row("tls_cert", json!({}))).is_none());
        assert!(http(&row("http", Value::Null)).is_none());
    }

    #[test]
    fn sslcert_fields() {
        let (t, _) = tls_cert_result();
        let a = &sslcert(&row("tls_cert", serde_json::to_value(&t).unwrap())).unwrap()[0];
        assert_eq!(a["type"], "sslcert");
        assert_eq!(
            (a["af"].as_u64(), a["dst_port"].as_str()),
            (Some(6), Some("8443"))
        );
        assert_eq!(
            (a["dst_name"].as_str(), a["src_addr"].as_str()),
            (Some("localhost"), Some("::1"))
        );
        assert_eq!(
            (a["ver"].as_str(), a["server_cipher"].as_str()),
            (Some("1.3"), Some("0x1302"))
        );
        assert_eq!(
            (a["ttc"].as_f64(), a["rt"].as_f64()),
            (Some(0.5), Some(2.75))
        );
        assert_eq!(a["cert"].as_array().unwrap().len(), 2);
        assert!(a.get("err").is_none() && a.get("alert").is_none());

        let mut failed = t.clone();
        failed.tls.chain.clear();
        failed.handshake_ms = None;
        failed.error = Some("TLS handshake failed: server sent alert HandshakeFailure".into());
        failed.error_phase = Some(HttpPhase::Tls);
        failed.alert = Some(40);
        let a = &sslcert(&row("tls_cert", serde_json::to_value(&failed).unwrap())).unwrap()[0];
        assert_eq!(a["alert"], json!({"level": 2, "description": 40}));
        assert!(a["err"].is_string() && a.get("cert").is_none() && a.get("rt").is_none());
        assert!(sslcert(&row("http", json!({}))).is_none());
    }

    /// ripe.atlas.sagan (Python) reads what we write: our http and sslcert results parse
    /// without errors, and it decodes our PEM certificates to the names and fingerprints
    /// we generated.
    #[test]
    fn sagan_parses_ours() {
        let (t, sha) = tls_cert_result();
        let mut alert = t.clone();
        alert.tls.chain.clear();
        alert.alert = Some(40);
        alert.error = Some("TLS handshake failed".into());
        let mut docs = http(&row("http", serde_json::to_value(http_result()).unwrap())).unwrap();
        docs.extend(sslcert(&row("tls_cert", serde_json::to_value(&t).unwrap())).unwrap());
        docs.extend(sslcert(&row("tls_cert", serde_json::to_value(&alert).unwrap())).unwrap());
        let script = r#"
import json, sys
from ripe.atlas.sagan import Result
out = []
for d in json.load(sys.stdin):
    r = Result.get(d, on_error=Result.ACTION_IGNORE, on_malformation=Result.ACTION_FAIL)
    o = {"class": type(r).__name__, "is_error": r.is_error, "is_malformed": r.is_malformed,
         "probe_id": r.probe_id, "measurement_id": r.measurement_id}
    if type(r).__name__ == "HttpResult":
        x = r.responses[0]
        o.update(uri=r.uri, method=r.method, code=x.code, version=x.version, af=x.af,
                 body_size=x.body_size, head_size=x.head_size, rt=x.response_time,
                 dst=x.destination_address, src=x.source_address, resp_error=x.is_error)
    else:
        o.update(af=r.af, port=r.port, name=r.destination_name, dst=r.destination_address,
                 method=r.method, version=r.version, rt=r.response_time, ttc=r.time_to_connect,
                 n=len(r.certificates), alert=r.alert.description_string if r.alert else None,
                 cn=[c.subject_cn for c in r.certificates],
                 issuer=[c.issuer_cn for c in r.certificates],
                 sha256=[c.checksum_sha256 for c in r.certificates])
    out.append(o)
print(json.dumps(out))
"#;
        let parsed = crate::atlas::sagan(script, &Value::Array(docs));
        let (h, s, a) = (&parsed[0], &parsed[1], &parsed[2]);

        assert_eq!(h["class"], "HttpResult");
        assert_eq!(
            (h["is_error"].as_bool(), h["is_malformed"].as_bool()),
            (Some(false), Some(false))
        );
        assert_eq!(h["uri"], "https://localhost:8443/");
        assert_eq!(
            (h["method"].as_str(), h["code"].as_u64()),
            (Some("GET"), Some(200))
        );
        assert_eq!(
            (h["version"].as_str(), h["af"].as_u64()),
            (Some("2"), Some(4))
        );
        assert_eq!(
            (h["body_size"].as_u64(), h["head_size"].as_u64()),
            (Some(5), Some(38))
        );
        assert_eq!(h["rt"], 5.5);
        assert_eq!(
            (h["dst"].as_str(), h["src"].as_str()),
            (Some("127.0.0.1"), Some("127.0.0.1"))
        );
        assert_eq!(h["probe_id"], crate::atlas::numeric_id("agent-1"));

        assert_eq!(s["class"], "SslResult");
        assert_eq!(
            (s["is_error"].as_bool(), s["is_malformed"].as_bool()),
            (Some(false), Some(false))
        );
        assert_eq!(
            (s["af"].as_u64(), s["port"].as_u64()),
            (Some(6), Some(8443))
        );
        assert_eq!(
            (s["name"].as_str(), s["dst"].as_str()),
            (Some("localhost"), Some("::1"))
        );
        assert_eq!(
            (s["method"].as_str(), s["version"].as_str()),
            (Some("TLS"), Some("1.3"))
        );
        assert_eq!(
            (s["ttc"].as_f64(), s["rt"].as_f64()),
            (Some(0.5), Some(2.75))
        );
        assert_eq!(s["n"], 2);
        assert_eq!(s["cn"], json!(["sagan leaf", "sagan intermediate"]));
        assert_eq!(s["issuer"], json!(["sagan leaf", "sagan intermediate"]));
        assert_eq!(s["sha256"][0].as_str(), Some(sha.as_str()));
        assert_eq!(
            s["sha256"][0].as_str(),
            t.tls.chain[0].sha256.as_str().into()
        );

        assert_eq!(
            (a["is_error"].as_bool(), a["alert"].as_str()),
            (Some(true), Some("handshake_failure"))
        );
        assert_eq!(a["n"], 0);
    }
}
