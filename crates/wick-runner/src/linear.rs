//! Linear layers in the format each device computes fastest without losing the file's
//! precision, and without growing the weights in memory.
//!
//! On the host: GGUF matrices of every common quantized type run on Wick's packed kernels
//! ([`crate::qgemm`]); the rest (Q2_K) on candle's kernels over the file's own blocks; f16 and bf16
//! weights stay half-width (f32 activations, [`HalfMatrix`]); f32 weights on candle's gemm. On
//! a device everything is a candle [`QMatMul`]. A fused projection whose parts have different
//! types (a Q4_K_M file mixes them) is a [`Linear::Concat`] of its parts.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::qgemm::{self, Acts, Packed};
use crate::quant::WeightType;
use crate::{Result, RunnerError};

pub(crate) enum Linear {
    /// A CPU matrix on the packed kernels.
    Packed(Box<Packed>),
    /// Quantized blocks or a dense tensor, on candle's kernels (any device).
    Candle(QMatMul),
    /// f16 or bf16 weights on the host.
    Half(HalfMatrix),
    /// Row groups computed separately, outputs side by side.
    Concat(Vec<Linear>),
}

/// `[n, k]` f16 or bf16 weights, multiplied with f32 activations.
pub(crate) struct HalfMatrix {
    pub bf16: bool,
    pub n: usize,
    pub k: usize,
    data: Vec<u16>,
}

impl HalfMatrix {
    pub fn new(ty: WeightType, bytes: &[u8], n: usize, k: usize) -> Result<Self> {
        let bf16 = match ty {
            WeightType::F16 => false,
            WeightType::BF16 => true,
            other => return Err(RunnerError::Step(format!("{other} is not a half type"))),
        };
        if bytes.len() != 2 * n * k {
            return Err(RunnerError::Step(format!(
                "{n}x{k} half matrix from {} bytes",
                bytes.len()
            )));
        }
        let data = bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        Ok(Self { bf16, n, k, data })
    }

    /// From raw bits (`bf16` or f16), `[n, k]` row-major.
    pub fn from_bits(bf16: bool, data: Vec<u16>, n: usize, k: usize) -> Result<Self> {
        if data.len() != n * k {
            return Err(RunnerError::Step(format!(
                "{n}x{k} half matrix from {} values",
                data.len()
            )));
        }
        Ok(Self { bf16, n, k, data })
    }

    fn row(&self, r: usize, out: &mut [f32]) {
        let src = &self.data[r * self.k..(r + 1) * self.k];
        if self.bf16 {
            for (o, &b) in out.iter_mut().zip(src) {
                *o = bf16::from_bits(b).to_f32();
            }
        } else {
            for (o, &b) in out.iter_mut().zip(src) {
                *o = f16::from_bits(b).to_f32();
            }
        }
    }

    /// `out[t][n] = w[n] . x[t]`, rows split over the pool; each row is widened once for
    /// every token of the step.
    fn forward(&self, x: &[f32], t: usize, out: &mut [f32]) {
        const ROWS: usize = 16;
        let chunks: Vec<Vec<f32>> = (0..self.n.div_ceil(ROWS))
            .into_par_iter()
            .map(|c| {
                let rows = c * ROWS..((c + 1) * ROWS).min(self.n);
                let mut w = vec![0f32; self.k];
                let mut part = vec![0f32; t * rows.len()];
                for (i, r) in rows.clone().enumerate() {
                    self.row(r, &mut w);
                    for tok in 0..t {
                        part[tok * rows.len() + i] = dot(&w, &x[tok * self.k..(tok + 1) * self.k]);
                    }
                }
                part
            })
            .collect();
        for (c, part) in chunks.iter().enumerate() {
            let width = part.len() / t.max(1);
            for tok in 0..t {
                out[tok * self.n + c * ROWS..][..width]
                    .copy_from_slice(&part[tok * width..(tok + 1) * width]);
            }
        }
    }
}

