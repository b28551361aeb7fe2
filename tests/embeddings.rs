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

fn references() -> Vec<(String, Vec<u32>, Vec<f64>)> {
    let path = common::repo_root().join("tests/data/embeddings/minilm.json");
    let refs: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    refs["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["input"].as_str().unwrap().to_string(),
                serde_json::from_value(c["token_ids"].clone()).unwrap(),
                serde_json::from_value(c["embedding"].clone()).unwrap(),
            )
        })
        .collect()
}

fn vectors(body: &Value) -> Vec<Vec<f32>> {
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["index"], i);
            assert_eq!(d["object"], "embedding");
            match &d["embedding"] {
                Value::String(b64) => {
                    use base64::Engine as _;
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .unwrap();
                    bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()
                }
                v => serde_json::from_value(v.clone()).unwrap(),
            }
        })
        .collect()
}

/// The real binary serving the default chat model and all-MiniLM-L6-v2 together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_model_and_an_embedding_model_serve_from_one_process() {
    let chat = common::model_path();
    let minilm = common::fetch_model("minilm");
    let s = common::server::Server::start_with(
        &[
            "--model",
            chat.to_str().unwrap(),
            "--served-model-name",
            "smollm2",
            "--model",
            minilm.to_str().unwrap(),
            "--served-model-name",
            "minilm",
            "--kv-cache-blocks",
            "256",
        ],
        &[],
    )
    .await;
    let models = s.get_json("/v1/models").await;
    let listed: Vec<(&str, &str)> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap(), m["type"].as_str().unwrap()))
        .collect();
    assert_eq!(listed, [("smollm2", "generate"), ("minilm", "embed")]);

    // Every reference input in one request, as floats and as base64.
    let refs = references();
    let texts: Vec<&str> = refs.iter().map(|r| r.0.as_str()).collect();
    let tokens: usize = refs.iter().map(|r| r.1.len()).sum();
    let mut worst = 1f64;
    for format in ["float", "base64"] {
        let (status, body) = s
            .post_json(
                "/v1/embeddings",
                &serde_json::json!({"model": "minilm", "input": texts, "encoding_format": format}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["object"], "list");
        assert_eq!(body["model"], "minilm");
        assert_eq!(body["usage"]["prompt_tokens"], tokens);
        assert_eq!(body["usage"]["total_tokens"], tokens);
        let got = vectors(&body);
        assert_eq!(got.len(), refs.len());
        for (g, r) in got.iter().zip(&refs) {
            assert_eq!(g.len(), 384);
            let c = cosine(g, &r.2);
            worst = worst.min(c);
            assert!(c >= 0.9999, "{format} {:?}: cosine {c}", r.0);
        }
    }
    eprintln!("over HTTP, worst cosine against the reference: {worst}");

    // Token ids (one list, and lists) give the texts' vectors; one string is one input.
    let ids: Vec<&Vec<u32>> = refs.iter().map(|r| &r.1).take(3).collect();
    let (status, body) = s
        .post_json(
            "/v1/embeddings",
            &serde_json::json!({"model": "minilm", "input": ids}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for (g, r) in vectors(&body).iter().zip(&refs) {
        assert!(cosine(g, &r.2) >= 0.9999);
    }
    for input in [serde_json::json!(refs[0].1), serde_json::json!(refs[0].0)] {
        let (status, body) = s
            .post_json(
                "/v1/embeddings",
                &serde_json::json!({"model": "minilm", "input": input}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let got = vectors(&body);
        assert_eq!(got.len(), 1);
        assert!(cosine(&got[0], &refs[0].2) >= 0.9999);
    }

    // Past the model's 256 tokens: a 400 naming the limit, unless truncation is asked for.
    let long = refs
        .iter()
        .map(|r| r.0.as_str())
        .collect::<Vec<_>>()
        .join(" ")
        .repeat(2);
    let (status, body) = s
        .post_json(
            "/v1/embeddings",
            &serde_json::json!({"model": "minilm", "input": long}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("256"),
        "{body}"
    );
    eprintln!("{}", body["error"]["message"]);
    for (truncate, want) in [(-1, 256), (64, 64)] {
        let (status, body) = s
            .post_json(
                "/v1/embeddings",
                &serde_json::json!({"model": "minilm", "input": long, "truncate_prompt_tokens": truncate}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["usage"]["prompt_tokens"], want);
    }

    // Refusals, each in OpenAI's shape and naming the parameter.
    let refused = [
        (
            serde_json::json!({"model": "minilm", "input": "a", "dimensions": 128}),
            400,
            "dimensions",
        ),
        (
            serde_json::json!({"model": "minilm", "input": "a", "encoding_format": "int8"}),
            400,
            "encoding_format",
        ),
        (
            serde_json::json!({"model": "minilm", "input": ""}),
            400,
            "input",
        ),
        (
            serde_json::json!({"model": "minilm", "input": []}),
            400,
            "input",
        ),
        (
            serde_json::json!({"model": "minilm", "input": [[101, 40000, 102]]}),
            400,
            "input",
        ),
        (
            serde_json::json!({"model": "minilm", "input": "a", "truncate_prompt_tokens": 300}),
            400,
            "truncate_prompt_tokens",
        ),
        (
            serde_json::json!({"model": "smollm2", "input": "a"}),
            400,
            "model",
        ),
        (
            serde_json::json!({"model": "nope", "input": "a"}),
            404,
            "model",
        ),
    ];
    for (req, want, param) in refused {
        let (status, body) = s.post_json("/v1/embeddings", &req).await;
        assert_eq!(status, want, "{req}: {body}");
        assert_eq!(body["error"]["param"], param, "{req}: {body}");
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    let (status, body) = s
        .post_json(
            "/v1/embeddings",
            &serde_json::json!({"model": "minilm", "input": "a", "dimensions": 384}),
        )
        .await;
    assert_eq!(status, 200, "the model's own size is accepted: {body}");

    // The chat model answers on the same process; the embedding model refuses chat.
    let mut req = common::server::chat("Say hello.", 8);
    let reply = s.complete(&req).await;
    assert_eq!(reply["model"], "smollm2");
    assert!(reply["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    req["model"] = "minilm".into();
    let (status, body) = s.post_json("/v1/chat/completions", &req).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("embedding model"));

    // Concurrent requests are batched together and each gets its own vectors.
    let alone = futures::future::join_all(refs.iter().map(|r| async {
        let req = serde_json::json!({"model": "minilm", "input": r.0});
        s.post_json("/v1/embeddings", &req).await
    }))
    .await;
    for ((status, body), r) in alone.iter().zip(&refs) {
        assert_eq!(*status, 200);
        assert!(cosine(&vectors(body)[0], &r.2) >= 0.9999);
    }

    // Every series carries its model's label; both models' requests are counted apart.
    let text = s.metrics().await;
    assert_eq!(
        text.matches("# TYPE wick_prompt_tokens_total counter")
            .count(),
        1
    );
    let minilm_ok = common::server::sample(
        &text,
        "wick_request_success_total{model=\"minilm\",finish_reason=\"stop\"}",
    );
    assert!(minilm_ok >= 6.0 + refs.len() as f64, "{minilm_ok}");
    let chat_ok = common::server::sample(
        &text,
        "wick_request_success_total{model=\"smollm2\",finish_reason=\"length\"}",
    ) + common::server::sample(
        &text,
        "wick_request_success_total{model=\"smollm2\",finish_reason=\"stop\"}",
    );
    assert_eq!(chat_ok, 1.0);
    assert!(
        common::server::sample(&text, "wick_prompt_tokens_total{model=\"minilm\"}")
            >= tokens as f64 * 2.0
    );
}
