//! A throwaway PostgreSQL server for tests and benchmarks: `initdb` in a temporary
//! directory, `postgres` on a free loopback port, stopped and deleted on drop. As
//! root, both run as the `postgres` user (PostgreSQL refuses root).
//!
//! [`fresh_database`] is what tests call: a new database on a cluster of its own.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running PostgreSQL server in a temporary directory.
pub struct TempCluster {
    dir: PathBuf,
    child: Child,
    pub port: u16,
}

/// The directory of PostgreSQL's programs: `IMN_PG_BIN`, or the newest
/// `/usr/lib/postgresql/*/bin` (Debian's layout).
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("IMN_PG_BIN") {
        return Some(PathBuf::from(d));
    }
    let mut best: Option<(u32, PathBuf)> = None;
    for e in std::fs::read_dir("/usr/lib/postgresql").ok()?.flatten() {
        let Some(v) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let bin = e.path().join("bin");
        if bin.join("initdb").exists() && best.as_ref().is_none_or(|(b, _)| v > *b) {
            best = Some((v, bin));
        }
    }
    best.map(|(_, b)| b)
}

/// uid and gid of the `postgres` user, when running as root.
fn run_as() -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").ok()?.uid() != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"postgres") && f.len() > 3)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
    })
}

fn command(bin: &Path, user: Option<(u32, u32)>) -> Command {
    let mut c = Command::new(bin);
    if let Some((uid, gid)) = user {
        c.uid(uid).gid(gid);
    }
    c
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl TempCluster {
    /// `durable`: fsync as in production (benchmarks); tests turn it off.
    pub fn start(durable: bool) -> Result<TempCluster, String> {
        TempCluster::start_with(durable, None)
    }

    /// [`Self::start`]; with `tls` (PEM certificate chain and key), PostgreSQL also
    /// speaks TLS.
    pub fn start_with(durable: bool, tls: Option<(&Path, &Path)>) -> Result<TempCluster, String> {
        let bin = bin_dir().ok_or(
            "PostgreSQL not found: install it (`apt-get install -y postgresql`), or set IMN_PG_BIN",
        )?;
        let user = run_as();
        if std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
            .unwrap_or(false)
            && user.is_none()
        {
            return Err(
                "running as root, and there is no `postgres` user to run PostgreSQL as".into(),
            );
        }
        let dir = std::env::temp_dir().join(format!(
            "imn-pg-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", dir.display()))?;
        }
        let data = dir.join("data");
        let out = command(&bin.join("initdb"), user)
            .args(["-D"])
            .arg(&data)
            .args(["-U", "imn", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let port = free_port().map_err(|e| format!("free port: {e}"))?;
        let log = std::fs::File::create(dir.join("postgres.log")).map_err(|e| e.to_string())?;
        if let Some((uid, gid)) = user {
            let _ = std::os::unix::fs::chown(dir.join("postgres.log"), Some(uid), Some(gid));
        }
        let mut cmd = command(&bin.join("postgres"), user);
        cmd.arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=200",
                "-c",
                "shared_buffers=128MB",
            ]);
        if !durable {
            cmd.args(["-c", "fsync=off", "-c", "synchronous_commit=off"]);
        }
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt;
            let (c, k) = (dir.join("server.crt"), dir.join("server.key"));
            std::fs::copy(cert, &c).map_err(|e| format!("{}: {e}", cert.display()))?;
            std::fs::copy(key, &k).map_err(|e| format!("{}: {e}", key.display()))?;
            // PostgreSQL refuses a key others can read.
            std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| e.to_string())?;
            if let Some((uid, gid)) = user {
                for f in [&c, &k] {
                    std::os::unix::fs::chown(f, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
                }
            }
            cmd.args(["-c", "ssl=on", "-c"])
                .arg(format!("ssl_cert_file={}", c.display()))
                .arg("-c")
                .arg(format!("ssl_key_file={}", k.display()));
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("postgres: {e}"))?;
        let mut cluster = TempCluster { dir, child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                // Accepting connections is not yet accepting logins: ask pg_isready.
                let ready = Command::new(bin.join("pg_isready"))
                    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "imn"])
                    .stdout(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if ready {
                    return Ok(cluster);
                }
            }
            if let Ok(Some(status)) = cluster.child.try_wait() {
                return Err(format!(
                    "postgres exited ({status}): {}",
                    cluster.log_text()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "postgres did not start in 30 s: {}",
                    cluster.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A URL for database `db` as the superuser `imn`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://imn@127.0.0.1:{}/{db}", self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    /// The postmaster's process id (a test may kill it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        // SIGINT: PostgreSQL's fast shutdown.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Creates database `name` on the server at `admin_url`.
pub async fn create_database(admin_url: &str, name: &str) -> Result<(), String> {
    let (client, conn) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("{}: {e}", super::postgres::redact(admin_url)))?;
    let task = tokio::spawn(conn);
    let r = client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .map_err(|e| format!("CREATE DATABASE {name}: {e}"));
    drop(client);
    let _ = task.await;
    r
}

/// A new, empty database for one test, on a cluster of its own (returned: keep it
/// alive as long as the database). Never a shared server: a reader by position waits
/// for the oldest transaction anywhere in its cluster (see `store/postgres.rs`), so
/// another test's `CREATE DATABASE` or writes would delay what a test reads right
/// after writing it.
pub async fn fresh_database() -> Result<(Option<TempCluster>, String), String> {
    let name = format!("imn_t_{:016x}", rand::random::<u64>());
    let cluster = tokio::task::spawn_blocking(|| TempCluster::start(false))
        .await
        .map_err(|e| e.to_string())??;
    create_database(&cluster.url("postgres"), &name).await?;
    let url = cluster.url(&name);
    Ok((Some(cluster), url))
}
