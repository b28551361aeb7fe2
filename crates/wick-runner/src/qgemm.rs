//! Quantized matrix products on the CPU: GGUF Q4_1 and Q8_0 weights against activations
//! quantized to 8-bit blocks of 32 (as llama.cpp does), with AVX-512 VNNI integer dot
//! products where the CPU has them and a portable path with the same arithmetic elsewhere.
//!
//! The weights are repacked once at load into tiles of 16 output rows: for each block of 32
//! inputs a tile is 4 (Q4_1) or 8 (Q8_0) 64-byte vectors whose 32-bit lane `r` holds 4
//! consecutive weights of row `r`, so one `vpdpbusd` with 4 broadcast activation bytes adds
//! 64 products into 16 row sums. A tile's weights are loaded once per block and used for up
//! to [`TOKENS`] tokens, so a step's cost per token falls as the batch grows.
//!
//! Every output `y[t][n]` is the sum over blocks, in block order, of
//! `(d_w * d_a) * dot_i32 (+ m_w * s_a for Q4_1)`, computed with fused multiply-adds: the same
//! operations in the same order whatever the number of tokens in the step, the tile or the
//! thread that computes it. Output is therefore independent of the batch, and the portable
//! path gives bit-identical results.

use half::f16;
use rayon::prelude::*;

use crate::{Result, RunnerError};

const QK: usize = 32;
const ROWS: usize = 16;
/// Tokens computed per pass over a tile's weights.
const TOKENS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Q4_1,
    Q8_0,
}

/// A `[n, k]` weight matrix repacked into row tiles (see the module comment).
pub struct Packed {
    pub format: Format,
    pub n: usize,
    pub k: usize,
    nb: usize,
    tiles: usize,
    /// Q4_1: 256 bytes of nibbles per (tile, block); Q8_0: 512 bytes of i8.
    qs: Vec<u8>,
    /// Per (tile, block), 16 lanes: the weights' scales `d` (f16, as stored in the file).
    d: Vec<f16>,
    /// Q4_1: the blocks' minimums `m` (f16).
    m: Vec<f16>,
    /// Q8_0: 128 x the sum of each block's weights (the activations are shifted by 128).
    wsum: Vec<i32>,
}

impl Packed {
    fn tile_bytes(format: Format) -> usize {
        match format {
            Format::Q4_1 => ROWS * QK / 2,
            Format::Q8_0 => ROWS * QK,
        }
    }

    /// Repacks GGUF blocks (`n` rows of `k / 32` blocks each, in file order).
    pub fn new(format: Format, data: &[u8], n: usize, k: usize) -> Result<Self> {
        let block_bytes = match format {
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
        };
        if !k.is_multiple_of(QK) || data.len() != n * (k / QK) * block_bytes {
            return Err(RunnerError::Step(format!(
                "malformed {format:?} matrix {n}x{k} ({} bytes)",
                data.len()
            )));
        }
        let nb = k / QK;
        let tiles = n.div_ceil(ROWS);
        let tb = Self::tile_bytes(format);
        let mut p = Packed {
            format,
            n,
            k,
            nb,
            tiles,
            qs: vec![0; tiles * nb * tb],
            d: vec![f16::ZERO; tiles * nb * ROWS],
            m: vec![
                f16::ZERO;
                if format == Format::Q4_1 {
                    tiles * nb * ROWS
                } else {
                    0
                }
            ],
            wsum: vec![
                0;
                if format == Format::Q8_0 {
                    tiles * nb * ROWS
                } else {
                    0
                }
            ],
        };
        let mut vals = [0u8; QK];
        for row in 0..n {
            let (ti, r) = (row / ROWS, row % ROWS);
            for b in 0..nb {
                let blk = &data[(row * nb + b) * block_bytes..][..block_bytes];
                let tb_at = (ti * nb + b) * tb;
                let lane = (ti * nb + b) * ROWS + r;
                p.d[lane] = f16::from_le_bytes([blk[0], blk[1]]);
                match format {
                    Format::Q4_1 => {
                        p.m[lane] = f16::from_le_bytes([blk[2], blk[3]]);
                        for (e, v) in vals.iter_mut().enumerate() {
                            let byte = blk[4 + e % 16];
                            *v = if e < 16 { byte & 0x0F } else { byte >> 4 };
                        }
                        // Vector j (0..4), lane r, byte kk: low nibble = weight 8j + kk,
                        // high nibble = weight 8j + 4 + kk.
                        for j in 0..4 {
                            for kk in 0..4 {
                                p.qs[tb_at + j * 64 + r * 4 + kk] =
                                    vals[8 * j + kk] | (vals[8 * j + 4 + kk] << 4);
                            }
                        }
                    }
                    Format::Q8_0 => {
                        let q = &blk[2..34];
                        let mut sum = 0i32;
                        // Vector j (0..8), lane r, byte kk = weight 4j + kk.
                        for j in 0..8 {
                            for kk in 0..4 {
                                let w = q[4 * j + kk];
                                p.qs[tb_at + j * 64 + r * 4 + kk] = w;
                                sum += w as i8 as i32;
                            }
                        }
                        p.wsum[lane] = 128 * sum;
                    }
                }
            }
        }
        Ok(p)
    }
}

