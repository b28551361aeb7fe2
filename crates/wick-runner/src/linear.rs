//! Linear layers in the format each device computes fastest without losing the file's
//! precision.
//!
//! On the CPU, GGUF Q4_1 and Q8_0 matrices run on Wick's own kernels ([`crate::qgemm`]):
//! the stored blocks repacked for AVX-512 VNNI, against activations quantized to 8 bits per
//! block of 32, exactly as llama.cpp computes them, with each weight block loaded once for up
//! to 8 tokens of the step. Everything else is a candle [`QMatMul`] (quantized on devices,
//! dense for safetensors models).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Tensor};

use crate::qgemm::{self, Acts, Format, Packed};
use crate::{Result, RunnerError};

pub(crate) enum Linear {
    Plain(QMatMul),
    /// A CPU matrix on the packed kernels.
    Packed(Packed),
}

impl Linear {
    /// A CPU Q4_1 or Q8_0 matrix `[n, k]`, repacked for [`qgemm::matmul`].
    pub(crate) fn packed(w: &QTensor) -> Result<Self> {
        let format = match w.dtype() {
            GgmlDType::Q4_1 => Format::Q4_1,
            GgmlDType::Q8_0 => Format::Q8_0,
            other => return Err(RunnerError::Step(format!("no packed kernel for {other:?}"))),
        };
        let (n, k) = w.shape().dims2()?;
        Ok(Linear::Packed(Packed::new(format, &w.data()?, n, k)?))
    }

    /// The packed matrix, when this layer has one (the host forward needs every layer so).
    pub(crate) fn as_packed(&self) -> Option<&Packed> {
        match self {
            Linear::Packed(p) => Some(p),
            Linear::Plain(_) => None,
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Plain(q) => Ok(q.forward(x)?),
            Linear::Packed(p) => {
                let (t, k) = x.dims2()?;
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let mut acts = Acts::default();
                acts.quantize(&xs, t, k);
                let mut out = vec![0f32; t * p.n];
                qgemm::matmul(p, &acts, &mut out);
                Ok(Tensor::from_vec(out, (t, p.n), x.device())?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn packed_q4_1_equals_dequantized_weights_through_tensors() {
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
        let got = Linear::packed(&q).unwrap().forward(&x).unwrap();
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
    }
}
