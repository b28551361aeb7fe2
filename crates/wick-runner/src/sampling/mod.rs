//! Drawing the next token from a row of logits: logit bias, penalties, temperature, top-k,
//! top-p, min-p, and log-probabilities.

pub(crate) mod device;

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wick_core::{SamplingParams, TokenConstraint, TokenLogprobs};

/// One request's sampler: its parameters, its own random generator (so the same seed and
/// request give the same tokens whatever else is running), and what the penalties need.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Times each token was generated (presence and frequency penalties).
    generated: HashMap<u32, u32>,
    /// Tokens of the prompt (repetition penalty).
    prompt: Vec<u32>,
    logits: Vec<f32>,
}

/// A drawn token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub id: u32,
    pub logprobs: Option<TokenLogprobs>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        let mut prompt = if params.repetition_penalty != 1.0 {
            prompt.to_vec()
        } else {
            Vec::new()
        };
        prompt.sort_unstable();
        prompt.dedup();
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
            generated: HashMap::new(),
            prompt,
            logits: Vec::new(),
        }
    }

    fn processes_logits(&self) -> bool {
        let p = &self.params;
        !p.logit_bias.is_empty()
            || p.presence_penalty != 0.0
            || p.frequency_penalty != 0.0
            || p.repetition_penalty != 1.0
    }

    /// Applies bias and penalties to a copy of `raw` (in `self.logits`).
    fn process(&mut self, raw: &[f32]) {
        self.logits.clear();
        self.logits.extend_from_slice(raw);
        let p = &self.params;
        let n = self.logits.len();
        for &(id, bias) in &p.logit_bias {
            if let Some(l) = self.logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            let seen = self.prompt.iter().chain(self.generated.keys());
            for &id in seen.filter(|&&id| (id as usize) < n) {
                let l = &mut self.logits[id as usize];
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
        }
        for (&id, &count) in &self.generated {
            if let Some(l) = self.logits.get_mut(id as usize) {
                *l -= p.presence_penalty + p.frequency_penalty * count as f32;
            }
        }
    }

    /// This request's draw for the device sampler, drawing its uniform from the request's
    /// generator; `None` when the draw needs the host (logit bias, penalties, log-probs).
    pub fn device_draw(&mut self) -> Option<crate::DrawParams> {
        if self.processes_logits() || self.params.logprobs.is_some() {
            return None;
        }
        let p = &self.params;
        Some(crate::DrawParams {
            temperature: p.temperature,
            top_k: u32::try_from(p.top_k).unwrap_or(u32::MAX),
            top_p: p.top_p,
            min_p: p.min_p,
            uniform: if p.temperature > 0.0 {
                self.rng.random::<f32>()
            } else {
                0.0
            },
        })
    }

    /// Records a token drawn on the device (after [`Sampler::device_draw`]).
    pub fn accept(&mut self, id: u32) -> Sampled {
        *self.generated.entry(id).or_insert(0) += 1;
        Sampled { id, logprobs: None }
    }

    pub fn sample(&mut self, raw: &[f32]) -> Sampled {
        let processed = self.processes_logits();
        if processed {
            self.process(raw);
        }
        let logits: &[f32] = if processed { &self.logits } else { raw };
        let id = if self.params.temperature <= 0.0 {
            argmax(logits)
        } else {
            let fallback = argmax(logits);
            let candidates = self.candidates(logits);
            self.draw(&candidates).unwrap_or(fallback)
        };
        *self.generated.entry(id).or_insert(0) += 1;
        let logprobs = self.params.logprobs.map(|n| logprobs(raw, id, n));
        Sampled { id, logprobs }
    }

    /// Tokens left after temperature, top-k, top-p and min-p, with their unnormalized
    /// probabilities, most likely first when filtered.
    pub(crate) fn candidates(&self, logits: &[f32]) -> Vec<(f32, u32)> {
        let p = &self.params;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv_t = 1.0 / p.temperature;
        let mut probs: Vec<(f32, u32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (((l - max) * inv_t).exp(), i as u32))
            .filter(|(w, _)| *w > 0.0)
            .collect();
        let by_prob = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if p.top_k > 0 && p.top_k < probs.len() {
            probs.select_nth_unstable_by(p.top_k - 1, by_prob);
            probs.truncate(p.top_k);
        }
        if p.min_p > 0.0 {
            // Relative to the largest weight (exp(0) = 1, or less after top-k ties).
            let top = probs.iter().map(|x| x.0).fold(0.0, f32::max);
            probs.retain(|(w, _)| *w >= p.min_p * top);
        }
        if p.top_p < 1.0 {
            let total: f32 = probs.iter().map(|(w, _)| w).sum();
            // Only the head of the distribution is sorted: the `n` largest, doubling `n`
            // until they hold the top_p mass (usually a few dozen of the whole vocabulary).
            let mut n = 64;
            while n < probs.len() {
                probs.select_nth_unstable_by(n - 1, by_prob);
                let head: f32 = probs[..n].iter().map(|(w, _)| w).sum();
                if head >= p.top_p * total {
                    probs.truncate(n);
                    break;
                }
                n *= 2;
            }
            probs.sort_unstable_by(by_prob);
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, (w, _)) in probs.iter().enumerate() {
                acc += w;
                if acc >= p.top_p * total {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        probs
    }

    fn draw(&mut self, candidates: &[(f32, u32)]) -> Option<u32> {
        let total: f32 = candidates.iter().map(|(w, _)| w).sum();
        let mut r = self.rng.random::<f32>() * total;
        for &(w, id) in candidates {
            if r < w {
                return Some(id);
            }
            r -= w;
        }
        candidates.last().map(|&(_, id)| id)
    }
}

/// One sampling sequence's state for a step that draws its next token: its sampler and, for
/// structured output, its grammar (which masks the row before the draw and is fed the drawn
/// token; a row with a grammar is drawn on the host).
pub struct SeqSampling<'a> {
    pub sampler: &'a mut Sampler,
    pub constraint: Option<&'a mut dyn TokenConstraint>,
}

/// One sequence's draw: its token, or why its grammar refused (which fails that request
/// alone).
pub type Draw = std::result::Result<Sampled, String>;

impl SeqSampling<'_> {
    /// The draw to make on the device, where the row needs nothing of the host (no grammar,
    /// no logit processing, no log-probabilities); it takes the request's next uniform.
    pub(crate) fn device_draw(&mut self) -> Option<crate::DrawParams> {
        if self.constraint.is_some() {
            return None;
        }
        self.sampler.device_draw()
    }

    /// Draws from `row` on the host: masked by the grammar first, the grammar fed the token
    /// after.
    pub fn sample_host(&mut self, row: &mut [f32]) -> Draw {
        if let Some(c) = self.constraint.as_deref_mut() {
            c.mask(row)?;
        }
        let drawn = self.sampler.sample(row);
        if let Some(c) = self.constraint.as_deref_mut() {
            c.consume(drawn.id)?;
        }
        Ok(drawn)
    }
}

