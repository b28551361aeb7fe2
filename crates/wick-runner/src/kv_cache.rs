//! The paged KV cache: keys and values of every layer in fixed-size blocks,
//! `[slots, kv_heads * head_dim]` per layer, where a sequence's position `p` sits in slot
//! `block_table[p / block_size] * block_size + p % block_size`. On the host path the cache is
//! plain f16 memory (as llama.cpp keeps it, [`HostLayer`]); on a device it is a tensor of the
//! activations' dtype ([`DeviceLayer`]). The runner holds the one its path computes with;
//! attention over it is in `attention`.

use candle_core::{DType, Device, Tensor};
use half::{f16, vec::HalfBitsVecExt};

use crate::{ModelConfig, Result};

/// How many blocks the cache has and how many positions each holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    pub num_blocks: usize,
    pub block_size: usize,
}

/// One layer's keys and values in host memory: f16, half the memory and bandwidth of f32.
pub(crate) struct HostLayer {
    pub k: Vec<f16>,
    pub v: Vec<f16>,
}

/// One layer's keys and values as tensors of the activations' dtype on the model's device.
pub(crate) struct DeviceLayer {
    pub k: Tensor,
    pub v: Tensor,
}

/// `n` f16 zeros in memory the allocator takes already zeroed (from the OS, for a large
/// cache): a page is committed only when a sequence first writes to it, so a cache sized for
/// the machine costs nothing until it is used.
fn zeroed(n: usize) -> Vec<f16> {
    vec![0u16; n].reinterpret_into()
}

fn share(available: u64, fraction: f64) -> u64 {
    (available as f64 * fraction.clamp(0.0, 1.0)) as u64
}

/// Free memory of the GPU, as its driver reports it.
fn device_available_bytes(device: &Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let (free, _total) = d.cuda_stream().context().mem_get_info().ok()?;
            Some(free as u64)
        }
        _ => None,
    }
}

/// Elements of one layer's keys (or values) for the whole cache.
fn layer_len(model: &ModelConfig, cfg: CacheConfig) -> Result<usize> {
    cfg.num_blocks
        .checked_mul(cfg.block_size)
        .and_then(|s| s.checked_mul(model.kv_dim()))
        .ok_or_else(|| crate::RunnerError::Step("KV cache size overflows".into()))
}

/// The host path's cache: every layer, every block, in host memory.
pub(crate) fn host_layers(model: &ModelConfig, cfg: CacheConfig) -> Result<Vec<HostLayer>> {
    let n = layer_len(model, cfg)?;
    Ok((0..model.num_layers)
        .map(|_| HostLayer {
            k: zeroed(n),
            v: zeroed(n),
        })
        .collect())
}

/// The tensor path's cache: every layer, `[slots, kv_dim]` tensors of `dtype` on `device`.
pub(crate) fn device_layers(
    model: &ModelConfig,
    cfg: CacheConfig,
    device: &Device,
    dtype: DType,
) -> Result<Vec<DeviceLayer>> {
    layer_len(model, cfg)?;
    let shape = (cfg.num_blocks * cfg.block_size, model.kv_dim());
    (0..model.num_layers)
        .map(|_| {
            Ok(DeviceLayer {
                k: Tensor::zeros(shape, dtype, device)?,
                v: Tensor::zeros(shape, dtype, device)?,
            })
        })
        .collect()
}

/// How much memory the KV cache takes, and how much to give it.
pub struct KvCache;

impl KvCache {
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

    /// Bytes to give the cache by default: `fraction` of the memory available now (after the
    /// weights are loaded: the host's when `host`, the smaller of `MemAvailable` and the
    /// memory cgroup's room; else the GPU's), with what bounded it. `None` where the platform
    /// does not say how much is available. Several models in one process each pass their
    /// share as `fraction`.
    pub fn default_bytes(host: bool, device: &Device, fraction: f64) -> Option<(u64, String)> {
        let (available, bound) = if host {
            let m = crate::memory::host_memory()?;
            (m.available, m.bound.to_string())
        } else {
            (
                device_available_bytes(device)?,
                "the device's free memory".to_string(),
            )
        };
        Some((share(available, fraction), bound))
    }
}

/// How the KV cache's size is chosen: blocks, else memory, else a share of what is available.
pub struct KvSizing {
    /// `scheduler.kv_cache_blocks`.
    pub blocks: Option<usize>,
    /// `scheduler.kv_cache_memory`, in bytes (beats `blocks`).
    pub memory: Option<u64>,
    /// Otherwise: this share of the memory available after loading, this model's share.
    pub fraction: f64,
    pub block_size: usize,
    pub max_num_seqs: usize,
    /// 0: the model's own.
    pub max_model_len: usize,
}

/// The KV cache's size as [`KvSizing`] chose it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvSize {
    pub blocks: usize,
    pub bytes: u64,
    /// What chose it (for the log).
    pub sized_by: String,
}

impl KvSizing {
    /// The KV cache's size for `model` on `device`.
    pub fn size_for(&self, model: &crate::Model, device: &Device) -> Result<KvSize> {
        let c = model.config();
        let per_block =
            KvCache::bytes_per_block(c, self.block_size, model.runs_on_host(), model.dtype())
                as u64;
        let size = |blocks: usize, sized_by: String| KvSize {
            blocks,
            bytes: blocks as u64 * per_block,
            sized_by,
        };
        if let (None, Some(blocks)) = (self.memory, self.blocks) {
            return Ok(size(blocks, "scheduler.kv_cache_blocks".into()));
        }
        let (bytes, what) = match self.memory {
            Some(bytes) => (bytes, "scheduler.kv_cache_memory".to_string()),
            None => {
                let Some((bytes, bound)) =
                    KvCache::default_bytes(model.runs_on_host(), device, self.fraction)
                else {
                    tracing::warn!(
                        "available memory unknown here: 1024 KV blocks (set --kv-cache-memory)"
                    );
                    return Ok(size(1024, "a fixed default (memory unknown)".into()));
                };
                // No more than the running sequences could ever fill.
                let len = match self.max_model_len {
                    0 => c.max_position_embeddings,
                    n => n.min(c.max_position_embeddings),
                };
                let useful = (self.max_num_seqs * len.div_ceil(self.block_size)) as u64 * per_block;
                if useful < bytes {
                    (
                        useful,
                        format!("max_num_seqs full-length sequences (under {bound})"),
                    )
                } else {
                    (bytes, format!("{} of {bound}", self.fraction))
                }
            }
        };
        match (bytes / per_block) as usize {
            0 => Err(crate::RunnerError::KvCacheTooSmall { what, per_block }),
            n => Ok(size(n, what)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_memory_is_shared() {
        assert_eq!(share(1000, 0.5), 500);
        assert_eq!(share(1000, 0.25), 250);
        assert_eq!(share(1000, 7.0), 1000);
        if cfg!(target_os = "linux") {
            assert!(KvCache::default_bytes(true, &Device::Cpu, 0.5).unwrap().0 > 0);
        }
    }
}
