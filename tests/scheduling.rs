//! The scheduler under load, end to end on the real model: preemption, prefix caching,
//! admission control and cancellation.

mod common;

use std::time::Duration;

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
    s.wait_idle().await;
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

/// A streamed request that runs until its client leaves (end of turn ignored, a budget far
/// beyond any test's length), returned once its first token has arrived: it holds the only
/// running slot.
async fn hold_the_engine(s: &Server) -> impl futures::Stream {
    let mut body = chat("Write a long story about a lighthouse.", 8000);
    body["stream"] = json!(true);
    body["ignore_eos"] = json!(true);
    let r = s.post(&body).await;
    assert_eq!(r.status(), 200);
    let mut events = Box::pin(r.bytes_stream());
    let mut text = String::new();
    while !text.contains("\"content\":\"") {
        let chunk = events.next().await.expect("a token").expect("chunk");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_gets_429s_with_retry_after_and_every_accepted_request_completes() {
    let s = Server::start(&["--max-num-seqs", "1", "--max-waiting-requests", "2"]).await;
    // One request runs and will not end until dropped: the waiting queue (2) fills, and the
    // other ten of twelve are refused, however fast the machine.
    let holder = hold_the_engine(&s).await;
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
    let mut runs: futures::stream::FuturesUnordered<_> = runs.collect();
    let mut results = Vec::new();
    while results.len() < 10 {
        results.push(runs.next().await.unwrap());
    }
    let limited: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(limited.len(), 10, "{results:?}");
    for (_, retry, body) in &limited {
        assert!(retry.is_some_and(|r| r >= 1), "429 without Retry-After");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    }
    assert_eq!(
        s.metric("wick_request_failure_total{error_type=\"queue_full\"}")
            .await,
        10.0
    );
    // The holder leaves: the two that waited run to their end.
    drop(holder);
    while let Some(r) = runs.next().await {
        assert_eq!(r.0, 200, "{r:?}");
        assert_eq!(r.2["usage"]["completion_tokens"], 8, "{}", r.2);
    }
    s.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_cannot_start_in_time_gets_503() {
    let s = Server::start(&["--max-num-seqs", "1", "--max-queue-time", "0.3"]).await;
    // The only slot is held until the second request has had its answer.
    let holder = hold_the_engine(&s).await;
    let r = s.post(&chat("Say yes.", 4)).await;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "queue_timeout");
    drop(holder);
    s.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_random_disconnects_leave_no_block_used() {
    let s = Server::start(&["--max-num-seqs", "8"]).await;
    let prompts = prompts(50);
    let runs = prompts.iter().enumerate().map(|(i, p)| {
        let s = &s;
        let mut body = chat(p, 200);
        body["stream"] = json!(true);
        // Never ends before its client leaves (200 tokens, end of turn ignored).
        body["ignore_eos"] = json!(true);
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
    s.wait_idle().await;
    // Every streaming client left before its end: 50 aborts, plus those of the impatient
    // five that reached the engine before they gave up (how many depends on timing, so the
    // count is a range).
    let aborts = s
        .metric("wick_request_success_total{finish_reason=\"abort\"}")
        .await;
    assert!((50.0..=55.0).contains(&aborts), "{aborts} aborts");
    assert_eq!(s.metric("wick_kv_cache_blocks_used").await, 0.0);
    // And it still serves.
    let v = s.complete(&chat("Say yes.", 3)).await;
    assert_eq!(v["usage"]["completion_tokens"], 3);
}