/// Draws each row on the host with its sequence's state (rows and states in the same order,
/// as many of each): what a step that only computes logits gives each sequence.
pub fn draw_on_host(rows: Vec<Vec<f32>>, seqs: &mut [SeqSampling<'_>]) -> crate::Result<Vec<Draw>> {
    if rows.len() != seqs.len() {
        return Err(crate::RunnerError::Step(format!(
            "{} rows of logits, {} sampling states",
            rows.len(),
            seqs.len()
        )));
    }
    Ok(rows
        .into_iter()
        .zip(seqs.iter_mut())
        .map(|(mut row, s)| s.sample_host(&mut row))
        .collect())
}

/// The model's log-probabilities (log-softmax of the raw logits) of `id` and of the `n`
/// most likely tokens. Tokens a constraint ruled out (a logit of -inf) are not among them:
/// they have no log-probability to report, so fewer than `n` may come back.
pub fn logprobs(raw: &[f32], id: u32, n: usize) -> TokenLogprobs {
    let max = raw.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = raw.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    let lp = |l: f32| (l as f64 - lse) as f32;
    let mut top: Vec<(u32, f32)> = Vec::new();
    if n > 0 {
        let mut all: Vec<(u32, f32)> = raw
            .iter()
            .enumerate()
            .filter(|&(_, &l)| l > f32::NEG_INFINITY)
            .map(|(i, &l)| (i as u32, l))
            .collect();
        let by = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if n < all.len() {
            all.select_nth_unstable_by(n - 1, by);
            all.truncate(n);
        }
        all.sort_unstable_by(by);
        top = all.into_iter().map(|(i, l)| (i, lp(l))).collect();
    }
    TokenLogprobs {
        logprob: raw
            .get(id as usize)
            .map(|&l| lp(l))
            .unwrap_or(f32::NEG_INFINITY),
        top,
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
mod tests;
