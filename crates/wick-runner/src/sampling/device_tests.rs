use candle_core::{Device, Tensor};

use super::*;
use crate::test_support::rng;

/// Sampling parameters of the kinds requests send.
fn draws() -> Vec<DrawParams> {
    let p = |temperature, top_k, top_p, min_p| DrawParams {
        temperature,
        top_k,
        top_p,
        min_p,
        uniform: 0.5,
    };
    vec![
        p(1.0, 0, 1.0, 0.0),
        p(0.7, 40, 1.0, 0.0),
        p(0.8, 0, 0.9, 0.0),
        p(1.2, 0, 1.0, 0.05),
        p(0.6, 50, 0.95, 0.02),
        p(1.0, 1, 1.0, 0.0),
        p(2.0, 0, 0.5, 0.0),
    ]
}

fn logits_row(vocab: usize, seed: u64) -> Vec<f32> {
    let mut r = rng(seed);
    (0..vocab)
        .map(|_| r() * 6.0 + if r() > 0.98 { 8.0 } else { 0.0 })
        .collect()
}

#[test]
fn greedy_device_draws_equal_the_host_argmax() {
    let mut rows = vec![logits_row(49_152, 1), logits_row(1000, 2)];
    rows[1][17] = 100.0;
    rows[1][900] = 100.0; // a tie: the first index
    rows[1][3] = f32::NAN;
    for row in &rows {
        let p = DrawParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            uniform: 0.3,
        };
        assert_eq!(reference(row, &p).0, crate::argmax(row));
    }
}

/// The tokens the device draw keeps, and their probabilities, are the host sampler's.
#[test]
fn kept_tokens_and_probabilities_equal_the_host_samplers() {
    let vocab = 49_152;
    for (i, p) in draws().into_iter().enumerate() {
        let row = logits_row(vocab, 10 + i as u64);
        let params = wick_core::SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k as usize,
            top_p: p.top_p,
            min_p: p.min_p,
            ..Default::default()
        };
        let host = crate::Sampler::new(params, &[]);
        let mut want = host.candidates(&row);
        want.sort_by_key(|x| x.1);
        let (_, got) = reference(&row, &p);
        let ids = |v: &[(u32, f32)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
        let want: Vec<(u32, f32)> = want.iter().map(|&(w, id)| (id, w)).collect();
        assert_eq!(ids(&got), ids(&want), "{p:?}");
        let norm = |v: &[(u32, f32)]| {
            let s: f64 = v.iter().map(|x| x.1 as f64).sum();
            v.iter().map(|x| x.1 as f64 / s).collect::<Vec<_>>()
        };
        for (a, b) in norm(&got).iter().zip(norm(&want)) {
            assert!((a - b).abs() < 1e-6, "{p:?}: {a} {b}");
        }
    }
}

/// The draw is the inverse of the kept tokens' cumulative distribution in index order.
#[test]
fn the_draw_inverts_the_distribution_in_index_order() {
    let row = logits_row(5000, 3);
    for base in draws() {
        for u in [0.0, 0.01, 0.3, 0.5, 0.77, 0.999_999] {
            let p = DrawParams { uniform: u, ..base };
            let (id, kept) = reference(&row, &p);
            let total: f64 = kept.iter().map(|x| x.1 as f64).sum();
            let mut acc = 0.0;
            let mut want = kept.last().unwrap().0;
            for &(i, w) in &kept {
                acc += w as f64 / total;
                if (u as f64) < acc {
                    want = i;
                    break;
                }
            }
            // f32 sums against f64: a neighbour at a boundary is rounding, anything else not.
            let pos = |x: u32| kept.iter().position(|k| k.0 == x).unwrap() as i64;
            assert!((pos(id) - pos(want)).abs() <= 1, "{p:?}: {id} vs {want}");
        }
    }
    let logits = Tensor::new(&[[0f32, 1.0], [2.0, 0.0]], &Device::Cpu).unwrap();
    let e = draw(&logits, &draws()[..1]).unwrap_err().to_string();
    assert!(e.contains("2 rows of logits, 1 draws"), "{e}");
    let greedy = DrawParams {
        temperature: 0.0,
        ..draws()[0]
    };
    assert_eq!(draw(&logits, &[greedy, greedy]).unwrap(), vec![1, 0]);
}
