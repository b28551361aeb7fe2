//! From a GGUF row's blocks to what the kernels take: per block of 32 weights, 32 unsigned
//! integers and the block's scales (see [`Scale`]); then into the tiles of [`super::Packed`].

use half::f16;

use super::{Bits, Scales, QK, ROWS, SUPER};
use crate::quant::{k4_scale_min, WeightType};

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

impl super::Packed {
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
