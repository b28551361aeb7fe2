//! Linear layers in the format each device computes fastest without losing the file's
//! precision.
//!
//! candle's CPU kernel for Q4_1 is scalar, while its Q4_0 kernel is SIMD. A Q4_1 weight is
//! `d * q + m` per block of 32; written as `d * (q - 8) + (m + 8d)` it is a Q4_0 block (the
//! same `d` and nibbles) plus a per-block offset, so
//! `w . x = q4_0(w) . x + sum_b (m_b + 8 d_b) * sum_{i in b} x_i`.
//! The first term runs on the SIMD Q4_0 kernel, the second is a small product with the
//! activations' block sums. Both are exact rewritings of the stored weights, and every output
//! element is computed in an order that does not depend on the other rows of the step.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::{Result, RunnerError};

const QK: usize = 32;
const Q4_1_BYTES: usize = 20;

pub(crate) enum Linear {
    Plain(QMatMul),
    Q4_1Split {
        q4_0: QMatMul,
        /// `m + 8d` per block, `[k / 32, n]` (block-major, so rows add up column-wise).
        offsets_t: Vec<f32>,
        n: usize,
    },
}

impl Linear {
    /// A CPU Q4_1 matrix `[n, k]` in the split form.
    pub(crate) fn q4_1_split(w: &QTensor) -> Result<Self> {
        if w.dtype() != GgmlDType::Q4_1 {
            return Err(RunnerError::Step(format!(
                "expected Q4_1, got {:?}",
                w.dtype()
            )));
        }
        let (n, k) = w.shape().dims2()?;
        let nb = k / QK;
        let data = w.data()?;
        if k % QK != 0 || data.len() != n * nb * Q4_1_BYTES {
            return Err(RunnerError::Step(format!("malformed Q4_1 matrix {n}x{k}")));
        }
        let mut q4_0 = Vec::with_capacity(n * nb * 18);
        let mut offsets_t = vec![0f32; nb * n];
        for (i, block) in data.chunks_exact(Q4_1_BYTES).enumerate() {
            let (row, b) = (i / nb, i % nb);
            let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
            let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
            q4_0.extend_from_slice(&block[0..2]);
            q4_0.extend_from_slice(&block[4..20]);
            offsets_t[b * n + row] = m + 8.0 * d;
        }
        let storage = QStorage::from_data(Cow::Owned(q4_0), &Device::Cpu, GgmlDType::Q4_0)?;
        Ok(Linear::Q4_1Split {
            q4_0: QMatMul::from_qtensor(QTensor::new(storage, (n, k))?)?,
            offsets_t,
            n,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Plain(q) => Ok(q.forward(x)?),
            Linear::Q4_1Split { q4_0, offsets_t, n } => {
                let y = q4_0.forward(x)?;
                let (t, k) = x.dims2()?;
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let mut corr = vec![0f32; t * n];
                let row = |(r, c): (usize, &mut [f32])| {
                    let xr = &xs[r * k..(r + 1) * k];
                    for (b, xb) in xr.chunks_exact(QK).enumerate() {
                        let s: f32 = xb.iter().sum();
                        let off = &offsets_t[b * n..(b + 1) * n];
                        for (c, o) in c.iter_mut().zip(off) {
                            *c += s * o;
                        }
                    }
                };
                if t >= 8 {
                    corr.par_chunks_mut(*n).enumerate().for_each(row);
                } else {
                    corr.chunks_mut(*n).enumerate().for_each(row);
                }
                Ok((y + Tensor::from_vec(corr, (t, *n), x.device())?)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_q4_1_equals_dequantized_weights() {
        let (n, k, t) = (40, 96, 5);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 0.7)
            .collect();
        let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let dense = q.dequantize(&Device::Cpu).unwrap();
        let x: Vec<f32> = (0..t * k)
            .map(|i| ((i * 31 % 97) as f32 / 50.0) - 1.0)
            .collect();
        let x = Tensor::from_vec(x, (t, k), &Device::Cpu).unwrap();
        let want = x.matmul(&dense.t().unwrap()).unwrap();
        let got = Linear::q4_1_split(&q).unwrap().forward(&x).unwrap();
        let err = (want - &got)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Only the 8-bit quantization of the activations separates the two.
        assert!(err < 0.05, "max error {err}");
        // Each row is the same whether computed alone or with others.
        let alone = Linear::q4_1_split(&q)
            .unwrap()
            .forward(&x.narrow(0, 2, 1).unwrap())
            .unwrap();
        let in_batch = got.narrow(0, 2, 1).unwrap();
        let same = alone.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == in_batch.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(same);
    }
}
