//! The engine loop with a deterministic fake runner.

use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use wick_core::{request_queue, EngineHandle, Metrics, SamplingParams};

use super::*;

const VOCAB: usize = 16;
const STOP: u32 = 15;

/// Always predicts "last token + 1": a sequence counts up until it reaches `STOP`.
struct CountingRunner {
    fail: bool,
}

impl StepRunner for CountingRunner {
    fn step(&mut self, batch: &ScheduledBatch) -> Result<Vec<Vec<f32>>, String> {
        if self.fail {
            return Err("boom".into());
        }
        std::thread::sleep(Duration::from_millis(2));
        Ok(batch
            .seqs
            .iter()
            .filter(|s| s.sample)
            .map(|s| {
                let next = (*s.tokens.last().unwrap() as usize + 1) % VOCAB;
                let mut row = vec![0.0; VOCAB];
                row[next] = 10.0;
                row
            })
            .collect())
    }
}

fn cfg() -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 32,
        block_size: 4,
        num_blocks: 16,
        max_model_len: 64,
    }
}

fn spawn(fail: bool) -> (EngineHandle, Metrics, std::thread::JoinHandle<()>) {
    spawn_with(cfg(), fail)
}

fn spawn_with(
    cfg: SchedulerConfig,
    fail: bool,
) -> (EngineHandle, Metrics, std::thread::JoinHandle<()>) {
    let (handle, queue) = request_queue(8);
    let metrics = Metrics::new();
    let m = metrics.clone();
    let t = std::thread::spawn(move || Engine::new(cfg, CountingRunner { fail }, queue, m).run());
    (handle, metrics, t)
}

fn submit(
    h: &EngineHandle,
    id: u64,
    prompt: Vec<u32>,
    max_tokens: usize,
) -> UnboundedReceiver<TokenEvent> {
    let (tx, rx) = unbounded_channel();
    h.submit(EngineRequest {
        id: RequestId(id),
        prompt,
        max_tokens,
        stop_token_ids: vec![STOP],
        sampling: SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            seed: None,
        },
        arrived: Instant::now(),
        events: tx,
    })
    .unwrap();
    rx
}

fn collect(mut rx: UnboundedReceiver<TokenEvent>) -> Vec<TokenEvent> {
    let mut out = Vec::new();
    while let Some(e) = rx.blocking_recv() {
        let end = !matches!(e, TokenEvent::Token { .. });
        out.push(e);
        if end {
            break;
        }
    }
    out
}

fn wait_until(mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn concurrent_requests_each_get_their_own_tokens() {
    let (h, metrics, t) = spawn(false);
    let a = submit(&h, 1, vec![3, 4], 3);
    let b = submit(&h, 2, vec![12], 10);
    let a = collect(a);
    let b = collect(b);
    assert_eq!(
        a,
        vec![
            TokenEvent::Token { id: 5 },
            TokenEvent::Token { id: 6 },
            TokenEvent::Token { id: 7 },
            TokenEvent::Finished {
                reason: FinishReason::Length,
                prompt_tokens: 2,
                completion_tokens: 3
            }
        ]
    );
    // 13, 14, then the stop token 15 ends it without being sent.
    assert_eq!(
        b,
        vec![
            TokenEvent::Token { id: 13 },
            TokenEvent::Token { id: 14 },
            TokenEvent::Finished {
                reason: FinishReason::Stop,
                prompt_tokens: 1,
                completion_tokens: 3
            }
        ]
    );
    wait_until(|| metrics.kv_blocks_used.get() == 0);
    assert_eq!(metrics.generation_tokens.get(), 6);
    assert_eq!(metrics.prompt_tokens.get(), 3);
    drop(h);
    t.join().unwrap();
}

#[test]
fn dropped_receiver_aborts_and_frees_blocks() {
    let (h, metrics, t) = spawn(false);
    let mut rx = submit(&h, 1, vec![0], 60);
    // Wait for the first token, then walk away.
    assert!(matches!(rx.blocking_recv(), Some(TokenEvent::Token { .. })));
    assert!(metrics.kv_blocks_used.get() > 0);
    drop(rx);
    wait_until(|| metrics.kv_blocks_used.get() == 0 && metrics.requests_running.get() == 0);
    assert_eq!(
        metrics.request_success.with_label_values(&["abort"]).get(),
        1
    );
    drop(h);
    t.join().unwrap();
}

#[test]
fn a_failing_step_reports_an_error_and_the_engine_survives() {
    let (h, metrics, t) = spawn(true);
    let events = collect(submit(&h, 1, vec![1, 2], 4));
    assert_eq!(
        events,
        vec![TokenEvent::Error {
            message: "boom".into()
        }]
    );
    let events = collect(submit(&h, 2, vec![1], 4));
    assert!(matches!(events[0], TokenEvent::Error { .. }));
    wait_until(|| metrics.kv_blocks_used.get() == 0);
    drop(h);
    t.join().unwrap();
}

#[test]
fn a_request_too_large_for_the_cache_is_refused() {
    let (h, _metrics, t) = spawn_with(
        SchedulerConfig {
            num_blocks: 8,
            ..cfg()
        },
        false,
    );
    // 8 blocks of 4 = 32 positions.
    let events = collect(submit(&h, 1, vec![1; 60], 30));
    assert!(matches!(&events[0], TokenEvent::Error { message } if message.contains("KV cache")));
    drop(h);
    t.join().unwrap();
}
