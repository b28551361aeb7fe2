//! The runner: a model and its KV cache, one batched step at a time.

use candle_core::{DType, Tensor};
use wick_core::ScheduledBatch;

use crate::adapter::{self, Adapters, StepAdapters};
use crate::attention::{AttentionMetadata, DeviceMetadata};
use crate::kv_cache::{self, DeviceLayer, HostLayer};
use crate::model::{HostBackend, Scratch, TensorBackend};
use crate::profile::{Phase, Profiler, StepProfile};
use crate::sampling::device::{self, DrawParams};
use crate::sampling::{Draw, SeqSampling};
use crate::{CacheConfig, Model, Result, RunnerError};

/// The model and its KV cache: runs one step for a whole scheduled batch.
pub struct Runner {
    model: Model,
    cache: CacheConfig,
    path: Path,
    prof: Profiler,
    adapters: Option<Box<dyn Adapters>>,
}

/// The backend a model's steps run on, with what only it needs: chosen once, when the runner
/// is made, from where the model was loaded to compute.
enum Path {
    /// Wick's kernels over host memory.
    Host {
        kv: Vec<HostLayer>,
        scratch: Box<Scratch>,
        /// The host path's own threads: a step runs inside the pool, so the engine thread
        /// hands over once per step instead of waking the workers for every matrix product.
        pool: rayon::ThreadPool,
    },
    /// Candle ops on the model's device.
    Tensor { kv: Vec<DeviceLayer> },
}

fn host_pool() -> Result<rayon::ThreadPool> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("wick-cpu-{i}"))
        .build()
        .map_err(|e| RunnerError::Step(format!("cannot start the CPU threads: {e}")))
}

impl Runner {
    pub fn new(model: Model, cache: CacheConfig) -> Result<Self> {
        let path = if model.runs_on_host() {
            Path::Host {
                kv: kv_cache::host_layers(model.config(), cache)?,
                scratch: Box::default(),
                pool: host_pool()?,
            }
        } else {
            Path::Tensor {
                kv: kv_cache::device_layers(model.config(), cache, model.device(), model.dtype())?,
            }
        };
        Ok(Self {
            model,
            cache,
            path,
            prof: Profiler::default(),
            adapters: None,
        })
    }

