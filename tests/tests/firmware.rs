//! The firmware that `cross/build.sh` makes: static binaries for aarch64, armv7 and
//! x86_64, their `.deb` and `.ipk` packages, and the aarch64 agent running under
//! qemu-user against a real x86 `imn up`.
//!
//! These tests need `cross/build.sh` to have run (tests/run.sh runs it first); they fail,
//! saying so, when its output is missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use imn_tests::{free_port, program, spawn_agent, wait_for, Proc, TempDir, Up};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

const TARGETS: [(&str, &str, &str, u16); 3] = [
    // triple, Debian arch, OpenWrt arch, ELF e_machine
    ("aarch64-unknown-linux-gnu", "arm64", "aarch64_generic", 183),
    (
        "armv7-unknown-linux-gnueabihf",
        "armhf",
        "arm_cortex-a7_neon-vfpv4",
        40,
    ),
    ("x86_64-unknown-linux-gnu", "amd64", "x86_64", 62),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

fn need(path: PathBuf) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: run `bash cross/build.sh` first (tests/run.sh does)",
        path.display()
    );
    path
}

fn firmware(triple: &str) -> PathBuf {
    need(root().join("target").join(triple).join("release/imn-agent"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `(mode, owner, path)` for each entry of a `tar -tv` listing.
fn tar_listing(text: &str) -> Vec<(String, String, String)> {
    text.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 6).then(|| {
                (
                    w[0].to_string(),
                    w[1].to_string(),
                    w[5].trim_start_matches('.').to_string(),
                )
            })
        })
        .collect()
}

fn entry<'a>(list: &'a [(String, String, String)], path: &str) -> &'a (String, String, String) {
    list.iter()
        .find(|e| e.2 == path)
        .unwrap_or_else(|| panic!("{path} not in the package: {list:?}"))
}

/// The ELF machine, and whether the file asks for an interpreter or shared libraries.
fn elf_machine_and_static(path: &Path) -> (u16, bool) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..4], b"\x7fELF", "{} is not ELF", path.display());
    let machine = u16::from_le_bytes([bytes[18], bytes[19]]);
    let headers = run(Command::new("readelf").args(["-l", "-d"]).arg(path));
    let dynamic = headers.contains("program interpreter") || headers.contains("(NEEDED)");
    (machine, !dynamic)
}

#[test]
fn binaries_are_static_for_each_target() {
    for (triple, _, _, machine) in TARGETS {
        let bin = firmware(triple);
        assert_eq!(elf_machine_and_static(&bin), (machine, true), "{triple}");
        let sections = run(Command::new("readelf").arg("-S").arg(&bin));
        assert!(!sections.contains(".symtab"), "{triple} is not stripped");
    }
}

#[test]
fn deb_packages_have_the_right_contents() {
    for (_, arch, _, machine) in TARGETS {
        let deb = need(
            root()
                .join("target/packages")
                .join(format!("imn-agent_{}_{arch}.deb", version())),
        );
        let field = |f: &str| run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(f));
        assert_eq!(field("Package").trim(), "imn-agent");
        assert_eq!(field("Version").trim(), version());
        assert_eq!(field("Architecture").trim(), arch);
        assert!(field("Installed-Size").trim().parse::<u64>().unwrap() > 100);
        assert!(field("Maintainer").contains('@'));
        let list = tar_listing(&run(Command::new("dpkg-deb").arg("-c").arg(&deb)));
        let bin = entry(&list, "/usr/bin/imn-agent");
        assert_eq!(
            (bin.0.as_str(), bin.1.as_str()),
            ("-rwxr-xr-x", "root/root")
        );
        let unit = entry(&list, "/lib/systemd/system/imn-agent.service");
        assert_eq!(unit.0, "-rw-r--r--");
        let conf = entry(&list, "/etc/imn/agent.toml");
        assert_eq!(conf.0, "-rw-r-----", "the config may hold the token");
        assert!(
            !list.iter().any(|e| e.2.starts_with("/var/lib/imn-agent")),
            "the outbox is not in the package, so dpkg never replaces it: {list:?}"
        );
        let x = TempDir::new("deb-x");
        run(Command::new("dpkg-deb").arg("-R").arg(&deb).arg(x.path()));
        let conffiles = std::fs::read_to_string(x.path().join("DEBIAN/conffiles")).unwrap();
        assert_eq!(conffiles.trim(), "/etc/imn/agent.toml");
        let unit =
            std::fs::read_to_string(x.path().join("lib/systemd/system/imn-agent.service")).unwrap();
        for line in [
            "User=imn-agent",
            "AmbientCapabilities=CAP_NET_RAW",
            "CapabilityBoundingSet=CAP_NET_RAW",
            "NoNewPrivileges=yes",
            "StateDirectory=imn-agent",
            "ExecStart=/usr/bin/imn-agent --config /etc/imn/agent.toml",
            "Restart=always",
        ] {
            assert!(
                unit.lines().any(|l| l == line),
                "unit lacks {line}:\n{unit}"
            );
        }
        for script in ["postinst", "prerm", "postrm"] {
            let mode = std::fs::metadata(x.path().join("DEBIAN").join(script))
                .unwrap()
                .permissions();
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(mode.mode() & 0o777, 0o755, "{script}");
        }
        let inside = x.path().join("usr/bin/imn-agent");
        assert_eq!(elf_machine_and_static(&inside), (machine, true), "{arch}");
        // The shipped config is valid for the agent it ships with.
        if arch == "amd64" {
            let data = TempDir::new("deb-cfg");
            let out = run(Command::new(&inside)
                .arg("--config")
                .arg(x.path().join("etc/imn/agent.toml"))
                .arg("--print-config")
                .env("IMN_DATA", data.path()));
            assert!(out.contains("broker = \"mqtt://127.0.0.1:1883\""), "{out}");
        }
    }
}

