//! The `imn` client's fleet commands: `agents`, `measure`, `results`, `watch` and
//! `status`. Each prints a table for people, or JSON with `--json` for scripts, and
//! talks to the REST API only (the same one the dashboard and other clients use).

use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::client::{Client, ClientError};

/// A selection from `tag:lte,country:DE,asn:3320,id:edge-1,limit:5` or `all`; several
/// `tag:`/`id:` items add up.
pub fn parse_selection(s: &str) -> Result<Value, String> {
    let mut sel = Map::new();
    let (mut tags, mut ids) = (Vec::new(), Vec::new());
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        if item == "all" {
            sel.insert("all".into(), json!(true));
            continue;
        }
        let (k, v) = item.split_once(':').ok_or_else(|| {
            format!("--agents: {item:?} is not KEY:VALUE (tag, id, country, asn, limit) or all")
        })?;
        match k {
            "tag" => tags.push(v.to_string()),
            "id" => ids.push(v.to_string()),
            "country" => {
                sel.insert("country".into(), json!(v));
            }
            "asn" | "limit" => {
                let n: u64 = v
                    .parse()
                    .map_err(|_| format!("--agents: {k} must be a number (got {v:?})"))?;
                sel.insert(k.into(), json!(n));
            }
            _ => {
                return Err(format!(
                    "--agents: unknown key {k:?} (tag, id, country, asn, limit, all)"
                ))
            }
        }
    }
    if !tags.is_empty() {
        sel.insert("tags".into(), json!(tags));
    }
    if !ids.is_empty() {
        sel.insert("ids".into(), json!(ids));
    }
    if sel.is_empty() {
        return Err("--agents: name some agents, e.g. tag:lte,country:DE or all".into());
    }
    Ok(Value::Object(sel))
}

/// Seconds from `90`, `30s`, `5m`, `2h` or `1d`.
pub fn parse_duration(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let mult = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => return Err(format!("{s:?}: the unit must be ms, s, m, h or d")),
    };
    match num.parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 => Ok(n * mult),
        _ => Err(format!("{s:?}: not a positive duration such as 30s or 5m")),
    }
}

/// `KEY=VALUE`; the value is JSON when it parses as JSON (`count=3`, `ttl=64`), else a
/// string.
pub fn parse_param(s: &str) -> Result<(String, Value), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("--param {s:?}: write KEY=VALUE"))?;
    let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
    Ok((k.to_string(), v))
}

/// Which parameter a module's TARGET fills.
fn target_param(module: &str) -> &'static str {
    match module {
        "echo_module" | "faulty_module" => "message",
        _ => "host",
    }
}

/// `imn measure`.
#[derive(Debug, Clone)]
pub struct Measure {
    pub module: String,
    pub target: Option<String>,
    pub agents: String,
    pub count: Option<u32>,
    pub every: Option<String>,
    pub params: Vec<String>,
    pub timeout: String,
    pub json: bool,
}

