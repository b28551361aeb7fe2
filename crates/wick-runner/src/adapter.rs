//! The hook through which adapters (LoRA) reach the projections: after each layer's
//! projection, for the rows of every sequence scheduled with an adapter
//! ([`wick_core::ScheduledSeq::adapter`]), the backend asks the runner's [`Adapters`] to add
//! that adapter's part. A runner without adapters, or a step with no sequence on one, does no
//! work for it (the default); a sequence naming an adapter on a runner without any is a step
//! error.

use std::ops::Range;

use candle_core::Tensor;
use wick_core::{AdapterId, ScheduledBatch};

use crate::Result;

/// Which projection of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Projection {
    /// Q, K and V side by side (`[q_dim + 2 kv_dim]` outputs).
    Qkv,
    /// The attention's output projection.
    Output,
    /// Gate and up side by side (`[2 intermediate]` outputs).
    GateUp,
    Down,
}

/// A projection of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Site {
    pub layer: usize,
    pub proj: Projection,
}

/// Low-rank additions to the projections, per adapter.
pub trait Adapters: Send + Sync {
    /// The host path: adds adapter `adapter`'s part at `site` to `out` (`[rows, outputs]`)
    /// for the projection's input `x` (`[rows, inputs]`), the rows of its sequences.
    fn add_host(&self, site: Site, adapter: AdapterId, x: &[f32], out: &mut [f32]) -> Result<()>;

    /// The tensor path: adapter `adapter`'s part at `site` for the input rows `x`
    /// (`[rows, inputs]`), to be added to the projection's output (`[rows, outputs]`, `x`'s
    /// dtype), or `None` where it adds nothing there.
    fn delta_tensor(&self, site: Site, adapter: AdapterId, x: &Tensor) -> Result<Option<Tensor>>;
}

/// The packed rows of a step's sequences on each adapter: consecutive sequences on the same
/// adapter share one range. Empty when no sequence names one.
pub(crate) fn adapter_rows(batch: &ScheduledBatch) -> Vec<(AdapterId, Range<usize>)> {
    let mut out: Vec<(AdapterId, Range<usize>)> = Vec::new();
    let mut start = 0;
    for s in &batch.seqs {
        let end = start + s.tokens.len();
        if let (Some(a), false) = (s.adapter, s.tokens.is_empty()) {
            match out.last_mut() {
                Some((last, rows)) if *last == a && rows.end == start => rows.end = end,
                _ => out.push((a, start..end)),
            }
        }
        start = end;
    }
    out
}

/// What a step's backend needs to apply adapters: the runner's set and the rows of each
/// adapter (none: nothing to do).
#[derive(Clone, Copy)]
pub(crate) struct StepAdapters<'a> {
    pub set: Option<&'a dyn Adapters>,
    pub rows: &'a [(AdapterId, Range<usize>)],
}

impl StepAdapters<'_> {
    /// Adds each adapter's part at `site` to the rows of its sequences: `x` and `out` are the
    /// projection's input and output, `tokens` rows each (the host path).
    pub(crate) fn add_host(
        &self,
        site: Site,
        x: &[f32],
        out: &mut [f32],
        tokens: usize,
    ) -> Result<()> {
        let Some(set) = self.set.filter(|_| !self.rows.is_empty() && tokens > 0) else {
            return Ok(());
        };
        let (wi, wo) = (x.len() / tokens, out.len() / tokens);
        for (a, r) in self.rows {
            let (x, out) = (
                &x[r.start * wi..r.end * wi],
                &mut out[r.start * wo..r.end * wo],
            );
            set.add_host(site, *a, x, out)?;
        }
        Ok(())
    }

    /// `y` (the projection's output for the input `x`) with each adapter's part at `site`
    /// added to the rows of its sequences (the tensor path).
    pub(crate) fn add_tensor(&self, site: Site, x: &Tensor, mut y: Tensor) -> Result<Tensor> {
        let Some(set) = self.set else {
            return Ok(y);
        };
        for (a, r) in self.rows {
            if let Some(d) = set.delta_tensor(site, *a, &x.narrow(0, r.start, r.len())?)? {
                let part = (y.narrow(0, r.start, r.len())? + d.to_dtype(y.dtype())?)?;
                let width = y.dim(1)?;
                y = y.slice_assign(&[r.clone(), 0..width], &part)?;
            }
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wick_core::{RequestId, ScheduledSeq};

    #[test]
    fn consecutive_sequences_on_one_adapter_share_a_range() {
        let seq = |n: usize, adapter: Option<u32>| ScheduledSeq {
            id: RequestId(0),
            tokens: vec![1; n],
            start_pos: 0,
            block_table: vec![],
            sample: true,
            proposed: 0,
            adapter: adapter.map(AdapterId),
        };
        let batch = ScheduledBatch {
            seqs: vec![
                seq(3, Some(1)),
                seq(1, Some(1)),
                seq(2, None),
                seq(0, Some(2)),
                seq(4, Some(2)),
                seq(1, Some(1)),
            ],
        };
        let rows = adapter_rows(&batch);
        assert_eq!(
            rows,
            vec![
                (AdapterId(1), 0..4),
                (AdapterId(2), 6..10),
                (AdapterId(1), 10..11)
            ]
        );
        assert!(adapter_rows(&ScheduledBatch {
            seqs: vec![seq(5, None)]
        })
        .is_empty());
    }
}
