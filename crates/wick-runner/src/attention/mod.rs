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

use crate::kv_cache::{DeviceLayer, HostLayer};
use crate::rope::{Rope, RopeTables};
use crate::Result;

/// Attention of one layer on its host cache: rotates `qkv` (`[tokens, q_dim + 2 * kv_dim]`)
/// in place, stores its keys and values, and writes `[tokens, q_dim]` into `out`.
pub(crate) fn attention_host(
    cache: &mut HostLayer,
    heads: Heads,
    rope: (&Rope, &RopeTables),
    qkv: &mut [f32],
    meta: &AttentionMetadata,
    out: &mut Vec<f32>,
) {
    host::attention_host(&mut cache.k, &mut cache.v, heads, rope, qkv, meta, out)
}

/// Attention of one layer on its device cache, for `qkv` of `[tokens, q_dim + 2 * kv_dim]`;
/// returns `[tokens, q_dim]`.
pub(crate) fn attention_tensor(
    cache: &mut DeviceLayer,
    heads: Heads,
    rope: (&Rope, &Tensor, &Tensor),
    qkv: &Tensor,
    meta: &AttentionMetadata,
    dm: &DeviceMetadata,
) -> Result<Tensor> {
    tensor::attention_tensor(&mut cache.k, &mut cache.v, heads, rope, qkv, meta, dm)
}
