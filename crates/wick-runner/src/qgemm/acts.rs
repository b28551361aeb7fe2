//! The activations' side ([`Acts`]): a step's inputs quantized per token the way llama.cpp
//! quantizes them for each weight type, on the widest instructions the CPU has (the same
//! bits on every path).

use half::f16;
use rayon::prelude::*;

use super::{Packed, Scales, QK, SUPER};
// The kernel sets (`crate::cpu`): AVX-512 with VNNI, AVX2 with FMA and F16C, portable.
use crate::cpu::{int8_isa as isa, Isa};

/// Activations of a step, quantized per token in blocks of 32: `q = round(x / d)` (ties to
/// even),
/// `d = max|x| / 127` (rounded to f16, as llama.cpp stores it), `s = d * sum(q)`.
#[derive(Default)]
pub struct Acts {
    pub(super) t: usize,
    pub(super) k: usize,
    /// Quantized in blocks of 256 with one scale (for the K-quants), not in blocks of 32.
    pub(super) super_blocks: bool,
    pub(super) q: Vec<i8>,
    pub(super) d: Vec<f32>,
    pub(super) s: Vec<f32>,
    /// The integers' exact sum over each half block of 16 (for the kernels with offsets,
    /// K-quant minimums and 6 bits; see [`Acts::quantize_for`]).
    pub(super) s16: Vec<i32>,
}

impl Acts {
    /// Quantizes `x` (`[t, w.k]`) the way llama.cpp does for `w`'s type: blocks of 32 with
    /// f16 scales ([`Acts::quantize`]), or, for the K-quants, blocks of 256 with an f32 scale
    /// ([`Acts::quantize_super`]).
    /// The exact integer sums per 16 ([`Acts::s16`]) are computed only for the layouts
    /// whose kernels read them (not Q4_1, Q5_1, Q8_0).
    pub fn quantize_for(&mut self, w: &Packed, x: &[f32], t: usize) {
        assert_eq!(x.len(), t * w.k, "activations are not [{t}, {}]", w.k);
        match w.scales {
            Scales::Super | Scales::Halves => self.quantize_super(x, t, w.k),
            _ => self.quantize(x, t, w.k),
        }
        if w.reads_sums() {
            self.sum_halves();
        }
    }

    /// Whether these activations were quantized for `w`'s layout (see [`matmul`]).
    pub(super) fn fit(&self, w: &Packed) -> bool {
        self.k == w.k
            && self.q.len() == self.t * self.k
            && self.d.len() == self.t * w.nb
            && self.super_blocks == w.super_blocks()
            && (self.super_blocks || self.s.len() == self.t * w.nb)
            && (!w.reads_sums() || self.s16.len() == self.t * self.k / 16)
    }

    /// llama.cpp's Q8_K: per block of 256, `d = -max / 127` (f32) where `max` is the value of
    /// largest magnitude, `q = min(127, round(x / d))` (ties to even). Each block of 32 gets
    /// its super-block's `d`, so the kernels read it as they read Q8_0's. One source for every
    /// CPU, compiled per instruction set (its operations are exact or correctly rounded, so
    /// the bits are the same).
    fn quantize_super(&mut self, x: &[f32], t: usize, k: usize) {
        assert_eq!(k % (QK * SUPER), 0);
        self.reset(x, t, k);
        self.super_blocks = true;
        let big = QK * SUPER;
        let one = |((x, q), d): ((&[f32], &mut [i8]), &mut [f32])| quantize_super_block(x, q, d);
        if t * k >= 1 << 15 {
            x.par_chunks_exact(big)
                .zip(self.q.par_chunks_exact_mut(big))
                .zip(self.d.par_chunks_exact_mut(SUPER))
                .for_each(one);
        } else {
            x.chunks_exact(big)
                .zip(self.q.chunks_exact_mut(big))
                .zip(self.d.chunks_exact_mut(SUPER))
                .for_each(one);
        }
    }

    /// Quantizes `x` (`[t, k]`, row-major), reusing this buffer's memory. Each token's
    /// blocks depend on that token alone; long inputs are split over the thread pool.
    fn quantize(&mut self, x: &[f32], t: usize, k: usize) {
        let nb = self.reset(x, t, k);
        type Row<'a> = (((&'a [f32], &'a mut [i8]), &'a mut [f32]), &'a mut [f32]);
        let one = |(((x, q), d), s): Row| quantize_row(x, q, d, s);
        if t * k >= 1 << 15 {
            x.par_chunks_exact(k)
                .zip(self.q.par_chunks_exact_mut(k))
                .zip(self.d.par_chunks_exact_mut(nb))
                .zip(self.s.par_chunks_exact_mut(nb))
                .for_each(one);
        } else {
            x.chunks_exact(k)
                .zip(self.q.chunks_exact_mut(k))
                .zip(self.d.chunks_exact_mut(nb))
                .zip(self.s.chunks_exact_mut(nb))
                .for_each(one);
        }
    }

    /// Sizes the buffers for `t` tokens of `k`; returns the blocks of 32 per token.
    fn reset(&mut self, x: &[f32], t: usize, k: usize) -> usize {
        assert_eq!(x.len(), t * k);
        assert_eq!(k % QK, 0);
        let nb = k / QK;
        self.t = t;
        self.k = k;
        self.super_blocks = false;
        self.q.resize(t * k, 0);
        self.d.resize(t * nb, 0.0);
        self.s.resize(t * nb, 0.0);
        nb
    }

    fn sum_halves(&mut self) {
        self.s16.resize(self.t * self.k / 16, 0);
        for (sum, q) in self.s16.iter_mut().zip(self.q.chunks_exact(16)) {
            *sum = q.iter().map(|&v| v as i32).sum();
        }
    }
}

