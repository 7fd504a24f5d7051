//! Every module result in the golden files (most captured from real runs) has a one-line
//! summary that names what was measured and how it went, with no JSON left in it.

use std::path::Path;

use imn_proto::results::{ModuleOutcome, ModuleOutput};
use imn_proto::wire::{Envelope, RecordBody};
use serde_json::Value;

fn golden_results() -> Vec<(String, ModuleOutcome)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut out = Vec::new();
    for f in std::fs::read_dir(&dir).expect("golden files") {
        let path = f.unwrap().path();
        let file: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let env: Envelope = serde_json::from_value(file["value"].clone())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Envelope::Batch(b) = env {
            for r in b.records {
                let result = match r.body {
                    RecordBody::Result(m) | RecordBody::TracedResult(m, _) => m,
                    RecordBody::ScheduledResult(run) => run.result,
                    _ => continue,
                };
                out.push((
                    path.file_name().unwrap().to_string_lossy().into_owned(),
                    result.outcome,
                ));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn every_result_has_a_readable_summary() {
    let results = golden_results();
    assert!(results.len() > 50, "{} results", results.len());
    let mut kinds = std::collections::HashSet::new();
    for (file, outcome) in &results {
        let line = outcome.summary();
        println!("{file}: {line}");
        assert!(!line.trim().is_empty(), "{file}: empty summary");
        assert!(!line.contains('\n'), "{file}: more than one line: {line}");
        for junk in ["null", "{\"", "?:", "Some(", "HTTP/HTTP", ";  "] {
            assert!(!line.contains(junk), "{file}: {junk:?} in {line:?}");
        }
        let ModuleOutcome::Ok(out) = outcome else {
            continue;
        };
        // The API's JSON of the result reads back as the same output (what the CLI
        // summarizes).
        let module = match out {
            ModuleOutput::Echo(_) => "echo_module",
            ModuleOutput::Ping(_) => "ping_module",
            ModuleOutput::Tcping(_) => "tcping",
            ModuleOutput::Faulty(_) => "faulty_module",
            ModuleOutput::Heartbeat(_) => "heartbeat",
            ModuleOutput::Traceroute(_) => "traceroute",
            ModuleOutput::Mtr(_) => "mtr",
            ModuleOutput::Dns(_) => "dns",
            ModuleOutput::Http(_) => "http",
            ModuleOutput::TlsCert(_) => "tls_cert",
            ModuleOutput::Ntp(_) => "ntp",
            // Not a catalog module: its summary is tested in `imn_proto::wasm`.
            ModuleOutput::Wasm(_) => continue,
        };
        assert!(
            imn_proto::catalog::find(module).is_some(),
            "{module} is a catalog name"
        );
        assert_eq!(
            ModuleOutput::from_api_json(module, &out.to_json()).as_ref(),
            Some(out),
            "{file}: {module} round trip through the API's JSON"
        );
        // Each names its target and how it went.
        let ok = match out {
            ModuleOutput::Echo(r) => line == r.message,
            ModuleOutput::Faulty(r) => line.starts_with(&r.message),
            ModuleOutput::Ping(r) => r.targets.iter().all(|t| line.contains(&t.addr)),
            ModuleOutput::Tcping(r) => {
                line.starts_with(&format!("{}:{} {}/{} open", r.addr, r.port, r.open, r.sent))
                    && (r.open > 0 || line.ends_with(')'))
            }
            ModuleOutput::Heartbeat(_) => line.starts_with("up "),
            ModuleOutput::Traceroute(r) => {
                line.starts_with(&r.dst_addr) && line.contains(&r.stop_reason)
            }
            ModuleOutput::Mtr(r) => line.starts_with(&r.dst_addr),
            ModuleOutput::Dns(r) => {
                line.starts_with(&format!("{} {}", r.qname, r.qtype))
                    && match (&r.error, r.message()) {
                        (Some(e), _) => line.contains(&e.message),
                        (None, Some(m)) => line.contains(&m.rcode_name),
                        (None, None) => true,
                    }
            }
            ModuleOutput::Http(r) => {
                line.contains(&r.url)
                    && match (&r.error, &r.response) {
                        (Some(e), _) => line.contains(e.as_str()),
                        (None, Some(resp)) => {
                            line.contains(&format!(" {} {},", resp.status, resp.http_version))
                        }
                        (None, None) => true,
                    }
            }
            ModuleOutput::TlsCert(r) => line.starts_with(&format!("{}:{}", r.host, r.port)),
            ModuleOutput::Wasm(_) => unreachable!("skipped above"),
            ModuleOutput::Ntp(r) => {
                line.starts_with(&format!("{}:{} {}/{}", r.addr, r.port, r.received, r.sent))
            }
        };
        assert!(ok, "{file}: {line:?}");
        kinds.insert(std::mem::discriminant(out));
    }
    assert_eq!(kinds.len(), 11, "every module's summary was seen");
}
