//! Drawing tokens where the logits are: on CUDA the `sample_rows` kernel
//! (`kernels/sampling.cu`), elsewhere [`reference`], the kernel's arithmetic in Rust. Only the
//! chosen ids leave the device. Rows that need the host (logit bias, penalties, log-probs,
//! a grammar) are not drawn here: the runner copies their logits back instead.

use candle_core::{DType, Tensor};

use crate::Result;

/// Threads per row in the kernel (`THREADS`): the vocabulary is cut into that many
/// contiguous chunks, and every sum runs in that tree.
pub(crate) const THREADS: usize = 512;

/// One row's draw, as the kernel reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrawParams {
    /// 0 or less: greedy.
    pub temperature: f32,
    /// 0: off.
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    /// Uniform in `[0, 1)`, from the request's own generator.
    pub uniform: f32,
}

impl DrawParams {
    /// The most likely token.
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        uniform: 0.0,
    };
}

/// The sum of 512 values by the kernel's tree: strides 256, 128, ... 1.
fn tree_sum(mut x: Vec<f32>) -> f32 {
    let mut s = THREADS / 2;
    while s > 0 {
        for i in 0..s {
            x[i] += x[i + s];
        }
        s /= 2;
    }
    x[0]
}

/// The kernel's draw on one row: the token, and the kept tokens with their weights (in
/// index order; empty when greedy).
pub fn reference(logits: &[f32], p: &DrawParams) -> (u32, Vec<(u32, f32)>) {
    let vocab = logits.len();
    let chunk = vocab.div_ceil(THREADS);
    let range = |t: usize| (t * chunk).min(vocab)..((t + 1) * chunk).min(vocab);
    let mut best = (f32::NEG_INFINITY, usize::MAX);
    for (i, &l) in logits.iter().enumerate() {
        if l > best.0 {
            best = (l, i);
        }
    }
    let (mx, arg) = (best.0, if best.1 == usize::MAX { 0 } else { best.1 });
    if p.temperature <= 0.0 || mx == f32::NEG_INFINITY {
        return (arg as u32, Vec::new());
    }
    let inv_t = 1.0 / p.temperature;
    let kept = |l: f32, tau: f32| {
        let w = ((l - mx) * inv_t).exp();
        if w > 0.0 && w >= tau {
            w
        } else {
            0.0
        }
    };
    let sum = |tau: f32| {
        tree_sum(
            (0..THREADS)
                .map(|t| logits[range(t)].iter().map(|&l| kept(l, tau)).sum())
                .collect(),
        )
    };
    let count = |tau: f32| logits.iter().filter(|&&l| kept(l, tau) > 0.0).count();
    // The largest bit pattern in [a, one] for which `ok` holds (it holds at `a`).
    let bisect = |mut a: u32, ok: &dyn Fn(f32) -> bool| {
        let mut b = 1f32.to_bits();
        while a < b {
            let mid = a + (b - a).div_ceil(2);
            if ok(f32::from_bits(mid)) {
                a = mid;
            } else {
                b = mid - 1;
            }
        }
        f32::from_bits(a)
    };
    let mut tau = 0f32;
    if p.top_k > 0 && (p.top_k as usize) < count(0.0) {
        tau = bisect(1, &|x| count(x) >= p.top_k as usize);
    }
    if p.min_p > 0.0 {
        tau = tau.max(p.min_p);
    }
    if p.top_p < 1.0 {
        let goal = p.top_p * sum(tau);
        let start = if tau > 0.0 { tau.to_bits() } else { 1 };
        tau = bisect(start, &|x| sum(x) >= goal);
    }
    let chunks: Vec<f32> = (0..THREADS)
        .map(|t| logits[range(t)].iter().map(|&l| kept(l, tau)).sum())
        .collect();
    let mut prefix = Vec::with_capacity(THREADS);
    let mut acc = 0f32;
    for &c in &chunks {
        prefix.push(acc);
        acc += c;
    }
    let mut id = None;
    for t in 0..THREADS {
        let mut r = p.uniform * acc - prefix[t];
        if !(r >= 0.0 && r < chunks[t]) {
            continue;
        }
        for i in range(t) {
            let w = kept(logits[i], tau);
            if w > 0.0 && r < w {
                id = Some(id.map_or(i, |j: usize| j.min(i)));
                break;
            }
            r -= w;
        }
    }
    let weights: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter_map(|(i, &l)| Some((i as u32, kept(l, tau))).filter(|x| x.1 > 0.0))
        .collect();
    let id = id
        .map(|i| i as u32)
        .or_else(|| weights.last().map(|x| x.0))
        .unwrap_or(arg as u32);
    (id, weights)
}

