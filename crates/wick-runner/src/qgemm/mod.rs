//! Quantized matrix products on the CPU: GGUF weights of every common type (Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0, Q3_K, Q4_K, Q5_K, Q6_K) against activations quantized to 8-bit blocks of
//! 32 (as llama.cpp does), with AVX-512 VNNI integer dot products where the CPU has them,
//! AVX2 where it has those, and a portable path with the same arithmetic elsewhere.
//!
//! The weights are repacked once at load into tiles of 16 output rows. For each block of 32
//! inputs a tile holds 4 (or, for Q8_0, 8) 64-byte vectors whose 32-bit lane `r` holds 4
//! consecutive weights of row `r`, so one `vpdpbusd` with 4 broadcast activation bytes adds
//! 64 products into 16 row sums. Types of 5 and 6 bits keep their high bits in a plane of 1 or
//! 2 vectors beside the 4-bit one (so the tiles take about the file's size), merged in
//! registers; K-quants keep their 6-bit sub-block scales as bytes and their super-block
//! scales as f16. A tile's weights are unpacked once per block and used for up to [`TOKENS`]
//! tokens, so a step's cost per token falls as the batch grows.
//!
//! Every output `y[t][n]` is the sum over blocks, in block order, of a fixed sequence of fused
//! multiply-adds per block (see [`portable`]): the same operations in the same order whatever
//! the number of tokens in the step, the tile or the thread that computes it. Output is
//! therefore independent of the batch, and the AVX2 and portable paths give bit-identical
//! results.

use half::f16;
use rayon::prelude::*;

use crate::quant::WeightType;
use crate::{Result, RunnerError};

mod avx2;
mod avx512;
mod pack;
#[cfg(test)]
mod tests;

const QK: usize = 32;
const ROWS: usize = 16;
/// Blocks of 32 in a K-quant super-block.
const SUPER: usize = 8;
/// Tokens computed per pass over a tile's weights.
const TOKENS: usize = 8;

/// How a tile stores its integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bits {
    /// Unsigned, 4 bits: the nibble vectors alone.
    Four,
    /// Unsigned, 5 bits: a 64-byte plane of fifth bits besides.
    Five,
    /// Unsigned, 6 bits (`q - 32` signed): a 128-byte plane of the top two bits.
    Six,
    /// Signed bytes (Q8_0).
    Eight,
}

impl Bits {
    /// Bytes of high bits per (tile, block).
    fn high_bytes(self) -> usize {
        match self {
            Bits::Five => 64,
            Bits::Six => 128,
            _ => 0,
        }
    }

    fn tile_bytes(self) -> usize {
        if self == Bits::Eight {
            ROWS * QK
        } else {
            ROWS * QK / 2
        }
    }
}

/// Where a block's factors come from (see [`pack::Scale`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scales {
    /// f16 `d` per (tile, block, row); the weights are `q - zero` (Q4_0, Q5_0; Q8_0's are
    /// signed).
    Offset(i32),
    /// f16 `d` and `m` per (tile, block, row).
    Block,
    /// f16 `d` and `m` per (tile, super-block, row); `sc` and `mn` bytes per (tile, block, row).
    Super,
    /// f16 `d` per (tile, super-block, row); an i8 `sc` per (tile, block, half, row).
    Halves,
}

/// A `[n, k]` weight matrix repacked into row tiles (see the module comment). Built only by
/// [`Packed::new`], which checks the data against the shape: the kernels' raw-pointer reads
/// rely on every field agreeing with `n` and `k`, so none is public.
pub struct Packed {
    format: WeightType,
    n: usize,
    k: usize,
    nb: usize,
    tiles: usize,
    bits: Bits,
    scales: Scales,
    /// Per (tile, block): 256 bytes of nibbles, or 512 of i8 (Q8_0).
    qs: Vec<u8>,
    /// Per (tile, block): the high-bit plane (`Bits::high_bytes`).
    qh: Vec<u8>,
    d: Vec<f16>,
    m: Vec<f16>,
    sc: Vec<u8>,
    mn: Vec<u8>,
    /// Q8_0: 128 x the sum of each block's weights (the activations are shifted by 128).
    wsum: Vec<i32>,
}

/// Every type with packed kernels (tests and benchmarks iterate it).
pub const TYPES: [WeightType; 9] = [
    WeightType::Q4_0,
    WeightType::Q4_1,
    WeightType::Q5_0,
    WeightType::Q5_1,
    WeightType::Q8_0,
    WeightType::Q3K,
    WeightType::Q4K,
    WeightType::Q5K,
    WeightType::Q6K,
];

