//! Paged attention as one op per layer for every query token of a step, reading keys and
//! values from the KV cache through the block table. On CUDA it launches Wick's kernels
//! (`kernels/paged_attention.cu`); on the CPU it runs [`reference`], the same arithmetic in
//! Rust (same partitions, same order of operations), which the tests hold against the host
//! path's attention. The tensor path uses it on both; Metal keeps the gathering path.
//!
//! [`BlockTables`] is the layout the kernels read: one row of block indices per sequence,
//! padded to the longest, and for each query token its sequence and position.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};

use super::kernels::logit;
use super::metadata::{AttentionMetadata, Heads};
use crate::{Result, RunnerError};

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
pub(crate) use cuda::u32_slice;

/// Positions per partition of a query's context (`PARTITION` in the kernel).
pub(crate) const PARTITION: usize = 256;

/// Queries of one sequence per block of the prefill kernel (`TILE`).
pub(crate) const TILE: usize = 8;

/// Head sizes the kernels are built for: `head_dim / 32` in this list.
const LANE_DIMS: [usize; 7] = [1, 2, 3, 4, 5, 6, 8];

/// Whether the kernels handle this head size.
pub(crate) fn supports(head_dim: usize) -> bool {
    head_dim.is_multiple_of(32) && LANE_DIMS.contains(&(head_dim / 32))
}

/// Whether `device` runs the paged op (CUDA's kernels, or the CPU reference).
pub(crate) fn runs_on(device: &Device) -> bool {
    device.is_cpu() || device.is_cuda()
}

/// The block-table layout of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockTables {
    /// Slots of the cache the tables were checked against.
    pub num_slots: usize,
    pub block_size: usize,
    /// Columns of `tables` (the most blocks any sequence of the step uses).
    pub max_blocks: usize,
    /// `[seqs, max_blocks]`, row-major; a row past its sequence's blocks is padded with 0.
    pub tables: Vec<u32>,
    /// Per query token: its sequence (a row of `tables`).
    pub token_seq: Vec<u32>,
    /// Per query token: its position.
    pub positions: Vec<u32>,
    /// The prefill kernel's tiles, `[tiles, 2]`: first query token and count (at most
    /// [`TILE`]), consecutive queries of one sequence.
    pub tiles: Vec<u32>,
    /// Whether every sequence queries one token (the decode kernel's steps).
    pub decode_only: bool,
}

impl BlockTables {
    /// The layout of `meta`'s sequences in a cache of `num_slots` slots: each one's block
    /// table as it is, padded to the longest. Every block must lie in the cache: the kernels
    /// read without bounds checks, so this is where they are made (once more, whoever built
    /// the metadata).
    pub fn new(meta: &AttentionMetadata, num_slots: usize) -> Result<Self> {
        let bad = |m: String| Err(RunnerError::Step(format!("block table: {m}")));
        let block_size = meta.block_size;
        if block_size == 0 || num_slots > u32::MAX as usize {
            return bad(format!("block size {block_size}, {num_slots} slots"));
        }
        let num_blocks = num_slots / block_size;
        let max_blocks = meta
            .seqs
            .iter()
            .map(|s| s.context_len().div_ceil(block_size))
            .max()
            .unwrap_or(0);
        let mut tables = vec![0u32; meta.seqs.len() * max_blocks];
        for (i, s) in meta.seqs.iter().enumerate() {
            let used = s.context_len().div_ceil(block_size);
            let blocks = s.blocks.get(..used).unwrap_or_default();
            if blocks.len() < used {
                return bad(format!(
                    "sequence {i} has {} positions in {} blocks of {block_size}",
                    s.context_len(),
                    s.blocks.len()
                ));
            }
            if let Some(b) = blocks.iter().find(|&&b| b as usize >= num_blocks) {
                return bad(format!(
                    "sequence {i}: block {b} is past the {num_blocks} blocks of {num_slots} slots"
                ));
            }
            tables[i * max_blocks..i * max_blocks + used].copy_from_slice(blocks);
        }
        let mut tiles = Vec::new();
        for s in &meta.seqs {
            for first in (s.q_start..s.q_start + s.q_len).step_by(TILE) {
                tiles.push(first as u32);
                tiles.push((s.q_start + s.q_len - first).min(TILE) as u32);
            }
        }
        Ok(Self {
            num_slots,
            block_size,
            max_blocks,
            tables,
            tiles,
            decode_only: meta.seqs.iter().all(|s| s.q_len == 1),
            token_seq: meta.token_seq.iter().map(|&s| s as u32).collect(),
            positions: meta.positions.iter().map(|&p| p as u32).collect(),
        })
    }

    /// Slot of position `pos` of sequence `seq`, as the kernels compute it.
    #[cfg(test)]
    pub fn slot(&self, seq: usize, pos: usize) -> usize {
        self.tables[seq * self.max_blocks + pos / self.block_size] as usize * self.block_size
            + pos % self.block_size
    }

