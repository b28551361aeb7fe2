//! Attention over the paged KV cache, for every sequence of a step at once.
//!
//! [`AttentionMetadata`] says where each packed token of a step belongs (its sequence, its
//! position, the slot of every position of its sequence). Each layer rotates its queries and
//! keys, stores the step's keys and values in their slots, then attends every query over its
//! own sequence's positions: all of them, or the last `window` on a sliding-window layer. On
//! the host the cache is read in place (no gathers); on CUDA (and the CPU's tensor path) one
//! paged-attention op per layer reads it through the block table (`crate::paged`); on Metal
//! each sequence's context is gathered with `index_select`.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::kv_cache::{KvCache, LayerCache};
use crate::rope::{Rope, RopeTables};
use crate::{Result, RunnerError};

mod host;

pub(crate) use host::exp_canonical;
#[cfg(target_arch = "x86_64")]
pub(crate) use simd::{level as simd_level, Level as SimdLevel};

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
    /// The block tables, where the paged op runs; the rest is for the gathering path.
    pub paged: Option<crate::paged::PagedTensors>,
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

    /// Uploads what the tensor path needs: the block tables where the paged op runs (a cache
    /// of `num_slots` slots in blocks of `block_size`), else every sequence's slots and masks
    /// for each of `windows`.
    pub(crate) fn prepare_device(
        &mut self,
        device: &Device,
        windows: &[Option<usize>],
        (block_size, num_slots): (usize, usize),
        paged: bool,
    ) -> Result<()> {
        let new_slots: Vec<u32> = self
            .seqs
            .iter()
            .flat_map(|s| s.slots[s.start_pos..].iter().map(|&x| x as u32))
            .collect();
        let new_slots = Tensor::new(new_slots.as_slice(), device)?;
        if paged {
            let tables = crate::paged::BlockTables::new(self, block_size, num_slots)?;
            self.device = Some(DeviceMetadata {
                new_slots,
                paged: Some(tables.upload(device)?),
                ctx_slots: Vec::new(),
                masks: HashMap::new(),
            });
            return Ok(());
        }
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
            new_slots,
            paged: None,
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
    let mut items = Vec::new();
    let mut work = 0;
    for s in &meta.seqs {
        host::items_of(
            s.q_start..s.q_start + s.q_len,
            s.start_pos,
            &s.slots,
            heads.num_kv_heads,
            &mut items,
        );
        for p in s.start_pos..s.start_pos + s.q_len {
            work += p + 1 - window_start(p, heads.window);
        }
    }
    host::attend(&items, qkv, row, k_cache, v_cache, heads, work, out);
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use half::f16;

    use super::host::{attend_item, exp_canonical, ItemArgs, Kernels, Portable, EXP_C};

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

    /// AVX2 + F16C: the 16 canonical lanes as two registers.
    pub struct Avx2;

    impl Kernels for Avx2 {
        #[inline(always)]
        unsafe fn scores(q: &[f32], keys: &[f32], out: &mut [f32]) {
            let hd = q.len();
            for (j, o) in out.iter_mut().enumerate() {
                let k = keys.as_ptr().add(j * hd);
                let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                for i in (0..hd).step_by(16) {
                    let qp = q.as_ptr().add(i);
                    lo = _mm256_fmadd_ps(_mm256_loadu_ps(qp), _mm256_loadu_ps(k.add(i)), lo);
                    hi = _mm256_fmadd_ps(
                        _mm256_loadu_ps(qp.add(8)),
                        _mm256_loadu_ps(k.add(i + 8)),
                        hi,
                    );
                }
                *o = reduce8(_mm256_add_ps(lo, hi));
            }
        }

        #[inline(always)]
        unsafe fn pv(o: &mut [f32], p: &[f32], values: &[f32]) {
            let hd = o.len();
            for d in (0..hd).step_by(8) {
                let op = o.as_mut_ptr().add(d);
                let mut acc = _mm256_loadu_ps(op);
                for (j, &pj) in p.iter().enumerate() {
                    let v = _mm256_loadu_ps(values.as_ptr().add(j * hd + d));
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(pj), v, acc);
                }
                _mm256_storeu_ps(op, acc);
            }
        }

        #[inline(always)]
        unsafe fn exp(x: &mut [f32]) {
            let c = &EXP_C;
            let mut chunks = x.chunks_exact_mut(8);
            for ch in &mut chunks {
                let v = _mm256_max_ps(_mm256_loadu_ps(ch.as_ptr()), _mm256_set1_ps(-87.0));
                let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm256_mul_ps(v, _mm256_set1_ps(c.log2e)),
                );
                let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-c.ln2_hi), v);
                let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-c.ln2_lo), r);
                let mut p = _mm256_set1_ps(c.c[5]);
                for k in (0..5).rev() {
                    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c.c[k]));
                }
                let p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0));
                let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
                    _mm256_cvtps_epi32(n),
                    _mm256_set1_epi32(127),
                ));
                _mm256_storeu_ps(ch.as_mut_ptr(), _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
            }
            for x in chunks.into_remainder() {
                *x = exp_canonical(*x);
            }
        }

        #[inline(always)]
        unsafe fn scale_max(s: &mut [f32], scale: f32) -> f32 {
            Portable::scale_max(s, scale)
        }

        #[inline(always)]
        unsafe fn exp_sum(s: &mut [f32], m: f32) -> f32 {
            for s in s.iter_mut() {
                *s -= m;
            }
            Self::exp(s);
            super::host::sum_canonical(s)
        }

        #[inline(always)]
        unsafe fn widen(src: &[f16], dst: &mut [f32]) {
            for i in (0..src.len()).step_by(8) {
                let v = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(v));
            }
        }
    }

    /// `exp_canonical` on 16 lanes.
    #[inline(always)]
    unsafe fn exp16(x: __m512) -> __m512 {
        let c = &EXP_C;
        let v = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(v, _mm512_set1_ps(c.log2e)),
        );
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-c.ln2_hi), v);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-c.ln2_lo), r);
        let mut p = _mm512_set1_ps(c.c[5]);
        for k in (0..5).rev() {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c.c[k]));
        }
        let p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
        let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        _mm512_mul_ps(p, _mm512_castsi512_ps(e))
    }

    /// AVX-512 F.
    pub struct Avx512;

    /// Adds lane `i` and lane `i + w` of each key's accumulator, for the keys of `a` and
    /// `b`, by the index pairs `lo` / `hi` of `_mm512_permutex2var_ps`.
    #[inline(always)]
    unsafe fn halve(a: __m512, b: __m512, lo: &[i32; 16], shift: i32) -> __m512 {
        let lo_idx = _mm512_loadu_si512(lo.as_ptr() as *const _);
        let hi_idx = _mm512_add_epi32(lo_idx, _mm512_set1_epi32(shift));
        _mm512_add_ps(
            _mm512_permutex2var_ps(a, lo_idx, b),
            _mm512_permutex2var_ps(a, hi_idx, b),
        )
    }

    /// The canonical reduction of 16 keys' accumulators at once: lane `k` of the result is
    /// key `k`'s sum, reached by the same additions as `dot_canonical`'s halving.
    #[inline(always)]
    unsafe fn reduce16(acc: &[__m512; 16]) -> __m512 {
        const L1: [i32; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23];
        const L2: [i32; 16] = [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27];
        const L3: [i32; 16] = [0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29];
        const L4: [i32; 16] = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30];
        let mut u = [_mm512_setzero_ps(); 8];
        for (m, u) in u.iter_mut().enumerate() {
            *u = halve(acc[2 * m], acc[2 * m + 1], &L1, 8);
        }
        let mut v = [_mm512_setzero_ps(); 4];
        for (m, v) in v.iter_mut().enumerate() {
            *v = halve(u[2 * m], u[2 * m + 1], &L2, 4);
        }
        let x0 = halve(v[0], v[1], &L3, 2);
        let x1 = halve(v[2], v[3], &L3, 2);
        halve(x0, x1, &L4, 1)
    }

    impl Kernels for Avx512 {
        #[inline(always)]
        unsafe fn scores(q: &[f32], keys: &[f32], out: &mut [f32]) {
            let hd = q.len();
            for (c, out) in out.chunks_mut(16).enumerate() {
                let mut acc = [_mm512_setzero_ps(); 16];
                let base = keys.as_ptr().add(c * 16 * hd);
                for i in (0..hd).step_by(16) {
                    let qv = _mm512_loadu_ps(q.as_ptr().add(i));
                    for (j, acc) in acc.iter_mut().enumerate() {
                        let kv = _mm512_loadu_ps(base.add(j * hd + i));
                        *acc = _mm512_fmadd_ps(qv, kv, *acc);
                    }
                }
                let sums = reduce16(&acc);
                let mask = ((1u32 << out.len()) - 1) as __mmask16;
                _mm512_mask_storeu_ps(out.as_mut_ptr(), mask, sums);
            }
        }

        #[inline(always)]
        unsafe fn pv(o: &mut [f32], p: &[f32], values: &[f32]) {
            let hd = o.len();
            let mut d = 0;
            while d < hd {
                let w = ((hd - d) / 16).min(4);
                let op = o.as_mut_ptr().add(d);
                let mut acc = [_mm512_setzero_ps(); 4];
                for (i, acc) in acc.iter_mut().enumerate().take(w) {
                    *acc = _mm512_loadu_ps(op.add(16 * i));
                }
                for (j, &pj) in p.iter().enumerate() {
                    let pj = _mm512_set1_ps(pj);
                    let v = values.as_ptr().add(j * hd + d);
                    for (i, acc) in acc.iter_mut().enumerate().take(w) {
                        *acc = _mm512_fmadd_ps(pj, _mm512_loadu_ps(v.add(16 * i)), *acc);
                    }
                }
                for (i, acc) in acc.iter().enumerate().take(w) {
                    _mm512_storeu_ps(op.add(16 * i), *acc);
                }
                d += 16 * w;
            }
        }

        #[inline(always)]
        unsafe fn exp(x: &mut [f32]) {
            let mut chunks = x.chunks_exact_mut(16);
            for ch in &mut chunks {
                _mm512_storeu_ps(ch.as_mut_ptr(), exp16(_mm512_loadu_ps(ch.as_ptr())));
            }
            for x in chunks.into_remainder() {
                *x = exp_canonical(*x);
            }
        }

        #[inline(always)]
        unsafe fn scale_max(s: &mut [f32], scale: f32) -> f32 {
            let sc = _mm512_set1_ps(scale);
            let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
            for ch in s.chunks_mut(16) {
                let mask = ((1u32 << ch.len()) - 1) as __mmask16;
                let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, ch.as_ptr()), sc);
                _mm512_mask_storeu_ps(ch.as_mut_ptr(), mask, v);
                max = _mm512_mask_max_ps(max, mask, max, v);
            }
            _mm512_reduce_max_ps(max)
        }

        #[inline(always)]
        unsafe fn exp_sum(s: &mut [f32], m: f32) -> f32 {
            let mv = _mm512_set1_ps(m);
            let mut acc = _mm512_setzero_ps();
            for ch in s.chunks_mut(16) {
                let mask = ((1u32 << ch.len()) - 1) as __mmask16;
                let x = _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, ch.as_ptr()), mv);
                let e = exp16(x);
                _mm512_mask_storeu_ps(ch.as_mut_ptr(), mask, e);
                acc = _mm512_mask_add_ps(acc, mask, acc, e);
            }
            let hi = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc));
            reduce8(_mm256_add_ps(
                _mm512_castps512_ps256(acc),
                _mm256_castpd_ps(hi),
            ))
        }

        #[inline(always)]
        unsafe fn widen(src: &[f16], dst: &mut [f32]) {
            for i in (0..src.len()).step_by(16) {
                let v = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
                _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(v));
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn attend_item_avx2(args: ItemArgs) -> Vec<f32> {
        attend_item::<Avx2>(args)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn attend_item_avx512(args: ItemArgs) -> Vec<f32> {
        attend_item::<Avx512>(args)
    }

    #[cfg(test)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn exp_avx2(x: &mut [f32]) {
        Avx2::exp(x)
    }

    #[cfg(test)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_avx512(x: &mut [f32]) {
        Avx512::exp(x)
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
    if let Some(paged) = &dm.paged {
        let q = q.transpose(0, 1)?.contiguous()?; // [n, nh, hd]
        let op = crate::paged::PagedAttention { heads, paged };
        return Ok(op.forward(&q, k_cache, v_cache)?.reshape((n, qd))?);
    }
    let masks = dm
        .masks
        .get(&heads.window)
        .ok_or_else(|| RunnerError::Step("no masks prepared for this window".into()))?;
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
    use super::host::{attend_item, exp_canonical, Item, Portable};
    use super::*;

    struct Case {
        heads: Heads,
        k: Vec<f16>,
        v: Vec<f16>,
        /// `[tokens, q_dim]`.
        q: Vec<f32>,
        slots: Vec<usize>,
        pos0: usize,
    }

    /// 20 query tokens at positions 50..70 of a sequence whose slots are scattered.
    fn case(window: Option<usize>) -> Case {
        let heads = Heads {
            num_heads: 6,
            num_kv_heads: 2,
            head_dim: 64,
            scale: 0.125,
            window,
        };
        let (kd, n_slots, tokens) = (heads.kv_dim(), 90, 20);
        let mut seed = 3u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let k = (0..n_slots * kd)
            .map(|_| f16::from_f32(rnd() * 3.0))
            .collect();
        let v = (0..n_slots * kd).map(|_| f16::from_f32(rnd())).collect();
        let q = (0..tokens * heads.q_dim()).map(|_| rnd() * 2.0).collect();
        let slots = (0..70).map(|p| (p * 37) % n_slots).collect();
        Case {
            heads,
            k,
            v,
            q,
            slots,
            pos0: 50,
        }
    }

    fn item(c: &Case, rows: std::ops::Range<usize>, group: usize) -> Item<'_> {
        Item {
            pos0: c.pos0 + rows.start,
            rows,
            slots: &c.slots,
            group,
        }
    }

    /// Every token and group, on the portable kernels, in items of `block` tokens.
    fn run(c: &Case, block: usize) -> Vec<Vec<f32>> {
        let n = c.q.len() / c.heads.q_dim();
        let mut out = Vec::new();
        for start in (0..n).step_by(block) {
            for g in 0..c.heads.num_kv_heads {
                let it = item(c, start..(start + block).min(n), g);
                let args = (&it, &c.q[..], c.heads.q_dim(), &c.k[..], &c.v[..], c.heads);
                // SAFETY: portable code.
                out.push(unsafe { attend_item::<Portable>(args) });
            }
        }
        out
    }

    #[test]
    fn tiles_with_an_online_softmax_match_plain_attention() {
        for window in [None, Some(20)] {
            let c = case(window);
            let (h, hd, kd) = (c.heads, c.heads.head_dim, c.heads.kv_dim());
            let per_group = h.num_heads / h.num_kv_heads;
            let n = c.q.len() / h.q_dim();
            for t in 0..n {
                let pos = c.pos0 + t;
                for g in 0..h.num_kv_heads {
                    let got = &run(&c, 1)[t * h.num_kv_heads + g];
                    for hh in 0..per_group {
                        let head = g * per_group + hh;
                        let q = &c.q[t * h.q_dim() + head * hd..][..hd];
                        let ctx = &c.slots[window_start(pos, window)..=pos];
                        let scores: Vec<f64> = ctx
                            .iter()
                            .map(|&s| {
                                let k = &c.k[s * kd + g * hd..][..hd];
                                q.iter()
                                    .zip(k)
                                    .map(|(a, b)| *a as f64 * b.to_f64())
                                    .sum::<f64>()
                                    * h.scale as f64
                            })
                            .collect();
                        let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                        let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                        let sum: f64 = w.iter().sum();
                        for d in 0..hd {
                            let want: f64 = ctx
                                .iter()
                                .zip(&w)
                                .map(|(&s, w)| w * c.v[s * kd + g * hd + d].to_f64())
                                .sum::<f64>()
                                / sum;
                            let x = got[hh * hd + d] as f64;
                            assert!(
                                (x - want).abs() < 1e-5,
                                "{window:?} t{t} h{head} d{d}: {x} {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn each_token_gets_the_same_bits_alone_or_with_others() {
        for window in [None, Some(20)] {
            let c = case(window);
            let groups = c.heads.num_kv_heads;
            let alone = run(&c, 1);
            let together = run(&c, 16);
            let row = c.heads.num_heads / groups * c.heads.head_dim;
            for (i, block) in together.iter().enumerate() {
                let (b, g) = (i / groups, i % groups);
                for (j, r) in block.chunks_exact(row).enumerate() {
                    assert_eq!(r, &alone[(b * 16 + j) * groups + g][..], "{window:?}");
                }
            }
        }
    }

    type Path = (
        bool,
        unsafe fn(host::ItemArgs) -> Vec<f32>,
        unsafe fn(&mut [f32]),
    );

    /// The three kernel sets give the same bits (each runs where the CPU has it: all three on
    /// AVX-512 machines such as CI's).
    #[test]
    fn every_attention_kernel_gives_the_same_bits() {
        let xs: Vec<f32> = (0..200).map(|i| -(i as f32) * 0.47 - 1e-3).collect();
        let portable: Vec<f32> = xs.iter().map(|&x| exp_canonical(x)).collect();
        for (x, e) in xs.iter().zip(&portable) {
            if *x >= -87.0 {
                assert!((e - x.exp()).abs() <= 2.5e-7 * x.exp(), "exp({x})");
            } else {
                // Clamped: a normal number no larger than exp(-87).
                assert!(e.is_normal() && *e <= 1.7e-38, "exp({x}) = {e}");
            }
        }
        for window in [None, Some(20)] {
            let c = case(window);
            let want = run(&c, 16);
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                let n = c.q.len() / c.heads.q_dim();
                let paths: [Path; 2] = [
                    (
                        has!("avx2") && has!("fma") && has!("f16c"),
                        simd::attend_item_avx2,
                        simd::exp_avx2,
                    ),
                    (has!("avx512f"), simd::attend_item_avx512, simd::exp_avx512),
                ];
                for (ok, f, exp) in paths {
                    if !ok {
                        continue;
                    }
                    let mut got = Vec::new();
                    for start in (0..n).step_by(16) {
                        for g in 0..c.heads.num_kv_heads {
                            let it = item(&c, start..(start + 16).min(n), g);
                            let args =
                                (&it, &c.q[..], c.heads.q_dim(), &c.k[..], &c.v[..], c.heads);
                            // SAFETY: the features were just checked.
                            got.push(unsafe { f(args) });
                        }
                    }
                    assert_eq!(got, want, "{window:?}");
                    let mut e = xs.clone();
                    // SAFETY: as above.
                    unsafe { exp(&mut e) };
                    assert_eq!(e, portable);
                }
            }
        }
    }
}
