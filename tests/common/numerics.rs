//! The runner against llama.cpp: teacher-forced log-probabilities of the reference tokens at
//! every step, and free-running greedy ids. All cases of a model run together, one sequence
//! each, in the same steps (the kernels give every row the same bits whatever shares its
//! step, so this is the single-sequence result, computed faster).

use std::path::Path;

use serde_json::Value;
use wick_core::{BlockId, RequestId, ScheduledBatch, ScheduledSeq};
use wick_runner::{CacheConfig, Device, LoadOptions, Runner};

use super::ids;

const BLOCK: usize = 16;
/// Blocks per case: 1,024 positions.
const BLOCKS: usize = 64;

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&l| l as f64 - lse).collect()
}

/// Feeds each case's next tokens (`None`: the case is done) in one step; returns the logits
/// of each case fed.
fn step(
    runner: &mut Runner,
    starts: &mut [usize],
    feed: &[Option<Vec<u32>>],
) -> Vec<Option<Vec<f32>>> {
    let mut seqs = Vec::new();
    for (i, f) in feed.iter().enumerate() {
        if let Some(tokens) = f {
            seqs.push(ScheduledSeq {
                id: RequestId(i as u64),
                tokens: tokens.clone(),
                start_pos: starts[i],
                block_table: (0..BLOCKS)
                    .map(|b| BlockId((i * BLOCKS + b) as u32))
                    .collect(),
                sample: true,
                proposed: 0,
                adapter: None,
            });
            starts[i] += tokens.len();
        }
    }
    let mut logits = runner
        .step(&ScheduledBatch { seqs })
        .expect("step")
        .into_iter();
    feed.iter()
        .map(|f| {
            f.as_ref()
                .map(|_| logits.next().expect("a row per sequence"))
        })
        .collect()
}

/// What a model must reach against its reference.
#[derive(Clone, Copy)]
pub struct Bounds {
    /// Cases whose greedy ids must equal the reference's through `stable_steps`.
    pub min_stable: usize,
    /// Share of steps whose argmax is the reference's token (0.95 in the issue's bounds).
    pub argmax: f64,
    /// Share of steps within 0.1 nats of the reference (0.85 in the issue's bounds).
    pub within: f64,
    /// Largest |dlogp| of any step (0.6 in the issue's bounds).
    pub max: f64,
}

impl Bounds {
    /// The model-families issue's bounds, for `cases` cases.
    pub fn issue(cases: usize) -> Self {
        Self {
            min_stable: (3 * cases).div_ceil(4),
            argmax: 0.95,
            within: 0.85,
            max: 0.6,
        }
    }
}

struct Case {
    prompt: Vec<u32>,
    ids: Vec<u32>,
    top1: Vec<f64>,
    stable: usize,
    decisive: Option<usize>,
    name: String,
}

fn cases(reference: &Value) -> Vec<Case> {
    reference["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let steps = c["steps"].as_array().expect("steps");
            Case {
                prompt: ids(&c["prompt_ids"]),
                ids: steps
                    .iter()
                    .map(|s| s["id"].as_u64().unwrap() as u32)
                    .collect(),
                top1: steps
                    .iter()
                    .map(|s| s["top"][0][1].as_f64().unwrap())
                    .collect(),
                stable: c["stable_steps"].as_u64().unwrap() as usize,
                decisive: c["decisive_steps_04"].as_u64().map(|d| d as usize),
                name: c["id"].as_str().unwrap_or("?").to_string(),
            }
        })
        .collect()
}

