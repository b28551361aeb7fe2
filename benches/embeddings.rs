//! Embeddings per second on all-MiniLM-L6-v2, in the same run: the model alone
//! (`EmbeddingModel::embed`, one padded batch per call) and the real server over HTTP
//! (`POST /v1/embeddings`), so that the ratio is the serving path's cost.
//!
//! Loads, each for `WICK_BENCH_SECS` seconds (default 8) after a warm-up:
//! - batch N: one client, requests of N distinct ~31-token sentences (N = 1, 32);
//! - 32 clients: requests of one sentence each, batched by the server's embedding queue.
//!
//! Run with `cargo bench -p wick --bench embeddings`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::server::Server;
use serde_json::json;
use wick_runner::{Device, EmbeddingModel};

const WORDS: &str = "the quick brown fox jumps over a lazy dog while seven curious children watch from the old stone bridge near the river where fishermen mend their nets before the storm arrives";

/// A distinct sentence of about 31 tokens.
fn sentence(i: usize) -> String {
    let words: Vec<&str> = WORDS.split(' ').collect();
    let picked: Vec<&str> = (0..24)
        .map(|k| words[(i * 7 + k * 3) % words.len()])
        .collect();
    format!("Sentence {i}: {}.", picked.join(" "))
}

fn secs() -> Duration {
    let s = std::env::var("WICK_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8.0);
    Duration::from_secs_f64(s)
}

fn model_alone(model: &EmbeddingModel, batch: usize) -> f64 {
    let mut next = 0;
    let mut inputs = |n: usize| -> Vec<Vec<u32>> {
        let v = (next..next + n)
            .map(|i| model.tokenize(&sentence(i)).expect("tokenize"))
            .collect();
        next += n;
        v
    };
    model.embed(&inputs(batch)).expect("warm-up");
    let (start, mut done) = (Instant::now(), 0);
    while start.elapsed() < secs() {
        let batch = inputs(batch);
        model.embed(&batch).expect("embed");
        done += batch.len();
    }
    done as f64 / start.elapsed().as_secs_f64()
}

async fn over_http(s: &Server, clients: usize, per_request: usize) -> f64 {
    let next = Arc::new(AtomicUsize::new(1_000_000));
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Instant::now() + secs();
    let start = Instant::now();
    let tasks = (0..clients).map(|_| {
        let (next, done) = (Arc::clone(&next), Arc::clone(&done));
        async move {
            while Instant::now() < stop {
                let first = next.fetch_add(per_request, Ordering::Relaxed);
                let input: Vec<String> = (first..first + per_request).map(sentence).collect();
                let (status, body) = s
                    .post_json(
                        "/v1/embeddings",
                        &json!({"model": "minilm", "input": input}),
                    )
                    .await;
                assert_eq!(status, 200, "{body}");
                assert_eq!(body["data"].as_array().map(Vec::len), Some(per_request));
                done.fetch_add(per_request, Ordering::Relaxed);
            }
        }
    });
    futures::future::join_all(tasks).await;
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = common::fetch_model("minilm");
    let model = EmbeddingModel::load(&dir, &Device::Cpu).expect("load all-MiniLM-L6-v2");
    let tokens: usize = (0..64)
        .map(|i| model.tokenize(&sentence(i)).map(|t| t.len()).unwrap_or(0))
        .sum();
    println!("inputs: ~{:.1} tokens each", tokens as f64 / 64.0);
    let alone = [model_alone(&model, 1), model_alone(&model, 32)];
    drop(model);
    let s = Server::start_with(
        &[
            "--model",
            dir.to_str().expect("UTF-8 path"),
            "--served-model-name",
            "minilm",
        ],
        &[],
    )
    .await;
    over_http(&s, 1, 1).await; // warm-up
    let http = [over_http(&s, 1, 1).await, over_http(&s, 1, 32).await];
    let clients = over_http(&s, 32, 1).await;
    for (i, batch) in [1, 32].iter().enumerate() {
        println!(
            "batch {batch:>2}: model alone {:6.1} embeddings/s, over HTTP {:6.1} embeddings/s ({:.2}x)",
            alone[i],
            http[i],
            http[i] / alone[i]
        );
    }
    println!(
        "32 clients of 1 input over HTTP: {clients:6.1} embeddings/s ({:.2}x the model alone at batch 32)",
        clients / alone[1]
    );
}
