//! Attention over the paged KV cache, for every sequence of a step at once.
//!
//! [`AttentionMetadata`] says where each packed token of a step belongs (its sequence, its
//! position, the slot of every position of its sequence). Each layer rotates its queries and
//! keys, stores the step's keys and values in their slots, then attends every query over its
//! own sequence's positions: all of them, or the last `window` on a sliding-window layer. On
//! the host the cache is read in place (no gathers); on a device each sequence's context is
//! gathered with `index_select`.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::kv_cache::{KvCache, LayerCache};
use crate::rope::{Rope, RopeTables};
use crate::{Result, RunnerError};

/// One sequence's place in the packed step input.
#[derive(Debug, Clone)]
pub struct SeqSpan {
    /// Row of its first token in the packed input.
    pub q_start: usize,
    pub q_len: usize,
    /// Position of its first token in the sequence.
    pub start_pos: usize,
    /// Slot of every position `0..start_pos + q_len`, in order.
    pub slots: Vec<usize>,
}

/// Where every token of a step goes: built once per step, shared by all layers.
pub struct AttentionMetadata {
    pub seqs: Vec<SeqSpan>,
    /// Position of each packed token.
    pub positions: Vec<usize>,
    /// For each packed token, the index of its sequence in `seqs`.
    pub token_seq: Vec<usize>,
    /// Device-side copies, for the tensor path.
    pub(crate) device: Option<DeviceMetadata>,
}

pub(crate) struct DeviceMetadata {
    pub new_slots: Tensor,
    pub ctx_slots: Vec<Tensor>,
    /// Per sliding window (or none), one mask per sequence (`None`: nothing to mask).
    pub masks: HashMap<Option<usize>, Vec<Option<Tensor>>>,
}

/// First position a query at `pos` attends to.
fn window_start(pos: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (pos + 1).saturating_sub(w))
}

impl AttentionMetadata {
    pub fn new(seqs: Vec<SeqSpan>) -> Self {
        let mut positions = Vec::new();
        let mut token_seq = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            positions.extend(s.start_pos..s.start_pos + s.q_len);
            token_seq.extend(std::iter::repeat_n(i, s.q_len));
        }
        Self {
            seqs,
            positions,
            token_seq,
            device: None,
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.positions.len()
    }

    /// Uploads what the tensor path needs, with masks for each of `windows`.
    pub(crate) fn prepare_device(
        &mut self,
        device: &Device,
        windows: &[Option<usize>],
    ) -> Result<()> {
        let new_slots: Vec<u32> = self
            .seqs
            .iter()
            .flat_map(|s| s.slots[s.start_pos..].iter().map(|&x| x as u32))
            .collect();
        let mut ctx_slots = Vec::with_capacity(self.seqs.len());
        for s in &self.seqs {
            let slots: Vec<u32> = s.slots.iter().map(|&x| x as u32).collect();
            ctx_slots.push(Tensor::new(slots.as_slice(), device)?);
        }
        let mut masks = HashMap::new();
        for &w in windows {
            if masks.contains_key(&w) {
                continue;
            }
            let per_seq = self
                .seqs
                .iter()
                .map(|s| mask(s, w, device))
                .collect::<Result<Vec<_>>>()?;
            masks.insert(w, per_seq);
        }
        self.device = Some(DeviceMetadata {
            new_slots: Tensor::new(new_slots.as_slice(), device)?,
            ctx_slots,
            masks,
        });
        Ok(())
    }
}

