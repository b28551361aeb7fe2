//! Where every token of a step goes ([`AttentionMetadata`]) and the shapes of one layer's
//! attention ([`Heads`]): what every attention backend reads.
//!
//! The metadata is built straight from the scheduled batch: each sequence's block table as
//! the scheduler hands it over (the blocks its context uses), the position and the cache slot
//! of each new token, and nothing per position of the context: a step's host work grows with
//! its tokens and blocks, not with its sequences' lengths (vLLM's layout). A backend that
//! needs a context position's slot computes it from the table ([`SeqSpan::slot`]).

use wick_core::ScheduledBatch;

use crate::{Result, RunnerError};

/// One sequence's place in the packed step input.
#[derive(Debug, Clone)]
pub struct SeqSpan {
    /// Row of its first token in the packed input.
    pub q_start: usize,
    pub q_len: usize,
    /// Position of its first token in the sequence.
    pub start_pos: usize,
    /// The blocks of positions `0..start_pos + q_len`: position `p` is in block
    /// `blocks[p / block_size]`, at offset `p % block_size`.
    pub blocks: Vec<u32>,
}

impl SeqSpan {
    /// Positions it attends over: its cached ones and this step's.
    pub fn context_len(&self) -> usize {
        self.start_pos + self.q_len
    }

    /// The cache slot of position `pos`, in blocks of `block_size`.
    #[inline(always)]
    pub fn slot(&self, pos: usize, block_size: usize) -> usize {
        self.blocks[pos / block_size] as usize * block_size + pos % block_size
    }
}

/// Where every token of a step goes: built once per step, shared by all layers.
pub struct AttentionMetadata {
    pub seqs: Vec<SeqSpan>,
    /// Positions per cache block.
    pub block_size: usize,
    /// Position of each packed token.
    pub positions: Vec<usize>,
    /// For each packed token, the index of its sequence in `seqs`.
    pub token_seq: Vec<usize>,
    /// For each packed token, the cache slot its key and value go to.
    pub new_slots: Vec<usize>,
}

/// First position a query at `pos` attends to.
pub(crate) fn window_start(pos: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (pos + 1).saturating_sub(w))
}

impl AttentionMetadata {
    /// The metadata of `seqs` (packed in order) over a cache of `num_blocks` blocks of
    /// `block_size`. Checks what the backends then rely on without bounds checks: every
    /// sequence's blocks cover its context and lie in the cache.
    pub fn new(seqs: Vec<SeqSpan>, block_size: usize, num_blocks: usize) -> Result<Self> {
        let bad = |m: String| Err(RunnerError::Step(format!("attention metadata: {m}")));
        if block_size == 0 {
            return bad("block size 0".into());
        }
        let tokens = seqs.iter().map(|s| s.q_len).sum();
        let mut positions = Vec::with_capacity(tokens);
        let mut token_seq = Vec::with_capacity(tokens);
        let mut new_slots = Vec::with_capacity(tokens);
        for (i, s) in seqs.iter().enumerate() {
            let ctx = s.context_len();
            if s.blocks.len() * block_size < ctx {
                return bad(format!(
                    "sequence {i} has {ctx} positions in {} blocks of {block_size}",
                    s.blocks.len()
                ));
            }
            if let Some(b) = s.blocks.iter().find(|&&b| b as usize >= num_blocks) {
                return bad(format!(
                    "sequence {i}: block {b} is past the cache's {num_blocks} blocks"
                ));
            }
            positions.extend(s.start_pos..ctx);
            token_seq.extend(std::iter::repeat_n(i, s.q_len));
            new_slots.extend((s.start_pos..ctx).map(|p| s.slot(p, block_size)));
        }
        Ok(Self {
            seqs,
            block_size,
            positions,
            token_seq,
            new_slots,
        })
    }

    /// The metadata of a scheduled batch, its sequences in batch order: each one's block
    /// table as it is (the blocks its context uses; the scheduler may hold more ahead).
    pub fn from_batch(
        batch: &ScheduledBatch,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<Self> {
        let mut q_start = 0;
        let mut seqs = Vec::with_capacity(batch.seqs.len());
        for s in &batch.seqs {
            let used = (s.start_pos + s.tokens.len()).div_ceil(block_size.max(1));
            seqs.push(SeqSpan {
                q_start,
                q_len: s.tokens.len(),
                start_pos: s.start_pos,
                blocks: s.block_table[..used.min(s.block_table.len())]
                    .iter()
                    .map(|b| b.0)
                    .collect(),
            });
            q_start += s.tokens.len();
        }
        Self::new(seqs, block_size, num_blocks)
    }

    pub fn num_tokens(&self) -> usize {
        self.positions.len()
    }
}

/// Shapes and arithmetic of one layer's attention.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplier of the scores.
    pub scale: f32,
    /// `cap * tanh(score / cap)` of each scaled score, where set (Gemma 2).
    pub softcap: Option<f32>,
    pub window: Option<usize>,
}

impl Heads {
    pub(crate) fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub(crate) fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}
