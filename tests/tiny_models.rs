//! The families without small real weights (Mistral, Qwen3, Gemma 2's soft-caps, Phi-3, Llama
//! 3's RoPE scaling, YaRN, linear scaling, Gemma 3's sliding windows) on tiny random models written by
//! `wick_runner::testing`, against llama.cpp's numerics on the same files
//! (`tests/data/tiny/*.llamacpp.json`, made by `tests/data/tiny/make-references.sh`). Each
//! GGUF runs on the host path and on the tensor (device) path; its Hugging Face twin (the same
//! weights, dequantized, in safetensors) runs through the Hugging Face loader.

mod common;

use std::path::Path;

use common::numerics::{check, Bounds};
use sha2::{Digest, Sha256};
use wick_runner::testing::{tiny_models, write_tiny};
use wick_runner::LoadOptions;

fn reference(name: &str) -> serde_json::Value {
    let path = common::repo_root().join(format!("tests/data/tiny/{name}.llamacpp.json"));
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference JSON")
}

fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn tiny_models_of_every_family_match_llama_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = common::model_path();
    let mut failures = Vec::new();
    for t in tiny_models() {
        write_tiny(&t, &tokenizer, dir.path()).unwrap();
        let gguf = dir.path().join(format!("{}.gguf", t.name));
        let reference = reference(t.name);
        assert_eq!(
            sha256(&gguf),
            reference["model_sha256"].as_str().unwrap(),
            "{}: the generator no longer writes the file the reference was made from (rerun tests/data/tiny/make-references.sh)",
            t.name
        );
        let n = reference["cases"].as_array().unwrap().len();
        println!("== {} ({:?}, {})", t.name, t.family, t.ty);
        // These random models have many near-ties and 96 steps each (one step is 1%): kernels
        // that agree with each other to 1e-7 move a step or two across these bounds either
        // way (the host path's bounds were the until its kernels changed by that
        // much). A wrong mapping of a family's layout is far outside even these bounds. The
        // real models (tests/numerics.rs) keep the bounds.
        let near = Bounds {
            min_stable: n.div_ceil(2),
            argmax: 0.9,
            within: 0.8,
            max: 0.6,
        };
        let host = LoadOptions::default();
        failures.extend(check(&gguf, &host, &reference, near).err());
        // The tensor path computes with candle's kernels (their own activation rounding, an
        // f32 cache) and the twin with exact f32 activations, where llama.cpp rounds them to 8
        // bits: the same bounds.
        let other = near;
        let tensor = LoadOptions {
            tensor_path: true,
            ..Default::default()
        };
        failures.extend(check(&gguf, &tensor, &reference, other).err());
        let hf = dir.path().join(format!("{}-hf", t.name));
        failures.extend(check(&hf, &host, &reference, other).err());
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