/// `[q_len, ctx]` of 0 and -inf, or `None` when every query sees every key.
fn mask(s: &SeqSpan, window: Option<usize>, device: &Device) -> Result<Option<Tensor>> {
    let ctx = s.slots.len();
    let needed = s.q_len > 1 || window_start(s.start_pos, window) > 0;
    if !needed {
        return Ok(None);
    }
    let mask: Vec<f32> = (0..s.q_len)
        .flat_map(|i| {
            let pos = s.start_pos + i;
            let lo = window_start(pos, window);
            (0..ctx).map(move |j| {
                if j <= pos && j >= lo {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Some(Tensor::from_vec(mask, (s.q_len, ctx), device)?))
}

/// Shapes and arithmetic of one layer's attention.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplier of the scores.
    pub scale: f32,
    pub window: Option<usize>,
}

impl Heads {
    fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

impl KvCache {
    /// Attention of layer `layer` on the host cache: rotates `qkv`
    /// (`[tokens, q_dim + 2 * kv_dim]`) in place, stores its keys and values, and writes
    /// `[tokens, q_dim]` into `out`.
    pub(crate) fn attention_host(
        &mut self,
        layer: usize,
        heads: Heads,
        rope: (&Rope, &RopeTables),
        qkv: &mut [f32],
        meta: &AttentionMetadata,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        match &mut self.layers[layer] {
            LayerCache::Host { k, v } => {
                attention_host(k, v, heads, rope, qkv, meta, out);
                Ok(())
            }
            LayerCache::Device { .. } => Err(RunnerError::Step(
                "the host attention path needs a host KV cache".into(),
            )),
        }
    }

    /// Attention of layer `layer` on a device cache, for `qkv` of `[tokens, q_dim + 2 *
    /// kv_dim]`; returns `[tokens, q_dim]`.
    pub(crate) fn attention_tensor(
        &mut self,
        layer: usize,
        heads: Heads,
        rope: (&Rope, &Tensor, &Tensor),
        qkv: &Tensor,
        meta: &AttentionMetadata,
    ) -> Result<Tensor> {
        match &mut self.layers[layer] {
            LayerCache::Device { k, v } => attention_tensor(k, v, heads, rope, qkv, meta),
            LayerCache::Host { .. } => Err(RunnerError::Step(
                "the tensor attention path needs a device KV cache".into(),
            )),
        }
    }
}

fn attention_host(
    k_cache: &mut [f16],
    v_cache: &mut [f16],
    heads: Heads,
    (rope, tab): (&Rope, &RopeTables),
    qkv: &mut [f32],
    meta: &AttentionMetadata,
    out: &mut Vec<f32>,
) {
    let (qd, kd, hd) = (heads.q_dim(), heads.kv_dim(), heads.head_dim);
    let row = qd + 2 * kd;
    for (t, x) in qkv.chunks_exact_mut(row).enumerate() {
        for head in x[..qd + kd].chunks_exact_mut(hd) {
            rope.apply(&mut head[..rope.dims], tab, t);
        }
        let seq = &meta.seqs[meta.token_seq[t]];
        let slot = seq.slots[meta.positions[t]];
        k_cache[slot * kd..(slot + 1) * kd].convert_from_f32_slice(&x[qd..qd + kd]);
        v_cache[slot * kd..(slot + 1) * kd].convert_from_f32_slice(&x[qd + kd..]);
    }
    let n = meta.num_tokens();
    out.clear();
    out.resize(n * qd, 0.0);
    let (k_cache, v_cache, qkv) = (&*k_cache, &*v_cache, &*qkv);
    let ctx_of = |t: usize| {
        let pos = meta.positions[t];
        let seq = &meta.seqs[meta.token_seq[t]];
        &seq.slots[window_start(pos, heads.window)..pos + 1]
    };
    let work: usize = (0..n).map(|t| ctx_of(t).len()).sum();
    let one = |(t, out_t): (usize, &mut [f32])| {
        let q = &qkv[t * row..t * row + qd];
        attend_token(q, ctx_of(t), k_cache, v_cache, heads, out_t);
    };
    // Parallel over tokens only where it pays for the threads' wake-up.
    if work >= 2048 {
        out.par_chunks_mut(qd).enumerate().for_each(one);
    } else {
        out.chunks_mut(qd).enumerate().for_each(one);
    }
}

/// Attention of one query token over the slots `ctx`, every head; the order of every sum is
/// fixed, whatever else shares the step and whichever instructions the CPU has: the AVX-512,
/// AVX2 and portable kernels give the same bits. Each cached key and value row is read once
/// per group of query heads that shares it.
fn attend_token(
    q: &[f32],
    ctx: &[usize],
    k_cache: &[f16],
    v_cache: &[f16],
    heads: Heads,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if heads.head_dim.is_multiple_of(LANES) {
        match simd::level() {
            // SAFETY: AVX-512 F is present (checked by `level`).
            simd::Level::Avx512 => {
                return unsafe { simd::attend_token_avx512(q, ctx, k_cache, v_cache, heads, out) }
            }
            // SAFETY: AVX2, FMA and F16C are present (checked by `level`).
            simd::Level::Avx2 => {
                return unsafe { simd::attend_token_avx2(q, ctx, k_cache, v_cache, heads, out) }
            }
            simd::Level::Portable => {}
        }
    }
    attend_token_generic(
        q,
        ctx,
        k_cache,
        v_cache,
        heads,
        out,
        (dot_portable, axpy_portable),
    );
}

/// Lanes of the canonical dot product: lane `i` accumulates the products of the elements
/// `i, i + 16, ...` with fused multiply-adds, then the lanes are added pairwise, halving.
const LANES: usize = 16;

fn dot_portable(q: &[f32], k: &[f16]) -> f32 {
    let mut acc = [0f32; LANES];
    for (i, (a, b)) in q.iter().zip(k).enumerate() {
        acc[i % LANES] = a.mul_add(b.to_f32(), acc[i % LANES]);
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0]
}

fn axpy_portable(o: &mut [f32], w: f32, v: &[f16]) {
    for (o, v) in o.iter_mut().zip(v) {
        *o = w.mul_add(v.to_f32(), *o);
    }
}

/// The loop structure of attention, with the two inner kernels (a query row against an f16
/// key row, and `o += w * v` for an f16 value row) passed in.
#[inline(always)]
fn attend_token_generic(
    q: &[f32],
    ctx: &[usize],
    k_cache: &[f16],
    v_cache: &[f16],
    heads: Heads,
    out: &mut [f32],
    (dot_f16, axpy_f16): (
        impl Fn(&[f32], &[f16]) -> f32,
        impl Fn(&mut [f32], f32, &[f16]),
    ),
) {
    let (hd, kd) = (heads.head_dim, heads.kv_dim());
    let group = heads.num_heads / heads.num_kv_heads;
    let scale = heads.scale;
    let n = ctx.len();
    // Scores of one group's heads, head-major: [group][ctx].
    let mut scores = vec![0f32; group * n];
    for g in 0..heads.num_kv_heads {
        let off = g * hd;
        for h in 0..group {
            let qh = g * group + h;
            let q_h = &q[qh * hd..(qh + 1) * hd];
            let sc = &mut scores[h * n..(h + 1) * n];
            let mut max = f32::NEG_INFINITY;
            for (s, &slot) in sc.iter_mut().zip(ctx) {
                *s = dot_f16(q_h, &k_cache[slot * kd + off..slot * kd + off + hd]) * scale;
                max = max.max(*s);
            }
            let mut sum = 0f32;
            for s in sc.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            sc.iter_mut().for_each(|s| *s *= inv);
        }
        for (j, &slot) in ctx.iter().enumerate() {
            let v = &v_cache[slot * kd + off..slot * kd + off + hd];
            for h in 0..group {
                let qh = g * group + h;
                axpy_f16(&mut out[qh * hd..(qh + 1) * hd], scores[h * n + j], v);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{attend_token_generic, Heads};

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Level {
        Avx512,
        Avx2,
        Portable,
    }

    /// The widest kernels this CPU runs (`WICK_NO_AVX512=1` skips the first,
    /// `WICK_NO_SIMD=1` both).
    pub fn level() -> Level {
        use std::sync::OnceLock;
        static LEVEL: OnceLock<Level> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            let no_simd = std::env::var_os("WICK_NO_SIMD").is_some();
            if !no_simd
                && std::env::var_os("WICK_NO_AVX512").is_none()
                && is_x86_feature_detected!("avx512f")
            {
                Level::Avx512
            } else if !no_simd
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                Level::Avx2
            } else {
                Level::Portable
            }
        })
    }

    /// The canonical reduction's last steps, 8 lanes to 1: lanes `i` and `i + 4`, then
    /// `i + 2`, then `i + 1`.
    #[inline(always)]
    unsafe fn reduce8(v: __m256) -> f32 {
        let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
        _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps::<1>(x, x)))
    }

    /// The AVX2 + F16C version: the 16 lanes as two registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn attend_token_avx2(
        q: &[f32],
        ctx: &[usize],
        k_cache: &[f16],
        v_cache: &[f16],
        heads: Heads,
        out: &mut [f32],
    ) {
        attend_token_generic(
            q,
            ctx,
            k_cache,
            v_cache,
            heads,
            out,
            (
                |q: &[f32], k: &[f16]| {
                    // SAFETY: AVX2/FMA/F16C (this function's features); lengths are whole
                    // 16-lane chunks (head_dim % 16 == 0, checked by the caller).
                    unsafe {
                        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                        for i in (0..q.len()).step_by(16) {
                            let qp = q.as_ptr().add(i);
                            let kp = k.as_ptr().add(i) as *const __m128i;
                            let k0 = _mm256_cvtph_ps(_mm_loadu_si128(kp));
                            let k1 = _mm256_cvtph_ps(_mm_loadu_si128(kp.add(1)));
                            lo = _mm256_fmadd_ps(_mm256_loadu_ps(qp), k0, lo);
                            hi = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(8)), k1, hi);
                        }
                        reduce8(_mm256_add_ps(lo, hi))
                    }
                },
                |o: &mut [f32], w: f32, v: &[f16]| unsafe {
                    let wv = _mm256_set1_ps(w);
                    for i in (0..o.len()).step_by(8) {
                        let vv = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i) as *const _));
                        let p = o.as_mut_ptr().add(i);
                        _mm256_storeu_ps(p, _mm256_fmadd_ps(wv, vv, _mm256_loadu_ps(p)));
                    }
                },
            ),
        )
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn attend_token_avx512(
        q: &[f32],
        ctx: &[usize],
        k_cache: &[f16],
        v_cache: &[f16],
        heads: Heads,
        out: &mut [f32],
    ) {
        attend_token_generic(
            q,
            ctx,
            k_cache,
            v_cache,
            heads,
            out,
            (
                |q: &[f32], k: &[f16]| {
                    // SAFETY: AVX-512 F (this function's feature); lengths are whole 16-lane
                    // chunks (head_dim % 16 == 0, checked by the caller).
                    unsafe {
                        let mut acc = _mm512_setzero_ps();
                        for i in (0..q.len()).step_by(16) {
                            let kv =
                                _mm512_cvtph_ps(_mm256_loadu_si256(k.as_ptr().add(i) as *const _));
                            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q.as_ptr().add(i)), kv, acc);
                        }
                        let hi = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc));
                        reduce8(_mm256_add_ps(
                            _mm512_castps512_ps256(acc),
                            _mm256_castpd_ps(hi),
                        ))
                    }
                },
                |o: &mut [f32], w: f32, v: &[f16]| unsafe {
                    let wv = _mm512_set1_ps(w);
                    for i in (0..o.len()).step_by(16) {
                        let vv = _mm512_cvtph_ps(_mm256_loadu_si256(v.as_ptr().add(i) as *const _));
                        let p = o.as_mut_ptr().add(i);
                        _mm512_storeu_ps(p, _mm512_fmadd_ps(wv, vv, _mm512_loadu_ps(p)));
                    }
                },
            ),
        )
    }
}

