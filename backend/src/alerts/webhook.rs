//! Webhook delivery: where a webhook may point, how each call is signed, and the
//! HTTP client that makes them.
//!
//! A receiver checks a call with the rule's secret: `X-IMN-Signature: t=T,v1=HEX`
//! where HEX is HMAC-SHA256(secret, "T.BODY") and T the Unix time of sending in
//! seconds (refuse old T to stop replays); `X-IMN-Event` is the event's id, the
//! same on every retry (a receiver that sees it twice drops the second).
//!
//! Every address a call connects to is checked first, both in the URL and as names
//! resolve at call time (so a name that re-points to 127.0.0.1 later is still
//! refused): loopback, private, link-local (cloud metadata), multicast and the other
//! networks of the agents' built-in rule are refused unless `--webhook-allow` names
//! them. Redirects are not followed and proxies from the environment are not used.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use imn_proto::policy::{Cidr, TargetPolicy};

use super::{Settings, Webhook};

/// The longest webhook URL.
pub const MAX_URL: usize = 2_048;

/// Whether a call may go to `ip`: a public address, or one in a special network
/// that an allow entry inside that network opens (as the agents' policy reads its
/// allow entries: `0.0.0.0/0` opens no special network, `127.0.0.0/8` opens
/// loopback), in every form that carries an IPv4 address.
pub fn address_allowed(ip: IpAddr, allow: &[Cidr]) -> Result<(), String> {
    let builtin = TargetPolicy {
        rules: Vec::new(),
        builtin: true,
    };
    let verdict = builtin.check(ip);
    if verdict.is_ok() {
        return Ok(());
    }
    if !allow.is_empty() {
        let opened = TargetPolicy {
            rules: vec![imn_proto::policy::Rule {
                name: "webhook-allow".into(),
                allow: allow.to_vec(),
                deny: Vec::new(),
            }],
            builtin: true,
        };
        if opened.check(ip).is_ok() {
            return Ok(());
        }
    }
    verdict.map_err(|d| {
        format!(
            "{ip} is refused ({}); a backend flag --webhook-allow naming its network opens it",
            d.network.map(|n| n.to_string()).unwrap_or_default()
        )
    })
}

/// Checks a webhook URL: http or https, a host, at most [`MAX_URL`] bytes, and an
/// address literal that is allowed.
pub fn check_url(url: &str, settings: &Settings) -> Result<(), String> {
    if url.len() > MAX_URL {
        return Err(format!("at most {MAX_URL} bytes"));
    }
    let u = reqwest::Url::parse(url).map_err(|e| format!("not a URL ({e})"))?;
    if u.scheme() != "http" && u.scheme() != "https" {
        return Err(format!("http or https, not {}", u.scheme()));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err("no user or password in the URL: the receiver checks the signature".into());
    }
    match u.host() {
        None => Err("no host".into()),
        Some(url::Host::Ipv4(ip)) => address_allowed(IpAddr::V4(ip), &settings.webhook_allow),
        Some(url::Host::Ipv6(ip)) => address_allowed(IpAddr::V6(ip), &settings.webhook_allow),
        Some(url::Host::Domain(d)) => {
            if d.parse::<IpAddr>().is_ok() {
                return Err("an address literal the parser did not read as one".into());
            }
            Ok(())
        }
    }
}

/// Resolves names with the system resolver and keeps only allowed addresses.
struct Checked {
    allow: Vec<Cidr>,
}

impl reqwest::dns::Resolve for Checked {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let ok: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match address_allowed(a.ip(), &allow) {
                    Ok(()) => true,
                    Err(e) => {
                        refused = Some(e);
                        false
                    }
                })
                .collect();
            if ok.is_empty() {
                let why = refused.unwrap_or_else(|| format!("{host}: no address"));
                return Err(why.into());
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The client every webhook call of one rule uses.
pub fn client(settings: &Settings) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(settings.webhook_timeout)
        .connect_timeout(settings.webhook_timeout.min(Duration::from_secs(10)))
        .dns_resolver(Arc::new(Checked {
            allow: settings.webhook_allow.clone(),
        }))
        .user_agent(concat!("imn-backend/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// The signature header's value for `body` sent at Unix time `t`.
pub fn signature(secret: &str, t: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(t.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={hex}")
}

/// One call: POSTs `body` (JSON), signed. Ok on a 2xx answer.
pub async fn send(
    client: &reqwest::Client,
    hook: &Webhook,
    settings: &Settings,
    event_id: &str,
    body: &[u8],
) -> Result<(), String> {
    check_url(&hook.url, settings)?;
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let resp = client
        .post(&hook.url)
        .header("content-type", "application/json")
        .header("x-imn-event", event_id)
        .header("x-imn-signature", signature(&hook.secret, t, body))
        .body(body.to_vec())
        .send()
        .await
        .map_err(|e| {
            // The resolver's refusal is the useful part of the chain; the URL (which
            // may hold the receiver's own credential) is left out of logs.
            let e = e.without_url();
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(x) = src {
                s = format!("{s}: {x}");
                src = x.source();
            }
            s
        })?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("the receiver answered {}", resp.status()))
    }
}

/// `d` give or take a fifth, so retries of many rules do not fall in step.
pub fn jitter(d: Duration) -> Duration {
    let f: f64 = 0.8 + rand::random::<f64>() * 0.4;
    d.mul_f64(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_time_dot_body() {
        // RFC 4231 test case 2's key and data, with "T." in front of the data: the
        // same HMAC as computed by an independent implementation (Python's hmac).
        let s = signature("Jefe", 1700000000, b"what do ya want for nothing?");
        assert_eq!(
            s,
            "t=1700000000,v1=1cdd0650c8be1cb0974b1788d458b1e781206cfef59b85faafc582d2e182c57e"
        );
        assert_ne!(
            s,
            signature("Jefe", 1700000001, b"what do ya want for nothing?")
        );
        assert_ne!(
            s,
            signature("jefe", 1700000000, b"what do ya want for nothing?")
        );
    }

    #[test]
    fn special_addresses_are_refused_unless_allowed() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "169.254.169.254",
            "::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "0.0.0.0",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(address_allowed(ip, &[]).is_err(), "{ip}");
        }
        let allow = vec![Cidr::parse("127.0.0.0/8").unwrap()];
        assert!(address_allowed("127.0.0.1".parse().unwrap(), &allow).is_ok());
        assert!(address_allowed("::ffff:127.0.0.1".parse().unwrap(), &allow).is_ok());
        assert!(address_allowed("10.0.0.1".parse().unwrap(), &allow).is_err());
        assert!(address_allowed("93.184.216.34".parse().unwrap(), &[]).is_ok());
        assert!(address_allowed("93.184.216.34".parse().unwrap(), &allow).is_ok());
        // A wide entry opens no special network inside it.
        let wide = vec![
            Cidr::parse("0.0.0.0/0").unwrap(),
            Cidr::parse("::/0").unwrap(),
        ];
        for ip in [
            "127.0.0.1",
            "169.254.169.254",
            "::1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(address_allowed(ip, &wide).is_err(), "{ip}");
        }
    }
}
