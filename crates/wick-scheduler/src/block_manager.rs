//! The pool of KV cache blocks, with automatic prefix caching.
//!
//! Blocks are reference-counted. A full block whose keys and values are computed is
//! registered under a chained hash of its tokens (the hash of the previous block and its own
//! token ids), so a later sequence with the same prefix shares it instead of recomputing it.
//! A block nobody holds stays reusable as long as it is not needed: plain free blocks are
//! handed out first, then cached ones, least recently released first.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

use wick_core::BlockId;

/// The chained hash of a full block: its parent's hash and its own tokens.
pub fn block_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[derive(Debug, Clone)]
struct Cached {
    block: BlockId,
    /// The tokens, to rule out hash collisions.
    tokens: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    num_blocks: usize,
    caching: bool,
    ref_counts: Vec<u32>,
    /// The hash a block is registered under, if any.
    hashes: Vec<Option<u64>>,
    /// Unreferenced, unregistered blocks.
    free: Vec<BlockId>,
    /// Unreferenced registered blocks by release time (least recent first), and each
    /// such block's key in it.
    evictable: BTreeMap<u64, BlockId>,
    evict_key: Vec<Option<u64>>,
    cached: HashMap<u64, Cached>,
    tick: u64,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize, caching: bool) -> Self {
        Self {
            block_size,
            num_blocks,
            caching,
            ref_counts: vec![0; num_blocks],
            hashes: vec![None; num_blocks],
            // Popped from the back: hand out low ids first.
            free: (0..num_blocks as u32).rev().map(BlockId).collect(),
            evictable: BTreeMap::new(),
            evict_key: vec![None; num_blocks],
            cached: HashMap::new(),
            tick: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn caching(&self) -> bool {
        self.caching
    }

    /// Blocks that can be handed out now (free or evictable).
    pub fn num_free(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks some sequence holds.
    pub fn num_used(&self) -> usize {
        self.num_blocks - self.num_free()
    }

    /// Blocks that hold a cached prefix.
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    pub fn ref_count(&self, b: BlockId) -> u32 {
        self.ref_counts[b.index()]
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    fn take_one(&mut self) -> Option<BlockId> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                self.evict_key[b.index()] = None;
                if let Some(h) = self.hashes[b.index()].take() {
                    self.cached.remove(&h);
                }
                b
            }
        };
        self.ref_counts[b.index()] = 1;
        Some(b)
    }

    /// Grows `table` to cover `tokens` positions; false (and no change) if blocks run short.
    pub fn grow(&mut self, table: &mut Vec<BlockId>, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need > self.num_free() {
            return false;
        }
        for _ in 0..need {
            if let Some(b) = self.take_one() {
                table.push(b);
            }
        }
        true
    }

    /// Drops this table's reference to each of its blocks. The last blocks of a sequence are
    /// released first, so they are evicted before the shared prefix they extend.
    pub fn release(&mut self, table: &mut Vec<BlockId>) {
        for b in table.drain(..).rev() {
            let i = b.index();
            self.ref_counts[i] = self.ref_counts[i].saturating_sub(1);
            if self.ref_counts[i] > 0 {
                continue;
            }
            if self.hashes[i].is_some() {
                self.tick += 1;
                self.evictable.insert(self.tick, b);
                self.evict_key[i] = Some(self.tick);
            } else {
                self.free.push(b);
            }
        }
    }

    /// The cached blocks for the longest prefix of `blocks` (hash and tokens of each full
    /// block, in order), each now referenced once more.
    pub fn match_prefix<'a>(
        &mut self,
        blocks: impl IntoIterator<Item = (u64, &'a [u32])>,
    ) -> Vec<BlockId> {
        let mut out = Vec::new();
        if !self.caching {
            return out;
        }
        for (hash, tokens) in blocks {
            let Some(c) = self.cached.get(&hash) else {
                break;
            };
            if c.tokens != tokens {
                break;
            }
            let b = c.block;
            if let Some(key) = self.evict_key[b.index()].take() {
                self.evictable.remove(&key);
            }
            self.ref_counts[b.index()] += 1;
            out.push(b);
        }
        out
    }

    /// Registers a full, computed block under `hash` so others can share it. A hash already
    /// cached in another block keeps that block.
    pub fn register(&mut self, b: BlockId, hash: u64, tokens: &[u32]) {
        if !self.caching || self.hashes[b.index()].is_some() || self.cached.contains_key(&hash) {
            return;
        }
        self.hashes[b.index()] = Some(hash);
        self.cached.insert(
            hash,
            Cached {
                block: b,
                tokens: tokens.to_vec(),
            },
        );
    }

    /// Checks the pool's bookkeeping (tests).
    pub fn check(&self) -> Result<(), String> {
        let referenced = self.ref_counts.iter().filter(|&&r| r > 0).count();
        if referenced + self.free.len() + self.evictable.len() != self.num_blocks {
            return Err(format!(
                "{referenced} referenced + {} free + {} evictable != {}",
                self.free.len(),
                self.evictable.len(),
                self.num_blocks
            ));
        }
        if self.free.iter().any(|b| self.ref_counts[b.index()] > 0)
            || self
                .evictable
                .values()
                .any(|b| self.ref_counts[b.index()] > 0)
        {
            return Err("a referenced block is in the free pool".into());
        }
        Ok(())
    }

    /// The tokens block `b` is registered with in the prefix cache, if it is (tests).
    #[cfg(test)]
    pub(crate) fn registered(&self, b: BlockId) -> Option<&[u32]> {
        let hash = self.hashes[b.index()]?;
        self.cached.get(&hash).map(|c| c.tokens.as_slice())
    }

    /// Sum of every block's reference count (tests compare it with the block tables).
    pub fn total_refs(&self) -> usize {
        self.ref_counts.iter().map(|&r| r as usize).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_blocks_are_shared_and_evicted_last_recently_used_first() {
        let mut m = BlockManager::new(4, 2, true);
        let mut a = Vec::new();
        assert!(m.grow(&mut a, 4));
        let (h0, h1) = (
            block_hash(None, &[1, 2]),
            block_hash(Some(block_hash(None, &[1, 2])), &[3, 4]),
        );
        m.register(a[0], h0, &[1, 2]);
        m.register(a[1], h1, &[3, 4]);
        // Shared while held.
        let shared = m.match_prefix([(h0, &[1u32, 2][..]), (h1, &[3, 4][..])]);
        assert_eq!(shared, a);
        assert_eq!(m.ref_count(a[0]), 2);
        // A collision (same hash, other tokens) is not a hit.
        assert!(m.match_prefix([(h0, &[9u32, 9][..])]).is_empty());
        let mut b = shared;
        m.release(&mut b);
        m.release(&mut a);
        assert_eq!(m.num_used(), 0);
        assert_eq!(m.num_cached(), 2);
        // Free blocks go first, then the LRU cached one: the tail block, released first.
        let mut c = Vec::new();
        assert!(m.grow(&mut c, 6));
        assert_eq!(m.num_cached(), 1);
        assert_eq!(m.match_prefix([(h0, &[1u32, 2][..])]).len(), 1);
        m.check().unwrap();
    }

    #[test]
    fn without_caching_nothing_is_matched() {
        let mut m = BlockManager::new(2, 2, false);
        let mut a = Vec::new();
        m.grow(&mut a, 2);
        m.register(a[0], 7, &[1, 2]);
        assert!(m.match_prefix([(7, &[1u32, 2][..])]).is_empty());
        m.release(&mut a);
        assert_eq!(m.num_free(), 2);
    }
}
