//! all-MiniLM-L6-v2 through Wick's embedding model against reference vectors computed without
//! Wick (scripts/embedding-reference.py: the model's tokenizer through Hugging Face's
//! `tokenizers`, a plain BERT forward in numpy float64): the same token ids, and cosine
//! similarity at least 0.9999 on every input, alone and in one padded batch.

mod common;

use serde_json::Value;
use wick_runner::{Device, EmbeddingModel, Pooling};

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * y).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y.powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn minilm_matches_the_reference_vectors_alone_and_batched() {
    let dir = common::fetch_model("minilm");
    let model = EmbeddingModel::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(model.dimensions(), 384);
    assert_eq!(
        model.max_input_tokens(),
        256,
        "sentence_bert_config.json, not the tokenizer's 128"
    );
    assert_eq!(model.pooling(), Pooling::Mean);
    let path = common::repo_root().join("tests/data/embeddings/minilm.json");
    let refs: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = refs["cases"].as_array().unwrap();
    assert!(cases.len() >= 9);
    let mut inputs = Vec::new();
    let mut wants = Vec::new();
    for c in cases {
        let text = c["input"].as_str().unwrap();
        let want_ids: Vec<u32> = serde_json::from_value(c["token_ids"].clone()).unwrap();
        let ids = model.tokenize(text).unwrap();
        assert_eq!(ids, want_ids, "{text}");
        wants.push(serde_json::from_value::<Vec<f64>>(c["embedding"].clone()).unwrap());
        inputs.push(ids);
    }
    assert!(
        inputs.iter().any(|i| i.len() > 128),
        "a case past the tokenizer's own 128"
    );
    let batched = model.embed(&inputs).unwrap();
    let mut worst = 1f64;
    for (i, (input, want)) in inputs.iter().zip(&wants).enumerate() {
        let alone = &model.embed(std::slice::from_ref(input)).unwrap()[0];
        for got in [alone, &batched[i]] {
            let c = cosine(got, want);
            worst = worst.min(c);
            assert!(c >= 0.9999, "{:?}: cosine {c}", cases[i]["input"]);
            let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "normalized: {norm}");
        }
    }
    eprintln!("worst cosine against the reference: {worst}");
    // Different texts are not the same vector.
    assert!(cosine(&batched[0], &wants[5]) < 0.9);
}

#[test]
fn inputs_past_the_limit_or_the_vocabulary_are_refused() {
    let model = EmbeddingModel::load(&common::fetch_model("minilm"), &Device::Cpu).unwrap();
    let e = model.embed(&[vec![101; 257]]).unwrap_err().to_string();
    assert!(e.contains("257 tokens: 1 to 256"), "{e}");
    let e = model.embed(&[vec![]]).unwrap_err().to_string();
    assert!(e.contains("0 tokens"), "{e}");
    let e = model
        .embed(&[vec![101, 40_000, 102]])
        .unwrap_err()
        .to_string();
    assert!(e.contains("token id 40000 out of range"), "{e}");
    assert!(!EmbeddingModel::is_embedding_model(&common::model_path()));
}