    /// The adapters that sequences scheduled with one ([`wick_core::ScheduledSeq::adapter`])
    /// add to every layer's projections; `None`: none loaded (a sequence naming one is then a
    /// step error).
    pub fn set_adapters(&mut self, adapters: Option<Box<dyn Adapters>>) {
        self.adapters = adapters;
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Turns the tensor path's step profile on (synchronizing the device after each phase)
    /// or off, and clears it.
    pub fn set_profiling(&mut self, on: bool) {
        self.prof.set(on);
    }

    /// Seconds per phase since profiling was turned on.
    pub fn profile(&self) -> StepProfile {
        self.prof.report()
    }

    /// Seconds the last step spent in attention, where the runner measures it (the host
    /// path): the scheduler sizes prompt chunks by it.
    pub fn attention_seconds(&self) -> Option<f64> {
        match &self.path {
            Path::Host { scratch, .. } => Some(scratch.attention.as_secs_f64()),
            Path::Tensor { .. } => None,
        }
    }

    /// Computes every scheduled token and returns one row of logits for each sequence
    /// scheduled with `sample`, in batch order.
    pub fn step(&mut self, batch: &ScheduledBatch) -> Result<Vec<Vec<f32>>> {
        self.forward(batch, &sample_rows(batch)?)?.into_host()
    }

    /// Computes every scheduled token and returns, for each sequence in batch order, the
    /// logits of its last `rows[i]` tokens of the step, in position order: the verification
    /// step of speculative decoding, which scores k proposed tokens of a decoding sequence at
    /// once (their keys and values stay in the cache; a rejected tail is overwritten by the
    /// next step that reaches its positions). On the host path each row has the bits that the
    /// same tokens decoded one per step give.
    pub fn step_scoring(
        &mut self,
        batch: &ScheduledBatch,
        rows: &[usize],
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        if rows.len() != batch.seqs.len() {
            return Err(RunnerError::Step(format!(
                "{} sequences, {} row counts",
                batch.seqs.len(),
                rows.len()
            )));
        }
        let mut picked = Vec::new();
        let mut end = 0;
        for (s, &n) in batch.seqs.iter().zip(rows) {
            end += s.tokens.len();
            if n > s.tokens.len() {
                return Err(RunnerError::Step(format!(
                    "sequence {} has {} tokens in this step, {n} rows asked",
                    s.id,
                    s.tokens.len()
                )));
            }
            picked.extend((end - n..end).map(|r| r as u32));
        }
        let mut logits = self.forward(batch, &picked)?.into_host()?.into_iter();
        Ok(rows
            .iter()
            .map(|&n| logits.by_ref().take(n).collect())
            .collect())
    }

    /// Computes every scheduled token and draws the next token of each sequence scheduled
    /// with `sample`, with its state in `seqs` (batch order, one per sampling sequence): on
    /// the device where the logits are (CUDA), for the rows that need nothing of the host
    /// (see [`SeqSampling`]), else on the host. A grammar's refusal is that row's `Err`.
    pub fn step_sampling(
        &mut self,
        batch: &ScheduledBatch,
        seqs: &mut [SeqSampling<'_>],
    ) -> Result<Vec<Draw>> {
        let sampling = batch.seqs.iter().filter(|s| s.samples()).count();
        if sampling != seqs.len() {
            return Err(RunnerError::Step(format!(
                "{sampling} sampling sequences, {} sampling states",
                seqs.len()
            )));
        }
        let draws: Vec<Option<DrawParams>> = if self.draws_on_device() {
            seqs.iter_mut().map(SeqSampling::device_draw).collect()
        } else {
            vec![None; seqs.len()]
        };
        let rows = self.step_drawing(batch, &draws)?;
        Ok(rows
            .into_iter()
            .zip(seqs.iter_mut())
            .map(|(row, s)| match row {
                StepRow::Logits(mut row) => s.sample_host(&mut row),
                // Only rows without a grammar are drawn on the device.
                StepRow::Drawn(id) => Ok(s.sampler.accept(id)),
            })
            .collect())
    }

    /// Whether [`Runner::step_drawing`] draws on the device (CUDA), where it saves copying
    /// every row of logits to the host.
    pub fn draws_on_device(&self) -> bool {
        self.model.device().is_cuda()
    }

    /// Like [`Runner::step`], but each sampling sequence with a draw in `draws` (batch order,
    /// one per sampling sequence) gets its token drawn where the logits are, and only its id
    /// comes back; the others get their logits. On the host path every row is logits.
    pub fn step_drawing(
        &mut self,
        batch: &ScheduledBatch,
        draws: &[Option<DrawParams>],
    ) -> Result<Vec<StepRow>> {
        let logits = match self.forward(batch, &sample_rows(batch)?)? {
            Logits::Host(rows) => return Ok(rows.into_iter().map(StepRow::Logits).collect()),
            Logits::Device(t) => t,
        };
        let rows = logits.dim(0)?;
        if draws.len() != rows {
            return Err(RunnerError::Step(format!(
                "{rows} sampling sequences, {} draws",
                draws.len()
            )));
        }
        let pick = |on_device: bool| -> Vec<u32> {
            (0..rows as u32)
                .filter(|&i| draws[i as usize].is_some() == on_device)
                .collect()
        };
        let device = self.model.device();
        let (drawn_rows, host_rows) = (pick(true), pick(false));
        let mut ids = Vec::new();
        if !drawn_rows.is_empty() {
            let idx = Tensor::new(drawn_rows.as_slice(), device)?;
            let params: Vec<DrawParams> = draws.iter().flatten().copied().collect();
            ids = device::draw(&logits.index_select(&idx, 0)?, &params)?;
            self.prof.mark(self.model.device(), Phase::Sampling)?;
        }
        let mut host = Vec::new();
        if !host_rows.is_empty() {
            let idx = Tensor::new(host_rows.as_slice(), device)?;
            host = logits
                .index_select(&idx, 0)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            self.prof.mark(self.model.device(), Phase::Host)?;
        }
        let (mut ids, mut host) = (ids.into_iter(), host.into_iter());
        draws
            .iter()
            .map(|d| match d {
                Some(_) => ids.next().map(StepRow::Drawn),
                None => host.next().map(StepRow::Logits),
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| RunnerError::Step("device sampling lost a row".into()))
    }

    /// Computes every scheduled token; returns the logits of the packed rows `last_rows`.
    fn forward(&mut self, batch: &ScheduledBatch, last_rows: &[u32]) -> Result<Logits> {
        let (bs, num_blocks) = (self.cache.block_size, self.cache.num_blocks);
        let max_pos = self.model.config().max_position_embeddings;
        let mut ids = Vec::with_capacity(batch.num_tokens());
        for s in &batch.seqs {
            let end = s.start_pos + s.tokens.len();
            if end > max_pos || s.block_table.len() * bs < end {
                return Err(RunnerError::Step(format!(
                    "sequence {} needs {end} positions: {} blocks of {bs}, model limit {max_pos}",
                    s.id,
                    s.block_table.len()
                )));
            }
            ids.extend_from_slice(&s.tokens);
        }
        if ids.is_empty() {
            return Ok(Logits::Host(Vec::new()));
        }
        let meta = AttentionMetadata::from_batch(batch, bs, num_blocks)?;
        let rows = adapter::adapter_rows(batch);
        if let (Some((a, _)), None) = (rows.first(), &self.adapters) {
            return Err(RunnerError::Step(format!(
                "a sequence names adapter {}, and no adapters are loaded",
                a.0
            )));
        }
        let adapters = StepAdapters {
            set: self.adapters.as_deref(),
            rows: &rows,
        };
        let model = &self.model;
        match &mut self.path {
            Path::Host { kv, scratch, pool } => pool.install(|| {
                let mut b = HostBackend::new(model, kv, &meta, scratch, adapters);
                let rows = model.forward(&mut b, &ids, last_rows)?;
                Ok(Logits::Host(rows.unwrap_or_default()))
            }),
            Path::Tensor { kv } => {
                self.prof.start(model.device())?;
                let dm = DeviceMetadata::new(
                    &meta,
                    model.device(),
                    model.windows(),
                    num_blocks * bs,
                    model.uses_paged_attention(),
                )?;
                let mut b = TensorBackend::new(model, kv, (&meta, &dm), &mut self.prof, adapters)?;
                Ok(match model.forward(&mut b, &ids, last_rows)? {
                    Some(logits) => Logits::Device(logits),
                    None => Logits::Host(Vec::new()),
                })
            }
        }
    }
}

/// The packed rows of the sequences scheduled with `sample`: each one's last token. A
/// sequence with proposed tokens needs a row per token: [`Runner::step_scoring`].
fn sample_rows(batch: &ScheduledBatch) -> Result<Vec<u32>> {
    let mut rows = Vec::new();
    let mut end = 0;
    for s in &batch.seqs {
        if s.proposed > 0 {
            return Err(RunnerError::Step(format!(
                "sequence {} has {} proposed tokens: a verification step is scored with step_scoring",
                s.id, s.proposed
            )));
        }
        end += s.tokens.len();
        if s.samples() {
            rows.push(end as u32 - 1);
        }
    }
    Ok(rows)
}

/// A step's logits: rows on the host (the host path), or a `[rows, vocab]` tensor on the
/// model's device.
enum Logits {
    Host(Vec<Vec<f32>>),
    Device(Tensor),
}

impl Logits {
    fn into_host(self) -> Result<Vec<Vec<f32>>> {
        match self {
            Logits::Host(rows) => Ok(rows),
            Logits::Device(t) => Ok(t.to_dtype(DType::F32)?.to_vec2()?),
        }
    }
}

/// What [`Runner::step_drawing`] gives back for one sampling sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum StepRow {
    /// Its logits, for the host sampler.
    Logits(Vec<f32>),
    /// The token drawn on the device.
    Drawn(u32),
}