/// One result as a short human line: the module's own summary
/// (`imn_proto::results::ModuleOutput::summary`), or the error for a failure. A result
/// that does not read as its module's type (a backend of another version) falls back
/// to the fields most results share.
pub fn summarize(r: &Value) -> String {
    if let Some(e) = r["error"].as_str() {
        return imn_proto::summary::tidy(e.to_string());
    }
    let res = &r["result"];
    if let Some(out) = r["module"]
        .as_str()
        .and_then(|m| imn_proto::results::ModuleOutput::from_api_json(m, res))
    {
        return out.summary();
    }
    let ms = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.3}"));
    if let Some(targets) = res["targets"].as_array() {
        return targets
            .iter()
            .map(|t| {
                format!(
                    "{} {}/{} received, loss {}%, min/avg/max {}/{}/{} ms",
                    t["addr"].as_str().unwrap_or("?"),
                    t["received"],
                    t["sent"],
                    t["loss_pct"],
                    ms(&t["min_ms"]),
                    ms(&t["avg_ms"]),
                    ms(&t["max_ms"])
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
    }
    if res.get("attempts").is_some() {
        return format!(
            "{}:{} {}/{} open, avg {} ms",
            res["addr"].as_str().unwrap_or("?"),
            res["port"],
            res["open"],
            res["sent"],
            ms(&res["avg_ms"])
        );
    }
    if let Some(m) = res["message"].as_str() {
        return m.to_string();
    }
    res.to_string()
}

/// Prints rows under a header, each column as wide as its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Agents asked for per page by `imn agents`.
const CLI_AGENTS_PAGE: usize = 10_000;

/// `imn agents [--alive] [--tag T]`.
pub async fn agents(
    c: &Client,
    alive: bool,
    tags: &[String],
    json_out: bool,
) -> Result<String, ClientError> {
    let mut q = Vec::new();
    if alive {
        q.push("alive=true".to_string());
    }
    if !tags.is_empty() {
        q.push(format!("tag={}", tags.join(",")));
    }
    // Every page (the API answers a page at a time, by id).
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut page_q = q.clone();
        page_q.push(format!("limit={CLI_AGENTS_PAGE}"));
        if let Some(a) = &after {
            page_q.push(format!(
                "after={}",
                form_urlencoded::byte_serialize(a.as_bytes()).collect::<String>()
            ));
        }
        let page = c.get(&format!("/agents?{}", page_q.join("&"))).await?;
        let items = page.as_array().cloned().unwrap_or_default();
        let full = items.len() == CLI_AGENTS_PAGE;
        after = items
            .last()
            .and_then(|a| a["id"].as_str())
            .map(String::from);
        all.extend(items);
        if !full || after.is_none() {
            break;
        }
    }
    let list = Value::Array(all);
    if json_out {
        return Ok(serde_json::to_string_pretty(&list).unwrap_or_default() + "\n");
    }
    let rows: Vec<Vec<String>> = list
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|a| {
            let loc = &a["location"];
            let place = [&loc["country"], &loc["city"]]
                .iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(" ");
            vec![
                s(&a["id"]),
                if a["alive"] == json!(true) {
                    "alive"
                } else {
                    "offline"
                }
                .into(),
                s(&a["last_seen"]),
                s(&a["version"]),
                s(&a["arch"]),
                a["tags"]
                    .as_array()
                    .map(|t| t.iter().map(s).collect::<Vec<_>>().join(","))
                    .unwrap_or_default(),
                if place.is_empty() { "-".into() } else { place },
                s(&a["outbox"]["depth"]),
                s(&a["outbox"]["dropped"]),
            ]
        })
        .collect();
    Ok(table(
        &[
            "AGENT",
            "STATUS",
            "LAST SEEN",
            "VERSION",
            "ARCH",
            "TAGS",
            "LOCATION",
            "OUTBOX",
            "DROPPED",
        ],
        &rows,
    ))
}

/// What `imn measure` ends with: the output, and whether every agent reported.
pub struct Measured {
    pub output: String,
    pub complete: bool,
}

