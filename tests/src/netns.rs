//! Test hosts in network namespaces: a namespace joined to the host by a veth pair, on
//! addresses from the benchmarking range 198.18.0.0/15, which is never routed to the
//! internet. Creation checks that the route really uses the new veth, so nothing can
//! leave the machine if setup went wrong. Removed when dropped.

use std::process::Command;

/// Runs a shell command; returns whether it succeeded and its output.
pub fn sh(cmd: &str) -> (bool, String) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

pub struct Netns {
    pub ns: String,
    pub host_if: String,
    pub peer_if: String,
    /// The host's end of the link.
    pub host_ip: String,
    /// The namespace's end of the link.
    pub peer_ip: String,
}

impl Netns {
    /// Creates namespace `imnt-{tag}-{pid}` with a /30 link; `second_octet` is 18 or
    /// 19 (198.18/198.19), so two kinds of test host never share a subnet.
    pub fn create(tag: &str, second_octet: u8) -> Netns {
        let n = (std::process::id() + tag.len() as u32 * 7) % 200 + 20;
        let ns = format!("imnt-{tag}-{}", std::process::id());
        let host_if = format!("imn{tag}{n}h");
        let peer_if = format!("imn{tag}{n}p");
        let host_ip = format!("198.{second_octet}.{n}.1");
        let peer_ip = format!("198.{second_octet}.{n}.2");
        let netns = Netns {
            ns,
            host_if,
            peer_if,
            host_ip,
            peer_ip,
        };
        let (ns, h, p) = (&netns.ns, &netns.host_if, &netns.peer_if);
        for s in [
            format!("ip netns add {ns}"),
            format!("ip link add {h} type veth peer name {p}"),
            format!("ip link set {p} netns {ns}"),
            format!("ip addr add {}/30 dev {h}", netns.host_ip),
            format!("ip link set {h} up"),
            format!("ip -n {ns} addr add {}/30 dev {p}", netns.peer_ip),
            format!("ip -n {ns} link set {p} up"),
            format!("ip -n {ns} link set lo up"),
        ] {
            let (ok, out) = sh(&s);
            assert!(ok, "{s}: {out}");
        }
        // Both directions must use our own veth.
        let (ok, route) = sh(&format!("ip route get {}", netns.peer_ip));
        assert!(
            ok && route.contains(&format!("dev {h}")),
            "route to {}: {route}",
            netns.peer_ip
        );
        let (ok, route) = sh(&format!(
            "ip netns exec {ns} ip route get {}",
            netns.host_ip
        ));
        assert!(
            ok && route.contains(&format!("dev {p}")),
            "route to {}: {route}",
            netns.host_ip
        );
        netns
    }

    /// Drops every packet that enters the namespace: a host that never answers.
    pub fn drop_all_input(&self) {
        for s in [
            format!("ip netns exec {} nft add table inet imn", self.ns),
            format!(
                "ip netns exec {} nft add chain inet imn input '{{ type filter hook input priority 0; policy drop; }}'",
                self.ns
            ),
        ] {
            let (ok, out) = sh(&s);
            assert!(ok, "{s}: {out}");
        }
    }

    /// Takes the link up or down (from the host's side).
    pub fn link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        let (ok, out) = sh(&format!("ip link set {} {state}", self.host_if));
        assert!(ok, "{out}");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&format!("ip link del {}", self.host_if));
        let _ = sh(&format!("ip netns del {}", self.ns));
    }
}

/// A chain of namespaces for traceroute: the host (this namespace), `n` routers and a
/// destination, in a line, joined by veth pairs. Link `i` (from node `i` to node
/// `i + 1`; node 0 is the host) is 198.19.{third}.{16 i}/28, with `.16 i + 1` on the
/// host's side and `.16 i + 2` on the far side. Routers forward, and have static
/// routes both ways; the destination's default route points back. `create6` builds
/// the same over IPv6, link `i` being 2001:2:0:{third:02x}{i:02x}::/64 (from the
/// benchmarking range 2001:2::/48), `::1` on the host's side. Creation checks
/// that the host's routes to every address of the chain use the chain's own veth.
/// Removed when dropped.
pub struct Chain {
    /// Namespaces of the routers, then of the destination.
    pub namespaces: Vec<String>,
    /// The host's address on the first link (the traces' source).
    pub host_ip: String,
    /// Each router's address facing the host, then the destination's: what a trace
    /// should show hop by hop.
    pub hops: Vec<String>,
    /// The destination's address.
    pub dest_ip: String,
    /// An address in the destination's subnet that no host has.
    pub unused_ip: String,
    /// The host's end of the first link.
    pub host_if: String,
}

impl Chain {
    /// Creates a chain of `routers` routers (1..=14) on 198.19.{third}.0/24.
    pub fn create(third: u8, routers: usize) -> Chain {
        Chain::build(third, routers, false)
    }

    /// Creates a chain of `routers` routers (1..=14) on 2001:2:0:{third:02x}00::/56.
    pub fn create6(third: u8, routers: usize) -> Chain {
        Chain::build(third, routers, true)
    }

