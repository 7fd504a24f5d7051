//! The firmware that `cross/build.sh` makes: static musl binaries of imn-agent for
//! aarch64, armv7 and x86_64 in two module profiles (`full`: every module; `router`: no
//! `http` or `tls_cert`), and their packages: a `.deb` of the full profile per Debian
//! architecture, and two `.ipk` per OpenWrt architecture (`imn-agent`, the router
//! profile, and `imn-agent-full`, which provides and conflicts with it).
//!
//! Every one of the six binaries runs against a real x86 `imn up` (aarch64 under
//! qemu-aarch64-static, armv7 under qemu-arm-static, x86_64 natively): its hello names
//! its architecture, version and exactly its profile's modules, and it measures on
//! loopback with echo, ping (raw ICMP), tcping, dns (a local dnsmasq), traceroute and
//! either http and tls_cert (full) or, for the modules it lacks, the backend's 409
//! naming the modules it has (router). The x86_64 build also shows the .deb installed,
//! upgraded and purged in a scratch root, a panic reported after the restart, names
//! resolved without NSS, and MQTT over TLS to Mosquitto (both profiles).
//!
//! These tests need `cross/build.sh` to have run (tests/run.sh runs it first); they fail,
//! saying so, when its output is missing. They run as root (raw sockets, dpkg --root).
//! All their traffic stays on 127.0.0.0/8 and ::1.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use imn_tests::packages::{dpkg, run, scratch_root};
use imn_tests::peers::{self, OpensslServer};
use imn_tests::{free_port, program, spawn_agent, wait_for, Proc, TempDir, Up};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

/// One firmware target.
#[derive(Clone, Copy, Debug)]
struct Target {
    triple: &'static str,
    deb_arch: &'static str,
    ipk_arch: &'static str,
    /// ELF e_machine.
    machine: u16,
    /// `std::env::consts::ARCH` of the binary: what its hello reports.
    arch: &'static str,
    /// The qemu-user emulator that runs it here; None: it runs natively.
    qemu: Option<&'static str>,
}

const AARCH64: Target = Target {
    triple: "aarch64-unknown-linux-musl",
    deb_arch: "arm64",
    ipk_arch: "aarch64_generic",
    machine: 183,
    arch: "aarch64",
    qemu: Some("qemu-aarch64-static"),
};
const ARMV7: Target = Target {
    triple: "armv7-unknown-linux-musleabihf",
    deb_arch: "armhf",
    ipk_arch: "arm_cortex-a7_neon-vfpv4",
    machine: 40,
    arch: "arm",
    qemu: Some("qemu-arm-static"),
};
const X86_64: Target = Target {
    triple: "x86_64-unknown-linux-musl",
    deb_arch: "amd64",
    ipk_arch: "x86_64",
    machine: 62,
    arch: "x86_64",
    qemu: None,
};
const TARGETS: [Target; 3] = [AARCH64, ARMV7, X86_64];

/// The module sets `cross/build.sh --profile` builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Profile {
    /// Every module.
    Full,
    /// Without [`ROUTER_LACKS`] (`--no-default-features --features router`).
    Router,
}
const PROFILES: [Profile; 2] = [Profile::Full, Profile::Router];

/// The modules the router profile leaves out.
const ROUTER_LACKS: [&str; 2] = ["http", "tls_cert"];

impl Profile {
    fn name(self) -> &'static str {
        match self {
            Profile::Full => "full",
            Profile::Router => "router",
        }
    }

    /// The modules a build of this profile has, sorted: the full profile has every
    /// module of the catalog.
    fn modules(self) -> Vec<&'static str> {
        let mut m: Vec<&str> = imn_proto::catalog::names()
            .into_iter()
            .filter(|m| self == Profile::Full || !ROUTER_LACKS.contains(m))
            .collect();
        m.sort_unstable();
        m
    }

    /// The name of its .ipk.
    fn ipk_package(self) -> &'static str {
        match self {
            Profile::Full => "imn-agent-full",
            Profile::Router => "imn-agent",
        }
    }
}

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

fn firmware_dir(t: Target, p: Profile) -> PathBuf {
    root().join("target/firmware").join(p.name()).join(t.triple)
}

/// The stripped binary that ships.
fn firmware(t: Target, p: Profile) -> PathBuf {
    need(firmware_dir(t, p).join("imn-agent"))
}

fn package(name: String) -> PathBuf {
    need(root().join("target/packages").join(name))
}