impl Packed {
    /// Bytes this matrix takes in memory.
    pub fn bytes(&self) -> usize {
        self.qs.len() + 2 * (self.d.len() + self.m.len()) + 4 * self.wsum.len()
    }

    /// Row `row` dequantized into `out` (`k` values): an embedding lookup from a tied output
    /// layer, without a second copy of the table.
    pub fn row(&self, row: usize, out: &mut [f32]) {
        let (ti, r) = (row / ROWS, row % ROWS);
        let tb = Self::tile_bytes(self.format);
        for (b, y) in out.chunks_exact_mut(QK).enumerate().take(self.nb) {
            let qs = &self.qs[(ti * self.nb + b) * tb..][..tb];
            let lane = (ti * self.nb + b) * ROWS + r;
            let d = self.d[lane].to_f32();
            match self.format {
                Format::Q4_1 => {
                    let m = self.m[lane].to_f32();
                    for j in 0..4 {
                        for kk in 0..4 {
                            let byte = qs[j * 64 + r * 4 + kk];
                            y[8 * j + kk] = (byte & 0x0F) as f32 * d + m;
                            y[8 * j + 4 + kk] = (byte >> 4) as f32 * d + m;
                        }
                    }
                }
                Format::Q8_0 => {
                    for j in 0..8 {
                        for kk in 0..4 {
                            y[4 * j + kk] = (qs[j * 64 + r * 4 + kk] as i8) as f32 * d;
                        }
                    }
                }
            }
        }
    }
}

