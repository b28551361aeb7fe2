use super::matmul::tile;
use super::*;
use crate::cpu::Isa;
use crate::quant::WeightType;

fn lcg(seed: &mut u64) -> u32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*seed >> 33) as u32
}

fn activations(t: usize, k: usize, seed: &mut u64) -> Vec<f32> {
    (0..t * k)
        .map(|_| (lcg(seed) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

fn run(w: &Packed, x: &[f32], t: usize) -> Vec<f32> {
    let mut a = Acts::default();
    a.quantize_for(w, x, t);
    let mut out = vec![f32::NAN; t * w.n];
    matmul(w, &a, &mut out);
    out
}

/// Every kernel path (the ones this CPU has) over the whole matrix.
fn run_path(w: &Packed, x: &[f32], t: usize, isa: Isa) -> Vec<f32> {
    let mut a = Acts::default();
    a.quantize_for(w, x, t);
    let mut out = vec![f32::NAN; t * w.n];
    let o = Out::new(&mut out);
    for ti in 0..w.tiles {
        for t0 in (0..t).step_by(TOKENS) {
            // SAFETY: the whole matrix, one tile at a time, on this thread.
            unsafe { tile(w, &a, ti, t0, TOKENS.min(t - t0), isa, o) };
        }
    }
    out
}

fn matrix(ty: WeightType, n: usize, k: usize, seed: u64) -> (Vec<u8>, Packed, Vec<f32>) {
    let mut seed = seed;
    let data = super::random_blocks(ty, n, k, &mut seed);
    let w = Packed::new(ty, &data, n, k).unwrap();
    let mut dense = vec![0f32; n * k];
    ty.dequantize(&data, &mut dense);
    (data, w, dense)
}

#[test]
fn products_match_the_dequantized_weights() {
    for ty in TYPES {
        let (n, k, t) = (40, 512, 11); // a partial tile, and 11 = 8 + 3 tokens
        let (_, w, dense) = matrix(ty, n, k, 7);
        let mut seed = 8;
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
                    "{ty} t{ti} r{r}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn rows_dequantize_as_the_file_blocks() {
    for ty in TYPES {
        let (n, k) = (40, 512);
        let (_, w, dense) = matrix(ty, n, k, 9);
        let mut row = vec![0f32; k];
        for r in [0, 15, 16, 39] {
            w.row(r, &mut row);
            let want = &dense[r * k..(r + 1) * k];
            assert_eq!(row, want, "{ty} row {r}");
        }
    }
}

#[test]
fn each_token_gets_the_same_bits_alone_or_in_any_batch() {
    for ty in TYPES {
        let (n, k) = (64, 768);
        let (_, w, _) = matrix(ty, n, k, 3);
        let mut seed = 4;
        let x = activations(19, k, &mut seed);
        let all = run(&w, &x, 19);
        for t in [0, 5, 8, 18] {
            let alone = run(&w, &x[t * k..(t + 1) * k], 1);
            assert_eq!(alone, all[t * n..(t + 1) * n], "{ty} token {t}");
        }
        let four = run(&w, &x[4 * k..8 * k], 4);
        assert_eq!(four, all[4 * n..8 * n], "{ty}");
    }
}

#[test]
fn every_path_gives_the_same_bits() {
    use crate::cpu::int8_isa_within;
    use crate::SimdLimit;
    let mut paths = vec![Isa::Portable];
    for limit in [SimdLimit::NoAvx512, SimdLimit::Widest] {
        let isa = int8_isa_within(limit);
        if !paths.contains(&isa) {
            paths.push(isa);
        }
    }
    for ty in TYPES {
        let (n, k, t) = (44, 512, 11); // a partial tile (44 = 2 x 16 + 12), 8 + 3 tokens
        let (_, w, _) = matrix(ty, n, k, 5);
        let mut seed = 6;
        let x = activations(t, k, &mut seed);
        let slow = run_path(&w, &x, t, Isa::Portable);
        for &isa in &paths[1..] {
            assert_eq!(run_path(&w, &x, t, isa), slow, "{ty} {isa:?}");
        }
        assert_eq!(run(&w, &x, t), slow, "{ty}: the dispatching path");
    }
}

#[test]
fn packed_weights_take_about_the_file_size() {
    for ty in TYPES {
        let (n, k) = (64, 1024);
        let (data, w, _) = matrix(ty, n, k, 1);
        let ratio = w.bytes() as f64 / data.len() as f64;
        // Q3_K is kept in the 6-bit layout (3.4 bits a weight in the file, 6.6 here).
        let bound = if ty == WeightType::Q3K { 2.0 } else { 1.25 };
        assert!(ratio <= bound, "{ty}: {ratio:.3}");
    }
}

#[test]
fn malformed_matrices_are_refused() {
    assert!(Packed::new(WeightType::Q4K, &[0; 144], 1, 128).is_err());
    assert!(Packed::new(WeightType::Q8_0, &[0; 33], 1, 32).is_err());
    assert!(Packed::new(WeightType::Q2K, &[0; 84], 1, 256).is_err());
    assert!(Packed::new(WeightType::F16, &[0; 64], 1, 32).is_err());
    // Data of the right length for 16x64 only: every other shape, zero sizes, and a row
    // count whose byte size overflows.
    let mut seed = 3;
    let data = random_blocks(WeightType::Q4_0, 16, 64, &mut seed);
    assert!(Packed::new(WeightType::Q4_0, &data, 16, 64).is_ok());
    for (n, k) in [
        (17, 64),
        (16, 32),
        (0, 64),
        (16, 0),
        (16, 48),
        (usize::MAX, 64),
    ] {
        assert!(
            Packed::new(WeightType::Q4_0, &data, n, k).is_err(),
            "{n}x{k} accepted"
        );
    }
}

#[test]
#[should_panic(expected = "not quantized for this")]
fn activations_quantized_for_another_layout_are_refused() {
    let mut seed = 5;
    let q8 = Packed::new(
        WeightType::Q8_0,
        &random_blocks(WeightType::Q8_0, 16, 256, &mut seed),
        16,
        256,
    )
    .unwrap();
    let q4k = Packed::new(
        WeightType::Q4K,
        &random_blocks(WeightType::Q4K, 16, 256, &mut seed),
        16,
        256,
    )
    .unwrap();
    let mut a = Acts::default();
    a.quantize_for(&q8, &activations(2, 256, &mut seed), 2);
    // Blocks of 32 without the sums per 16 that the K-quant kernels read.
    matmul(&q4k, &a, &mut [0.0; 32]);
}

#[test]
#[should_panic]
fn an_output_of_the_wrong_size_is_refused() {
    let mut seed = 9;
    let (_, w, _) = matrix(WeightType::Q4_1, 16, 64, 1);
    let mut a = Acts::default();
    a.quantize_for(&w, &activations(2, 64, &mut seed), 2);
    matmul(&w, &a, &mut [0.0; 31]);
}
