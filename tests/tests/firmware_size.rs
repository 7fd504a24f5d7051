//! The firmware's size controls (issue 26): the router profile really leaves the HTTP
//! stack and the WebAssembly runtime out, the size ledger reports the files that were built, and a file over its
//! budget fails `cross/build.sh`.
//!
//! These read what `cross/build.sh` made (tests/run.sh runs it first) and fail, saying
//! so, when it is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use imn_tests::TempDir;

const TARGETS: [(&str, &str); 3] = [
    // triple, binutils prefix
    ("aarch64-unknown-linux-musl", "aarch64-linux-gnu-"),
    ("armv7-unknown-linux-musleabihf", "arm-linux-gnueabihf-"),
    ("x86_64-unknown-linux-musl", ""),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn built(profile: &str, triple: &str, file: &str) -> PathBuf {
    let p = root()
        .join("target/firmware")
        .join(profile)
        .join(triple)
        .join(file);
    assert!(
        p.exists(),
        "{} is missing: run `bash cross/build.sh` first (tests/run.sh does)",
        p.display()
    );
    p
}

/// Demangled names of the functions in an unstripped binary.
fn functions(nm: &str, bin: &Path) -> String {
    let out = Command::new(nm)
        .args(["-C", "--defined-only"])
        .arg(bin)
        .output()
        .unwrap_or_else(|e| panic!("{nm}: {e}"));
    assert!(out.status.success(), "{nm} {}", bin.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Crates of the HTTP modules: in the full profile, in no router build.
const HTTP_STACK: [&str; 3] = ["hyper::", "h2::", "x509_parser::"];

#[test]
fn router_builds_leave_out_the_http_stack() {
    for (triple, prefix) in TARGETS {
        let nm = format!("{prefix}nm");
        let full = functions(&nm, &built("full", triple, "imn-agent.unstripped"));
        let router = functions(&nm, &built("router", triple, "imn-agent.unstripped"));
        for krate in HTTP_STACK {
            assert!(full.contains(krate), "{triple} full lacks {krate}");
            assert!(!router.contains(krate), "{triple} router links {krate}");
        }
        // Both keep the outbox, TLS to the broker, and the other modules.
        for krate in [
            "sled::",
            "rustls::",
            "imn_probes::traceroute",
            "imn_probes::dns",
        ] {
            assert!(full.contains(krate), "{triple} full lacks {krate}");
            assert!(router.contains(krate), "{triple} router lacks {krate}");
        }
        // The WebAssembly runtime (wasmi) is in the full profile only.
        assert!(full.contains("wasmi::"), "{triple} full lacks wasmi");
        assert!(!router.contains("wasmi::"), "{triple} router links wasmi");
        // The router's broker connection is TLS 1.3 only: no TLS 1.2 client code.
        assert!(full.contains("rustls::client::tls12"), "{triple} full");
        assert!(
            !router.contains("rustls::client::tls12"),
            "{triple} router has TLS 1.2"
        );
        // The shipped file is the stripped one, and smaller.
        let size = |f: &str| std::fs::metadata(built("router", triple, f)).unwrap().len();
        assert!(size("imn-agent") < size("imn-agent.unstripped"), "{triple}");
        let full_size = std::fs::metadata(built("full", triple, "imn-agent"))
            .unwrap()
            .len();
        assert!(
            size("imn-agent") < full_size,
            "{triple}: router {} not smaller than full {full_size}",
            size("imn-agent")
        );
    }
}

fn check_only(budgets: &Path, ledger: &Path) -> std::process::Output {
    Command::new("bash")
        .arg(root().join("cross/build.sh"))
        .arg("--check-only")
        .env("IMN_BUDGETS", budgets)
        .env("IMN_LEDGER", ledger)
        .output()
        .expect("bash cross/build.sh")
}

/// The ledger has a row with the exact size of every binary built, and its crate
/// tables; a budget passed fails the script naming the file, and the repository's
/// budgets pass.
#[test]
fn ledger_reports_the_build_and_budgets_fail_the_script() {
    let dir = TempDir::new("budgets");
    let ledger = dir.path().join("sizes.md");

    let out = check_only(&root().join("cross/budgets.txt"), &ledger);
    assert!(
        out.status.success(),
        "the repository's budgets: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&ledger).unwrap();
    for profile in ["full", "router"] {
        for (triple, _) in TARGETS {
            let bytes = std::fs::metadata(built(profile, triple, "imn-agent"))
                .unwrap()
                .len();
            let row = format!("| {profile} | {triple} | {bytes} B");
            assert!(text.contains(&row), "no row {row:?} in\n{text}");
            assert!(
                text.contains(&format!("## {profile}, {triple}")),
                "no crate table for {profile} {triple}"
            );
        }
    }
    assert!(
        text.contains("| sled |") && text.contains("| rustls |"),
        "{text}"
    );

    // One byte over: the script fails and names the file and the budget.
    let x86 = std::fs::metadata(built("full", "x86_64-unknown-linux-musl", "imn-agent"))
        .unwrap()
        .len();
    let tight = dir.path().join("budgets.txt");
    std::fs::write(
        &tight,
        format!(
            "# a test's budgets\nrouter x86_64-unknown-linux-musl bin 999999999\nfull x86_64-unknown-linux-musl bin {}\n",
            x86 - 1
        ),
    )
    .unwrap();
    let out = check_only(&tight, &ledger);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "over budget must fail: {stderr}");
    assert!(
        stderr.contains(&format!(
            "OVER BUDGET: full x86_64-unknown-linux-musl bin is {x86} bytes, budget {}",
            x86 - 1
        )),
        "{stderr}"
    );
    // Exactly at the budget passes.
    std::fs::write(
        &tight,
        format!("full x86_64-unknown-linux-musl bin {x86}\n"),
    )
    .unwrap();
    assert!(check_only(&tight, &ledger).status.success());
}
