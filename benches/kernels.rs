//! Each packed kernel alone on one MLP-sized matrix ([3072, 768]: the weights of every type
//! on the same shape) at 1, 8 and 64 tokens, in GOP/s (2 operations per multiply-add; the
//! activations' quantization included, as a step pays it), median of several runs, with each
//! type's ratio to Q4_1 at the same token count. Beside them, candle's dense f32 matmul (the
//! `gemm` crate) on the same shape at 64 tokens.
//!
//! `cargo bench -p wick-runner --features testing --bench kernels` (or `make bench-kernels`); `WICK_BENCH_QUICK=1`
//! runs each case once (CI's smoke run: it checks the code runs, not its speed).

use std::time::Instant;

use wick_runner::qgemm::{matmul, random_blocks, Acts, Packed, TYPES};
use wick_runner::quant::WeightType;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Seconds per call, median over `runs` timed batches of `reps` calls.
fn time(runs: usize, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..reps {
                    f();
                }
                t.elapsed().as_secs_f64() / reps as f64
            })
            .collect(),
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let quick = std::env::var_os("WICK_BENCH_QUICK").is_some();
    let runs = if quick { 1 } else { 11 };
    let (n, k) = (3072usize, 768usize);
    let tokens = [1usize, 8, 64];
    let mut seed = 1u64;
    let x: Vec<f32> = (0..64 * k)
        .map(|i| (i * 7919 % 2003) as f32 / 1001.0 - 1.0)
        .collect();
    let mut rows = Vec::new();
    for ty in TYPES {
        let data = random_blocks(ty, n, k, &mut seed);
        let w = Packed::new(ty, &data, n, k).expect("pack");
        let mut acts = Acts::default();
        let mut out = vec![0f32; 64 * n];
        let gops: Vec<f64> = tokens
            .iter()
            .map(|&t| {
                let reps = if quick { 1 } else { 320 / t };
                let s = time(runs, reps, || {
                    acts.quantize_for(&w, &x[..t * k], t);
                    matmul(&w, &acts, &mut out[..t * n]);
                });
                (2 * n * k * t) as f64 / s / 1e9
            })
            .collect();
        rows.push((ty, gops));
    }
    let q4_1 = rows
        .iter()
        .find(|(ty, _)| *ty == WeightType::Q4_1)
        .map(|(_, g)| g.clone())
        .expect("Q4_1 measured");
    println!("packed kernels on [{n}, {k}], GOP/s (ratio to Q4_1) by tokens per step:");
    println!(
        "{:<6} {:>16} {:>16} {:>16}",
        "type", "1 token", "8 tokens", "64 tokens"
    );
    for (ty, g) in &rows {
        let cell = |i: usize| format!("{:.1} ({:.2})", g[i], g[i] / q4_1[i]);
        println!(
            "{:<6} {:>16} {:>16} {:>16}",
            ty.name(),
            cell(0),
            cell(1),
            cell(2)
        );
    }
    let xs = candle_core::Tensor::from_vec(x, (64, k), &candle_core::Device::Cpu).expect("x");
    let wd = candle_core::Tensor::zeros((k, n), candle_core::DType::F32, &candle_core::Device::Cpu)
        .expect("w");
    let s = time(runs, if quick { 1 } else { 5 }, || {
        xs.matmul(&wd).expect("matmul");
    });
    println!(
        "dense f32 (candle's gemm), 64 tokens: {:.1} GOP/s",
        (2 * n * k * 64) as f64 / s / 1e9
    );
}