#[test]
fn ipk_packages_have_the_right_contents() {
    for (triple, _, arch, machine) in TARGETS {
        let ipk = need(
            root()
                .join("target/packages")
                .join(format!("imn-agent_{}_{arch}.ipk", version())),
        );
        let x = TempDir::new("ipk-x");
        // OpenWrt's layout: a gzipped tar of debian-binary, control.tar.gz, data.tar.gz.
        let outer = tar_listing(&run(Command::new("tar").arg("-tvzf").arg(&ipk)));
        let names: Vec<&str> = outer.iter().map(|e| e.2.as_str()).collect();
        assert_eq!(
            names,
            ["/debian-binary", "/control.tar.gz", "/data.tar.gz"],
            "{triple}"
        );
        run(Command::new("tar")
            .arg("-xzf")
            .arg(&ipk)
            .arg("-C")
            .arg(x.path()));
        assert_eq!(
            std::fs::read_to_string(x.path().join("debian-binary")).unwrap(),
            "2.0\n"
        );
        let control_list = tar_listing(&run(Command::new("tar")
            .arg("-tvzf")
            .arg(x.path().join("control.tar.gz"))));
        for (path, mode) in [
            ("/control", "-rw-r--r--"),
            ("/conffiles", "-rw-r--r--"),
            ("/postinst", "-rwxr-xr-x"),
            ("/prerm", "-rwxr-xr-x"),
        ] {
            assert_eq!(entry(&control_list, path).0, mode, "{path}");
        }
        let c = x.path().join("c");
        let d = x.path().join("d");
        std::fs::create_dir_all(&c).unwrap();
        std::fs::create_dir_all(&d).unwrap();
        run(Command::new("tar")
            .arg("-xzf")
            .arg(x.path().join("control.tar.gz"))
            .arg("-C")
            .arg(&c));
        let control = std::fs::read_to_string(c.join("control")).unwrap();
        for want in [
            "Package: imn-agent".to_string(),
            format!("Version: {}", version()),
            format!("Architecture: {arch}"),
        ] {
            assert!(control.lines().any(|l| l == want), "{want}:\n{control}");
        }
        assert_eq!(
            std::fs::read_to_string(c.join("conffiles")).unwrap().trim(),
            "/etc/config/imn"
        );
        let data_list = tar_listing(&run(Command::new("tar")
            .arg("-tvzf")
            .arg(x.path().join("data.tar.gz"))));
        for (path, mode) in [
            ("/usr/bin/imn-agent", "-rwxr-xr-x"),
            ("/etc/init.d/imn-agent", "-rwxr-xr-x"),
            ("/etc/config/imn", "-rw-------"),
        ] {
            let e = entry(&data_list, path);
            // Numeric owners, as OpenWrt's ipkg-build writes them: root is 0/0.
            assert_eq!((e.0.as_str(), e.1.as_str()), (mode, "0/0"), "{path}");
        }
        run(Command::new("tar")
            .arg("-xzf")
            .arg(x.path().join("data.tar.gz"))
            .arg("-C")
            .arg(&d));
        let init = std::fs::read_to_string(d.join("etc/init.d/imn-agent")).unwrap();
        for want in [
            "#!/bin/sh /etc/rc.common",
            "USE_PROCD=1",
            "    procd_set_param respawn 3600 5 0",
            "    procd_set_param command \"$PROG\" --uci \"$CONF\"",
            "    procd_add_reload_trigger imn",
        ] {
            assert!(
                init.lines().any(|l| l == want),
                "init lacks {want}:\n{init}"
            );
        }
        assert_eq!(
            elf_machine_and_static(&d.join("usr/bin/imn-agent")),
            (machine, true)
        );
        // The UCI file as shipped is a valid agent config (read by the x86_64 agent).
        let data = TempDir::new("ipk-cfg");
        let out = run(Command::new(firmware("x86_64-unknown-linux-gnu"))
            .arg("--uci")
            .arg(d.join("etc/config/imn"))
            .arg("--print-config")
            .env("IMN_DATA", data.path()));
        assert!(out.contains("heartbeat_ms = 60000"), "{out}");
        assert!(
            out.contains("broker = \"mqtt://imn-bridge.lan:1883\""),
            "{out}"
        );
    }
}

