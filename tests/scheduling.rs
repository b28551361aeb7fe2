//! The scheduler under load, end to end on the real model: preemption, prefix caching,
//! admission control and cancellation.

mod common;

use std::time::{Duration, Instant};

use common::server::{chat, Server};
use futures::StreamExt;
use serde_json::{json, Value};

fn prompts(n: usize) -> Vec<String> {
    let topics = [
        "the sea",
        "a robot",
        "tea",
        "mountains",
        "a city",
        "music",
        "rain",
        "time",
    ];
    (0..n)
        .map(|i| {
            format!(
                "Write two sentences about {} (note {i}).",
                topics[i % topics.len()]
            )
        })
        .collect()
}

async fn wait_idle(s: &Server) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let used = s.metric("wick_kv_cache_blocks_used").await;
        let running = s.metric("wick_requests_running").await;
        let waiting = s.metric("wick_requests_waiting").await;
        if used == 0.0 && running == 0.0 && waiting == 0.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not idle: {used} blocks used, {running} running, {waiting} waiting"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_under_a_small_cache_keeps_every_output_equal_to_its_solo_run() {
    // 20 blocks of 16 positions; 16 streams that each grow to about 70 positions.
    let s = Server::start(&[
        "--kv-cache-blocks",
        "20",
        "--enable-prefix-caching",
        "false",
    ])
    .await;
    let prompts = prompts(16);
    let (solo, together) = s.solo_and_together(&prompts, 32).await;
    for (i, (a, b)) in solo.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "prompt {i}: output changed under preemption");
    }
    assert!(
        s.metric("wick_preemptions_total").await > 0.0,
        "no preemption happened"
    );
    wait_idle(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_system_prompt_is_computed_once_and_changes_nothing() {
    let system = format!(
        "You are a careful assistant. {}",
        "Answer briefly, cite no sources, and keep a friendly tone. ".repeat(40)
    );
    let ask = |q: &str| {
        json!({
            "model": "smollm2",
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
            "temperature": 0, "max_tokens": 12,
        })
    };
    let run = |caching: &'static str| {
        let ask = &ask;
        async move {
            let s = Server::start(&["--enable-prefix-caching", caching]).await;
            let mut outs = Vec::new();
            let mut hits = Vec::new();
            for q in ["What is 2 + 2?", "Name a colour."] {
                let v = s.complete(&ask(q)).await;
                outs.push(
                    v["choices"][0]["message"]["content"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                );
                hits.push(s.metric("wick_prefix_cache_hits_total").await);
            }
            let queries = s.metric("wick_prefix_cache_queries_total").await;
            (outs, hits, queries)
        }
    };
    let (with_cache, hits, queries) = run("true").await;
    let (without, no_hits, _) = run("false").await;
    assert_eq!(with_cache, without, "prefix caching changed the output");
    assert_eq!(hits[0], 0.0);
    assert!(
        hits[1] >= 480.0,
        "second request hit only {} tokens",
        hits[1]
    );
    assert!(queries > hits[1]);
    assert_eq!(no_hits[1], 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_gets_429s_with_retry_after_and_every_accepted_request_completes() {
    let s = Server::start(&["--max-num-seqs", "1", "--max-waiting-requests", "2"]).await;
    let prompts = prompts(12);
    let runs = prompts.iter().map(|p| {
        let s = &s;
        let body = chat(p, 8);
        async move {
            let r = s.post(&body).await;
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            (status, retry, r.json::<Value>().await.unwrap())
        }
    });
    let results = futures::future::join_all(runs).await;
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let limited: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(ok + limited.len(), results.len(), "{results:?}");
    // The first two always fit (one running or waiting, one waiting).
    assert!(ok >= 2, "only {ok} accepted");
    assert!(
        !limited.is_empty(),
        "no 429 for 12 requests against a queue of 2"
    );
    for (_, retry, body) in &limited {
        assert!(retry.is_some_and(|r| r >= 1), "429 without Retry-After");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    }
    for (status, _, body) in &results {
        if *status == 200 {
            assert_eq!(body["usage"]["completion_tokens"], 8, "{body}");
        }
    }
    assert_eq!(
        s.metric("wick_request_failure_total{error_type=\"queue_full\"}")
            .await,
        limited.len() as f64
    );
    wait_idle(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_cannot_start_in_time_gets_503() {
    let s = Server::start(&["--max-num-seqs", "1", "--max-queue-time", "0.3"]).await;
    let long = {
        let mut b = chat("Write a long story about a lighthouse.", 300);
        b["stream"] = json!(true);
        b
    };
    let first = s.post(&long).await;
    assert_eq!(first.status(), 200);
    let r = s.post(&chat("Say yes.", 4)).await;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "queue_timeout");
    drop(first);
    wait_idle(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_random_disconnects_leave_no_block_used() {
    let s = Server::start(&["--max-num-seqs", "8"]).await;
    let prompts = prompts(50);
    let runs = prompts.iter().enumerate().map(|(i, p)| {
        let s = &s;
        let mut body = chat(p, 200);
        body["stream"] = json!(true);
        // Leave after 0 to 9 events: some while waiting, some mid-prefill, most mid-decode.
        let leave_after = (i * 7) % 10;
        async move {
            let r = s.post(&body).await;
            if leave_after == 0 {
                return;
            }
            let mut events = r.bytes_stream();
            let mut seen = 0;
            while seen < leave_after {
                match events.next().await {
                    Some(Ok(chunk)) => {
                        seen += String::from_utf8_lossy(&chunk).matches("data: ").count()
                    }
                    _ => break,
                }
            }
        }
    });
    // Some clients give up before their request is even answered.
    let impatient = prompts.iter().take(5).map(|p| {
        let s = &s;
        let body = chat(p, 50);
        async move {
            let _ = tokio::time::timeout(Duration::from_millis(30), s.post(&body)).await;
        }
    });
    futures::future::join(
        futures::future::join_all(runs),
        futures::future::join_all(impatient),
    )
    .await;
    wait_idle(&s).await;
    assert!(
        s.metric("wick_request_success_total{finish_reason=\"abort\"}")
            .await
            >= 40.0
    );
    // And it still serves.
    let v = s.complete(&chat("Say yes.", 3)).await;
    assert_eq!(v["usage"]["completion_tokens"], 3);
}
