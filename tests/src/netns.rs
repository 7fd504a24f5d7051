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

/// A namespace host whose echo replies come from a [`crate::bench_ping::Responder`] (the kernel ignores
/// echo requests), so its delay can change while the measurement runs.
pub struct SlowHost {
    pub ns: Netns,
    pub responder: crate::bench_ping::Responder,
}

impl SlowHost {
    pub fn start(tag: &str, delay_ms: u64) -> SlowHost {
        let ns = Netns::create(tag, 18);
        let (ok, out) = sh(&format!(
            "ip netns exec {} sysctl -qw net.ipv4.icmp_echo_ignore_all=1",
            ns.ns
        ));
        assert!(ok, "{out}");
        let me: std::net::Ipv4Addr = ns.peer_ip.parse().unwrap();
        let peer: std::net::Ipv4Addr = ns.host_ip.parse().unwrap();
        let responder =
            crate::bench_ping::Responder::start_in(&ns.ns, me, peer, delay_ms * 1_000_000)
                .expect("the responder");
        SlowHost { ns, responder }
    }

    pub fn set_delay_ms(&self, ms: u64) {
        self.responder.set_delay(ms * 1_000_000);
    }

    pub fn ip(&self) -> String {
        self.ns.peer_ip.clone()
    }

    /// Drops `pct` % of the echo requests that reach the host, at random (before its
    /// responder's raw socket sees them: the input hook comes first).
    pub fn lose(&self, pct: u32) {
        for s in [
            format!("ip netns exec {} nft add table inet imnloss", self.ns.ns),
            format!(
                "ip netns exec {} nft add chain inet imnloss in '{{ type filter hook input priority 0; policy accept; }}'",
                self.ns.ns
            ),
            format!(
                "ip netns exec {} nft add rule inet imnloss in 'icmp type echo-request numgen random mod 100 < {pct} drop'",
                self.ns.ns
            ),
        ] {
            let (ok, out) = sh(&s);
            assert!(ok, "{s}: {out}");
        }
    }