/// An empty dpkg database and the account files `useradd` edits, in a scratch root.
fn scratch_root(dir: &Path) {
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::write(dir.join("var/lib/dpkg/status"), "").unwrap();
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\n").unwrap();
    std::fs::write(dir.join("etc/shadow"), "root:*:19000:0:99999:7:::\n").unwrap();
    std::fs::write(dir.join("etc/gshadow"), "root:*::\n").unwrap();
}

fn dpkg(root_dir: &Path, args: &[&str]) -> String {
    run(Command::new("dpkg")
        .arg(format!("--root={}", root_dir.display()))
        // The maintainer scripts honour DPKG_ROOT, so they need no chroot.
        .arg("--force-script-chrootless")
        // passwd (for useradd) is on the host, not in the empty root.
        .arg("--force-depends")
        .args(args)
        .stdin(std::process::Stdio::null()))
}

fn account_id(file: &Path, name: &str) -> u32 {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f[0] == name).then(|| f[2].parse().unwrap())
        })
        .unwrap_or_else(|| panic!("{name} not in {}", file.display()))
}

#[test]
fn deb_install_upgrade_keeps_config_and_outbox_and_purge_removes_them() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let amd64 = need(
        root()
            .join("target/packages")
            .join(format!("imn-agent_{}_amd64.deb", version())),
    );
    let r = TempDir::new("dpkg-root");
    scratch_root(r.path());
    dpkg(r.path(), &["-i", amd64.to_str().unwrap()]);

    let uid = account_id(&r.path().join("etc/passwd"), "imn-agent");
    let gid = account_id(&r.path().join("etc/group"), "imn-agent");
    assert!(uid > 0 && gid > 0);
    let data = r.path().join("var/lib/imn-agent");
    let meta = std::fs::metadata(&data).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.permissions().mode() & 0o777),
        (uid, gid, 0o750)
    );
    let conf = r.path().join("etc/imn/agent.toml");
    let meta = std::fs::metadata(&conf).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.permissions().mode() & 0o777),
        (0, gid, 0o640)
    );

    // The user edits the config, and results wait in the outbox (written with the
    // agent's own outbox code, as a partition leaves them).
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text = text.replace("tags = []", "tags = [\"edited-by-user\"]");
    text = text.replace(
        "mqtt://127.0.0.1:1883",
        &format!("mqtt://127.0.0.1:{}", free_port()),
    );
    std::fs::write(&conf, &text).unwrap();
    imn_tests::bench_drain::prefill_outbox(&data, 500);
    std::fs::write(data.join("agent-id"), "edge-deb-1\n").unwrap();

    // Upgrade to a newer version of the same package.
    let out = TempDir::new("pkg-out");
    run(Command::new("bash")
        .arg(root().join("cross/package.sh"))
        .args(["deb", "x86_64-unknown-linux-gnu"])
        .env("IMN_PKG_VERSION", "99.0.0")
        .env("IMN_PKG_OUT", out.path()));
    let newer = out.path().join("imn-agent_99.0.0_amd64.deb");
    dpkg(r.path(), &["-i", newer.to_str().unwrap()]);
    let status = dpkg(r.path(), &["-s", "imn-agent"]);
    assert!(status.contains("Version: 99.0.0"), "{status}");
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        text,
        "the edited config survives"
    );
    // The upgraded binary, with the kept config, finds its id and all 500 results.
    let logs = TempDir::new("dpkg-agent");
    let installed = r.path().join("usr/bin/imn-agent");
    let args = [
        "--config",
        conf.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ];
    let printed = run(Command::new(&installed).args(args).arg("--print-config"));
    assert!(printed.contains("id = \"edge-deb-1\""), "{printed}");
    assert!(printed.contains("tags = [\"edited-by-user\"]"), "{printed}");
    let mut agent = Proc::spawn("upgraded-agent", &installed, &args, logs.path());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !agent.log_text().contains("agent starting") {
        assert!(std::time::Instant::now() < deadline, "{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.signal_and_wait(libc::SIGTERM, Duration::from_secs(10));
    let log = agent.log_text();
    assert!(
        log.contains("agent=edge-deb-1") && log.contains("depth=500"),
        "{log}"
    );

    dpkg(r.path(), &["--purge", "imn-agent"]);
    assert!(!data.exists(), "purge deletes the outbox");
    assert!(!conf.exists(), "purge deletes the config");
    assert!(!installed.exists());
}

/// Starts the aarch64 firmware under qemu-user.
fn qemu_agent(id: &str, broker: &str, dir: &Path) -> Proc {
    let qemu =
        program("qemu-aarch64-static").expect("qemu-aarch64-static (cross/build.sh installs it)");
    let fw = firmware("aarch64-unknown-linux-gnu");
    let data = dir.join(id);
    Proc::spawn(
        id,
        &qemu,
        &[
            fw.to_str().unwrap(),
            "--id",
            id,
            "--broker",
            broker,
            "--data",
            data.to_str().unwrap(),
            "--heartbeat-ms",
            "500",
        ],
        dir,
    )
}

async fn measure(up: &Up, agent: &str, module: &str, params: Value) -> Value {
    let r = up
        .api
        .post(
            &format!("/agent/{agent}/{module}?wait=60"),
            &params.to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{module}: {:?}", r.body);
    assert_eq!(r.body["state"], "succeeded", "{module}: {:?}", r.body);
    r.body["result"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aarch64_agent_under_qemu_works_against_x86_imn_up() {
    let up = Up::start(0, &[]).await;
    let dir = TempDir::new("qemu");
    // A host name, not an address: the static agent resolves it itself (/etc/hosts).
    let broker = format!("mqtt://localhost:{}", up.mqtt_port);
    let _agent = qemu_agent("qemu-arm64", &broker, dir.path());
    up.api.wait_alive(&["qemu-arm64"], T).await;
    let a = up.api.get("/agents/qemu-arm64").await.body;
    assert_eq!(a["arch"], "aarch64", "{a:?}");
    assert_eq!(a["version"], version());
    // Heartbeats arrive, with the system metrics the emulated agent read.
    let hb = wait_for("two heartbeats", T, || {
        let api = up.api.clone();
        async move {
            let first = api.get("/agents/qemu-arm64").await.body["heartbeat"].clone();
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let second = api.get("/agents/qemu-arm64").await.body["heartbeat"].clone();
            (!first.is_null() && second["sent_at_ms"] != first["sent_at_ms"]).then_some(second)
        }
    })
    .await;
    assert!(hb["sent_at_ms"].as_i64().unwrap() > 0, "{hb:?}");

    let echo = measure(
        &up,
        "qemu-arm64",
        "echo_module",
        json!({"message": "from arm64"}),
    )
    .await;
    assert_eq!(echo["message"], "from arm64");

    // tcping to the backend's own HTTP listener on loopback.
    let tc = measure(
        &up,
        "qemu-arm64",
        "tcping",
        json!({"host": "127.0.0.1", "port": up.http_port, "count": 3, "interval_ms": 50}),
    )
    .await;
    assert_eq!(
        (tc["sent"].as_u64(), tc["open"].as_u64()),
        (Some(3), Some(3)),
        "{tc:?}"
    );

    // ICMP under emulation: qemu-user passes raw sockets through (this runs as root).
    let ping = measure(
        &up,
        "qemu-arm64",
        "ping_module",
        json!({"targets": ["127.0.0.1"], "count": 3, "interval_ms": 20}),
    )
    .await;
    let t = &ping["targets"][0];
    assert_eq!(
        (t["sent"].as_u64(), t["received"].as_u64()),
        (Some(3), Some(3)),
        "{ping:?}"
    );
}

/// Firmware aborts on panic; the restarted agent reports the interrupted run as failed,
/// with the panic's message (the job procd or systemd does here is done by the test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_panic_is_reported_after_the_restart() {
    let up = Up::start(0, &[]).await;
    let dir = TempDir::new("abort");
    let fw = firmware("x86_64-unknown-linux-gnu");
    let data = dir.path().join("data");
    let broker = up.broker_url();
    let start = || {
        let hb = ["--heartbeat-ms", "500"];
        spawn_agent(&fw, "fw-x86", &broker, &data, &hb, dir.path())
    };
    let mut agent = start();
    up.api.wait_alive(&["fw-x86"], T).await;
    let r = up
        .api
        .post(
            "/agent/fw-x86/faulty_module",
            &json!({"message": "boom", "crash": true}).to_string(),
            &[],
        )
        .await;
    assert!(r.status == 200 || r.status == 202, "{:?}", r.body);
    let rid = r.body["request_id"].as_str().unwrap().to_string();
    let status = agent
        .wait_exit(T)
        .expect("the firmware agent aborts on a panic");
    assert!(!status.success());
    assert!(data.join("last-panic").exists());
    let _again = start();
    let st = up.api.wait_state(&rid, "failed", T).await;
    let res = up
        .api
        .get(&format!("/agents/fw-x86/results/{rid}"))
        .await
        .body;
    let text = res.to_string();
    assert!(
        text.contains("panicked") && text.contains("crash requested (boom)"),
        "{st:?} {res:?}"
    );
    assert!(!data.join("last-panic").exists(), "read once");
}

/// A real DNS server (dnsmasq, from Debian) on a free loopback port, serving `names`
/// (`ADDR NAME` lines, as in /etc/hosts) and one CNAME.
struct Dns {
    _proc: Proc,
    port: u16,
}

fn start_dnsmasq(dir: &Path, hosts: &str) -> Dns {
    let dnsmasq = program("dnsmasq").expect("dnsmasq (tests/run.sh installs it)");
    let port = free_port();
    let file = dir.join("dns-hosts");
    std::fs::write(&file, hosts).unwrap();
    let proc = Proc::spawn(
        "dnsmasq",
        &dnsmasq,
        &[
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            &format!("--port={port}"),
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            "--pid-file=",
            "--log-facility=-",
            &format!("--addn-hosts={}", file.display()),
            "--cname=alias.imn.test,broker.imn.test",
            // Names under imn.test that it does not know get NXDOMAIN, not REFUSED.
            "--local=/imn.test/",
        ],
        dir,
    );
    // Up when it answers over TCP (it serves both).
    wait_listening(port, "dnsmasq");
    Dns { _proc: proc, port }
}

/// Waits up to 10 s for a TCP listener on 127.0.0.1:`port`.
fn wait_listening(port: u16, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The static agent has no NSS: it finds its broker and its targets through its own
/// resolver, here asking a real DNS server (with a CNAME and a reply too big for UDP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_agent_resolves_names_over_dns_itself() {
    let up = Up::start(0, &[]).await;
    let dir = TempDir::new("dns");
    // 60 addresses for one name: 960 bytes of answers, past the 512 bytes of a UDP
    // reply without EDNS, so the resolver must retry over TCP.
    let mut hosts = String::from("127.0.0.1 broker.imn.test\n::1 broker.imn.test\n");
    for i in 1..=60 {
        hosts.push_str(&format!("127.0.2.{i} many.imn.test\n"));
    }
    let dns = start_dnsmasq(dir.path(), &hosts);
    let fw = firmware("x86_64-unknown-linux-gnu");
    let data = dir.path().join("data");
    let broker = format!("mqtt://alias.imn.test:{}", up.mqtt_port);
    let ns = format!("127.0.0.1:{}", dns.port);
    let extra = ["--nameservers", &ns, "--heartbeat-ms", "500"];
    let _agent = spawn_agent(&fw, "dns-agent", &broker, &data, &extra, dir.path());
    up.api.wait_alive(&["dns-agent"], T).await;
    let tc = measure(
        &up,
        "dns-agent",
        "tcping",
        json!({"host": "broker.imn.test", "port": up.http_port, "count": 2, "interval_ms": 20}),
    )
    .await;
    assert_eq!(tc["addr"], "127.0.0.1", "IPv4 first: {tc:?}");
    assert_eq!(tc["open"], 2, "{tc:?}");
    let ping = measure(
        &up,
        "dns-agent",
        "ping_module",
        json!({"targets": ["many.imn.test", "missing.imn.test"], "count": 1}),
    )
    .await;
    let many = &ping["targets"][0];
    assert!(
        many["addr"].as_str().unwrap().starts_with("127.0.2."),
        "the TCP retry found the big answer: {ping:?}"
    );
    assert_eq!(many["received"], 1, "{ping:?}");
    let missing = &ping["targets"][1];
    assert!(
        missing["error"].as_str().unwrap().contains("no such name"),
        "{ping:?}"
    );
}

/// A development CA and a server certificate for `names` (openssl, from Debian).
fn make_certs(dir: &Path, names: &str) {
    let sh = |cmd: &str| run(Command::new("sh").arg("-c").arg(cmd).current_dir(dir));
    sh(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout ca.key -out ca.pem -days 2 -subj /CN=imn-test-ca 2>/dev/null",
    );
    sh(
        "openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout server.key -out server.csr -subj /CN=imn-test-broker 2>/dev/null",
    );
    std::fs::write(
        dir.join("ext.cnf"),
        format!("subjectAltName={names}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
    )
    .unwrap();
    sh(
        "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
        -out server.pem -days 2 -extfile ext.cnf 2>/dev/null",
    );
}

/// Mosquitto with a TLS listener for the agent and a plain one for the test's subscriber.
fn start_tls_mosquitto(dir: &Path) -> (Proc, u16, u16) {
    let (tls_port, plain_port) = (free_port(), free_port());
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "user root\nper_listener_settings false\nallow_anonymous true\n\
             listener {tls_port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n\
             listener {plain_port} 127.0.0.1\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let mosquitto = program("mosquitto").expect("mosquitto (tests/run.sh installs it)");
    let p = Proc::spawn(
        "mosquitto",
        &mosquitto,
        &["-c", conf.to_str().unwrap()],
        dir,
    );
    wait_listening(plain_port, "mosquitto");
    (p, tls_port, plain_port)
}

/// Waits for the agent's hello on the plain listener; `None` if none comes in `secs`.
fn hello_seen(plain_port: u16, id: &str, secs: u32) -> Option<String> {
    let sub = program("mosquitto_sub").expect("mosquitto_sub (mosquitto-clients)");
    let out = Command::new(sub)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &plain_port.to_string(),
            "-v",
            "-C",
            "1",
        ])
        .args(["-W", &secs.to_string(), "-t", &format!("imn/v1/{id}/hello")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    (out.status.success() && text.starts_with(&format!("imn/v1/{id}/hello"))).then_some(text)
}

/// The static firmware speaks MQTT over TLS (rustls, ring) to a real Mosquitto, checks
/// the certificate against the configured CA and the broker's *name* (the agent
/// connects to the address it resolved), and refuses a certificate for another name.
#[test]
fn static_agent_connects_over_tls_and_checks_the_name() {
    let dir = TempDir::new("tls");
    make_certs(dir.path(), "DNS:localhost");
    let (_mosq, tls_port, plain_port) = start_tls_mosquitto(dir.path());
    let fw = firmware("x86_64-unknown-linux-gnu");
    let ca = dir.path().join("ca.pem");
    let spawn = |id: &str, broker: String| {
        let extra = ["--tls-ca", ca.to_str().unwrap(), "--heartbeat-ms", "500"];
        spawn_agent(&fw, id, &broker, &dir.path().join(id), &extra, dir.path())
    };
    // Retained hellos would let a later subscriber see an old one: each case has its
    // own id, and the subscriber starts before the agent does.
    let good = std::thread::spawn(move || hello_seen(plain_port, "tls-good", 20));
    std::thread::sleep(Duration::from_millis(300));
    let _a = spawn("tls-good", format!("mqtts://localhost:{tls_port}"));
    assert!(good.join().unwrap().is_some(), "no hello over TLS");

    // The same certificate, reached under a name it does not carry.
    let wrong = std::thread::spawn(move || hello_seen(plain_port, "tls-wrong-name", 4));
    std::thread::sleep(Duration::from_millis(300));
    let b = spawn("tls-wrong-name", format!("mqtts://127.0.0.1:{tls_port}"));
    assert!(
        wrong.join().unwrap().is_none(),
        "a certificate for another name was accepted"
    );
    let log = b.log_text();
    assert!(
        log.contains("NotValidForName") || log.contains("not valid for name"),
        "{log}"
    );
}
