//! The decoder forward, batch-aware and family-neutral: every scheduled token of a step is one
//! row of the input, and every difference between families is a [`ModelConfig`] field or an
//! optional part of a [`Layer`]. The KV cache and the attention metadata come in as
//! arguments instead of living inside the model.
//!
//! The step is written once (`layer`) over two backends that compute the same thing: the host
//! backend (`host`: plain memory, Wick's kernels, an f16 KV cache) on the CPU in f32, and the
//! tensor backend (`tensor`: candle ops) on devices and in half precision. Which one a model
//! runs on is decided at load ([`Model::runs_on_host`]) and taken by the runner once.

mod host;
mod layer;
mod tensor;

use candle_core::{DType, Device, Tensor};

pub(crate) use host::{HostBackend, Scratch};
pub(crate) use tensor::TensorBackend;

use crate::linear::{Linear, Proj};
use crate::rope::Rope;
use crate::{ModelConfig, Result, RunnerError};

/// An RMSNorm weight, on the host and as a tensor.
pub(crate) struct Norm {
    pub w: Vec<f32>,
    pub t: Tensor,
}

/// One decoder layer. Q, K and V are one projection, and so are gate and up.
pub(crate) struct Layer {
    pub attn_norm: Norm,
    pub qkv: Proj,
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
    pub o: Proj,
    pub post_attn_norm: Option<Norm>,
    pub ffn_norm: Norm,
    pub gate_up: Proj,
    pub down: Proj,
    pub post_ffn_norm: Option<Norm>,
}

/// Where token embeddings are looked up: always on the host, one row at a time.
pub(crate) enum Embedding {
    /// Rows of the output layer (tied embeddings on the host path).
    Tied,
    /// The table as stored (quantized rows dequantized on lookup).
    Table(Linear),
}

/// Every weight of the model, already in the format the runner computes with.
pub(crate) struct Weights {
    pub embed: Embedding,
    pub layers: Vec<Layer>,
    pub norm: Norm,
    pub lm_head: Proj,
}

/// A loaded model of any family.
pub struct Model {
    cfg: ModelConfig,
    w: Weights,
    ropes: Vec<Rope>,
    /// Every distinct sliding window of the layers (the tensor path's masks).
    windows: Vec<Option<usize>>,
    device: Device,
    dtype: DType,
    host: bool,
}

impl Model {
    /// A model computing on `device` in `dtype`, on the host path where `host`.
    pub(crate) fn new(
        cfg: ModelConfig,
        w: Weights,
        (device, dtype, host): (Device, DType, bool),
    ) -> Result<Self> {
        let ropes = cfg.ropes.iter().map(Rope::new).collect();
        let mut windows: Vec<Option<usize>> = cfg.layers.iter().map(|l| l.sliding_window).collect();
        windows.sort_unstable();
        windows.dedup();
        Ok(Self {
            cfg,
            w,
            ropes,
            windows,
            device,
            dtype,
            host,
        })
    }

    /// Whether steps run on the host path.
    pub fn runs_on_host(&self) -> bool {
        self.host
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes the weights take in memory (as stored for compute, lookup tables included).
    pub fn weight_bytes(&self) -> usize {
        let norm = |n: &Norm| 4 * n.w.len();
        let opt = |n: &Option<Norm>| n.as_ref().map_or(0, norm);
        let layers: usize = self
            .w
            .layers
            .iter()
            .map(|l| {
                norm(&l.attn_norm)
                    + norm(&l.ffn_norm)
                    + opt(&l.q_norm)
                    + opt(&l.k_norm)
                    + opt(&l.post_attn_norm)
                    + opt(&l.post_ffn_norm)
                    + l.qkv.bytes()
                    + l.o.bytes()
                    + l.gate_up.bytes()
                    + l.down.bytes()
            })
            .sum();
        let embed = match &self.w.embed {
            Embedding::Tied => 0,
            Embedding::Table(t) => t.bytes(),
        };
        layers + embed + norm(&self.w.norm) + self.w.lm_head.bytes()
    }

    /// The weight types of the linear layers, with how many matrices of each (for logs).
    pub fn weight_types(&self) -> String {
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        let mut add = |l: &Linear| {
            for k in linear_kinds(l) {
                *counts.entry(k).or_default() += 1;
            }
        };
        for l in &self.w.layers {
            for p in [&l.qkv, &l.o, &l.gate_up, &l.down] {
                add(&p.w);
            }
        }
        add(&self.w.lm_head.w);
        if let Embedding::Table(t) = &self.w.embed {
            add(t);
        }
        counts
            .iter()
            .map(|(k, n)| format!("{k} x{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Row `id` of the embedding table, scaled, appended to `out`.
    fn embed_into(&self, id: u32, row: &mut [f32]) -> Result<()> {
        let id = id as usize;
        if id >= self.cfg.vocab_size {
            return Err(RunnerError::Step(format!("token id {id} out of range")));
        }
        match &self.w.embed {
            Embedding::Tied => self.w.lm_head.w.row(id, row)?,
            Embedding::Table(t) => t.row(id, row)?,
        }
        if self.cfg.embed_scale != 1.0 {
            row.iter_mut().for_each(|v| *v *= self.cfg.embed_scale);
        }
        Ok(())
    }

    /// The embeddings of `ids`, `[ids, hidden]`, into `x`.
    fn embed(&self, ids: &[u32], x: &mut Vec<f32>) -> Result<()> {
        let h = self.cfg.hidden_size;
        x.clear();
        x.resize(ids.len() * h, 0.0);
        for (&id, row) in ids.iter().zip(x.chunks_exact_mut(h)) {
            self.embed_into(id, row)?;
        }
        Ok(())
    }

    /// Whether the tensor path attends with the paged op (its kernels know this head size
    /// and the device runs them) rather than by gathering each sequence's context.
    pub(crate) fn uses_paged_attention(&self) -> bool {
        crate::attention::paged::runs_on(&self.device)
            && crate::attention::paged::supports(self.cfg.head_dim)
    }

    /// Every distinct sliding window of the layers (for the tensor path's masks).
    pub(crate) fn windows(&self) -> &[Option<usize>] {
        &self.windows
    }

    /// Attention shapes of layer `i`.
    fn heads(&self, i: usize) -> crate::attention::Heads {
        crate::attention::Heads {
            num_heads: self.cfg.num_heads,
            num_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            scale: self.cfg.attn_scale,
            softcap: self.cfg.attn_logit_softcap,
            window: self.cfg.layers[i].sliding_window,
        }
    }
}

fn linear_kinds(l: &Linear) -> Vec<String> {
    use candle_core::quantized::QMatMul;
    match l {
        Linear::Packed(p) => vec![p.format().to_string()],
        Linear::Half(h) => vec![if h.bf16 { "BF16" } else { "F16" }.to_string()],
        Linear::Candle(QMatMul::QTensor(q)) => vec![crate::linear::weight_type(q.dtype())
            .map_or_else(|_| format!("{:?}", q.dtype()), |t| t.name().to_string())],
        Linear::Candle(QMatMul::Tensor(t)) | Linear::Candle(QMatMul::TensorF16(t)) => {
            vec![format!("{:?}", t.dtype()).to_uppercase()]
        }
        Linear::Concat(parts) => parts.iter().flat_map(linear_kinds).collect(),
    }
}
