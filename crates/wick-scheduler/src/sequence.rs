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
    /// Chained hashes of the full blocks of `tokens` computed so far (see `block_hash`).
    pub block_hashes: Vec<u64>,
    /// Leading blocks of `block_table` already registered in the prefix cache.
    pub num_registered: usize,
    /// Of `tokens`, how many at the end are proposed (speculative decoding's draft tokens),
    /// not yet verified: never hashed or registered in the prefix cache.
    pub num_proposed: usize,
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
            block_hashes: Vec::new(),
            num_registered: 0,
            num_proposed: 0,
        }
    }

    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens still to be computed before the next one can be sampled.
    pub fn num_pending(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Extends `block_hashes` to the first `blocks` full blocks.
    pub(crate) fn hash_blocks(&mut self, blocks: usize, block_size: usize) {
        while self.block_hashes.len() < blocks {
            let i = self.block_hashes.len();
            let parent = self.block_hashes.last().copied();
            let tokens = &self.tokens[i * block_size..(i + 1) * block_size];
            self.block_hashes
                .push(crate::block_manager::block_hash(parent, tokens));
        }
    }

    /// Whether the next step is a decode: its last token (and the tokens proposed after it,
    /// if any), not a prompt chunk.
    pub fn is_decoding(&self) -> bool {
        self.num_pending() == 1 + self.num_proposed && self.num_computed >= self.prompt_len
    }

    /// Takes the whole blocks past the first `len` positions out of the block table.
    pub(crate) fn blocks_past(&mut self, len: usize, block_size: usize) -> Vec<BlockId> {
        let keep = len.div_ceil(block_size).min(self.block_table.len());
        self.block_table.split_off(keep)
    }

    /// Takes back the last `n` proposed tokens (at most all of them), before they are computed.
    pub(crate) fn withdraw(&mut self, n: usize) {
        let n = n.min(self.num_proposed);
        self.tokens.truncate(self.tokens.len() - n);
        self.num_proposed -= n;
    }
}
