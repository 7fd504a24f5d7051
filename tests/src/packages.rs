//! Helpers for the package tests: running a command to success, and dpkg in a
//! scratch root (`dpkg --root`), as tests/tests/firmware.rs and lifecycle.rs use them.

use std::path::Path;
use std::process::Command;

/// Runs a command to success and returns its stdout; fails the test with its output
/// otherwise.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An empty dpkg database and the account files `useradd` edits, in a scratch root.
pub fn scratch_root(dir: &Path) {
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::write(dir.join("var/lib/dpkg/status"), "").unwrap();
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\n").unwrap();
    std::fs::write(dir.join("etc/shadow"), "root:*:19000:0:99999:7:::\n").unwrap();
    std::fs::write(dir.join("etc/gshadow"), "root:*::\n").unwrap();
}

/// dpkg on the scratch root, its maintainer scripts run without a chroot (they honour
/// DPKG_ROOT).
pub fn dpkg(root_dir: &Path, args: &[&str]) -> String {
    run(Command::new("dpkg")
        .arg(format!("--root={}", root_dir.display()))
        // The maintainer scripts honour DPKG_ROOT, so they need no chroot.
        .arg("--force-script-chrootless")
        // passwd (for useradd) is on the host, not in the empty root.
        .arg("--force-depends")
        .args(args)
        .stdin(std::process::Stdio::null()))
}
