//! The Llama forward, batch-aware: every scheduled token of a step is one row of the input.
//! Weight names and structure follow candle's own Llama; the KV cache and the attention
//! metadata come in as arguments instead of living inside the model.

use candle_core::{DType, Device, Tensor};

use crate::kv_cache::{attention, AttentionMetadata, Heads, KvCache, Rope};
use crate::linear::Linear;
use crate::{LlamaConfig, Result};

/// One decoder layer. Q, K and V are fused into one matrix, and so are gate and up, so each
/// step runs one matmul where three (or two) would be.
pub(crate) struct Layer {
    pub attn_norm: Tensor,
    pub qkv: Linear,
    pub o: Linear,
    pub ffn_norm: Tensor,
    pub gate_up: Linear,
    pub down: Linear,
}

/// Every weight of the model, already in the format the runner computes with.
pub(crate) struct Weights {
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    pub lm_head: Linear,
}

pub struct Llama {
    cfg: LlamaConfig,
    w: Weights,
    rope: Rope,
    device: Device,
    dtype: DType,
}

impl Llama {
    /// `dtype` is the activations' (and the KV cache's) type: the dense weights are in it.
    pub(crate) fn new(cfg: LlamaConfig, w: Weights, device: &Device, dtype: DType) -> Result<Self> {
        let rope = Rope::new(&cfg, cfg.max_position_embeddings, device, dtype)?;
        Ok(Self {
            cfg,
            w,
            rope,
            device: device.clone(),
            dtype,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn heads(&self) -> Heads {
        Heads {
            num_heads: self.cfg.num_heads,
            num_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    /// Runs the packed tokens `ids` through every layer and returns the logits of the rows
    /// `last_rows` (`[last_rows.len(), vocab]`), or `None` when no row needs them.
    pub fn forward(
        &self,
        ids: &[u32],
        meta: &AttentionMetadata,
        last_rows: &[u32],
        kv: &mut KvCache,
    ) -> Result<Option<Tensor>> {
        let eps = self.cfg.rms_norm_eps as f32;
        let inter = self.cfg.intermediate_size;
        let ids = Tensor::new(ids, &self.device)?;
        let mut x = self.w.embed.index_select(&ids, 0)?;
        for (i, layer) in self.w.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let qkv = layer.qkv.forward(&h)?;
            let attn = attention(kv, i, self.heads(), &self.rope, &qkv, meta)?;
            x = (x + layer.o.forward(&attn)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let gate_up = layer.gate_up.forward(&h)?;
            let gate = candle_nn::ops::silu(&gate_up.narrow(1, 0, inter)?)?;
            let act = (gate * gate_up.narrow(1, inter, inter)?)?;
            x = (x + layer.down.forward(&act)?)?;
        }
        if last_rows.is_empty() {
            return Ok(None);
        }
        let rows = Tensor::new(last_rows, &self.device)?;
        let x = x.index_select(&rows, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.w.norm, eps)?;
        Ok(Some(self.w.lm_head.forward(&x)?))
    }
}
