//! Helpers shared by the tests that need the default model and the reference outputs.
#![allow(dead_code)]

pub mod numerics;
pub mod server;

use std::path::PathBuf;
use std::process::Command;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The series docs/metrics.md lists: (name, type).
pub fn documented_metrics() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(repo_root().join("docs/metrics.md")).unwrap();
    doc.lines()
        .filter(|l| l.starts_with("| `wick_"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_string(), cells[2].to_string())
        })
        .collect()
}

/// The CPU kernels' limit the binary reads: `WICK_NO_AVX512=1` skips AVX-512,
/// `WICK_NO_SIMD=1` every vector kernel (`make test` runs the numerics under each).
pub fn simd_limit() -> wick_runner::SimdLimit {
    wick_runner::SimdLimit::from_overrides(
        std::env::var_os("WICK_NO_AVX512").is_some(),
        std::env::var_os("WICK_NO_SIMD").is_some(),
    )
}

/// The default model: `$WICK_MODEL`, or fetched (once, cached, verified) by
/// `scripts/fetch-model.sh`.
pub fn model_path() -> PathBuf {
    if let Ok(p) = std::env::var("WICK_MODEL") {
        return PathBuf::from(p);
    }
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/fetch-model.sh"))
        .output()
        .expect("run scripts/fetch-model.sh");
    assert!(
        out.status.success(),
        "scripts/fetch-model.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    PathBuf::from(path)
}

/// One of the other test models (`qwen`, `gemma`, `minilm`): fetched once, cached and verified by
/// `scripts/fetch-model.sh KEY`.
pub fn fetch_model(key: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/fetch-model.sh"))
        .arg(key)
        .output()
        .expect("run scripts/fetch-model.sh");
    assert!(
        out.status.success(),
        "scripts/fetch-model.sh {key} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// llama.cpp's outputs on the default model (`tests/data/reference`).
pub fn reference() -> serde_json::Value {
    reference_named("smollm2-135m-q4_1.llamacpp.json")
}

/// A file of llama.cpp's outputs in `tests/data/reference` (its README says how each was made).
pub fn reference_named(name: &str) -> serde_json::Value {
    let path = repo_root().join("tests/data/reference").join(name);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference JSON")
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// `promtool check metrics`, when promtool is installed (`.ci/run` installs it; CI requires it).
pub fn promtool_check(text: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(_) if std::env::var("CI").is_err() => {
            eprintln!("promtool not installed: skipping `promtool check metrics`");
            return;
        }
        Err(e) => panic!("promtool is required in CI: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
