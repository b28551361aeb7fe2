//! Device tools for the GPU check (`scripts/gpu-check.sh`):
//! - `wick parity`: the same weights on two devices (or dtypes, or weight formats), greedy
//!   on the reference, teacher-forced on the other, one batched step for all prompts at a
//!   time (prefill, then decode steps over the paged KV cache); reports how far the
//!   log-probabilities of the reference's tokens differ.
//! - `wick step-profile`: decode steps at several batch sizes, tokens/s and the step's time
//!   by phase (host work, matrix products, attention, the rest, sampling).
//! - `wick tiny-models`: the tests' tiny random models of every family.
//!
//! Developer tools: built with the `dev` feature only.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;
use wick_core::{BlockId, RequestId, ScheduledBatch, ScheduledSeq};
use wick_runner::{CacheConfig, LoadOptions, Runner};

const PROMPTS: &[&str] = &[
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "The three primary colors are",
    "In 1969, the first humans to walk on the Moon",
    "A good recipe for pancakes starts with",
    "The quick brown fox jumps over the lazy dog because",
    "Photosynthesis is the process by which",
    "To install a Python package, you can run",
    "The largest planet in our solar system is",
    "My favourite book is",
    "Rust's borrow checker ensures that",
    "The Pythagorean theorem states that",
    "Dear hiring manager, I am writing to",
    "The stock market fell today after",
];

/// The model and where it runs, for the GPU check's tools.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// Model: a .gguf file or a Hugging Face directory.
    #[arg(long)]
    pub model: PathBuf,
    /// The device under test.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Its dtype (auto: f32 on the CPU, bf16 on a GPU, for safetensors models).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

#[derive(Debug, Args)]
pub struct ParityArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Its GGUF weight format.
    #[arg(long, default_value = "native")]
    pub weight_format: String,
    /// The reference device (f32, native weights).
    #[arg(long, default_value = "cpu")]
    pub reference_device: String,
    /// Prompts run together (at most 16).
    #[arg(long, default_value_t = 8)]
    pub prompts: usize,
    /// Greedy tokens per prompt.
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// |Δ log p| counted as agreeing.
    #[arg(long, default_value_t = 0.05)]
    pub tolerance: f64,
    /// Fraction of steps that must agree within the tolerance; below it the exit code is 1.
    #[arg(long, default_value_t = 0.99)]
    pub min_within: f64,
}

#[derive(Debug, Args)]
pub struct TinyModelsArgs {
    /// A GGUF file whose tokenizer the models take (tokenizer.gguf from export-tokenizer will do).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Directory to write NAME.gguf and NAME-hf/ into, for each tiny model.
    #[arg(long)]
    pub out: PathBuf,
    /// Only the f32 Llama that `llama-quantize` turns into the GPU check's K-quant mix.
    #[arg(long)]
    pub kquant_source: bool,
}

/// Writes the tests' tiny random models of every family (`wick_runner::testing`), for
/// checks on machines without the test suite (the GPU check).
pub fn tiny_models(args: TinyModelsArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)?;
    let models = if args.kquant_source {
        vec![wick_runner::testing::kquant_source()]
    } else {
        wick_runner::testing::tiny_models()
    };
    for t in models {
        wick_runner::testing::write_tiny(&t, &args.tokenizer, &args.out)
            .with_context(|| format!("cannot write {}", t.name))?;
        println!("{}", args.out.join(format!("{}.gguf", t.name)).display());
    }
    Ok(())
}

/// Steps `prompts` through `runner` together: the prompts in one step, then one token each
/// per step, chosen by `next` from (sequence, logits). Returns every sequence's logits rows.
fn run(
    runner: &mut Runner,
    prompts: &[Vec<u32>],
    tokens: usize,
    block_size: usize,
    mut next: impl FnMut(usize, usize, &[f32]) -> u32,
) -> anyhow::Result<Vec<Vec<Vec<f32>>>> {
    let per_seq = (prompts.iter().map(Vec::len).max().unwrap_or(0) + tokens).div_ceil(block_size);
    let tables: Vec<Vec<BlockId>> = (0..prompts.len())
        .map(|s| {
            (0..per_seq)
                .map(|b| BlockId((s * per_seq + b) as u32))
                .collect()
        })
        .collect();
    let mut rows = vec![Vec::new(); prompts.len()];
    let mut feed: Vec<Vec<u32>> = prompts.to_vec();
    let mut pos = vec![0usize; prompts.len()];
    for step in 0..tokens {
        let seqs = (0..prompts.len())
            .map(|s| ScheduledSeq {
                id: RequestId(s as u64),
                tokens: feed[s].clone(),
                start_pos: pos[s],
                block_table: tables[s].clone(),
                sample: true,
                proposed: 0,
                adapter: None,
            })
            .collect();
        let logits = runner
            .step(&ScheduledBatch { seqs })
            .map_err(|e| anyhow::anyhow!("step {step}: {e}"))?;
        for (s, l) in logits.into_iter().enumerate() {
            pos[s] += feed[s].len();
            feed[s] = vec![next(s, step, &l)];
            rows[s].push(l);
        }
    }
    Ok(rows)
}

