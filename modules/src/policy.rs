//! The measurement policy as both ends apply it: which addresses a run may send
//! packets to.
//!
//! The backend reads the operator's rules (`--policy FILE`), picks those that apply to
//! an agent, checks every target of a request against them at submit, and sends them
//! with the command or schedule set as a [`TargetPolicy`]. The agent checks every
//! address it is about to send to against the same [`TargetPolicy`], after its own name
//! resolution and after every redirect, because the backend's view of a name is not the
//! agent's (split DNS, a name that changes its answer, a schedule that runs for months).
//! One function, [`TargetPolicy::check`], decides on both ends.
//!
//! The built-in rule ([`BUILTIN_DENY`]) keeps a fleet lent to strangers off the
//! networks it sits in: loopback, private, link-local (with the cloud metadata address
//! 169.254.169.254), CGNAT, unique-local, multicast and reserved addresses. The backend
//! turns it on with `--auth` or when it listens beyond loopback. An operator's `allow`
//! entry that lies inside one of those networks opens that part of it (a lab rule with
//! `allow = ["127.0.0.0/8"]` may measure loopback); a broad entry such as `0.0.0.0/0`
//! does not, so "allow the internet" never means "allow my LAN".
//!
//! IPv6 addresses that carry an IPv4 address (mapped `::ffff:a.b.c.d`, compatible
//! `::a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are checked in both forms: a
//! denied IPv4 network cannot be reached through a translator.

use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

