//! The host forward: plain memory, no tensors, scratch buffers reused between steps.

use rayon::prelude::*;

use super::Model;
use crate::attention::{exp_canonical, AttentionMetadata};
use crate::config::Activation;
use crate::qgemm::Acts;
use crate::rope::RopeTables;
use crate::{KvCache, Result, RunnerError};

/// Buffers of the host forward, kept between steps so that a step allocates little once
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
    /// Time spent in attention during the last step (the scheduler's cost model).
    pub(crate) attention: std::time::Duration,
}

impl Model {
    /// Runs the packed tokens `ids` through every layer on the host and returns one logits
    /// row per entry of `last_rows`.
    pub(crate) fn forward_host(
        &self,
        ids: &[u32],
        meta: &AttentionMetadata,
        last_rows: &[u32],
        kv: &mut KvCache,
        s: &mut Scratch,
    ) -> Result<Vec<Vec<f32>>> {
        if !self.host {
            return Err(RunnerError::Step(
                "this model computes with tensors; use forward".into(),
            ));
        }
        let cfg = &self.cfg;
        let (hid, inter, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.norm_eps);
        let (qd, kd) = (cfg.q_dim(), cfg.kv_dim());
        self.embed(ids, &mut s.x)?;
        let tables: Vec<RopeTables> = self
            .ropes
            .iter()
            .map(|r| r.tables(&meta.positions))
            .collect();
        s.attention = Default::default();
        for (i, layer) in self.w.layers.iter().enumerate() {
            rms_norm(&s.x, &layer.attn_norm.w, eps, &mut s.h);
            layer.qkv.forward_host(&s.h, &mut s.acts, &mut s.qkv)?;
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                for row in s.qkv.chunks_exact_mut(qd + 2 * kd) {
                    // Per head: the weights are one head long.
                    rms_norm_in_place(&mut row[..qd], &qn.w, eps);
                    rms_norm_in_place(&mut row[qd..qd + kd], &kn.w, eps);
                }
            }
            let r = cfg.layers[i].rope;
            let rope = (&self.ropes[r], &tables[r]);
            let t = std::time::Instant::now();
            kv.attention_host(i, self.heads(i), rope, &mut s.qkv, meta, &mut s.attn)?;
            s.attention += t.elapsed();
            layer.o.forward_host(&s.attn, &mut s.acts, &mut s.tmp)?;
            if let Some(n) = &layer.post_attn_norm {
                rms_norm_in_place(&mut s.tmp, &n.w, eps);
            }
            add_into(&mut s.x, &s.tmp);
            rms_norm(&s.x, &layer.ffn_norm.w, eps, &mut s.h);
            layer
                .gate_up
                .forward_host(&s.h, &mut s.acts, &mut s.gate_up)?;
            act_mul(&s.gate_up, inter, cfg.activation, &mut s.act);
            layer.down.forward_host(&s.act, &mut s.acts, &mut s.tmp)?;
            if let Some(n) = &layer.post_ffn_norm {
                rms_norm_in_place(&mut s.tmp, &n.w, eps);
            }
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
        rms_norm(&s.tmp, &self.w.norm.w, eps, &mut s.h);
        self.w.lm_head.forward_host(&s.h, &mut s.acts, &mut s.tmp)?;
        if let Some(cap) = cfg.final_logit_softcap {
            s.tmp.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
        }
        let vocab = self.w.lm_head.w.rows();
        Ok(s.tmp.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }
}

/// `out = x * w / sqrt(mean(x^2) + eps)`, row by row.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut Vec<f32>) {
    out.clear();
    out.extend_from_slice(x);
    rms_norm_in_place(out, w, eps);
}

pub(crate) fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let h = w.len();
    for xr in x.chunks_exact_mut(h) {
        let ss: f32 = xr.iter().map(|v| v * v).sum();
        let inv = 1.0 / (ss / h as f32 + eps).sqrt();
        for (v, g) in xr.iter_mut().zip(w) {
            *v = *v * inv * g;
        }
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// GELU, tanh approximation.
/// GELU (tanh form) as `x / (1 + exp(-2u))` with `u = sqrt(2/pi) (x + 0.044715 x^3)`: the
/// same function (`0.5 (1 + tanh u) = 1 / (1 + exp(-2u))`) with the attention's canonical
/// `exp` instead of libm's `tanh`, which took a quarter of Gemma 3's prefill. The same bits
/// on every path.
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    let u = C * (x + 0.044715 * x * x * x);
    x / (1.0 + exp_canonical((-2.0 * u).min(88.0)))
}

#[inline(always)]
fn gelu_mul_generic(g: &[f32], u: &[f32], a: &mut [f32]) {
    for ((a, g), u) in a.iter_mut().zip(g).zip(u) {
        *a = gelu_tanh(*g) * u;
    }
}

/// `a = gelu(g) * u`, compiled for the widest instructions the CPU has (rounding and fused
/// multiply-adds inline; the same operations, hence bits, everywhere).
fn gelu_mul(g: &[f32], u: &[f32], a: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(g: &[f32], u: &[f32], a: &mut [f32]) {
            gelu_mul_generic(g, u, a)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(g: &[f32], u: &[f32], a: &mut [f32]) {
            gelu_mul_generic(g, u, a)
        }
        use crate::cpu::Isa;
        match crate::cpu::float_isa() {
            // SAFETY: AVX-512 F is present (checked by `crate::cpu`).
            Isa::Avx512 => return unsafe { avx512(g, u, a) },
            // SAFETY: AVX2 and FMA are present (checked by `crate::cpu`).
            Isa::Avx2 => return unsafe { avx2(g, u, a) },
            Isa::Portable => {}
        }
    }
    gelu_mul_generic(g, u, a)
}

/// `act[t][i] = f(gate_up[t][i]) * gate_up[t][inter + i]`.
fn act_mul(gate_up: &[f32], inter: usize, f: Activation, act: &mut Vec<f32>) {
    let t = gate_up.len() / (2 * inter);
    act.clear();
    act.resize(t * inter, 0.0);
    let row = |(gu, a): (&[f32], &mut [f32])| {
        let (g, u) = gu.split_at(inter);
        match f {
            Activation::Silu => {
                for ((a, g), u) in a.iter_mut().zip(g).zip(u) {
                    *a = g / (1.0 + (-g).exp()) * u;
                }
            }
            Activation::GeluTanh => gelu_mul(g, u, a),
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
