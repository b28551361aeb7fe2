//! The embedding engine: one thread owns an encoder model and answers the embedding queue.
//! Each round it takes every waiting request, drops those whose client has gone, sorts
//! their inputs by length (so that a batch pads little) and computes them in batches of at
//! most `max_batch_inputs` inputs and `max_batch_tokens` padded tokens; each request gets
//! its vectors in its own input order once all of them are computed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use wick_core::{
    embed_queue, EmbedHandle, EmbedReceiver, EmbedReply, EmbedRequest, Metrics, QueueLimits, Recv,
};

use crate::engine::{panic_message, run_loader};

/// A model that turns token ids into vectors (one padded batch per call).
pub trait Embedder: Send + 'static {
    fn embed(&mut self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, String>;
}

impl Embedder for wick_runner::EmbeddingModel {
    fn embed(&mut self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, String> {
        wick_runner::EmbeddingModel::embed(self, inputs).map_err(|e| e.to_string())
    }
}

#[derive(Debug, Clone)]
pub struct EmbedConfig {
    pub queue: QueueLimits,
    /// Most inputs in one batch.
    pub max_batch_inputs: usize,
    /// Most tokens in one batch, counting padding (inputs x the longest).
    pub max_batch_tokens: usize,
}

/// A started embedding engine: its queue handle, its ready handshake (what the loader
/// returned beside the model) and its thread.
pub struct EmbedStarted<I> {
    pub handle: EmbedHandle,
    pub ready: mpsc::Receiver<Result<I, String>>,
    pub thread: JoinHandle<()>,
}

/// Spawns the embedding thread; `load` runs on it and returns the model and what the front
/// end needs to know of it (`I`), which arrives on `ready`.
pub fn start_embedding<E, I, L>(
    cfg: EmbedConfig,
    metrics: Metrics,
    load: L,
) -> std::io::Result<EmbedStarted<I>>
where
    E: Embedder,
    I: Send + 'static,
    L: FnOnce() -> Result<(E, I), String> + Send + 'static,
{
    let (handle, queue) = embed_queue(cfg.queue);
    let (ready_tx, ready_rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("wick-embed".into())
        .spawn(move || {
            let Some((model, info)) = run_loader(load, &ready_tx) else {
                return;
            };
            if ready_tx.send(Ok(info)).is_ok() {
                run(model, &queue, &cfg, &metrics);
            }
        })?;
    Ok(EmbedStarted {
        handle,
        ready: ready_rx,
        thread,
    })
}

/// Serves until every handle is gone.
fn run<E: Embedder>(mut model: E, queue: &EmbedReceiver, cfg: &EmbedConfig, metrics: &Metrics) {
    let mut started = Instant::now();
    let mut done = 0usize;
    let mut batches = 0u64;
    while let Some(first) = queue.recv() {
        queue.beat(batches);
        // A request stops waiting when it is taken: the whole batch is computed at once.
        queue.release(first.tokens());
        let mut requests = vec![first];
        while let Recv::Item(r) = queue.try_recv() {
            queue.release(r.tokens());
            requests.push(r);
        }
        metrics.requests_waiting.set(queue.num_waiting() as i64);
        metrics.requests_running.set(requests.len() as i64);
        let now = Instant::now();
        requests.retain(|r| {
            metrics
                .queue_time
                .observe(now.duration_since(r.arrived).as_secs_f64());
            let gone = r.reply.is_closed();
            if gone {
                metrics.request_success.with_label_values(&["abort"]).inc();
            }
            !gone
        });
        let answers = round(&mut model, &requests, cfg, metrics, &mut || {
            queue.beat(batches);
            batches += 1;
        });
        for (r, answer) in requests.into_iter().zip(answers) {
            let tokens = r.tokens();
            match &answer {
                Ok(_) => {
                    metrics.prompt_tokens.inc_by(tokens as u64);
                    metrics.prompt_length.observe(tokens as f64);
                    metrics.request_success.with_label_values(&["stop"]).inc();
                }
                Err(_) => metrics.failure(wick_core::metrics::error_type::INTERNAL),
            }
            metrics
                .e2e_request_latency
                .observe(r.arrived.elapsed().as_secs_f64());
            let _ = r.reply.send(answer);
            done += 1;
        }
        queue.rest();
        metrics.requests_running.set(0);
        // Completions per second over the last while, for Retry-After.
        let secs = started.elapsed().as_secs_f64();
        if secs > 1.0 {
            queue.set_completion_rate(done as f64 / secs);
            if secs > 60.0 {
                (started, done) = (Instant::now(), 0);
            }
        }
    }
}

/// Every input of `requests` in batches; per request its vectors or the first error.
fn round<E: Embedder>(
    model: &mut E,
    requests: &[EmbedRequest],
    cfg: &EmbedConfig,
    metrics: &Metrics,
    beat: &mut dyn FnMut(),
) -> Vec<EmbedReply> {
    let mut items: Vec<(usize, usize)> = requests
        .iter()
        .enumerate()
        .flat_map(|(r, req)| (0..req.inputs.len()).map(move |i| (r, i)))
        .collect();
    let input = |&(r, i): &(usize, usize)| &requests[r].inputs[i];
    items.sort_by_key(|it| input(it).len());
    let mut out: Vec<EmbedReply> = requests
        .iter()
        .map(|r| Ok(vec![Vec::new(); r.inputs.len()]))
        .collect();
    let mut start = 0;
    while start < items.len() {
        // Sorted by length: the last input taken is the longest, and sets the padding.
        let mut end = start + 1;
        while end < items.len()
            && end - start < cfg.max_batch_inputs
            && (end - start + 1) * input(&items[end]).len() <= cfg.max_batch_tokens
        {
            end += 1;
        }
        let batch: Vec<Vec<u32>> = items[start..end]
            .iter()
            .map(|it| input(it).clone())
            .collect();
        // The watchdog sees each batch begin: a round of many requests is many steps.
        beat();
        let t = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| model.embed(&batch)))
            .unwrap_or_else(|panic| Err(panic_message(&*panic)));
        metrics.step_duration.observe(t.elapsed().as_secs_f64());
        metrics.step_batch_size.observe(batch.len() as f64);
        metrics
            .step_tokens
            .observe(batch.iter().map(Vec::len).sum::<usize>() as f64);
        let result = result.and_then(|v| {
            if v.len() == batch.len() {
                Ok(v)
            } else {
                Err(format!("{} vectors for {} inputs", v.len(), batch.len()))
            }
        });
        match result {
            Ok(vectors) => {
                for (&(r, i), v) in items[start..end].iter().zip(vectors) {
                    if let Ok(slots) = &mut out[r] {
                        slots[i] = v;
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, inputs = batch.len(), "embedding batch failed");
                for &(r, _) in &items[start..end] {
                    out[r] = Err(e.clone());
                }
            }
        }
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::sync::oneshot;

    use super::*;

    /// Vectors [first id, length]; records each batch's input lengths.
    struct Scripted(Arc<Mutex<Vec<Vec<usize>>>>);

    impl Embedder for Scripted {
        fn embed(&mut self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, String> {
            if inputs.iter().any(|i| i[0] == 666) {
                return Err("bad input".into());
            }
            self.0
                .lock()
                .unwrap()
                .push(inputs.iter().map(Vec::len).collect());
            Ok(inputs
                .iter()
                .map(|i| vec![i[0] as f32, i.len() as f32])
                .collect())
        }
    }

    fn start(
        max_batch_inputs: usize,
        max_batch_tokens: usize,
    ) -> (EmbedHandle, Arc<Mutex<Vec<Vec<usize>>>>, Metrics) {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let b = Arc::clone(&batches);
        let metrics = Metrics::new();
        let started = start_embedding(
            EmbedConfig {
                queue: QueueLimits {
                    max_waiting_requests: 64,
                    max_waiting_prompt_tokens: 0,
                },
                max_batch_inputs,
                max_batch_tokens,
            },
            metrics.clone(),
            move || Ok((Scripted(b), ())),
        )
        .unwrap();
        started.ready.recv().unwrap().unwrap();
        (started.handle, batches, metrics)
    }

    fn submit(h: &EmbedHandle, inputs: Vec<Vec<u32>>) -> oneshot::Receiver<EmbedReply> {
        let (reply, rx) = oneshot::channel();
        let r = EmbedRequest {
            inputs,
            arrived: Instant::now(),
            reply,
        };
        let tokens = r.tokens();
        h.submit(r, tokens).unwrap();
        rx
    }

    #[test]
    fn each_request_gets_its_vectors_in_input_order_within_the_batch_bounds() {
        let (h, batches, metrics) = start(3, 20);
        let a = submit(&h, vec![vec![1; 7], vec![2; 1], vec![3; 4]]);
        let b = submit(&h, vec![vec![4; 2], vec![5; 9]]);
        let a = a.blocking_recv().unwrap().unwrap();
        let b = b.blocking_recv().unwrap().unwrap();
        assert_eq!(a, vec![vec![1.0, 7.0], vec![2.0, 1.0], vec![3.0, 4.0]]);
        assert_eq!(b, vec![vec![4.0, 2.0], vec![5.0, 9.0]]);
        for batch in batches.lock().unwrap().iter() {
            let longest = batch.iter().max().copied().unwrap_or(0);
            assert!(batch.len() <= 3 && (batch.len() * longest <= 20 || batch.len() == 1));
            assert!(batch.windows(2).all(|w| w[0] <= w[1]), "sorted: {batch:?}");
        }
        let total: usize = batches.lock().unwrap().iter().map(Vec::len).sum();
        assert_eq!(total, 5);
        assert_eq!(metrics.prompt_tokens.get(), 23);
    }

    #[test]
    fn a_failed_batch_fails_its_requests_and_the_engine_goes_on() {
        let (h, _, metrics) = start(1, 1000);
        let bad = submit(&h, vec![vec![666, 1]]);
        assert_eq!(bad.blocking_recv().unwrap(), Err("bad input".to_string()));
        let good = submit(&h, vec![vec![7, 7, 7]]);
        assert_eq!(good.blocking_recv().unwrap().unwrap(), vec![vec![7.0, 3.0]]);
        assert_eq!(
            metrics
                .request_failure
                .with_label_values(&[wick_core::metrics::error_type::INTERNAL])
                .get(),
            1
        );
    }
}
