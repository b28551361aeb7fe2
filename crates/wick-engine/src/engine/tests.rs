//! The engine loop with a deterministic fake runner.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use wick_core::{request_queue, EngineHandle, Metrics, QueueLimits, SamplingParams};

use super::*;

const VOCAB: usize = 16;
const STOP: u32 = 15;

/// Always predicts "last token + 1": a sequence counts up until it reaches `STOP`.
struct CountingRunner {
    fail: bool,
}

impl StepRunner for CountingRunner {
    fn step(&mut self, batch: &ScheduledBatch) -> Result<Vec<Vec<f32>>, RunnerError> {
        if self.fail {
            return Err(RunnerError::Step("boom".into()));
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
        enable_prefix_caching: true,
        prefill_latency_share: 0.25,
        prefill_tokens_per_decode: 0,
        min_prefill_tokens_per_step: 1,
    }
}

const LIMITS: QueueLimits = QueueLimits {
    max_waiting_requests: 8,
    max_waiting_prompt_tokens: 0,
};

fn spawn(fail: bool) -> (EngineHandle, Metrics, std::thread::JoinHandle<()>) {
    spawn_with(cfg(), fail)
}

fn spawn_with(
    cfg: SchedulerConfig,
    fail: bool,
) -> (EngineHandle, Metrics, std::thread::JoinHandle<()>) {
    spawn_runner(cfg, CountingRunner { fail }, None)
}

fn spawn_runner<R: StepRunner + Send + 'static>(
    cfg: SchedulerConfig,
    runner: R,
    max_queue_time: Option<Duration>,
) -> (EngineHandle, Metrics, std::thread::JoinHandle<()>) {
    let (handle, queue) = request_queue(LIMITS);
    let metrics = Metrics::new();
    let m = metrics.clone();
    let t = std::thread::spawn(move || Engine::new(cfg, runner, queue, m, max_queue_time).run());
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
        tag: format!("t{id}"),
        prompt,
        max_tokens,
        stop_token_ids: vec![STOP],
        sampling: SamplingParams::greedy(),
        arrived: Instant::now(),
        events: tx,
        constraint: None,
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
            TokenEvent::Token {
                id: 5,
                logprobs: None
            },
            TokenEvent::Token {
                id: 6,
                logprobs: None
            },
            TokenEvent::Token {
                id: 7,
                logprobs: None
            },
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
            TokenEvent::Token {
                id: 13,
                logprobs: None
            },
            TokenEvent::Token {
                id: 14,
                logprobs: None
            },
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
    // The gauges are updated at the end of the step that sent the token.
    wait_until(|| metrics.kv_blocks_used.get() > 0);
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
            kind: ErrorKind::Internal,
            message: "step: boom".into()
        }]
    );
    let events = collect(submit(&h, 2, vec![1], 4));
    assert!(matches!(events[0], TokenEvent::Error { .. }));
    wait_until(|| metrics.kv_blocks_used.get() == 0);
    drop(h);
    t.join().unwrap();
}

/// The counting runner, panicking on the steps listed (0-based), or on every step.
struct PanickingRunner {
    steps: usize,
    panic_on: Option<Vec<usize>>,
}

impl StepRunner for PanickingRunner {
    fn step(&mut self, batch: &ScheduledBatch) -> Result<Vec<Vec<f32>>, RunnerError> {
        let n = self.steps;
        self.steps += 1;
        if self.panic_on.as_ref().is_none_or(|p| p.contains(&n)) {
            panic!("kernel bug on step {n}");
        }
        CountingRunner { fail: false }.step(batch)
    }
}

#[test]
fn a_panicking_step_fails_its_requests_and_the_engine_goes_on() {
    let runner = PanickingRunner {
        steps: 0,
        panic_on: Some(vec![0]),
    };
    let (h, metrics, t) = spawn_runner(cfg(), runner, None);
    let events = collect(submit(&h, 1, vec![1, 2], 4));
    match &events[..] {
        [TokenEvent::Error {
            kind: ErrorKind::Internal,
            message,
        }] => assert!(message.contains("kernel bug on step 0"), "{message}"),
        other => panic!("{other:?}"),
    }
    // The next request is served, the failed one's blocks are back, nothing is marked dead.
    let events = collect(submit(&h, 2, vec![1], 3));
    assert_eq!(tokens(&events), vec![2, 3, 4]);
    wait_until(|| metrics.kv_blocks_used.get() == 0);
    assert_eq!(
        metrics
            .request_failure
            .with_label_values(&["internal"])
            .get(),
        1
    );
    assert!(!h.has_failed());
    drop(h);
    t.join().unwrap();
}

