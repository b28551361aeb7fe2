//! Attention with candle tensors (the tensor path: GPUs, half precision, and the CPU's tensor
//! path). Where the paged op runs (CUDA's kernels, or on the CPU their Rust reference) one op
//! per layer reads the cache through the block tables ([`super::paged`]); on Metal each
//! sequence's context is gathered with `index_select` and masked.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::metadata::{window_start, AttentionMetadata, Heads, SeqSpan};
use super::paged::{BlockTables, PagedAttention, PagedTensors};
use crate::rope::Rope;
use crate::{Result, RunnerError};

/// What the tensor path needs of a step's [`AttentionMetadata`] on the device, built once per
/// step and shared by all layers.
pub(crate) struct DeviceMetadata {
    pub(crate) new_slots: Tensor,
    /// The block tables, where the paged op runs; the rest is for the gathering path.
    pub(crate) paged: Option<PagedTensors>,
    pub(crate) ctx_slots: Vec<Tensor>,
    /// Per sliding window (or none), one mask per sequence (`None`: nothing to mask).
    pub(crate) masks: HashMap<Option<usize>, Vec<Option<Tensor>>>,
}

impl DeviceMetadata {
    /// Uploads what the tensor path needs of `meta`: the block tables where the paged op runs
    /// (a cache of `num_slots` slots), else every sequence's context slots (the gathering
    /// path's indices, expanded from its block table) and masks for each of `windows`.
    pub(crate) fn new(
        meta: &AttentionMetadata,
        device: &Device,
        windows: &[Option<usize>],
        num_slots: usize,
        paged: bool,
    ) -> Result<Self> {
        let new_slots: Vec<u32> = meta.new_slots.iter().map(|&x| x as u32).collect();
        let new_slots = Tensor::new(new_slots.as_slice(), device)?;
        if paged {
            let tables = BlockTables::new(meta, num_slots)?;
            return Ok(Self {
                new_slots,
                paged: Some(tables.upload(device)?),
                ctx_slots: Vec::new(),
                masks: HashMap::new(),
            });
        }
        let mut ctx_slots = Vec::with_capacity(meta.seqs.len());
        for s in &meta.seqs {
            let slots: Vec<u32> = (0..s.context_len())
                .map(|p| s.slot(p, meta.block_size) as u32)
                .collect();
            ctx_slots.push(Tensor::new(slots.as_slice(), device)?);
        }
        let mut masks = HashMap::new();
        for &w in windows {
            if masks.contains_key(&w) {
                continue;
            }
            let per_seq = meta
                .seqs
                .iter()
                .map(|s| mask(s, w, device))
                .collect::<Result<Vec<_>>>()?;
            masks.insert(w, per_seq);
        }
        Ok(Self {
            new_slots,
            paged: None,
            ctx_slots,
            masks,
        })
    }
}

/// `[q_len, ctx]` of 0 and -inf, or `None` when every query sees every key.
fn mask(s: &SeqSpan, window: Option<usize>, device: &Device) -> Result<Option<Tensor>> {
    let ctx = s.context_len();
    let needed = s.q_len > 1 || window_start(s.start_pos, window) > 0;
    if !needed {
        return Ok(None);
    }
    let mask: Vec<f32> = (0..s.q_len)
        .flat_map(|i| {
            let pos = s.start_pos + i;
            let lo = window_start(pos, window);
            (0..ctx).map(move |j| {
                if j <= pos && j >= lo {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Some(Tensor::from_vec(mask, (s.q_len, ctx), device)?))
}

pub(super) fn attention_tensor(
    k_cache: &mut Tensor,
    v_cache: &mut Tensor,
    heads: Heads,
    (rope, cos, sin): (&Rope, &Tensor, &Tensor),
    qkv: &Tensor,
    meta: &AttentionMetadata,
    dm: &DeviceMetadata,
) -> Result<Tensor> {
    let (qd, kd, hd) = (heads.q_dim(), heads.kv_dim(), heads.head_dim);
    let (nh, nkv) = (heads.num_heads, heads.num_kv_heads);
    let n = meta.num_tokens();
    let to_heads = |x: Tensor, h: usize| -> Result<Tensor> {
        Ok(x.reshape((n, h, hd))?
            .transpose(0, 1)?
            .unsqueeze(0)?
            .contiguous()?)
    };
    let q = to_heads(qkv.narrow(1, 0, qd)?, nh)?;
    let k = to_heads(qkv.narrow(1, qd, kd)?, nkv)?;
    let q = rope.apply_tensor(&q, cos, sin)?.squeeze(0)?; // [nh, n, hd]
    let k = rope.apply_tensor(&k, cos, sin)?.squeeze(0)?;
    let k_rows = k.transpose(0, 1)?.reshape((n, kd))?.contiguous()?;
    let v_rows = qkv.narrow(1, qd + kd, kd)?.contiguous()?;
    let idx = dm
        .new_slots
        .unsqueeze(1)?
        .broadcast_as((n, kd))?
        .contiguous()?;
    k_cache.scatter_set(&idx, &k_rows, 0)?;
    v_cache.scatter_set(&idx, &v_rows, 0)?;
    if let Some(paged) = &dm.paged {
        let q = q.transpose(0, 1)?.contiguous()?; // [n, nh, hd]
        let op = PagedAttention { heads, paged };
        return Ok(op.forward(&q, k_cache, v_cache)?.reshape((n, qd))?);
    }
    let masks = dm
        .masks
        .get(&heads.window)
        .ok_or_else(|| RunnerError::Step("no masks prepared for this window".into()))?;
    let mut outs = Vec::with_capacity(meta.seqs.len());
    for (i, s) in meta.seqs.iter().enumerate() {
        let ctx = s.context_len();
        let gather = |c: &Tensor| -> Result<Tensor> {
            let x = c.index_select(&dm.ctx_slots[i], 0)?; // [ctx, kd]
            let x = x.reshape((ctx, nkv, 1, hd))?.transpose(0, 2)?; // [1, nkv, ctx, hd]
            let x = x.broadcast_as((nh / nkv, nkv, ctx, hd))?.transpose(0, 1)?;
            Ok(x.reshape((nh, ctx, hd))?)
        };
        let (kc, vc) = (gather(k_cache)?, gather(v_cache)?);
        let qs = q.narrow(1, s.q_start, s.q_len)?.contiguous()?; // [nh, q_len, hd]
                                                                 // Scores, mask and softmax in f32 whatever the activations' dtype.
        let scores = qs.matmul(&kc.t()?.contiguous()?)?.to_dtype(DType::F32)?;
        let mut att = (scores * heads.scale as f64)?;
        if let Some(cap) = heads.softcap {
            att = ((att / cap as f64)?.tanh()? * cap as f64)?;
        }
        if let Some(mask) = &masks[i] {
            att = att.broadcast_add(mask)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?.to_dtype(vc.dtype())?;
        let o = att.matmul(&vc.contiguous()?)?; // [nh, q_len, hd]
        outs.push(o.transpose(0, 1)?.reshape((s.q_len, qd))?);
    }
    Ok(Tensor::cat(&outs, 0)?)
}
