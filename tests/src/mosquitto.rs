//! Debian's Mosquitto as the project ships it: `deploy/mosquitto/mosquitto.conf`, with
//! this test's ports and paths, and the password and ACL files that
//! `deploy/mosquitto/imn-mosquitto-auth` writes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{free_port, program, wait_for, Proc};

/// The shipped files.
pub fn deploy_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/mosquitto")
        .join(name)
}

/// What to start.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    /// `(agent id, token)`: the agents the broker lets in.
    pub agents: Vec<(String, String)>,
    /// `--bridge-user` of imn-mosquitto-auth, one per bridge.
    pub bridge_users: Vec<String>,
    /// Turn the shipped TLS listener on (on loopback), with this certificate and key.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Leave out `use_username_as_clientid` (the config as it was before issue 23), to
    /// show what it prevents.
    pub without_clientid_binding: bool,
}

/// A running Mosquitto with the shipped configuration.
pub struct Mosquitto {
    pub proc: Proc,
    /// The plain listener, on 127.0.0.1.
    pub port: u16,
    /// The TLS listener, on 127.0.0.1, when asked for.
    pub tls_port: Option<u16>,
    /// The bridges' password file (imn-bridge --external-password-file).
    pub bridge_password_file: PathBuf,
    pub bridge_password: String,
    pub dir: PathBuf,
}

/// Runs imn-mosquitto-auth in `dir`; returns the bridges' password file.
pub fn write_auth(dir: &Path, agents: &[(String, String)], bridge_users: &[String]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut list = String::from("# id token\n");
    for (id, token) in agents {
        list.push_str(&format!("{id} {token}\n"));
    }
    std::fs::write(dir.join("agents.txt"), list).unwrap();
    let pass = dir.join("bridge.pass");
    std::fs::write(&pass, format!("{:032x}\n", rand::random::<u128>())).unwrap();
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(deploy_file("imn-mosquitto-auth"))
        .args(["--agents", dir.join("agents.txt").to_str().unwrap()])
        .args(["--bridge-password-file", pass.to_str().unwrap()])
        .args(["--out", dir.to_str().unwrap()]);
    for u in bridge_users {
        cmd.args(["--bridge-user", u]);
    }
    let out = cmd.output().expect("imn-mosquitto-auth");
    assert!(
        out.status.success(),
        "imn-mosquitto-auth: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    pass
}

/// The shipped mosquitto.conf with this test's listeners and files.
pub fn config(dir: &Path, port: u16, tls: Option<(u16, &Path, &Path)>, binding: bool) -> String {
    let shipped = std::fs::read_to_string(deploy_file("mosquitto.conf")).unwrap();
    assert!(
        shipped.lines().any(|l| l == "listener 1883 127.0.0.1"),
        "the shipped config listens in plain text on loopback only"
    );
    let mut out = Vec::new();
    let mut in_tls_block = false;
    for l in shipped.lines() {
        let line = if l == "listener 1883 127.0.0.1" {
            format!("listener {port} 127.0.0.1")
        } else if l.starts_with("password_file ") {
            format!("password_file {}", dir.join("passwd").display())
        } else if l.starts_with("acl_file ") {
            format!("acl_file {}", dir.join("acl").display())
        } else if l.starts_with("persistence_location ") {
            format!("persistence_location {}/", dir.display())
        } else if l == "#listener 8883" {
            in_tls_block = tls.is_some();
            match tls {
                Some((p, _, _)) => format!("listener {p} 127.0.0.1"),
                None => l.to_string(),
            }
        } else if in_tls_block && l.starts_with("#certfile ") {
            format!("certfile {}", tls.unwrap().1.display())
        } else if in_tls_block && l.starts_with("#keyfile ") {
            format!("keyfile {}", tls.unwrap().2.display())
        } else if in_tls_block && l.starts_with('#') && l.len() > 1 && !l.starts_with("# ") {
            l[1..].to_string()
        } else {
            if l.is_empty() {
                in_tls_block = false;
            }
            l.to_string()
        };
        if !binding && line.trim() == "use_username_as_clientid true" {
            continue;
        }
        out.push(line);
    }
    let conf = out.join("\n") + "\n";
    if tls.is_some() {
        assert!(
            conf.contains("certfile ") && conf.contains("keyfile "),
            "the TLS block moved: {conf}"
        );
    }
    conf
}

impl Mosquitto {
    /// Writes the auth files and the config into `dir` and starts Mosquitto.
    pub async fn start(dir: &Path, setup: &Setup) -> Mosquitto {
        let exe = program("mosquitto").expect("mosquitto (apt-get install mosquitto)");
        let pass = write_auth(dir, &setup.agents, &setup.bridge_users);
        let port = free_port();
        let tls_port = setup.tls.as_ref().map(|_| free_port());
        let tls = setup
            .tls
            .as_ref()
            .map(|(c, k)| (tls_port.unwrap(), c.as_path(), k.as_path()));
        let conf = config(dir, port, tls, !setup.without_clientid_binding);
        assert_eq!(
            conf.lines()
                .filter(|l| *l == "use_username_as_clientid true")
                .count(),
            if setup.without_clientid_binding {
                0
            } else {
                1 + usize::from(tls.is_some())
            },
            "{conf}"
        );
        let path = dir.join("mosquitto.conf");
        std::fs::write(&path, conf).unwrap();
        // Mosquitto started as root reads its files as the user `mosquitto`.
        let _ = std::process::Command::new("chown")
            .args(["-R", "mosquitto:", dir.to_str().unwrap()])
            .status();
        let proc = Proc::spawn("mosquitto", &exe, &["-c", path.to_str().unwrap()], dir);
        for p in std::iter::once(port).chain(tls_port) {
            wait_for(
                "mosquitto to listen",
                Duration::from_secs(20),
                || async move {
                    std::net::TcpStream::connect(("127.0.0.1", p))
                        .ok()
                        .map(|_| ())
                },
            )
            .await;
        }
        let bridge_password = std::fs::read_to_string(&pass).unwrap().trim().to_string();
        Mosquitto {
            proc,
            port,
            tls_port,
            bridge_password_file: pass,
            bridge_password,
            dir: dir.to_path_buf(),
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}
