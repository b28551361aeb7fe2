//! The runner against llama.cpp on the default model: teacher-forced log-probabilities of the
//! reference tokens at every step, and free-running greedy ids.

mod common;

use wick_core::{BlockId, RequestId, ScheduledBatch, ScheduledSeq};
use wick_runner::{CacheConfig, Device, Runner};

const BLOCK: usize = 16;

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&l| l as f64 - lse).collect()
}

/// One sequence on the runner, one chunk per call, with its own block table.
struct Seq {
    start: usize,
    table: Vec<BlockId>,
}

impl Seq {
    fn new(case: usize) -> Self {
        // 32 blocks (512 positions) per case, so cases never share blocks.
        let table = (0..32).map(|b| BlockId((case * 32 + b) as u32)).collect();
        Self { start: 0, table }
    }

    fn feed(&mut self, runner: &mut Runner, tokens: &[u32]) -> Vec<f32> {
        let batch = ScheduledBatch {
            seqs: vec![ScheduledSeq {
                id: RequestId(1),
                tokens: tokens.to_vec(),
                start_pos: self.start,
                block_table: self.table.clone(),
                sample: true,
            }],
        };
        self.start += tokens.len();
        runner.step(&batch).expect("step").remove(0)
    }
}

fn argmax(v: &[f32]) -> u32 {
    wick_runner::argmax(v)
}

#[test]
fn runner_matches_llama_cpp() {
    let reference = common::reference();
    let cases = reference["cases"].as_array().expect("cases");
    let opts = wick_runner::LoadOptions::default();
    let loaded = wick_runner::load(&common::model_path(), &Device::Cpu, &opts).expect("load model");
    let mut runner = Runner::new(
        loaded.model,
        CacheConfig {
            num_blocks: 32 * cases.len(),
            block_size: BLOCK,
        },
    )
    .expect("runner");

    let (mut diffs, mut argmax_hits) = (Vec::new(), 0usize);
    let mut greedy_ok = 0;
    for (ci, case) in cases.iter().enumerate() {
        let prompt = common::ids(&case["prompt_ids"]);
        let steps = case["steps"].as_array().expect("steps");
        let ref_ids: Vec<u32> = steps
            .iter()
            .map(|s| s["id"].as_u64().unwrap() as u32)
            .collect();

        // Teacher-forced: feed the prompt, then each reference token.
        let mut seq = Seq::new(ci);
        let mut logits = seq.feed(&mut runner, &prompt);
        for (i, step) in steps.iter().enumerate() {
            let lp = log_softmax(&logits);
            let top = step["top"].as_array().unwrap();
            let ref_lp = top[0][1].as_f64().unwrap();
            diffs.push((lp[ref_ids[i] as usize] - ref_lp).abs());
            if argmax(&logits) == ref_ids[i] {
                argmax_hits += 1;
            }
            logits = seq.feed(&mut runner, &[ref_ids[i]]);
        }

        // Free-running greedy, in the blocks of the teacher-forced run (overwritten).
        let stable = case["stable_steps"].as_u64().unwrap() as usize;
        let mut seq = Seq::new(ci);
        let mut logits = seq.feed(&mut runner, &prompt);
        let mut ours = Vec::new();
        for _ in 0..stable {
            let t = argmax(&logits);
            ours.push(t);
            logits = seq.feed(&mut runner, &[t]);
        }
        let same = ours == ref_ids[..stable];
        greedy_ok += same as usize;
        println!(
            "case {:<28} greedy first {stable:>2} steps: {}",
            case["id"].as_str().unwrap_or("?"),
            if same { "equal" } else { "DIFFERENT" }
        );
    }
    let n = diffs.len();
    let mean = diffs.iter().sum::<f64>() / n as f64;
    let within = diffs.iter().filter(|&&d| d <= 0.1).count() as f64 / n as f64;
    let max = diffs.iter().copied().fold(0.0, f64::max);
    let hit = argmax_hits as f64 / n as f64;
    println!("steps {n}: mean |dlogp| {mean:.4}, within 0.1: {:.1}%, max {max:.3}, argmax agreement {:.1}%, greedy equal on {greedy_ok}/{} cases",
        within * 100.0, hit * 100.0, cases.len());
    assert_eq!(n, 683);
    assert!(mean <= 0.06, "mean {mean}");
    assert!(within >= 0.85, "within 0.1: {within}");
    assert!(max <= 0.6, "max {max}");
    assert!(hit >= 0.95, "argmax {hit}");
    assert!(greedy_ok >= 12, "greedy {greedy_ok}/16");
}
