use half::f16;

use super::kernels::{attend_item, exp_canonical, Item, ItemArgs, Portable};
use super::metadata::{window_start, Heads};
#[cfg(target_arch = "x86_64")]
use super::x86;

struct Case {
    heads: Heads,
    k: Vec<f16>,
    v: Vec<f16>,
    /// `[tokens, q_dim]`.
    q: Vec<f32>,
    /// The sequence's blocks of [`BS`] positions, scattered over the cache.
    blocks: Vec<u32>,
    /// The slot of every position, from `blocks` (the reference's view).
    slots: Vec<usize>,
    pos0: usize,
}

/// Positions per cache block of the cases (not a divisor of a tile: blocks straddle tiles).
const BS: usize = 5;

/// The layer shapes of the cases: no window, a window, a window and a soft-cap (Gemma 2's;
/// 3 caps most of these scores, which spread over about +-6).
const LAYERS: [(Option<usize>, Option<f32>); 3] =
    [(None, None), (Some(20), None), (Some(20), Some(3.0))];

/// 20 query tokens at positions 50..70 of a sequence whose blocks are scattered.
fn case((window, softcap): (Option<usize>, Option<f32>)) -> Case {
    let heads = Heads {
        num_heads: 6,
        num_kv_heads: 2,
        head_dim: 64,
        scale: 0.125,
        softcap,
        window,
    };
    let (kd, n_slots, tokens) = (heads.kv_dim(), 18 * BS, 20);
    let mut seed = 3u64;
    let mut rnd = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let k = (0..n_slots * kd)
        .map(|_| f16::from_f32(rnd() * 3.0))
        .collect();
    let v = (0..n_slots * kd).map(|_| f16::from_f32(rnd())).collect();
    let q = (0..tokens * heads.q_dim()).map(|_| rnd() * 2.0).collect();
    // 14 blocks for 70 positions, out of order over the cache's 18.
    let blocks: Vec<u32> = (0..14).map(|b| (b * 7 % 18) as u32).collect();
    let slots = (0..70)
        .map(|p| blocks[p / BS] as usize * BS + p % BS)
        .collect();
    Case {
        heads,
        k,
        v,
        q,
        blocks,
        slots,
        pos0: 50,
    }
}

fn item(c: &Case, rows: std::ops::Range<usize>, group: usize) -> Item<'_> {
    Item {
        pos0: c.pos0 + rows.start,
        rows,
        blocks: &c.blocks,
        block_size: BS,
        group,
    }
}

/// Every token and group, on the portable kernels, in items of `block` tokens.
fn run(c: &Case, block: usize) -> Vec<Vec<f32>> {
    let n = c.q.len() / c.heads.q_dim();
    let mut out = Vec::new();
    for start in (0..n).step_by(block) {
        for g in 0..c.heads.num_kv_heads {
            let it = item(c, start..(start + block).min(n), g);
            let args = (&it, &c.q[..], c.heads.q_dim(), &c.k[..], &c.v[..], c.heads);
            // SAFETY: portable code.
            out.push(unsafe { attend_item::<Portable>(args) });
        }
    }
    out
}

#[test]
fn tiles_with_an_online_softmax_match_plain_attention() {
    for layer in LAYERS {
        let (window, cap) = layer;
        let c = case(layer);
        let (h, hd, kd) = (c.heads, c.heads.head_dim, c.heads.kv_dim());
        let per_group = h.num_heads / h.num_kv_heads;
        let n = c.q.len() / h.q_dim();
        for t in 0..n {
            let pos = c.pos0 + t;
            for g in 0..h.num_kv_heads {
                let got = &run(&c, 1)[t * h.num_kv_heads + g];
                for hh in 0..per_group {
                    let head = g * per_group + hh;
                    let q = &c.q[t * h.q_dim() + head * hd..][..hd];
                    let ctx = &c.slots[window_start(pos, window)..=pos];
                    let scores: Vec<f64> = ctx
                        .iter()
                        .map(|&s| {
                            let k = &c.k[s * kd + g * hd..][..hd];
                            q.iter()
                                .zip(k)
                                .map(|(a, b)| *a as f64 * b.to_f64())
                                .sum::<f64>()
                                * h.scale as f64
                        })
                        .map(|s| cap.map_or(s, |c| c as f64 * (s / c as f64).tanh()))
                        .collect();
                    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = w.iter().sum();
                    for d in 0..hd {
                        let want: f64 = ctx
                            .iter()
                            .zip(&w)
                            .map(|(&s, w)| w * c.v[s * kd + g * hd + d].to_f64())
                            .sum::<f64>()
                            / sum;
                        let x = got[hh * hd + d] as f64;
                        assert!(
                            (x - want).abs() < 1e-5,
                            "{layer:?} t{t} h{head} d{d}: {x} {want}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn each_token_gets_the_same_bits_alone_or_with_others() {
    for layer in LAYERS {
        let c = case(layer);
        let groups = c.heads.num_kv_heads;
        let alone = run(&c, 1);
        let together = run(&c, 16);
        let row = c.heads.num_heads / groups * c.heads.head_dim;
        for (i, block) in together.iter().enumerate() {
            let (b, g) = (i / groups, i % groups);
            for (j, r) in block.chunks_exact(row).enumerate() {
                assert_eq!(r, &alone[(b * 16 + j) * groups + g][..], "{layer:?}");
            }
        }
    }
}

type Path = (bool, unsafe fn(ItemArgs) -> Vec<f32>, unsafe fn(&mut [f32]));

/// The three kernel sets give the same bits (each runs where the CPU has it: all three on
/// AVX-512 machines such as CI's).
#[test]
fn every_attention_kernel_gives_the_same_bits() {
    let xs: Vec<f32> = (0..200).map(|i| -(i as f32) * 0.47 - 1e-3).collect();
    let portable: Vec<f32> = xs.iter().map(|&x| exp_canonical(x)).collect();
    for (x, e) in xs.iter().zip(&portable) {
        if *x >= -87.0 {
            assert!((e - x.exp()).abs() <= 2.5e-7 * x.exp(), "exp({x})");
        } else {
            // Clamped: a normal number no larger than exp(-87).
            assert!(e.is_normal() && *e <= 1.7e-38, "exp({x}) = {e}");
        }
    }
    for layer in LAYERS {
        let c = case(layer);
        let want = run(&c, 16);
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let n = c.q.len() / c.heads.q_dim();
            let paths: [Path; 2] = [
                (
                    has!("avx2") && has!("fma") && has!("f16c"),
                    x86::attend_item_avx2,
                    x86::exp_avx2,
                ),
                (has!("avx512f"), x86::attend_item_avx512, x86::exp_avx512),
            ];
            for (ok, f, exp) in paths {
                if !ok {
                    continue;
                }
                let mut got = Vec::new();
                for start in (0..n).step_by(16) {
                    for g in 0..c.heads.num_kv_heads {
                        let it = item(&c, start..(start + 16).min(n), g);
                        let args = (&it, &c.q[..], c.heads.q_dim(), &c.k[..], &c.v[..], c.heads);
                        // SAFETY: the features were just checked.
                        got.push(unsafe { f(args) });
                    }
                }
                assert_eq!(got, want, "{layer:?}");
                let mut e = xs.clone();
                // SAFETY: as above.
                unsafe { exp(&mut e) };
                assert_eq!(e, portable);
            }
        }
    }
}