/// Draws one token per row of `logits` (`[rows, vocab]`, any float dtype) on its device.
pub fn draw(logits: &Tensor, params: &[DrawParams]) -> Result<Vec<u32>> {
    let logits = logits.to_dtype(DType::F32)?.contiguous()?;
    let (rows, _vocab) = logits.dims2()?;
    if rows != params.len() {
        return Err(crate::RunnerError::Step(format!(
            "device sampling: {rows} rows of logits, {} draws",
            params.len()
        )));
    }
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        return cuda::draw(&logits, params);
    }
    let host = logits.to_vec2::<f32>()?;
    Ok(host
        .iter()
        .zip(params)
        .map(|(row, p)| reference(row, p).0)
        .collect())
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaStorage, Storage, Tensor};

    use super::{DrawParams, THREADS};
    use crate::Result;

    const SAMPLING_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sampling.ptx"));

    pub(super) fn draw(logits: &Tensor, params: &[DrawParams]) -> Result<Vec<u32>> {
        let (rows, vocab) = logits.dims2()?;
        let dev = match logits.device() {
            candle_core::Device::Cuda(d) => d.clone(),
            _ => unreachable!("called for CUDA tensors"),
        };
        let col = |f: fn(&DrawParams) -> f32| -> Result<Tensor> {
            let v: Vec<f32> = params.iter().map(f).collect();
            Ok(Tensor::new(v.as_slice(), logits.device())?)
        };
        let temperature = col(|p| p.temperature)?;
        let top_p = col(|p| p.top_p)?;
        let min_p = col(|p| p.min_p)?;
        let uniform = col(|p| p.uniform)?;
        let top_k: Vec<u32> = params.iter().map(|p| p.top_k).collect();
        let top_k = Tensor::new(top_k.as_slice(), logits.device())?;
        let f32_slice = |t: &Tensor| -> candle_core::Result<_> {
            let (s, l) = t.storage_and_layout();
            match &*s {
                Storage::Cuda(CudaStorage {
                    slice: CudaStorageSlice::F32(x),
                    ..
                }) if l.start_offset() == 0 => Ok(x.clone()),
                _ => candle_core::bail!("device sampling: f32 CUDA tensors"),
            }
        };
        let out = dev.alloc_zeros::<u32>(rows)?;
        let func = dev.get_or_load_custom_func("sample_rows", "wick_sampling", SAMPLING_PTX)?;
        let vocab = i32::try_from(vocab)
            .map_err(|_| crate::RunnerError::Step("vocabulary exceeds i32".into()))?;
        let (l, t, k, p, m, u) = (
            f32_slice(logits)?,
            f32_slice(&temperature)?,
            crate::attention::paged::u32_slice(&top_k)?,
            f32_slice(&top_p)?,
            f32_slice(&min_p)?,
            f32_slice(&uniform)?,
        );
        let mut b = func.builder();
        b.arg(&l)
            .arg(&vocab)
            .arg(&t)
            .arg(&k)
            .arg(&p)
            .arg(&m)
            .arg(&u)
            .arg(&out);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments follow `sample_rows`' signature; every array holds `rows`
        // entries and the logits `rows * vocab`.
        unsafe { b.launch(cfg) }.w()?;
        Ok(dev.clone_dtoh(&out)?)
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