/// A dot product in 16 independent lanes (the compiler vectorizes it).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl Linear {
    /// A CPU matrix `[n, k]` from its GGUF blocks, repacked (types with
    /// [`Packed::supports`]).
    pub(crate) fn packed(ty: WeightType, bytes: &[u8], n: usize, k: usize) -> Result<Self> {
        Ok(Linear::Packed(Box::new(Packed::new(ty, bytes, n, k)?)))
    }

    /// A matrix of `ty` on candle's kernels, on `device`.
    pub(crate) fn candle(
        ty: WeightType,
        bytes: &[u8],
        n: usize,
        k: usize,
        device: &Device,
    ) -> Result<Self> {
        let storage = candle_core::quantized::QStorage::from_data(
            std::borrow::Cow::Borrowed(bytes),
            device,
            ty.candle(),
        )?;
        let q = QTensor::new(storage, (n, k))?;
        Ok(Linear::Candle(if ty == WeightType::F32 {
            QMatMul::Tensor(q.dequantize(device)?)
        } else {
            QMatMul::from_qtensor(q)?
        }))
    }

    /// Output width.
    pub(crate) fn rows(&self) -> usize {
        match self {
            Linear::Packed(p) => p.n(),
            Linear::Half(h) => h.n,
            Linear::Candle(q) => candle_shape(q).0,
            Linear::Concat(parts) => parts.iter().map(Linear::rows).sum(),
        }
    }

    /// Input width.
    pub(crate) fn cols(&self) -> usize {
        match self {
            Linear::Packed(p) => p.k(),
            Linear::Half(h) => h.k,
            Linear::Candle(q) => candle_shape(q).1,
            Linear::Concat(parts) => parts.first().map_or(0, Linear::cols),
        }
    }

    /// Bytes the weights take in memory.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Linear::Packed(p) => p.bytes(),
            Linear::Half(h) => 2 * h.data.len(),
            Linear::Candle(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Linear::Candle(QMatMul::Tensor(t)) | Linear::Candle(QMatMul::TensorF16(t)) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
            Linear::Concat(parts) => parts.iter().map(Linear::bytes).sum(),
        }
    }

    /// Row `r` of the weights, dequantized into `out` (`cols()` values).
    pub(crate) fn row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        match self {
            Linear::Packed(p) => p.row(r, out),
            Linear::Half(h) => h.row(r, out),
            Linear::Candle(QMatMul::QTensor(q)) => {
                let (_, k) = q.shape().dims2()?;
                let ty = weight_type(q.dtype())?;
                let row_bytes = ty
                    .bytes_for(k)
                    .ok_or_else(|| RunnerError::Step("row of partial blocks".into()))?;
                let data = q.data()?;
                ty.dequantize(&data[r * row_bytes..(r + 1) * row_bytes], out);
            }
            Linear::Candle(QMatMul::Tensor(t)) | Linear::Candle(QMatMul::TensorF16(t)) => {
                let row = t.get(r)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                out.copy_from_slice(&row);
            }
            Linear::Concat(parts) => {
                let mut r = r;
                for p in parts {
                    if r < p.rows() {
                        return p.row(r, out);
                    }
                    r -= p.rows();
                }
                return Err(RunnerError::Step(format!("row {r} out of range")));
            }
        }
        Ok(())
    }

    /// `out = x . w^T` on the host for `x` of `[t, cols]`; `out` becomes `[t, rows]`.
    pub(crate) fn forward_host(
        &self,
        x: &[f32],
        acts: &mut Acts,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let k = self.cols();
        let t = x.len() / k.max(1);
        out.clear();
        out.resize(t * self.rows(), 0.0);
        match self {
            Linear::Packed(p) => {
                acts.quantize_for(p, x, t);
                qgemm::matmul(p, acts, out);
            }
            Linear::Half(h) => h.forward(x, t, out),
            Linear::Candle(q) => {
                let xt = Tensor::from_slice(x, (t, k), &Device::Cpu)?;
                let y = q.forward(&xt)?.flatten_all()?.to_vec1::<f32>()?;
                out.copy_from_slice(&y);
            }
            Linear::Concat(parts) => {
                let n = self.rows();
                let mut part_out = Vec::new();
                let mut col = 0;
                for p in parts {
                    p.forward_host(x, acts, &mut part_out)?;
                    let pn = p.rows();
                    for tok in 0..t {
                        out[tok * n + col..tok * n + col + pn]
                            .copy_from_slice(&part_out[tok * pn..(tok + 1) * pn]);
                    }
                    col += pn;
                }
            }
        }
        Ok(())
    }

    /// `x . w^T` on tensors (any device).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Candle(q) => Ok(q.forward(x)?),
            Linear::Concat(parts) => {
                let outs = parts
                    .iter()
                    .map(|p| p.forward(x))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&outs, 1)?)
            }
            // The loaders build these for the host path only.
            Linear::Packed(_) | Linear::Half(_) => Err(RunnerError::Step(
                "a host-path matrix on the tensor path".into(),
            )),
        }
    }
}

fn candle_shape(q: &QMatMul) -> (usize, usize) {
    let dims = match q {
        QMatMul::QTensor(q) => q.shape().dims().to_vec(),
        QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims().to_vec(),
    };
    (
        dims.first().copied().unwrap_or(0),
        dims.get(1).copied().unwrap_or(0),
    )
}

pub(crate) fn weight_type(d: candle_core::quantized::GgmlDType) -> Result<WeightType> {
    WeightType::ALL
        .into_iter()
        .find(|t| t.candle() == d)
        .ok_or_else(|| RunnerError::Step(format!("no Wick weight type for {d:?}")))
}

