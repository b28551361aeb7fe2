use candle_core::{DType, Device, Tensor};

use super::*;
use crate::attention::metadata::{AttentionMetadata, Heads, SeqSpan};
use crate::test_support::rng;

const BS: usize = 16;
const BLOCKS: usize = 64;

/// A sequence of `ctx` positions whose blocks are scattered over the cache (`first` picks
/// where), the last `q_len` of them queried.
fn span(q_start: usize, q_len: usize, ctx: usize, first: usize) -> SeqSpan {
    SeqSpan {
        q_start,
        q_len,
        start_pos: ctx - q_len,
        blocks: (0..ctx.div_ceil(BS))
            .map(|b| ((first + b * 7) % BLOCKS) as u32)
            .collect(),
    }
}

fn metadata(seqs: Vec<SeqSpan>) -> AttentionMetadata {
    AttentionMetadata::new(seqs, BS, BLOCKS).unwrap()
}

/// A decode at position 599 (three partitions), a prefill chunk of 20 at 280..300 and a
/// fresh prompt of 5: the shapes of a mixed step.
fn mixed() -> AttentionMetadata {
    metadata(vec![
        span(0, 1, 600, 3),
        span(1, 20, 300, 40),
        span(21, 5, 5, 11),
    ])
}

fn heads(window: Option<usize>) -> Heads {
    Heads {
        num_heads: 6,
        num_kv_heads: 2,
        head_dim: 64,
        scale: 0.125,
        softcap: None,
        window,
    }
}

struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

