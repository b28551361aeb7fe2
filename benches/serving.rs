//! Serving figures of the real server on the default model, measured over HTTP:
//! - inter-token latency (p50/p99) of 8 streams, alone and while a ~2,000-token prompt
//!   arrives while they decode (the scheduler's step budget should keep the second within
//!   1.5x of the first);
//! - time to first token of a request with a 500-token system prompt, cold and with a prefix
//!   cache hit.
//!
//! Run with `cargo bench -p wick --bench serving` (or `make bench-serving`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::server::Server;
use futures::StreamExt;
use serde_json::{json, Value};

const STREAMS: usize = 8;
const TOKENS: usize = 128;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// Streams one request; returns the arrival time of every content chunk.
async fn stream_times(s: &Server, body: Value) -> (Instant, Vec<Instant>) {
    let start = Instant::now();
    let r = s.post(&body).await;
    let mut bytes = r.bytes_stream();
    let mut times = Vec::new();
    let mut buf = String::new();
    while let Some(Ok(chunk)) = bytes.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            if event.contains("\"content\":\"") && !event.contains("\"content\":\"\"") {
                times.push(Instant::now());
            }
        }
    }
    (start, times)
}

async fn itl_run(s: &Server, with_long_prompt: bool) -> (f64, f64, usize) {
    let topics = [
        "a lighthouse",
        "a dragon",
        "a train",
        "the moon",
        "a garden",
        "a violin",
        "a storm",
        "a bakery",
    ];
    let streams = (0..STREAMS).map(|i| {
        let body = json!({
            "model": "smollm2", "stream": true, "temperature": 0, "max_tokens": TOKENS,
            "messages": [{"role": "user", "content": format!("Write a long story about {}.", topics[i])}],
        });
        stream_times(s, body)
    });
    let long = async {
        if with_long_prompt {
            // Once the streams decode (their prompts take well under a second).
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let text =
                "The quick brown fox jumps over the lazy dog near the river bank. ".repeat(150);
            let body = json!({
                "model": "smollm2", "temperature": 0, "max_tokens": 1,
                "messages": [{"role": "user", "content": text}],
            });
            let v: Value = s.post(&body).await.json().await.unwrap_or(Value::Null);
            v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize
        } else {
            0
        }
    };
    let (results, long_tokens) =
        futures::future::join(futures::future::join_all(streams), long).await;
    let mut gaps: Vec<f64> = results
        .iter()
        .flat_map(|(_, t)| t.windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3))
        .collect();
    let p50 = percentile(&mut gaps, 0.5);
    let p99 = percentile(&mut gaps, 0.99);
    (p50, p99, long_tokens)
}

async fn ttft(s: &Server, system: &str, question: &str) -> f64 {
    let body = json!({
        "model": "smollm2", "stream": true, "temperature": 0, "max_tokens": 4,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
    });
    let (start, times) = stream_times(s, body).await;
    times
        .first()
        .map(|t| (*t - start).as_secs_f64() * 1e3)
        .unwrap_or(f64::NAN)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a listing
    }
    // Extra `wick serve` flags to compare settings, e.g. WICK_SERVE_ARGS="--min-prefill-tokens-per-step 32".
    let extra = std::env::var("WICK_SERVE_ARGS").unwrap_or_default();
    let extra: Vec<&str> = extra.split_whitespace().collect();
    let s = Server::start(&extra).await;
    // Warm up.
    itl_run(&s, false).await;
    let (a50, a99, _) = itl_run(&s, false).await;
    let (b50, b99, long_tokens) = itl_run(&s, true).await;
    println!("inter-token latency of {STREAMS} streams ({TOKENS} tokens each), ms:");
    println!("  alone:                            p50 {a50:7.1}  p99 {a99:7.1}");
    println!("  with a {long_tokens}-token prompt arriving: p50 {b50:7.1}  p99 {b99:7.1}  (p99 ratio {:.2})", b99 / a99);

    let filler =
        "Answer briefly, cite no sources, and keep a friendly tone in every reply. ".repeat(34);
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for round in 0..3 {
        let system = format!("Session {round}. You are a careful assistant. {filler}");
        cold.push(ttft(&s, &system, "What is 2 + 2?").await);
        warm.push(ttft(&s, &system, "Name a colour.").await);
    }
    let hits = s.metric("wick_prefix_cache_hits_total").await;
    println!("time to first token with a ~500-token system prompt, ms (median of 3):");
    println!("  cold:       {:7.1}", percentile(&mut cold, 0.5));
    println!(
        "  prefix hit: {:7.1}   (prefix cache hits: {hits} tokens)",
        percentile(&mut warm, 0.5)
    );
}