/// A command that runs `bin`, a binary for `t`: under its emulator, or natively.
fn command_for(t: Target, bin: &Path) -> Command {
    match t.qemu {
        Some(q) => {
            let qemu = program(q).unwrap_or_else(|| panic!("{q} (cross/build.sh installs it)"));
            let mut c = Command::new(qemu);
            c.arg(bin);
            c
        }
        None => Command::new(bin),
    }
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

/// Whether the symbol table of `path` names anything of `krate` (legacy or v0
/// mangling: the crate name with its length before it).
fn has_crate_symbols(symbols: &str, krate: &str) -> bool {
    symbols.contains(&format!("{}{krate}", krate.len()))
}

#[test]
fn binaries_are_static_for_each_target_and_profile() {
    for t in TARGETS {
        let mut sizes = Vec::new();
        for p in PROFILES {
            let what = format!("{} {}", t.triple, p.name());
            let bin = firmware(t, p);
            assert_eq!(elf_machine_and_static(&bin), (t.machine, true), "{what}");
            let sections = run(Command::new("readelf").arg("-S").arg(&bin));
            assert!(!sections.contains(".symtab"), "{what} is not stripped");
            if t.machine == 40 {
                let header = run(Command::new("readelf").arg("-h").arg(&bin));
                assert!(header.contains("hard-float ABI"), "{what}:\n{header}");
            }
            // The symbols are kept beside it (for the size ledger and for crash
            // addresses): the same program, unstripped.
            let full = need(firmware_dir(t, p).join("imn-agent.unstripped"));
            assert_eq!(elf_machine_and_static(&full), (t.machine, true), "{what}");
            let symbols = run(Command::new("readelf").arg("-sW").arg(&full));
            assert!(
                symbols.lines().count() > 1000,
                "{what}: imn-agent.unstripped has no symbol table"
            );
            // The router profile leaves out the HTTP and X.509 crates; the full one
            // has them.
            for krate in ["hyper", "h2", "x509_parser"] {
                assert_eq!(
                    has_crate_symbols(&symbols, krate),
                    p == Profile::Full,
                    "{what}: symbols of {krate}"
                );
            }
            for krate in ["rumqttc", "sled", "rustls", "imn_probes"] {
                assert!(has_crate_symbols(&symbols, krate), "{what}: {krate}");
            }
            sizes.push(std::fs::metadata(&bin).unwrap().len());
        }
        assert!(
            sizes[1] < sizes[0],
            "{}: the router build ({} B) is smaller than the full one ({} B)",
            t.triple,
            sizes[1],
            sizes[0]
        );
    }
}

#[test]
fn deb_packages_have_the_right_contents() {
    for t in TARGETS {
        let arch = t.deb_arch;
        let deb = package(format!("imn-agent_{}_{arch}.deb", version()));
        let field = |f: &str| run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(f));
        assert_eq!(field("Package").trim(), "imn-agent");
        assert_eq!(field("Version").trim(), version());
        assert_eq!(field("Architecture").trim(), arch);
        assert!(field("Installed-Size").trim().parse::<u64>().unwrap() > 100);
        assert!(field("Maintainer").contains('@'));
        // The .deb is the full profile, and says so.
        let description = field("Description");
        assert!(
            description.contains("(full)") && description.contains("http, tls_cert"),
            "{description}"
        );
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
        assert_eq!(elf_machine_and_static(&inside), (t.machine, true), "{arch}");
        assert!(
            std::fs::read(&inside).unwrap() == std::fs::read(firmware(t, Profile::Full)).unwrap(),
            "{arch}: the packaged binary is target/firmware/full/{}/imn-agent",
            t.triple
        );
        // The shipped config is valid for the agent it ships with (run under qemu-user
        // for the foreign architectures).
        let data = TempDir::new("deb-cfg");
        let out = run(command_for(t, &inside)
            .arg("--config")
            .arg(x.path().join("etc/imn/agent.toml"))
            .arg("--print-config")
            .env("IMN_DATA", data.path()));
        assert!(
            out.contains("broker = \"mqtt://127.0.0.1:1883\""),
            "{arch}: {out}"
        );
    }
}