impl Packed {
    pub fn format(&self) -> WeightType {
        self.format
    }

    /// Output rows.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inputs per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Whether `ty` has packed kernels.
    pub fn supports(ty: WeightType) -> bool {
        pack::layout(ty).is_some()
    }

    /// Whether the activations are quantized per 256 for this layout (the K-quants).
    fn super_blocks(&self) -> bool {
        matches!(self.scales, Scales::Super | Scales::Halves)
    }

    /// Whether the kernels read the activations' sums per 16 ([`Acts::s16`]).
    fn reads_sums(&self) -> bool {
        matches!(self.scales, Scales::Offset(z) if z != 0) || self.super_blocks()
    }

    /// Super-blocks per row (K-quants; 0 for the others, whose scales are per block).
    fn nsb(&self) -> usize {
        match self.scales {
            Scales::Block | Scales::Offset(_) => 0,
            _ => self.nb / SUPER,
        }
    }

    /// Repacks GGUF blocks (`n` rows of `k` weights each, in file order).
    pub fn new(format: WeightType, data: &[u8], n: usize, k: usize) -> Result<Self> {
        let Some((bits, scales)) = pack::layout(format) else {
            return Err(RunnerError::Step(format!("no packed kernel for {format}")));
        };
        let (elems, block_bytes) = format.block();
        let expected = n
            .checked_mul(k / elems)
            .and_then(|b| b.checked_mul(block_bytes));
        if n == 0 || k == 0 || !k.is_multiple_of(elems) || expected != Some(data.len()) {
            return Err(RunnerError::Step(format!(
                "malformed {format} matrix {n}x{k} ({} bytes)",
                data.len()
            )));
        }
        let nb = k / QK;
        let tiles = n.div_ceil(ROWS);
        let per_block = tiles * nb * ROWS;
        let per_super = tiles * (nb / SUPER) * ROWS;
        let (d, m, sc, mn) = match (scales, bits) {
            (Scales::Offset(_), _) => (per_block, 0, 0, 0),
            (Scales::Block, _) => (per_block, per_block, 0, 0),
            (Scales::Super, _) => (per_super, per_super, per_block, per_block),
            (Scales::Halves, _) => (per_super, 0, 2 * per_block, 0),
        };
        let mut p = Packed {
            format,
            n,
            k,
            nb,
            tiles,
            bits,
            scales,
            qs: vec![0; tiles * nb * bits.tile_bytes()],
            qh: vec![0; tiles * nb * bits.high_bytes()],
            d: vec![f16::ZERO; d],
            m: vec![f16::ZERO; m],
            sc: vec![0; sc],
            mn: vec![0; mn],
            wsum: vec![0; if bits == Bits::Eight { per_block } else { 0 }],
        };
        let row_bytes = (k / elems) * block_bytes;
        let mut q = vec![0u8; k];
        let mut factors = Vec::with_capacity(nb);
        for (row, bytes) in data.chunks_exact(row_bytes).enumerate() {
            factors.clear();
            for (blk, q) in bytes
                .chunks_exact(block_bytes)
                .zip(q.chunks_exact_mut(elems))
            {
                pack::decode(format, blk, q, &mut factors);
            }
            for (b, (q, s)) in q.chunks_exact(QK).zip(&factors).enumerate() {
                p.put(row, b, q, *s);
            }
        }
        Ok(p)
    }

    /// Bytes this matrix takes in memory.
    pub fn bytes(&self) -> usize {
        self.qs.len()
            + self.qh.len()
            + 2 * (self.d.len() + self.m.len())
            + self.sc.len()
            + self.mn.len()
            + 4 * self.wsum.len()
    }

