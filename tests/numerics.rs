//! The runner against llama.cpp on each real test model: teacher-forced log-probabilities of
//! the reference tokens at every step, and free-running greedy ids. All cases of a model run
//! together, one sequence each, in the same steps (the kernels give every row the same bits
//! whatever shares its step, so this is the single-sequence result, computed faster).

mod common;

use std::path::Path;

use serde_json::Value;
use wick_core::{BlockId, RequestId, ScheduledBatch, ScheduledSeq};
use wick_runner::{CacheConfig, Device, LoadOptions, Runner};

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
struct Bounds {
    /// Cases whose greedy ids must equal the reference's through `stable_steps`.
    min_stable: usize,
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
                prompt: common::ids(&c["prompt_ids"]),
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

fn check(model: &Path, reference: &Value, bounds: Bounds) {
    let cases = cases(reference);
    let loaded =
        wick_runner::load(model, &Device::Cpu, &LoadOptions::default()).expect("load model");
    let mut runner = Runner::new(
        loaded.model,
        CacheConfig {
            num_blocks: BLOCKS * cases.len(),
            block_size: BLOCK,
        },
    )
    .expect("runner");
    let n = cases.len();

    // Teacher-forced: the prompts, then each reference token.
    let (mut diffs, mut hits) = (Vec::new(), 0usize);
    let mut starts = vec![0; n];
    let mut logits = step(
        &mut runner,
        &mut starts,
        &cases
            .iter()
            .map(|c| Some(c.prompt.clone()))
            .collect::<Vec<_>>(),
    );
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
    let mut logits = step(
        &mut runner,
        &mut starts,
        &cases
            .iter()
            .map(|c| Some(c.prompt.clone()))
            .collect::<Vec<_>>(),
    );
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
            assert!(
                same,
                "case {}: greedy differs within the first {d} decisive steps: {:?} vs {:?}",
                c.name,
                &o[..d],
                &c.ids[..d]
            );
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
    assert_eq!(steps, total);
    assert!(mean <= 0.06, "mean {mean}");
    assert!(within >= 0.85, "within 0.1: {within}");
    assert!(max <= 0.6, "max {max}");
    assert!(hit >= 0.95, "argmax {hit}");
    assert!(stable_ok >= bounds.min_stable, "greedy {stable_ok}/{n}");
}

#[test]
fn default_model_matches_llama_cpp() {
    let reference = common::reference();
    assert_eq!(reference["cases"].as_array().unwrap().len(), 16);
    check(&common::model_path(), &reference, Bounds { min_stable: 12 });
}

#[test]
fn qwen2_5_coder_q4_k_m_matches_llama_cpp() {
    let reference = common::reference_named("qwen2.5-coder-0.5b-q4_k_m.llamacpp.json");
    let n = reference["cases"].as_array().unwrap().len();
    check(
        &common::fetch_model("qwen"),
        &reference,
        Bounds {
            min_stable: (3 * n).div_ceil(4),
        },
    );
}

#[test]
fn gemma3_270m_q4_k_m_matches_llama_cpp() {
    let reference = common::reference_named("gemma-3-270m-q4_k_m.llamacpp.json");
    let n = reference["cases"].as_array().unwrap().len();
    check(
        &common::fetch_model("gemma"),
        &reference,
        Bounds {
            min_stable: (3 * n).div_ceil(4),
        },
    );
}
