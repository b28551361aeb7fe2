//! AVX-512 VNNI kernels: a tile's 16 rows in the 16 lanes of a vector.
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::{Acts, Bits, Out, Packed, Scales, QK, ROWS, SUPER};

/// 16 f16 values widened to f32.
#[inline(always)]
unsafe fn half16(p: *const half::f16) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
}

/// 16 bytes widened to f32, unsigned or signed.
#[inline(always)]
unsafe fn bytes16(p: *const u8, signed: bool) -> __m512 {
    let v = _mm_loadu_si128(p as *const __m128i);
    _mm512_cvtepi32_ps(if signed {
        _mm512_cvtepi8_epi32(v)
    } else {
        _mm512_cvtepu8_epi32(v)
    })
}

#[inline(always)]
unsafe fn bcast(p: *const u8, i: usize) -> __m512i {
    _mm512_set1_epi32((p.add(4 * i) as *const i32).read_unaligned())
}

#[inline(always)]
unsafe fn store(out: Out, w: &Packed, t: usize, ti: usize, v: __m512) {
    let col = ti * ROWS;
    let left = w.n - col;
    let dst = out.at(t * w.n + col);
    if left >= ROWS {
        _mm512_storeu_ps(dst, v);
    } else {
        _mm512_mask_storeu_ps(dst, ((1u32 << left) - 1) as __mmask16, v);
    }
}

/// Moves bit `from` of every byte to bit `to` (bits of other bytes land outside `mask`).
#[inline(always)]
unsafe fn bits_to(v: __m512i, from: u32, to: u32, mask: __m512i) -> __m512i {
    let moved = if from < to {
        _mm512_sll_epi16(v, _mm_cvtsi32_si128((to - from) as i32))
    } else {
        _mm512_srl_epi16(v, _mm_cvtsi32_si128((from - to) as i32))
    };
    _mm512_and_si512(moved, mask)
}

/// The unsigned integers of tile `ti`, block `b`: vector `u` holds weights `4u..4u + 4` of
/// each row.
#[inline(always)]
unsafe fn unpack(w: &Packed, at: usize) -> [__m512i; 8] {
    let low = _mm512_set1_epi8(0x0F);
    let qs = w.qs.as_ptr().add(at * 256);
    let mut v = [_mm512_setzero_si512(); 8];
    for j in 0..4 {
        let x = _mm512_loadu_si512(qs.add(j * 64) as *const _);
        v[2 * j] = _mm512_and_si512(x, low);
        v[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(x, 4), low);
    }
    match w.bits {
        Bits::Five => {
            let h = _mm512_loadu_si512(w.qh.as_ptr().add(at * 64) as *const _);
            let mask = _mm512_set1_epi8(0x10);
            for (u, v) in v.iter_mut().enumerate() {
                *v = _mm512_or_si512(*v, bits_to(h, u as u32, 4, mask));
            }
        }
        Bits::Six => {
            let qh = w.qh.as_ptr().add(at * 128);
            let h = [
                _mm512_loadu_si512(qh as *const _),
                _mm512_loadu_si512(qh.add(64) as *const _),
            ];
            let mask = _mm512_set1_epi8(0x30);
            for (u, v) in v.iter_mut().enumerate() {
                let from = 2 * (u as u32 % 4);
                *v = _mm512_or_si512(*v, bits_to(h[u / 4], from, 4, mask));
            }
        }
        _ => {}
    }
    v
}

/// The block's factors for the 16 rows, as [`Packed::factors`] computes them.
#[inline(always)]
unsafe fn factors(w: &Packed, ti: usize, b: usize) -> (__m512, __m512) {
    let at = ti * w.nb + b;
    let sb = (ti * w.nsb() + b / SUPER) * ROWS;
    match w.scales {
        Scales::Offset(_) => (half16(w.d.as_ptr().add(at * ROWS)), _mm512_setzero_ps()),
        Scales::Block => (
            half16(w.d.as_ptr().add(at * ROWS)),
            half16(w.m.as_ptr().add(at * ROWS)),
        ),
        Scales::Super => (
            _mm512_mul_ps(
                half16(w.d.as_ptr().add(sb)),
                bytes16(w.sc.as_ptr().add(at * ROWS), false),
            ),
            _mm512_mul_ps(
                half16(w.m.as_ptr().add(sb)),
                bytes16(w.mn.as_ptr().add(at * ROWS), false),
            ),
        ),
        Scales::Halves => {
            let d = half16(w.d.as_ptr().add(sb));
            (
                _mm512_mul_ps(d, bytes16(w.sc.as_ptr().add(2 * at * ROWS), true)),
                _mm512_mul_ps(d, bytes16(w.sc.as_ptr().add((2 * at + 1) * ROWS), true)),
            )
        }
    }
}

/// `T` tokens from `t0` against tile `ti` (a compile-time count, so the accumulators stay
/// in registers).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn tile<const T: usize>(w: &Packed, a: &Acts, ti: usize, t0: usize, out: Out) {
    let acc = match (w.bits, w.scales) {
        (Bits::Eight, _) => q8_0::<T>(w, a, ti, t0),
        (Bits::Six, _) => halves::<T>(w, a, ti, t0),
        (_, Scales::Offset(_)) => affine::<T, OFFSET>(w, a, ti, t0),
        (_, Scales::Block) => affine::<T, MIN>(w, a, ti, t0),
        (_, _) => affine::<T, SUPER_MIN>(w, a, ti, t0),
    };
    for (t, v) in acc.into_iter().enumerate() {
        store(out, w, t0 + t, ti, v);
    }
}

