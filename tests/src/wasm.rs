//! WebAssembly modules for the tests and the benchmark: the example guests built from
//! `modules/wasm` (cargo, target wasm32-unknown-unknown), the hostile ones from their
//! text (`modules/wasm/hostile/*.wat`), a signing key made by `imn releases keygen`,
//! and packages signed by `imn modules sign`: the same commands an operator runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::{json, Value};

use crate::bin;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository")
        .to_path_buf()
}

/// Builds the example modules once per process (`modules/wasm/build.sh`); their
/// folder (`modules/wasm/out`).
pub fn examples() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let script = repo().join("modules/wasm/build.sh");
            let out = Command::new("bash")
                .arg(&script)
                .output()
                .expect("bash modules/wasm/build.sh");
            assert!(
                out.status.success(),
                "modules/wasm/build.sh failed (is the wasm32-unknown-unknown target installed? tests/run.sh adds it):\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            repo().join("modules/wasm/out")
        })
        .clone()
}

/// An example's `module.json`.
pub fn example_manifest(name: &str) -> PathBuf {
    repo().join(format!("modules/wasm/examples/{name}/module.json"))
}

/// A hostile module's code, from `modules/wasm/hostile/NAME.wat`.
pub fn hostile(name: &str) -> Vec<u8> {
    let path = hostile_path(name);
    wat::parse_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `modules/wasm/hostile/NAME.wat` (NAME may climb out: `../bench/ping_through`).
pub fn hostile_path(name: &str) -> PathBuf {
    repo().join(format!("modules/wasm/hostile/{name}.wat"))
}

/// A signing key (`imn releases keygen --out DIR/NAME`): its path and public key.
pub fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let out = Command::new(bin("imn"))
        .args(["releases", "keygen", "--out"])
        .arg(&key)
        .output()
        .expect("imn releases keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = std::fs::read_to_string(dir.join(format!("{name}.pub")))
        .expect("KEY.pub")
        .trim()
        .to_string();
    (key, public)
}

/// `imn modules sign WASM --manifest MANIFEST --key KEY --out OUT`; the package.
pub fn sign(wasm: &Path, manifest: &Path, key: &Path, out: &Path) -> Vec<u8> {
    let r = Command::new(bin("imn"))
        .args(["modules", "sign"])
        .arg(wasm)
        .arg("--manifest")
        .arg(manifest)
        .arg("--key")
        .arg(key)
        .arg("--out")
        .arg(out)
        .arg("--force")
        .output()
        .expect("imn modules sign");
    assert!(
        r.status.success(),
        "imn modules sign {}: {}",
        wasm.display(),
        String::from_utf8_lossy(&r.stderr)
    );
    std::fs::read(out).expect("the package")
}

/// A manifest for a test module: `name`, any parameters, the given limits (fields of
/// `imn_proto::wasm::Limits`; the rest default).
pub fn manifest(name: &str, timeout_ms: u64, limits: Value) -> Value {
    json!({
        "name": name,
        "version": "1.0.0",
        "description": format!("test module {name}"),
        "timeout_ms": timeout_ms,
        "params_schema": {"type": "object"},
        "result_schema": {"type": "object"},
        "targets": [],
        "limits": limits,
    })
}

/// Writes `code` and `manifest` into `dir` and signs them; the package.
pub fn sign_code(dir: &Path, code: &[u8], manifest: &Value, key: &Path) -> Vec<u8> {
    let name = manifest["name"].as_str().expect("a name");
    let wasm = dir.join(format!("{name}.wasm"));
    let m = dir.join(format!("{name}.json"));
    std::fs::write(&wasm, code).expect("write the code");
    std::fs::write(&m, manifest.to_string()).expect("write the manifest");
    sign(&wasm, &m, key, &dir.join(format!("{name}.imnmod")))
}
