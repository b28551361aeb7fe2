//! One runner step on the default model at 1, 8 and 32 tokens, for each weight format.
//!
//! `decode/N`: N sequences of 64 cached positions each decode one token (one step).
//! `prefill/N`: one sequence prefills an N-token chunk. Set `WICK_MODEL` to the GGUF path,
//! or let `scripts/fetch-model.sh` fetch it. `WICK_BENCH_FORMATS=q8_0,f32,native` picks the
//! formats (default: all three).
//!
//! `metadata/{host,paged}/N`: building one step's attention metadata (and, for `paged`, the
//! paged op's block tables) for N sequences decoding at position 4,095: the host work every
//! step does before its layers, without the model.

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wick_core::{BlockId, RequestId, ScheduledBatch, ScheduledSeq};
use wick_runner::{CacheConfig, Device, LoadOptions, Runner, WeightFormat};

const BLOCK: usize = 16;
const CTX: usize = 64;

fn model_path() -> PathBuf {
    if let Ok(p) = std::env::var("WICK_MODEL") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::process::Command::new("bash")
        .arg(root.join("scripts/fetch-model.sh"))
        .output()
        .expect("run scripts/fetch-model.sh");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn table(seq: usize) -> Vec<BlockId> {
    (0..8).map(|b| BlockId((seq * 8 + b) as u32)).collect()
}

fn decode_batch(n: usize) -> ScheduledBatch {
    ScheduledBatch {
        seqs: (0..n)
            .map(|i| ScheduledSeq {
                id: RequestId(i as u64),
                tokens: vec![100 + i as u32],
                start_pos: CTX,
                block_table: table(i),
                sample: true,
                proposed: 0,
                adapter: None,
            })
            .collect(),
    }
}

fn prefill_batch(n: usize) -> ScheduledBatch {
    ScheduledBatch {
        seqs: vec![ScheduledSeq {
            id: RequestId(0),
            tokens: (0..n as u32).map(|t| 200 + t).collect(),
            start_pos: 0,
            block_table: table(0),
            sample: true,
            proposed: 0,
            adapter: None,
        }],
    }
}

/// `n` sequences of 4,096 positions (256 blocks each, scattered), decoding their last.
fn long_decode_batch(n: usize) -> ScheduledBatch {
    let blocks = 4096 / BLOCK;
    ScheduledBatch {
        seqs: (0..n)
            .map(|i| ScheduledSeq {
                id: RequestId(i as u64),
                tokens: vec![7],
                start_pos: 4095,
                block_table: (0..blocks)
                    .map(|b| BlockId(((b * n + i) * 7 % (n * blocks)) as u32))
                    .collect(),
                sample: true,
                proposed: 0,
                adapter: None,
            })
            .collect(),
    }
}

fn bench_metadata(c: &mut Criterion) {
    let mut g = c.benchmark_group("metadata");
    for n in [1usize, 16, 64] {
        let batch = long_decode_batch(n);
        let num_blocks = n * 4096 / BLOCK;
        for (name, tables) in [("host", false), ("paged", true)] {
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| {
                    wick_runner::testing::step_metadata(&batch, BLOCK, num_blocks, tables)
                        .expect("metadata")
                })
            });
        }
    }
    g.finish();
}

fn bench(c: &mut Criterion) {
    let path = model_path();
    let formats = std::env::var("WICK_BENCH_FORMATS").unwrap_or_else(|_| "q8_0,f32,native".into());
    for fmt in formats.split(',') {
        let weight_format: WeightFormat = fmt.parse().expect("weight format");
        let loaded = wick_runner::load(
            &path,
            &Device::Cpu,
            &LoadOptions {
                weight_format,
                ..Default::default()
            },
        )
        .expect("load model");
        let mut runner = Runner::new(
            loaded.model,
            CacheConfig {
                num_blocks: 32 * 8,
                block_size: BLOCK,
            },
        )
        .expect("runner");
        let mut g = c.benchmark_group(format!("step/{fmt}"));
        g.sample_size(10);
        for n in [1usize, 8, 32] {
            g.throughput(Throughput::Elements(n as u64));
            g.bench_with_input(BenchmarkId::new("decode", n), &n, |b, &n| {
                let batch = decode_batch(n);
                b.iter(|| runner.step(&batch).expect("step"))
            });
            g.bench_with_input(BenchmarkId::new("prefill", n), &n, |b, &n| {
                let batch = prefill_batch(n);
                b.iter(|| runner.step(&batch).expect("step"))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench_metadata, bench);
criterion_main!(benches);
