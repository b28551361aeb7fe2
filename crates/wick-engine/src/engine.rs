use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;
use wick_core::{
    request_queue, EngineCommand, EngineHandle, EngineReceiver, EngineRequest, ErrorKind,
    FinishReason, Metrics, QueueLimits, Recv, RequestId, ScheduledBatch, TokenConstraint,
    TokenEvent, TokenLogprobs,
};
use wick_runner::{Draw, ModelAssets, Runner, RunnerError, Sampler, SeqSampling};
use wick_scheduler::{attended, CostFit, Scheduler, SchedulerConfig, SeqOutcome, Sequence};

/// How long the idle loop waits for a request before looking at its channels again.
const IDLE_WAIT: Duration = Duration::from_millis(50);
/// The window over which the completion rate (for `Retry-After`) is measured.
const RATE_WINDOW: Duration = Duration::from_secs(30);
/// Steps in a row that may panic before the engine gives up: one failed step ends only its
/// own requests; a runner that panics on every step is broken, and the process should exit
/// so that it is restarted.
const MAX_PANICKED_STEPS: u32 = 3;

/// What the engine needs from a model runner: one step over a scheduled batch that draws
/// the next token of each sequence scheduled with `sample`. A failed step is a typed
/// [`RunnerError`]: it fails that step's requests, with its message.
pub trait StepRunner {
    /// A row of logits per sequence scheduled with `sample`, in batch order.
    fn step(&mut self, batch: &ScheduledBatch) -> Result<Vec<Vec<f32>>, RunnerError>;

    /// Seconds the last step spent in attention, if the runner measures it: with it the
    /// engine fits what steps cost and the scheduler sizes prompt chunks by time.
    fn attention_seconds(&self) -> Option<f64> {
        None
    }

    /// The step, and each sampling sequence's draw with its state (`seqs`, batch order):
    /// where and how to draw is the runner's choice. By default every row is drawn on the
    /// host from [`StepRunner::step`]'s logits.
    fn step_sampling(
        &mut self,
        batch: &ScheduledBatch,
        seqs: &mut [SeqSampling<'_>],
    ) -> Result<Vec<Draw>, RunnerError> {
        wick_runner::draw_on_host(self.step(batch)?, seqs)
    }
}

impl StepRunner for Runner {
    fn step(&mut self, batch: &ScheduledBatch) -> Result<Vec<Vec<f32>>, RunnerError> {
        Runner::step(self, batch)
    }

