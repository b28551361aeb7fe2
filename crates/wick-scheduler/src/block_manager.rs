use wick_core::BlockId;

/// Owns the pool of KV cache blocks: which are free, how many are used.
#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    num_blocks: usize,
    free: Vec<BlockId>,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        // Popped from the back: hand out low ids first.
        let free = (0..num_blocks as u32).rev().map(BlockId).collect();
        Self {
            block_size,
            num_blocks,
            free,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_used(&self) -> usize {
        self.num_blocks - self.free.len()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Grows `table` to cover `tokens` positions; false (and no change) if blocks run short.
    pub fn grow(&mut self, table: &mut Vec<BlockId>, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need > self.free.len() {
            return false;
        }
        let start = self.free.len() - need;
        table.extend(self.free.drain(start..).rev());
        true
    }

    /// Returns every block of `table` to the pool.
    pub fn release(&mut self, table: &mut Vec<BlockId>) {
        self.free.append(table);
    }
}
