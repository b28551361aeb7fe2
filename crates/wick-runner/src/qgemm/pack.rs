//! The packed weight matrix ([`Packed`]): how each type is laid out in the tiles, the
//! repacking of a GGUF row's blocks (per block of 32 weights, 32 unsigned integers and the
//! block's scales, see [`Scale`]) into them, and reading a row back.

use half::f16;

use super::{Bits, Scales, QK, ROWS, SUPER};
use crate::quant::{k4_scale_min, WeightType};
use crate::{Result, RunnerError};

/// A `[n, k]` weight matrix repacked into row tiles (see the module comment). Built only by
/// [`Packed::new`], which checks the data against the shape: the kernels' raw-pointer reads
/// rely on every field agreeing with `n` and `k`, so none is public.
pub struct Packed {
    pub(super) format: WeightType,
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) nb: usize,
    pub(super) tiles: usize,
    pub(super) bits: Bits,
    pub(super) scales: Scales,
    /// Per (tile, block): 256 bytes of nibbles, or 512 of i8 (Q8_0).
    pub(super) qs: Vec<u8>,
    /// Per (tile, block): the high-bit plane (`Bits::high_bytes`).
    pub(super) qh: Vec<u8>,
    pub(super) d: Vec<f16>,
    pub(super) m: Vec<f16>,
    pub(super) sc: Vec<u8>,
    pub(super) mn: Vec<u8>,
    /// Q8_0: 128 x the sum of each block's weights (the activations are shifted by 128).
    pub(super) wsum: Vec<i32>,
}