/// Activations of a step, quantized per token in blocks of 32: `q = round(x / d)` (ties to
/// even),
/// `d = max|x| / 127` (rounded to f16, as llama.cpp stores it), `s = d * sum(q)`.
#[derive(Default)]
pub struct Acts {
    pub t: usize,
    pub k: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl Acts {
    /// Quantizes `x` (`[t, k]`, row-major), reusing this buffer's memory. Each token's
    /// blocks depend on that token alone; long inputs are split over the thread pool.
    pub fn quantize(&mut self, x: &[f32], t: usize, k: usize) {
        debug_assert_eq!(x.len(), t * k);
        debug_assert_eq!(k % QK, 0);
        let nb = k / QK;
        self.t = t;
        self.k = k;
        self.q.resize(t * k, 0);
        self.d.resize(t * nb, 0.0);
        self.s.resize(t * nb, 0.0);
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
}

/// One token's blocks, with AVX-512 or AVX2 where the CPU has them; the results are the same.
fn quantize_row(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match isa() {
        // SAFETY: AVX-512 F/BW are present (checked in `has_vnni`).
        Isa::Avx512Vnni => return unsafe { quantize_row_avx512(x, q, d, s) },
        // SAFETY: AVX2 and FMA are present (checked in `isa`).
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

/// The widest kernels this CPU runs: AVX-512 VNNI, else AVX2 with FMA, else portable code.
/// `WICK_NO_AVX512=1` skips the first, `WICK_NO_SIMD=1` both (for tests and comparisons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Avx512Vnni,
    Avx2,
    Portable,
}

fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            if std::env::var_os("WICK_NO_SIMD").is_some() {
                Isa::Portable
            } else if has_vnni() {
                Isa::Avx512Vnni
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                Isa::Avx2
            } else {
                Isa::Portable
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Isa::Portable
    }
}

fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::env::var_os("WICK_NO_AVX512").is_none()
                && std::env::var_os("WICK_NO_SIMD").is_none()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[t][n] = sum_k w[n][k] * x[t][k]` for the quantized activations `a` (`out` is
/// `[a.t, w.n]`, overwritten). Splits the row tiles over the thread pool when the work pays
/// for it.
pub fn matmul(w: &Packed, a: &Acts, out: &mut [f32]) {
    assert_eq!(a.k, w.k, "activations and weights disagree on k");
    assert_eq!(out.len(), a.t * w.n);
    let isa = isa();
    let work = a.t * w.n * w.k;
    // Tiles per task: at least 4, and few enough tasks to spread over the pool.
    let threads = rayon::current_num_threads().max(1);
    let per_task = (w.tiles.div_ceil(threads * 4)).max(4);
    let tasks = w.tiles.div_ceil(per_task);
    let run = |task: usize, out: &mut [f32]| {
        let tiles = task * per_task..((task + 1) * per_task).min(w.tiles);
        for t0 in (0..a.t).step_by(TOKENS) {
            let tn = TOKENS.min(a.t - t0);
            for ti in tiles.clone() {
                tile(w, a, ti, t0, tn, isa, out);
            }
        }
    };
    if work < 1 << 18 || tasks == 1 {
        for task in 0..tasks {
            run(task, out);
        }
    } else {
        // Each task writes its own columns of `out`; a raw pointer shares the buffer.
        let ptr = SyncPtr(out.as_mut_ptr());
        let len = out.len();
        (0..tasks).into_par_iter().for_each(|task| {
            let p = &ptr;
            // SAFETY: tasks write disjoint column ranges (their own row tiles) of `out`,
            // which outlives the parallel loop.
            let out = unsafe { std::slice::from_raw_parts_mut(p.0, len) };
            run(task, out);
        });
    }
}

struct SyncPtr(*mut f32);
// SAFETY: used only to hand disjoint parts of one buffer to scoped parallel tasks.
unsafe impl Sync for SyncPtr {}
unsafe impl Send for SyncPtr {}

/// `tn` tokens from `t0` against row tile `ti`: in groups of 8, 4 and 1 tokens (the kernels
/// keep a group's accumulators in registers; every token gets the same operations whatever
/// its group).
fn tile(w: &Packed, a: &Acts, ti: usize, t0: usize, tn: usize, isa: Isa, out: &mut [f32]) {
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
        // SAFETY: `isa` is what the CPU supports (checked in `isa`).
        unsafe {
            match (isa, w.format, group) {
                (Isa::Avx512Vnni, Format::Q4_1, 8) => x86::q4_1::<8>(w, a, ti, t, out),
                (Isa::Avx512Vnni, Format::Q4_1, 4) => x86::q4_1::<4>(w, a, ti, t, out),
                (Isa::Avx512Vnni, Format::Q4_1, _) => x86::q4_1::<1>(w, a, ti, t, out),
                (Isa::Avx512Vnni, Format::Q8_0, 8) => x86::q8_0::<8>(w, a, ti, t, out),
                (Isa::Avx512Vnni, Format::Q8_0, 4) => x86::q8_0::<4>(w, a, ti, t, out),
                (Isa::Avx512Vnni, Format::Q8_0, _) => x86::q8_0::<1>(w, a, ti, t, out),
                (_, Format::Q4_1, 8) => avx2::q4_1::<8>(w, a, ti, t, out),
                (_, Format::Q4_1, 4) => avx2::q4_1::<4>(w, a, ti, t, out),
                (_, Format::Q4_1, _) => avx2::q4_1::<1>(w, a, ti, t, out),
                (_, Format::Q8_0, 8) => avx2::q8_0::<8>(w, a, ti, t, out),
                (_, Format::Q8_0, 4) => avx2::q8_0::<4>(w, a, ti, t, out),
                (_, Format::Q8_0, _) => avx2::q8_0::<1>(w, a, ti, t, out),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        portable(w, a, ti, t, group, out);
        t += group;
    }
}

/// The same arithmetic as the SIMD kernels, one lane at a time.
fn portable(w: &Packed, a: &Acts, ti: usize, t0: usize, tn: usize, out: &mut [f32]) {
    let tb = Packed::tile_bytes(w.format);
    for t in t0..t0 + tn {
        for r in 0..ROWS {
            let row = ti * ROWS + r;
            if row >= w.n {
                break;
            }
            let mut acc = 0f32;
            for b in 0..w.nb {
                let qs = &w.qs[(ti * w.nb + b) * tb..][..tb];
                let lane = (ti * w.nb + b) * ROWS + r;
                let xa = &a.q[t * a.k + b * QK..][..QK];
                let (da, sa) = (a.d[t * w.nb + b], a.s[t * w.nb + b]);
                match w.format {
                    Format::Q4_1 => {
                        let mut dot = 0i32;
                        for j in 0..4 {
                            for kk in 0..4 {
                                let byte = qs[j * 64 + r * 4 + kk];
                                dot += (byte & 0x0F) as i32 * xa[8 * j + kk] as i32;
                                dot += (byte >> 4) as i32 * xa[8 * j + 4 + kk] as i32;
                            }
                        }
                        acc = (dot as f32).mul_add(w.d[lane].to_f32() * da, acc);
                        acc = w.m[lane].to_f32().mul_add(sa, acc);
                    }
                    Format::Q8_0 => {
                        // The exact integer sum the SIMD kernels reach by other routes.
                        let mut dot = 0i32;
                        for j in 0..8 {
                            for kk in 0..4 {
                                dot +=
                                    (qs[j * 64 + r * 4 + kk] as i8 as i32) * xa[4 * j + kk] as i32;
                            }
                        }
                        acc = (dot as f32).mul_add(w.d[lane].to_f32() * da, acc);
                    }
                }
            }
            out[t * w.n + row] = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Acts, Packed, QK, ROWS};

    /// 16 f16 values widened to f32.
    #[inline(always)]
    unsafe fn half16(p: *const half::f16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }

    #[inline(always)]
    unsafe fn bcast(p: *const u8, i: usize) -> __m512i {
        _mm512_set1_epi32((p.add(4 * i) as *const i32).read_unaligned())
    }

    #[inline(always)]
    unsafe fn store(out: &mut [f32], w: &Packed, t: usize, ti: usize, v: __m512) {
        let col = ti * ROWS;
        let left = w.n - col;
        let dst = out.as_mut_ptr().add(t * w.n + col);
        if left >= ROWS {
            _mm512_storeu_ps(dst, v);
        } else {
            _mm512_mask_storeu_ps(dst, ((1u32 << left) - 1) as __mmask16, v);
        }
    }

    /// `T` tokens (a compile-time count, so the accumulators stay in registers).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn q4_1<const T: usize>(
        w: &Packed,
        a: &Acts,
        ti: usize,
        t0: usize,
        out: &mut [f32],
    ) {
        let nb = w.nb;
        let mask = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); T];
        for b in 0..nb {
            let at = ti * nb + b;
            let qs = w.qs.as_ptr().add(at * 256);
            let mut lo = [_mm512_setzero_si512(); 4];
            let mut hi = [_mm512_setzero_si512(); 4];
            for j in 0..4 {
                let v = _mm512_loadu_si512(qs.add(j * 64) as *const _);
                lo[j] = _mm512_and_si512(v, mask);
                hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
            }
            let dw = half16(w.d.as_ptr().add(at * ROWS));
            let mw = half16(w.m.as_ptr().add(at * ROWS));
            for (t, acc) in acc.iter_mut().enumerate() {
                let tok = t0 + t;
                let xa = a.q.as_ptr().add(tok * a.k + b * QK) as *const u8;
                // Two independent chains of dot products, joined at the end (integer sums:
                // the order does not change the result).
                let mut s0 = _mm512_setzero_si512();
                let mut s1 = _mm512_setzero_si512();
                for j in 0..4 {
                    s0 = _mm512_dpbusd_epi32(s0, lo[j], bcast(xa, 2 * j));
                    s1 = _mm512_dpbusd_epi32(s1, hi[j], bcast(xa, 2 * j + 1));
                }
                let s = _mm512_add_epi32(s0, s1);
                let da = _mm512_set1_ps(*a.d.get_unchecked(tok * nb + b));
                let sa = _mm512_set1_ps(*a.s.get_unchecked(tok * nb + b));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, da), *acc);
                *acc = _mm512_fmadd_ps(mw, sa, *acc);
            }
        }
        for (t, v) in acc.into_iter().enumerate() {
            store(out, w, t0 + t, ti, v);
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn q8_0<const T: usize>(
        w: &Packed,
        a: &Acts,
        ti: usize,
        t0: usize,
        out: &mut [f32],
    ) {
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
                // `vpdpbusd` takes one unsigned operand: the activations plus 128 (their sign
                // bit flipped), corrected by the weights' sums below.
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
        for (t, v) in acc.into_iter().enumerate() {
            store(out, w, t0 + t, ti, v);
        }
    }
}

/// AVX2 + FMA: each 64-byte tile vector is two 32-byte halves (rows 0-7, rows 8-15), and a
/// 4-byte dot product is `maddubs` (u8 x s8 pairs into i16, which cannot saturate here)
/// followed by `madd` with ones. Integer sums are exact and the float operations per output
/// are those of the AVX-512 kernels, so the results are the same bits.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Acts, Packed, QK, ROWS};

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

    #[inline(always)]
    unsafe fn store(out: &mut [f32], w: &Packed, t: usize, row0: usize, v: __m256) {
        let dst = out.as_mut_ptr().add(t * w.n + row0);
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

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_1<const T: usize>(
        w: &Packed,
        a: &Acts,
        ti: usize,
        t0: usize,
        out: &mut [f32],
    ) {
        let nb = w.nb;
        let mask = _mm256_set1_epi8(0x0F);
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); T];
            for b in 0..nb {
                let at = ti * nb + b;
                let qs = w.qs.as_ptr().add(at * 256 + half * 32);
                let dw = half8(w.d.as_ptr().add(at * ROWS + half * 8));
                let mw = half8(w.m.as_ptr().add(at * ROWS + half * 8));
                for (t, acc) in acc.iter_mut().enumerate() {
                    let tok = t0 + t;
                    let xa = a.q.as_ptr().add(tok * a.k + b * QK) as *const u8;
                    let mut s = _mm256_setzero_si256();
                    for j in 0..4 {
                        let v = _mm256_loadu_si256(qs.add(j * 64) as *const __m256i);
                        let lo = _mm256_and_si256(v, mask);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                        s = _mm256_add_epi32(s, dot4(lo, bcast(xa, 2 * j)));
                        s = _mm256_add_epi32(s, dot4(hi, bcast(xa, 2 * j + 1)));
                    }
                    let da = _mm256_set1_ps(*a.d.get_unchecked(tok * nb + b));
                    let sa = _mm256_set1_ps(*a.s.get_unchecked(tok * nb + b));
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, da), *acc);
                    *acc = _mm256_fmadd_ps(mw, sa, *acc);
                }
            }
            for (t, v) in acc.into_iter().enumerate() {
                store(out, w, t0 + t, ti * ROWS + half * 8, v);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q8_0<const T: usize>(
        w: &Packed,
        a: &Acts,
        ti: usize,
        t0: usize,
        out: &mut [f32],
    ) {
        let nb = w.nb;
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); T];
            for b in 0..nb {
                let at = ti * nb + b;
                let qs = w.qs.as_ptr().add(at * 512 + half * 32);
                let dw = half8(w.d.as_ptr().add(at * ROWS + half * 8));
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
            for (t, v) in acc.into_iter().enumerate() {
                store(out, w, t0 + t, ti * ROWS + half * 8, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    }

    fn random_blocks(format: Format, n: usize, k: usize, seed: &mut u64) -> Vec<u8> {
        let mut data = Vec::new();
        for _ in 0..n * k / QK {
            let d = f16::from_f32((lcg(seed) % 1000) as f32 / 50_000.0 + 0.001);
            data.extend_from_slice(&d.to_le_bytes());
            match format {
                Format::Q4_1 => {
                    let m = f16::from_f32(-((lcg(seed) % 1000) as f32) / 20_000.0);
                    data.extend_from_slice(&m.to_le_bytes());
                    data.extend((0..16).map(|_| lcg(seed) as u8));
                }
                Format::Q8_0 => data.extend((0..32).map(|_| lcg(seed) as u8)),
            }
        }
        data
    }

    /// Dequantized weights, `[n, k]`.
    fn dequantize(format: Format, data: &[u8], n: usize, k: usize) -> Vec<f32> {
        let mut w = Vec::with_capacity(n * k);
        let bytes = if format == Format::Q4_1 { 20 } else { 34 };
        for blk in data.chunks_exact(bytes) {
            let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            match format {
                Format::Q4_1 => {
                    let m = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                    for e in 0..32 {
                        let b = blk[4 + e % 16];
                        let q = if e < 16 { b & 15 } else { b >> 4 };
                        w.push(d * q as f32 + m);
                    }
                }
                Format::Q8_0 => w.extend(blk[2..].iter().map(|&q| d * (q as i8) as f32)),
            }
        }
        w
    }

    fn activations(t: usize, k: usize, seed: &mut u64) -> Vec<f32> {
        (0..t * k)
            .map(|_| (lcg(seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    fn run(w: &Packed, x: &[f32], t: usize) -> Vec<f32> {
        let mut a = Acts::default();
        a.quantize(x, t, w.k);
        let mut out = vec![f32::NAN; t * w.n];
        matmul(w, &a, &mut out);
        out
    }

    #[test]
    fn products_match_the_dequantized_weights() {
        for format in [Format::Q4_1, Format::Q8_0] {
            let (n, k, t) = (40, 96, 11); // a partial tile, and 11 = 8 + 3 tokens
            let mut seed = 7;
            let data = random_blocks(format, n, k, &mut seed);
            let w = Packed::new(format, &data, n, k).unwrap();
            let dense = dequantize(format, &data, n, k);
            let x = activations(t, k, &mut seed);
            let y = run(&w, &x, t);
            for ti in 0..t {
                for r in 0..n {
                    let want: f32 = (0..k).map(|i| dense[r * k + i] * x[ti * k + i]).sum();
                    let got = y[ti * n + r];
                    // The activations' 8-bit quantization: about 0.5% of the products' scale.
                    let scale: f32 = (0..k)
                        .map(|i| (dense[r * k + i] * x[ti * k + i]).abs())
                        .sum();
                    assert!(
                        (got - want).abs() <= 0.01 * scale + 1e-4,
                        "{format:?} t{ti} r{r}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn rows_dequantize_as_the_file_blocks() {
        for format in [Format::Q4_1, Format::Q8_0] {
            let (n, k) = (40, 96);
            let mut seed = 9;
            let data = random_blocks(format, n, k, &mut seed);
            let w = Packed::new(format, &data, n, k).unwrap();
            let dense = dequantize(format, &data, n, k);
            let mut row = vec![0f32; k];
            for r in [0, 15, 16, 39] {
                w.row(r, &mut row);
                assert_eq!(row, dense[r * k..(r + 1) * k], "{format:?} row {r}");
            }
        }
    }

    #[test]
    fn each_token_gets_the_same_bits_alone_or_in_any_batch() {
        for format in [Format::Q4_1, Format::Q8_0] {
            let (n, k) = (64, 576);
            let mut seed = 3;
            let data = random_blocks(format, n, k, &mut seed);
            let w = Packed::new(format, &data, n, k).unwrap();
            let x = activations(19, k, &mut seed);
            let all = run(&w, &x, 19);
            for t in [0, 5, 8, 18] {
                let alone = run(&w, &x[t * k..(t + 1) * k], 1);
                assert_eq!(alone, all[t * n..(t + 1) * n], "{format:?} token {t}");
            }
            let four = run(&w, &x[4 * k..8 * k], 4);
            assert_eq!(four, all[4 * n..8 * n]);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_path_gives_the_same_bits() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        for format in [Format::Q4_1, Format::Q8_0] {
            let (n, k, t) = (44, 128, 11); // a partial tile (44 = 2 x 16 + 12), 8 + 3 tokens
            let mut seed = 5;
            let data = random_blocks(format, n, k, &mut seed);
            let w = Packed::new(format, &data, n, k).unwrap();
            let x = activations(t, k, &mut seed);
            let mut a = Acts::default();
            a.quantize(&x, t, k);
            let (mut fast, mut slow) = (vec![0f32; t * n], vec![0f32; t * n]);
            for ti in 0..w.tiles {
                for t0 in (0..t).step_by(TOKENS) {
                    let tn = TOKENS.min(t - t0);
                    tile(&w, &a, ti, t0, tn, Isa::Avx2, &mut fast);
                    portable(&w, &a, ti, t0, tn, &mut slow);
                }
            }
            assert_eq!(fast, slow, "{format:?}");
        }
    }

    #[test]
    fn the_portable_path_gives_the_same_bits() {
        for format in [Format::Q4_1, Format::Q8_0] {
            let (n, k, t) = (48, 128, 10);
            let mut seed = 11;
            let data = random_blocks(format, n, k, &mut seed);
            let w = Packed::new(format, &data, n, k).unwrap();
            let x = activations(t, k, &mut seed);
            let fast = run(&w, &x, t);
            let mut a = Acts::default();
            a.quantize(&x, t, k);
            let mut slow = vec![0f32; t * n];
            for ti in 0..w.tiles {
                for t0 in (0..t).step_by(TOKENS) {
                    portable(&w, &a, ti, t0, TOKENS.min(t - t0), &mut slow);
                }
            }
            assert_eq!(fast, slow, "{format:?}");
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod quantize_tests {
    use super::*;

    #[test]
    fn the_avx512_quantizer_gives_the_generic_bits() {
        if !has_vnni() {
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