    fn step_sampling(
        &mut self,
        batch: &ScheduledBatch,
        seqs: &mut [SeqSampling<'_>],
    ) -> Result<Vec<Draw>, RunnerError> {
        Runner::step_sampling(self, batch, seqs)
    }

    fn attention_seconds(&self) -> Option<f64> {
        Runner::attention_seconds(self)
    }
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// `max_model_len` and `num_blocks` here are upper bounds and defaults: the model's own
    /// limit and the KV cache the loader allocates set the final values.
    pub scheduler: SchedulerConfig,
    pub queue: QueueLimits,
    /// A request that has not started after this long ends with a queue-timeout error.
    pub max_queue_time: Option<Duration>,
}

/// What the loader hands the engine.
pub struct Loaded<R> {
    pub runner: R,
    pub assets: ModelAssets,
    /// Blocks in the KV cache the runner allocated.
    pub num_blocks: usize,
}

/// Sent once the model is loaded and the engine is serving.
pub struct Ready {
    pub assets: ModelAssets,
    /// The longest sequence (prompt plus output) this engine accepts.
    pub max_model_len: usize,
    pub num_blocks: usize,
}

/// A started engine: its queue handle, its ready handshake and its thread.
pub struct Started {
    pub handle: EngineHandle,
    /// Receives `Ok` once the model is loaded, or the load error.
    pub ready: mpsc::Receiver<Result<Ready, String>>,
    pub thread: JoinHandle<()>,
}

/// Spawns the engine thread. `load` runs on it; its outcome arrives on `Started::ready`.
pub fn start<R, L>(cfg: EngineConfig, metrics: Metrics, load: L) -> std::io::Result<Started>
where
    R: StepRunner,
    L: FnOnce() -> Result<Loaded<R>, String> + Send + 'static,
{
    let (handle, queue) = request_queue(cfg.queue);
    let (ready_tx, ready_rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("wick-engine".into())
        .spawn(move || {
            let Some(loaded) = run_loader(load, &ready_tx) else {
                return;
            };
            let mut sched = cfg.scheduler.clone();
            sched.num_blocks = loaded.num_blocks;
            sched.max_model_len = sched
                .max_model_len
                .min(loaded.assets.max_model_len)
                .min(sched.num_blocks * sched.block_size);
            let ready = Ready {
                assets: loaded.assets,
                max_model_len: sched.max_model_len,
                num_blocks: sched.num_blocks,
            };
            let engine = Engine::new(sched, loaded.runner, queue, metrics, cfg.max_queue_time);
            if ready_tx.send(Ok(ready)).is_ok() {
                engine.run();
            }
        })?;
    Ok(Started {
        handle,
        ready: ready_rx,
        thread,
    })
}

/// A request the engine is serving.
struct Live {
    events: UnboundedSender<TokenEvent>,
    /// The request's x-request-id, for log lines.
    tag: String,
    sampler: Sampler,
    arrived: Instant,
    /// When it was first scheduled (queue time ends, prefill begins).
    scheduled: Option<Instant>,
    /// When its first token was sampled.
    first_token: Option<Instant>,
    generated: usize,
    prompt_len: usize,
    /// Scheduled at least once (it has left the waiting queue's admission count).
    started: bool,
    constraint: Option<Box<dyn TokenConstraint>>,
    last_token: Option<Instant>,
}

pub(crate) struct Engine<R> {
    sched: Scheduler,
    /// What steps cost, measured, for the scheduler's prompt chunks.
    cost: CostFit,
    runner: R,
    queue: EngineReceiver,
    metrics: Metrics,
    max_queue_time: Option<Duration>,
    live: HashMap<RequestId, Live>,
    finishes: VecDeque<Instant>,
    preemptions_seen: u64,
    prefix_seen: (u64, u64),
    /// Steps in a row whose runner or sampler panicked.
    panicked_steps: u32,
    /// Steps computed (batches run), for the watchdog's messages.
    steps: u64,
}

impl<R: StepRunner> Engine<R> {
    pub(crate) fn new(
        cfg: SchedulerConfig,
        runner: R,
        queue: EngineReceiver,
        metrics: Metrics,
        max_queue_time: Option<Duration>,
    ) -> Self {
        metrics.kv_blocks_total.set(cfg.num_blocks as i64);
        Self {
            sched: Scheduler::new(cfg),
            cost: CostFit::default(),
            runner,
            queue,
            metrics,
            max_queue_time,
            live: HashMap::new(),
            finishes: VecDeque::new(),
            preemptions_seen: 0,
            prefix_seen: (0, 0),
            panicked_steps: 0,
            steps: 0,
        }
    }

    /// Runs until every handle is dropped and every accepted request has ended, or until
    /// the engine fails for good: a panic outside a step's runner and sampler (the
    /// scheduler's state can no longer be trusted), or [`MAX_PANICKED_STEPS`] steps in a
    /// row that panicked. Then it marks the queue failed (readiness turns 503, new requests
    /// are refused) and ends every request it has with an internal error.
    pub(crate) fn run(mut self) {
        loop {
            match catch_unwind(AssertUnwindSafe(|| self.turn())) {
                Ok(Turn::Go) => {}
                Ok(Turn::Closed) => return,
                Ok(Turn::Fail(message)) => return self.fail_for_good(message),
                Err(panic) => return self.fail_for_good(panic_message(&*panic)),
            }
        }
    }

    /// One pass of the loop: commands, reaping, one step, gauges.
    fn turn(&mut self) -> Turn {
        if !self.take_commands() && !self.sched.has_work() {
            return Turn::Closed;
        }
        if self.queue.end_all_requested() && !self.live.is_empty() {
            self.end_all();
        }
        self.reap_closed();
        self.expire_waiting();
        if self.sched.has_work() {
            // The watchdog sees how long since the engine last moved while it has work.
            self.queue.beat(self.steps);
            self.step();
            self.queue.beat(self.steps);
            if self.panicked_steps >= MAX_PANICKED_STEPS {
                return Turn::Fail(format!("{MAX_PANICKED_STEPS} steps in a row panicked"));
            }
        }
        self.update_gauges();
        if !self.sched.has_work() {
            self.queue.rest();
        }
        Turn::Go
    }

    fn fail_for_good(mut self, message: String) {
        tracing::error!(error = %message, "the engine cannot go on; readiness turns 503");
        self.queue.mark_failed();
        self.queue.rest();
        let message = format!("the engine failed and is restarting: {message}");
        // The scheduler may be what panicked: tell the clients directly.
        for (_, live) in self.live.drain() {
            self.metrics.failure(ErrorKind::Internal.as_str());
            let _ = live.events.send(TokenEvent::Error {
                kind: ErrorKind::Internal,
                message: message.clone(),
            });
        }
        self.metrics.requests_running.set(0);
        self.metrics.requests_waiting.set(0);
    }

    /// Takes queued commands, waiting a little if there is nothing else to do. Returns false
    /// once the queue is closed.
    fn take_commands(&mut self) -> bool {
        if !self.sched.has_work() {
            match self.queue.recv_timeout(IDLE_WAIT) {
                Recv::Item(cmd) => self.apply(cmd),
                Recv::Empty => return true,
                Recv::Closed => return false,
            }
        }
        loop {
            match self.queue.try_recv() {
                Recv::Item(cmd) => self.apply(cmd),
                Recv::Empty => return true,
                Recv::Closed => return false,
            }
        }
    }

    fn apply(&mut self, cmd: EngineCommand) {
        match cmd {
            EngineCommand::Add(req) => self.add(*req),
            EngineCommand::Abort(id) => self.end(id, FinishReason::Abort),
        }
    }

    fn add(&mut self, req: EngineRequest) {
        let prompt_len = req.prompt.len();
        let sampler = Sampler::new(req.sampling, &req.prompt);
        let seq = Sequence::new(req.id, req.prompt, req.max_tokens, req.stop_token_ids);
        if let Err(e) = self.sched.add(seq) {
            self.queue.release(prompt_len);
            self.metrics.failure(ErrorKind::Rejected.as_str());
            tracing::info!(request_id = %req.tag, error = %e, "refused");
            let _ = req.events.send(TokenEvent::Error {
                kind: ErrorKind::Rejected,
                message: e.to_string(),
            });
            return;
        }
        self.metrics.prompt_tokens.inc_by(prompt_len as u64);
        self.live.insert(
            req.id,
            Live {
                events: req.events,
                tag: req.tag,
                sampler,
                arrived: req.arrived,
                scheduled: None,
                first_token: None,
                generated: 0,
                prompt_len,
                started: false,
                last_token: None,
                constraint: req.constraint,
            },
        );
    }

    /// Aborts every request whose client has gone (its receiver dropped).
    fn reap_closed(&mut self) {
        let gone: Vec<RequestId> = self
            .live
            .iter()
            .filter(|(_, l)| l.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.end(id, FinishReason::Abort);
        }
    }

    /// Ends the requests that waited longer than `max_queue_time` without starting.
    fn expire_waiting(&mut self) {
        let Some(limit) = self.max_queue_time else {
            return;
        };
        let expired: Vec<RequestId> = self
            .live
            .iter()
            .filter(|(_, l)| !l.started && l.arrived.elapsed() > limit)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.sched.abort(id);
            if let Some(live) = self.remove(id) {
                self.metrics.failure(ErrorKind::QueueTimeout.as_str());
                tracing::info!(request_id = %live.tag, "queue timeout");
                let _ = live.events.send(TokenEvent::Error {
                    kind: ErrorKind::QueueTimeout,
                    message: format!(
                        "the request waited {:.1} s without starting (limit {:.1} s)",
                        live.arrived.elapsed().as_secs_f64(),
                        limit.as_secs_f64()
                    ),
                });
            }
        }
    }

    /// Forgets a request, giving back its place in the waiting queue if it never started.
    fn remove(&mut self, id: RequestId) -> Option<Live> {
        let live = self.live.remove(&id)?;
        if !live.started {
            self.queue.release(live.prompt_len);
        }
        Some(live)
    }

    /// Ends a request early: frees its sequence and tells its client, if still there.
    fn end(&mut self, id: RequestId, reason: FinishReason) {
        let seq = self.sched.abort(id);
        if let Some(live) = self.remove(id) {
            let (prompt_tokens, completion_tokens) = seq
                .map(|s| (s.prompt_len, s.num_generated()))
                .unwrap_or((0, 0));
            self.finish_metrics(&live, reason);
            let _ = live.events.send(TokenEvent::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            });
        }
    }

