//! The Llama forward, batch-aware: every scheduled token of a step is one row of the input.
//! Weight names and structure follow candle's own Llama; the KV cache and the attention
//! metadata come in as arguments instead of living inside the model.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::kv_cache::{attention, AttentionMetadata, Heads, KvCache, Rope};
use crate::linear::Linear;
use crate::qgemm::{self, Acts, Packed};
use crate::{LlamaConfig, Result, RunnerError};

/// One decoder layer. Q, K and V are fused into one matrix, and so are gate and up, so each
/// step runs one matmul where three (or two) would be.
pub(crate) struct Layer {
    pub attn_norm: Tensor,
    pub qkv: Linear,
    pub o: Linear,
    pub ffn_norm: Tensor,
    pub gate_up: Linear,
    pub down: Linear,
}

/// Every weight of the model, already in the format the runner computes with.
pub(crate) struct Weights {
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    pub lm_head: Linear,
}

pub struct Llama {
    cfg: LlamaConfig,
    w: Weights,
    rope: Rope,
    device: Device,
    dtype: DType,
    /// Set when the model runs on the host path (CPU, f32, every linear layer packed).
    host: Option<HostParts>,
}

impl Llama {
    /// `dtype` is the activations' (and the KV cache's) type: the dense weights are in it.
    pub(crate) fn new(
        cfg: LlamaConfig,
        mut w: Weights,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let rope = Rope::new(&cfg, cfg.max_position_embeddings, device, dtype)?;
        let host = HostParts::new(&w, device, dtype)?;
        if host.is_some() {
            // The host path keeps its own copy of the embedding table.
            w.embed = Tensor::zeros(0, DType::F32, device)?;
        }
        Ok(Self {
            cfg,
            w,
            rope,
            device: device.clone(),
            dtype,
            host,
        })
    }