fn inputs(h: Heads, tokens: usize, dtype: DType) -> Inputs {
    let mut r = rng(7);
    let kd = h.num_kv_heads * h.head_dim;
    let slots = BLOCKS * BS;
    let mut t = |n: usize, scale: f32, shape: &[usize]| {
        let v: Vec<f32> = (0..n).map(|_| r() * scale).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    Inputs {
        q: t(
            tokens * h.num_heads * h.head_dim,
            2.0,
            &[tokens, h.num_heads, h.head_dim],
        ),
        k: t(slots * kd, 3.0, &[slots, kd]),
        v: t(slots * kd, 1.0, &[slots, kd]),
    }
}

fn run(meta: &AttentionMetadata, h: Heads, x: &Inputs) -> Result<Tensor> {
    let bt = BlockTables::new(meta, BLOCKS * BS)?;
    let paged = bt.upload(&Device::Cpu)?;
    PagedAttention {
        heads: h,
        paged: &paged,
    }
    .forward(&x.q, &x.k, &x.v)
}

#[test]
fn block_tables_reproduce_every_slot_of_every_sequence() {
    let meta = mixed();
    let bt = BlockTables::new(&meta, BLOCKS * BS).unwrap();
    assert_eq!(bt.max_blocks, 600usize.div_ceil(BS));
    assert_eq!(bt.tables.len(), 3 * bt.max_blocks);
    for (i, s) in meta.seqs.iter().enumerate() {
        for p in 0..s.context_len() {
            assert_eq!(bt.slot(i, p), s.slot(p, BS), "sequence {i} position {p}");
        }
        // Padding past the sequence's blocks.
        let used = s.context_len().div_ceil(BS);
        assert!(bt.tables[i * bt.max_blocks + used..(i + 1) * bt.max_blocks]
            .iter()
            .all(|&b| b == 0));
    }
    assert_eq!(bt.token_seq.len(), 26);
    assert_eq!(bt.positions[0], 599);
    assert_eq!(&bt.positions[1..3], &[280, 281]);
    assert_eq!(bt.token_seq[21], 2);
    assert_eq!(bt.partitions(), 3);
    // Prefill tiles: the decode alone, the chunk of 20 as 8 + 8 + 4, the prompt of 5.
    assert_eq!(bt.tiles, vec![0, 1, 1, 8, 9, 8, 17, 4, 21, 5]);
    assert!(!bt.decode_only);
    let decode = metadata(vec![span(0, 1, 600, 3), span(1, 1, 30, 9)]);
    assert!(BlockTables::new(&decode, BLOCKS * BS).unwrap().decode_only);
}

#[test]
fn metadata_and_block_tables_refuse_what_the_kernels_cannot_read() {
    let meta_err = |s: SeqSpan, blocks: usize| {
        AttentionMetadata::new(vec![s], BS, blocks)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let mut past_cache = span(0, 1, 40, 3);
    past_cache.blocks[2] = BLOCKS as u32;
    let e = meta_err(past_cache.clone(), BLOCKS);
    assert!(e.contains("block 64 is past the cache's 64 blocks"), "{e}");
    let mut short = span(0, 1, 40, 3);
    short.blocks.pop();
    let e = meta_err(short, BLOCKS);
    assert!(e.contains("40 positions in 2 blocks of 16"), "{e}");
    assert!(AttentionMetadata::new(vec![span(0, 1, 40, 3)], 0, BLOCKS).is_err());
    // The block tables check again against the cache they are for (a smaller one here).
    let meta = metadata(vec![span(0, 1, 40, 3)]);
    let e = BlockTables::new(&meta, 8 * BS).unwrap_err().to_string();
    assert!(e.contains("past the 8 blocks of 128 slots"), "{e}");
    // Each new token's slot is the one its sequence's table gives.
    let meta = mixed();
    let bt = BlockTables::new(&meta, BLOCKS * BS).unwrap();
    for (t, &slot) in meta.new_slots.iter().enumerate() {
        assert_eq!(
            slot,
            bt.slot(meta.token_seq[t], meta.positions[t]),
            "token {t}"
        );
    }
}

/// Plain attention in f64 over each query's own context.
fn plain(meta: &AttentionMetadata, h: Heads, x: &Inputs) -> Vec<f64> {
    let q: Vec<f32> =
        x.q.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
    let k: Vec<f32> =
        x.k.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
    let v: Vec<f32> =
        x.v.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
    let (nh, hd, kd) = (h.num_heads, h.head_dim, h.num_kv_heads * h.head_dim);
    let mut out = Vec::new();
    for t in 0..meta.num_tokens() {
        let (s, pos) = (&meta.seqs[meta.token_seq[t]], meta.positions[t]);
        let lo = h.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        for head in 0..nh {
            let g = head / (nh / h.num_kv_heads);
            let qv = &q[(t * nh + head) * hd..][..hd];
            let ctx: Vec<usize> = (lo..=pos).map(|p| s.slot(p, BS)).collect();
            let scores: Vec<f64> = ctx
                .iter()
                .map(|&sl| {
                    let kr = &k[sl * kd + g * hd..][..hd];
                    qv.iter()
                        .zip(kr)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * h.scale as f64
                })
                .map(|s| h.softcap.map_or(s, |c| c as f64 * (s / c as f64).tanh()))
                .collect();
            let mx = scores.iter().cloned().fold(f64::MIN, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let sum: f64 = w.iter().sum();
            for d in 0..hd {
                let a: f64 = ctx
                    .iter()
                    .zip(&w)
                    .map(|(&sl, w)| w * v[sl * kd + g * hd + d] as f64)
                    .sum();
                out.push(a / sum);
            }
        }
    }
    out
}

#[test]
fn the_kernels_arithmetic_matches_plain_attention() {
    let meta = mixed();
    // The soft-cap of 5 caps many of these scores (q and k of +-2 and +-3 over 64 dimensions:
    // they spread over about +-10).
    for (window, softcap) in [(None, None), (Some(100), None), (Some(100), Some(5.0))] {
        let h = Heads {
            softcap,
            ..heads(window)
        };
        let x = inputs(h, meta.num_tokens(), DType::F32);
        let got: Vec<f32> = run(&meta, h, &x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = plain(&meta, h, &x);
        assert_eq!(got.len(), want.len());
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < 2e-5, "{window:?} {softcap:?}: max |diff| {worst}");
    }
}

#[test]
fn half_precision_stays_close_to_f32() {
    let meta = mixed();
    let h = heads(None);
    let want: Vec<f32> = run(&meta, h, &inputs(h, meta.num_tokens(), DType::F32))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (dtype, bound) in [(DType::F16, 5e-3), (DType::BF16, 4e-2)] {
        let out = run(&meta, h, &inputs(h, meta.num_tokens(), dtype)).unwrap();
        assert_eq!(out.dtype(), dtype);
        let got: Vec<f32> = out
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(worst < bound, "{dtype:?}: {worst}");
    }
}

/// A query's output does not depend on what else is in the step (batch invariance: the
/// partitions and the order of every sum are fixed per query).
#[test]
fn each_query_gets_the_same_bits_alone_or_in_a_batch() {
    let h = heads(Some(100));
    let meta = mixed();
    let x = inputs(h, meta.num_tokens(), DType::F32);
    let together: Vec<f32> = run(&meta, h, &x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let row = h.num_heads * h.head_dim;
    for s in &meta.seqs {
        let mut alone = s.clone();
        alone.q_start = 0;
        let m = metadata(vec![alone]);
        let q = x.q.narrow(0, s.q_start, s.q_len).unwrap();
        let xs = Inputs {
            q,
            k: x.k.clone(),
            v: x.v.clone(),
        };
        let got: Vec<f32> = run(&m, h, &xs)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got, together[s.q_start * row..(s.q_start + s.q_len) * row]);
    }
}

#[test]
fn the_op_checks_its_arguments() {
    let meta = mixed();
    let n = meta.num_tokens();
    let h = heads(None);
    let x = inputs(h, n, DType::F32);
    let err = |h: Heads, q: &Tensor, k: &Tensor, v: &Tensor| {
        let bt = BlockTables::new(&meta, BLOCKS * BS).unwrap();
        let paged = bt.upload(&Device::Cpu).unwrap();
        PagedAttention {
            heads: h,
            paged: &paged,
        }
        .forward(q, k, v)
        .unwrap_err()
        .to_string()
    };
    let e = err(h, &x.q.narrow(0, 0, n - 1).unwrap(), &x.k, &x.v);
    assert!(
        e.contains("queries [25, 6, 64], expected [26, 6, 64]"),
        "{e}"
    );
    let e = err(h, &x.q, &x.k.narrow(1, 0, 64).unwrap(), &x.v);
    assert!(e.contains("expected [slots, 128]"), "{e}");
    let e = err(h, &x.q, &x.k.to_dtype(DType::F16).unwrap(), &x.v);
    assert!(e.contains("dtypes"), "{e}");
    let e = err(
        h,
        &x.q.to_dtype(DType::F64).unwrap(),
        &x.k.to_dtype(DType::F64).unwrap(),
        &x.v.to_dtype(DType::F64).unwrap(),
    );
    assert!(e.contains("one of f32, f16, bf16"), "{e}");
    let e = err(
        Heads {
            num_kv_heads: 4,
            ..h
        },
        &x.q,
        &x.k,
        &x.v,
    );
    assert!(e.contains("do not group"), "{e}");
    let odd = Heads {
        head_dim: 48,
        num_heads: 8,
        ..h
    };
    let e = err(odd, &x.q.reshape((n, 8, 48)).unwrap(), &x.k, &x.v);
    assert!(e.contains("no kernel for head size 48"), "{e}");
    let small = x.k.narrow(0, 0, 100).unwrap();
    let e = err(h, &x.q, &small, &small);
    assert!(e.contains("caches of 100 slots"), "{e}");
    let e = err(
        h,
        &x.q,
        &x.k.t()
            .unwrap()
            .t()
            .unwrap()
            .narrow(0, 1, BLOCKS * BS - 1)
            .unwrap(),
        &x.v,
    );
    assert!(
        e.contains("expected [slots, 128]") || e.contains("slots"),
        "{e}"
    );
    assert!(supports(64) && supports(256) && supports(96) && !supports(16) && !supports(224));
}
