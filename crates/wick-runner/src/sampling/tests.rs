use super::*;

fn params(temperature: f32, top_p: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        top_p,
        seed: Some(seed),
        ..SamplingParams::default()
    }
}

fn draws(p: SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
    let mut s = Sampler::new(p, &[]);
    (0..n).map(|_| s.sample(logits).id).collect()
}

#[test]
fn greedy_takes_the_first_maximum_and_skips_nan() {
    let mut s = Sampler::new(params(0.0, 1.0, 1), &[]);
    assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]).id, 1);
    assert_eq!(s.sample(&[f32::NAN, 0.5, 0.2]).id, 1);
}

#[test]
fn same_seed_same_tokens() {
    let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
    assert_eq!(
        draws(params(1.0, 1.0, 7), &logits, 50),
        draws(params(1.0, 1.0, 7), &logits, 50)
    );
    assert_ne!(
        draws(params(1.0, 1.0, 7), &logits, 50),
        draws(params(1.0, 1.0, 8), &logits, 50)
    );
}

#[test]
fn top_p_keeps_only_the_nucleus() {
    // Token 0 has ~88% of the mass, token 1 ~12%, the rest almost nothing.
    let logits = [5.0, 3.0, -5.0, -5.0, -5.0];
    assert!(draws(params(1.0, 0.5, 3), &logits, 200)
        .iter()
        .all(|&t| t == 0));
    let d = draws(params(1.0, 0.95, 3), &logits, 400);
    assert!(d.iter().all(|&t| t <= 1));
    assert!(d.contains(&1));
}

#[test]
fn temperature_follows_the_distribution() {
    // p = softmax([ln 3, 0]) = [0.75, 0.25]
    let logits = [3f32.ln(), 0.0];
    let n = 20_000;
    let ones = draws(params(1.0, 1.0, 11), &logits, n)
        .iter()
        .filter(|&&t| t == 1)
        .count();
    let frac = ones as f64 / n as f64;
    assert!((frac - 0.25).abs() < 0.02, "got {frac}");
    assert!(draws(params(0.1, 1.0, 11), &logits, 500)
        .iter()
        .all(|&t| t == 0));
}

#[test]
fn top_k_keeps_the_k_most_likely() {
    let logits = [1.0, 4.0, 3.0, 2.0, 0.0];
    let p = SamplingParams {
        top_k: 2,
        ..params(2.0, 1.0, 5)
    };
    let d = draws(p, &logits, 500);
    assert!(d.iter().all(|&t| t == 1 || t == 2));
    assert!(d.contains(&1) && d.contains(&2));
}

#[test]
fn min_p_drops_the_unlikely() {
    // Relative weights 1, e^-1 (0.37), e^-3 (0.05): min_p 0.2 keeps the first two.
    let logits = [3.0, 2.0, 0.0];
    let p = SamplingParams {
        min_p: 0.2,
        ..params(1.0, 1.0, 5)
    };
    let d = draws(p, &logits, 1000);
    assert!(d.iter().all(|&t| t != 2));
    assert!(d.contains(&1));
}

#[test]
fn logit_bias_can_force_or_forbid() {
    let logits = [2.0, 1.0, 0.0];
    let p = SamplingParams {
        logit_bias: vec![(2, 100.0)],
        ..params(0.0, 1.0, 1)
    };
    assert_eq!(draws(p, &logits, 3), vec![2, 2, 2]);
    let p = SamplingParams {
        logit_bias: vec![(0, -100.0)],
        ..params(1.0, 1.0, 1)
    };
    assert!(draws(p, &logits, 300).iter().all(|&t| t != 0));
}

#[test]
fn presence_and_frequency_penalties_push_away_from_repeats() {
    let logits = [1.0, 0.5, 0.0];
    // Greedy picks 0 forever without a penalty...
    assert_eq!(draws(params(0.0, 1.0, 1), &logits, 3), vec![0, 0, 0]);
    // ... a presence penalty of 0.6 makes 0 (0.4) lose to 1 (0.5) once 0 was generated;
    // then 1 is penalized too (-0.1), and 0 (0.4) beats 2 (0.0).
    let p = SamplingParams {
        presence_penalty: 0.6,
        ..params(0.0, 1.0, 1)
    };
    assert_eq!(draws(p, &logits, 3), vec![0, 1, 0]);
    // A frequency penalty grows with each repeat: 0 (1.0), 0 (0.7), then 1 (0.5 > 0.4).
    let p = SamplingParams {
        frequency_penalty: 0.3,
        ..params(0.0, 1.0, 1)
    };
    assert_eq!(draws(p, &logits, 3), vec![0, 0, 1]);
}

#[test]
fn repetition_penalty_covers_the_prompt() {
    let logits = [2.0, 1.5, -1.0];
    let p = SamplingParams {
        repetition_penalty: 2.0,
        ..params(0.0, 1.0, 1)
    };
    // Token 0 is in the prompt: 2.0 / 2 = 1.0 < 1.5.
    let mut s = Sampler::new(p, &[0]);
    assert_eq!(s.sample(&logits).id, 1);
}

