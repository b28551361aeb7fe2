//! Drawing the next token from a row of logits.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wick_core::SamplingParams;

/// One request's sampler: its parameters and its own random generator, so that the same
/// seed and request give the same tokens whatever else is running.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        let mut probs: Vec<(f32, u32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (((l - max) * inv_t).exp(), i as u32))
            .filter(|(p, _)| *p > 0.0)
            .collect();
        let total: f32 = probs.iter().map(|(p, _)| p).sum();
        let mut mass = total;
        if self.params.top_p < 1.0 {
            probs.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let target = self.params.top_p * total;
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, (p, _)) in probs.iter().enumerate() {
                acc += p;
                if acc >= target {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            mass = acc.min(total);
        }
        let mut r = self.rng.random::<f32>() * mass;
        for &(p, id) in &probs {
            if r < p {
                return id;
            }
            r -= p;
        }
        probs
            .last()
            .map(|&(_, id)| id)
            .unwrap_or_else(|| argmax(logits))
    }
}

/// Index of the largest logit; the first one on ties, NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            seed: Some(seed),
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum_and_skips_nan() {
        let mut s = Sampler::new(params(0.0, 1.0, 1));
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
        assert_eq!(s.sample(&[f32::NAN, 0.5, 0.2]), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 1.0, seed));
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Token 0 has ~88% of the mass, token 1 ~12%, the rest almost nothing.
        let logits = [5.0, 3.0, -5.0, -5.0, -5.0];
        let mut s = Sampler::new(params(1.0, 0.5, 3));
        assert!((0..200).all(|_| s.sample(&logits) == 0));
        let mut s = Sampler::new(params(1.0, 0.95, 3));
        let draws: Vec<u32> = (0..400).map(|_| s.sample(&logits)).collect();
        assert!(draws.iter().all(|&t| t <= 1));
        assert!(draws.contains(&1));
    }

    #[test]
    fn temperature_follows_the_distribution() {
        // p = softmax([ln 3, 0]) = [0.75, 0.25]
        let logits = [3f32.ln(), 0.0];
        let mut s = Sampler::new(params(1.0, 1.0, 11));
        let n = 20_000;
        let ones = (0..n).filter(|_| s.sample(&logits) == 1).count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.25).abs() < 0.02, "got {frac}");
        // Low temperature sharpens towards the argmax.
        let mut s = Sampler::new(params(0.1, 1.0, 11));
        assert!((0..500).all(|_| s.sample(&logits) == 0));
    }
}