/// `imn measure MODULE TARGET`: creates the measurement, shows progress on stderr
/// until every agent reported or passed the timeout (its deadline), then the results.
/// With `--every`, creates a recurring measurement and prints its id.
pub async fn measure(c: &Client, m: &Measure) -> Result<Measured, anyhow::Error> {
    let mut params = Map::new();
    if let Some(t) = &m.target {
        params.insert(target_param(&m.module).into(), json!(t));
    }
    if let Some(n) = m.count {
        params.insert("count".into(), json!(n));
    }
    for p in &m.params {
        let (k, v) = parse_param(p).map_err(anyhow::Error::msg)?;
        params.insert(k, v);
    }
    let timeout_s = parse_duration(&m.timeout).map_err(|e| anyhow::anyhow!("--timeout {e}"))?;
    let mut body = json!({
        "module": m.module,
        "params": params,
        "agents": parse_selection(&m.agents).map_err(anyhow::Error::msg)?,
    });
    if let Some(every) = &m.every {
        let interval = parse_duration(every).map_err(|e| anyhow::anyhow!("--every {e}"))?;
        body["schedule"] = json!({"interval_s": interval});
    } else {
        body["deadline_s"] = json!(timeout_s);
    }
    let created = c.post("/v1/measurements", body).await?;
    let id = created["id"].as_str().unwrap_or_default().to_string();
    for r in created["refused"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        eprintln!("{}: refused: {}", s(&r["agent_id"]), s(&r["error"]));
    }
    if m.every.is_some() {
        let output = if m.json {
            serde_json::to_string_pretty(&created)? + "\n"
        } else {
            format!(
                "recurring measurement {id} on {} agents; stop it with DELETE /v1/measurements/{id}, watch it with `imn watch --measurement {id}`\n",
                created["agents"].as_array().map_or(0, Vec::len)
            )
        };
        return Ok(Measured {
            output,
            complete: true,
        });
    }
    eprintln!("measurement {id}");
    // The agents' deadline is the timeout: past it the backend expires what is
    // missing and the measurement completes. A little slack for that sweep.
    let give_up = Instant::now() + Duration::from_secs_f64(timeout_s + 10.0);
    let mut last = String::new();
    let status = loop {
        let st = c.get(&format!("/v1/measurements/{id}")).await?;
        let summary = s(&st["progress"]["summary"]);
        if summary != last {
            eprintln!("{summary}");
            last = summary;
        }
        if st["state"] == json!("complete") || Instant::now() > give_up {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let complete = status["state"] == json!("complete")
        && status["progress"]["reported"] == status["progress"]["agents"];
    let output = if m.json {
        serde_json::to_string_pretty(&status)? + "\n"
    } else {
        let rows: Vec<Vec<String>> = status["agents"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|a| {
                let detail = if a["result"].is_null() && a["error"].is_null() {
                    "-".to_string()
                } else {
                    summarize(a)
                };
                vec![s(&a["agent_id"]), s(&a["state"]), detail]
            })
            .collect();
        table(&["AGENT", "STATE", "RESULT"], &rows)
    };
    Ok(Measured { output, complete })
}

/// `imn results` filters (the API's).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub agent: Option<String>,
    pub module: Option<String>,
    pub measurement: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
}

impl Filter {
    fn query(&self) -> String {
        let mut q = Vec::new();
        for (k, v) in [
            ("agent", &self.agent),
            ("module", &self.module),
            ("measurement", &self.measurement),
            ("since", &self.since),
            ("until", &self.until),
        ] {
            if let Some(v) = v {
                q.push(format!("{k}={}", url_escape(v)));
            }
        }
        q.join("&")
    }
}

/// Percent-encodes what a query value may not hold as is.
fn url_escape(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn result_row(r: &Value) -> Vec<String> {
    vec![
        s(&r["started_at"]),
        s(&r["agent_id"]),
        s(&r["module"]),
        s(&r["state"]),
        summarize(r),
    ]
}

const RESULT_HEADER: [&str; 5] = ["STARTED", "AGENT", "MODULE", "STATE", "RESULT"];

/// `imn results`: up to `limit` results in stored order, following the cursor.
pub async fn results(
    c: &Client,
    f: &Filter,
    limit: usize,
    json_out: bool,
) -> Result<String, ClientError> {
    let mut got: Vec<Value> = Vec::new();
    let mut cursor = String::new();
    while got.len() < limit {
        let page_size = (limit - got.len()).min(1000);
        let page = c
            .get(&format!(
                "/v1/results?{}&limit={page_size}&cursor={cursor}",
                f.query()
            ))
            .await?;
        got.extend(page["results"].as_array().cloned().unwrap_or_default());
        cursor = s(&page["next_cursor"]);
        if page["more"] != json!(true) {
            break;
        }
    }
    if json_out {
        return Ok(serde_json::to_string_pretty(&got).unwrap_or_default() + "\n");
    }
    let rows: Vec<Vec<String>> = got.iter().map(result_row).collect();
    Ok(table(&RESULT_HEADER, &rows))
}

/// `imn watch`: results as they are stored, one line each (or one JSON object per
/// line), until `count` results if given. A dropped stream is resumed from the last
/// event id, so nothing is missed or repeated.
pub async fn watch(
    c: &Client,
    f: &Filter,
    count: Option<usize>,
    json_out: bool,
    mut emit: impl FnMut(&str),
) -> Result<(), ClientError> {
    let path = match &f.measurement {
        Some(m) => format!("/v1/measurements/{m}/stream"),
        None => format!("/v1/results/stream?{}", f.query()),
    };
    let mut last_id: Option<String> = None;
    let mut seen = 0usize;
    if !json_out {
        emit(&table(&RESULT_HEADER, &[]));
    }
    loop {
        let mut resp = match c.stream(&path, last_id.as_deref()).await {
            Ok(r) => r,
            Err(e @ ClientError::Api { .. }) => return Err(e),
            Err(e) => {
                eprintln!("imn watch: {e}; reconnecting");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut buf = String::new();
        let (mut id, mut data) = (None::<String>, String::new());
        loop {
            let chunk = match resp.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) | Err(_) => break,
            };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(nl) = buf.find('\n') {
                let line = buf[..nl].trim_end_matches('\r').to_string();
                buf.drain(..=nl);
                if line.is_empty() {
                    // The end of an event.
                    if let Ok(r) = serde_json::from_str::<Value>(&data) {
                        if json_out {
                            emit(&format!("{r}\n"));
                        } else {
                            let row = table(&RESULT_HEADER, &[result_row(&r)]);
                            emit(row.lines().nth(1).unwrap_or_default());
                            emit("\n");
                        }
                        seen += 1;
                        if id.is_some() {
                            last_id = id.take();
                        }
                        if count.is_some_and(|n| seen >= n) {
                            return Ok(());
                        }
                    }
                    data.clear();
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
        }
        eprintln!("imn watch: the stream ended; resuming");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `imn status ID`: a request's state and transitions, or a measurement's progress.
pub async fn status(c: &Client, id: &str, json_out: bool) -> Result<String, ClientError> {
    let (kind, v) = match c.get(&format!("/modules/states/{id}")).await {
        Ok(v) => ("request", v),
        Err(ClientError::Api { status: 404, .. }) => (
            "measurement",
            c.get(&format!("/v1/measurements/{id}")).await?,
        ),
        Err(e) => return Err(e),
    };
    if json_out {
        return Ok(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n");
    }
    if kind == "measurement" {
        return Ok(format!(
            "measurement {id}: {} ({})\n",
            s(&v["state"]),
            s(&v["progress"]["summary"])
        ));
    }
    let rows: Vec<Vec<String>> = v["transitions"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|t| {
            vec![
                s(&t["at"]),
                s(&t["state"]),
                s(&t["observer"]),
                s(&t["detail"]),
            ]
        })
        .collect();
    Ok(format!(
        "request {id}: {} on {} ({})\n{}",
        s(&v["state"]),
        s(&v["agent_id"]),
        s(&v["module"]),
        table(&["AT", "STATE", "BY", "DETAIL"], &rows)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selections_durations_and_params_parse_or_say_why_not() {
        assert_eq!(
            parse_selection("tag:lte,country:DE,tag:lab,limit:5").unwrap(),
            json!({"tags": ["lte", "lab"], "country": "DE", "limit": 5})
        );
        assert_eq!(parse_selection("all").unwrap(), json!({"all": true}));
        assert_eq!(
            parse_selection("id:a,id:b").unwrap(),
            json!({"ids": ["a", "b"]})
        );
        assert!(parse_selection("colour:red")
            .unwrap_err()
            .contains("colour"));
        assert!(parse_selection("asn:x").unwrap_err().contains("asn"));
        assert!(parse_selection("").is_err());
        assert_eq!(parse_duration("5m").unwrap(), 300.0);
        assert_eq!(parse_duration("90").unwrap(), 90.0);
        assert_eq!(parse_duration("1.5h").unwrap(), 5400.0);
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_param("count=3").unwrap(), ("count".into(), json!(3)));
        assert_eq!(
            parse_param("host=example").unwrap(),
            ("host".into(), json!("example"))
        );
        assert!(parse_param("nope").is_err());
    }

    #[test]
    fn tables_align_and_results_summarize() {
        let t = table(&["A", "LONG"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONG\nxyz  1\n");
        let ping = json!({"result": {"targets": [{"addr": "127.0.0.1", "sent": 3, "received": 3,
            "loss_pct": 0.0, "min_ms": 0.01, "avg_ms": 0.02, "max_ms": 0.03}]}});
        assert_eq!(
            summarize(&ping),
            "127.0.0.1 3/3 received, loss 0.0%, min/avg/max 0.010/0.020/0.030 ms"
        );
        assert_eq!(summarize(&json!({"error": "boom"})), "boom");
        assert_eq!(summarize(&json!({"result": {"message": "hi"}})), "hi");
    }

    /// A dns result, as the API returns it, printed as a line about the query: it used
    /// to print "?:53 null/null open" (taken for a tcping by its `attempts` field).
    #[test]
    fn a_dns_result_summarizes_as_dns() {
        use imn_proto::results::{ModuleOutcome, ModuleOutput};
        use imn_proto::wire::{Envelope, RecordBody};
        let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../modules/tests/golden/Batch.Result.Ok.Dns+aaaa.json");
        let file: Value = serde_json::from_slice(&std::fs::read(golden).unwrap()).unwrap();
        let Envelope::Batch(b) = serde_json::from_value(file["value"].clone()).unwrap() else {
            panic!("a batch");
        };
        let Some(RecordBody::Result(m)) = b.records.into_iter().next().map(|r| r.body) else {
            panic!("a result");
        };
        let ModuleOutcome::Ok(out @ ModuleOutput::Dns(_)) = m.outcome else {
            panic!("a dns output");
        };
        let line = summarize(&json!({"module": "dns", "result": out.to_json()}));
        assert_eq!(line, out.summary());
        assert!(
            line.starts_with("www.imn.test. AAAA @127.0.0.1:")
                && line.contains("NOERROR: 2001:2::10"),
            "{line}"
        );
    }
}
