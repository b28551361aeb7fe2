//! The product ([`matmul`]): a matrix's row tiles split over the thread pool, each tile's
//! tokens in groups on the kernel set the CPU runs, and the portable kernel that defines
//! every path's arithmetic.

use rayon::prelude::*;

use super::{avx2, avx512, Acts, Bits, Out, Packed, Scales, QK, ROWS, TOKENS};
// The kernel sets (`crate::cpu`): AVX-512 with VNNI, AVX2 with FMA and F16C, portable.
use crate::cpu::{int8_isa as isa, Isa};

/// `out[t][n] = sum_k w[n][k] * x[t][k]` for the quantized activations `a` (`out` is
/// `[a.t, w.n]`, overwritten). Splits the row tiles over the thread pool when the work pays
/// for it. Panics if `a` was not quantized for `w` ([`Acts::quantize_for`]) or `out` is not
/// `[a.t, w.n]`: the kernels read and write through raw pointers sized by those.
pub fn matmul(w: &Packed, a: &Acts, out: &mut [f32]) {
    assert!(
        a.fit(w),
        "activations not quantized for this {} matrix",
        w.format
    );
    assert_eq!(out.len(), a.t * w.n);
    let isa = isa();
    let work = a.t * w.n * w.k;
    // Tiles per task: at least 4, and few enough tasks to spread over the pool.
    let threads = rayon::current_num_threads().max(1);
    let per_task = (w.tiles.div_ceil(threads * 4)).max(4);
    let tasks = w.tiles.div_ceil(per_task);
    let out = Out::new(out);
    let run = |task: usize| {
        let tiles = task * per_task..((task + 1) * per_task).min(w.tiles);
        for t0 in (0..a.t).step_by(TOKENS) {
            let tn = TOKENS.min(a.t - t0);
            for ti in tiles.clone() {
                // SAFETY: `out` is `[a.t, w.n]` (checked above) and each task writes only
                // the columns of its own row tiles, so no two write the same element.
                unsafe { tile(w, a, ti, t0, tn, isa, out) };
            }
        }
    };
    if work < 1 << 18 || tasks == 1 {
        (0..tasks).for_each(run);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// `tn` tokens from `t0` against row tile `ti`: in groups of 8, 4 and 1 tokens (the kernels
/// keep a group's accumulators in registers; every token gets the same operations whatever
/// its group).
///
/// # Safety
/// `a` fits `w`, `out` is `[a.t, w.n]`, `ti < w.tiles`, `t0 + tn <= a.t`, and no other task
/// accesses this tile's columns of `out`.
pub(super) unsafe fn tile(
    w: &Packed,
    a: &Acts,
    ti: usize,
    t0: usize,
    tn: usize,
    isa: Isa,
    out: Out,
) {
    if isa == Isa::Portable {
        return portable(w, a, ti, t0, tn, out);
    }
    let mut t = t0;
    while t < t0 + tn {
        let group = match t0 + tn - t {
            8.. => 8,
            4..=7 => 4,
            _ => 1,
        };
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is what the CPU supports (checked by `crate::cpu`); the bounds are the
        // caller's.
        unsafe {
            match (isa, group) {
                (Isa::Avx512, 8) => avx512::tile::<8>(w, a, ti, t, out),
                (Isa::Avx512, 4) => avx512::tile::<4>(w, a, ti, t, out),
                (Isa::Avx512, _) => avx512::tile::<1>(w, a, ti, t, out),
                (_, 8) => avx2::tile::<8>(w, a, ti, t, out),
                (_, 4) => avx2::tile::<4>(w, a, ti, t, out),
                (_, _) => avx2::tile::<1>(w, a, ti, t, out),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        portable(w, a, ti, t, group, out);
        t += group;
    }
}

/// The arithmetic every kernel does, one lane at a time. Per block, with the block's
/// integer dot product `dot` (over 32 weights, or `dot_h` over each half of 16) and the
/// activations' scale `da`:
/// - with an offset (Q4_0, Q5_0): `acc = fma(dot - zero sum, dw * da, acc)`, where `sum` is
///   the sum of the activations' integers over the block;
/// - with a minimum per block (Q4_1, Q5_1): `acc = fma(dot, dw * da, acc); acc = fma(mw, sa,
///   acc)`, `sa` the activations' f16 `d sum` (as llama.cpp's Q8_1 blocks);
/// - K-quants with minimums: `acc = fma(dot, dw * da, acc); acc = fma(sum, mw * da, acc)`;
/// - 6 bits: `acc = fma(dot_h - 32 sum_h, dw_h * da, acc)` for `h` = 0, 1, where `sum_h` is
///   the sum of the activations' integers over the half;
/// - Q8_0: `acc = fma(dot, dw * da, acc)`;
///
/// with `dw`, `mw` from [`Packed::factors`].
///
/// # Safety
/// As [`tile`]'s.
unsafe fn portable(w: &Packed, a: &Acts, ti: usize, t0: usize, tn: usize, out: Out) {
    let mut q = [0u8; QK];
    for r in 0..ROWS {
        let row = ti * ROWS + r;
        if row >= w.n {
            break;
        }
        for t in t0..t0 + tn {
            let mut acc = 0f32;
            for b in 0..w.nb {
                w.ints(row, b, &mut q);
                let (f0, f1) = w.factors(row, b);
                let xa = &a.q[t * a.k + b * QK..][..QK];
                let (da, sa) = (a.d[t * w.nb + b], a.s[t * w.nb + b]);
                let dot = |range: std::ops::Range<usize>, signed: bool| -> i32 {
                    range
                        .map(|i| {
                            let wq = if signed {
                                q[i] as i8 as i32
                            } else {
                                q[i] as i32
                            };
                            wq * xa[i] as i32
                        })
                        .sum()
                };
                let sum = || a.s16[t * 2 * w.nb + 2 * b] + a.s16[t * 2 * w.nb + 2 * b + 1];
                match (w.bits, w.scales) {
                    (Bits::Eight, _) => {
                        acc = (dot(0..QK, true) as f32).mul_add(f0 * da, acc);
                    }
                    (_, Scales::Offset(zero)) => {
                        let s = dot(0..QK, false) - zero * sum();
                        acc = (s as f32).mul_add(f0 * da, acc);
                    }
                    (_, Scales::Super) => {
                        acc = (dot(0..QK, false) as f32).mul_add(f0 * da, acc);
                        acc = (sum() as f32).mul_add(f1 * da, acc);
                    }
                    (_, Scales::Halves) => {
                        for (h, f) in [f0, f1].into_iter().enumerate() {
                            let sum = a.s16[t * 2 * w.nb + 2 * b + h];
                            let s = dot(16 * h..16 * h + 16, false) - 32 * sum;
                            acc = (s as f32).mul_add(f * da, acc);
                        }
                    }
                    _ => {
                        acc = (dot(0..QK, false) as f32).mul_add(f0 * da, acc);
                        acc = f1.mul_add(sa, acc);
                    }
                }
            }
            *out.at(t * w.n + row) = acc;
        }
    }
}
