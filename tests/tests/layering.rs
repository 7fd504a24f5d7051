//! The direction of dependencies between the workspace's crates, checked with
//! `cargo tree` (normal and build dependencies, each crate built alone, so cargo's
//! feature unification across the workspace hides nothing).
//!
//! - The backend library links neither the agent nor the probes (the code that sends
//!   packets), nor the bridge: what it shares with the bridge is in `imn-cloud`.
//! - The agent links nothing of the cloud: no backend, bridge, NATS or OpenTelemetry.
//! - Only the `imn` binary (`imn-cli`) links everything.

use std::collections::BTreeMap;
use std::process::Command;

/// `package name` → the features it is built with, in `krate`'s dependency tree.
fn tree(krate: &str) -> BTreeMap<String, String> {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-p",
            krate,
            "-e",
            "normal,build",
            "--prefix",
            "none",
            "-f",
            "{p}|{f}",
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree -p {krate}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let mut deps = BTreeMap::new();
    for line in text.lines() {
        let (p, f) = line.split_once('|').unwrap_or((line, ""));
        let name = p.split_whitespace().next().unwrap_or("").to_string();
        deps.insert(name, f.trim_end_matches(" (*)").to_string());
    }
    assert!(
        deps.contains_key(krate),
        "{krate} is in its own tree: {text}"
    );
    deps
}

fn assert_links_none(krate: &str, forbidden: &[&str]) {
    let deps = tree(krate);
    let found: Vec<&&str> = forbidden
        .iter()
        .filter(|f| deps.contains_key(**f))
        .collect();
    assert!(found.is_empty(), "{krate} links {found:?}");
}

#[test]
fn the_backend_links_neither_the_agent_nor_the_probes() {
    assert_links_none(
        "imn-backend",
        &[
            "imn-agent",
            "imn-probes",
            "imn-bridge",
            "imn-cli",
            "sled",
            "rumqttc",
            "rumqttd",
            // `imn certs` is the imn binary's.
            "rcgen",
        ],
    );
    let deps = tree("imn-backend");
    assert!(
        deps.contains_key("imn-proto"),
        "the backend uses the contract"
    );
}

#[test]
fn the_agent_links_nothing_of_the_cloud() {
    assert_links_none(
        "imn-agent",
        &[
            "imn-backend",
            "imn-bridge",
            "imn-cli",
            "imn-cloud",
            "async-nats",
            "opentelemetry",
            "rumqttd",
            "axum",
            "rusqlite",
        ],
    );
    // The Atlas converters are the backend's: the firmware leaves them out.
    let proto = &tree("imn-agent")["imn-proto"];
    assert!(
        !proto.contains("atlas"),
        "the agent builds imn-proto with {proto}"
    );
    assert!(
        tree("imn-backend")["imn-proto"].contains("atlas"),
        "the backend converts to Atlas"
    );
}

#[test]
fn the_bridge_links_neither_the_agent_nor_the_backend() {
    assert_links_none(
        "imn-bridge",
        &["imn-agent", "imn-backend", "imn-cli", "sled"],
    );
}

#[test]
fn the_contract_does_no_io() {
    assert_links_none(
        "imn-proto",
        &["tokio", "imn-probes", "imn-resolver", "socket2"],
    );
}

#[test]
fn the_bridge_and_the_cloud_link_no_probes() {
    for k in ["imn-bridge", "imn-cloud"] {
        assert_links_none(k, &["imn-probes", "imn-agent"]);
    }
}

#[test]
fn only_the_imn_binary_links_everything() {
    let deps = tree("imn-cli");
    for k in ["imn-agent", "imn-backend", "imn-bridge"] {
        assert!(deps.contains_key(k), "imn-cli links {k}");
    }
}
