//! The host attention's canonical kernels: one work item (a sequence's block of query tokens
//! and a group of heads) attended tile by tile with an online softmax, generic over the inner
//! [`Kernels`] (portable here, AVX2 and AVX-512 in [`super::x86`]). Every path runs the same
//! operations in the same order: the dot products in the canonical 16-lane order, `exp` as one
//! fixed polynomial ([`exp_canonical`]), the sums in position order; hence the same bits.

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::metadata::{window_start, Heads};

/// Positions per tile.
pub(super) const TILE: usize = 32;
/// Lanes of the canonical dot product: lane `i` accumulates the products of the elements
/// `i, i + 16, ...` with fused multiply-adds, then the lanes are added pairwise, halving.
pub(super) const LANES: usize = 16;

/// The query tokens of one item: rows `rows` of the step, at positions `pos0..`, each
/// attending to `[window start, its position]` of its sequence, whose position `p` is in
/// cache block `blocks[p / block_size]`.
pub(super) struct Item<'a> {
    pub rows: std::ops::Range<usize>,
    pub pos0: usize,
    pub blocks: &'a [u32],
    pub block_size: usize,
    pub group: usize,
}

impl Item<'_> {
    /// The cache slots of positions `lo..=hi` as runs of consecutive slots (one per block the
    /// range touches): `(first slot, length)`, in position order.
    #[inline(always)]
    fn runs(&self, lo: usize, hi: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let bs = self.block_size;
        let mut pos = lo;
        std::iter::from_fn(move || {
            if pos > hi {
                return None;
            }
            let offset = pos % bs;
            let len = (bs - offset).min(hi + 1 - pos);
            let first = self.blocks[pos / bs] as usize * bs + offset;
            pos += len;
            Some((first, len))
        })
    }
}

/// The inner kernels, over a tile's key and value rows converted to f32 (`[n][hd]`, row
/// after row): the scores of a query against each key (canonical dot), `o[d] += sum_j p[j]
/// v[j][d]` in `j` order, and `exp` over a slice in place. Implementations are inlined into
/// [`attend_item`], compiled once per instruction set.
pub(super) trait Kernels {
    /// # Safety
    /// The CPU has the implementation's instructions; `keys` holds `out.len()` rows of
    /// `q.len()` (a multiple of 16 for the SIMD ones), rounded up to a multiple of 16 rows
    /// (finite values; the extra rows' scores are not written).
    unsafe fn scores(q: &[f32], keys: &[f32], out: &mut [f32]);
    /// # Safety
    /// As for `scores`, with `values` holding `p.len()` rows of `o.len()`.
    unsafe fn pv(o: &mut [f32], p: &[f32], values: &[f32]);
    /// # Safety
    /// The CPU has the implementation's instructions.
    unsafe fn exp(x: &mut [f32]);
    /// `dst[i] = src[i]` widened (exact).
    ///
    /// # Safety
    /// The CPU has the implementation's instructions; the lengths are equal (a multiple of
    /// 16 for the SIMD ones).
    unsafe fn widen(src: &[f16], dst: &mut [f32]);
    /// `s[i] *= scale`; returns the largest.
    ///
    /// # Safety
    /// The CPU has the implementation's instructions.
    unsafe fn scale_max(s: &mut [f32], scale: f32) -> f32;
    /// `s[i] = exp(s[i] - m)`; returns their sum in the canonical order (lane `i % 16`, then
    /// pairwise halving).
    ///
    /// # Safety
    /// The CPU has the implementation's instructions; `s.len() <= 32`.
    unsafe fn exp_sum(s: &mut [f32], m: f32) -> f32;
}

/// The canonical reduction of 16 lanes: lanes `i` and `i + 8` added, then `i + 4`, `i + 2`,
/// `i + 1`.
#[inline(always)]
fn halve(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0]
}

/// The canonical sum of up to 32 values: lane `i` of 16 takes `0 + s[i] (+ s[i + 16])`, then
/// lanes are added pairwise, halving.
#[inline(always)]
pub(super) fn sum_canonical(s: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for (i, v) in s.iter().enumerate() {
        acc[i % LANES] += v;
    }
    halve(acc)
}

