//! A corpus of malformed GGUF files, each derived from the default model by one change (the
//! header, a count, a length, a shape, a type, the vocabulary): `wick serve` on each exits 1
//! with a message naming the problem, never a panic, an abort or a model answering garbage.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wick_runner::gguf::{GgufFile, GgufWriter, WriteValue as V};

/// The default model's metadata and tensors (ggml dims, type id, bytes), to edit and write.
struct Parts {
    meta: Vec<(String, V)>,
    tensors: Vec<(String, Vec<usize>, u32, Vec<u8>)>,
}

impl Parts {
    fn read(path: &Path) -> Parts {
        let mut g = GgufFile::open(path).expect("the default model opens");
        let mut meta: Vec<(String, V)> = g
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        meta.sort_by(|a, b| a.0.cmp(&b.0));
        let order = g.order.clone();
        let tensors = order
            .into_iter()
            .map(|name| {
                let info = g.info(&name).unwrap().clone();
                let bytes = g.read(&name).unwrap();
                (name, info.dims, info.ty.ggml_id(), bytes)
            })
            .collect();
        Parts { meta, tensors }
    }

    fn set(&mut self, key: &str, value: V) {
        self.meta.retain(|(k, _)| k != key);
        self.meta.push((key.to_string(), value));
    }

    fn tensor(&mut self, name: &str) -> &mut (String, Vec<usize>, u32, Vec<u8>) {
        self.tensors
            .iter_mut()
            .find(|t| t.0 == name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }

    fn write(&self, path: &Path) {
        let mut w = GgufWriter::new();
        for (k, v) in &self.meta {
            w.meta(k, v.clone());
        }
        for (name, dims, ty, bytes) in &self.tensors {
            w.raw_tensor(name, dims, *ty, bytes);
        }
        w.write(path).unwrap();
    }
}

/// `wick serve` on `model`: its exit code and stderr. A server still up after 60 s loaded
/// the file (a failure of this test): it is killed and its code is `None`.
fn serve(model: &Path, dir: &Path) -> (Option<i32>, String) {
    let log = dir.join("stderr.txt");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(["serve", "--port", "0", "--kv-cache-blocks", "64", "--model"])
        .arg(model)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (code, std::fs::read_to_string(&log).unwrap_or_default())
}

#[test]
fn every_malformed_model_file_exits_1_naming_the_problem() {
    let model = common::model_path();
    let original = Parts::read(&model);
    let dir = tempfile::tempdir().unwrap();
    let k = |s: &str| format!("llama.{s}");
    let bytes = std::fs::read(&model).unwrap();

    type Edit = Box<dyn Fn(&mut Parts)>;
    let mut cases: Vec<(&str, Edit, &str)> = vec![
        (
            "ffn_down with its two dimensions swapped",
            Box::new(|p: &mut Parts| {
                let t = p.tensor("blk.0.ffn_down.weight");
                t.1.swap(0, 1);
            }),
            "blk.0.ffn_down.weight",
        ),
        (
            "embedding_length disagreeing with the tensors",
            Box::new(move |p: &mut Parts| p.set(&k("embedding_length"), V::U32(512))),
            "embedding_length 512",
        ),
        (
            "an embedding_length that divides into heads but disagrees with the tensors",
            Box::new(move |p: &mut Parts| p.set(&k("embedding_length"), V::U32(648))),
            "expected",
        ),
        (
            "a context length of 2^40",
            Box::new(move |p: &mut Parts| p.set(&k("context_length"), V::U64(1 << 40))),
            "context length",
        ),
        (
            "a block count of 10^9",
            Box::new(move |p: &mut Parts| p.set(&k("block_count"), V::U32(1_000_000_000))),
            "block_count is 1000000000",
        ),
        (
            "a block count past the blocks the file holds",
            Box::new(move |p: &mut Parts| p.set(&k("block_count"), V::U32(31))),
            "holds tensors of 30 blocks",
        ),
        (
            "alignment 0",
            Box::new(|p: &mut Parts| p.set("general.alignment", V::U32(0))),
            "alignment",
        ),
        (
            "a head count that does not divide the hidden size",
            Box::new(move |p: &mut Parts| p.set(&k("attention.head_count"), V::U32(7))),
            "head",
        ),
        (
            "an RMS epsilon that is not a number",
            Box::new(move |p: &mut Parts| {
                p.set(&k("attention.layer_norm_rms_epsilon"), V::F32(f32::NAN))
            }),
            "epsilon",
        ),
        (
            "a tensor of an unknown type",
            Box::new(|p: &mut Parts| p.tensor("blk.3.attn_k.weight").2 = 99),
            "blk.3.attn_k.weight",
        ),
        (
            "a tensor whose type disagrees with its bytes (Q4_1 read as F32)",
            Box::new(|p: &mut Parts| {
                let t = p.tensor("blk.1.attn_q.weight");
                t.2 = 0;
            }),
            "tensor blk.1.attn_q.weight (F32",
        ),
        (
            "a missing tensor",
            Box::new(|p: &mut Parts| p.tensors.retain(|t| t.0 != "blk.5.ffn_down.weight")),
            "missing tensor blk.5.ffn_down.weight",
        ),
        (
            "more tokens in the tokenizer than rows in the embedding",
            Box::new(|p: &mut Parts| {
                let tokens = p
                    .meta
                    .iter_mut()
                    .find(|(k, _)| k == "tokenizer.ggml.tokens")
                    .unwrap();
                if let V::Array(items) = &mut tokens.1 {
                    for i in 0..1000 {
                        items.push(V::String(format!("<extra_{i}>")));
                    }
                }
            }),
            "the embedding only",
        ),
        (
            "an end-of-sequence id past the vocabulary",
            Box::new(|p: &mut Parts| p.set("tokenizer.ggml.eos_token_id", V::U32(4_000_000))),
            "eos_token_id",
        ),
        (
            "no architecture",
            Box::new(|p: &mut Parts| p.meta.retain(|(k, _)| k != "general.architecture")),
            "general.architecture",
        ),
    ];
    let mut files: Vec<(String, PathBuf, &str)> = Vec::new();
    for (i, (what, edit, needle)) in cases.drain(..).enumerate() {
        let mut p = Parts {
            meta: original.meta.clone(),
            tensors: original.tensors.clone(),
        };
        edit(&mut p);
        let path = dir.path().join(format!("case{i}.gguf"));
        p.write(&path);
        files.push((what.to_string(), path, needle));
    }
    // Byte-level damage: a truncated file, and counts and lengths far past the file's size.
    let raw = |name: &str, b: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, b).unwrap();
        path
    };
    files.push((
        "truncated to half".into(),
        raw("half.gguf", &bytes[..bytes.len() / 2]),
        "truncated",
    ));
    let mut huge_tensors = bytes.clone();
    huge_tensors[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    files.push((
        "a tensor count of 2^60".into(),
        raw("tensors.gguf", &huge_tensors),
        "exceed",
    ));
    // The first metadata key's length.
    let mut huge_key = bytes.clone();
    huge_key[24..32].copy_from_slice(&(1u64 << 50).to_le_bytes());
    files.push((
        "a key of 2^50 bytes".into(),
        raw("key.gguf", &huge_key),
        "exceeds the file",
    ));
    files.push((
        "the header alone".into(),
        raw("header.gguf", &bytes[..24]),
        "exceed the file",
    ));

    let mut failures = Vec::new();
    for (what, path, needle) in &files {
        let (code, err) = serve(path, dir.path());
        let ok = code == Some(1) && err.contains(needle) && !err.contains("panicked");
        if !ok {
            failures.push(format!(
                "{what}: exit {code:?}, expected 1 and {needle:?} in: {}",
                err.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