#[test]
fn an_engine_whose_every_step_panics_marks_itself_failed_and_stops() {
    let runner = PanickingRunner {
        steps: 0,
        panic_on: None,
    };
    let (h, metrics, t) = spawn_runner(cfg(), runner, None);
    // One request per step: each fails alone, until the third in a row gives up.
    for id in 1..=MAX_PANICKED_STEPS as u64 {
        let events = collect(submit(&h, id, vec![1], 4));
        assert!(
            matches!(
                events[..],
                [TokenEvent::Error {
                    kind: ErrorKind::Internal,
                    ..
                }]
            ),
            "{events:?}"
        );
    }
    // The thread ends by itself (the handle is still held), marked failed.
    t.join().unwrap();
    assert!(h.has_failed());
    assert!(matches!(
        h.submit(EngineRequest {
            id: RequestId(99),
            tag: "t99".into(),
            prompt: vec![1],
            max_tokens: 1,
            stop_token_ids: vec![],
            sampling: SamplingParams::greedy(),
            arrived: Instant::now(),
            events: unbounded_channel().0,
            constraint: None,
        }),
        Err(wick_core::SubmitError::EngineStopped)
    ));
    assert_eq!(
        metrics
            .request_failure
            .with_label_values(&["internal"])
            .get(),
        MAX_PANICKED_STEPS as u64
    );
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
    assert!(
        matches!(&events[0], TokenEvent::Error { kind: ErrorKind::Rejected, message } if message.contains("KV cache"))
    );
    drop(h);
    t.join().unwrap();
}

/// Keeps its own "KV cache" (the token at every slot) and predicts from the whole context it
/// reads back through the block table: a wrong block table, a stale shared block or a bad
/// recompute changes its output.
struct ContextRunner {
    block_size: usize,
    slots: HashMap<usize, u32>,
}

impl StepRunner for ContextRunner {
    fn step(&mut self, batch: &ScheduledBatch) -> Result<Vec<Vec<f32>>, RunnerError> {
        // A step takes a moment, as a real one does: requests submitted together are then
        // running together (without it, one could finish before the next arrives, and the
        // preemption test would see no preemption: 3 runs in 20 did).
        std::thread::sleep(Duration::from_millis(1));
        let bs = self.block_size;
        let slot = |table: &[wick_core::BlockId], p: usize| table[p / bs].index() * bs + p % bs;
        let mut rows = Vec::new();
        for s in &batch.seqs {
            for (i, &t) in s.tokens.iter().enumerate() {
                self.slots.insert(slot(&s.block_table, s.start_pos + i), t);
            }
            if s.sample {
                let mut h: u64 = 1469598103934665603;
                for p in 0..s.start_pos + s.tokens.len() {
                    let t = self.slots[&slot(&s.block_table, p)];
                    h = (h ^ t as u64).wrapping_mul(1099511628211);
                }
                let mut row = vec![0.0; VOCAB];
                row[3 + (h % 12) as usize] = 10.0; // never the stop token
                rows.push(row);
            }
        }
        Ok(rows)
    }
}

fn context_engine(cfg: SchedulerConfig) -> (EngineHandle, Metrics, std::thread::JoinHandle<()>) {
    let runner = ContextRunner {
        block_size: cfg.block_size,
        slots: HashMap::new(),
    };
    spawn_runner(cfg, runner, None)
}

fn tokens(events: &[TokenEvent]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            TokenEvent::Token { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

fn prompts() -> Vec<Vec<u32>> {
    (0..4)
        .map(|i| (0..6).map(|j| (i * 5 + j) % 13).collect())
        .collect()
}

fn solo_outputs() -> Vec<Vec<u32>> {
    prompts()
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let (h, _, t) = context_engine(cfg());
            let out = tokens(&collect(submit(&h, i as u64, p, 12)));
            drop(h);
            t.join().unwrap();
            out
        })
        .collect()
}

