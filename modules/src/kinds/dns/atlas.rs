//! Atlas `dns` results (the format RIPE Atlas's tdig writes, as ripe.atlas.sagan's
//! `DnsResult` reads it): one result per query, with the raw answer as base64 `abuf`,
//! the response time `rt` in ms, the header's id and section counts, and the query as
//! `qbuf`. A query that got no answer has `error: {"timeout": ms}` instead of `result`;
//! one the network refused has `error: {"socket": text}`.

use serde_json::{json, Value};

use crate::atlas::round3;
use crate::atlas::AtlasRow;

/// The Atlas `dns` result of a stored result; None if it has none.
pub fn dns(r: &AtlasRow) -> Option<Vec<Value>> {
    if r.module != "dns" {
        return None;
    }
    let res = r.result.as_object()?;
    let server = res.get("server")?.as_str()?;
    let af = if server.contains(':') { 6 } else { 4 };
    let proto = match res.get("protocol").and_then(Value::as_str) {
        Some("tcp") => "TCP",
        _ => "UDP",
    };
    let src = res.get("src_addr").cloned().unwrap_or(Value::Null);
    let port = res.get("port").and_then(Value::as_u64).unwrap_or(53);
    let mut v = json!({
        "af": af,
        "dst_addr": server,
        // Atlas writes the port as a string.
        "dst_port": port.to_string(),
        "src_addr": src,
        "from": src,
        "proto": proto,
        "msm_name": "Tdig",
        "qbuf": res.get("qbuf").cloned().unwrap_or(Value::Null),
    });
    let o = v.as_object_mut()?;
    match res.get("reply").filter(|x| x.is_object()) {
        Some(reply) => {
            let mut result = json!({
                "rt": reply["rt_ms"].as_f64().map(round3),
                "size": reply["size"],
                "abuf": reply["abuf"],
            });
            // A malformed answer has no parsed header: Atlas then gives only the abuf.
            if let (Some(m), Some(out)) = (
                reply.get("message").filter(|m| m.is_object()),
                result.as_object_mut(),
            ) {
                out.insert("ID".into(), m["id"].clone());
                out.insert("QDCOUNT".into(), m["qdcount"].clone());
                out.insert("ANCOUNT".into(), m["ancount"].clone());
                out.insert("NSCOUNT".into(), m["nscount"].clone());
                out.insert("ARCOUNT".into(), m["arcount"].clone());
            }
            o.insert("result".into(), result);
        }
        None => {
            let error = match res.get("error").map(|e| (&e["kind"], &e["message"])) {
                Some((k, msg)) if k == "network" => json!({"socket": msg}),
                _ => json!({"timeout": res.get("timeout_ms").cloned().unwrap_or(json!(0))}),
            };
            o.insert("error".into(), error);
        }
    }
    let meta = crate::atlas::Meta::of(r);
    meta.fill(r, "dns", &mut v);
    Some(vec![v])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(result: Value) -> AtlasRow<'static> {
        crate::atlas::test_row("dns", result)
    }

    fn fixture(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn an_answer_has_abuf_rt_and_the_header() {
        let native = fixture(WWW_A_UDP);
        // The fixture is a real module result: it deserializes into the typed result.
        let typed: crate::kinds::dns::DnsResult = serde_json::from_value(native.clone()).unwrap();
        let m = typed.message().unwrap();
        let a = &dns(&row(native.clone())).unwrap()[0];
        assert_eq!(a["type"], "dns");
        assert_eq!(a["af"], 4);
        assert_eq!(a["dst_addr"], "127.0.0.1");
        assert_eq!(a["dst_port"], typed.port.to_string());
        assert_eq!(
            (a["src_addr"].as_str(), a["from"].as_str()),
            (Some("127.0.0.1"), Some("127.0.0.1"))
        );
        assert_eq!(a["proto"], "UDP");
        assert_eq!(a["qbuf"], native["qbuf"]);
        let res = &a["result"];
        let reply = typed.reply.as_ref().unwrap();
        assert_eq!(res["rt"].as_f64(), Some(round3(reply.rt_ms)));
        assert_eq!(res["size"], reply.size);
        assert_eq!(res["abuf"], reply.abuf.as_str());
        assert_eq!(res["ID"], m.id);
        assert_eq!(
            (
                res["QDCOUNT"].as_u64(),
                res["ANCOUNT"].as_u64(),
                res["NSCOUNT"].as_u64(),
                res["ARCOUNT"].as_u64()
            ),
            (Some(1), Some(2), Some(1), Some(1))
        );
        assert!(a.get("error").is_none());
        assert_eq!(a["timestamp"], 1_700_000_000);
        assert_eq!(a["msm_id"], crate::atlas::numeric_id("req"));
        let tcp = &dns(&row(fixture(MX_TCP))).unwrap()[0];
        assert_eq!(tcp["proto"], "TCP");
    }

    #[test]
    fn timeouts_refusals_and_junk() {
        let mut t = fixture(WWW_A_UDP);
        t["reply"] = Value::Null;
        t["timeout_ms"] = json!(300);
        t["error"] = json!({"kind": "timeout", "message": "no answer"});
        let a = &dns(&row(t.clone())).unwrap()[0];
        assert_eq!(a["error"], json!({"timeout": 300}));
        assert!(a.get("result").is_none());
        t["error"] = json!({"kind": "network", "message": "refused"});
        t["src_addr"] = Value::Null;
        let a = &dns(&row(t)).unwrap()[0];
        assert_eq!(a["error"], json!({"socket": "refused"}));
        assert!(a["src_addr"].is_null());
        // A malformed answer: the abuf, no header fields.
        let mut j = fixture(WWW_A_UDP);
        j["reply"]["message"] = Value::Null;
        j["error"] = json!({"kind": "malformed", "message": "message ends early"});
        let a = &dns(&row(j)).unwrap()[0];
        assert!(a["result"]["abuf"].is_string());
        assert!(a["result"].get("ID").is_none());
        // Not ours, or no result.
        let mut other = row(fixture(WWW_A_UDP));
        other.module = "ping_module".into();
        assert!(dns(&other).is_none());
        assert!(dns(&row(Value::Null)).is_none());
    }

    /// Reads Atlas results on stdin with ripe.atlas.sagan and prints what it decoded.
    const SAGAN: &str = r#"
import json, sys
from ripe.atlas.sagan.dns import DnsResult
out = []
for d in json.load(sys.stdin):
    r = DnsResult(d, on_error=DnsResult.ACTION_IGNORE, on_malformation=DnsResult.ACTION_IGNORE)
    o = {"error": r.error_message, "malformed": r.is_malformed, "msm": r.measurement_id,
         "probe": r.probe_id, "created": int(r.created.timestamp()), "responses": []}
    for resp in r.responses:
        x = {"rt": resp.response_time, "size": resp.response_size, "proto": resp.protocol,
             "dst": resp.destination_address, "src": resp.source_address, "af": resp.af}
        if resp.abuf:
            h = resp.abuf.header
            def rec(a):
                return {"name": a.name, "type": a.type, "ttl": a.ttl,
                        "address": getattr(a, "address", None), "target": getattr(a, "target", None),
                        "preference": getattr(a, "preference", None),
                        "exchange": getattr(a, "mail_exchanger", None),
                        "serial": getattr(a, "serial", None)}
            x["id"] = h.id
            x["rcode"] = h.return_code
            x["answers"] = [rec(a) for a in resp.abuf.answers]
            x["authorities"] = [rec(a) for a in resp.abuf.authorities]
            x["edns_udp_size"] = resp.abuf.edns0.udp_size if resp.abuf.edns0 else None
        if resp.qbuf:
            x["qname"] = resp.qbuf.questions[0].name
        o["responses"].append(x)
    out.append(o)
print(json.dumps(out))
"#;

    fn sagan(results: &[Value]) -> Vec<Value> {
        serde_json::from_value(crate::atlas::sagan(SAGAN, &Value::Array(results.to_vec()))).unwrap()
    }

    /// What sagan decoded from the abuf is what the module parsed from the same bytes.
    fn same_records(ours: &[Value], theirs: &Value) {
        let theirs = theirs.as_array().unwrap();
        assert_eq!(ours.len(), theirs.len());
        for (o, t) in ours.iter().zip(theirs) {
            assert_eq!(o["name"], t["name"]);
            assert_eq!(o["type"], t["type"]);
            assert_eq!(o["ttl"], t["ttl"]);
            let d = &o["data"];
            match o["type"].as_str().unwrap() {
                "A" | "AAAA" => assert_eq!(
                    d[o["type"].as_str().unwrap().to_lowercase()]["address"],
                    t["address"]
                ),
                "CNAME" | "NS" => assert_eq!(d["name"]["target"], t["target"]),
                "MX" => {
                    assert_eq!(d["mx"]["preference"], t["preference"]);
                    assert_eq!(d["mx"]["exchange"], t["exchange"]);
                }
                "SOA" => assert_eq!(d["soa"]["serial"], t["serial"]),
                other => panic!("no check for {other}"),
            }
        }
    }

    #[test]
    fn sagan_parses_ours_and_decodes_the_same_answers() {
        let natives = [fixture(WWW_A_UDP), fixture(MX_TCP), fixture(NXDOMAIN_UDP)];
        let mut atlas: Vec<Value> = natives
            .iter()
            .map(|n| dns(&row(n.clone())).unwrap().remove(0))
            .collect();
        let mut timeout = natives[0].clone();
        timeout["reply"] = Value::Null;
        timeout["timeout_ms"] = json!(300);
        timeout["error"] = json!({"kind": "timeout", "message": "no answer"});
        atlas.push(dns(&row(timeout)).unwrap().remove(0));
        let parsed = sagan(&atlas);
        assert_eq!(parsed.len(), 4);
        for (i, native) in natives.iter().enumerate() {
            let p = &parsed[i];
            let m = &native["reply"]["message"];
            assert_eq!(p["malformed"], false, "{p}");
            assert_eq!(p["msm"], atlas[i]["msm_id"]);
            assert_eq!(p["probe"], atlas[i]["prb_id"]);
            assert_eq!(p["created"], 1_700_000_000);
            let resp = &p["responses"][0];
            assert_eq!(resp["rt"], atlas[i]["result"]["rt"]);
            assert_eq!(resp["size"], native["reply"]["size"]);
            assert_eq!(resp["dst"], "127.0.0.1");
            assert_eq!(resp["src"], "127.0.0.1");
            assert_eq!(resp["af"], 4);
            assert_eq!(
                resp["proto"],
                if native["protocol"] == "tcp" {
                    "TCP"
                } else {
                    "UDP"
                }
            );
            assert_eq!(resp["id"], m["id"]);
            assert_eq!(resp["rcode"], m["rcode_name"]);
            assert_eq!(resp["qname"], native["qname"]);
            assert_eq!(resp["edns_udp_size"], m["edns"]["udp_size"]);
            same_records(m["answer"].as_array().unwrap(), &resp["answers"]);
            same_records(m["authority"].as_array().unwrap(), &resp["authorities"]);
        }
        // NOERROR answers are no error to sagan; NXDOMAIN is.
        assert!(parsed[0]["error"].is_null(), "{}", parsed[0]);
        assert_eq!(parsed[2]["responses"][0]["rcode"], "NXDOMAIN");
        assert_eq!(
            parsed[2]["responses"][0]["authorities"][0]["serial"],
            2024010101
        );
        assert_eq!(parsed[3]["error"], "Timeout: 300");
        assert_eq!(parsed[3]["responses"], json!([]));
    }

    /// Captured from the module against dnsmasq (modules/tests/dns.rs).
    const WWW_A_UDP: &str = r#"{"server":"127.0.0.1","port":46947,"server_source":"params","src_addr":"127.0.0.1","protocol":"udp","tcp_after_truncation":false,"qname":"www.test.","qtype":"A","qclass":"IN","qbuf":"3x0BAAABAAAAAAABA3d3dwR0ZXN0AAABAAEAACkE0AAAAAAAAA==","attempts":1,"timeout_ms":3000,"error":null,"reply":{"rt_ms":0.227035,"tcp_connect_ms":null,"size":98,"abuf":"3x2FAAABAAIAAQABA3d3dwR0ZXN0AAABAAHADAAFAAEAAAEsAAgBYQR0ZXN0AMAmAAEAAQAAASwABMAAAgEEdGVzdAAAAgABAAABLAAJAm5zBHRlc3QAAAApBNAAAAAAAAA=","message":{"id":57117,"opcode":0,"rcode":0,"rcode_name":"NOERROR","flags":{"qr":true,"aa":true,"tc":false,"rd":true,"ra":false,"z":false,"ad":false,"cd":false},"qdcount":1,"ancount":2,"nscount":1,"arcount":1,"question":[{"name":"www.test.","type":"A","class":"IN"}],"answer":[{"name":"www.test.","type":"CNAME","type_code":5,"class":"IN","ttl":300,"rdlength":8,"rdata":"a.test.","data":{"name":{"target":"a.test."}}},{"name":"a.test.","type":"A","type_code":1,"class":"IN","ttl":300,"rdlength":4,"rdata":"192.0.2.1","data":{"a":{"address":"192.0.2.1"}}}],"authority":[{"name":"test.","type":"NS","type_code":2,"class":"IN","ttl":300,"rdlength":9,"rdata":"ns.test.","data":{"name":{"target":"ns.test."}}}],"additional":[],"edns":{"udp_size":1232,"version":0,"ext_rcode":0,"do":false,"nsid_hex":null,"nsid":null,"options":[]}}}}"#;

    /// Captured from the module against dnsmasq (modules/tests/dns.rs).
    const MX_TCP: &str = r#"{"server":"127.0.0.1","port":46947,"server_source":"params","src_addr":"127.0.0.1","protocol":"tcp","tcp_after_truncation":false,"qname":"test.","qtype":"MX","qclass":"IN","qbuf":"4XMBAAABAAAAAAABBHRlc3QAAA8AAQAAKQTQAAAAAAAA","attempts":1,"timeout_ms":3000,"error":null,"reply":{"rt_ms":0.169108,"tcp_connect_ms":1.061912,"size":89,"abuf":"4XOFAAABAAEAAQABBHRlc3QAAA8AAcAMAA8AAQAAASwADQAKBG1haWwEdGVzdAAEdGVzdAAAAgABAAABLAAJAm5zBHRlc3QAAAApBNAAAAAAAAYADwACABE=","message":{"id":57715,"opcode":0,"rcode":0,"rcode_name":"NOERROR","flags":{"qr":true,"aa":true,"tc":false,"rd":true,"ra":false,"z":false,"ad":false,"cd":false},"qdcount":1,"ancount":1,"nscount":1,"arcount":1,"question":[{"name":"test.","type":"MX","class":"IN"}],"answer":[{"name":"test.","type":"MX","type_code":15,"class":"IN","ttl":300,"rdlength":13,"rdata":"10 mail.test.","data":{"mx":{"preference":10,"exchange":"mail.test."}}}],"authority":[{"name":"test.","type":"NS","type_code":2,"class":"IN","ttl":300,"rdlength":9,"rdata":"ns.test.","data":{"name":{"target":"ns.test."}}}],"additional":[],"edns":{"udp_size":1232,"version":0,"ext_rcode":0,"do":false,"nsid_hex":null,"nsid":null,"options":[{"code":15,"name":"EDE","data_hex":"0011"}]}}}}"#;

    /// Captured from the module against dnsmasq (modules/tests/dns.rs).
    const NXDOMAIN_UDP: &str = r#"{"server":"127.0.0.1","port":46947,"server_source":"params","src_addr":"127.0.0.1","protocol":"udp","tcp_after_truncation":false,"qname":"nothing.test.","qtype":"A","qclass":"IN","qbuf":"DS0BAAABAAAAAAABB25vdGhpbmcEdGVzdAAAAQABAAApBNAAAAAAAAA=","attempts":1,"timeout_ms":3000,"error":null,"reply":{"rt_ms":0.103123,"tcp_connect_ms":null,"size":103,"abuf":"DS2FAwABAAAAAQABB25vdGhpbmcEdGVzdAAAAQABBHRlc3QAAAYAAQAAASwALgJucwR0ZXN0AApob3N0bWFzdGVyBHRlc3QAeKPxdQAABLAAAAB4AAk6gAAAASwAACkE0AAAAAAAAA==","message":{"id":3373,"opcode":0,"rcode":3,"rcode_name":"NXDOMAIN","flags":{"qr":true,"aa":true,"tc":false,"rd":true,"ra":false,"z":false,"ad":false,"cd":false},"qdcount":1,"ancount":0,"nscount":1,"arcount":1,"question":[{"name":"nothing.test.","type":"A","class":"IN"}],"answer":[],"authority":[{"name":"test.","type":"SOA","type_code":6,"class":"IN","ttl":300,"rdlength":46,"rdata":"ns.test. hostmaster.test. 2024010101 1200 120 604800 300","data":{"soa":{"mname":"ns.test.","rname":"hostmaster.test.","serial":2024010101,"refresh":1200,"retry":120,"expire":604800,"minimum":300}}}],"additional":[],"edns":{"udp_size":1232,"version":0,"ext_rcode":0,"do":false,"nsid_hex":null,"nsid":null,"options":[]}}}}"#;
}