    /// Whether steps run on the host path ([`Llama::forward_host`]).
    pub fn runs_on_host(&self) -> bool {
        self.host.is_some()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn heads(&self) -> Heads {
        Heads {
            num_heads: self.cfg.num_heads,
            num_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    /// Runs the packed tokens `ids` through every layer and returns the logits of the rows
    /// `last_rows` (`[last_rows.len(), vocab]`), or `None` when no row needs them.
    pub fn forward(
        &self,
        ids: &[u32],
        meta: &AttentionMetadata,
        last_rows: &[u32],
        kv: &mut KvCache,
    ) -> Result<Option<Tensor>> {
        if self.host.is_some() {
            return Err(RunnerError::Step(
                "this model computes on the host path; use forward_host".into(),
            ));
        }
        let eps = self.cfg.rms_norm_eps as f32;
        let inter = self.cfg.intermediate_size;
        let ids = Tensor::new(ids, &self.device)?;
        let mut x = self.w.embed.index_select(&ids, 0)?;
        for (i, layer) in self.w.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let qkv = layer.qkv.forward(&h)?;
            let attn = attention(kv, i, self.heads(), &self.rope, &qkv, meta)?;
            x = (x + layer.o.forward(&attn)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let gate_up = layer.gate_up.forward(&h)?;
            let gate = candle_nn::ops::silu(&gate_up.narrow(1, 0, inter)?)?;
            let act = (gate * gate_up.narrow(1, inter, inter)?)?;
            x = (x + layer.down.forward(&act)?)?;
        }
        if last_rows.is_empty() {
            return Ok(None);
        }
        let rows = Tensor::new(last_rows, &self.device)?;
        let x = x.index_select(&rows, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.w.norm, eps)?;
        Ok(Some(self.w.lm_head.forward(&x)?))
    }

    /// The CPU forward on plain memory: the packed quantized kernels for every projection,
    /// attention in place over the host KV cache, no tensors. Returns one logits row per
    /// entry of `last_rows`.
    pub(crate) fn forward_host(
        &self,
        ids: &[u32],
        meta: &AttentionMetadata,
        last_rows: &[u32],
        kv: &mut KvCache,
        s: &mut Scratch,
    ) -> Result<Vec<Vec<f32>>> {
        let host = self
            .host
            .as_ref()
            .ok_or_else(|| RunnerError::Step("no host path for this model".into()))?;
        let (hid, inter) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let eps = self.cfg.rms_norm_eps as f32;
        let vocab = host.embed.len() / hid;
        s.x.clear();
        for &id in ids {
            let id = id as usize;
            if id >= vocab {
                return Err(RunnerError::Step(format!("token id {id} out of range")));
            }
            s.x.extend_from_slice(&host.embed[id * hid..(id + 1) * hid]);
        }
        for (i, (layer, hl)) in self.w.layers.iter().zip(&host.layers).enumerate() {
            rms_norm(&s.x, &hl.attn_norm, eps, &mut s.h);
            project(packed(&layer.qkv)?, &s.h, &mut s.acts, &mut s.qkv);
            kv.attention_host(i, self.heads(), &self.rope, &mut s.qkv, meta, &mut s.attn)?;
            project(packed(&layer.o)?, &s.attn, &mut s.acts, &mut s.tmp);
            add_into(&mut s.x, &s.tmp);
            rms_norm(&s.x, &hl.ffn_norm, eps, &mut s.h);
            project(packed(&layer.gate_up)?, &s.h, &mut s.acts, &mut s.gate_up);
            silu_mul(&s.gate_up, inter, &mut s.act);
            project(packed(&layer.down)?, &s.act, &mut s.acts, &mut s.tmp);
            add_into(&mut s.x, &s.tmp);
        }
        if last_rows.is_empty() {
            return Ok(Vec::new());
        }
        s.tmp.clear();
        for &r in last_rows {
            let r = r as usize;
            s.tmp.extend_from_slice(&s.x[r * hid..(r + 1) * hid]);
        }
        rms_norm(&s.tmp, &host.norm, eps, &mut s.h);
        let head = packed(&self.w.lm_head)?;
        project(head, &s.h, &mut s.acts, &mut s.tmp);
        Ok(s.tmp.chunks_exact(head.n).map(<[f32]>::to_vec).collect())
    }
}

/// Buffers of the host forward, kept between steps so that a step allocates nothing once
/// they have grown to the largest step seen.
#[derive(Default)]
pub(crate) struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    tmp: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    acts: Acts,
}

/// `out = x * w / sqrt(mean(x^2) + eps)`, row by row.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut Vec<f32>) {
    let h = w.len();
    out.clear();
    out.resize(x.len(), 0.0);
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum();
        let inv = 1.0 / (ss / h as f32 + eps).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `act[t][i] = silu(gate_up[t][i]) * gate_up[t][inter + i]`.
fn silu_mul(gate_up: &[f32], inter: usize, act: &mut Vec<f32>) {
    let t = gate_up.len() / (2 * inter);
    act.clear();
    act.resize(t * inter, 0.0);
    let row = |(gu, a): (&[f32], &mut [f32])| {
        let (g, u) = gu.split_at(inter);
        for ((a, g), u) in a.iter_mut().zip(g).zip(u) {
            *a = g / (1.0 + (-g).exp()) * u;
        }
    };
    if t >= 16 {
        gate_up
            .par_chunks_exact(2 * inter)
            .zip(act.par_chunks_exact_mut(inter))
            .for_each(row);
    } else {
        gate_up
            .chunks_exact(2 * inter)
            .zip(act.chunks_exact_mut(inter))
            .for_each(row);
    }
}

fn packed(l: &Linear) -> Result<&Packed> {
    l.as_packed()
        .ok_or_else(|| RunnerError::Step("a layer is not packed".into()))
}

/// `out = w . x` on the packed kernels, quantizing `x` (`[t, w.k]`) into `acts`.
fn project(w: &Packed, x: &[f32], acts: &mut Acts, out: &mut Vec<f32>) {
    let t = x.len() / w.k;
    acts.quantize(x, t, w.k);
    out.clear();
    out.resize(t * w.n, 0.0);
    qgemm::matmul(w, acts, out);
}

/// The model's parts on plain host memory, for [`Llama::forward_host`].
pub(crate) struct HostLayer {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
}

pub(crate) struct HostParts {
    layers: Vec<HostLayer>,
    norm: Vec<f32>,
    embed: Vec<f32>,
}

impl HostParts {
    /// Present when every linear layer is packed and the model lives on the CPU in f32.
    fn new(w: &Weights, device: &Device, dtype: DType) -> Result<Option<Self>> {
        let packed = w.layers.iter().all(|l| {
            [&l.qkv, &l.o, &l.gate_up, &l.down]
                .iter()
                .all(|x| x.as_packed().is_some())
        }) && w.lm_head.as_packed().is_some();
        if !device.is_cpu() || dtype != DType::F32 || !packed {
            return Ok(None);
        }
        let v = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        Ok(Some(Self {
            layers: w
                .layers
                .iter()
                .map(|l| {
                    Ok(HostLayer {
                        attn_norm: v(&l.attn_norm)?,
                        ffn_norm: v(&l.ffn_norm)?,
                    })
                })
                .collect::<Result<_>>()?,
            norm: v(&w.norm)?,
            embed: v(&w.embed)?,
        }))
    }
}
