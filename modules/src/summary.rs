//! One line per result, for people: what the CLI prints and the API returns as a
//! result's `summary`. One function per module, beside no other copy of it.

use crate::kinds::dns::DnsResult;
use crate::kinds::http::{HttpResult, TlsCertResult};
use crate::kinds::ntp::NtpResult;
use crate::kinds::traceroute::{MtrResult, TracerouteResult};
use crate::results::{ModuleOutcome, ModuleOutput, PingOutput, SystemSnapshot, TcpingResult};

/// `s` cut to at most `max` characters, ending in `…` when cut.
fn cap(s: String, max: usize) -> String {
    if s.chars().count() <= max {
        return s;
    }
    let mut out: String = s.chars().take(max).collect();
    out.push('…');
    out
}

/// Milliseconds to three decimals, or `-` when there is no figure.
fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:.3}"))
}

impl ModuleOutcome {
    /// The result as one line: the module's summary, or why it failed.
    pub fn summary(&self) -> String {
        match self {
            ModuleOutcome::Ok(out) => out.summary(),
            ModuleOutcome::Failed(e) => format!("failed: {e}"),
            ModuleOutcome::Timeout => "timeout".to_string(),
        }
    }
}

impl ModuleOutput {
    /// A result as the API shows it (`module` and its `result` object) back as the
    /// typed output; `None` for an unknown module or a result that does not fit its type
    /// (written by another version).
    pub fn from_api_json(module: &str, result: &serde_json::Value) -> Option<ModuleOutput> {
        use serde_json::from_value as de;
        let v = result.clone();
        Some(match module {
            "echo_module" => ModuleOutput::Echo(de(v).ok()?),
            "ping_module" => ModuleOutput::Ping(de(v).ok()?),
            "tcping" => ModuleOutput::Tcping(de(v).ok()?),
            "faulty_module" => ModuleOutput::Faulty(de(v).ok()?),
            "heartbeat" => ModuleOutput::Heartbeat(de(v).ok()?),
            "traceroute" => ModuleOutput::Traceroute(de(v).ok()?),
            "mtr" => ModuleOutput::Mtr(de(v).ok()?),
            "dns" => ModuleOutput::Dns(de(v).ok()?),
            "http" => ModuleOutput::Http(de(v).ok()?),
            "tls_cert" => ModuleOutput::TlsCert(de(v).ok()?),
            "ntp" => ModuleOutput::Ntp(de(v).ok()?),
            _ => return None,
        })
    }

    /// The result as one line, e.g. `127.0.0.1 3/3 received, loss 0%, min/avg/max
    /// 0.031/0.040/0.052 ms` for ping.
    pub fn summary(&self) -> String {
        match self {
            ModuleOutput::Echo(r) => r.message.clone(),
            ModuleOutput::Faulty(r) => format!("{} (after {} s)", r.message, r.delayed_s),
            ModuleOutput::Ping(r) => ping(r),
            ModuleOutput::Tcping(r) => tcping(r),
            ModuleOutput::Heartbeat(s) => system(s),
            ModuleOutput::Traceroute(r) => traceroute(r),
            ModuleOutput::Mtr(r) => mtr(r),
            ModuleOutput::Dns(r) => dns(r),
            ModuleOutput::Http(r) => http(r),
            ModuleOutput::TlsCert(r) => tls_cert(r),
            ModuleOutput::Ntp(r) => ntp(r),
        }
    }
}

