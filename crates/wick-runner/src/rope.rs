//! Rotary position embeddings: each [`RopeSpec`] becomes one angular frequency per rotated
//! pair, computed once at load (llama.cpp's `ggml_rope_ext` arithmetic: frequency factors,
//! linear scaling, YaRN's ramp and magnitude); the cos and sin of a step's positions are
//! computed once per step and shared by every layer that uses the same spec.

use candle_core::{DType, Device, Tensor};

use crate::config::{RopeScaling, RopeSpec, RopeStyle};
use crate::Result;

/// One spec, ready to rotate heads.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    pub style: RopeStyle,
    pub dims: usize,
    /// Angle per position of each pair.
    freqs: Vec<f64>,
    /// Multiplier of cos and sin.
    mscale: f32,
}

impl Rope {
    pub fn new(spec: &RopeSpec) -> Self {
        let half = spec.dims / 2;
        let base = spec.base as f64;
        let (freq_scale, ramp) = match &spec.scaling {
            RopeScaling::None => (1.0, None),
            RopeScaling::Linear { factor } => (1.0 / *factor as f64, None),
            RopeScaling::Yarn {
                factor,
                original_context,
                beta_fast,
                beta_slow,
            } => {
                let corr = |beta: f32| {
                    spec.dims as f64
                        * ((*original_context as f64) / (beta as f64 * 2.0 * std::f64::consts::PI))
                            .ln()
                        / (2.0 * base.ln())
                };
                let low = corr(*beta_fast).floor().max(0.0);
                let high = corr(*beta_slow).ceil().min(spec.dims as f64 - 1.0);
                (1.0 / *factor as f64, Some((low, high)))
            }
        };
        let freqs = (0..half)
            .map(|i| {
                let ff = spec.freq_factors.as_ref().map_or(1.0, |f| f[i] as f64);
                let extrap = base.powf(-2.0 * i as f64 / spec.dims as f64) / ff;
                let interp = extrap * freq_scale;
                match ramp {
                    None => interp,
                    Some((low, high)) => {
                        let y = (i as f64 - low) / (high - low).max(0.001);
                        let mix = 1.0 - y.clamp(0.0, 1.0);
                        interp * (1.0 - mix) + extrap * mix
                    }
                }
            })
            .collect();
        let mut mscale = spec.attn_factor;
        if let RopeScaling::Yarn { factor, .. } = spec.scaling {
            if factor > 1.0 {
                mscale *= 1.0 + 0.1 * factor.ln();
            }
        }
        Self {
            style: spec.style,
            dims: spec.dims,
            freqs,
            mscale,
        }
    }

    fn half(&self) -> usize {
        self.dims / 2
    }

    /// cos and sin of every pair at each of `positions`, `[positions, dims/2]` each.
    pub fn tables(&self, positions: &[usize]) -> RopeTables {
        let h = self.half();
        let mut cos = Vec::with_capacity(positions.len() * h);
        let mut sin = Vec::with_capacity(positions.len() * h);
        for &p in positions {
            for f in &self.freqs {
                let a = p as f64 * f;
                cos.push(a.cos() as f32 * self.mscale);
                sin.push(a.sin() as f32 * self.mscale);
            }
        }
        RopeTables { half: h, cos, sin }
    }

    /// Rotates one head in place with row `t` of `tab`.
    pub fn apply(&self, x: &mut [f32], tab: &RopeTables, t: usize) {
        let h = self.half();
        let cos = &tab.cos[t * h..(t + 1) * h];
        let sin = &tab.sin[t * h..(t + 1) * h];
        for i in 0..h {
            let (a, b) = match self.style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Half => (i, i + h),
            };
            let (x0, x1) = (x[a], x[b]);
            x[a] = x0 * cos[i] - x1 * sin[i];
            x[b] = x0 * sin[i] + x1 * cos[i];
        }
    }

    /// Rotates `[1, heads, tokens, head_dim]` on any device with `cos`/`sin` of
    /// `[tokens, dims/2]`; dimensions past `dims` pass through.
    pub fn apply_tensor(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let hd = x.dim(3)?;
        let rot = x.narrow(3, 0, self.dims)?.contiguous()?;
        let rot = match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&rot, cos, sin)?,
            RopeStyle::Half => candle_nn::rotary_emb::rope(&rot, cos, sin)?,
        };
        if self.dims == hd {
            return Ok(rot);
        }
        let pass = x.narrow(3, self.dims, hd - self.dims)?;
        Ok(Tensor::cat(&[&rot, &pass], 3)?)
    }
}

/// cos and sin of one spec for the positions of one step.
pub(crate) struct RopeTables {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTables {
    /// The same tables as tensors of `dtype` on `device`.
    pub fn to_tensors(&self, device: &Device, dtype: DType) -> Result<(Tensor, Tensor)> {
        let n = self.cos.len() / self.half.max(1);
        let t = |v: &[f32]| -> Result<Tensor> {
            Ok(Tensor::from_slice(v, (n, self.half), device)?.to_dtype(dtype)?)
        };
        Ok((t(&self.cos)?, t(&self.sin)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(scaling: RopeScaling) -> RopeSpec {
        RopeSpec {
            scaling,
            ..RopeSpec::plain(RopeStyle::Half, 16, 10_000.0)
        }
    }

    #[test]
    fn plain_frequencies_are_base_powers() {
        let r = Rope::new(&spec(RopeScaling::None));
        for (i, f) in r.freqs.iter().enumerate() {
            assert!((f - 10_000f64.powf(-((2 * i) as f64) / 16.0)).abs() < 1e-15);
        }
        let t = r.tables(&[0, 3]);
        assert!(t.cos[..8].iter().all(|&c| c == 1.0));
        assert!((t.sin[8] - (3f64).sin() as f32).abs() < 1e-7);
    }

    #[test]
    fn linear_scaling_divides_positions() {
        let a = Rope::new(&spec(RopeScaling::Linear { factor: 4.0 }));
        let b = Rope::new(&spec(RopeScaling::None));
        let (ta, tb) = (a.tables(&[8]), b.tables(&[2]));
        for (x, y) in ta.cos.iter().zip(&tb.cos) {
            assert!((x - y).abs() < 1e-6);
        }
    }

    #[test]
    fn yarn_keeps_high_frequencies_and_interpolates_low_ones() {
        let plain = Rope::new(&spec(RopeScaling::None));
        let y = Rope::new(&spec(RopeScaling::Yarn {
            factor: 4.0,
            original_context: 64,
            beta_fast: 32.0,
            beta_slow: 1.0,
        }));
        // The first pair (the fastest) is extrapolated: unchanged; the last is interpolated.
        assert_eq!(y.freqs[0], plain.freqs[0]);
        assert!((y.freqs[7] - plain.freqs[7] / 4.0).abs() < 1e-12);
        assert!((y.mscale - (1.0 + 0.1 * 4f32.ln())).abs() < 1e-6);
    }

    #[test]
    fn partial_rotation_leaves_the_tail() {
        let r = Rope::new(&RopeSpec::plain(RopeStyle::Half, 4, 100.0));
        let tab = r.tables(&[5]);
        let mut x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        r.apply(&mut x[..4], &tab, 0);
        assert_eq!(&x[4..], &[5.0, 6.0]);
        let n = (x[0] * x[0] + x[2] * x[2]).sqrt();
        assert!((n - (1f32 + 9.0).sqrt()).abs() < 1e-5);
    }
}