#[test]
fn ipk_packages_have_the_right_contents() {
    for t in TARGETS {
        for p in PROFILES {
            let arch = t.ipk_arch;
            let name = p.ipk_package();
            let what = format!("{name} {arch}");
            let ipk = package(format!("{name}_{}_{arch}.ipk", version()));
            let x = TempDir::new("ipk-x");
            // OpenWrt's layout: a gzipped tar of debian-binary, control.tar.gz, data.tar.gz.
            let outer = tar_listing(&run(Command::new("tar").arg("-tvzf").arg(&ipk)));
            let names: Vec<&str> = outer.iter().map(|e| e.2.as_str()).collect();
            assert_eq!(
                names,
                ["/debian-binary", "/control.tar.gz", "/data.tar.gz"],
                "{what}"
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
                assert_eq!(entry(&control_list, path).0, mode, "{what} {path}");
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
                format!("Package: {name}"),
                format!("Version: {}", version()),
                format!("Architecture: {arch}"),
                format!("SourceName: {name}"),
            ] {
                assert!(control.lines().any(|l| l == want), "{want}:\n{control}");
            }
            // The full variant stands in for imn-agent, as OpenWrt names its variants:
            // opkg installs one or the other, never both.
            let variant = control
                .lines()
                .filter(|l| l.starts_with("Provides:") || l.starts_with("Conflicts:"))
                .collect::<Vec<_>>();
            let description = control
                .lines()
                .find(|l| l.starts_with("Description: "))
                .unwrap_or_else(|| panic!("{what}: no Description:\n{control}"));
            match p {
                Profile::Full => {
                    assert_eq!(
                        variant,
                        ["Provides: imn-agent", "Conflicts: imn-agent"],
                        "{control}"
                    );
                    assert!(
                        description.contains("(full)") && description.contains("http, tls_cert"),
                        "{description}"
                    );
                }
                Profile::Router => {
                    assert!(variant.is_empty(), "{control}");
                    assert!(
                        description.contains("(router)")
                            && description.contains("no http or tls_cert"),
                        "{description}"
                    );
                }
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
                assert_eq!((e.0.as_str(), e.1.as_str()), (mode, "0/0"), "{what} {path}");
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
            let inside = d.join("usr/bin/imn-agent");
            assert_eq!(elf_machine_and_static(&inside), (t.machine, true), "{what}");
            assert!(
                std::fs::read(&inside).unwrap() == std::fs::read(firmware(t, p)).unwrap(),
                "{what}: the packaged binary is target/firmware/{}/{}/imn-agent",
                p.name(),
                t.triple
            );
            // The UCI file as shipped is a valid config for the agent it ships with
            // (run under qemu-user for the foreign architectures).
            let data = TempDir::new("ipk-cfg");
            let out = run(command_for(t, &inside)
                .arg("--uci")
                .arg(d.join("etc/config/imn"))
                .arg("--print-config")
                .env("IMN_DATA", data.path()));
            assert!(out.contains("heartbeat_ms = 60000"), "{what}: {out}");
            assert!(
                out.contains("broker = \"mqtt://imn-bridge.lan:1883\""),
                "{what}: {out}"
            );
        }
    }
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
    let amd64 = package(format!("imn-agent_{}_amd64.deb", version()));
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
        .args(["deb", X86_64.triple, "full"])
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

/// Starts the firmware of `t` and `p` (under its emulator for a foreign architecture)
/// with its own data directory in `dir`, and `more` flags.
fn start_firmware(
    t: Target,
    p: Profile,
    id: &str,
    broker: &str,
    dir: &Path,
    more: &[&str],
) -> Proc {
    let fw = firmware(t, p);
    let data = dir.join(id);
    let mut extra = vec!["--heartbeat-ms", "500"];
    extra.extend_from_slice(more);
    match t.qemu {
        Some(q) => {
            let qemu = program(q).unwrap_or_else(|| panic!("{q} (cross/build.sh installs it)"));
            let mut args = vec![
                fw.to_str().unwrap(),
                "--id",
                id,
                "--broker",
                broker,
                "--data",
                data.to_str().unwrap(),
            ];
            args.extend_from_slice(&extra);
            Proc::spawn(id, &qemu, &args, dir)
        }
        None => spawn_agent(&fw, id, broker, &data, &extra, dir),
    }
}

/// Runs `module` on `agent`, waits for the result, and returns it (it must succeed).
async fn measure(up: &Up, agent: &str, module: &str, params: Value) -> Value {
    let r = up
        .api
        .post(
            &format!("/agent/{agent}/{module}?wait=60"),
            &params.to_string(),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{agent} {module}: {:?}", r.body);
    assert_eq!(
        r.body["state"], "succeeded",
        "{agent} {module}: {:?}",
        r.body
    );
    r.body["result"].clone()
}

fn ms(v: &Value) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{v:?} is not a number of ms"))
}

/// One firmware build against a real `imn up`: the hello, heartbeats, and a run of
/// each module its profile has (echo, ping, tcping, dns, traceroute, mtr, ntp, and for
/// the full profile http and tls_cert), or the backend's refusal of those it lacks, all
/// on loopback.
async fn firmware_agent_works_against_imn_up(t: Target, p: Profile) {
    let fw = firmware(t, p);
    let id = format!("fw-{}-{}", t.arch, p.name());
    let dir = TempDir::new(&id);
    // A key for WebAssembly modules, trusted by the backend and the agent.
    let (module_key, module_pub) = imn_tests::wasm::keygen(dir.path(), "modules.key");
    let up = Up::start(0, &["--release-keys", &module_pub]).await;
    let dns = start_dnsmasq(
        dir.path(),
        "127.0.0.1 broker.imn.test\n::1 broker.imn.test\n",
    );
    // A host name, not an address: the static agent resolves it itself (/etc/hosts).
    let broker = format!("mqtt://localhost:{}", up.mqtt_port);
    let _agent = start_firmware(
        t,
        p,
        &id,
        &broker,
        dir.path(),
        &["--module-keys", &module_pub],
    );
    up.api.wait_alive(&[&id], T).await;

    // The hello: the binary's architecture and version, and exactly its profile's
    // modules, each with the catalog's version and schema hash.
    let a = up.api.get(&format!("/agents/{id}")).await.body;
    assert_eq!(a["arch"], t.arch, "{} ({}): {a:?}", fw.display(), t.triple);
    assert_eq!(a["version"], version(), "{a:?}");
    let listed = a["modules"].as_array().expect("modules").clone();
    let mut names: Vec<&str> = listed
        .iter()
        .map(|m| m["name"].as_str().expect("module name"))
        .collect();
    names.sort_unstable();
    assert_eq!(names, p.modules(), "{id}: {a:?}");
    for m in &listed {
        let spec = imn_proto::catalog::find(m["name"].as_str().unwrap()).unwrap();
        assert_eq!(
            (m["version"].as_str(), m["schema_hash"].as_str()),
            (Some(spec.version), Some(spec.schema_hash)),
            "{id}: {m:?}"
        );
    }

    // Heartbeats arrive, with the system metrics the agent read.
    let hb = wait_for("two heartbeats", T, || {
        let api = up.api.clone();
        let path = format!("/agents/{id}");
        async move {
            let first = api.get(&path).await.body["heartbeat"].clone();
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let second = api.get(&path).await.body["heartbeat"].clone();
            (!first.is_null() && second["sent_at_ms"] != first["sent_at_ms"]).then_some(second)
        }
    })
    .await;
    assert!(hb["sent_at_ms"].as_i64().unwrap() > 0, "{hb:?}");
    let sys = &hb["system"];
    for key in [
        "uptime_s",
        "mem_total_kib",
        "mem_available_kib",
        "disk_total_kib",
    ] {
        assert!(sys[key].as_u64().unwrap_or(0) > 0, "{key}: {hb:?}");
    }
    assert!(
        !sys["cpu_per_core_pct"].as_array().expect("cpus").is_empty(),
        "{hb:?}"
    );

    let message = format!("from {} {}", t.arch, p.name());
    let echo = measure(&up, &id, "echo_module", json!({ "message": message })).await;
    assert_eq!(echo["message"], message.as_str());

    // ICMP echo through a raw socket (this runs as root; qemu-user passes raw sockets
    // through).
    let ping = measure(
        &up,
        &id,
        "ping_module",
        json!({"targets": ["127.0.0.1"], "count": 3, "interval_ms": 20}),
    )
    .await;
    let pt = &ping["targets"][0];
    assert_eq!(pt["addr"], "127.0.0.1", "{ping:?}");
    assert_eq!(
        (pt["sent"].as_u64(), pt["received"].as_u64()),
        (Some(3), Some(3)),
        "{ping:?}"
    );
    let rtts = pt["rtts_ms"].as_array().expect("rtts_ms");
    assert_eq!(rtts.len(), 3, "{ping:?}");
    assert!(
        rtts.iter().all(|r| ms(r) > 0.0 && ms(r) < 1000.0),
        "{ping:?}"
    );
    assert_eq!(pt["loss_pct"].as_f64(), Some(0.0), "{ping:?}");

    // tcping to the backend's own HTTP listener.
    let tc = measure(
        &up,
        &id,
        "tcping",
        json!({"host": "127.0.0.1", "port": up.http_port, "count": 3, "interval_ms": 50}),
    )
    .await;
    assert_eq!(
        (tc["addr"].as_str(), tc["port"].as_u64()),
        (Some("127.0.0.1"), Some(u64::from(up.http_port))),
        "{tc:?}"
    );
    assert_eq!(
        (tc["sent"].as_u64(), tc["open"].as_u64()),
        (Some(3), Some(3)),
        "{tc:?}"
    );
    assert!(
        ms(&tc["min_ms"]) > 0.0 && ms(&tc["max_ms"]) < 1000.0,
        "{tc:?}"
    );

    // DNS to dnsmasq: an A record over UDP, and a CNAME and its target over TCP.
    let server = format!("127.0.0.1:{}", dns.port);
    let d = measure(
        &up,
        &id,
        "dns",
        json!({"name": "broker.imn.test", "type": "A", "server": server, "timeout_ms": 3000}),
    )
    .await;
    assert_eq!(
        (d["server"].as_str(), d["port"].as_u64()),
        (Some("127.0.0.1"), Some(u64::from(dns.port))),
        "{d:?}"
    );
    assert_eq!(
        (&d["server_source"], &d["protocol"], &d["error"]),
        (&json!("params"), &json!("udp"), &Value::Null),
        "{d:?}"
    );
    assert!(ms(&d["reply"]["rt_ms"]) > 0.0, "{d:?}");
    let m = &d["reply"]["message"];
    assert_eq!(m["rcode_name"], "NOERROR", "{d:?}");
    assert_eq!(m["flags"]["qr"], true, "{d:?}");
    assert_eq!(m["question"][0]["name"], "broker.imn.test.", "{d:?}");
    assert_eq!(m["answer"].as_array().map(Vec::len), Some(1), "{d:?}");
    assert_eq!(
        (&m["answer"][0]["type"], &m["answer"][0]["rdata"]),
        (&json!("A"), &json!("127.0.0.1")),
        "{d:?}"
    );
    let d = measure(
        &up,
        &id,
        "dns",
        json!({"name": "alias.imn.test", "type": "A", "server": server, "protocol": "tcp",
               "timeout_ms": 3000}),
    )
    .await;
    assert_eq!(
        (&d["protocol"], &d["error"]),
        (&json!("tcp"), &Value::Null),
        "{d:?}"
    );
    assert!(ms(&d["reply"]["tcp_connect_ms"]) >= 0.0, "{d:?}");
    let m = &d["reply"]["message"];
    assert_eq!(m["rcode_name"], "NOERROR", "{d:?}");
    let answers: Vec<(&str, &str)> = m["answer"]
        .as_array()
        .expect("answer")
        .iter()
        .map(|r| (r["type"].as_str().unwrap(), r["rdata"].as_str().unwrap()))
        .collect();
    assert_eq!(
        answers,
        [("CNAME", "broker.imn.test."), ("A", "127.0.0.1")],
        "{d:?}"
    );

    // Paris traceroute over loopback (IPPROTO_RAW out, raw ICMP in): the destination
    // answers at hop 1.
    let tr = measure(
        &up,
        &id,
        "traceroute",
        json!({"host": "127.0.0.1", "protocol": "icmp", "max_ttl": 4, "probes": 2,
               "timeout_ms": 1000}),
    )
    .await;
    assert_eq!(
        (
            &tr["dst_addr"],
            &tr["af"],
            &tr["destination_reached"],
            &tr["stop_reason"]
        ),
        (
            &json!("127.0.0.1"),
            &json!(4),
            &json!(true),
            &json!("destination")
        ),
        "{tr:?}"
    );
    let hops = tr["hops"].as_array().expect("hops");
    assert_eq!(hops.len(), 1, "{tr:?}");
    assert_eq!(hops[0]["ttl"], 1, "{tr:?}");
    let probes = hops[0]["probes"].as_array().expect("probes");
    assert_eq!(probes.len(), 2, "{tr:?}");
    for r in probes {
        assert_eq!(r["from"], "127.0.0.1", "{tr:?}");
        assert_eq!(r["icmp_type"], 0, "an echo reply: {tr:?}");
        assert!(
            ms(&r["rtt_ms"]) > 0.0 && ms(&r["rtt_ms"]) < 1000.0,
            "{tr:?}"
        );
    }

    // mtr: the same one-hop path, twice.
    let mtr = measure(
        &up,
        &id,
        "mtr",
        json!({"host": "127.0.0.1", "count": 2, "interval_ms": 10, "timeout_ms": 1000}),
    )
    .await;
    let hop = &mtr["hops"][0];
    assert_eq!(mtr["hops"].as_array().map(Vec::len), Some(1), "{mtr:?}");
    assert_eq!(
        (hop["sent"].as_u64(), hop["received"].as_u64()),
        (Some(2), Some(2)),
        "{mtr:?}"
    );
    assert_eq!(hop["loss_pct"].as_f64(), Some(0.0), "{mtr:?}");

    // NTP to a responder whose clock is 1.5 s ahead (loose bounds: emulation and a busy
    // host delay the agent's timestamps).
    let ntp_port = peers::ntp_responder("127.0.0.1:0", peers::NtpBehaviour::Offset(1.5));
    let n = measure(
        &up,
        &id,
        "ntp",
        json!({"host": "127.0.0.1", "port": ntp_port, "packets": 3, "interval_ms": 10}),
    )
    .await;
    let offset = ms(&n["offset_ms"]);
    assert!((offset - 1500.0).abs() < 250.0, "{n:?}");

    match p {
        Profile::Full => {
            // HTTP to the backend's own listener (hyper in the agent, axum in imn up).
            let h = measure(
                &up,
                &id,
                "http",
                json!({"url": format!("http://127.0.0.1:{}/livez", up.http_port)}),
            )
            .await;
            assert_eq!(h["error"], Value::Null, "{h:?}");
            let r = &h["response"];
            assert_eq!(
                (
                    &r["status"],
                    &r["http_version"],
                    &r["body_preview"],
                    &r["body_bytes"]
                ),
                (&json!(200), &json!("HTTP/1.1"), &json!("ok"), &json!(2)),
                "{h:?}"
            );
            let tm = &h["timing"];
            let order: Vec<f64> = ["dns_ms", "connect_ms", "ttfb_ms", "total_ms"]
                .iter()
                .map(|k| ms(&tm[k]))
                .collect();
            assert!(order.windows(2).all(|w| w[0] <= w[1]), "{h:?}");
            assert!(order[3] > 0.0, "{h:?}");
            // A TLS handshake with OpenSSL's s_server (rustls, ring, x509-parser in
            // the firmware), its chain verified against the test's CA.
            let tls = OpensslServer::start();
            let c = measure(
                &up,
                &id,
                "tls_cert",
                json!({"host": "localhost", "port": tls.port, "ca_pem": tls.ca_pem}),
            )
            .await;
            let tls_info = &c["tls"];
            assert_eq!(tls_info["verify_error"], Value::Null, "{c:?}");
            assert_eq!(tls_info["chain"][0]["subject_cn"], "localhost", "{c:?}");
            assert!(
                tls_info["version"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("1.3"),
                "{c:?}"
            );
            // A WebAssembly module (wasmi in the firmware): the tcp_banner example
            // against an SMTP greeting, and a module that traps, stopped by name.
            assert!(
                a["features"].as_array().unwrap().contains(&json!("wasm")),
                "{a:?}"
            );
            let banner = imn_tests::wasm::sign(
                &imn_tests::wasm::examples().join("tcp_banner.wasm"),
                &imn_tests::wasm::example_manifest("tcp_banner"),
                &module_key,
                &dir.path().join("tcp_banner.imnmod"),
            );
            let trap = imn_tests::wasm::sign_code(
                dir.path(),
                &imn_tests::wasm::hostile("trap"),
                &imn_tests::wasm::manifest("fw_trap", 10_000, json!({})),
                &module_key,
            );
            for (name, package) in [("tcp_banner", banner), ("fw_trap", trap)] {
                let r = up.api.post_bytes("/admin/modules", package).await;
                assert_eq!(r.status, 201, "{name}: {:?}", r.body);
                let r = up
                    .api
                    .put_json(&format!("/agents/{id}/modules/{name}"), &json!({}))
                    .await;
                assert_eq!(r.status, 202, "{name}: {:?}", r.body);
                wait_for(&format!("{id} to load {name}"), T, || {
                    let (api, path) = (up.api.clone(), format!("/agents/{id}"));
                    async move {
                        let a = api.get(&path).await.body;
                        a["modules"]
                            .as_array()?
                            .iter()
                            .any(|m| m["name"] == name)
                            .then_some(())
                    }
                })
                .await;
            }
            let greeting = imn_tests::wire_compat::greeting_tcp("SSH-2.0-OpenSSH_9.2 imn-firmware");
            let b = measure(
                &up,
                &id,
                "tcp_banner",
                json!({"host": "127.0.0.1", "port": greeting}),
            )
            .await;
            assert_eq!(
                (&b["banner"], &b["protocol"]),
                (&json!("SSH-2.0-OpenSSH_9.2 imn-firmware"), &json!("ssh")),
                "{b:?}"
            );
            let r = up
                .api
                .post(&format!("/agent/{id}/fw_trap?wait=30"), "{}", &[])
                .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            assert_eq!(r.body["state"], "failed", "{:?}", r.body);
            assert!(
                r.body["error"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with("trap: integer divide by zero"),
                "{:?}",
                r.body
            );
        }
        Profile::Router => {
            // The modules this build lacks: the backend refuses them itself, naming
            // the modules the agent has.
            for (module, params) in [
                (
                    "http",
                    json!({"url": format!("http://127.0.0.1:{}/livez", up.http_port)}),
                ),
                (
                    "tls_cert",
                    json!({"host": "127.0.0.1", "port": up.http_port}),
                ),
            ] {
                let r = up
                    .api
                    .post(
                        &format!("/agent/{id}/{module}?wait=10"),
                        &params.to_string(),
                        &[],
                    )
                    .await;
                assert_eq!(r.status, 409, "{module}: {:?}", r.body);
                assert_eq!(r.body["error"], "module_not_loaded", "{:?}", r.body);
                assert!(
                    r.body["message"]
                        .as_str()
                        .unwrap_or_default()
                        .contains(&format!("{module:?} is not loaded")),
                    "{:?}",
                    r.body
                );
                let mut has: Vec<&str> = r.body["modules"]
                    .as_array()
                    .expect("modules in the 409")
                    .iter()
                    .map(|m| m.as_str().unwrap())
                    .collect();
                has.sort_unstable();
                assert!(
                    has.contains(&"ping_module") && !has.contains(&module),
                    "{has:?}"
                );
                assert_eq!(has, names, "the 409 names the agent's modules");
            }
            for lacking in ROUTER_LACKS {
                assert!(!names.contains(&lacking), "{names:?}");
            }
            // No WebAssembly runtime in this build: the hello says so, and the backend
            // refuses to load a module on it.
            assert!(
                !a["features"].as_array().unwrap().contains(&json!("wasm")),
                "{a:?}"
            );
            let trap = imn_tests::wasm::sign_code(
                dir.path(),
                &imn_tests::wasm::hostile("trap"),
                &imn_tests::wasm::manifest("fw_trap", 10_000, json!({})),
                &module_key,
            );
            let r = up.api.post_bytes("/admin/modules", trap).await;
            assert_eq!(r.status, 201, "{:?}", r.body);
            let r = up
                .api
                .put_json(&format!("/agents/{id}/modules/fw_trap"), &json!({}))
                .await;
            assert_eq!(r.status, 409, "{:?}", r.body);
            assert!(
                r.body["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("cannot run WebAssembly modules"),
                "{:?}",
                r.body
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aarch64_full_agent_under_qemu_works_against_x86_imn_up() {
    firmware_agent_works_against_imn_up(AARCH64, Profile::Full).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aarch64_router_agent_under_qemu_works_against_x86_imn_up() {
    firmware_agent_works_against_imn_up(AARCH64, Profile::Router).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn armv7_full_agent_under_qemu_works_against_x86_imn_up() {
    firmware_agent_works_against_imn_up(ARMV7, Profile::Full).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn armv7_router_agent_under_qemu_works_against_x86_imn_up() {
    firmware_agent_works_against_imn_up(ARMV7, Profile::Router).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x86_64_full_agent_works_against_imn_up() {
    firmware_agent_works_against_imn_up(X86_64, Profile::Full).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x86_64_router_agent_works_against_imn_up() {
    firmware_agent_works_against_imn_up(X86_64, Profile::Router).await;
}

/// Firmware aborts at once on a panic: cross/build.sh builds std with
/// `panic_immediate_abort`, so no message is printed or kept and no hook runs (the
/// message is not even in the binary). The restarted agent still reports the interrupted
/// run as failed, saying the agent died while it ran, from the `DATA/running` marker the
/// dead process left (the job procd or systemd does here is done by the test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_panic_is_reported_after_the_restart() {
    use std::os::unix::process::ExitStatusExt;
    let up = Up::start(0, &[]).await;
    let dir = TempDir::new("abort");
    let fw = firmware(X86_64, Profile::Full);
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
    assert!(
        status.signal().is_some(),
        "an abort (a signal), not an exit: {status:?}\n{}",
        agent.log_text()
    );
    assert!(
        !agent.log_text().contains("crash requested"),
        "no panic message: {}",
        agent.log_text()
    );
    let bytes = std::fs::read(&fw).unwrap();
    assert!(
        !bytes.windows(15).any(|w| w == b"crash requested"),
        "the panic's message is not in the firmware (panic_immediate_abort)"
    );
    assert!(!data.join("last-panic").exists(), "no panic hook ran");
    assert!(
        data.join("running").exists(),
        "the dead process left its marker"
    );
    let again = start();
    let st = up.api.wait_state(&rid, "failed", T).await;
    let res = up
        .api
        .get(&format!("/agents/fw-x86/results/{rid}"))
        .await
        .body;
    let text = res.to_string();
    assert!(
        text.contains("run_interrupted")
            && text.contains("the agent died while it ran, without stopping cleanly"),
        "{st:?} {res:?}"
    );
    // The new process's marker.
    assert_eq!(
        std::fs::read_to_string(data.join("running"))
            .unwrap()
            .trim(),
        again.pid().to_string()
    );

    // A clean stop (SIGTERM, as systemd and procd stop it) during a run removes the
    // marker, and the next start reports the run as stopped, not as a death.
    let mut again = again;
    up.api.wait_alive(&["fw-x86"], T).await;
    let r = up
        .api
        .post(
            "/agent/fw-x86/faulty_module",
            &json!({"message": "long", "delay": 60.0}).to_string(),
            &[],
        )
        .await;
    assert!(r.status == 200 || r.status == 202, "{:?}", r.body);
    let long = r.body["request_id"].as_str().unwrap().to_string();
    up.api.wait_state(&long, "running", T).await;
    let status = again
        .signal_and_wait(libc::SIGTERM, T)
        .expect("the agent stops on SIGTERM");
    assert!(status.success(), "a clean stop: {status:?}");
    assert!(
        !data.join("running").exists(),
        "a clean stop removes the marker"
    );
    let _third = start();
    up.api.wait_state(&long, "failed", T).await;
    let res = up
        .api
        .get(&format!("/agents/fw-x86/results/{long}"))
        .await
        .body
        .to_string();
    assert!(
        res.contains("run_interrupted") && res.contains("the agent was stopped"),
        "{res}"
    );
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
    let fw = firmware(X86_64, Profile::Full);
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

/// The static firmware of both profiles speaks MQTT over TLS (rustls, ring) to a real
/// Mosquitto, checks the certificate against the configured CA and the broker's *name*
/// (the agent connects to the address it resolved), and refuses a certificate for
/// another name.
#[test]
fn static_agent_connects_over_tls_and_checks_the_name() {
    let dir = TempDir::new("tls");
    make_certs(dir.path(), "DNS:localhost");
    let (_mosq, tls_port, plain_port) = start_tls_mosquitto(dir.path());
    let ca = dir.path().join("ca.pem");
    let spawn = |p: Profile, id: &str, broker: String| {
        let extra = ["--tls-ca", ca.to_str().unwrap(), "--heartbeat-ms", "500"];
        let fw = firmware(X86_64, p);
        spawn_agent(&fw, id, &broker, &dir.path().join(id), &extra, dir.path())
    };
    // Retained hellos would let a later subscriber see an old one: each case has its
    // own id, and the subscribers start before the agents do.
    let cases: Vec<_> = PROFILES
        .iter()
        .map(|p| {
            let good_id = format!("tls-good-{}", p.name());
            let wrong_id = format!("tls-wrong-name-{}", p.name());
            let (g, w) = (good_id.clone(), wrong_id.clone());
            let good = std::thread::spawn(move || hello_seen(plain_port, &g, 20));
            let wrong = std::thread::spawn(move || hello_seen(plain_port, &w, 4));
            (*p, good_id, good, wrong_id, wrong)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut agents = Vec::new();
    for (p, good_id, good, wrong_id, wrong) in cases {
        let a = spawn(p, &good_id, format!("mqtts://localhost:{tls_port}"));
        // The same certificate, reached under a name it does not carry.
        let b = spawn(p, &wrong_id, format!("mqtts://127.0.0.1:{tls_port}"));
        agents.push((p, a, good, b, wrong));
    }
    for (p, _a, good, b, wrong) in agents {
        assert!(good.join().unwrap().is_some(), "{p:?}: no hello over TLS");
        assert!(
            wrong.join().unwrap().is_none(),
            "{p:?}: a certificate for another name was accepted"
        );
        let log = b.log_text();
        assert!(
            log.contains("NotValidForName") || log.contains("not valid for name"),
            "{p:?}: {log}"
        );
    }
}
