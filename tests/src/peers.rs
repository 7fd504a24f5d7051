//! Peers the tests start for the measurement modules.
//!
//! The NTP responder is the tests' own: nothing that serves NTP can run here with a
//! clock other than the machine's, and a known offset is what the `ntp` module must
//! measure. It answers as a stratum-2 server whose clock is ahead of ours by a given
//! number of seconds, or misbehaves in a chosen way.

use std::net::UdpSocket;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How the NTP responder answers.
#[derive(Clone, Copy)]
pub enum NtpBehaviour {
    /// A synchronised stratum-2 server whose clock is ahead of ours by this many seconds.
    Offset(f64),
    Kiss(&'static [u8; 4]),
    Unsynchronised,
    /// Replies whose origin timestamp is not the request's transmit timestamp.
    WrongOrigin,
    Silent,
}

fn ntp_now(offset: f64) -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        + 2_208_988_800.0
        + offset;
    ((t.trunc() as u64) << 32) | ((t.fract() * 4_294_967_296.0) as u64)
}

/// Starts an NTP responder on `addr` (a loopback address with port 0); returns the
/// port. It serves until the test process ends.
pub fn ntp_responder(addr: &str, b: NtpBehaviour) -> u16 {
    let sock = UdpSocket::bind(addr).unwrap();
    let port = sock.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                return;
            };
            if n < 48 {
                continue;
            }
            let offset = match b {
                NtpBehaviour::Offset(o) => o,
                _ => 0.0,
            };
            let t2 = ntp_now(offset);
            let mut r = [0u8; 48];
            let version = (buf[0] >> 3) & 7;
            r[0] = (version << 3) | 4;
            r[1] = 2;
            r[2] = buf[2];
            r[3] = (-23i8) as u8;
            r[4..8].copy_from_slice(&0x0000_0800u32.to_be_bytes());
            r[8..12].copy_from_slice(&0x0000_1000u32.to_be_bytes());
            r[12..16].copy_from_slice(&[127, 0, 0, 53]);
            r[16..24].copy_from_slice(&(t2 - (16u64 << 32)).to_be_bytes());
            r[24..32].copy_from_slice(&buf[40..48]);
            r[32..40].copy_from_slice(&t2.to_be_bytes());
            match b {
                NtpBehaviour::Offset(_) => {}
                NtpBehaviour::Kiss(code) => {
                    r[1] = 0;
                    r[12..16].copy_from_slice(code);
                }
                NtpBehaviour::Unsynchronised => r[0] |= 3 << 6,
                NtpBehaviour::WrongOrigin => r[24] ^= 0xff,
                NtpBehaviour::Silent => continue,
            }
            // A little processing time, as a real server has.
            std::thread::sleep(Duration::from_micros(200));
            r[40..48].copy_from_slice(&ntp_now(offset).to_be_bytes());
            let _ = sock.send_to(&r, from);
        }
    });
    port
}

/// A real DNS server: dnsmasq (Debian's `dnsmasq-base`) on a loopback port, answering
/// from its own options for the zone `imn.test` and refusing to recurse anywhere.
pub struct Dnsmasq {
    child: std::process::Child,
    pub port: u16,
}

impl Dnsmasq {
    /// Starts dnsmasq with `records` (dnsmasq options such as
    /// `--host-record=www.imn.test,192.0.2.10`) and waits until it answers on TCP.
    pub fn start(records: &[&str]) -> Dnsmasq {
        let exe = crate::program("dnsmasq")
            .expect("dnsmasq is not installed (apt-get install dnsmasq-base)");
        let port = crate::free_port();
        let child = std::process::Command::new(exe)
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--except-interface=nonexistent",
                "--user=root",
                "--pid-file=",
                "--local=/imn.test/",
                &format!("--port={port}"),
            ])
            .args(records)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("dnsmasq");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "dnsmasq did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Dnsmasq { child, port }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real TLS server from another implementation: `openssl s_server -www` on a
/// loopback port, with a certificate for `localhost` and 127.0.0.1 signed by a CA that
/// `openssl` made for the test. It answers an HTTP GET with a status page.
pub struct OpensslServer {
    child: std::process::Child,
    pub port: u16,
    /// The CA that signed the server's certificate, PEM: the trust anchor to give.
    pub ca_pem: String,
    _dir: crate::TempDir,
}

impl OpensslServer {
    pub fn start() -> OpensslServer {
        let dir = crate::TempDir::new("openssl");
        let p = |f: &str| dir.path().join(f).to_str().unwrap().to_string();
        let (ca, ca_key, cert, key, csr, ext) = (
            p("ca.pem"),
            p("ca.key"),
            p("cert.pem"),
            p("key.pem"),
            p("leaf.csr"),
            p("leaf.ext"),
        );
        std::fs::write(
            &ext,
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
        for cmd in [
            format!("req -x509 {ec} -days 2 -subj '/CN=IMN test CA' -keyout {ca_key} -out {ca}"),
            format!("req {ec} -subj '/CN=localhost/O=IMN test' -keyout {key} -out {csr}"),
            format!(
                "x509 -req -in {csr} -CA {ca} -CAkey {ca_key} -set_serial 2 -days 2 \
                 -extfile {ext} -out {cert}"
            ),
        ] {
            let (ok, out) = crate::netns::sh(&format!("openssl {cmd}"));
            assert!(ok, "openssl {cmd}: {out}");
        }
        let port = crate::free_port();
        let child = std::process::Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl s_server");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "openssl s_server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        OpensslServer {
            child,
            port,
            ca_pem: std::fs::read_to_string(&ca).unwrap(),
            _dir: dir,
        }
    }
}

impl Drop for OpensslServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a Python script that reads `input` (Atlas results) as JSON on stdin with
/// RIPE's parser, ripe.atlas.sagan, and returns what the script prints, as JSON.
pub fn sagan(script: &str, input: &serde_json::Value) -> serde_json::Value {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (tests/run.sh installs it with ripe.atlas.sagan)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sagan could not parse {input}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the script prints JSON")
}
