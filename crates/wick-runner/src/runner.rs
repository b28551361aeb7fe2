use std::path::Path;

use candle_core::{DType, Device};
use tokenizers::Tokenizer;
use wick_core::ScheduledBatch;

use crate::kv_cache::{AttentionMetadata, SeqSpan};
use crate::{gguf, hf, CacheConfig, KvCache, Llama, Result, RunnerError};

/// What the front end needs from a model beside its weights.
#[derive(Clone)]
pub struct ModelAssets {
    /// A name for the model, from its file or directory.
    pub name: String,
    pub tokenizer: Tokenizer,
    /// The model's own Jinja chat template, if it has one.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Tokens that end generation (end of text, end of turn).
    pub stop_token_ids: Vec<u32>,
    /// Longest sequence, prompt plus output, the model was trained for.
    pub max_model_len: usize,
}

pub struct LoadedModel {
    pub model: Llama,
    pub assets: ModelAssets,
}

/// `cpu`, `cuda`, `cuda:N`, `metal` or `metal:N`. CUDA and Metal need the cargo feature of
/// the same name; without it, selecting them is a clear error, not a silent CPU fallback.
pub fn parse_device(spec: &str) -> Result<Device> {
    let (kind, ordinal) = match spec.split_once(':') {
        Some((k, n)) => {
            let n = n
                .parse::<usize>()
                .map_err(|_| RunnerError::Device(spec.into(), "bad device ordinal".into()))?;
            (k, n)
        }
        None => (spec, 0),
    };
    let dev = match kind {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(ordinal),
        "metal" => Device::new_metal(ordinal),
        _ => {
            return Err(RunnerError::Device(
                spec.into(),
                "expected cpu, cuda[:N] or metal[:N]".into(),
            ))
        }
    };
    dev.map_err(|e| RunnerError::Device(spec.into(), e.to_string()))
}

/// The format the runner computes a GGUF file's linear layers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// As stored in the file (fused without conversion).
    #[default]
    Native,
    /// Dequantized and re-quantized to Q8_0 (candle has SIMD kernels for it).
    Q8_0,
    /// Dequantized to dense f32.
    F32,
}

impl std::str::FromStr for WeightFormat {
    type Err = RunnerError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "native" => Ok(Self::Native),
            "q8_0" => Ok(Self::Q8_0),
            "f32" => Ok(Self::F32),
            other => Err(RunnerError::Unsupported(format!(
                "weight format {other:?} (expected native, q8_0 or f32)"
            ))),
        }
    }
}

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub weight_format: WeightFormat,
    /// Activations, KV cache and dense weights of a Hugging Face model: f32, bf16 or f16.
    /// `None`: f32 on the CPU, bf16 on a GPU. GGUF models compute in f32 (the quantized
    /// kernels take f32 activations).
    pub dtype: Option<DType>,
}

/// `auto`, `f32`, `bf16` or `f16`.
pub fn parse_dtype(spec: &str) -> Result<Option<DType>> {
    match spec {
        "auto" => Ok(None),
        "f32" => Ok(Some(DType::F32)),
        "bf16" => Ok(Some(DType::BF16)),
        "f16" => Ok(Some(DType::F16)),
        other => Err(RunnerError::Unsupported(format!(
            "dtype {other:?} (expected auto, f32, bf16 or f16)"
        ))),
    }
}

/// Loads a GGUF file, or a Hugging Face directory, onto `device`.
pub fn load(path: &Path, device: &Device, opts: &LoadOptions) -> Result<LoadedModel> {
    let (cfg, weights, assets, dtype) = if path.is_dir() {
        if !path.join("config.json").exists() {
            return Err(RunnerError::NotAModel {
                path: path.to_path_buf(),
            });
        }
        let dtype = opts.dtype.unwrap_or(if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        });
        let (c, w, a) = hf::load(path, device, dtype)?;
        (c, w, a, dtype)
    } else if path.exists() {
        if opts.dtype.is_some_and(|d| d != DType::F32) {
            return Err(RunnerError::Unsupported(
                "a dtype other than f32 for a GGUF model (its quantized kernels take f32 activations)".into(),
            ));
        }
        let (c, w, a) = gguf::load(path, device, opts.weight_format)?;
        (c, w, a, DType::F32)
    } else {
        return Err(RunnerError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        });
    };
    Ok(LoadedModel {
        model: Llama::new(cfg, weights, device, dtype)?,
        assets,
    })
}

/// The model and its KV cache: runs one step for a whole scheduled batch.
pub struct Runner {
    model: Llama,
    kv: KvCache,
    scratch: crate::model::Scratch,
    /// The host path's own threads: a step runs inside the pool, so the engine thread hands
    /// over once per step instead of waking the workers for every matrix product.
    pool: Option<rayon::ThreadPool>,
}

fn host_pool(model: &Llama) -> Result<Option<rayon::ThreadPool>> {
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
    pub fn new(model: Llama, cache: CacheConfig) -> Result<Self> {
        let kv = KvCache::new(model.config(), cache, model.device(), model.dtype(), false)?;
        let pool = host_pool(&model)?;
        Ok(Self {
            model,
            kv,
            scratch: Default::default(),
            pool,
        })
    }

    /// A runner that uses the tensor (device) attention path even on the CPU.
    pub fn with_tensor_attention(model: Llama, cache: CacheConfig) -> Result<Self> {
        if model.runs_on_host() {
            return Err(RunnerError::Unsupported(
                "the tensor attention path for a model on the host path".into(),
            ));
        }
        let kv = KvCache::new(model.config(), cache, model.device(), model.dtype(), true)?;
        Ok(Self {
            model,
            kv,
            scratch: Default::default(),
            pool: None,
        })
    }

    pub fn model(&self) -> &Llama {
        &self.model
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
            meta.prepare_device(self.model.device())?;
        }
        match self.model.forward(&ids, &meta, &last_rows, &mut self.kv)? {
            Some(logits) => Ok(logits.to_dtype(DType::F32)?.to_vec2()?),
            None => Ok(Vec::new()),
        }
    }
}
