//! Attention over the paged KV cache, for every sequence of a step at once.
//!
//! [`AttentionMetadata`] says where each packed token of a step belongs (its sequence, its
//! position, its cache slot) and hands over each sequence's block table as scheduled. Each
//! layer rotates its queries and keys, stores the step's keys and values in their slots, then
//! attends every query over its own sequence's positions: all of them, or the last `window` on
//! a sliding-window layer. On the host the cache is read in place through the block table (no
//! gathers); on CUDA (and the CPU's tensor path) one paged-attention op per layer reads it
//! through the block tables ([`paged`]); on Metal each sequence's context is gathered with
//! `index_select`.

mod host;
mod kernels;
mod metadata;
pub(crate) mod paged;
mod tensor;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

use candle_core::Tensor;

pub(crate) use kernels::exp_canonical;
pub use metadata::AttentionMetadata;
pub(crate) use metadata::Heads;
pub(crate) use tensor::DeviceMetadata;

use crate::kv_cache::{KvCache, LayerCache};
use crate::rope::{Rope, RopeTables};
use crate::{Result, RunnerError};

impl KvCache {
    /// Attention of layer `layer` on the host cache: rotates `qkv`
    /// (`[tokens, q_dim + 2 * kv_dim]`) in place, stores its keys and values, and writes
    /// `[tokens, q_dim]` into `out`.
    pub(crate) fn attention_host(
        &mut self,
        layer: usize,
        heads: Heads,
        rope: (&Rope, &RopeTables),
        qkv: &mut [f32],
        meta: &AttentionMetadata,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        match &mut self.layers[layer] {
            LayerCache::Host { k, v } => {
                host::attention_host(k, v, heads, rope, qkv, meta, out);
                Ok(())
            }
            LayerCache::Device { .. } => Err(RunnerError::Step(
                "the host attention path needs a host KV cache".into(),
            )),
        }
    }

    /// Attention of layer `layer` on a device cache, for `qkv` of `[tokens, q_dim + 2 *
    /// kv_dim]`; returns `[tokens, q_dim]`.
    pub(crate) fn attention_tensor(
        &mut self,
        layer: usize,
        heads: Heads,
        rope: (&Rope, &Tensor, &Tensor),
        qkv: &Tensor,
        meta: &AttentionMetadata,
        dm: &DeviceMetadata,
    ) -> Result<Tensor> {
        match &mut self.layers[layer] {
            LayerCache::Device { k, v } => {
                tensor::attention_tensor(k, v, heads, rope, qkv, meta, dm)
            }
            LayerCache::Host { .. } => Err(RunnerError::Step(
                "the tensor attention path needs a device KV cache".into(),
            )),
        }
    }
}
