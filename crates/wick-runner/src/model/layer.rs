//! One step of the decoder, written once for every family and both paths: the embedding
//! lookup, each layer (norm, QKV with its bias, per-head Q/K norms, attention, the output
//! projection and its post-norm, the residuals, the MLP and its post-norm) and the logits
//! (final norm, output layer, final soft-cap). Every operation is a call on a [`Backend`]:
//! the host backend (`host.rs`: Wick's packed kernels and tiled attention, buffers reused
//! between steps) or the tensor backend (`tensor.rs`: candle ops, the paged op). The runner
//! picks the backend once, at load (its `Path`); nothing here branches on it.
//!
//! A family's differences are [`crate::ModelConfig`] fields and optional parts of a
//! [`Layer`], read here (and, for the embedding scale and each layer's attention shape, by
//! the `Model` helpers these steps call); a new operation (a new norm, an activation) is one
//! step below and one method per backend.

use super::{Layer, Model, Norm};
use crate::adapter::{Projection, Site};
use crate::attention::Heads;
use crate::config::Activation;
use crate::linear::Proj;
use crate::Result;

/// The step's activations by role; each backend keeps one buffer (or tensor) per role, so the
/// host backend reuses its memory from step to step. All are `[rows, width]`, row-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Buf {
    /// The residual stream, `[tokens, hidden]`.
    X,
    /// A normed copy of `X` (a projection's input).
    H,
    /// Queries, keys and values side by side, `[tokens, q_dim + 2 kv_dim]`.
    Qkv,
    /// Attention's output, `[tokens, q_dim]`.
    Attn,
    /// A projection's output on its way into `X` (and the logits at the end).
    Tmp,
    /// Gate and up side by side, `[tokens, 2 intermediate]`.
    GateUp,
    /// The activated MLP input, `[tokens, intermediate]`.
    Act,
}

impl Buf {
    pub(crate) const COUNT: usize = 7;
}

/// The operations a step is made of, computed by one backend.
pub(crate) trait Backend {
    /// What the logits come back as (host rows, or a tensor on the device).
    type Logits;
    /// `X = embeddings of ids` (scaled as the family says).
    fn embed(&mut self, model: &Model, ids: &[u32]) -> Result<()>;
    /// `out = x * w / sqrt(mean(x^2) + eps)` per row of `w`'s length; in place when
    /// `x == out`.
    fn norm(&mut self, x: Buf, w: &Norm, eps: f32, out: Buf) -> Result<()>;
    /// RMSNorm of each query head by `q` and each key head by `k`, in `Qkv`.
    fn head_norms(&mut self, q: &Norm, k: &Norm, eps: f32, heads: &Heads) -> Result<()>;
    /// `out = x W^T (+ bias)`, plus the adapters' parts at `site` for the rows of sequences
    /// on one (a layer's projections; the output layer has none).
    fn linear(&mut self, p: &Proj, site: Option<Site>, x: Buf, out: Buf) -> Result<()>;
    /// Layer `layer`'s attention: rotates `Qkv` with RoPE table `rope`, stores its keys and
    /// values in the cache, attends each query over its own sequence: `Attn`.
    fn attention(&mut self, layer: usize, heads: Heads, rope: usize) -> Result<()>;
    /// `x += y`.
    fn add(&mut self, x: Buf, y: Buf) -> Result<()>;
    /// `Act = f(gate) * up` over `GateUp`.
    fn act_mul(&mut self, f: Activation, intermediate: usize) -> Result<()>;
    /// `Tmp = rows` of `X`.
    fn gather_rows(&mut self, rows: &[u32]) -> Result<()>;
    /// `x = cap * tanh(x / cap)`.
    fn softcap(&mut self, x: Buf, cap: f32) -> Result<()>;
    /// `x` as logits, `vocab` wide.
    fn logits(&mut self, x: Buf, vocab: usize) -> Result<Self::Logits>;
}

impl Model {
    /// Runs the packed tokens `ids` through every layer on backend `b` and returns the
    /// logits of the packed rows `last_rows`, or `None` when no row needs them.
    pub(crate) fn forward<B: Backend>(
        &self,
        b: &mut B,
        ids: &[u32],
        last_rows: &[u32],
    ) -> Result<Option<B::Logits>> {
        b.embed(self, ids)?;
        for (i, layer) in self.w.layers.iter().enumerate() {
            self.layer(b, i, layer)?;
        }
        if last_rows.is_empty() {
            return Ok(None);
        }
        b.gather_rows(last_rows)?;
        b.norm(Buf::Tmp, &self.w.norm, self.cfg.norm_eps, Buf::H)?;
        b.linear(&self.w.lm_head, None, Buf::H, Buf::Tmp)?;
        if let Some(cap) = self.cfg.final_logit_softcap {
            b.softcap(Buf::Tmp, cap)?;
        }
        b.logits(Buf::Tmp, self.w.lm_head.w.rows()).map(Some)
    }

    /// Decoder layer `i`.
    fn layer<B: Backend>(&self, b: &mut B, i: usize, l: &Layer) -> Result<()> {
        let (cfg, eps) = (&self.cfg, self.cfg.norm_eps);
        let heads = self.heads(i);
        let at = |proj| Some(Site { layer: i, proj });
        b.norm(Buf::X, &l.attn_norm, eps, Buf::H)?;
        b.linear(&l.qkv, at(Projection::Qkv), Buf::H, Buf::Qkv)?;
        if let (Some(q), Some(k)) = (&l.q_norm, &l.k_norm) {
            b.head_norms(q, k, eps, &heads)?;
        }
        b.attention(i, heads, cfg.layers[i].rope)?;
        b.linear(&l.o, at(Projection::Output), Buf::Attn, Buf::Tmp)?;
        if let Some(n) = &l.post_attn_norm {
            b.norm(Buf::Tmp, n, eps, Buf::Tmp)?;
        }
        b.add(Buf::X, Buf::Tmp)?;
        b.norm(Buf::X, &l.ffn_norm, eps, Buf::H)?;
        b.linear(&l.gate_up, at(Projection::GateUp), Buf::H, Buf::GateUp)?;
        b.act_mul(cfg.activation, cfg.intermediate_size)?;
        b.linear(&l.down, at(Projection::Down), Buf::Act, Buf::Tmp)?;
        if let Some(n) = &l.post_ffn_norm {
            b.norm(Buf::Tmp, n, eps, Buf::Tmp)?;
        }
        b.add(Buf::X, Buf::Tmp)
    }
}
