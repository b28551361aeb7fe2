//! The host attention's x86 kernels: the canonical lanes of [`super::kernels`] on AVX2 + F16C
//! and on AVX-512, the same operations in the same order (hence the same bits).

use std::arch::x86_64::*;

use half::f16;

use super::kernels::{attend_item, exp_canonical, ItemArgs, Kernels, Portable, EXP_C};

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
        super::kernels::sum_canonical(s)
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
