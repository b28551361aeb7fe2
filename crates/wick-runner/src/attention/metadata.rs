//! Where every token of a step goes ([`AttentionMetadata`]) and the shapes of one layer's
//! attention ([`Heads`]): what every attention backend reads.

/// One sequence's place in the packed step input.
#[derive(Debug, Clone)]
pub struct SeqSpan {
    /// Row of its first token in the packed input.
    pub q_start: usize,
    pub q_len: usize,
    /// Position of its first token in the sequence.
    pub start_pos: usize,
    /// Slot of every position `0..start_pos + q_len`, in order.
    pub slots: Vec<usize>,
}

/// Where every token of a step goes: built once per step, shared by all layers.
pub struct AttentionMetadata {
    pub seqs: Vec<SeqSpan>,
    /// Position of each packed token.
    pub positions: Vec<usize>,
    /// For each packed token, the index of its sequence in `seqs`.
    pub token_seq: Vec<usize>,
}

/// First position a query at `pos` attends to.
pub(crate) fn window_start(pos: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (pos + 1).saturating_sub(w))
}

impl AttentionMetadata {
    pub fn new(seqs: Vec<SeqSpan>) -> Self {
        let mut positions = Vec::new();
        let mut token_seq = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            positions.extend(s.start_pos..s.start_pos + s.q_len);
            token_seq.extend(std::iter::repeat_n(i, s.q_len));
        }
        Self {
            seqs,
            positions,
            token_seq,
        }
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
