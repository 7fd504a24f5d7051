//! Certificates for the backend's own tests, made by `openssl` (the real tool, which
//! `tests/run.sh` installs): a P-256 CA, a server leaf for the given hosts, and client
//! leaves. The layout is the one `imn certs` writes (`ca.pem`, `server.pem`,
//! `server.key`, `client-<name>.pem`/`.key`), so the tests read the same files a user
//! would have; `imn certs` itself lives in the `imn` binary and is tested there.

use std::path::Path;
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (tests/run.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A leaf signed by the CA in `dir`: `{name}.pem` and `{name}.key` (0600).
fn leaf(dir: &Path, name: &str, cn: &str, extensions: &str) {
    let ext = format!("{name}.ext");
    std::fs::write(dir.join(&ext), extensions).unwrap();
    let (key, csr, pem) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    let serial = format!("0x{:016x}", rand::random::<u64>() >> 1);
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            &serial,
            "-days",
            "2",
            "-out",
            &pem,
            "-extfile",
            &ext,
        ],
    );
    restrict(&dir.join(&key));
    let _ = std::fs::remove_file(dir.join(&csr));
    let _ = std::fs::remove_file(dir.join(&ext));
}

fn restrict(key: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Writes a new CA, a server certificate for `hosts` (DNS names or IP addresses) and a
/// client certificate per name of `clients` into `dir` (created).
pub(crate) fn generate(dir: &Path, hosts: &[&str], clients: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=imn test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE,pathlen:0",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    restrict(&dir.join("ca.key"));
    let sans: Vec<String> = hosts
        .iter()
        .map(|h| match h.parse::<std::net::IpAddr>() {
            Ok(_) => format!("IP:{h}"),
            Err(_) => format!("DNS:{h}"),
        })
        .collect();
    leaf(
        dir,
        "server",
        hosts.first().copied().unwrap_or("localhost"),
        &format!(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName={}\n",
            sans.join(",")
        ),
    );
    for name in clients {
        leaf(
            dir,
            &format!("client-{name}"),
            name,
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=clientAuth\n",
        );
    }
}