    /// Partitions of the longest context of the step.
    pub fn partitions(&self) -> usize {
        self.positions
            .iter()
            .map(|&p| p as usize / PARTITION + 1)
            .max()
            .unwrap_or(0)
    }

    /// The tables on `device`, for the op.
    pub(crate) fn upload(&self, device: &Device) -> Result<PagedTensors> {
        let seqs = self.tables.len().checked_div(self.max_blocks).unwrap_or(0);
        Ok(PagedTensors {
            tables: Tensor::from_slice(&self.tables, (seqs, self.max_blocks), device)?,
            token_seq: Tensor::new(self.token_seq.as_slice(), device)?,
            positions: Tensor::new(self.positions.as_slice(), device)?,
            // Only CUDA's prefill kernel reads the tiles; the CPU reference walks each query.
            tiles: (!self.decode_only && device.is_cuda())
                .then(|| Tensor::from_slice(&self.tiles, (self.tiles.len() / 2, 2), device))
                .transpose()?,
            num_slots: self.num_slots,
            block_size: self.block_size,
            max_blocks: self.max_blocks,
            parts: self.partitions(),
        })
    }
}

/// [`BlockTables`] on a device.
pub(crate) struct PagedTensors {
    tables: Tensor,
    token_seq: Tensor,
    positions: Tensor,
    /// The prefill kernel's tiles, for steps with a prompt chunk.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    tiles: Option<Tensor>,
    num_slots: usize,
    block_size: usize,
    max_blocks: usize,
    /// Partitions of the longest context (the CUDA launch's grid).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    parts: usize,
}

/// The op: `q` `[tokens, heads, head_dim]` over a layer's `k`/`v` cache `[slots, kv_heads *
/// head_dim]`, giving `[tokens, heads, head_dim]` in `q`'s dtype.
pub(crate) struct PagedAttention<'a> {
    pub heads: Heads,
    pub paged: &'a PagedTensors,
}

impl PagedAttention<'_> {
    /// Runs the op after checking its arguments.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        self.check(
            q.dims(),
            q.dtype(),
            (k.dims(), k.dtype()),
            (v.dims(), v.dtype()),
        )?;
        // The kernels read every input from its first element.
        let compact = |t: &Tensor| -> Result<Tensor> {
            Ok(if t.is_contiguous() && t.layout().start_offset() == 0 {
                t.clone()
            } else {
                t.force_contiguous()?
            })
        };
        Ok(compact(q)?.apply_op3_no_bwd(&compact(k)?, &compact(v)?, self)?)
    }

    /// The shapes and dtypes the kernels need; the layouts are checked in each backend.
    fn check(
        &self,
        q: &[usize],
        dtype: DType,
        (k, k_dtype): (&[usize], DType),
        (v, v_dtype): (&[usize], DType),
    ) -> Result<()> {
        let h = self.heads;
        let fail = |m: String| Err(RunnerError::Step(format!("paged attention: {m}")));
        if h.num_kv_heads == 0 || !h.num_heads.is_multiple_of(h.num_kv_heads) {
            return fail(format!(
                "{} heads do not group over {} KV heads",
                h.num_heads, h.num_kv_heads
            ));
        }
        if !supports(h.head_dim) {
            return fail(format!("no kernel for head size {}", h.head_dim));
        }
        let tokens = self.paged.positions.dim(0)?;
        if q != [tokens, h.num_heads, h.head_dim] {
            return fail(format!(
                "queries {q:?}, expected [{tokens}, {}, {}]",
                h.num_heads, h.head_dim
            ));
        }
        let kd = h.num_kv_heads * h.head_dim;
        if k.len() != 2 || k[1] != kd || k != v {
            return fail(format!(
                "caches {k:?} and {v:?}, expected [slots, {kd}] each"
            ));
        }
        if k_dtype != dtype
            || v_dtype != dtype
            || !matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
        {
            return fail(format!(
                "dtypes {dtype:?}, {k_dtype:?}, {v_dtype:?}: one of f32, f16, bf16 for all three"
            ));
        }
        if k[0] < self.paged.num_slots {
            return fail(format!(
                "caches of {} slots, the block tables were checked against {}",
                k[0], self.paged.num_slots
            ));
        }
        Ok(())
    }

    fn host_tables(&self) -> Result<BlockTablesView> {
        Ok(BlockTablesView {
            tables: self.paged.tables.flatten_all()?.to_vec1()?,
            token_seq: self.paged.token_seq.to_vec1()?,
            positions: self.paged.positions.to_vec1()?,
            block_size: self.paged.block_size,
            max_blocks: self.paged.max_blocks,
        })
    }
}

/// What the CPU reference reads of the block tables.
struct BlockTablesView {
    tables: Vec<u32>,
    token_seq: Vec<u32>,
    positions: Vec<u32>,
    block_size: usize,
    max_blocks: usize,
}