/// The canonical dot product of two f32 rows: lane `i` of 16 accumulates the products of the
/// elements `i, i + 16, ...` with fused multiply-adds, then lanes are added pairwise, halving.
#[inline(always)]
pub(super) fn dot_canonical(q: &[f32], k: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for (i, (a, b)) in q.iter().zip(k).enumerate() {
        acc[i % LANES] = a.mul_add(*b, acc[i % LANES]);
    }
    halve(acc)
}

/// `exp(x)` for `x <= 0`, as every path computes it: `x` clamped at -87 (results stay
/// normal), `n = round(x log2 e)`, `r = x - n ln 2` in two steps, a degree-6 polynomial in
/// `r` by Horner's rule with fused multiply-adds, times `2^n`. Within 2 ulp of `exp`.
#[inline(always)]
pub(crate) fn exp_canonical(x: f32) -> f32 {
    let x = x.max(-87.0);
    let n = (x * EXP_C.log2e).round_ties_even();
    let r = n.mul_add(-EXP_C.ln2_hi, x);
    let r = n.mul_add(-EXP_C.ln2_lo, r);
    let mut p = EXP_C.c[5];
    for c in EXP_C.c[..5].iter().rev() {
        p = p.mul_add(r, *c);
    }
    let p = p.mul_add(r, 1.0);
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

pub(super) struct ExpConsts {
    pub log2e: f32,
    pub ln2_hi: f32,
    pub ln2_lo: f32,
    /// Coefficients of `r^1 .. r^6`.
    pub c: [f32; 6],
}

pub(super) const EXP_C: ExpConsts = ExpConsts {
    log2e: std::f32::consts::LOG2_E,
    ln2_hi: 0.693_145_75,
    ln2_lo: 1.428_606_8e-6,
    c: [
        1.0,
        0.5,
        0.166_666_67,
        0.041_666_668,
        0.008_333_334,
        0.001_388_889,
    ],
};

pub(super) struct Portable;

impl Kernels for Portable {
    #[inline(always)]
    unsafe fn scores(q: &[f32], keys: &[f32], out: &mut [f32]) {
        for (o, k) in out.iter_mut().zip(keys.chunks_exact(q.len())) {
            *o = dot_canonical(q, k);
        }
    }

    #[inline(always)]
    unsafe fn pv(o: &mut [f32], p: &[f32], values: &[f32]) {
        for (p, v) in p.iter().zip(values.chunks_exact(o.len())) {
            for (o, v) in o.iter_mut().zip(v) {
                *o = p.mul_add(*v, *o);
            }
        }
    }

    #[inline(always)]
    unsafe fn exp(x: &mut [f32]) {
        for x in x {
            *x = exp_canonical(*x);
        }
    }

    #[inline(always)]
    unsafe fn scale_max(s: &mut [f32], scale: f32) -> f32 {
        let mut max = f32::NEG_INFINITY;
        for s in s.iter_mut() {
            *s *= scale;
            max = max.max(*s);
        }
        max
    }

    #[inline(always)]
    unsafe fn exp_sum(s: &mut [f32], m: f32) -> f32 {
        for s in s.iter_mut() {
            *s = exp_canonical(*s - m);
        }
        sum_canonical(s)
    }

    #[inline(always)]
    unsafe fn widen(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

/// The score of a query-key dot product `dot` in a layer of `heads`: scaled, then soft-capped
/// where the layer caps. The CPU's attentions (these tiles, the paged op's reference) compute
/// exactly this; the CUDA kernel and the gathering path the same with their own `tanh`.
#[inline(always)]
pub(super) fn logit(heads: &Heads, dot: f32) -> f32 {
    let s = dot * heads.scale;
    match heads.softcap {
        Some(cap) => softcap(s, cap),
        None => s,
    }
}

/// `cap * tanh(s / cap)`, the soft-cap of attention scores, with `tanh(y) = (1 - e) / (1 +
/// e)` for `e = exp(-2 |y|)` by the canonical [`exp_canonical`] (libm's `tanh` would cost more
/// than the scores it caps). Its error is a few ulp of `cap`, below a score's own rounding at
/// the caps models use (50).
#[inline(always)]
pub(super) fn softcap(s: f32, cap: f32) -> f32 {
    let y = s / cap;
    let e = exp_canonical(-2.0 * y.abs());
    cap * ((1.0 - e) / (1.0 + e)).copysign(y)
}

/// `s[i] = softcap(s[i], cap)` (the scaled scores of a tile); returns the largest.
#[inline(always)]
fn cap_scores(s: &mut [f32], cap: f32) -> f32 {
    let mut max = f32::NEG_INFINITY;
    for s in s.iter_mut() {
        *s = softcap(*s, cap);
        max = max.max(*s);
    }
    max
}

/// What [`attend_item`] takes: the item, the step's query rows and their stride, the cache,
/// the layer's heads.
pub(super) type ItemArgs<'a> = (&'a Item<'a>, &'a [f32], usize, &'a [f16], &'a [f16], Heads);

/// Running state of one (token, head).
struct Running {
    m: f32,
    l: f32,
}

/// Attends the item's tokens for the heads of `group`; returns `[tokens][group heads][hd]`.
///
/// # Safety
/// `K` must be kernels this CPU runs, and `head_dim` a multiple of 16 unless they are the
/// portable ones.
#[inline(always)]
pub(super) unsafe fn attend_item<K: Kernels>(
    (item, q_rows, q_stride, k_cache, v_cache, heads): ItemArgs,
) -> Vec<f32> {
    let (hd, kd) = (heads.head_dim, heads.num_kv_heads * heads.head_dim);
    let per_group = heads.num_heads / heads.num_kv_heads;
    let off = item.group * hd;
    let n = item.rows.len();
    let mut acc = vec![0f32; n * per_group * hd];
    let mut run: Vec<Running> = (0..n * per_group)
        .map(|_| Running {
            m: f32::NEG_INFINITY,
            l: 0.0,
        })
        .collect();
    let span = |t: usize| {
        let pos = item.pos0 + t;
        (window_start(pos, heads.window), pos)
    };
    let (first, _) = span(0);
    let (_, last) = span(n - 1);
    let mut s = [0f32; TILE];
    // Two tiles of rows: groups of 16 keys from any row of the first stay in bounds.
    let mut keys = vec![0f32; 2 * TILE * hd];
    let mut values = vec![0f32; TILE * hd];
    for tile in first / TILE..=last / TILE {
        // The tile's rows this item reads, converted once for all its tokens and heads.
        let lo = first.max(tile * TILE);
        let hi = last.min(tile * TILE + TILE - 1);
        let mut j = 0;
        for (first, len) in item.runs(lo, hi) {
            for slot in first..first + len {
                let at = slot * kd + off;
                K::widen(&k_cache[at..at + hd], &mut keys[j * hd..(j + 1) * hd]);
                K::widen(&v_cache[at..at + hd], &mut values[j * hd..(j + 1) * hd]);
                j += 1;
            }
        }
        for t in 0..n {
            let (ws, pos) = span(t);
            let (a, b) = (ws.max(lo), pos.min(hi));
            if a > b {
                continue;
            }
            let (ka, kb) = ((a - lo) * hd, (b + 1 - lo) * hd);
            let q_t = &q_rows[(item.rows.start + t) * q_stride..];
            for h in 0..per_group {
                let qh = (item.group * per_group + h) * hd;
                let q = &q_t[qh..qh + hd];
                let s = &mut s[..b + 1 - a];
                // The key rows after `kb` are read but not used (the SIMD kernels compute
                // whole groups of 16 keys).
                K::scores(q, &keys[ka..], s);
                let mut max = K::scale_max(s, heads.scale);
                if let Some(cap) = heads.softcap {
                    max = cap_scores(s, cap);
                }
                let r = &mut run[t * per_group + h];
                let m = r.m.max(max);
                let mut alpha = [r.m - m];
                K::exp(&mut alpha);
                let sum = K::exp_sum(s, m);
                r.l = r.l.mul_add(alpha[0], sum);
                r.m = m;
                let o = &mut acc[(t * per_group + h) * hd..][..hd];
                for o in o.iter_mut() {
                    *o *= alpha[0];
                }
                K::pv(o, s, &values[ka..kb]);
            }
        }
    }
    for (o, r) in acc.chunks_exact_mut(hd).zip(&run) {
        let inv = 1.0 / r.l;
        o.iter_mut().for_each(|x| *x *= inv);
    }
    acc
}