/// One Q8_K block (see [`Acts::quantize_super`]), compiled for the widest instructions the CPU
/// has (rounding is then one instruction, not a call); the operations, hence the results, are
/// the same on every path.
fn quantize_super_block(x: &[f32], q: &mut [i8], d: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match isa() {
        // SAFETY: AVX-512 F/BW are present (checked by `crate::cpu`).
        Isa::Avx512 => return unsafe { quantize_super_block_avx512(x, q, d) },
        // SAFETY: AVX2 and FMA are present (checked by `crate::cpu`).
        Isa::Avx2 => return unsafe { quantize_super_block_avx2(x, q, d) },
        Isa::Portable => {}
    }
    quantize_super_block_generic(x, q, d)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_super_block_avx512(x: &[f32], q: &mut [i8], d: &mut [f32]) {
    quantize_super_block_generic(x, q, d)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_super_block_avx2(x: &[f32], q: &mut [i8], d: &mut [f32]) {
    quantize_super_block_generic(x, q, d)
}

#[inline(always)]
fn quantize_super_block_generic(x: &[f32], q: &mut [i8], d: &mut [f32]) {
    // The first value of the largest magnitude (as llama.cpp picks it), in two passes the
    // compiler vectorizes.
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let max = x.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0);
    if amax == 0.0 {
        q.fill(0);
        d.fill(0.0);
        return;
    }
    let iscale = -127.0 / max;
    for (q, &v) in q.iter_mut().zip(x) {
        *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
    }
    d.fill(1.0 / iscale);
}

/// One token's blocks, with AVX-512 or AVX2 where the CPU has them; the results are the same.
fn quantize_row(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match isa() {
        // SAFETY: AVX-512 F/BW are present (checked by `crate::cpu`).
        Isa::Avx512 => return unsafe { quantize_row_avx512(x, q, d, s) },
        // SAFETY: AVX2 and FMA are present (checked by `crate::cpu`).
        Isa::Avx2 => return unsafe { quantize_row_avx2(x, q, d, s) },
        Isa::Portable => {}
    }
    quantize_row_generic(x, q, d, s)
}

/// The generic source compiled for AVX2, where the compiler vectorizes the rounding.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_row_avx2(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    quantize_row_generic(x, q, d, s)
}

/// The same operations as [`quantize_row_generic`], 16 lanes at a time (max and the integer
/// sum are exact, the rounding is to nearest-even in both), so the results are identical.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_row_avx512(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    use std::arch::x86_64::*;
    const ROUND: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    for (b, (d, s)) in d.iter_mut().zip(s.iter_mut()).enumerate() {
        let p = x.as_ptr().add(b * QK);
        let (x0, x1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        let scale = amax / 127.0;
        let id = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
        let i0 = _mm512_cvtps_epi32(_mm512_roundscale_ps::<ROUND>(_mm512_mul_ps(x0, id)));
        let i1 = _mm512_cvtps_epi32(_mm512_roundscale_ps::<ROUND>(_mm512_mul_ps(x1, id)));
        let (b0, b1) = (_mm512_cvtepi32_epi8(i0), _mm512_cvtepi32_epi8(i1));
        let qp = q.as_mut_ptr().add(b * QK) as *mut __m128i;
        _mm_storeu_si128(qp, b0);
        _mm_storeu_si128(qp.add(1), b1);
        let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
        *d = f16::from_f32(scale).to_f32();
        *s = f16::from_f32(scale * sum as f32).to_f32();
    }
}

#[inline(always)]
fn quantize_row_generic(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    for (((xb, qb), d), s) in x
        .chunks_exact(QK)
        .zip(q.chunks_exact_mut(QK))
        .zip(d.iter_mut())
        .zip(s.iter_mut())
    {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let id = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in qb.iter_mut().zip(xb) {
            let r = (v * id).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        *d = f16::from_f32(scale).to_f32();
        *s = f16::from_f32(scale * sum as f32).to_f32();
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn the_avx512_quantizer_gives_the_generic_bits() {
        if crate::cpu::int8_isa_within(crate::SimdLimit::Widest) != Isa::Avx512 {
            return;
        }
        let k = 256;
        let x: Vec<f32> = (0..k)
            .map(|i| match i % 7 {
                0 => 0.0,
                1 => 1e-30,
                // exact halves after scaling, to exercise ties
                2 => (i as f32) * 0.5 - 40.0,
                _ => ((i * 7919 % 1013) as f32 / 97.0 - 5.0) * if i % 2 == 0 { 1.0 } else { -3.0 },
            })
            .collect();
        let nb = k / QK;
        let (mut q1, mut d1, mut s1) = (vec![0i8; k], vec![0f32; nb], vec![0f32; nb]);
        let (mut q2, mut d2, mut s2) = (vec![0i8; k], vec![0f32; nb], vec![0f32; nb]);
        quantize_row_generic(&x, &mut q1, &mut d1, &mut s1);
        // SAFETY: checked above.
        unsafe { quantize_row_avx512(&x, &mut q2, &mut d2, &mut s2) };
        assert_eq!(q1, q2);
        assert_eq!(d1, d2);
        assert_eq!(s1, s2);
        let zeros = vec![0f32; QK];
        let (mut q, mut d, mut s) = (vec![1i8; QK], vec![1f32], vec![1f32]);
        unsafe { quantize_row_avx512(&zeros, &mut q, &mut d, &mut s) };
        // The Q8_0 kernel's unsigned operand, q + 128, is then exactly 128.
        assert!(q.iter().all(|&v| v == 0 && (v as u8 ^ 0x80) == 128));
        assert_eq!((d[0], s[0]), (0.0, 0.0));
    }
}
