//! AVX2 + FMA kernels: each 64-byte tile vector is two 32-byte halves (rows 0-7, rows 8-15),
//! and a 4-byte dot product is `maddubs` (u8 x s8 pairs into i16, which cannot saturate
//! here: at most 2 x 63 x 127) followed by `madd` with ones. Integer sums are exact and the
//! float operations per output are those of the AVX-512 kernels, so the results are the same
//! bits.
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::{Acts, Bits, Out, Packed, Scales, QK, ROWS, SUPER};

#[inline(always)]
unsafe fn bcast(p: *const u8, i: usize) -> __m256i {
    _mm256_set1_epi32((p.add(4 * i) as *const i32).read_unaligned())
}

/// Sum of 4 adjacent u8 x s8 products per 32-bit lane.
#[inline(always)]
unsafe fn dot4(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

#[inline(always)]
unsafe fn half8(p: *const half::f16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// 8 bytes widened to f32, unsigned or signed.
#[inline(always)]
unsafe fn bytes8(p: *const u8, signed: bool) -> __m256 {
    let v = _mm_loadl_epi64(p as *const __m128i);
    _mm256_cvtepi32_ps(if signed {
        _mm256_cvtepi8_epi32(v)
    } else {
        _mm256_cvtepu8_epi32(v)
    })
}

#[inline(always)]
unsafe fn store(out: Out, w: &Packed, t: usize, row0: usize, v: __m256) {
    let dst = out.at(t * w.n + row0);
    if row0 + 8 <= w.n {
        _mm256_storeu_ps(dst, v);
    } else {
        let mut tmp = [0f32; 8];
        _mm256_storeu_ps(tmp.as_mut_ptr(), v);
        for (i, x) in tmp.iter().enumerate().take(w.n.saturating_sub(row0)) {
            *dst.add(i) = *x;
        }
    }
}

#[inline(always)]
unsafe fn bits_to(v: __m256i, from: u32, to: u32, mask: __m256i) -> __m256i {
    let moved = if from < to {
        _mm256_sll_epi16(v, _mm_cvtsi32_si128((to - from) as i32))
    } else {
        _mm256_srl_epi16(v, _mm_cvtsi32_si128((from - to) as i32))
    };
    _mm256_and_si256(moved, mask)
}

/// The unsigned integers of half `hf` (rows 8hf..8hf + 8) of a tile-block.
#[inline(always)]
unsafe fn unpack(w: &Packed, at: usize, hf: usize) -> [__m256i; 8] {
    let low = _mm256_set1_epi8(0x0F);
    let qs = w.qs.as_ptr().add(at * 256 + hf * 32);
    let mut v = [_mm256_setzero_si256(); 8];
    for j in 0..4 {
        let x = _mm256_loadu_si256(qs.add(j * 64) as *const __m256i);
        v[2 * j] = _mm256_and_si256(x, low);
        v[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
    }
    match w.bits {
        Bits::Five => {
            let h = _mm256_loadu_si256(w.qh.as_ptr().add(at * 64 + hf * 32) as *const __m256i);
            let mask = _mm256_set1_epi8(0x10);
            for (u, v) in v.iter_mut().enumerate() {
                *v = _mm256_or_si256(*v, bits_to(h, u as u32, 4, mask));
            }
        }
        Bits::Six => {
            let qh = w.qh.as_ptr().add(at * 128 + hf * 32);
            let h = [
                _mm256_loadu_si256(qh as *const __m256i),
                _mm256_loadu_si256(qh.add(64) as *const __m256i),
            ];
            let mask = _mm256_set1_epi8(0x30);
            for (u, v) in v.iter_mut().enumerate() {
                let from = 2 * (u as u32 % 4);
                *v = _mm256_or_si256(*v, bits_to(h[u / 4], from, 4, mask));
            }
        }
        _ => {}
    }
    v
}

#[inline(always)]
unsafe fn factors(w: &Packed, ti: usize, b: usize, hf: usize) -> (__m256, __m256) {
    let at = ti * w.nb + b;
    let sb = (ti * w.nsb() + b / SUPER) * ROWS + hf * 8;
    let lane = at * ROWS + hf * 8;
    match w.scales {
        Scales::Offset(_) => (half8(w.d.as_ptr().add(lane)), _mm256_setzero_ps()),
        Scales::Block => (half8(w.d.as_ptr().add(lane)), half8(w.m.as_ptr().add(lane))),
        Scales::Super => (
            _mm256_mul_ps(
                half8(w.d.as_ptr().add(sb)),
                bytes8(w.sc.as_ptr().add(lane), false),
            ),
            _mm256_mul_ps(
                half8(w.m.as_ptr().add(sb)),
                bytes8(w.mn.as_ptr().add(lane), false),
            ),
        ),
        Scales::Halves => {
            let d = half8(w.d.as_ptr().add(sb));
            (
                _mm256_mul_ps(d, bytes8(w.sc.as_ptr().add(2 * at * ROWS + hf * 8), true)),
                _mm256_mul_ps(
                    d,
                    bytes8(w.sc.as_ptr().add((2 * at + 1) * ROWS + hf * 8), true),
                ),
            )
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile<const T: usize>(w: &Packed, a: &Acts, ti: usize, t0: usize, out: Out) {
    for hf in 0..2 {
        let acc = match (w.bits, w.scales) {
            (Bits::Eight, _) => q8_0::<T>(w, a, ti, t0, hf),
            (Bits::Six, _) => halves::<T>(w, a, ti, t0, hf),
            (_, Scales::Offset(_)) => affine::<T, OFFSET>(w, a, ti, t0, hf),
            (_, Scales::Block) => affine::<T, MIN>(w, a, ti, t0, hf),
            (_, _) => affine::<T, SUPER_MIN>(w, a, ti, t0, hf),
        };
        for (t, v) in acc.into_iter().enumerate() {
            store(out, w, t0 + t, ti * ROWS + hf * 8, v);
        }
    }
}

const OFFSET: u8 = 0;
const MIN: u8 = 1;
const SUPER_MIN: u8 = 2;

#[inline(always)]
unsafe fn affine<const T: usize, const MODE: u8>(
    w: &Packed,
    a: &Acts,
    ti: usize,
    t0: usize,
    hf: usize,
) -> [__m256; T] {
    let nb = w.nb;
    let zero = match w.scales {
        Scales::Offset(z) => z,
        _ => 0,
    };
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let v = unpack(w, ti * nb + b, hf);
        let (dw, mw) = factors(w, ti, b, hf);
        for (t, acc) in acc.iter_mut().enumerate() {
            let tok = t0 + t;
            let xa = a.q.as_ptr().add(tok * a.k + b * QK) as *const u8;
            let mut s = _mm256_setzero_si256();
            for (u, v) in v.iter().enumerate() {
                s = _mm256_add_epi32(s, dot4(*v, bcast(xa, u)));
            }
            let da = _mm256_set1_ps(*a.d.get_unchecked(tok * nb + b));
            // The exact sum over the block (`Acts::s16`, filled only for the modes that read it).
            let sum = if MODE == MIN {
                0
            } else {
                let sums = a.s16.as_ptr().add(tok * 2 * nb + 2 * b);
                *sums + *sums.add(1)
            };
            if MODE == OFFSET {
                s = _mm256_sub_epi32(s, _mm256_set1_epi32(zero * sum));
            }
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, da), *acc);
            if MODE == MIN {
                let sa = _mm256_set1_ps(*a.s.get_unchecked(tok * nb + b));
                *acc = _mm256_fmadd_ps(mw, sa, *acc);
            } else if MODE == SUPER_MIN {
                let sum = _mm256_set1_ps(sum as f32);
                *acc = _mm256_fmadd_ps(sum, _mm256_mul_ps(mw, da), *acc);
            }
        }
    }
    acc
}

#[inline(always)]
unsafe fn halves<const T: usize>(
    w: &Packed,
    a: &Acts,
    ti: usize,
    t0: usize,
    hf: usize,
) -> [__m256; T] {
    let nb = w.nb;
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let v = unpack(w, ti * nb + b, hf);
        let (dw0, dw1) = factors(w, ti, b, hf);
        for (t, acc) in acc.iter_mut().enumerate() {
            let tok = t0 + t;
            let xa = a.q.as_ptr().add(tok * a.k + b * QK) as *const u8;
            let mut s0 = _mm256_setzero_si256();
            let mut s1 = _mm256_setzero_si256();
            for u in 0..4 {
                s0 = _mm256_add_epi32(s0, dot4(v[u], bcast(xa, u)));
                s1 = _mm256_add_epi32(s1, dot4(v[4 + u], bcast(xa, 4 + u)));
            }
            let sums = a.s16.as_ptr().add(tok * 2 * nb + 2 * b);
            let s0 = _mm256_sub_epi32(s0, _mm256_set1_epi32(32 * *sums));
            let s1 = _mm256_sub_epi32(s1, _mm256_set1_epi32(32 * *sums.add(1)));
            let da = _mm256_set1_ps(*a.d.get_unchecked(tok * nb + b));
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(dw0, da), *acc);
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_mul_ps(dw1, da), *acc);
        }
    }
    acc
}

#[inline(always)]
unsafe fn q8_0<const T: usize>(
    w: &Packed,
    a: &Acts,
    ti: usize,
    t0: usize,
    hf: usize,
) -> [__m256; T] {
    let nb = w.nb;
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let at = ti * nb + b;
        let qs = w.qs.as_ptr().add(at * 512 + hf * 32);
        let dw = half8(w.d.as_ptr().add(at * ROWS + hf * 8));
        for (t, acc) in acc.iter_mut().enumerate() {
            let tok = t0 + t;
            let xa = a.q.as_ptr().add(tok * a.k + b * QK) as *const u8;
            let mut s = _mm256_setzero_si256();
            for j in 0..8 {
                let wv = _mm256_loadu_si256(qs.add(j * 64) as *const __m256i);
                // |w| x (a with w's sign): the products w * a, without saturation
                // (|w| <= 128, |a| <= 127).
                let sa = _mm256_sign_epi8(bcast(xa, j), wv);
                s = _mm256_add_epi32(s, dot4(_mm256_abs_epi8(wv), sa));
            }
            let da = _mm256_set1_ps(*a.d.get_unchecked(tok * nb + b));
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, da), *acc);
        }
    }
    acc
}