/// Every type with packed kernels (tests and benchmarks iterate it).
#[cfg(any(test, feature = "testing"))]
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
        layout(ty).is_some()
    }

    /// Whether the activations are quantized per 256 for this layout (the K-quants).
    pub(super) fn super_blocks(&self) -> bool {
        matches!(self.scales, Scales::Super | Scales::Halves)
    }

    /// Whether the kernels read the activations' sums per 16 ([`Acts::s16`]).
    pub(super) fn reads_sums(&self) -> bool {
        matches!(self.scales, Scales::Offset(z) if z != 0) || self.super_blocks()
    }

    /// Super-blocks per row (K-quants; 0 for the others, whose scales are per block).
    pub(super) fn nsb(&self) -> usize {
        match self.scales {
            Scales::Block | Scales::Offset(_) => 0,
            _ => self.nb / SUPER,
        }
    }

    /// Repacks GGUF blocks (`n` rows of `k` weights each, in file order).
    pub fn new(format: WeightType, data: &[u8], n: usize, k: usize) -> Result<Self> {
        let Some((bits, scales)) = layout(format) else {
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
                decode(format, blk, q, &mut factors);
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
#[cfg(any(test, feature = "testing"))]
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

/// The scales of one block of 32 weights, `q` its unsigned integers.
#[derive(Debug, Clone, Copy)]
pub(super) enum Scale {
    /// `w = d q + m` (Q4_1, Q5_1).
    Affine { d: f16, m: f16 },
    /// `w = (d sc) q + (m mn)`, `d` and `m` (minus the file's `dmin`) per super-block.
    Super { d: f16, m: f16, sc: u8, mn: u8 },
    /// `w = (d sc[h]) (q - 32)` for the half `h` (16 weights) of the block.
    Halves { d: f16, sc: [i8; 2] },
    /// `w = d (q - zero)` (Q4_0, Q5_0), or `d q` with `q` signed (Q8_0).
    Plain { d: f16 },
}

/// How each weight type is laid out in the tiles.
pub(super) fn layout(ty: WeightType) -> Option<(Bits, Scales)> {
    Some(match ty {
        WeightType::Q4_0 => (Bits::Four, Scales::Offset(8)),
        WeightType::Q5_0 => (Bits::Five, Scales::Offset(16)),
        WeightType::Q4_1 => (Bits::Four, Scales::Block),
        WeightType::Q5_1 => (Bits::Five, Scales::Block),
        WeightType::Q8_0 => (Bits::Eight, Scales::Offset(0)),
        WeightType::Q4K => (Bits::Four, Scales::Super),
        WeightType::Q5K => (Bits::Five, Scales::Super),
        WeightType::Q3K | WeightType::Q6K => (Bits::Six, Scales::Halves),
        _ => return None,
    })
}

fn half(b: &[u8], at: usize) -> f16 {
    f16::from_le_bytes([b[at], b[at + 1]])
}

/// Decodes one file block of `ty` (32 or 256 weights) into `q` and one [`Scale`] per 32.
pub(super) fn decode(ty: WeightType, b: &[u8], q: &mut [u8], scales: &mut Vec<Scale>) {
    match ty {
        WeightType::Q4_0 | WeightType::Q4_1 => {
            let d = half(b, 0);
            let (m, at) = match ty {
                WeightType::Q4_0 => (None, 2),
                _ => (Some(half(b, 2)), 4),
            };
            for (j, &x) in b[at..at + 16].iter().enumerate() {
                q[j] = x & 0x0F;
                q[j + 16] = x >> 4;
            }
            scales.push(match m {
                Some(m) => Scale::Affine { d, m },
                None => Scale::Plain { d },
            });
        }
        WeightType::Q5_0 | WeightType::Q5_1 => {
            let d = half(b, 0);
            let (m, at) = match ty {
                WeightType::Q5_0 => (None, 2),
                _ => (Some(half(b, 2)), 4),
            };
            let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            for (j, &x) in b[at + 4..at + 20].iter().enumerate() {
                q[j] = (x & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
                q[j + 16] = (x >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            }
            scales.push(match m {
                Some(m) => Scale::Affine { d, m },
                None => Scale::Plain { d },
            });
        }
        WeightType::Q8_0 => {
            q.copy_from_slice(&b[2..34]);
            scales.push(Scale::Plain { d: half(b, 0) });
        }
        WeightType::Q4K | WeightType::Q5K => {
            let (d, m) = (half(b, 0), -half(b, 2));
            let sc = &b[4..16];
            let (qh, qs) = match ty {
                WeightType::Q5K => (Some(&b[16..48]), &b[48..176]),
                _ => (None, &b[16..144]),
            };
            for j in 0..4 {
                for (l, &x) in qs[j * 32..j * 32 + 32].iter().enumerate() {
                    let (mut lo, mut hi) = (x & 0x0F, x >> 4);
                    if let Some(qh) = qh {
                        lo |= ((qh[l] >> (2 * j)) & 1) << 4;
                        hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
                    }
                    q[j * 64 + l] = lo;
                    q[j * 64 + 32 + l] = hi;
                }
                for s in [2 * j, 2 * j + 1] {
                    let (sc, mn) = k4_scale_min(s, sc);
                    scales.push(Scale::Super { d, m, sc, mn });
                }
            }
        }
        WeightType::Q6K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = half(b, 208);
            for n in 0..2 {
                let (ql, qh) = (&ql[n * 64..], &qh[n * 32..]);
                for l in 0..32 {
                    let e = n * 128 + l;
                    q[e] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
                    q[e + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
                    q[e + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    q[e + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
            for blk in 0..8 {
                let sc = [sc[2 * blk] as i8, sc[2 * blk + 1] as i8];
                scales.push(Scale::Halves { d, sc });
            }
        }
        WeightType::Q3K => {
            let (hm, qs) = (&b[0..32], &b[32..96]);
            let sc = crate::quant::q3k_scales(&b[96..108]);
            let d = half(b, 108);
            for n in 0..2 {
                for j in 0..4 {
                    let bit = 1u8 << (n * 4 + j);
                    for i in 0..32 {
                        let low = (qs[n * 32 + i] >> (2 * j)) & 3;
                        // `low - 4` unless the high bit is set, plus 32.
                        let v = if hm[i] & bit != 0 { low + 32 } else { low + 28 };
                        q[n * 128 + j * 32 + i] = v;
                    }
                }
            }
            for blk in 0..8 {
                let s = |g: usize| (sc[g] as i32 - 32) as i8;
                scales.push(Scale::Halves {
                    d,
                    sc: [s(2 * blk), s(2 * blk + 1)],
                });
            }
        }
        _ => unreachable!("layout() admits only the types above"),
    }
}

impl Packed {
    /// Writes block `b` of row `row` (its integers `q`, its scales `s`) into the tiles.
    pub(super) fn put(&mut self, row: usize, b: usize, q: &[u8], s: Scale) {
        let (ti, r) = (row / ROWS, row % ROWS);
        let at = ti * self.nb + b;
        let lane = at * ROWS + r;
        let sb = (ti * self.nsb() + b / SUPER) * ROWS + r;
        match self.bits {
            Bits::Eight => {
                let qs = &mut self.qs[at * 512..][..512];
                let mut sum = 0i32;
                // Vector j (0..8), lane r, byte kk = weight 4j + kk.
                for j in 0..8 {
                    for kk in 0..4 {
                        qs[j * 64 + r * 4 + kk] = q[4 * j + kk];
                        sum += q[4 * j + kk] as i8 as i32;
                    }
                }
                self.wsum[lane] = 128 * sum;
            }
            bits => {
                // Vector j (0..4), lane r, byte kk: low nibble = weight 8j + kk, high nibble =
                // weight 8j + 4 + kk. Unpacked, vector u (0..8) holds weights 4u..4u + 4.
                let qs = &mut self.qs[at * 256..][..256];
                for j in 0..4 {
                    for kk in 0..4 {
                        qs[j * 64 + r * 4 + kk] = (q[8 * j + kk] & 0x0F) | (q[8 * j + 4 + kk] << 4);
                    }
                }
                let hb = bits.high_bytes();
                let qh = &mut self.qh[at * hb..][..hb];
                for u in (0..8).filter(|_| hb > 0) {
                    for kk in 0..4 {
                        let high = q[4 * u + kk] >> 4;
                        match bits {
                            // Bit u of the byte: the fifth bit of vector u's weight.
                            Bits::Five => qh[r * 4 + kk] |= (high & 1) << u,
                            // Bits 2(u % 4).. of vector u / 4: the top two bits.
                            _ => qh[(u / 4) * 64 + r * 4 + kk] |= (high & 3) << (2 * (u % 4)),
                        }
                    }
                }
            }
        }
        match s {
            Scale::Affine { d, m } => {
                self.d[lane] = d;
                self.m[lane] = m;
            }
            Scale::Plain { d } => self.d[lane] = d,
            Scale::Super { d, m, sc, mn } => {
                self.d[sb] = d;
                self.m[sb] = m;
                self.sc[lane] = sc;
                self.mn[lane] = mn;
            }
            Scale::Halves { d, sc } => {
                self.d[sb] = d;
                self.sc[(at * 2) * ROWS + r] = sc[0] as u8;
                self.sc[(at * 2 + 1) * ROWS + r] = sc[1] as u8;
            }
        }
    }

    /// The 32 unsigned integers of block `b` of row `row`, from the tiles (the portable
    /// kernel and the row lookup read them this way).
    pub(super) fn ints(&self, row: usize, b: usize, q: &mut [u8; QK]) {
        let (ti, r) = (row / ROWS, row % ROWS);
        let at = ti * self.nb + b;
        if self.bits == Bits::Eight {
            let qs = &self.qs[at * 512..][..512];
            for j in 0..8 {
                for kk in 0..4 {
                    q[4 * j + kk] = qs[j * 64 + r * 4 + kk];
                }
            }
            return;
        }
        let qs = &self.qs[at * 256..][..256];
        for j in 0..4 {
            for kk in 0..4 {
                let x = qs[j * 64 + r * 4 + kk];
                q[8 * j + kk] = x & 0x0F;
                q[8 * j + 4 + kk] = x >> 4;
            }
        }
        let hb = self.bits.high_bytes();
        let qh = &self.qh[at * hb..][..hb];
        for u in 0..8 {
            for kk in 0..4 {
                q[4 * u + kk] |= match self.bits {
                    Bits::Five => ((qh[r * 4 + kk] >> u) & 1) << 4,
                    Bits::Six => ((qh[(u / 4) * 64 + r * 4 + kk] >> (2 * (u % 4))) & 3) << 4,
                    _ => 0,
                };
            }
        }
    }

    /// The f32 factors of block `b` of row `row`: `(dw, mw)` for the affine layouts (the
    /// weight is `dw q + mw`), `(dw0, dw1)` for the halves (`dw_h (q - 32)`), `(dw, 0)` with
    /// an offset (`dw (q - zero)`). The SIMD kernels compute the same products.
    pub(super) fn factors(&self, row: usize, b: usize) -> (f32, f32) {
        let (ti, r) = (row / ROWS, row % ROWS);
        let at = ti * self.nb + b;
        let lane = at * ROWS + r;
        let sb = (ti * self.nsb() + b / SUPER) * ROWS + r;
        match (self.scales, self.bits) {
            (Scales::Offset(_), _) => (self.d[lane].to_f32(), 0.0),
            (Scales::Block, _) => (self.d[lane].to_f32(), self.m[lane].to_f32()),
            (Scales::Super, _) => (
                self.d[sb].to_f32() * self.sc[lane] as f32,
                self.m[sb].to_f32() * self.mn[lane] as f32,
            ),
            (Scales::Halves, _) => {
                let d = self.d[sb].to_f32();
                let sc = |h: usize| self.sc[(at * 2 + h) * ROWS + r] as i8 as f32;
                (d * sc(0), d * sc(1))
            }
        }
    }
}
