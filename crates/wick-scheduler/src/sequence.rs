use wick_core::{BlockId, RequestId};

/// One request's state inside the scheduler: its tokens, how many of them the KV cache
/// holds, and the blocks that hold them.
#[derive(Debug, Clone)]
pub struct Sequence {
    pub id: RequestId,
    /// Prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    pub num_computed: usize,
    pub max_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    pub block_table: Vec<BlockId>,
}

impl Sequence {
    pub fn new(
        id: RequestId,
        prompt: Vec<u32>,
        max_tokens: usize,
        stop_token_ids: Vec<u32>,
    ) -> Self {
        Self {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            num_computed: 0,
            max_tokens,
            stop_token_ids,
            block_table: Vec::new(),
        }
    }

    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens still to be computed before the next one can be sampled.
    pub fn num_pending(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Whether the next step is a single decode token (not a prompt chunk).
    pub fn is_decoding(&self) -> bool {
        self.num_pending() == 1 && self.num_computed >= self.prompt_len
    }
}
