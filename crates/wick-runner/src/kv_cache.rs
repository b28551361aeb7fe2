//! The paged KV cache: keys and values of every layer in fixed-size blocks,
//! `[slots, kv_heads * head_dim]` per layer, where a sequence's position `p` sits in slot
//! `block_table[p / block_size] * block_size + p % block_size`. On the host path the cache is
//! plain f16 memory (as llama.cpp keeps it); on a device it is a tensor of the activations'
//! dtype. Attention over it is in `attention`.

use candle_core::{DType, Device, Tensor};
use half::f16;

use crate::{ModelConfig, Result};

/// How many blocks the cache has and how many positions each holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    pub num_blocks: usize,
    pub block_size: usize,
}

pub(crate) enum LayerCache {
    /// f16: half the memory and bandwidth of f32.
    Host {
        k: Vec<f16>,
        v: Vec<f16>,
    },
    Device {
        k: Tensor,
        v: Tensor,
    },
}

/// Keys and values of every layer, for every block.
pub struct KvCache {
    cfg: CacheConfig,
    pub(crate) layers: Vec<LayerCache>,
}

impl KvCache {
    /// Host memory when `host` (the model runs on the host path), else tensors of `dtype`
    /// on `device`.
    pub(crate) fn new(
        model: &ModelConfig,
        cfg: CacheConfig,
        host: bool,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let n = cfg
            .num_blocks
            .checked_mul(cfg.block_size)
            .and_then(|s| s.checked_mul(model.kv_dim()))
            .ok_or_else(|| crate::RunnerError::Step("KV cache size overflows".into()))?;
        let layers = (0..model.num_layers)
            .map(|_| {
                Ok(if host {
                    LayerCache::Host {
                        k: vec![f16::ZERO; n],
                        v: vec![f16::ZERO; n],
                    }
                } else {
                    let shape = (cfg.num_blocks * cfg.block_size, model.kv_dim());
                    LayerCache::Device {
                        k: Tensor::zeros(shape, dtype, device)?,
                        v: Tensor::zeros(shape, dtype, device)?,
                    }
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { cfg, layers })
    }

    pub fn config(&self) -> CacheConfig {
        self.cfg
    }

    /// Bytes one block takes: keys and values, every layer (f16 on the host path, `dtype`
    /// on a device).
    pub fn bytes_per_block(
        model: &ModelConfig,
        block_size: usize,
        host: bool,
        dtype: DType,
    ) -> usize {
        let elem = if host {
            std::mem::size_of::<f16>()
        } else {
            dtype.size_in_bytes()
        };
        2 * model.num_layers * block_size * model.kv_dim() * elem
    }

    pub fn uses_host_memory(&self) -> bool {
        matches!(self.layers.first(), Some(LayerCache::Host { .. }))
    }
}