    fn step(&mut self) {
        let batch = self.sched.schedule();
        if batch.is_empty() {
            return;
        }
        self.steps += 1;
        let started = Instant::now();
        let _span =
            tracing::debug_span!("step", seqs = batch.seqs.len(), tokens = batch.num_tokens())
                .entered();
        for s in &batch.seqs {
            if let Some(live) = self.live.get_mut(&s.id) {
                if !live.started {
                    live.started = true;
                    live.scheduled = Some(started);
                    self.metrics
                        .queue_time
                        .observe((started - live.arrived).as_secs_f64());
                    self.queue.release(live.prompt_len);
                }
            }
        }
        self.metrics.step_tokens.observe(batch.num_tokens() as f64);
        self.metrics
            .step_batch_size
            .observe(batch.seqs.len() as f64);
        // The runner and the sampler (kernels, grammars) run contained: a panic there fails
        // this step's requests, and the engine goes on.
        let drawn = catch_unwind(AssertUnwindSafe(|| self.run_and_sample(&batch)));
        let (sampled, mut logprobs, failed) = match drawn {
            Ok(Ok(drawn)) => drawn,
            Ok(Err(e)) => return self.fail_batch(&batch, e.to_string()),
            Err(panic) => {
                self.panicked_steps += 1;
                let message = format!("internal error: {}", panic_message(&*panic));
                return self.fail_batch(&batch, message);
            }
        };
        self.panicked_steps = 0;
        if let Some(attention) = self.runner.attention_seconds() {
            let attended: f64 = batch
                .seqs
                .iter()
                .map(|s| attended(s.start_pos, s.tokens.len()))
                .sum();
            let seconds = started.elapsed().as_secs_f64();
            self.cost
                .observe(batch.num_tokens(), attended, seconds, attention);
            self.sched.set_step_cost(self.cost.cost());
        }
        let outcomes = self.sched.postprocess(&sampled);
        let now = Instant::now();
        for o in outcomes {
            let lp = logprobs.remove(&o.id).flatten();
            let id = o.id;
            self.emit(o, lp, now);
            // A grammar that is complete ends the sequence, as a stop token would.
            if self
                .live
                .get(&id)
                .is_some_and(|l| l.constraint.as_ref().is_some_and(|c| c.is_finished()))
            {
                self.end(id, FinishReason::Stop);
            }
        }
        for (id, message) in failed {
            self.fail(id, ErrorKind::Internal, message);
        }
        self.metrics
            .step_duration
            .observe(started.elapsed().as_secs_f64());
    }