fn attention_tensor(
    k_cache: &mut Tensor,
    v_cache: &mut Tensor,
    heads: Heads,
    (rope, cos, sin): (&Rope, &Tensor, &Tensor),
    qkv: &Tensor,
    meta: &AttentionMetadata,
) -> Result<Tensor> {
    let (qd, kd, hd) = (heads.q_dim(), heads.kv_dim(), heads.head_dim);
    let (nh, nkv) = (heads.num_heads, heads.num_kv_heads);
    let dm = meta
        .device
        .as_ref()
        .ok_or_else(|| RunnerError::Step("device metadata not prepared".into()))?;
    let masks = dm
        .masks
        .get(&heads.window)
        .ok_or_else(|| RunnerError::Step("no masks prepared for this window".into()))?;
    let n = meta.num_tokens();
    let to_heads = |x: Tensor, h: usize| -> Result<Tensor> {
        Ok(x.reshape((n, h, hd))?
            .transpose(0, 1)?
            .unsqueeze(0)?
            .contiguous()?)
    };
    let q = to_heads(qkv.narrow(1, 0, qd)?, nh)?;
    let k = to_heads(qkv.narrow(1, qd, kd)?, nkv)?;
    let q = rope.apply_tensor(&q, cos, sin)?.squeeze(0)?; // [nh, n, hd]
    let k = rope.apply_tensor(&k, cos, sin)?.squeeze(0)?;
    let k_rows = k.transpose(0, 1)?.reshape((n, kd))?.contiguous()?;
    let v_rows = qkv.narrow(1, qd + kd, kd)?.contiguous()?;
    let idx = dm
        .new_slots
        .unsqueeze(1)?
        .broadcast_as((n, kd))?
        .contiguous()?;
    k_cache.scatter_set(&idx, &k_rows, 0)?;
    v_cache.scatter_set(&idx, &v_rows, 0)?;
    let mut outs = Vec::with_capacity(meta.seqs.len());
    for (i, s) in meta.seqs.iter().enumerate() {
        let ctx = s.slots.len();
        let gather = |c: &Tensor| -> Result<Tensor> {
            let x = c.index_select(&dm.ctx_slots[i], 0)?; // [ctx, kd]
            let x = x.reshape((ctx, nkv, 1, hd))?.transpose(0, 2)?; // [1, nkv, ctx, hd]
            let x = x.broadcast_as((nh / nkv, nkv, ctx, hd))?.transpose(0, 1)?;
            Ok(x.reshape((nh, ctx, hd))?)
        };
        let (kc, vc) = (gather(k_cache)?, gather(v_cache)?);
        let qs = q.narrow(1, s.q_start, s.q_len)?.contiguous()?; // [nh, q_len, hd]
                                                                 // Scores, mask and softmax in f32 whatever the activations' dtype.
        let scores = qs.matmul(&kc.t()?.contiguous()?)?.to_dtype(DType::F32)?;
        let mut att = (scores * heads.scale as f64)?;
        if let Some(mask) = &masks[i] {
            att = att.broadcast_add(mask)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?.to_dtype(vc.dtype())?;
        let o = att.matmul(&vc.contiguous()?)?; // [nh, q_len, hd]
        outs.push(o.transpose(0, 1)?.reshape((s.q_len, qd))?);
    }
    Ok(Tensor::cat(&outs, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three kernels of one layer's attention give the same bits (each runs where the CPU
    /// has it: all three on AVX-512 machines such as CI's).
    #[test]
    fn every_attention_kernel_gives_the_same_bits() {
        let heads = Heads {
            num_heads: 6,
            num_kv_heads: 2,
            head_dim: 64,
            scale: 0.125,
            window: None,
        };
        let (kd, slots) = (heads.kv_dim(), 40);
        let mut seed = 3u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let k: Vec<f16> = (0..slots * kd)
            .map(|_| f16::from_f32(rnd() * 3.0))
            .collect();
        let v: Vec<f16> = (0..slots * kd).map(|_| f16::from_f32(rnd())).collect();
        let q: Vec<f32> = (0..heads.q_dim()).map(|_| rnd() * 2.0).collect();
        let ctx: Vec<usize> = (0..slots).rev().step_by(2).collect();
        let mut portable = vec![0f32; heads.q_dim()];
        let kernels = (dot_portable, axpy_portable);
        attend_token_generic(&q, &ctx, &k, &v, heads, &mut portable, kernels);
        assert!(portable.iter().all(|x| x.is_finite()) && portable.iter().any(|x| *x != 0.0));
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("f16c") {
                let mut out = vec![0f32; heads.q_dim()];
                // SAFETY: the features were just checked.
                unsafe { simd::attend_token_avx2(&q, &ctx, &k, &v, heads, &mut out) };
                assert_eq!(out, portable, "avx2");
            }
            if has!("avx512f") {
                let mut out = vec![0f32; heads.q_dim()];
                // SAFETY: the feature was just checked.
                unsafe { simd::attend_token_avx512(&q, &ctx, &k, &v, heads, &mut out) };
                assert_eq!(out, portable, "avx512");
            }
        }
    }
}
