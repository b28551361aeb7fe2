//! `schedule()` + `postprocess()` with 256 running sequences decoding (and prefix caching on).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use wick_core::RequestId;
use wick_scheduler::{Scheduler, SchedulerConfig, Sequence};

fn bench(c: &mut Criterion) {
    let mut s = Scheduler::new(SchedulerConfig {
        max_num_seqs: 256,
        max_num_batched_tokens: 8192,
        block_size: 16,
        num_blocks: 256 * 64,
        max_model_len: 1024,
        enable_prefix_caching: true,
        prefill_latency_share: 0.25,
        prefill_tokens_per_decode: 1,
        min_prefill_tokens_per_step: 8,
    });
    for i in 0..256u64 {
        let prompt = (0..200).map(|t| (t * 7 + i as u32) % 1000).collect();
        s.add(Sequence::new(
            RequestId(i),
            prompt,
            1_000_000,
            vec![u32::MAX],
        ))
        .expect("add");
    }
    // Prefill everything, so that each measured step is 256 decodes.
    while s.num_waiting() > 0 || s.sequences().any(|q| q.num_pending() > 1) {
        let b = s.schedule();
        let sampled: Vec<_> = b
            .seqs
            .iter()
            .filter(|q| q.sample)
            .map(|q| (q.id, 5))
            .collect();
        s.postprocess(&sampled);
    }
    let mut g = c.benchmark_group("scheduler");
    g.bench_function("step/256_running", |bench| {
        bench.iter_batched_ref(
            || s.clone(),
            |s| {
                let b = s.schedule();
                assert_eq!(b.seqs.len(), 256);
                let sampled: Vec<_> = b.seqs.iter().map(|q| (q.id, 5)).collect();
                s.postprocess(&sampled)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