#[test]
fn preempted_sequences_give_the_same_output_as_solo_runs() {
    let solo = solo_outputs();
    // 7 blocks of 4 = 28 positions for four sequences that each grow to 18.
    let small = SchedulerConfig {
        num_blocks: 7,
        ..cfg()
    };
    let (h, metrics, t) = context_engine(small);
    let rxs: Vec<_> = prompts()
        .into_iter()
        .enumerate()
        .map(|(i, p)| submit(&h, i as u64, p, 12))
        .collect();
    let outs: Vec<Vec<u32>> = rxs.into_iter().map(|rx| tokens(&collect(rx))).collect();
    assert_eq!(outs, solo);
    assert!(metrics.preemptions.get() > 0, "no preemption happened");
    wait_until(|| metrics.kv_blocks_used.get() == 0);
    drop(h);
    t.join().unwrap();
}

#[test]
fn a_shared_prefix_is_reused_and_gives_the_same_output() {
    let run = |caching: bool| {
        let (h, metrics, t) = context_engine(SchedulerConfig {
            enable_prefix_caching: caching,
            ..cfg()
        });
        let system: Vec<u32> = (0..13).map(|i| i % 11).collect();
        let mut outs = Vec::new();
        for (i, tail) in [[1u32, 2], [3, 4]].iter().enumerate() {
            let prompt = [system.clone(), tail.to_vec()].concat();
            outs.push(tokens(&collect(submit(&h, i as u64, prompt, 6))));
        }
        let hits = metrics.prefix_cache_hits.get();
        drop(h);
        t.join().unwrap();
        (outs, hits)
    };
    let (with_cache, hits) = run(true);
    let (without, no_hits) = run(false);
    assert_eq!(with_cache, without);
    assert_eq!(hits, 12, "the second request reuses 3 full blocks of 4");
    assert_eq!(no_hits, 0);
}

#[test]
fn a_request_that_waits_too_long_gets_a_queue_timeout() {
    // One sequence at a time, and a slow runner: the second request cannot start in time.
    let one = SchedulerConfig {
        max_num_seqs: 1,
        ..cfg()
    };
    let (h, metrics, t) = spawn_runner(
        one,
        CountingRunner { fail: false },
        Some(Duration::from_millis(20)),
    );
    let first = submit(&h, 1, vec![0], 40);
    let second = submit(&h, 2, vec![0], 4);
    let events = collect(second);
    assert!(
        matches!(
            events[0],
            TokenEvent::Error {
                kind: ErrorKind::QueueTimeout,
                ..
            }
        ),
        "{events:?}"
    );
    assert!(matches!(
        collect(first).last(),
        Some(TokenEvent::Finished { .. })
    ));
    assert_eq!(
        metrics
            .request_failure
            .with_label_values(&["queue_timeout"])
            .get(),
        1
    );
    assert_eq!(h.num_waiting(), 0);
    drop(h);
    t.join().unwrap();
}

/// Allows only token 9, and is complete after three of them.
#[derive(Debug)]
struct OnlyNines {
    seen: usize,
}