    /// Row `row` dequantized into `out` (`k` values): an embedding lookup from a tied output
    /// layer, without a second copy of the table.
    pub fn row(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.n, "row {row} of a {}-row matrix", self.n);
        let mut q = [0u8; QK];
        for (b, y) in out.chunks_exact_mut(QK).enumerate().take(self.nb) {
            self.ints(row, b, &mut q);
            let (f0, f1) = self.factors(row, b);
            match (self.bits, self.scales) {
                (Bits::Eight, _) => {
                    for (y, &q) in y.iter_mut().zip(&q) {
                        *y = (q as i8) as f32 * f0;
                    }
                }
                (_, Scales::Halves) => {
                    for (i, (y, &q)) in y.iter_mut().zip(&q).enumerate() {
                        let f = if i < 16 { f0 } else { f1 };
                        *y = (q as i32 - 32) as f32 * f;
                    }
                }
                (_, Scales::Offset(zero)) => {
                    for (y, &q) in y.iter_mut().zip(&q) {
                        *y = (q as i32 - zero) as f32 * f0;
                    }
                }
                _ => {
                    for (y, &q) in y.iter_mut().zip(&q) {
                        *y = q as f32 * f0 + f1;
                    }
                }
            }
        }
    }
}

/// Random but well-formed GGUF blocks of `ty` for an `[n, k]` matrix: random integers and
/// sub-block scales, f16 scales of a realistic size (tests and benchmarks).
#[doc(hidden)]
pub fn random_blocks(ty: WeightType, n: usize, k: usize, seed: &mut u64) -> Vec<u8> {
    let mut next = || {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    };
    let (elems, bytes) = ty.block();
    // (offset, is a minimum) of each f16 in a block.
    let halves: &[(usize, bool)] = match ty {
        WeightType::Q4_1 | WeightType::Q5_1 => &[(0, false), (2, true)],
        WeightType::Q4K | WeightType::Q5K | WeightType::Q2K => &[(0, false), (2, false)],
        WeightType::Q6K => &[(208, false)],
        WeightType::Q3K => &[(108, false)],
        _ => &[(0, false)],
    };
    let mut data = Vec::with_capacity(n * k / elems * bytes);
    for _ in 0..n * k / elems {
        let start = data.len();
        data.extend((0..bytes).map(|_| next() as u8));
        for &(at, min) in halves {
            let v = (next() % 1000) as f32 / 50_000.0 + 0.001;
            let v = if min {
                -v * 2.5
            } else {
                v / if elems > QK { 8.0 } else { 1.0 }
            };
            data[start + at..start + at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
        }
    }
    data
}

/// Activations of a step, quantized per token in blocks of 32: `q = round(x / d)` (ties to
/// even),
/// `d = max|x| / 127` (rounded to f16, as llama.cpp stores it), `s = d * sum(q)`.
#[derive(Default)]
pub struct Acts {
    t: usize,
    k: usize,
    /// Quantized in blocks of 256 with one scale (for the K-quants), not in blocks of 32.
    super_blocks: bool,
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    /// The integers' exact sum over each half block of 16 (for the kernels with offsets,
    /// K-quant minimums and 6 bits; see [`Acts::quantize_for`]).
    s16: Vec<i32>,
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

    /// Tokens quantized.
    pub fn tokens(&self) -> usize {
        self.t
    }

    /// Whether these activations were quantized for `w`'s layout (see [`matmul`]).
    fn fit(&self, w: &Packed) -> bool {
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

/// The output of a [`matmul`], shared by its tasks as a raw pointer: each writes its own
/// columns, and no task holds a `&mut` over the whole buffer (overlapping mutable
/// references would be undefined behaviour even with disjoint writes).
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: the tasks that share an `Out` write disjoint elements (see `matmul`), and the
// buffer outlives them (it is borrowed mutably for the whole call).
unsafe impl Sync for Out {}
unsafe impl Send for Out {}

impl Out {
    fn new(out: &mut [f32]) -> Self {
        Out {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        }
    }

    /// A pointer to element `i`, in bounds.
    ///
    /// # Safety
    /// No other task may access the elements written through it.
    #[inline(always)]
    unsafe fn at(self, i: usize) -> *mut f32 {
        debug_assert!(i < self.len);
        self.ptr.add(i)
    }
}

/// `tn` tokens from `t0` against row tile `ti`: in groups of 8, 4 and 1 tokens (the kernels
/// keep a group's accumulators in registers; every token gets the same operations whatever
/// its group).
///
/// # Safety
/// `a` fits `w`, `out` is `[a.t, w.n]`, `ti < w.tiles`, `t0 + tn <= a.t`, and no other task
/// accesses this tile's columns of `out`.
unsafe fn tile(w: &Packed, a: &Acts, ti: usize, t0: usize, tn: usize, isa: Isa, out: Out) {
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

#[cfg(all(test, target_arch = "x86_64"))]
mod quantize_tests {
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
