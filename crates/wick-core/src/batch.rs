use crate::{BlockId, RequestId};

/// The work of one engine step: every sequence the scheduler chose, in the order the runner
/// packs them into its `[tokens, hidden]` input.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScheduledBatch {
    pub seqs: Vec<ScheduledSeq>,
}

impl ScheduledBatch {
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Tokens computed in this step, over all sequences.
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }
}

/// One sequence's share of a step: a decode token or a chunk of its prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduledSeq {
    pub id: RequestId,
    /// Token ids to compute in this step (one for a decode, a chunk for a prefill).
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]` in the sequence; positions before it are already in the cache.
    pub start_pos: usize,
    /// The sequence's blocks, covering at least `start_pos + tokens.len()` positions.
    pub block_table: Vec<BlockId>,
    /// Whether this step completes the sequence's known tokens, so a next token is sampled.
    pub sample: bool,
    /// Of `tokens`, how many at the end are proposed (speculative decoding's draft tokens,
    /// unverified): a verification step scores the token before each of them and the last,
    /// `1 + proposed` rows (`Runner::step_scoring`). 0 for every other step.
    pub proposed: usize,
    /// The adapter (LoRA) whose low-rank products this sequence's projections add; `None`:
    /// the base model alone.
    pub adapter: Option<AdapterId>,
}

impl ScheduledSeq {
    /// Whether this step draws the sequence's next token (it is scheduled with `sample` and
    /// computes at least one token): one row of logits, one draw.
    pub fn samples(&self) -> bool {
        self.sample && !self.tokens.is_empty()
    }
}

/// An adapter loaded beside the base model, by the runner's number for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterId(pub u32);
