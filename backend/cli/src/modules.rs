//! `imn modules`: WebAssembly modules. Sign a `.wasm` with its `module.json` into a
//! package (offline, with a release key), add it to the backend, list, delete, and
//! load or unload it on agents. The package format is `imn_proto::wasm`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use imn_proto::release::SigningKey;
use imn_proto::wasm;
use serde_json::json;

use crate::client::Client;

/// `imn modules sign WASM --manifest module.json --key KEY`: writes the package and
/// says what it holds.
pub fn sign(
    wasm_file: &Path,
    manifest: &Path,
    key: &Path,
    out: Option<PathBuf>,
    force: bool,
    now_ms: i64,
) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("--manifest {}", manifest.display()))?;
    let source: wasm::Source = serde_json::from_str(&text)
        .map_err(|e| anyhow!("--manifest {}: {e}", manifest.display()))?;
    let len = std::fs::metadata(wasm_file)
        .with_context(|| format!("{}", wasm_file.display()))?
        .len();
    if len > wasm::MAX_WASM {
        bail!(
            "{}: {len} bytes; a module's code is at most {} bytes",
            wasm_file.display(),
            wasm::MAX_WASM
        );
    }
    let code = std::fs::read(wasm_file).with_context(|| format!("{}", wasm_file.display()))?;
    let der = std::fs::read(key).with_context(|| format!("--key {}", key.display()))?;
    let k = SigningKey::from_pkcs8(&der).map_err(|e| anyhow!("--key {}: {e}", key.display()))?;
    let name = source.name.clone();
    let version = source.version.clone();
    let package = wasm::sign(&k, source, &code, now_ms)
        .map_err(|e| anyhow!("--manifest {}: {e}", manifest.display()))?;
    let out = out.unwrap_or_else(|| {
        wasm_file
            .parent()
            .unwrap_or(Path::new("."))
            .join(format!("{name}.imnmod"))
    });
    if !force && std::fs::symlink_metadata(&out).is_ok() {
        bail!(
            "--out {}: the file exists already (--force replaces it)",
            out.display()
        );
    }
    std::fs::write(&out, &package).with_context(|| format!("--out {}", out.display()))?;
    Ok(format!(
        "{}: module {name} {version}, {} bytes of code, signed by {}\n",
        out.display(),
        code.len(),
        k.public_hex()
    ))
}

/// `imn modules add FILE`.
pub async fn add(
    c: &Client,
    file: &Path,
    load_on_hello: bool,
    json_out: bool,
) -> anyhow::Result<String> {
    let bytes = std::fs::read(file).with_context(|| format!("{}", file.display()))?;
    wasm::split(&bytes).map_err(|e| {
        anyhow!(
            "{}: {e} (sign the module first: `imn modules sign`)",
            file.display()
        )
    })?;
    let path = if load_on_hello {
        "/admin/modules?load_on_hello=true"
    } else {
        "/admin/modules"
    };
    let resp = c.post_bytes(path, bytes).await?;
    if json_out {
        return Ok(serde_json::to_string_pretty(&resp)? + "\n");
    }
    let m = &resp["module"];
    let verb = if resp["replaced"] == json!(true) {
        "replaced"
    } else {
        "added"
    };
    Ok(format!(
        "{verb}: {} {} ({} bytes, sha256 {})\n",
        m["name"].as_str().unwrap_or("?"),
        m["version"].as_str().unwrap_or("?"),
        m["size"],
        m["sha256"].as_str().unwrap_or("?")
    ))
}

/// `imn modules list`: every module, built in or added.
pub async fn list(c: &Client, json_out: bool) -> anyhow::Result<String> {
    let v = c.get("/modules").await?;
    if json_out {
        return Ok(serde_json::to_string_pretty(&v)? + "\n");
    }
    let rows: Vec<Vec<String>> = v
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|m| {
            let s = |k: &str| m[k].as_str().unwrap_or("").to_string();
            vec![s("name"), s("version"), s("kind"), s("description")]
        })
        .collect();
    Ok(crate::cli::table(
        &["NAME", "VERSION", "KIND", "DESCRIPTION"],
        &rows,
    ))
}

/// `imn modules load|unload NAME --agents A,B`: one command per agent; what each
/// answered.
pub async fn load(c: &Client, name: &str, agents: &[String], on: bool) -> anyhow::Result<String> {
    let mut out = String::new();
    for a in agents {
        let path = format!("/agents/{a}/modules/{name}");
        let r = if on {
            c.put(&path, json!({})).await
        } else {
            c.delete(&path).await
        };
        match r {
            Ok(_) => out.push_str(&format!(
                "{a}: {} sent\n",
                if on { "load" } else { "unload" }
            )),
            Err(e) => out.push_str(&format!("{a}: {e}\n")),
        }
    }
    Ok(out)
}