fn contiguous_from_start(l: &Layout, what: &str) -> candle_core::Result<()> {
    if l.is_contiguous() && l.start_offset() == 0 {
        Ok(())
    } else {
        candle_core::bail!("paged attention: {what} must be contiguous from its start")
    }
}

fn widen(s: &CpuStorage) -> candle_core::Result<Vec<f32>> {
    Ok(match s {
        CpuStorage::F32(x) => x.clone(),
        CpuStorage::F16(x) => x.iter().map(|v| v.to_f32()).collect(),
        CpuStorage::BF16(x) => x.iter().map(|v| v.to_f32()).collect(),
        _ => candle_core::bail!("paged attention: f32, f16 or bf16"),
    })
}

impl CustomOp3 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "wick-paged-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        for (l, what) in [(ql, "queries"), (kl, "keys"), (vl, "values")] {
            contiguous_from_start(l, what)?;
        }
        let bt = self
            .host_tables()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let out = reference(&widen(q)?, &widen(k)?, &widen(v)?, self.heads, &bt);
        let out = match q {
            CpuStorage::F32(_) => CpuStorage::F32(out),
            CpuStorage::F16(_) => {
                CpuStorage::F16(out.iter().map(|&x| half::f16::from_f32(x)).collect())
            }
            _ => CpuStorage::BF16(out.iter().map(|&x| half::bf16::from_f32(x)).collect()),
        };
        Ok((out, ql.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        for (l, what) in [(ql, "queries"), (kl, "keys"), (vl, "values")] {
            contiguous_from_start(l, what)?;
        }
        cuda::attention(self, (q, ql), k, v)
    }
}

/// One partition of one query head: the running maximum, the sum of weights and the
/// weighted values, as pass 1 of the kernel leaves them.
struct Partial {
    m: f32,
    l: f32,
    acc: Vec<f32>,
}

/// The kernels' arithmetic on the CPU: `q` `[tokens, heads, head_dim]`, caches `[slots,
/// kv_heads * head_dim]`, all widened to f32; returns `[tokens, heads, head_dim]`.
fn reference(q: &[f32], k: &[f32], v: &[f32], h: Heads, bt: &BlockTablesView) -> Vec<f32> {
    let (nh, hd) = (h.num_heads, h.head_dim);
    let group = nh / h.num_kv_heads;
    let kd = h.num_kv_heads * hd;
    let lane_dims = hd / 32;
    let mut out = vec![0f32; q.len()];
    for (t, (&seq, &pos)) in bt.token_seq.iter().zip(&bt.positions).enumerate() {
        let pos = pos as usize;
        let row = &bt.tables[seq as usize * bt.max_blocks..][..bt.max_blocks];
        let lo = h.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        for head in 0..nh {
            let g = head / group;
            let qv = &q[(t * nh + head) * hd..][..hd];
            let parts: Vec<Partial> = (0..pos / PARTITION + 1)
                .map(|p| {
                    let (begin, end) = (lo.max(p * PARTITION), (pos + 1).min((p + 1) * PARTITION));
                    let mut part = Partial {
                        m: f32::NEG_INFINITY,
                        l: 0.0,
                        acc: vec![0.0; hd],
                    };
                    for j in begin..end {
                        let slot =
                            row[j / bt.block_size] as usize * bt.block_size + j % bt.block_size;
                        let off = slot * kd + g * hd;
                        // Each lane's dimensions by fused multiply-add, then the butterfly.
                        let mut lanes = [0f32; 32];
                        for (lane, s) in lanes.iter_mut().enumerate() {
                            for d in lane * lane_dims..(lane + 1) * lane_dims {
                                *s = qv[d].mul_add(k[off + d], *s);
                            }
                        }
                        for o in [16, 8, 4, 2, 1] {
                            let prev = lanes;
                            for (lane, s) in lanes.iter_mut().enumerate() {
                                *s = prev[lane] + prev[lane ^ o];
                            }
                        }
                        let s = logit(&h, lanes[0]);
                        let m_new = part.m.max(s);
                        let corr = (part.m - m_new).exp();
                        let e = (s - m_new).exp();
                        part.l = part.l.mul_add(corr, e);
                        for (d, a) in part.acc.iter_mut().enumerate() {
                            *a = e.mul_add(v[off + d], *a * corr);
                        }
                        part.m = m_new;
                    }
                    part
                })
                .collect();
            let mx = parts.iter().fold(f32::NEG_INFINITY, |m, p| m.max(p.m));
            let total: f32 = parts.iter().map(|p| p.l * (p.m - mx).exp()).sum();
            let o = &mut out[(t * nh + head) * hd..][..hd];
            for (d, o) in o.iter_mut().enumerate() {
                let a: f32 = parts.iter().map(|p| p.acc[d] * (p.m - mx).exp()).sum();
                *o = a / total;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