/// Loads `model` with `opts` and checks it against `reference` (llama.cpp's numerics): the
/// teacher-forced bounds of the model-families issue (mean |dlogp| at most 0.06, 85% of steps
/// within 0.1, none over 0.6, argmax agreement) and greedy equality. Returns what failed.
pub fn check(
    model: &Path,
    opts: &LoadOptions,
    reference: &Value,
    bounds: Bounds,
) -> Result<(), String> {
    let cases = cases(reference);
    let opts = LoadOptions {
        simd: super::simd_limit(),
        ..opts.clone()
    };
    let loaded = wick_runner::load(model, &Device::Cpu, &opts).expect("load model");
    let mut runner = Runner::new(
        loaded.model,
        CacheConfig {
            num_blocks: BLOCKS * cases.len(),
            block_size: BLOCK,
        },
    )
    .expect("runner");
    let n = cases.len();
    let prompts: Vec<Option<Vec<u32>>> = cases.iter().map(|c| Some(c.prompt.clone())).collect();

    // Teacher-forced: the prompts, then each reference token.
    let (mut diffs, mut hits) = (Vec::new(), 0usize);
    let mut starts = vec![0; n];
    let mut logits = step(&mut runner, &mut starts, &prompts);
    for s in 0.. {
        let mut feed = vec![None; n];
        for (i, c) in cases.iter().enumerate() {
            let (Some(l), Some(&want)) = (&logits[i], c.ids.get(s)) else {
                continue;
            };
            let lp = log_softmax(l);
            diffs.push((lp[want as usize] - c.top1[s]).abs());
            if std::env::var_os("WICK_NUMERICS_VERBOSE").is_some()
                && (lp[want as usize] - c.top1[s]).abs() > 0.2
            {
                println!(
                    "  {} step {s}: ours {:.4} ref {:.4}",
                    c.name, lp[want as usize], c.top1[s]
                );
            }
            hits += (wick_runner::argmax(l) == want) as usize;
            if s + 1 < c.ids.len() {
                feed[i] = Some(vec![want]);
            }
        }
        if feed.iter().all(Option::is_none) {
            break;
        }
        logits = step(&mut runner, &mut starts, &feed);
    }

    // Free-running greedy, in the blocks of the teacher-forced run (overwritten).
    let horizon: Vec<usize> = cases
        .iter()
        .map(|c| c.stable.max(c.decisive.unwrap_or(0)))
        .collect();
    let mut ours: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut starts = vec![0; n];
    let mut logits = step(&mut runner, &mut starts, &prompts);
    loop {
        let mut feed = vec![None; n];
        for i in 0..n {
            if let Some(l) = &logits[i] {
                if ours[i].len() < horizon[i] {
                    let t = wick_runner::argmax(l);
                    ours[i].push(t);
                    feed[i] = Some(vec![t]);
                }
            }
        }
        if feed.iter().all(Option::is_none) {
            break;
        }
        logits = step(&mut runner, &mut starts, &feed);
    }
    let (mut stable_ok, mut decisive_ok, mut decisive_n) = (0, 0, 0);
    for (c, o) in cases.iter().zip(&ours) {
        let stable = o[..c.stable] == c.ids[..c.stable];
        stable_ok += stable as usize;
        if let Some(d) = c.decisive {
            decisive_n += 1;
            let same = o[..d] == c.ids[..d];
            decisive_ok += same as usize;
            if !same {
                println!(
                    "case {}: greedy differs within the first {d} decisive steps: {:?} vs {:?}",
                    c.name,
                    &o[..d],
                    &c.ids[..d]
                );
            }
        }
        println!(
            "case {:<16} greedy through stable {:>2}: {}",
            c.name,
            c.stable,
            if stable { "equal" } else { "DIFFERENT" }
        );
    }
    let steps = diffs.len();
    let mean = diffs.iter().sum::<f64>() / steps as f64;
    let within = diffs.iter().filter(|&&d| d <= 0.1).count() as f64 / steps as f64;
    let max = diffs.iter().copied().fold(0.0, f64::max);
    let hit = hits as f64 / steps as f64;
    println!(
        "{}: steps {steps}: mean |dlogp| {mean:.4}, within 0.1: {:.1}%, max {max:.3}, argmax agreement {:.1}%, greedy equal through stable_steps on {stable_ok}/{n}, through decisive_steps_04 on {decisive_ok}/{decisive_n}",
        model.file_name().unwrap_or_default().to_string_lossy(),
        within * 100.0,
        hit * 100.0
    );
    let total: usize = cases.iter().map(|c| c.ids.len()).sum();
    let mut failed = Vec::new();
    if steps != total {
        failed.push(format!("{steps} steps of {total}"));
    }
    let checks = [
        (mean <= 0.06, format!("mean |dlogp| {mean:.4} > 0.06")),
        (
            within >= bounds.within,
            format!("within 0.1 {within:.3} < {}", bounds.within),
        ),
        (max <= bounds.max, format!("max {max:.3} > {}", bounds.max)),
        (
            hit >= bounds.argmax,
            format!("argmax agreement {hit:.3} < {}", bounds.argmax),
        ),
        (
            stable_ok >= bounds.min_stable,
            format!("greedy through stable_steps {stable_ok}/{n}"),
        ),
        (
            decisive_ok == decisive_n,
            format!("greedy through decisive_steps_04 {decisive_ok}/{decisive_n}"),
        ),
    ];
    failed.extend(checks.into_iter().filter(|(ok, _)| !ok).map(|(_, m)| m));
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {}", model.display(), failed.join(", ")))
    }
}