/// The affine kernels' second term (see `super::portable`).
const OFFSET: u8 = 0;
const MIN: u8 = 1;
const SUPER_MIN: u8 = 2;

#[inline(always)]
unsafe fn affine<const T: usize, const MODE: u8>(
    w: &Packed,
    a: &Acts,
    ti: usize,
    t0: usize,
) -> [__m512; T] {
    let nb = w.nb;
    let zero = match w.scales {
        Scales::Offset(z) => z,
        _ => 0,
    };
    let mut acc = [_mm512_setzero_ps(); T];
    for b in 0..nb {
        let v = unpack(w, ti * nb + b);
        let (dw, mw) = factors(w, ti, b);
        for (t, acc) in acc.iter_mut().enumerate() {
            let tok = t0 + t;
            let xa = a.q.as_ptr().add(tok * a.k + b * QK) as *const u8;
            // Two independent chains of dot products, joined at the end (integer sums: the
            // order does not change the result).
            let mut s0 = _mm512_setzero_si512();
            let mut s1 = _mm512_setzero_si512();
            for j in 0..4 {
                s0 = _mm512_dpbusd_epi32(s0, v[2 * j], bcast(xa, 2 * j));
                s1 = _mm512_dpbusd_epi32(s1, v[2 * j + 1], bcast(xa, 2 * j + 1));
            }
            let mut s = _mm512_add_epi32(s0, s1);
            let da = _mm512_set1_ps(*a.d.get_unchecked(tok * nb + b));
            // The exact sum over the block (`Acts::s16`, filled only for the modes that read it).
            let sum = if MODE == MIN {
                0
            } else {
                let sums = a.s16.as_ptr().add(tok * 2 * nb + 2 * b);
                *sums + *sums.add(1)
            };
            if MODE == OFFSET {
                s = _mm512_sub_epi32(s, _mm512_set1_epi32(zero * sum));
            }
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, da), *acc);
            if MODE == MIN {
                let sa = _mm512_set1_ps(*a.s.get_unchecked(tok * nb + b));
                *acc = _mm512_fmadd_ps(mw, sa, *acc);
            } else if MODE == SUPER_MIN {
                let sum = _mm512_set1_ps(sum as f32);
                *acc = _mm512_fmadd_ps(sum, _mm512_mul_ps(mw, da), *acc);
            }
        }
    }
    acc
}

#[inline(always)]
unsafe fn halves<const T: usize>(w: &Packed, a: &Acts, ti: usize, t0: usize) -> [__m512; T] {
    let nb = w.nb;
    let mut acc = [_mm512_setzero_ps(); T];
    for b in 0..nb {
        let v = unpack(w, ti * nb + b);
        let (dw0, dw1) = factors(w, ti, b);
        for (t, acc) in acc.iter_mut().enumerate() {
            let tok = t0 + t;
            let xa = a.q.as_ptr().add(tok * a.k + b * QK) as *const u8;
            let mut s0 = _mm512_setzero_si512();
            let mut s1 = _mm512_setzero_si512();
            for u in 0..4 {
                s0 = _mm512_dpbusd_epi32(s0, v[u], bcast(xa, u));
                s1 = _mm512_dpbusd_epi32(s1, v[4 + u], bcast(xa, 4 + u));
            }
            let sums = a.s16.as_ptr().add(tok * 2 * nb + 2 * b);
            let s0 = _mm512_sub_epi32(s0, _mm512_set1_epi32(32 * *sums));
            let s1 = _mm512_sub_epi32(s1, _mm512_set1_epi32(32 * *sums.add(1)));
            let da = _mm512_set1_ps(*a.d.get_unchecked(tok * nb + b));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_mul_ps(dw0, da), *acc);
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_mul_ps(dw1, da), *acc);
        }
    }
    acc
}

#[inline(always)]
unsafe fn q8_0<const T: usize>(w: &Packed, a: &Acts, ti: usize, t0: usize) -> [__m512; T] {
    let nb = w.nb;
    let flip = _mm512_set1_epi8(-128);
    let mut acc = [_mm512_setzero_ps(); T];
    for b in 0..nb {
        let at = ti * nb + b;
        let qs = w.qs.as_ptr().add(at * 512);
        let mut wv = [_mm512_setzero_si512(); 8];
        for (j, v) in wv.iter_mut().enumerate() {
            *v = _mm512_loadu_si512(qs.add(j * 64) as *const _);
        }
        let dw = half16(w.d.as_ptr().add(at * ROWS));
        let ws = _mm512_loadu_si512(w.wsum.as_ptr().add(at * ROWS) as *const _);
        for (t, acc) in acc.iter_mut().enumerate() {
            let tok = t0 + t;
            let xa = a.q.as_ptr().add(tok * a.k + b * QK) as *const u8;
            // `vpdpbusd` takes one unsigned operand: the activations plus 128 (their sign bit
            // flipped), corrected by the weights' sums below.
            let unsigned = |i| _mm512_xor_si512(bcast(xa, i), flip);
            let mut s0 = _mm512_setzero_si512();
            let mut s1 = _mm512_setzero_si512();
            for j in 0..4 {
                s0 = _mm512_dpbusd_epi32(s0, unsigned(2 * j), wv[2 * j]);
                s1 = _mm512_dpbusd_epi32(s1, unsigned(2 * j + 1), wv[2 * j + 1]);
            }
            let s = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), ws);
            let da = _mm512_set1_ps(*a.d.get_unchecked(tok * nb + b));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, da), *acc);
        }
    }
    acc
}
