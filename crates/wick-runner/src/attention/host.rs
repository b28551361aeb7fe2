//! Attention on the host over the f16 paged cache, in tiles with an online softmax.
//!
//! The work is split into items of one sequence, one group of query heads that share a KV
//! head, and up to [`BLOCK`] consecutive query tokens of that sequence; items run in parallel,
//! each on the widest of the canonical kernels ([`super::kernels`]) this CPU runs. An item
//! walks its context in tiles of 32 positions (aligned to absolute positions, so a token's
//! tiles do not depend on what else is in the step); each tile's key and value rows are read
//! once for every token and head of the item, from the cache in place. For each token and
//! head, a tile updates a running maximum `m`, sum `l` and output `acc`:
//! `m' = max(m, max s)`, `a = exp(m - m')`, `l' = a l + sum exp(s - m')`,
//! `acc' = a acc + sum exp(s - m') v`. No score buffer longer than a tile exists.
//!
//! Every operation for a token and head happens in the same order whatever else shares the
//! step and whichever instructions the CPU has, so the AVX-512, AVX2 and portable paths give
//! the same bits (tested), and so does a token alone or in a batch. Sliding-window layers read
//! only their window.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::cpu::Isa;

use super::kernels::{attend_item, Item, Portable, LANES};
use super::metadata::{window_start, AttentionMetadata, Heads, SeqSpan};
use crate::rope::{Rope, RopeTables};

/// Query tokens per work item.
const BLOCK: usize = 16;

/// One item on the widest kernels this CPU runs for the head size (the SIMD ones need whole
/// 16-lane rows).
fn attend_item_here(
    item: &Item,
    q_rows: &[f32],
    q_stride: usize,
    k_cache: &[f16],
    v_cache: &[f16],
    heads: Heads,
) -> Vec<f32> {
    let args = (item, q_rows, q_stride, k_cache, v_cache, heads);
    #[cfg(target_arch = "x86_64")]
    if heads.head_dim.is_multiple_of(LANES) {
        match crate::cpu::float_isa() {
            // SAFETY: AVX-512 F is present (checked by `crate::cpu`).
            Isa::Avx512 => return unsafe { super::x86::attend_item_avx512(args) },
            // SAFETY: AVX2, FMA and F16C are present (checked by `crate::cpu`).
            Isa::Avx2 => return unsafe { super::x86::attend_item_avx2(args) },
            Isa::Portable => {}
        }
    }
    // SAFETY: portable code.
    unsafe { attend_item::<Portable>(args) }
}

/// Attention of every token of the step: `items` cover the tokens once per group of heads.
/// Writes `[tokens, q_dim]` into `out`.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend(
    items: &[Item],
    q_rows: &[f32],
    q_stride: usize,
    k_cache: &[f16],
    v_cache: &[f16],
    heads: Heads,
    work: usize,
    out: &mut [f32],
) {
    let hd = heads.head_dim;
    let per_group = heads.num_heads / heads.num_kv_heads;
    let qd = heads.num_heads * hd;
    let one = |item: &Item| attend_item_here(item, q_rows, q_stride, k_cache, v_cache, heads);
    // Parallel only where it pays for the threads' wake-up.
    let results: Vec<Vec<f32>> = if work >= 4096 && items.len() > 1 {
        items.par_iter().map(one).collect()
    } else {
        items.iter().map(one).collect()
    };
    for (item, res) in items.iter().zip(results) {
        for (t, row) in item.rows.clone().zip(res.chunks_exact(per_group * hd)) {
            let at = t * qd + item.group * per_group * hd;
            out[at..at + per_group * hd].copy_from_slice(row);
        }
    }
}

/// The items of a sequence: its tokens in blocks of [`BLOCK`], for every group.
pub(super) fn items_of<'a>(
    s: &'a SeqSpan,
    block_size: usize,
    groups: usize,
    out: &mut Vec<Item<'a>>,
) {
    let rows = s.q_start..s.q_start + s.q_len;
    let mut start = rows.start;
    while start < rows.end {
        let end = (start + BLOCK).min(rows.end);
        for group in 0..groups {
            out.push(Item {
                rows: start..end,
                pos0: s.start_pos + (start - rows.start),
                blocks: &s.blocks,
                block_size,
                group,
            });
        }
        start = end;
    }
}

/// Rotates `qkv` (`[tokens, q_dim + 2 * kv_dim]`) in place, stores its keys and values in
/// their slots of the host cache, and writes the attention `[tokens, q_dim]` into `out`.
pub(super) fn attention_host(
    k_cache: &mut [f16],
    v_cache: &mut [f16],
    heads: Heads,
    (rope, tab): (&Rope, &RopeTables),
    qkv: &mut [f32],
    meta: &AttentionMetadata,
    out: &mut Vec<f32>,
) {
    let (qd, kd, hd) = (heads.q_dim(), heads.kv_dim(), heads.head_dim);
    let row = qd + 2 * kd;
    for (t, x) in qkv.chunks_exact_mut(row).enumerate() {
        for head in x[..qd + kd].chunks_exact_mut(hd) {
            rope.apply(&mut head[..rope.dims], tab, t);
        }
        let slot = meta.new_slots[t];
        k_cache[slot * kd..(slot + 1) * kd].convert_from_f32_slice(&x[qd..qd + kd]);
        v_cache[slot * kd..(slot + 1) * kd].convert_from_f32_slice(&x[qd + kd..]);
    }
    let n = meta.num_tokens();
    out.clear();
    out.resize(n * qd, 0.0);
    let mut items = Vec::new();
    let mut work = 0;
    for s in &meta.seqs {
        items_of(s, meta.block_size, heads.num_kv_heads, &mut items);
        for p in s.start_pos..s.start_pos + s.q_len {
            work += p + 1 - window_start(p, heads.window);
        }
    }
    attend(&items, qkv, row, k_cache, v_cache, heads, work, out);
}