fn ping(r: &PingOutput) -> String {
    r.targets
        .iter()
        .map(|t| match &t.error {
            Some(e) if t.addr.is_empty() => format!("{}: {e}", t.host),
            Some(e) => format!("{} {e}", t.addr),
            None => format!(
                "{} {}/{} received, loss {}%, min/avg/max {}/{}/{} ms",
                t.addr,
                t.received,
                t.sent,
                t.loss_pct,
                ms(t.min_ms),
                ms(t.avg_ms),
                ms(t.max_ms)
            ),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn tcping(r: &TcpingResult) -> String {
    let target = if r.addr.is_empty() { &r.host } else { &r.addr };
    let line = format!("{target}:{} {}/{} open", r.port, r.open, r.sent);
    if r.open > 0 {
        return format!("{line}, avg {} ms", ms(r.avg_ms));
    }
    // Nothing open: say how the last attempt ended.
    match r.attempts.last() {
        Some(a) => {
            let how = serde_json::to_value(a.outcome)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            match &a.error {
                Some(e) => format!("{line} ({how}: {e})"),
                None => format!("{line} ({how})"),
            }
        }
        None => line,
    }
}

fn system(s: &SystemSnapshot) -> String {
    format!(
        "up {} s, cpu {:.0}%, load {:.2}, memory {}/{} MiB free, disk {}/{} MiB free",
        s.uptime_s,
        s.cpu_pct,
        s.load[0],
        s.mem_available_kib / 1024,
        s.mem_total_kib / 1024,
        s.disk_free_kib / 1024,
        s.disk_total_kib / 1024
    )
}

fn traceroute(r: &TracerouteResult) -> String {
    let reached = if r.destination_reached {
        "reached"
    } else {
        "not reached"
    };
    let last = r
        .hops
        .iter()
        .rev()
        .find_map(|h| h.probes.iter().flatten().next().map(|p| (h.ttl, p)));
    match last {
        Some((ttl, p)) => format!(
            "{} {reached} ({}), last reply at hop {ttl} from {} in {:.3} ms",
            r.dst_addr, r.stop_reason, p.from, p.rtt_ms
        ),
        None => format!(
            "{} {reached} ({}), no reply in {} hops",
            r.dst_addr,
            r.stop_reason,
            r.hops.len()
        ),
    }
}

fn mtr(r: &MtrResult) -> String {
    let reached = if r.destination_reached {
        "reached"
    } else {
        "not reached"
    };
    match r.hops.last() {
        Some(h) => format!(
            "{} {reached} in {} hops, last hop loss {}%, avg {} ms ({} rounds)",
            r.dst_addr,
            r.hops.len(),
            h.loss_pct,
            ms(h.avg_ms),
            r.rounds
        ),
        None => format!("{} {reached}: no hops ({} rounds)", r.dst_addr, r.rounds),
    }
}

fn dns(r: &DnsResult) -> String {
    let q = format!("{} {}", r.qname, r.qtype);
    if let Some(e) = &r.error {
        return format!("{q} @{}:{}: {}", r.server, r.port, e.message);
    }
    let Some(reply) = &r.reply else {
        return format!("{q} @{}:{}: no reply", r.server, r.port);
    };
    match &reply.message {
        Some(m) => {
            let answers: Vec<&str> = m.answer.iter().map(|a| a.rdata.as_str()).collect();
            let shown = if answers.is_empty() {
                "no answer".to_string()
            } else {
                cap(answers.join(", "), 160)
            };
            format!(
                "{q} @{}:{} {}: {shown} ({:.3} ms)",
                r.server, r.port, m.rcode_name, reply.rt_ms
            )
        }
        None => format!(
            "{q} @{}:{}: undecodable reply of {} bytes ({:.3} ms)",
            r.server, r.port, reply.size, reply.rt_ms
        ),
    }
}

fn http(r: &HttpResult) -> String {
    let redirects = match r.redirects.len() {
        0 => String::new(),
        n => format!(" after {n} redirect{}", if n == 1 { "" } else { "s" }),
    };
    match (&r.response, &r.error) {
        (_, Some(e)) => format!("{} {}: {e}{redirects}", r.method.as_str(), r.url),
        (Some(resp), None) => format!(
            "{} {}: {} {}, {} bytes, {:.3} ms{redirects}",
            r.method.as_str(),
            r.url,
            resp.status,
            resp.http_version,
            resp.body_bytes,
            r.timing.total_ms
        ),
        (None, None) => format!("{} {}: no response{redirects}", r.method.as_str(), r.url),
    }
}

fn tls_cert(r: &TlsCertResult) -> String {
    let target = format!("{}:{}", r.host, r.port);
    if let Some(e) = &r.error {
        return format!("{target}: {e}");
    }
    let leaf = r.tls.chain.first();
    let subject = leaf
        .and_then(|c| c.subject_cn.clone())
        .or_else(|| leaf.map(|c| c.subject.clone()))
        .unwrap_or_else(|| "no certificate".to_string());
    let until = leaf.map_or(String::new(), |c| format!(", valid until {}", c.not_after));
    let verified = match &r.tls.verify_error {
        Some(e) => format!(", not verified: {e}"),
        None => String::new(),
    };
    format!(
        "{target} {} {subject}{until}{verified}",
        r.tls.version.as_deref().unwrap_or("TLS")
    )
}

fn ntp(r: &NtpResult) -> String {
    format!(
        "{}:{} {}/{} replies, offset {} ms, delay {} ms",
        r.addr,
        r.port,
        r.received,
        r.sent,
        ms(r.offset_ms),
        ms(r.delay_ms)
    )
}