/// A projection: weights and an optional bias (f32, one per output).
pub(crate) struct Proj {
    pub w: Linear,
    pub bias: Option<Bias>,
}

pub(crate) struct Bias {
    pub host: Vec<f32>,
    pub tensor: Tensor,
}

impl Proj {
    pub fn forward_host(&self, x: &[f32], acts: &mut Acts, out: &mut Vec<f32>) -> Result<()> {
        self.w.forward_host(x, acts, out)?;
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(b.host.len()) {
                for (o, b) in row.iter_mut().zip(&b.host) {
                    *o += b;
                }
            }
        }
        Ok(())
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.w.forward(x)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.tensor.to_dtype(y.dtype())?)?,
            None => y,
        })
    }

    pub fn bytes(&self) -> usize {
        self.w.bytes() + self.bias.as_ref().map_or(0, |b| 4 * b.host.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::tests::random_blocks;

    fn dense(ty: WeightType, data: &[u8], n: usize, k: usize) -> Vec<f32> {
        let mut w = vec![0f32; n * k];
        ty.dequantize(data, &mut w);
        w
    }

    /// Every weight type through the host path against its own dequantized weights: only
    /// the activations' quantization (8 bits, per the type's kernel) separates the two.
    #[test]
    fn every_type_multiplies_like_its_dequantized_weights() {
        let (n, k, t) = (48, 512, 5);
        let x: Vec<f32> = (0..t * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        for ty in WeightType::ALL {
            let mut seed = 100 + ty.ggml_id() as u64;
            let data = random_blocks(ty, n * k / ty.block().0, &mut seed);
            let w = dense(ty, &data, n, k);
            let lin = match ty {
                WeightType::Q4_1 | WeightType::Q8_0 => Linear::packed(ty, &data, n, k).unwrap(),
                WeightType::F16 | WeightType::BF16 => {
                    Linear::Half(HalfMatrix::new(ty, &data, n, k).unwrap())
                }
                _ => Linear::candle(ty, &data, n, k, &Device::Cpu).unwrap(),
            };
            let mut out = Vec::new();
            lin.forward_host(&x, &mut Acts::default(), &mut out)
                .unwrap();
            for tok in 0..t {
                for r in 0..n {
                    let xr = &x[tok * k..(tok + 1) * k];
                    let wr = &w[r * k..(r + 1) * k];
                    let want: f32 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
                    let scale: f32 = xr.iter().zip(wr).map(|(a, b)| (a * b).abs()).sum();
                    let tol = if ty.is_quantized() { 0.02 } else { 1e-4 };
                    let got = out[tok * n + r];
                    assert!(
                        (got - want).abs() <= tol * scale + 1e-4,
                        "{ty} t{tok} r{r}: {got} vs {want}"
                    );
                }
            }
            let mut row = vec![0f32; k];
            lin.row(7, &mut row).unwrap();
            assert_eq!(row, w[7 * k..8 * k], "{ty} row");
            assert!(
                lin.bytes() <= data.len() * 5 / 4,
                "{ty}: {} bytes for {}",
                lin.bytes(),
                data.len()
            );
        }
    }

    #[test]
    fn concat_places_parts_side_by_side() {
        let (k, t) = (64, 3);
        let mut seed = 1;
        let a = random_blocks(WeightType::Q8_0, 16 * k / 32, &mut seed);
        let b = random_blocks(WeightType::F16, 8 * k, &mut seed);
        let pa = Linear::packed(WeightType::Q8_0, &a, 16, k).unwrap();
        let pb = Linear::Half(HalfMatrix::new(WeightType::F16, &b, 8, k).unwrap());
        let x: Vec<f32> = (0..t * k).map(|i| (i % 13) as f32 / 13.0 - 0.5).collect();
        let (mut oa, mut ob, mut oc) = (Vec::new(), Vec::new(), Vec::new());
        let mut acts = Acts::default();
        pa.forward_host(&x, &mut acts, &mut oa).unwrap();
        pb.forward_host(&x, &mut acts, &mut ob).unwrap();
        let c = Linear::Concat(vec![pa, pb]);
        c.forward_host(&x, &mut acts, &mut oc).unwrap();
        assert_eq!(c.rows(), 24);
        for tok in 0..t {
            assert_eq!(oc[tok * 24..tok * 24 + 16], oa[tok * 16..(tok + 1) * 16]);
            assert_eq!(
                oc[tok * 24 + 16..(tok + 1) * 24],
                ob[tok * 8..(tok + 1) * 8]
            );
        }
        let mut row = vec![0f32; k];
        c.row(20, &mut row).unwrap();
        let mut want = vec![0f32; k];
        c.row(20, &mut want).unwrap();
        assert_eq!(row, want);
    }
}
