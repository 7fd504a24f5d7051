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