#[test]
fn logprobs_are_the_models_log_softmax() {
    let logits = [2.0f32, 1.0, 0.0];
    let p = SamplingParams {
        logprobs: Some(2),
        ..params(0.0, 1.0, 1)
    };
    let out = Sampler::new(p, &[]).sample(&logits);
    let z: f32 = logits.iter().map(|l| l.exp()).sum();
    let lp = out.logprobs.unwrap();
    assert!((lp.logprob - (2f32.exp() / z).ln()).abs() < 1e-5);
    assert_eq!(lp.top.len(), 2);
    assert_eq!(lp.top[0].0, 0);
    assert_eq!(lp.top[1].0, 1);
    assert!((lp.top[1].1 - (1f32.exp() / z).ln()).abs() < 1e-5);
}

#[test]
fn tokens_a_constraint_rules_out_have_no_top_logprob() {
    let masked = [f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY, 0.0];
    let lp = logprobs(&masked, 1, 3);
    let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
    assert_eq!(ids, [1, 3]);
    assert!(lp.top.iter().all(|t| t.1.is_finite()));
    assert!(logprobs(&[f32::NEG_INFINITY; 4], 0, 2).top.is_empty());
}

/// The nucleus found by partial selection is the one a full sort gives, for flat and
/// peaked distributions over a real vocabulary's size.
#[test]
fn top_p_on_a_large_vocabulary_equals_the_full_sort() {
    for (spread, top_p) in [(0.5f32, 0.9f32), (3.0, 0.95), (8.0, 0.5), (0.01, 0.99)] {
        let logits: Vec<f32> = (0..49_152u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) >> 8) as f32 / (1u32 << 24) as f32) * spread)
            .collect();
        let s = Sampler::new(params(1.0, top_p, 1), &[]);
        let got: Vec<u32> = s.candidates(&logits).iter().map(|&(_, id)| id).collect();
        // Reference: every weight, fully sorted, cut at the top_p mass.
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut all: Vec<(f32, u32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| ((l - max).exp(), i as u32))
            .collect();
        // The total in vocabulary order, as the sampler sums it.
        let total: f32 = all.iter().map(|x| x.0).sum();
        all.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut acc = 0.0;
        let keep = all
            .iter()
            .position(|x| {
                acc += x.0;
                acc >= top_p * total
            })
            .map_or(all.len(), |i| i + 1);
        let want: Vec<u32> = all[..keep].iter().map(|x| x.1).collect();
        assert_eq!(got.len(), want.len(), "spread {spread}, top_p {top_p}");
        assert!(
            got == want,
            "spread {spread}, top_p {top_p}: same length, other tokens"
        );
    }
}

/// Which rows the runner may draw on the device: those that need nothing of the host (no
/// grammar, no logit processing, no log-probabilities).
#[test]
fn only_rows_that_need_nothing_of_the_host_are_drawn_on_the_device() {
    #[derive(Debug)]
    struct Any;
    impl TokenConstraint for Any {
        fn mask(&mut self, _: &mut [f32]) -> Result<(), String> {
            Ok(())
        }
        fn consume(&mut self, _: u32) -> Result<(), String> {
            Ok(())
        }
        fn is_finished(&self) -> bool {
            false
        }
    }
    let mut plain = Sampler::new(params(0.7, 0.9, 1), &[]);
    let mut with_logprobs = Sampler::new(
        SamplingParams {
            logprobs: Some(2),
            ..params(0.0, 1.0, 1)
        },
        &[],
    );
    let mut biased = Sampler::new(
        SamplingParams {
            logit_bias: vec![(3, 1.0)],
            ..params(0.0, 1.0, 1)
        },
        &[],
    );
    let mut grammar = Any;
    let mut constrained = Sampler::new(params(0.0, 1.0, 1), &[]);
    let mut seqs = [
        SeqSampling {
            sampler: &mut plain,
            constraint: None,
        },
        SeqSampling {
            sampler: &mut with_logprobs,
            constraint: None,
        },
        SeqSampling {
            sampler: &mut biased,
            constraint: None,
        },
        SeqSampling {
            sampler: &mut constrained,
            constraint: Some(&mut grammar),
        },
    ];
    let on_device: Vec<bool> = seqs.iter_mut().map(|s| s.device_draw().is_some()).collect();
    assert_eq!(on_device, vec![true, false, false, false]);
}

/// A grammar masks the row before the draw and is fed the drawn token; its refusal is that
/// row's error alone.
#[test]
fn host_rows_are_masked_by_their_grammar() {
    #[derive(Debug)]
    struct Only(u32, Vec<u32>);
    impl TokenConstraint for Only {
        fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
            for (i, l) in logits.iter_mut().enumerate() {
                if i as u32 != self.0 {
                    *l = f32::NEG_INFINITY;
                }
            }
            Ok(())
        }
        fn consume(&mut self, t: u32) -> Result<(), String> {
            self.1.push(t);
            Err(format!("saw {t}"))
        }
        fn is_finished(&self) -> bool {
            false
        }
    }
    let (mut a, mut b) = (
        Sampler::new(params(0.0, 1.0, 1), &[]),
        Sampler::new(params(0.0, 1.0, 1), &[]),
    );
    let mut g = Only(2, Vec::new());
    let rows = vec![vec![0.0, 5.0, 1.0], vec![0.0, 5.0, 1.0]];
    let draws = draw_on_host(
        rows,
        &mut [
            SeqSampling {
                sampler: &mut a,
                constraint: Some(&mut g),
            },
            SeqSampling {
                sampler: &mut b,
                constraint: None,
            },
        ],
    )
    .unwrap();
    assert_eq!(draws[0], Err("saw 2".to_string()));
    assert_eq!(draws[1].as_ref().map(|d| d.id), Ok(1));
    assert_eq!(g.1, vec![2]);
}