    pub fn stop_losing(&self) {
        let s = format!("ip netns exec {} nft delete table inet imnloss", self.ns.ns);
        let (ok, out) = sh(&s);
        assert!(ok, "{s}: {out}");
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

    /// Moves the route: builds a router namespace D between router `k` (1-based, at
    /// most the last router) and the node after it (router `k + 1`, or the
    /// destination), joined to each by a veth pair of its own on the two /28s of the
    /// chain's /24 that follow the chain's links (so the chain may have at most 13
    /// routers), then sends both directions through it: router `k`'s routes to the
    /// links beyond it, and the next node's routes to the links before its own, go via
    /// D. Traces then show D after router `k`, the next node at its new address, and
    /// every later hop one TTL deeper ([`Detour::hops`]). The host and every router
    /// get routes to D's links, and the host's are checked to use the chain's veth, as
    /// [`Chain::create`] checks its own. IPv4 chains only. Dropping the [`Detour`]
    /// puts the routes back and removes D.
    pub fn detour(&self, k: usize) -> Detour {
        let routers = self.hops.len() - 1;
        assert!(
            self.host_ip.starts_with("198.19."),
            "detour: IPv4 chains only"
        );
        assert!(
            (1..=routers).contains(&k),
            "detour after router {k} of {routers}"
        );
        let (la, lb) = (routers + 1, routers + 2);
        assert!(
            lb <= 15,
            "detour: no free /28 left on a chain of {routers} routers"
        );
        let pid = std::process::id();
        // 198.19.{third}: the chain's /24, from the host's address.
        let base = self.host_ip.rsplit_once('.').expect("an IPv4 address").0;
        let third = base.rsplit_once('.').expect("an IPv4 address").1;
        let addr = |link: usize, far: bool| format!("{base}.{}", 16 * link + 1 + usize::from(far));
        let subnet = |link: usize| format!("{base}.{}/28", 16 * link);
        let ns = format!("imnc-{third}-d{k}-{pid}");
        let next_is_dest = k == routers;
        let near_ns = self.router(k).to_string();
        let next_ns = self.namespaces[k].clone();
        let mut hops: Vec<String> = self.hops[..k].to_vec();
        hops.push(addr(la, true));
        // The destination answers from the address traced; a router from the
        // address that faces the host, now on D's link.
        hops.push(if next_is_dest {
            self.dest_ip.clone()
        } else {
            addr(lb, true)
        });
        hops.extend(self.hops[k + 1..].iter().cloned());
        // Put back on drop: the next node's routes back (or its default route, for
        // the destination), router k's routes forward, then the routes to D's links;
        // D goes last, with its veths.
        let mut restore = Vec::new();
        if next_is_dest {
            restore.push(format!(
                "ip -n {next_ns} route replace default via {}",
                addr(k, false)
            ));
        } else {
            for link in 0..k {
                restore.push(format!(
                    "ip -n {next_ns} route replace {} via {}",
                    subnet(link),
                    addr(k, false)
                ));
            }
        }
        for link in k + 1..=routers {
            restore.push(format!(
                "ip -n {near_ns} route replace {} via {}",
                subnet(link),
                addr(k, true)
            ));
        }
        if next_is_dest {
            restore.push(format!("ip -n {near_ns} route del {}/32", self.dest_ip));
        }
        // The other routers' routes to D's links (those of router k and of the next
        // node go with D's veths).
        let mut elsewhere: Vec<(String, usize, String)> = Vec::new();
        for link in [la, lb] {
            for i in 1..k {
                elsewhere.push((self.router(i).to_string(), link, addr(i, true)));
            }
            for i in k + 2..=routers {
                elsewhere.push((self.router(i).to_string(), link, addr(i - 1, false)));
            }
            restore.push(format!(
                "ip route del {} via {}",
                subnet(link),
                addr(0, true)
            ));
        }
        for (r, link, _) in &elsewhere {
            restore.push(format!("ip -n {r} route del {}", subnet(*link)));
        }
        let detour = Detour {
            ns: ns.clone(),
            hops,
            restore,
        };
        let run = |s: String| {
            let (ok, out) = sh(&s);
            assert!(ok, "{s}: {out}");
        };
        run(format!("ip netns add {ns}"));
        run(format!("ip -n {ns} link set lo up"));
        run(format!(
            "ip netns exec {ns} sysctl -qw net.ipv4.ip_forward=1 net.ipv4.icmp_ratelimit=0"
        ));
        // Link a: router k (near) to D (far); link b: D (near) to the next node (far).
        for (link, near, far) in [(la, &near_ns, &ns), (lb, &ns, &next_ns)] {
            let (a, b) = (
                format!("c{third}x{link}a{pid}"),
                format!("c{third}x{link}b{pid}"),
            );
            run(format!("ip link add {a} type veth peer name {b}"));
            run(format!("ip link set {a} netns {near}"));
            run(format!("ip link set {b} netns {far}"));
            run(format!(
                "ip -n {near} addr add {}/28 dev {a}",
                addr(link, false)
            ));
            run(format!("ip -n {near} link set {a} up"));
            run(format!(
                "ip -n {far} addr add {}/28 dev {b}",
                addr(link, true)
            ));
            run(format!("ip -n {far} link set {b} up"));
        }
        // D: the links before router k's right one through router k, those after it
        // (or the destination, when it is the next node) through the next node.
        for link in 0..k {
            run(format!(
                "ip -n {ns} route add {} via {}",
                subnet(link),
                addr(la, false)
            ));
        }
        for link in k + 1..=routers {
            run(format!(
                "ip -n {ns} route add {} via {}",
                subnet(link),
                addr(lb, true)
            ));
        }
        if next_is_dest {
            run(format!(
                "ip -n {ns} route add {}/32 via {}",
                self.dest_ip,
                addr(lb, true)
            ));
        }
        // Everyone else reaches D's links: the host and the routers before k toward
        // the destination, router k and the next node through D, the nodes after
        // the next one back toward the host (the destination by its default route).
        for link in [la, lb] {
            run(format!(
                "ip route add {} via {} dev {}",
                subnet(link),
                addr(0, true),
                self.host_if
            ));
        }
        for (r, link, via) in &elsewhere {
            run(format!("ip -n {r} route add {} via {via}", subnet(*link)));
        }
        run(format!(
            "ip -n {near_ns} route add {} via {}",
            subnet(lb),
            addr(la, true)
        ));
        if !next_is_dest {
            run(format!(
                "ip -n {next_ns} route add {} via {}",
                subnet(la),
                addr(lb, false)
            ));
        }
        // The move: back through D first, then forward.
        if next_is_dest {
            run(format!(
                "ip -n {next_ns} route replace default via {}",
                addr(lb, false)
            ));
        } else {
            for link in 0..k {
                run(format!(
                    "ip -n {next_ns} route replace {} via {}",
                    subnet(link),
                    addr(lb, false)
                ));
            }
        }
        for link in k + 1..=routers {
            run(format!(
                "ip -n {near_ns} route replace {} via {}",
                subnet(link),
                addr(la, true)
            ));
        }
        // The destination is on router k's own link when it is the next node.
        if next_is_dest {
            run(format!(
                "ip -n {near_ns} route add {}/32 via {}",
                self.dest_ip,
                addr(la, true)
            ));
        }
        // Nothing may leave the machine: D's addresses are behind the chain's veth;
        // and the move took: router k sends toward the destination through D.
        for ip in [
            addr(la, false),
            addr(la, true),
            addr(lb, false),
            addr(lb, true),
        ] {
            let (ok, route) = sh(&format!("ip route get {ip}"));
            assert!(
                ok && route.contains(&format!("dev {} ", self.host_if)),
                "route to {ip}: {route}"
            );
        }
        let (ok, route) = sh(&format!("ip -n {near_ns} route get {}", self.dest_ip));
        assert!(
            ok && route.contains(&format!("via {} ", addr(la, true))),
            "router {k}'s route to {}: {route}",
            self.dest_ip
        );
        detour
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

/// A router namespace a [`Chain`]'s route goes through ([`Chain::detour`]). Dropping
/// it puts the chain's routes back and removes the namespace with its links.
pub struct Detour {
    /// D's namespace.
    pub ns: String,
    /// What a trace to the destination should show now, hop by hop.
    pub hops: Vec<String>,
    restore: Vec<String>,
}

impl Drop for Detour {
    fn drop(&mut self) {
        for s in &self.restore {
            let _ = sh(s);
        }
        let _ = sh(&format!("ip netns del {}", self.ns));
    }
}