fn load(
    args: &ParityArgs,
    device: &str,
    opts: &LoadOptions,
) -> anyhow::Result<wick_runner::LoadedModel> {
    let device = wick_runner::parse_device(device)?;
    wick_runner::load(&args.target.model, &device, opts)
        .with_context(|| format!("cannot load {}", args.target.model.display()))
}

pub fn parity(args: ParityArgs) -> anyhow::Result<bool> {
    if args.prompts == 0 || args.prompts > PROMPTS.len() || args.tokens == 0 {
        bail!(
            "--prompts must be 1 to {} and --tokens at least 1",
            PROMPTS.len()
        );
    }
    let block_size = 16;
    let reference_opts = LoadOptions {
        dtype: None,
        simd: crate::simd_limit(),
        ..Default::default()
    };
    let test_opts = LoadOptions {
        weight_format: args.weight_format.parse()?,
        dtype: wick_runner::parse_dtype(&args.target.dtype)?,
        simd: crate::simd_limit(),
        ..Default::default()
    };
    let loaded = load(&args, &args.reference_device, &reference_opts)?;
    let prompts = encode(&loaded.assets.tokenizer, args.prompts)?;
    let cache = CacheConfig {
        num_blocks: blocks_for(&prompts, args.tokens, block_size),
        block_size,
    };
    let mut reference = Runner::new(loaded.model, cache)?;
    let started = std::time::Instant::now();
    // Greedy on the reference.
    let mut chosen = vec![Vec::new(); prompts.len()];
    let ref_rows = run(
        &mut reference,
        &prompts,
        args.tokens,
        block_size,
        |s, _, l| {
            let t = wick_runner::argmax(l);
            chosen[s].push(t);
            t
        },
    )?;
    let ref_secs = started.elapsed().as_secs_f64();
    drop(reference);
    let mut under_test = Runner::new(load(&args, &args.target.device, &test_opts)?.model, cache)?;
    let started = std::time::Instant::now();
    let test_rows = run(
        &mut under_test,
        &prompts,
        args.tokens,
        block_size,
        |s, step, _| chosen[s][step],
    )?;
    let test_secs = started.elapsed().as_secs_f64();

    let (mut diffs, mut argmax_same) = (Vec::new(), 0usize);
    for s in 0..prompts.len() {
        for step in 0..args.tokens {
            let t = chosen[s][step] as usize;
            let (a, b) = (&ref_rows[s][step], &test_rows[s][step]);
            let lp = |row: &[f32]| wick_runner::logprobs(row, t as u32, 0).logprob as f64;
            diffs.push((lp(a) - lp(b)).abs());
            argmax_same += (wick_runner::argmax(b) as usize == t) as usize;
        }
    }
    let n = diffs.len() as f64;
    let within = diffs.iter().filter(|&&d| d <= args.tolerance).count() as f64 / n;
    let mean = diffs.iter().sum::<f64>() / n;
    let max = diffs.iter().copied().fold(0.0, f64::max);
    let pass = within >= args.min_within;
    let report = json!({
        "model": args.target.model.display().to_string(),
        "reference": format!("{} f32", args.reference_device),
        "under_test": format!("{} {} {}", args.target.device, args.target.dtype, args.weight_format),
        "sequences": prompts.len(),
        "steps": diffs.len(),
        "tolerance_nats": args.tolerance,
        "within_tolerance": within,
        "mean_abs_dlogp": mean,
        "max_abs_dlogp": max,
        "argmax_agreement": argmax_same as f64 / n,
        "reference_seconds": ref_secs,
        "under_test_seconds": test_secs,
        "pass": pass,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(pass)
}

fn encode(t: &tokenizers::Tokenizer, n: usize) -> anyhow::Result<Vec<Vec<u32>>> {
    PROMPTS[..n]
        .iter()
        .map(|p| {
            t.encode(*p, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| anyhow::anyhow!("tokenize: {e}"))
        })
        .collect()
}

fn blocks_for(prompts: &[Vec<u32>], tokens: usize, block_size: usize) -> usize {
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    prompts.len() * (longest + tokens).div_ceil(block_size)
}

#[derive(Debug, Args)]
pub struct StepProfileArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Sequences decoding together, one measurement each.
    #[arg(long, default_value = "1,16,64", value_delimiter = ',')]
    pub batches: Vec<usize>,
    /// Positions every sequence holds before the measured steps.
    #[arg(long, default_value_t = 512)]
    pub context: usize,
    /// Measured decode steps per batch.
    #[arg(long, default_value_t = 16)]
    pub steps: usize,
}

/// Decode steps at each batch size over a context of `--context` positions: tokens/s
/// unprofiled, then the same steps profiled (a device synchronization after each phase)
/// for where the time goes. One JSON line per batch size.
pub fn step_profile(args: StepProfileArgs) -> anyhow::Result<()> {
    let max_batch = args.batches.iter().copied().max().unwrap_or(0);
    if max_batch == 0 || args.steps == 0 || args.context == 0 {
        bail!("--batches, --steps and --context must be at least 1");
    }
    let block_size = 16;
    // Context, two warm-up steps, the timed and the profiled steps.
    let per_seq = (args.context + 2 + 2 * args.steps).div_ceil(block_size);
    let opts = LoadOptions {
        dtype: wick_runner::parse_dtype(&args.target.dtype)?,
        simd: crate::simd_limit(),
        ..Default::default()
    };
    let loaded = wick_runner::load(
        &args.target.model,
        &wick_runner::parse_device(&args.target.device)?,
        &opts,
    )
    .with_context(|| format!("cannot load {}", args.target.model.display()))?;
    let vocab = loaded.model.config().vocab_size as u32;
    let cache = CacheConfig {
        num_blocks: max_batch * per_seq,
        block_size,
    };
    let mut runner = Runner::new(loaded.model, cache)?;
    let greedy = wick_runner::DrawParams::GREEDY;
    for &batch in &args.batches {
        let table = |s: usize| -> Vec<BlockId> {
            (0..per_seq)
                .map(|b| BlockId((s * per_seq + b) as u32))
                .collect()
        };
        // The prompts, one sequence and up to 512 tokens per step.
        let mut last = vec![0u32; batch];
        for (s, last) in last.iter_mut().enumerate() {
            let prompt: Vec<u32> = (0..args.context)
                .map(|i| ((i * 7919 + s * 104_729) as u32) % vocab)
                .collect();
            for start in (0..args.context).step_by(512) {
                let end = (start + 512).min(args.context);
                runner.step(&ScheduledBatch {
                    seqs: vec![ScheduledSeq {
                        id: RequestId(s as u64),
                        tokens: prompt[start..end].to_vec(),
                        start_pos: start,
                        block_table: table(s),
                        sample: end == args.context,
                        proposed: 0,
                        adapter: None,
                    }],
                })?;
            }
            *last = prompt[args.context - 1];
        }
        let mut pos = args.context;
        let mut decode = |runner: &mut Runner, steps: usize| -> anyhow::Result<f64> {
            let started = std::time::Instant::now();
            for _ in 0..steps {
                let seqs = (0..batch)
                    .map(|s| ScheduledSeq {
                        id: RequestId(s as u64),
                        tokens: vec![last[s]],
                        start_pos: pos,
                        block_table: table(s),
                        sample: true,
                        proposed: 0,
                        adapter: None,
                    })
                    .collect();
                let rows =
                    runner.step_drawing(&ScheduledBatch { seqs }, &vec![Some(greedy); batch])?;
                for (l, row) in last.iter_mut().zip(rows) {
                    *l = match row {
                        wick_runner::StepRow::Drawn(id) => id,
                        wick_runner::StepRow::Logits(l) => wick_runner::argmax(&l),
                    };
                }
                pos += 1;
            }
            Ok(started.elapsed().as_secs_f64())
        };
        decode(&mut runner, 2)?;
        let secs = decode(&mut runner, args.steps)?;
        runner.set_profiling(true);
        decode(&mut runner, args.steps)?;
        let p = runner.profile();
        runner.set_profiling(false);
        let per_step = |x: f64| x * 1e3 / args.steps as f64;
        println!(
            "{}",
            json!({
                "batch": batch,
                "context": args.context,
                "steps": args.steps,
                "step_ms": per_step(secs),
                "tokens_per_s": (batch * args.steps) as f64 / secs,
                "profiled_ms_per_step": {
                    "host": per_step(p.host),
                    "matmul": per_step(p.matmul),
                    "attention": per_step(p.attention),
                    "other": per_step(p.other),
                    "sampling": per_step(p.sampling),
                },
            })
        );
    }
    Ok(())
}