/// An IPv4 or IPv6 network, as written (the address keeps its host bits, so it prints
/// as it was given). An `ipnet` network; only `contains`, on the hot path, does its own
/// arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(ipnet::IpNet);

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP network (like 192.0.2.0/24)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        // An IPv4 network written IPv4-mapped (`::ffff:10.0.0.0/104`) is that IPv4
        // network: addresses are compared as IPv4 once mapped, so it would never match.
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) if prefix >= 96 && v6.to_ipv4_mapped().is_some() => (
                IpAddr::V4(v6.to_ipv4_mapped().expect("checked")),
                prefix - 96,
            ),
            _ => (addr, prefix),
        };
        ipnet::IpNet::new(addr, prefix)
            .map(Cidr)
            .map_err(|_| format!("{s:?}: the prefix length must be 0 to {max}"))
    }

    /// Whether `ip` is in the network (an IPv4-mapped IPv6 address counts as IPv4).
    /// One masked compare, not `ipnet`'s contains (which derives the network and the
    /// broadcast address on every call): a run checks each address it sends to
    /// against every network of its policy, and this is 30 % of a probe's CPU there.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let prefix = u32::from(self.0.prefix_len());
        match (self.0.addr(), canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }

    /// Whether every address of `self` is in `other`.
    pub fn within(&self, other: &Cidr) -> bool {
        other.0.contains(&self.0)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.0.addr(), self.0.prefix_len())
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Cidr::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// The IPv4 address an IPv6 address carries through a translation or tunnelling
/// scheme, if it carries one: IPv4-compatible (`::a.b.c.d`), NAT64's well-known prefix
/// (`64:ff9b::/96`) and its local-use prefix (`64:ff9b:1::/48`), SIIT (`::ffff:0:0:0/96`)
/// and 6to4 (`2002:AABB:CCDD::/48`). (Mapped addresses are already IPv4 after
/// [`canonical`].)
fn embedded_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else { return None };
    let s = v6.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if s[..6] == [0; 6] && !matches!(u32::from(low), 0 | 1) {
        return Some(low);
    }
    // NAT64: the well-known prefix, and the local-use one (RFC 8215) with its IPv4
    // address in the last 32 bits (a /96, as translators are usually set up).
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || s[..3] == [0x64, 0xff9b, 1] {
        return Some(low);
    }
    // SIIT's IPv4-translated addresses, `::ffff:0:a.b.c.d` (RFC 2765).
    if s[..6] == [0, 0, 0, 0, 0xffff, 0] {
        return Some(low);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

/// The forms an address is checked in: itself, and the IPv4 address it carries.
fn forms(ip: IpAddr) -> impl Iterator<Item = IpAddr> {
    let ip = canonical(ip);
    std::iter::once(ip).chain(embedded_v4(ip).map(IpAddr::V4))
}

/// Networks the built-in rule denies, with what each is.
pub const BUILTIN_DENY: &[(&str, &str)] = &[
    ("0.0.0.0/8", "this network"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    (
        "169.254.0.0/16",
        "link-local, with cloud metadata at 169.254.169.254",
    ),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("198.18.0.0/15", "benchmarking"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved and broadcast"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("100::/64", "discard"),
    (
        "64:ff9b:1::/48",
        "local-use NAT64, translating to any network",
    ),
    ("fc00::/7", "unique local"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
];

fn builtin_networks() -> &'static [(Cidr, &'static str)] {
    static NETS: std::sync::OnceLock<Vec<(Cidr, &'static str)>> = std::sync::OnceLock::new();
    NETS.get_or_init(|| {
        BUILTIN_DENY
            .iter()
            .filter_map(|(n, what)| Cidr::parse(n).ok().map(|c| (c, *what)))
            .collect()
    })
}

/// The name of the built-in rule in refusals (`builtin.deny`).
pub const BUILTIN_RULE: &str = "builtin";

/// One operator rule, as it applies to one agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub name: String,
    /// When not empty, every address must be inside one of these networks.
    pub allow: Vec<Cidr>,
    /// No address may be inside any of these networks.
    pub deny: Vec<Cidr>,
}

/// The rules that apply to one agent: what the backend checked a request against,
/// and what the agent checks every address against before a packet leaves.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetPolicy {
    pub rules: Vec<Rule>,
    /// The built-in rule ([`BUILTIN_DENY`]) is on.
    pub builtin: bool,
}

/// Most rules, and most networks in all, a [`TargetPolicy`] may hold on the wire (an
/// agent refuses a command carrying more, rather than spend its memory on it).
pub const MAX_RULES: usize = 256;
pub const MAX_NETWORKS: usize = 16_384;

/// Why an address was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// `{rule}.deny`, `{rule}.allow` or `builtin.deny`.
    pub rule: String,
    pub address: IpAddr,
    /// The network that denied it (none when it is outside an allow list).
    pub network: Option<Cidr>,
    /// Words for the refusal.
    pub message: String,
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The text a refused run or target carries in its result: `policy_denied: …`.
pub const DENIED_PREFIX: &str = "policy_denied";

impl Denied {
    /// The refusal as a run's or a target's error: `policy_denied: {rule}: {message}`
    /// (`target` is the host the request named, when it is not the address itself).
    pub fn error_text(&self, target: &str) -> String {
        let addr = self.address.to_string();
        if target.is_empty() || target.trim_matches(['[', ']']) == addr {
            format!("{DENIED_PREFIX}: {}: {}", self.rule, self.message)
        } else {
            format!(
                "{DENIED_PREFIX}: {}: {} (target {target:?})",
                self.rule, self.message
            )
        }
    }
}

impl TargetPolicy {
    /// No rules and no built-in rule: every address passes.
    pub fn is_open(&self) -> bool {
        self.rules.is_empty() && !self.builtin
    }

    /// A digest of the rules, 0 for none (or rules that let everything pass): the agent
    /// reports the digest of its schedule set's rules in its hello, so the backend sends
    /// the set again when its rules for the agent changed (a new policy file).
    pub fn digest(p: Option<&TargetPolicy>) -> u64 {
        use sha2::Digest;
        match p.filter(|p| !p.is_open()) {
            None => 0,
            Some(p) => {
                let bytes = postcard::to_stdvec(p).unwrap_or_default();
                let h = sha2::Sha256::digest(&bytes);
                u64::from_le_bytes(h[..8].try_into().unwrap_or_default()).max(1)
            }
        }
    }

    /// Whether the policy is within [`MAX_RULES`] and [`MAX_NETWORKS`].
    pub fn within_limits(&self) -> bool {
        self.rules.len() <= MAX_RULES
            && self
                .rules
                .iter()
                .map(|r| r.allow.len() + r.deny.len())
                .sum::<usize>()
                <= MAX_NETWORKS
    }

    /// Checks one address a run is about to send to.
    pub fn check(&self, ip: IpAddr) -> Result<(), Denied> {
        for r in &self.rules {
            for form in forms(ip) {
                if let Some(net) = r.deny.iter().find(|n| n.contains(form)) {
                    return Err(Denied {
                        rule: format!("{}.deny", r.name),
                        address: ip,
                        network: Some(*net),
                        message: format!("policy rule {:?} denies {ip} (in {net})", r.name),
                    });
                }
            }
            if !r.allow.is_empty() && !forms(ip).any(|f| r.allow.iter().any(|n| n.contains(f))) {
                let allowed: Vec<String> = r.allow.iter().map(Cidr::to_string).collect();
                return Err(Denied {
                    rule: format!("{}.allow", r.name),
                    address: ip,
                    network: None,
                    message: format!(
                        "policy rule {:?} allows only {}; {ip} is outside",
                        r.name,
                        allowed.join(", ")
                    ),
                });
            }
        }
        if self.builtin {
            for form in forms(ip) {
                let Some((net, what)) = builtin_networks().iter().find(|(n, _)| n.contains(form))
                else {
                    continue;
                };
                // An allow entry inside this built-in network opens the part it names.
                let opened = self
                    .rules
                    .iter()
                    .any(|r| r.allow.iter().any(|a| a.contains(form) && a.within(net)));
                if !opened {
                    return Err(Denied {
                        rule: format!("{BUILTIN_RULE}.deny"),
                        address: ip,
                        network: Some(*net),
                        message: format!(
                            "the built-in rule denies {ip} (in {net}, {what}); an operator's allow entry inside it opens it"
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

/// One place a run sends packets to, as its parameters name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// JSON pointer of the parameter (`/host`, `/targets/3`, `/url`, `/server`).
    pub field: String,
    /// A host name or an address literal (IPv6 without brackets).
    pub host: String,
}

impl Target {
    pub fn new(field: impl Into<String>, host: impl Into<String>) -> Target {
        Target {
            field: field.into(),
            host: host.into(),
        }
    }

    /// The address, when the host is an address literal.
    pub fn literal(&self) -> Option<IpAddr> {
        self.host.trim_matches(['[', ']']).parse().ok()
    }
}

/// What one run of a module asks of the network: where it sends packets, how many,
/// and how fast. Every module declares it (`ModuleSpec::demand`); the backend's limits,
/// policy and budgets and the agent's budgets read it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Demand {
    pub targets: Vec<Target>,
    /// The request's `count` parameter, when it has one (for `max_count`).
    pub count: Option<u64>,
    /// Packets the run sends at most (what budgets charge).
    pub probes: u64,
    /// Probes per second the run sends at most, when it paces them.
    pub rate: Option<f64>,
    /// The run may send to addresses its parameters do not name (HTTP redirects it
    /// follows): only an agent that checks every address may run it under a policy.
    pub redirects: bool,
}

impl Demand {
    /// A run that sends nothing to anyone (echo, heartbeat).
    pub fn none() -> Demand {
        Demand::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rule(name: &str, allow: &[&str], deny: &[&str]) -> Rule {
        Rule {
            name: name.into(),
            allow: allow.iter().map(|n| Cidr::parse(n).unwrap()).collect(),
            deny: deny.iter().map(|n| Cidr::parse(n).unwrap()).collect(),
        }
    }

    fn rule_of(p: &TargetPolicy, a: &str) -> Option<String> {
        p.check(ip(a)).err().map(|d| d.rule)
    }

    #[test]
    fn cidrs_parse_and_match() {
        let n = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(n.contains(ip("10.1.2.3")));
        assert!(!n.contains(ip("11.0.0.1")));
        assert!(n.contains(ip("::ffff:10.0.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        let h = Cidr::parse("::1").unwrap();
        assert!(h.contains(ip("::1")));
        assert!(!h.contains(ip("::2")));
        assert!(!h.contains(ip("127.0.0.1")));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope/8").is_err());
        assert!(Cidr::parse("127.0.0.0/16")
            .unwrap()
            .within(&Cidr::parse("127.0.0.0/8").unwrap()));
        assert!(!Cidr::parse("0.0.0.0/0")
            .unwrap()
            .within(&Cidr::parse("127.0.0.0/8").unwrap()));
        let text = serde_json::to_string(&n).unwrap();
        assert_eq!(text, "\"10.0.0.0/8\"");
        assert_eq!(serde_json::from_str::<Cidr>(&text).unwrap(), n);
    }

    #[test]
    fn rules_deny_and_allow_name_themselves() {
        let p = TargetPolicy {
            rules: vec![rule("lab", &["127.0.0.0/8"], &["127.0.0.1/32"])],
            builtin: false,
        };
        assert_eq!(rule_of(&p, "127.0.0.2"), None);
        assert_eq!(rule_of(&p, "127.0.0.1").as_deref(), Some("lab.deny"));
        assert_eq!(rule_of(&p, "::ffff:127.0.0.1").as_deref(), Some("lab.deny"));
        assert_eq!(rule_of(&p, "192.0.2.1").as_deref(), Some("lab.allow"));
        let d = p.check(ip("127.0.0.1")).unwrap_err();
        assert_eq!(d.network, Cidr::parse("127.0.0.1/32").ok());
        assert_eq!(
            d.error_text("rebind.test"),
            "policy_denied: lab.deny: policy rule \"lab\" denies 127.0.0.1 (in 127.0.0.1/32) (target \"rebind.test\")"
        );
        assert!(TargetPolicy::default().is_open());
        assert!(TargetPolicy::default().check(ip("127.0.0.1")).is_ok());
    }

    #[test]
    fn the_builtin_rule_keeps_internal_networks_out_unless_a_rule_opens_a_part() {
        let p = TargetPolicy {
            rules: vec![],
            builtin: true,
        };
        for a in [
            "127.0.0.1",
            "10.9.8.7",
            "172.20.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:169.254.169.254",
            // The same addresses through translators and tunnels.
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
            "::7f00:1",
            "::ffff:0:7f00:1",
            "64:ff9b:1::c000:201",
        ] {
            assert_eq!(rule_of(&p, a).as_deref(), Some("builtin.deny"), "{a}");
        }
        for a in ["192.0.2.1", "8.8.8.8", "2001:db8::1", "64:ff9b::c000:201"] {
            assert_eq!(rule_of(&p, a), None, "{a}");
        }
        let lab = TargetPolicy {
            rules: vec![rule("lab", &["127.0.0.0/8", "192.0.2.0/24"], &[])],
            builtin: true,
        };
        assert_eq!(rule_of(&lab, "127.0.0.5"), None, "opened by lab.allow");
        assert_eq!(rule_of(&lab, "10.0.0.1").as_deref(), Some("lab.allow"));
        let wide = TargetPolicy {
            rules: vec![rule("internet", &["0.0.0.0/0", "::/0"], &[])],
            builtin: true,
        };
        assert_eq!(
            rule_of(&wide, "192.168.1.1").as_deref(),
            Some("builtin.deny"),
            "allowing everything does not open internal networks"
        );
        assert_eq!(rule_of(&wide, "8.8.8.8"), None);
    }

    #[test]
    fn translated_addresses_meet_ipv4_rules() {
        let p = TargetPolicy {
            rules: vec![rule("no-ten", &[], &["10.0.0.0/8"])],
            builtin: false,
        };
        assert_eq!(
            rule_of(&p, "64:ff9b::a00:1").as_deref(),
            Some("no-ten.deny")
        );
        assert_eq!(rule_of(&p, "2002:a00:1::5").as_deref(), Some("no-ten.deny"));
        assert_eq!(rule_of(&p, "2001:db8::1"), None);
        assert_eq!(
            rule_of(&p, "::ffff:0:a00:1").as_deref(),
            Some("no-ten.deny")
        );
        assert_eq!(
            rule_of(&p, "64:ff9b:1::a00:1").as_deref(),
            Some("no-ten.deny")
        );
        // A deny written IPv4-mapped is the IPv4 network.
        let mapped = TargetPolicy {
            rules: vec![rule("m", &[], &["::ffff:10.0.0.0/104"])],
            builtin: false,
        };
        assert_eq!(mapped.rules[0].deny[0].to_string(), "10.0.0.0/8");
        assert_eq!(rule_of(&mapped, "10.1.2.3").as_deref(), Some("m.deny"));
    }

    #[test]
    fn policies_round_trip_on_the_wire_and_limits_hold() {
        let p = TargetPolicy {
            rules: vec![rule("lab", &["127.0.0.0/8"], &["127.0.0.1/32", "::1"])],
            builtin: true,
        };
        let bytes = postcard::to_stdvec(&p).unwrap();
        assert_eq!(postcard::from_bytes::<TargetPolicy>(&bytes).unwrap(), p);
        assert!(p.within_limits());
        let d = TargetPolicy::digest(Some(&p));
        assert_ne!(d, 0);
        assert_eq!(d, TargetPolicy::digest(Some(&p.clone())), "stable");
        let mut q = p.clone();
        q.builtin = false;
        assert_ne!(TargetPolicy::digest(Some(&q)), d);
        assert_eq!(TargetPolicy::digest(None), 0);
        assert_eq!(TargetPolicy::digest(Some(&TargetPolicy::default())), 0);
        let big = TargetPolicy {
            rules: vec![rule("r", &[], &[]); MAX_RULES + 1],
            builtin: false,
        };
        assert!(!big.within_limits());
    }
}