    /// The runner's step and each row's sampling: the ids drawn, their log-probabilities,
    /// and the requests whose grammar failed.
    fn run_and_sample(&mut self, batch: &ScheduledBatch) -> Result<Drawn, RunnerError> {
        let ids: Vec<RequestId> = batch
            .seqs
            .iter()
            .filter(|s| s.samples())
            .map(|s| s.id)
            .collect();
        let order: HashMap<RequestId, usize> =
            ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let mut lives: Vec<Option<&mut Live>> = (0..ids.len()).map(|_| None).collect();
        for (id, live) in self.live.iter_mut() {
            if let Some(&i) = order.get(id) {
                lives[i] = Some(live);
            }
        }
        // A sequence whose request is gone still has a row; it is drawn and dropped.
        let missing = lives.iter().filter(|l| l.is_none()).count();
        let mut spare: Vec<Sampler> = (0..missing)
            .map(|_| Sampler::new(wick_core::SamplingParams::greedy(), &[]))
            .collect();
        let mut spare = spare.iter_mut();
        let mut seqs: Vec<SeqSampling<'_>> = lives
            .into_iter()
            .filter_map(|live| match live {
                Some(l) => Some(SeqSampling {
                    sampler: &mut l.sampler,
                    constraint: l
                        .constraint
                        .as_mut()
                        .map(|c| &mut **c as &mut dyn TokenConstraint),
                }),
                None => spare.next().map(|sampler| SeqSampling {
                    sampler,
                    constraint: None,
                }),
            })
            .collect();
        let draws = self.runner.step_sampling(batch, &mut seqs)?;
        drop(seqs);
        let mut sampled = Vec::with_capacity(draws.len());
        let mut logprobs = HashMap::new();
        let mut failed = Vec::new();
        for (id, drawn) in ids.into_iter().zip(draws) {
            if !self.live.contains_key(&id) {
                continue;
            }
            match drawn {
                Ok(drawn) => {
                    sampled.push((id, drawn.id));
                    if drawn.logprobs.is_some() {
                        logprobs.insert(id, drawn.logprobs);
                    }
                }
                Err(message) => failed.push((id, message)),
            }
        }
        Ok((sampled, logprobs, failed))
    }

