//! What a step costs, measured: the engine times each step (and the runner its attention) and
//! [`CostFit`] keeps a running estimate of [`StepCost`], which the scheduler uses to size
//! prompt chunks so that a step with decoding streams stays within a latency budget.

/// Seconds a step takes: `fixed + per_token * tokens + per_attended * attended`, where
/// `attended` counts, over the step's tokens, the cached positions each one attends to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCost {
    pub fixed: f64,
    pub per_token: f64,
    pub per_attended: f64,
}

/// Positions the `chunk` tokens from `start` attend to (each its own and every earlier one).
pub fn attended(start: usize, chunk: usize) -> f64 {
    let (s, c) = (start as f64, chunk as f64);
    c * s + c * (c + 1.0) / 2.0
}

impl StepCost {
    /// Seconds of `tokens` tokens attending to `attended` positions, without the fixed part.
    pub fn variable(&self, tokens: usize, attended: f64) -> f64 {
        self.per_token * tokens as f64 + self.per_attended * attended
    }

    /// The longest chunk of at most `pending` prompt tokens from position `start` that costs
    /// at most `seconds`.
    pub fn max_chunk(&self, start: usize, pending: usize, seconds: f64) -> usize {
        if seconds.is_nan() || seconds <= 0.0 {
            return 0;
        }
        // The cost grows with the chunk: bisect.
        let (mut lo, mut hi) = (0, pending);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if self.variable(mid, attended(start, mid)) <= seconds {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }
}

/// A running fit of [`StepCost`] from measured steps, weighted toward the recent ones: the
/// attention's share from the attention time the runner reports, the rest split into a fixed
/// part and a part per token by least squares over the steps' token counts.
#[derive(Debug, Clone, Default)]
pub struct CostFit {
    /// Exponentially weighted sums over steps of 1, x (tokens), y (seconds outside
    /// attention), x*x, x*y; and of attended positions and attention seconds.
    n: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
    s_att: f64,
    s_att_time: f64,
    steps: u64,
    last: Option<StepCost>,
}

/// Weight of the past per new step: about the last 200 steps count.
const DECAY: f64 = 0.995;
/// Steps measured before the fit is trusted.
const WARM_UP: u64 = 8;

impl CostFit {
    /// Records a step of `tokens` tokens attending to `attended` positions that took
    /// `seconds`, `attention_seconds` of it in attention.
    pub fn observe(&mut self, tokens: usize, attended: f64, seconds: f64, attention_seconds: f64) {
        if tokens == 0 || !(seconds.is_finite() && attention_seconds.is_finite()) {
            return;
        }
        let (x, y) = (tokens as f64, (seconds - attention_seconds).max(0.0));
        self.n = self.n * DECAY + 1.0;
        self.sx = self.sx * DECAY + x;
        self.sy = self.sy * DECAY + y;
        self.sxx = self.sxx * DECAY + x * x;
        self.sxy = self.sxy * DECAY + x * y;
        self.s_att = self.s_att * DECAY + attended;
        self.s_att_time = self.s_att_time * DECAY + attention_seconds.max(0.0);
        self.steps += 1;
        self.last = self.solve().or(self.last);
    }

    /// The current estimate, once enough steps were measured.
    pub fn cost(&self) -> Option<StepCost> {
        self.last
    }

    fn solve(&self) -> Option<StepCost> {
        if self.steps < WARM_UP {
            return None;
        }
        let var = self.n * self.sxx - self.sx * self.sx;
        let mean_x = self.sx / self.n;
        // Steps of (nearly) one size say nothing about the split: keep the last estimate,
        // or, at first, charge everything per token.
        let per_token = if var > 1e-6 * self.n * self.n * mean_x.max(1.0) {
            ((self.n * self.sxy - self.sx * self.sy) / var).max(0.0)
        } else {
            match self.last {
                Some(c) => c.per_token,
                None => self.sy / self.sx,
            }
        };
        let fixed = ((self.sy - per_token * self.sx) / self.n).max(0.0);
        let per_attended = if self.s_att > 0.0 {
            self.s_att_time / self.s_att
        } else {
            0.0
        };
        Some(StepCost {
            fixed,
            per_token,
            per_attended,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_recovers_a_linear_cost() {
        let truth = StepCost {
            fixed: 0.004,
            per_token: 0.0005,
            per_attended: 2e-8,
        };
        let mut fit = CostFit::default();
        for i in 0..100 {
            let tokens = 1 + (i * 37) % 64;
            let att = attended(i * 10, tokens);
            let attention = truth.per_attended * att;
            let total = truth.fixed + truth.per_token * tokens as f64 + attention;
            fit.observe(tokens, att, total, attention);
            if i < 7 {
                assert!(fit.cost().is_none());
            }
        }
        let c = fit.cost().unwrap();
        assert!((c.fixed - truth.fixed).abs() < 1e-6, "{c:?}");
        assert!((c.per_token - truth.per_token).abs() < 1e-8, "{c:?}");
        assert!((c.per_attended - truth.per_attended).abs() < 1e-12, "{c:?}");
    }

    #[test]
    fn steps_of_one_size_charge_per_token() {
        let mut fit = CostFit::default();
        for _ in 0..10 {
            fit.observe(8, 80.0, 0.008, 0.0);
        }
        let c = fit.cost().unwrap();
        assert!(
            (c.per_token - 0.001).abs() < 1e-9 && c.fixed < 1e-9,
            "{c:?}"
        );
    }

    #[test]
    fn chunks_fit_the_time_given() {
        let c = StepCost {
            fixed: 0.0,
            per_token: 1.0,
            per_attended: 0.01,
        };
        assert_eq!(c.max_chunk(0, 100, 0.5), 0);
        // 10 tokens from 0: 10 + 0.55 = 10.55.
        assert_eq!(c.max_chunk(0, 100, 10.6), 10);
        // From 1000 each token also attends to 1000 positions: 11 per token.
        assert_eq!(c.max_chunk(1000, 100, 23.0), 2);
        assert_eq!(c.max_chunk(0, 3, 1e9), 3);
        assert_eq!(c.max_chunk(0, 3, f64::NAN), 0);
    }
}