    fn build(third: u8, routers: usize, v6: bool) -> Chain {
        assert!((1..=14).contains(&routers));
        let pid = std::process::id();
        let base = format!("198.19.{third}");
        let addr = |link: usize, far: bool| {
            if v6 {
                format!("2001:2:0:{third:02x}{link:02x}::{}", 1 + usize::from(far))
            } else {
                format!("{base}.{}", 16 * link + 1 + usize::from(far))
            }
        };
        let (plen, ip, nodad) = if v6 {
            (64, "ip -6", " nodad")
        } else {
            (28, "ip", "")
        };
        let namespaces: Vec<String> = (1..=routers + 1)
            .map(|i| format!("imnc-{third}-{i}-{pid}"))
            .collect();
        let host_if = format!("c{third}x0a{pid}");
        let mut chain = Chain {
            namespaces: Vec::new(),
            host_ip: addr(0, false),
            hops: (0..=routers).map(|i| addr(i, true)).collect(),
            dest_ip: addr(routers, true),
            unused_ip: if v6 {
                format!("2001:2:0:{third:02x}{routers:02x}::9")
            } else {
                format!("{base}.{}", 16 * routers + 9)
            },
            host_if: host_if.clone(),
        };
        let run = |s: String| {
            let (ok, out) = sh(&s);
            assert!(ok, "{s}: {out}");
        };
        for ns in &namespaces {
            run(format!("ip netns add {ns}"));
            // Registered at once, so a failure below still removes it.
            chain.namespaces.push(ns.clone());
            run(format!("ip -n {ns} link set lo up"));
        }
        // Every node but the host forwards; Linux rate-limits the ICMP errors a
        // traceroute relies on (time exceeded, port unreachable: icmp_ratemask) to
        // about one per second per peer by default, so the limit is lifted.
        for ns in &namespaces {
            run(format!(
                "ip netns exec {ns} sysctl -qw net.ipv4.ip_forward=1 net.ipv4.icmp_ratelimit=0 \
                 net.ipv6.conf.all.forwarding=1 net.ipv6.icmp.ratelimit=0"
            ));
        }
        for link in 0..=routers {
            let near = if link == 0 {
                host_if.clone()
            } else {
                format!("c{third}x{link}a{pid}")
            };
            let far = format!("c{third}x{link}b{pid}");
            run(format!("ip link add {near} type veth peer name {far}"));
            run(format!("ip link set {far} netns {}", namespaces[link]));
            let near_ns = if link == 0 {
                String::new()
            } else {
                run(format!("ip link set {near} netns {}", namespaces[link - 1]));
                format!("-n {} ", namespaces[link - 1])
            };
            run(format!(
                "ip {near_ns}addr add {}/{plen} dev {near}{nodad}",
                addr(link, false)
            ));
            run(format!("ip {near_ns}link set {near} up"));
            run(format!(
                "ip -n {} addr add {}/{plen} dev {far}{nodad}",
                namespaces[link],
                addr(link, true)
            ));
            run(format!("ip -n {} link set {far} up", namespaces[link]));
        }
        let subnet = |link: usize| {
            if v6 {
                format!("2001:2:0:{third:02x}{link:02x}::/64")
            } else {
                format!("{base}.{}/28", 16 * link)
            }
        };
        // The host: every link past the first through router 1.
        for link in 1..=routers {
            run(format!(
                "{ip} route add {} via {} dev {host_if}",
                subnet(link),
                addr(0, true)
            ));
        }
        // Router k (node k, 1-based): links left of its own through node k - 1,
        // links right of its own through node k + 1.
        for k in 1..=routers {
            let ns = &namespaces[k - 1];
            for link in 0..k.saturating_sub(1) {
                run(format!(
                    "{ip} -n {ns} route add {} via {}",
                    subnet(link),
                    addr(k - 1, false)
                ));
            }
            for link in k + 1..=routers {
                run(format!(
                    "{ip} -n {ns} route add {} via {}",
                    subnet(link),
                    addr(k, true)
                ));
            }
        }
        run(format!(
            "{ip} -n {} route add default via {}",
            namespaces[routers],
            addr(routers, false)
        ));
        // Nothing may leave the machine: every address of the chain is behind our veth.
        for ip in chain.hops.iter().chain([&chain.unused_ip]) {
            let (ok, route) = sh(&format!("ip route get {ip}"));
            assert!(
                ok && route.contains(&format!("dev {host_if} ")),
                "route to {ip}: {route}"
            );
        }
        chain
    }

    /// The namespace of router `k` (1-based).
    pub fn router(&self, k: usize) -> &str {
        &self.namespaces[k - 1]
    }

    /// The destination's namespace.
    pub fn dest(&self) -> &str {
        self.namespaces.last().map(String::as_str).unwrap_or("")
    }

    /// Makes router `k` (1-based) silent: it drops the ICMP time exceeded it sends,
    /// and still forwards.
    pub fn silence_router(&self, k: usize) {
        let ns = self.router(k);
        for s in [
            format!("ip netns exec {ns} nft add table inet imntr"),
            format!(
                "ip netns exec {ns} nft add chain inet imntr out '{{ type filter hook output priority 0; policy accept; }}'"
            ),
            format!(
                "ip netns exec {ns} nft add rule inet imntr out icmp type time-exceeded drop"
            ),
        ] {
            let (ok, out) = sh(&s);
            assert!(ok, "{s}: {out}");
        }
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        let _ = sh(&format!("ip link del {}", self.host_if));
        for ns in &self.namespaces {
            let _ = sh(&format!("ip netns del {ns}"));
        }
    }
}