    fn emit(&mut self, o: SeqOutcome, logprobs: Option<TokenLogprobs>, now: Instant) {
        let Some(live) = self.live.get_mut(&o.id) else {
            return;
        };
        match live.last_token {
            None => self
                .metrics
                .time_to_first_token
                .observe((now - live.arrived).as_secs_f64()),
            Some(t) => self
                .metrics
                .inter_token_latency
                .observe((now - t).as_secs_f64()),
        }
        live.last_token = Some(now);
        live.first_token.get_or_insert(now);
        live.generated += 1;
        self.metrics.generation_tokens.inc();
        if let Some(id) = o.token {
            let _ = live.events.send(TokenEvent::Token { id, logprobs });
        }
        if let Some(reason) = o.finish {
            // Metrics first: a client that reads /metrics after its last event sees them.
            if let Some(live) = self.remove(o.id) {
                self.finish_metrics(&live, reason);
                let _ = live.events.send(TokenEvent::Finished {
                    reason,
                    prompt_tokens: o.prompt_tokens,
                    completion_tokens: o.completion_tokens,
                });
            }
        }
    }

    /// Ends one request with an error.
    fn fail(&mut self, id: RequestId, kind: ErrorKind, message: String) {
        self.sched.abort(id);
        if let Some(live) = self.remove(id) {
            self.metrics.failure(kind.as_str());
            tracing::warn!(request_id = %live.tag, error = %message, "request failed");
            let _ = live.events.send(TokenEvent::Error { kind, message });
        }
    }

    /// A failed step ends the requests in it with the error; the engine keeps serving.
    fn fail_batch(&mut self, batch: &ScheduledBatch, message: String) {
        tracing::error!(error = %message, "engine step failed");
        for s in &batch.seqs {
            self.fail(s.id, ErrorKind::Internal, message.clone());
        }
    }