impl TokenConstraint for OnlyNines {
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        for (i, l) in logits.iter_mut().enumerate() {
            if i != 9 {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }
    fn consume(&mut self, token: u32) -> Result<(), String> {
        if token != 9 {
            return Err(format!("token {token} is not allowed"));
        }
        self.seen += 1;
        Ok(())
    }
    fn is_finished(&self) -> bool {
        self.seen == 3
    }
}

#[test]
fn a_constraint_masks_sampling_and_ends_the_sequence_when_complete() {
    let (h, metrics, t) = spawn(false);
    let (tx, rx) = unbounded_channel();
    h.submit(EngineRequest {
        id: RequestId(1),
        tag: "t1".into(),
        prompt: vec![1, 2],
        max_tokens: 20,
        stop_token_ids: vec![STOP],
        sampling: SamplingParams::greedy(),
        arrived: Instant::now(),
        events: tx,
        constraint: Some(Box::new(OnlyNines { seen: 0 })),
    })
    .unwrap();
    let events = collect(rx);
    assert_eq!(tokens(&events), vec![9, 9, 9]);
    assert!(matches!(
        events.last(),
        Some(TokenEvent::Finished {
            reason: FinishReason::Stop,
            ..
        })
    ));
    wait_until(|| metrics.kv_blocks_used.get() == 0);
    drop(h);
    t.join().unwrap();
}

#[test]
fn end_all_ends_every_request_with_a_shutdown_error_and_counts_it() {
    let (h, metrics, t) = spawn(false);
    // It counts 1..15 at 2 ms a step: still running when end_all arrives after its first token.
    let mut rx = submit(&h, 1, vec![0], 60);
    assert!(matches!(rx.blocking_recv(), Some(TokenEvent::Token { .. })));
    h.end_all();
    let events = collect(rx);
    assert!(
        matches!(
            events.last(),
            Some(TokenEvent::Error {
                kind: ErrorKind::Shutdown,
                ..
            })
        ),
        "{events:?}"
    );
    assert_eq!(
        metrics
            .request_failure
            .with_label_values(&["shutdown"])
            .get(),
        1
    );
    drop(h);
    t.join().unwrap();
}

#[test]
fn per_request_histograms_are_recorded_at_the_end() {
    let (h, metrics, t) = spawn(false);
    let events = collect(submit(&h, 1, vec![0, 1, 2], 5));
    assert!(matches!(events.last(), Some(TokenEvent::Finished { .. })));
    drop(h);
    t.join().unwrap();
    for (name, hist) in [
        ("queue", &metrics.queue_time),
        ("prefill", &metrics.prefill_time),
        ("decode", &metrics.decode_time),
        ("tpot", &metrics.time_per_output_token),
        ("prompt", &metrics.prompt_length),
        ("generation", &metrics.generation_length),
        ("batch", &metrics.step_batch_size),
        ("step", &metrics.step_duration),
    ] {
        assert!(hist.get_sample_count() >= 1, "{name} not recorded");
    }
    assert_eq!(metrics.prompt_length.get_sample_sum(), 3.0);
    assert_eq!(metrics.generation_length.get_sample_sum(), 5.0);
    // Four tokens after the first, each after a step of at least 2 ms.
    assert!(metrics.time_per_output_token.get_sample_sum() >= 0.002);
}

/// A runner that draws its own way: counts up like `CountingRunner`, but draws every row
/// itself (plus 100, so the test sees which path gave it) unless the row has a grammar, and
/// records, step by step, each row's state as given (its request's grammar or none).
struct DrawingRunner {
    given: std::sync::Arc<std::sync::Mutex<Vec<Vec<bool>>>>,
}

impl StepRunner for DrawingRunner {
    fn step(&mut self, batch: &ScheduledBatch) -> Result<Vec<Vec<f32>>, RunnerError> {
        CountingRunner { fail: false }.step(batch)
    }

    fn step_sampling(
        &mut self,
        batch: &ScheduledBatch,
        seqs: &mut [SeqSampling<'_>],
    ) -> Result<Vec<Draw>, RunnerError> {
        let rows = self.step(batch)?;
        assert_eq!(rows.len(), seqs.len());
        self.given
            .lock()
            .unwrap()
            .push(seqs.iter().map(|s| s.constraint.is_some()).collect());
        Ok(rows
            .into_iter()
            .zip(seqs.iter_mut())
            .map(|(mut row, s)| match s.constraint {
                Some(_) => s.sample_host(&mut row),
                None => Ok(wick_runner::Sampled {
                    id: wick_runner::argmax(&row) % 10 + 100,
                    logprobs: None,
                }),
            })
            .collect())
    }
}

/// The runner draws each row with its request's own state, in the same steps: a plain
/// request's tokens are the runner's draws, and a request's grammar reaches the runner with
/// its own row (masking it there).
#[test]
fn the_runner_draws_each_row_with_its_requests_state() {
    let given = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let runner = DrawingRunner {
        given: given.clone(),
    };
    let (h, _m, t) = spawn_runner(cfg(), runner, None);
    let plain = submit(&h, 1, vec![3], 6);
    let (tx, rx) = unbounded_channel();
    h.submit(EngineRequest {
        id: RequestId(2),
        tag: "t2".into(),
        prompt: vec![3],
        max_tokens: 6,
        stop_token_ids: vec![STOP],
        sampling: SamplingParams::greedy(),
        arrived: Instant::now(),
        events: tx,
        constraint: Some(Box::new(OnlyNines { seen: 0 })),
    })
    .unwrap();
    let (plain, constrained) = (tokens(&collect(plain)), tokens(&collect(rx)));
    assert_eq!(plain.len(), 6);
    assert!(plain.iter().all(|&id| id >= 100), "{plain:?}");
    assert_eq!(
        constrained,
        vec![9, 9, 9],
        "the grammar's row, masked, ends it"
    );
    let given = given.lock().unwrap();
    assert!(
        given.iter().any(|step| step == &vec![false, true]),
        "no step held both rows: {given:?}"
    );
    assert!(given.iter().flatten().filter(|&&g| g).count() == 3);
    drop(h);
    t.join().unwrap();
}
