//! GGUF weight types: their block layouts and dequantization, block by block (so a single
//! embedding row can be read without dequantizing the table).
//!
//! The layouts are ggml's (`ggml-common.h`): blocks of 32 weights for the legacy types, super
//! blocks of 256 with 6- or 8-bit sub-block scales for the K-quants; scales are f16.

use half::{bf16, f16};

/// The weight types Wick loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

/// ggml's names for its type ids, for messages about the ones Wick does not load.
const GGML_NAMES: &[(u32, &str)] = &[
    (0, "F32"),
    (1, "F16"),
    (2, "Q4_0"),
    (3, "Q4_1"),
    (6, "Q5_0"),
    (7, "Q5_1"),
    (8, "Q8_0"),
    (9, "Q8_1"),
    (10, "Q2_K"),
    (11, "Q3_K"),
    (12, "Q4_K"),
    (13, "Q5_K"),
    (14, "Q6_K"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (30, "BF16"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
];

/// ggml's name for a type id (`type 99` for one it does not know either).
pub fn ggml_type_name(id: u32) -> String {
    GGML_NAMES
        .iter()
        .find(|(i, _)| *i == id)
        .map(|(_, n)| n.to_string())
        .unwrap_or_else(|| format!("type {id}"))
}

pub(crate) const QK_K: usize = 256;

impl WeightType {
    pub const ALL: [WeightType; 13] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2K,
        Self::Q3K,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
    ];

    /// The type of ggml type id `id`, or `None` for one Wick does not load.
    pub fn from_ggml(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            30 => Self::BF16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            _ => return None,
        })
    }

    pub fn ggml_id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::BF16 => 30,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2K => 10,
            Self::Q3K => 11,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q2K => "Q2_K",
            Self::Q3K => "Q3_K",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
        }
    }

    /// Weights per block and bytes per block.
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q2K => (QK_K, 84),
            Self::Q3K => (QK_K, 110),
            Self::Q4K => (QK_K, 144),
            Self::Q5K => (QK_K, 176),
            Self::Q6K => (QK_K, 210),
        }
    }

    /// Bytes of `n` weights, or `None` when `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let (elems, bytes) = self.block();
        n.is_multiple_of(elems)
            .then(|| (n / elems).checked_mul(bytes))
            .flatten()
    }

    pub fn is_quantized(self) -> bool {
        !matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }

    pub(crate) fn candle(self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType as G;
        match self {
            Self::F32 => G::F32,
            Self::F16 => G::F16,
            Self::BF16 => G::BF16,
            Self::Q4_0 => G::Q4_0,
            Self::Q4_1 => G::Q4_1,
            Self::Q5_0 => G::Q5_0,
            Self::Q5_1 => G::Q5_1,
            Self::Q8_0 => G::Q8_0,
            Self::Q2K => G::Q2K,
            Self::Q3K => G::Q3K,
            Self::Q4K => G::Q4K,
            Self::Q5K => G::Q5K,
            Self::Q6K => G::Q6K,
        }
    }

    /// Dequantizes whole blocks: `data` holds `out.len() / elems` blocks.
    pub fn dequantize(self, data: &[u8], out: &mut [f32]) {
        let (elems, bytes) = self.block();
        debug_assert_eq!(data.len() / bytes * elems, out.len());
        let blocks = data.chunks_exact(bytes).zip(out.chunks_exact_mut(elems));
        match self {
            Self::F32 => {
                for (b, y) in blocks {
                    y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Self::F16 => {
                for (b, y) in blocks {
                    y[0] = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            Self::BF16 => {
                for (b, y) in blocks {
                    y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            Self::Q4_0 => blocks.for_each(|(b, y)| q4_0(b, y)),
            Self::Q4_1 => blocks.for_each(|(b, y)| q4_1(b, y)),
            Self::Q5_0 => blocks.for_each(|(b, y)| q5(b, y, false)),
            Self::Q5_1 => blocks.for_each(|(b, y)| q5(b, y, true)),
            Self::Q8_0 => blocks.for_each(|(b, y)| q8_0(b, y)),
            Self::Q2K => blocks.for_each(|(b, y)| q2k(b, y)),
            Self::Q3K => blocks.for_each(|(b, y)| q3k(b, y)),
            Self::Q4K => blocks.for_each(|(b, y)| q4k(b, y)),
            Self::Q5K => blocks.for_each(|(b, y)| q5k(b, y)),
            Self::Q6K => blocks.for_each(|(b, y)| q6k(b, y)),
        }
    }
}

impl std::fmt::Display for WeightType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = (q & 0x0F) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// Q5_0 (`w = d * (q - 16)`) and Q5_1 (`w = d * q + m`): 4 low bits in `qs`, the fifth in `qh`.
fn q5(b: &[u8], y: &mut [f32], with_min: bool) {
    let d = half(b, 0);
    let (m, at) = if with_min { (half(b, 2), 4) } else { (0.0, 2) };
    let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let offset = if with_min { 0 } else { 16 };
    for (j, &q) in b[at + 4..at + 20].iter().enumerate() {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        let x0 = ((q as u32 & 0x0F) | h0) as i32 - offset;
        let x1 = ((q as u32 >> 4) | h1) as i32 - offset;
        y[j] = x0 as f32 * d + m;
        y[j + 16] = x1 as f32 * d + m;
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = q as i8 as f32 * d;
    }
}

fn q2k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, min) = (half(b, 80), half(b, 82));
    let mut is = 0;
    for n in 0..2 {
        let q = &qs[n * 32..n * 32 + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for half_ in 0..2 {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * (sc & 0x0F) as f32, min * (sc >> 4) as f32);
                let out = &mut y[n * 128 + j * 32 + half_ * 16..][..16];
                for (l, o) in out.iter_mut().enumerate() {
                    *o = dl * ((q[l + half_ * 16] >> shift) & 3) as f32 - ml;
                }
            }
        }
    }
}

fn q3k(b: &[u8], y: &mut [f32]) {
    let (hm, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
    let d_all = half(b, 108);
    let scales = q3k_scales(sc);
    let mut is = 0;
    let mut m = 1u8;
    for n in 0..2 {
        let q = &qs[n * 32..n * 32 + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for half_ in 0..2 {
                let dl = d_all * (scales[is] as i32 - 32) as f32;
                is += 1;
                let out = &mut y[n * 128 + j * 32 + half_ * 16..][..16];
                for (l, o) in out.iter_mut().enumerate() {
                    let i = l + half_ * 16;
                    let low = ((q[i] >> shift) & 3) as i32;
                    let high = if hm[i] & m != 0 { 0 } else { 4 };
                    *o = dl * (low - high) as f32;
                }
            }
            m <<= 1;
        }
    }
}

/// The 16 6-bit scales of a Q3_K block (stored biased by 32), unpacked from 12 bytes.
pub(crate) fn q3k_scales(sc: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let low = if i < 8 { sc[i] & 0x0F } else { sc[i - 8] >> 4 };
        let high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = low | (high << 4);
    }
    out
}

/// Scale and minimum `j` (0..8) of a Q4_K or Q5_K block, 6 bits each, from 12 bytes.
pub(crate) fn k4_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn q4k(b: &[u8], y: &mut [f32]) {
    let (d, min) = (half(b, 0), half(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for j in 0..4 {
        let (s1, m1) = k4_scale_min(2 * j, scales);
        let (s2, m2) = k4_scale_min(2 * j + 1, scales);
        let (d1, m1) = (d * s1 as f32, min * m1 as f32);
        let (d2, m2) = (d * s2 as f32, min * m2 as f32);
        let q = &qs[j * 32..j * 32 + 32];
        for l in 0..32 {
            y[j * 64 + l] = d1 * (q[l] & 0x0F) as f32 - m1;
            y[j * 64 + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

fn q5k(b: &[u8], y: &mut [f32]) {
    let (d, min) = (half(b, 0), half(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for j in 0..4 {
        let (s1, m1) = k4_scale_min(2 * j, scales);
        let (s2, m2) = k4_scale_min(2 * j + 1, scales);
        let (d1, m1) = (d * s1 as f32, min * m1 as f32);
        let (d2, m2) = (d * s2 as f32, min * m2 as f32);
        let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
        let q = &qs[j * 32..j * 32 + 32];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[j * 64 + l] = d1 * ((q[l] & 0x0F) + h1) as f32 - m1;
            y[j * 64 + 32 + l] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
        }
    }
}

fn q6k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = half(b, 208);
    for n in 0..2 {
        let (ql, qh, sc) = (&ql[n * 64..], &qh[n * 32..], &sc[n * 8..]);
        let y = &mut y[n * 128..];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::borrow::Cow;

    use candle_core::quantized::{QStorage, QTensor};
    use candle_core::Device;

    use super::*;

    pub(crate) fn lcg(seed: &mut u64) -> u32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    }

    /// `blocks` random blocks of `ty`: random bytes, with every f16 scale replaced by a small
    /// finite value (random bytes there could be NaN or huge).
    pub(crate) fn random_blocks(ty: WeightType, blocks: usize, seed: &mut u64) -> Vec<u8> {
        let (elems, bytes) = ty.block();
        let mut data: Vec<u8> = (0..blocks * bytes).map(|_| lcg(seed) as u8).collect();
        let scale = |seed: &mut u64, neg: bool| {
            let v = (lcg(seed) % 1000) as f32 / 40_000.0 + 0.0005;
            f16::from_f32(if neg { -v } else { v }).to_le_bytes()
        };
        // Offsets of the f16 fields in a block.
        let fields: &[usize] = match ty {
            WeightType::Q4_0 | WeightType::Q5_0 | WeightType::Q8_0 => &[0],
            WeightType::Q4_1 | WeightType::Q5_1 => &[0, 2],
            WeightType::Q2K => &[80, 82],
            WeightType::Q3K => &[108],
            WeightType::Q4K | WeightType::Q5K => &[0, 2],
            WeightType::Q6K => &[208],
            WeightType::F16 => &[0],
            WeightType::BF16 | WeightType::F32 => &[],
        };
        for b in data.chunks_exact_mut(bytes) {
            for (i, &at) in fields.iter().enumerate() {
                // Q4_1/Q5_1 minimums are negative, as real files have them.
                let neg = i == 1 && matches!(ty, WeightType::Q4_1 | WeightType::Q5_1);
                b[at..at + 2].copy_from_slice(&scale(seed, neg));
            }
            match ty {
                WeightType::BF16 => {
                    let v = (lcg(seed) % 2001) as f32 / 1000.0 - 1.0;
                    b.copy_from_slice(&bf16::from_f32(v).to_le_bytes());
                }
                WeightType::F32 => {
                    let v = (lcg(seed) % 2001) as f32 / 1000.0 - 1.0;
                    b.copy_from_slice(&v.to_le_bytes());
                }
                _ => {}
            }
        }
        debug_assert_eq!(data.len() / bytes * elems, blocks * elems);
        data
    }

    #[test]
    fn dequantization_equals_candles_on_random_blocks() {
        for ty in WeightType::ALL {
            let mut seed = 17 + ty.ggml_id() as u64;
            let (elems, _) = ty.block();
            let (rows, k) = (3, QK_K);
            let data = random_blocks(ty, rows * k / elems, &mut seed);
            let storage =
                QStorage::from_data(Cow::Borrowed(&data), &Device::Cpu, ty.candle()).unwrap();
            let want = QTensor::new(storage, (rows, k))
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let mut got = vec![f32::NAN; rows * k];
            ty.dequantize(&data, &mut got);
            assert_eq!(got, want, "{ty}");
        }
    }

    #[test]
    fn type_ids_round_trip_and_unknown_types_are_named() {
        for ty in WeightType::ALL {
            assert_eq!(WeightType::from_ggml(ty.ggml_id()), Some(ty));
            assert_eq!(ggml_type_name(ty.ggml_id()), ty.name());
        }
        assert_eq!(WeightType::from_ggml(23), None);
        assert_eq!(ggml_type_name(23), "IQ4_XS");
        assert_eq!(ggml_type_name(77), "type 77");
        assert_eq!(WeightType::Q4K.bytes_for(512), Some(288));
        assert_eq!(WeightType::Q4K.bytes_for(500), None);
    }
}