    /// Shutdown after the drain timeout: every request still here ends with an error.
    fn end_all(&mut self) {
        let ids: Vec<RequestId> = self.live.keys().copied().collect();
        tracing::warn!(
            requests = ids.len(),
            "drain timeout: ending the requests still in flight"
        );
        for id in ids {
            self.fail(
                id,
                ErrorKind::Shutdown,
                "the server is shutting down and its drain timeout ran out before this request ended".into(),
            );
        }
    }

    fn finish_metrics(&mut self, live: &Live, reason: FinishReason) {
        let now = Instant::now();
        let m = &self.metrics;
        m.e2e_request_latency
            .observe((now - live.arrived).as_secs_f64());
        m.request_success
            .with_label_values(&[reason.as_str()])
            .inc();
        m.prompt_length.observe(live.prompt_len as f64);
        m.generation_length.observe(live.generated as f64);
        if let (Some(scheduled), Some(first)) = (live.scheduled, live.first_token) {
            m.prefill_time.observe((first - scheduled).as_secs_f64());
            let decode = (now - first).as_secs_f64();
            m.decode_time.observe(decode);
            if live.generated > 1 {
                m.time_per_output_token
                    .observe(decode / (live.generated - 1) as f64);
            }
        }
        self.finishes.push_back(now);
        while self
            .finishes
            .front()
            .is_some_and(|t| now - *t > RATE_WINDOW)
        {
            self.finishes.pop_front();
        }
        if let Some(first) = self.finishes.front() {
            let span = (now - *first).as_secs_f64().max(1.0);
            self.queue
                .set_completion_rate(self.finishes.len() as f64 / span);
        }
    }

    fn update_gauges(&mut self) {
        let m = &self.metrics;
        m.requests_running.set(self.sched.num_running() as i64);
        m.requests_waiting.set(self.sched.num_waiting() as i64);
        let used = self.sched.num_blocks_used();
        m.kv_blocks_used.set(used as i64);
        let total = m.kv_blocks_total.get().max(1);
        m.kv_cache_usage.set(used as f64 / total as f64);
        let p = self.sched.num_preemptions();
        m.preemptions.inc_by(p - self.preemptions_seen);
        self.preemptions_seen = p;
        let (q, h) = self.sched.prefix_cache_stats();
        m.prefix_cache_queries.inc_by(q - self.prefix_seen.0);
        m.prefix_cache_hits.inc_by(h - self.prefix_seen.1);
        self.prefix_seen = (q, h);
    }
}

/// What a step's sampling gives: (request, id) pairs, log-probabilities by request, and the
/// requests that failed with their messages.
type Drawn = (
    Vec<(RequestId, u32)>,
    HashMap<RequestId, Option<TokenLogprobs>>,
    Vec<(RequestId, String)>,
);

/// What the loop does after one turn.
enum Turn {
    Go,
    /// Every handle is gone and nothing is left to do.
    Closed,
    /// The engine cannot go on.
    Fail(String),
}

/// Runs `load` on an engine thread: its value, or `None` once its error has been sent on
/// `ready`. A loader that panics (a bug the model file's checks missed) is a load error with
/// its message, not a silent end of the thread.
pub(crate) fn run_loader<T, R>(
    load: impl FnOnce() -> Result<T, String>,
    ready: &mpsc::Sender<Result<R, String>>,
) -> Option<T> {
    let error = match catch_unwind(AssertUnwindSafe(load)) {
        Ok(Ok(x)) => return Some(x),
        Ok(Err(e)) => e,
        Err(panic) => panic_message(&*panic),
    };
    let _ = ready.send(Err(error));
    None
}

/// The text a panic carried (`panic!` with a literal or a formatted message).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => format!("panic: {s}"),
        (_, Some(s)) => format!("panic: {s}"),
        _ => "panic".into(),
    }
}

#[cfg(test)]
mod tests;
