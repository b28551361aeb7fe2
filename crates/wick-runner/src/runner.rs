//! The runner: a model and its KV cache, one batched step at a time.

use candle_core::DType;
use wick_core::ScheduledBatch;

use crate::attention::{AttentionMetadata, SeqSpan};
use crate::{CacheConfig, KvCache, Model, Result, RunnerError};

/// The model and its KV cache: runs one step for a whole scheduled batch.
pub struct Runner {
    model: Model,
    kv: KvCache,
    scratch: crate::model::Scratch,
    /// The host path's own threads: a step runs inside the pool, so the engine thread hands
    /// over once per step instead of waking the workers for every matrix product.
    pool: Option<rayon::ThreadPool>,
}

fn host_pool(model: &Model) -> Result<Option<rayon::ThreadPool>> {
    if !model.runs_on_host() {
        return Ok(None);
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("wick-cpu-{i}"))
        .build()
        .map(Some)
        .map_err(|e| RunnerError::Step(format!("cannot start the CPU threads: {e}")))
}

impl Runner {
    pub fn new(model: Model, cache: CacheConfig) -> Result<Self> {
        let kv = KvCache::new(
            model.config(),
            cache,
            model.runs_on_host(),
            model.device(),
            model.dtype(),
        )?;
        let pool = host_pool(&model)?;
        Ok(Self {
            model,
            kv,
            scratch: Default::default(),
            pool,
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Seconds the last step spent in attention, where the runner measures it (the host
    /// path): the scheduler sizes prompt chunks by it.
    pub fn attention_seconds(&self) -> Option<f64> {
        self.model
            .runs_on_host()
            .then_some(self.scratch.attention.as_secs_f64())
    }

    /// Computes every scheduled token and returns one row of logits for each sequence
    /// scheduled with `sample`, in batch order.
    pub fn step(&mut self, batch: &ScheduledBatch) -> Result<Vec<Vec<f32>>> {
        let bs = self.kv.config().block_size;
        let max_pos = self.model.config().max_position_embeddings;
        let mut ids = Vec::with_capacity(batch.num_tokens());
        let mut spans = Vec::with_capacity(batch.seqs.len());
        let mut last_rows = Vec::new();
        for s in &batch.seqs {
            let end = s.start_pos + s.tokens.len();
            if end > max_pos || s.block_table.len() * bs < end {
                return Err(RunnerError::Step(format!(
                    "sequence {} needs {end} positions: {} blocks of {bs}, model limit {max_pos}",
                    s.id,
                    s.block_table.len()
                )));
            }
            let slots = (0..end)
                .map(|p| s.block_table[p / bs].index() * bs + p % bs)
                .collect();
            spans.push(SeqSpan {
                q_start: ids.len(),
                q_len: s.tokens.len(),
                start_pos: s.start_pos,
                slots,
            });
            ids.extend_from_slice(&s.tokens);
            if s.sample {
                last_rows.push(ids.len() as u32 - 1);
            }
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut meta = AttentionMetadata::new(spans);
        if let (Some(pool), true) = (&self.pool, self.kv.uses_host_memory()) {
            let (model, kv, scratch) = (&self.model, &mut self.kv, &mut self.scratch);
            return pool.install(|| model.forward_host(&ids, &meta, &last_rows, kv, scratch));
        }
        if !self.kv.uses_host_memory() {
            meta.prepare_device(self.model.device(), self.model.windows())?;
        }
        match self.model.forward(&ids, &meta, &last_rows, &mut self.kv)? {
            Some(logits) => Ok(logits.to_dtype(DType::F32)?.to_vec2()?),
            None => Ok(Vec::new()),
        }
    }
}
