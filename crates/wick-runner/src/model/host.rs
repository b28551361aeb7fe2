//! The host backend: plain memory, no tensors, Wick's packed kernels and tiled attention
//! over the f16 cache, buffers kept between steps; run inside the runner's thread pool.

use rayon::prelude::*;

use super::layer::{Backend, Buf};
use super::{Model, Norm};
use crate::adapter::{Site, StepAdapters};
use crate::attention::{self, exp_canonical, AttentionMetadata, Heads};
use crate::config::Activation;
use crate::kv_cache::HostLayer;
use crate::linear::Proj;
use crate::qgemm::Acts;
use crate::rope::RopeTables;
use crate::Result;

/// Buffers of the host backend, kept between steps so that a step allocates little once
/// they have grown to the largest step seen.
#[derive(Default)]
pub(crate) struct Scratch {
    bufs: [Vec<f32>; Buf::COUNT],
    acts: Acts,
    /// Time spent in attention during the last step (the scheduler's cost model).
    pub(crate) attention: std::time::Duration,
}

/// One step on the host: the model's RoPE tables for the step's positions, its cache and
/// its scratch.
pub(crate) struct HostBackend<'a> {
    model: &'a Model,
    kv: &'a mut [HostLayer],
    meta: &'a AttentionMetadata,
    tables: Vec<RopeTables>,
    s: &'a mut Scratch,
    adapters: StepAdapters<'a>,
}

impl<'a> HostBackend<'a> {
    pub(crate) fn new(
        model: &'a Model,
        kv: &'a mut [HostLayer],
        meta: &'a AttentionMetadata,
        s: &'a mut Scratch,
        adapters: StepAdapters<'a>,
    ) -> Self {
        let tables = model
            .ropes
            .iter()
            .map(|r| r.tables(&meta.positions))
            .collect();
        s.attention = Default::default();
        Self {
            model,
            kv,
            meta,
            tables,
            s,
            adapters,
        }
    }

    /// Runs `f` on buffer `x` (read) and buffer `out` (written), two different roles.
    fn with_out<T>(
        &mut self,
        x: Buf,
        out: Buf,
        f: impl FnOnce(&[f32], &mut Vec<f32>, &mut Acts) -> T,
    ) -> T {
        let mut o = std::mem::take(&mut self.s.bufs[out as usize]);
        let r = f(&self.s.bufs[x as usize], &mut o, &mut self.s.acts);
        self.s.bufs[out as usize] = o;
        r
    }
}

impl Backend for HostBackend<'_> {
    type Logits = Vec<Vec<f32>>;

    fn embed(&mut self, model: &Model, ids: &[u32]) -> Result<()> {
        model.embed(ids, &mut self.s.bufs[Buf::X as usize])
    }

    fn norm(&mut self, x: Buf, w: &Norm, eps: f32, out: Buf) -> Result<()> {
        if x == out {
            rms_norm_in_place(&mut self.s.bufs[x as usize], &w.w, eps);
        } else {
            self.with_out(x, out, |x, out, _| rms_norm(x, &w.w, eps, out));
        }
        Ok(())
    }

    fn head_norms(&mut self, q: &Norm, k: &Norm, eps: f32, heads: &Heads) -> Result<()> {
        let (qd, kd) = (heads.q_dim(), heads.kv_dim());
        for row in self.s.bufs[Buf::Qkv as usize].chunks_exact_mut(qd + 2 * kd) {
            // Per head: the weights are one head long.
            rms_norm_in_place(&mut row[..qd], &q.w, eps);
            rms_norm_in_place(&mut row[qd..qd + kd], &k.w, eps);
        }
        Ok(())
    }

    fn linear(&mut self, p: &Proj, site: Option<Site>, x: Buf, out: Buf) -> Result<()> {
        let (adapters, tokens) = (self.adapters, self.meta.num_tokens());
        self.with_out(x, out, |x, out, acts| {
            p.forward_host(x, acts, out)?;
            match site {
                Some(site) => adapters.add_host(site, x, out, tokens),
                None => Ok(()),
            }
        })
    }

    fn attention(&mut self, layer: usize, heads: Heads, rope: usize) -> Result<()> {
        let t = std::time::Instant::now();
        let rope = (&self.model.ropes[rope], &self.tables[rope]);
        let cache = &mut self.kv[layer];
        let mut out = std::mem::take(&mut self.s.bufs[Buf::Attn as usize]);
        let qkv = &mut self.s.bufs[Buf::Qkv as usize];
        attention::attention_host(cache, heads, rope, qkv, self.meta, &mut out);
        self.s.bufs[Buf::Attn as usize] = out;
        self.s.attention += t.elapsed();
        Ok(())
    }

    fn add(&mut self, x: Buf, y: Buf) -> Result<()> {
        let mut xs = std::mem::take(&mut self.s.bufs[x as usize]);
        add_into(&mut xs, &self.s.bufs[y as usize]);
        self.s.bufs[x as usize] = xs;
        Ok(())
    }

    fn act_mul(&mut self, f: Activation, intermediate: usize) -> Result<()> {
        self.with_out(Buf::GateUp, Buf::Act, |gu, act, _| {
            act_mul(gu, intermediate, f, act)
        });
        Ok(())
    }

    fn gather_rows(&mut self, rows: &[u32]) -> Result<()> {
        let hid = self.model.cfg.hidden_size;
        self.with_out(Buf::X, Buf::Tmp, |x, out, _| {
            out.clear();
            for &r in rows {
                let r = r as usize;
                out.extend_from_slice(&x[r * hid..(r + 1) * hid]);
            }
        });
        Ok(())
    }

    fn softcap(&mut self, x: Buf, cap: f32) -> Result<()> {
        self.s.bufs[x as usize]
            .iter_mut()
            .for_each(|v| *v = cap * (*v / cap).tanh());
        Ok(())
    }

    fn logits(&mut self, x: Buf, vocab: usize) -> Result<Vec<Vec<f32>>> {
        Ok(self.s.bufs[x as usize]
            .chunks_exact(vocab)
            .map(<[f32]>::to_vec)
            .collect())
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
