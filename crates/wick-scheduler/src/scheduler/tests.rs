use proptest::prelude::*;

use super::*;
use crate::{attended, StepCost};

const EOS: u32 = 2;

fn cfg(num_blocks: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 16,
        block_size: 4,
        num_blocks,
        max_model_len: 64,
        enable_prefix_caching: true,
        prefill_latency_share: 0.25,
        prefill_tokens_per_decode: 0,
        min_prefill_tokens_per_step: 1,
    }
}

fn seq(id: u64, prompt_len: usize, max_tokens: usize) -> Sequence {
    Sequence::new(RequestId(id), vec![7; prompt_len], max_tokens, vec![EOS])
}

/// Samples token 5 for every sequence that asked for one.
fn sample_all(batch: &ScheduledBatch) -> Vec<(RequestId, u32)> {
    batch
        .seqs
        .iter()
        .filter(|s| s.sample)
        .map(|s| (s.id, 5))
        .collect()
}

/// Block references held by sequences, after checking they equal the pool's counts.
fn blocks_held(s: &Scheduler) -> usize {
    s.check_blocks();
    s.sequences().map(|q| q.block_table.len()).sum()
}

impl Scheduler {
    fn check_blocks(&self) {
        self.blocks.check().unwrap();
        let held: usize = self.sequences().map(|q| q.block_table.len()).sum();
        assert_eq!(held, self.blocks.total_refs());
        // A block registered in the prefix cache holds computed tokens of every sequence
        // that has it, as they are now.
        let bs = self.cfg.block_size;
        for q in self.sequences() {
            for (i, &b) in q.block_table.iter().enumerate() {
                if let Some(tokens) = self.blocks.registered(b) {
                    assert!(
                        (i + 1) * bs <= q.num_computed,
                        "{q:?}: block {i} registered"
                    );
                    assert_eq!(tokens, &q.tokens[i * bs..(i + 1) * bs], "{q:?}: block {i}");
                }
            }
        }
    }
}

#[test]
fn prefill_then_decode_then_length() {
    let mut s = Scheduler::new(cfg(32));
    s.add(seq(1, 6, 2)).unwrap();
    let b = s.schedule();
    assert_eq!(b.seqs.len(), 1);
    assert_eq!(b.seqs[0].tokens.len(), 6);
    assert_eq!(b.seqs[0].start_pos, 0);
    assert!(b.seqs[0].sample);
    assert_eq!(b.seqs[0].block_table.len(), 2);
    let out = s.postprocess(&sample_all(&b));
    assert_eq!(out[0].token, Some(5));
    assert_eq!(out[0].finish, None);

    let b = s.schedule();
    assert_eq!(b.seqs[0].tokens, vec![5]);
    assert_eq!(b.seqs[0].start_pos, 6);
    let out = s.postprocess(&sample_all(&b));
    assert_eq!(out[0].finish, Some(FinishReason::Length));
    assert_eq!(out[0].completion_tokens, 2);
    assert_eq!(s.num_blocks_used(), 0);
    assert!(!s.has_work());
}

#[test]
fn stop_token_finishes_and_is_not_emitted() {
    let mut s = Scheduler::new(cfg(32));
    s.add(seq(1, 3, 10)).unwrap();
    let b = s.schedule();
    let out = s.postprocess(&[(b.seqs[0].id, EOS)]);
    assert_eq!(out[0].token, None);
    assert_eq!(out[0].finish, Some(FinishReason::Stop));
    assert_eq!(out[0].completion_tokens, 1);
    assert_eq!(s.num_blocks_used(), 0);
}

#[test]
fn long_prompt_is_chunked_within_budget() {
    let mut s = Scheduler::new(cfg(32));
    s.add(seq(1, 40, 1)).unwrap();
    let mut computed = 0;
    for _ in 0..3 {
        let b = s.schedule();
        assert!(b.num_tokens() <= 16);
        assert_eq!(b.seqs[0].start_pos, computed);
        computed += b.seqs[0].tokens.len();
        assert_eq!(b.seqs[0].sample, computed == 40);
        s.postprocess(&sample_all(&b));
    }
    assert_eq!(computed, 40);
    assert!(!s.has_work());
}

#[test]
fn decodes_are_scheduled_before_new_prompts() {
    let mut s = Scheduler::new(cfg(32));
    s.add(seq(1, 4, 10)).unwrap();
    let b = s.schedule();
    s.postprocess(&sample_all(&b));
    s.add(seq(2, 30, 10)).unwrap();
    let b = s.schedule();
    assert_eq!(b.seqs[0].id, RequestId(1));
    assert_eq!(b.seqs[0].tokens.len(), 1);
    assert_eq!(b.seqs[1].id, RequestId(2));
    assert_eq!(b.seqs[1].tokens.len(), 15);
}

#[test]
fn request_larger_than_cache_is_refused() {
    let mut s = Scheduler::new(cfg(4)); // 16 positions
    assert_eq!(
        s.add(seq(1, 10, 10)),
        Err(AddError::ExceedsCache {
            needed: 20,
            capacity: 16
        })
    );
    assert!(s.add(seq(2, 10, 6)).is_ok());
    assert_eq!(s.add(seq(2, 1, 1)), Err(AddError::Duplicate(RequestId(2))));
    assert_eq!(s.add(seq(3, 0, 1)), Err(AddError::EmptyPrompt));
}

#[test]
fn preemption_frees_newest_and_recomputes_it() {
    // 4 blocks of 4 = 16 positions; two sequences of 6-token prompts growing to 14.
    let mut s = Scheduler::new(cfg(4));
    s.add(seq(1, 6, 8)).unwrap();
    s.add(seq(2, 6, 8)).unwrap();
    let mut finished = Vec::new();
    let mut saw_preemption = false;
    for _ in 0..100 {
        let b = s.schedule();
        if s.num_preemptions() > 0 {
            saw_preemption = true;
        }
        for o in s.postprocess(&sample_all(&b)) {
            if o.finish.is_some() {
                finished.push((o.id, o.completion_tokens));
            }
        }
        assert_eq!(blocks_held(&s), s.blocks().total_refs());
        if !s.has_work() {
            break;
        }
    }
    assert!(saw_preemption);
    assert_eq!(finished, vec![(RequestId(1), 8), (RequestId(2), 8)]);
}

#[test]
fn abort_frees_blocks_everywhere() {
    let mut s = Scheduler::new(cfg(32));
    s.add(seq(1, 6, 8)).unwrap();
    s.add(seq(2, 6, 8)).unwrap();
    let b = s.schedule();
    assert!(s.num_blocks_used() > 0);
    assert!(s.abort(RequestId(1)).is_some());
    // Aborted between schedule and postprocess: its result is dropped.
    let out = s.postprocess(&sample_all(&b));
    assert!(out.iter().all(|o| o.id == RequestId(2)));
    assert!(s.abort(RequestId(2)).is_some());
    assert!(s.abort(RequestId(2)).is_none());
    assert_eq!(s.num_blocks_used(), 0);
}

#[derive(Debug, Clone)]
enum Op {
    /// A prompt of `prompt` tokens from one of a few families that share prefixes.
    Add {
        prompt: usize,
        max_tokens: usize,
        family: u32,
    },
    Abort(u64),
    Step {
        eos_every: u32,
    },
    /// Proposes `k` tokens (all `token`) for the running sequence `id`, if it decodes.
    Propose {
        id: u64,
        k: usize,
        token: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1usize..40, 1usize..30, 0u32..3).prop_map(|(prompt, max_tokens, family)| Op::Add {
            prompt,
            max_tokens,
            family
        }),
        (0u64..20).prop_map(Op::Abort),
        (0u64..20, 1usize..6, prop::sample::select(vec![5, 9, EOS]))
            .prop_map(|(id, k, token)| Op::Propose { id, k, token }),
        (0u32..7).prop_map(|eos_every| Op::Step { eos_every }),
        (0u32..7).prop_map(|eos_every| Op::Step { eos_every }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Blocks are conserved, budgets respected, and every accepted request finishes.
    #[test]
    fn invariants_hold_and_everything_finishes(
        ops in prop::collection::vec(op(), 1..80),
        num_blocks in 6usize..40,
        budget in 1usize..24,
        caching in any::<bool>(),
        per_decode in 0usize..3,
        costed in any::<bool>(),
    ) {
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_seqs: 3,
            max_num_batched_tokens: budget,
            block_size: 4,
            num_blocks,
            max_model_len: 64,
            enable_prefix_caching: caching,
            prefill_latency_share: 0.25,
            prefill_tokens_per_decode: per_decode,
            min_prefill_tokens_per_step: 2,
        });
        if costed {
            s.set_step_cost(Some(StepCost { fixed: 1.0, per_token: 1.0, per_attended: 0.05 }));
        }
        let mut next_id = 0u64;
        let mut live = std::collections::BTreeSet::new();
        let mut step_no = 0u32;
        let mut check = |s: &mut Scheduler, live: &mut std::collections::BTreeSet<u64>, eos_every: u32| {
            let b = s.schedule();
            step_no += 1;
            prop_assert!(b.num_tokens() <= budget);
            prop_assert!(b.seqs.len() <= 3);
            for q in &b.seqs {
                let covered = q.block_table.len() * 4;
                prop_assert!(covered >= q.start_pos + q.tokens.len());
            }
            let mut sampled = Vec::new();
            for q in b.seqs.iter().filter(|q| q.sample) {
                prop_assert!(q.proposed < q.tokens.len());
                // A verifying sequence accepts some of its proposed tokens (a different
                // number each step), then samples one.
                let accepted = step_no as usize % (q.proposed + 1);
                let drafts = &q.tokens[q.tokens.len() - q.proposed..];
                sampled.extend(drafts[..accepted].iter().map(|&t| (q.id, t)));
                let tok = if eos_every > 0 && step_no.is_multiple_of(eos_every) { EOS } else { 5 };
                sampled.push((q.id, tok));
            }
            for o in s.postprocess(&sampled) {
                if o.finish.is_some() {
                    prop_assert!(live.remove(&o.id.0));
                }
            }
            prop_assert_eq!(blocks_held(s), s.blocks().total_refs());
            prop_assert!(s.num_blocks_used() <= num_blocks);
            // Every running sequence has its next token to compute, and no proposal left.
            for q in s.sequences() {
                prop_assert!(q.num_pending() >= 1 && q.num_proposed == 0, "{:?}", q);
            }
            Ok(())
        };
        for op in ops {
            match op {
                Op::Add { prompt, max_tokens, family } => {
                    let tokens = (0..prompt as u32).map(|i| 100 * family + i % 7).collect();
                    let q = Sequence::new(RequestId(next_id), tokens, max_tokens, vec![EOS]);
                    if s.add(q).is_ok() {
                        live.insert(next_id);
                    }
                    next_id += 1;
                }
                Op::Abort(id) => {
                    if s.abort(RequestId(id)).is_some() {
                        live.remove(&id);
                    }
                    prop_assert_eq!(blocks_held(&s), s.blocks().total_refs());
                }
                Op::Step { eos_every } => check(&mut s, &mut live, eos_every)?,
                Op::Propose { id, k, token } => {
                    let room = s.sequences().find(|q| q.id.0 == id).map(|q| {
                        (q.max_tokens - q.num_generated()).min(64 - q.tokens.len()) - 1
                    });
                    match s.propose(RequestId(id), &vec![token; k]) {
                        Ok(n) => prop_assert_eq!(Some(n), room.map(|r| r.min(k))),
                        Err(_) => prop_assert!(!s
                            .sequences()
                            .any(|q| q.id.0 == id && q.is_decoding() && q.num_proposed == 0)),
                    }
                }
            }
        }
        // No starvation: with no more arrivals, everything drains in bounded steps.
        let bound = 64 * 20 * 4;
        let mut steps = 0;
        while s.has_work() {
            check(&mut s, &mut live, 0)?;
            steps += 1;
            prop_assert!(steps < bound, "did not drain in {} steps", bound);
        }
        prop_assert!(live.is_empty());
        prop_assert_eq!(s.num_blocks_used(), 0);
    }
}

#[test]
fn a_shared_prefix_is_computed_once() {
    let mut s = Scheduler::new(cfg(32));
    let prompt: Vec<u32> = (10..23).collect(); // 13 tokens: 3 full blocks of 4
    s.add(Sequence::new(RequestId(1), prompt.clone(), 2, vec![EOS]))
        .unwrap();
    let b = s.schedule();
    assert_eq!(b.seqs[0].tokens.len(), 13);
    s.postprocess(&sample_all(&b));
    let first_blocks = s.running[0].block_table.clone();

    // Same prompt, new request: the 3 full blocks are shared, only the last token computed.
    s.add(Sequence::new(RequestId(2), prompt.clone(), 2, vec![EOS]))
        .unwrap();
    let b = s.schedule();
    let second = b.seqs.iter().find(|q| q.id == RequestId(2)).unwrap();
    assert_eq!(second.start_pos, 12);
    assert_eq!(second.tokens, vec![22]);
    assert_eq!(second.block_table[..3], first_blocks[..3]);
    assert_eq!(s.prefix_cache_stats(), (26, 12));
    s.postprocess(&sample_all(&b));
    s.check_blocks();

    // Both finish; the cached blocks stay reusable, and the pool counts them as free.
    while s.has_work() {
        let b = s.schedule();
        s.postprocess(&sample_all(&b));
    }
    assert_eq!(s.num_blocks_used(), 0);
    assert!(s.blocks().num_cached() >= 3);
    s.add(Sequence::new(RequestId(3), prompt, 1, vec![EOS]))
        .unwrap();
    let b = s.schedule();
    assert_eq!(b.seqs[0].start_pos, 12);
}

#[test]
fn without_prefix_caching_everything_is_recomputed() {
    let mut s = Scheduler::new(SchedulerConfig {
        enable_prefix_caching: false,
        ..cfg(32)
    });
    for id in 1..=2 {
        s.add(seq(id, 13, 1)).unwrap();
        let b = s.schedule();
        assert_eq!(b.seqs[0].start_pos, 0);
        s.postprocess(&sample_all(&b));
    }
    assert_eq!(s.prefix_cache_stats(), (0, 0));
}

#[test]
fn prompts_get_a_bounded_share_of_steps_that_decode() {
    let mut s = Scheduler::new(SchedulerConfig {
        prefill_latency_share: 0.25,
        prefill_tokens_per_decode: 2,
        min_prefill_tokens_per_step: 3,
        ..cfg(32)
    });
    s.add(seq(1, 4, 20)).unwrap();
    let b = s.schedule();
    s.postprocess(&sample_all(&b));
    // One decoding sequence: a long prompt gets max(2 * 1, 3) = 3 tokens per step.
    let long = Sequence::new(RequestId(2), (100..130).collect(), 5, vec![EOS]);
    s.add(long).unwrap();
    let b = s.schedule();
    assert_eq!(b.seqs.len(), 2);
    assert_eq!(b.seqs[1].tokens.len(), 3);
    s.postprocess(&sample_all(&b));
    let b = s.schedule();
    assert_eq!(b.seqs[1].start_pos, 3);
    assert_eq!(b.seqs[1].tokens.len(), 3);
    // Nothing decoding: the whole budget goes to the prompt.
    s.abort(RequestId(1));
    s.postprocess(&sample_all(&b));
    let b = s.schedule();
    assert_eq!(b.seqs[0].tokens.len(), 16);
}

fn costed(max_num_seqs: usize, share: f64) -> Scheduler {
    let mut s = Scheduler::new(SchedulerConfig {
        max_num_seqs,
        max_num_batched_tokens: 512,
        block_size: 16,
        num_blocks: 4096,
        max_model_len: 8192,
        enable_prefix_caching: false,
        prefill_latency_share: share,
        prefill_tokens_per_decode: 1,
        min_prefill_tokens_per_step: 32,
    });
    // Seconds: 4 ms a step, 1 ms a token, 1 us per position attended.
    s.set_step_cost(Some(StepCost {
        fixed: 0.004,
        per_token: 0.001,
        per_attended: 1e-6,
    }));
    s
}

/// Runs steps until every sequence in `ids` decodes.
fn until_decoding(s: &mut Scheduler, n: usize) {
    for _ in 0..1000 {
        let b = s.schedule();
        s.postprocess(&sample_all(&b));
        if s.sequences().filter(|q| q.is_decoding()).count() == n {
            return;
        }
    }
    panic!("the prompts never finished");
}

#[test]
fn a_long_prompt_adds_at_most_the_share_to_decoding_steps_and_still_progresses() {
    let mut s = costed(16, 0.25);
    for i in 0..8 {
        s.add(seq(i, 20, 10_000)).unwrap();
    }
    until_decoding(&mut s, 8);
    s.add(seq(100, 3000, 1)).unwrap();
    let cost = StepCost {
        fixed: 0.004,
        per_token: 0.001,
        per_attended: 1e-6,
    };
    let mut done = 0;
    for step in 0..5000 {
        let b = s.schedule();
        let (mut decode, mut prompt) = (0.0, 0.0);
        let mut decodes = 0;
        for q in &b.seqs {
            let t = cost.variable(q.tokens.len(), attended(q.start_pos, q.tokens.len()));
            if q.id == RequestId(100) {
                prompt += t;
                assert!(!q.tokens.is_empty(), "step {step}: the prompt stalled");
            } else {
                decode += t;
                decodes += 1;
            }
        }
        assert_eq!(decodes, 8);
        let base = cost.fixed + decode;
        // At most the share, or the one token every step gets.
        let one = cost.variable(1, attended(done, 1));
        assert!(
            prompt <= 0.25 * base + 1e-12 || prompt <= one + 1e-12,
            "step {step}: {prompt} of {base}"
        );
        done += b
            .seqs
            .iter()
            .find(|q| q.id == RequestId(100))
            .map_or(0, |q| q.tokens.len());
        let out = s.postprocess(&sample_all(&b));
        if out.iter().any(|o| o.id == RequestId(100)) {
            assert_eq!(done, 3000);
            return;
        }
    }
    panic!("the long prompt never finished ({done} tokens)");
}

/// Tokens the step computes for every sequence but `id`.
fn tokens_except(b: &ScheduledBatch, id: RequestId) -> usize {
    b.seqs
        .iter()
        .filter(|q| q.id != id)
        .map(|q| q.tokens.len())
        .sum()
}

#[test]
fn many_waiting_prompts_get_an_even_share() {
    // One stream decodes, seven prompts wait (a backlog): each gets four streams' time, so
    // prompts take most of the step.
    let mut s = costed(16, 0.25);
    s.add(seq(0, 20, 10_000)).unwrap();
    until_decoding(&mut s, 1);
    for i in 1..8 {
        s.add(seq(i, 2000, 4)).unwrap();
    }
    let b = s.schedule();
    let prompt_tokens = tokens_except(&b, RequestId(0));
    // A decode costs 4 + 1 + 0.021 ms; 4 x 7 of them, at 1 ms a prompt token: about 140
    // tokens, the oldest prompt's chunk and one token for each of the six others (all start).
    assert!((130..=147).contains(&prompt_tokens), "{prompt_tokens}");
    assert_eq!(b.seqs.len(), 8, "every prompt has started");
    assert!(b
        .seqs
        .iter()
        .filter(|q| q.id != RequestId(0))
        .all(|q| !q.tokens.is_empty()));
    // Without a measured cost the fallback rule (1 per decode, at least 32) applies.
    s.postprocess(&sample_all(&b));
    s.set_step_cost(None);
    let b = s.schedule();
    let prompt_tokens = tokens_except(&b, RequestId(0));
    assert_eq!(prompt_tokens, 32);
}

/// Generates `n` tokens for every running sequence, one step at a time.
fn decode_steps(s: &mut Scheduler, n: usize) {
    for _ in 0..n {
        let b = s.schedule();
        s.postprocess(&sample_all(&b));
    }
}

#[test]
fn rollback_frees_whole_blocks_past_the_new_end_and_recomputes_the_last_token() {
    let mut c = cfg(32);
    c.enable_prefix_caching = false;
    let mut s = Scheduler::new(c);
    s.add(seq(1, 6, 20)).unwrap();
    // Prefill (6 tokens, one sampled), then 7 decodes: 14 tokens, 13 computed, 4 blocks.
    decode_steps(&mut s, 8);
    let q = s.sequences().next().unwrap();
    assert_eq!(
        (q.tokens.len(), q.num_computed, q.block_table.len()),
        (14, 13, 4)
    );
    let kept = q.block_table[..2].to_vec();
    let used = s.num_blocks_used();
    s.rollback(RequestId(1), 6).unwrap();
    let q = s.sequences().next().unwrap();
    // 8 tokens in 2 blocks; the last is computed again, to sample from.
    assert_eq!((q.tokens.len(), q.num_computed), (8, 7));
    assert_eq!(q.block_table, kept);
    assert_eq!(s.num_blocks_used(), used - 2);
    assert_eq!(blocks_held(&s), 2);
    let b = s.schedule();
    assert_eq!(b.seqs[0].start_pos, 7);
    assert_eq!(b.seqs[0].tokens, vec![5]);
    assert_eq!(b.seqs[0].block_table, kept);
    assert!(b.seqs[0].sample);
    // Not while the step is being computed.
    assert_eq!(
        s.rollback(RequestId(1), 1),
        Err(EditError::InFlight(RequestId(1)))
    );
    let out = s.postprocess(&sample_all(&b));
    assert_eq!(out[0].completion_tokens, 3);
    // Never into the prompt, never an unknown request; nothing changes on a refusal.
    assert_eq!(
        s.rollback(RequestId(1), 4),
        Err(EditError::TooMany {
            id: RequestId(1),
            n: 4,
            available: 3
        })
    );
    assert_eq!(
        s.rollback(RequestId(9), 1),
        Err(EditError::NotRunning(RequestId(9)))
    );
    assert_eq!(s.sequences().next().unwrap().tokens.len(), 9);
    s.rollback(RequestId(1), 3).unwrap();
    assert_eq!(s.sequences().next().unwrap().tokens.len(), 6);
    assert_eq!(blocks_held(&s), 2);
}

#[test]
fn rollback_never_rewrites_a_block_shared_through_the_prefix_cache() {
    let mut s = Scheduler::new(cfg(32));
    s.add(seq(1, 6, 20)).unwrap();
    // 9 tokens computed: blocks 0 and 1 full and registered.
    decode_steps(&mut s, 4);
    let q = s.sequences().next().unwrap();
    assert_eq!((q.tokens.len(), q.num_registered), (10, 2));
    // Back to 8 tokens: the 8th, to recompute, is in registered block 1.
    assert_eq!(
        s.rollback(RequestId(1), 2),
        Err(EditError::Shared {
            id: RequestId(1),
            n: 2
        })
    );
    // Back to 9: the 9th is in block 2, not registered; block 2 stays (it holds the 9th).
    s.rollback(RequestId(1), 1).unwrap();
    let q = s.sequences().next().unwrap();
    assert_eq!(
        (q.tokens.len(), q.num_computed, q.block_table.len()),
        (9, 8, 3)
    );
    assert_eq!(blocks_held(&s), 3);
    decode_steps(&mut s, 1);
    assert_eq!(s.sequences().next().unwrap().num_computed, 9);
}

/// Proposes `draft` for sequence 1 and runs its verification step, emitting `emitted`.
fn verify(s: &mut Scheduler, draft: &[u32], emitted: &[u32]) -> (ScheduledSeq, Vec<SeqOutcome>) {
    assert_eq!(s.propose(RequestId(1), draft), Ok(draft.len()));
    let b = s.schedule();
    assert_eq!(b.seqs.len(), 1);
    let sampled: Vec<_> = emitted.iter().map(|&t| (RequestId(1), t)).collect();
    let out = s.postprocess(&sampled);
    (b.seqs[0].clone(), out)
}

fn only(s: &Scheduler) -> &Sequence {
    s.sequences().next().unwrap()
}

#[test]
fn a_verification_step_keeps_the_accepted_proposals_and_the_token_after_them() {
    let mut s = Scheduler::new(cfg(32));
    s.add(seq(1, 6, 20)).unwrap();
    // The prefill: 7 tokens (6 of prompt, a 5), 6 computed.
    decode_steps(&mut s, 1);
    let (q, out) = verify(&mut s, &[10, 11, 12], &[10, 11, 30]);
    // The last token and the three proposed ones in one step, each sampled after.
    assert_eq!(
        (q.tokens, q.start_pos, q.proposed),
        (vec![5, 10, 11, 12], 6, 3)
    );
    assert!(q.sample);
    assert_eq!(q.block_table.len(), 3);
    // 10 and 11 accepted, 12 dropped for the 30 sampled after 11: an outcome for each.
    let emitted: Vec<_> = out.iter().map(|o| (o.token, o.completion_tokens)).collect();
    assert_eq!(emitted, vec![(Some(10), 2), (Some(11), 3), (Some(30), 4)]);
    assert!(out.iter().all(|o| o.finish.is_none()));
    let sq = only(&s);
    assert_eq!(&sq.tokens[6..], &[5, 10, 11, 30]);
    assert_eq!((sq.num_computed, sq.num_proposed), (9, 0));
    // The next step decodes the 30 at position 9, over the same blocks.
    let b = s.schedule();
    assert_eq!(
        (b.seqs[0].tokens.clone(), b.seqs[0].start_pos),
        (vec![30], 9)
    );
    assert_eq!(b.seqs[0].proposed, 0);
    assert_eq!(b.seqs[0].block_table, q.block_table);
    s.postprocess(&sample_all(&b));
    assert_eq!(blocks_held(&s), 3);
}

#[test]
fn no_block_holding_a_rejected_proposal_is_registered_and_its_blocks_are_freed() {
    let mut s = Scheduler::new(cfg(32));
    s.add(seq(1, 6, 20)).unwrap();
    decode_steps(&mut s, 1);
    // Block 0 (4 prompt tokens) is registered.
    assert_eq!(s.blocks().num_cached(), 1);
    // Five proposed tokens fill positions 7-11: blocks 1 and 2 are full once computed.
    let (q, out) = verify(&mut s, &[10, 11, 12, 13, 14], &[40]);
    assert_eq!(q.block_table.len(), 3);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].token, Some(40));
    // All rejected: 8 tokens, the 40 to compute; block 2 freed, nothing more registered.
    let sq = only(&s);
    assert_eq!((sq.tokens.len(), sq.num_computed), (8, 7));
    assert_eq!(sq.block_table, q.block_table[..2]);
    assert_eq!(s.blocks().num_cached(), 1);
    assert_eq!(blocks_held(&s), 2);
    // All accepted, and a token sampled after them: the full blocks are registered.
    let (_, out) = verify(&mut s, &[10, 11, 12, 13, 14], &[10, 11, 12, 13, 14, 50]);
    assert_eq!(out.len(), 6);
    let sq = only(&s);
    assert_eq!((sq.tokens.len(), sq.num_computed), (14, 13));
    assert_eq!(s.blocks().num_cached(), 3);
    // A prompt of 13 of those tokens shares the three blocks.
    let tokens = sq.tokens[..13].to_vec();
    s.add(Sequence::new(RequestId(2), tokens, 4, vec![EOS]))
        .unwrap();
    let b = s.schedule();
    let two = b.seqs.iter().find(|q| q.id == RequestId(2)).unwrap();
    assert_eq!(two.start_pos, 12);
}

#[test]
fn an_accepted_stop_token_finishes_the_sequence_there() {
    let mut s = Scheduler::new(cfg(32));
    s.add(seq(1, 6, 20)).unwrap();
    decode_steps(&mut s, 1);
    // 7 tokens, 6 computed; the stop token is accepted at position 7, and the step also
    // computed the proposed 12 at position 8.
    let (_, out) = verify(&mut s, &[EOS, 12, 13], &[EOS, 12, 13]);
    let emitted: Vec<_> = out.iter().map(|o| (o.token, o.finish)).collect();
    assert_eq!(emitted, vec![(None, Some(FinishReason::Stop))]);
    assert_eq!(out[0].completion_tokens, 2);
    assert_eq!(s.num_running(), 0);
    assert_eq!(blocks_held(&s), 0);
    // Its verified full blocks (positions 0-7) stay cached; not the one the 12 began.
    assert_eq!(s.blocks().num_cached(), 2);
    // A stop token after accepted proposals: each gets its outcome, the stop ends it.
    s.add(seq(1, 6, 20)).unwrap();
    decode_steps(&mut s, 1);
    let (_, out) = verify(&mut s, &[10, EOS, 12], &[10, EOS, 12, 13]);
    let emitted: Vec<_> = out.iter().map(|o| (o.token, o.finish)).collect();
    assert_eq!(
        emitted,
        vec![(Some(10), None), (None, Some(FinishReason::Stop))]
    );
    assert_eq!(out[1].completion_tokens, 3);
    assert_eq!(blocks_held(&s), 0);
}

#[test]
fn proposals_fit_max_tokens_the_context_and_the_step_budget() {
    let mut c = cfg(32);
    c.max_num_batched_tokens = 3;
    let mut s = Scheduler::new(c);
    // A prompt is not decoding; nor is a sequence in the step being computed.
    s.add(seq(1, 6, 5)).unwrap();
    assert_eq!(
        s.propose(RequestId(1), &[9]),
        Err(EditError::NotRunning(RequestId(1)))
    );
    let b = s.schedule();
    assert_eq!(
        s.propose(RequestId(1), &[9]),
        Err(EditError::InFlight(RequestId(1)))
    );
    s.postprocess(&sample_all(&b));
    assert_eq!(
        s.propose(RequestId(1), &[9]),
        Err(EditError::NotDecoding(RequestId(1)))
    );
    decode_steps(&mut s, 1);
    // 1 of 5 generated: room for 3 more beside the token sampled after them.
    assert_eq!(s.propose(RequestId(1), &[9; 8]), Ok(3));
    assert_eq!(
        s.propose(RequestId(1), &[9]),
        Err(EditError::NotDecoding(RequestId(1)))
    );
    // The step's budget (3 tokens) takes the last token and 2 of them; the third is withdrawn.
    let b = s.schedule();
    assert_eq!((b.seqs[0].tokens.len(), b.seqs[0].proposed), (3, 2));
    let out = s.postprocess(&[(RequestId(1), 9), (RequestId(1), 9), (RequestId(1), 5)]);
    assert_eq!(out.len(), 3);
    assert_eq!((out[2].completion_tokens, out[2].finish), (4, None));
    assert_eq!(only(&s).tokens.len(), 10);
    // The fifth token ends it.
    let b = s.schedule();
    let out = s.postprocess(&sample_all(&b));
    assert_eq!(
        (out[0].completion_tokens, out[0].finish),
        (5, Some(FinishReason::Length))
    );
}

#[test]
fn rollback_withdraws_proposals_and_preemption_drops_them() {
    let mut s = Scheduler::new(cfg(32));
    s.add(seq(1, 6, 20)).unwrap();
    decode_steps(&mut s, 4);
    assert_eq!(only(&s).tokens.len(), 10);
    assert_eq!(s.propose(RequestId(1), &[9, 9]), Ok(2));
    // 4 generated, 2 proposed: at most the 4 can be taken back, the proposals with them.
    assert_eq!(
        s.rollback(RequestId(1), 5),
        Err(EditError::TooMany {
            id: RequestId(1),
            n: 5,
            available: 4
        })
    );
    assert_eq!(only(&s).num_proposed, 2);
    s.rollback(RequestId(1), 1).unwrap();
    let sq = only(&s);
    assert_eq!(
        (sq.tokens.len(), sq.num_proposed, sq.num_computed),
        (9, 0, 8)
    );
    // A preempted sequence is recomputed from its verified tokens only.
    let mut s = three_blocks_uncached();
    s.add(seq(1, 4, 8)).unwrap();
    decode_steps(&mut s, 1);
    assert_eq!(s.propose(RequestId(1), &[9, 9, 9]), Ok(3));
    s.preempt(0);
    let sq = s.waiting.front().unwrap();
    assert_eq!((sq.tokens.len(), sq.num_proposed), (5, 0));
}

/// A scheduler with 3 blocks of 4 tokens and no prefix cache.
fn three_blocks_uncached() -> Scheduler {
    let mut c = cfg(3);
    c.enable_prefix_caching = false;
    Scheduler::new(c)
}

#[test]
fn proposals_leave_each_other_decode_its_token_and_never_preempt() {
    let mut c = cfg(32);
    c.max_num_batched_tokens = 4;
    let mut s = Scheduler::new(c);
    for id in 1..=3 {
        s.add(seq(id, 2, 30)).unwrap();
    }
    // The three prompts (2 tokens each) over two steps, then all three decode.
    decode_steps(&mut s, 2);
    assert!(s.sequences().all(|q| q.is_decoding()));
    // Sequence 1 proposes 5: of a step's 4 tokens, each decode gets one and the proposals
    // the one left.
    assert_eq!(s.propose(RequestId(1), &[9; 5]), Ok(5));
    let b = s.schedule();
    let sizes: Vec<_> = b
        .seqs
        .iter()
        .map(|q| (q.id.0, q.tokens.len(), q.proposed))
        .collect();
    assert_eq!(sizes, vec![(1, 2, 1), (2, 1, 0), (3, 1, 0)]);
    s.postprocess(&sample_all(&b));
    // Proposals get only the blocks nobody else needs, and are cut to them.
    let mut s = three_blocks_uncached();
    s.add(seq(1, 3, 9)).unwrap();
    s.add(seq(2, 3, 9)).unwrap();
    // 4 tokens each, 3 computed, one block each; one block free.
    decode_steps(&mut s, 1);
    assert_eq!(s.num_blocks_used(), 2);
    assert_eq!(s.propose(RequestId(1), &[9; 6]), Ok(6));
    let b = s.schedule();
    assert_eq!(s.num_preemptions(), 0);
    let sizes: Vec<_> = b
        .seqs
        .iter()
        .map(|q| (q.id.0, q.tokens.len(), q.proposed))
        .collect();
    // Positions 3-7 fit the free block: the last token and 4 of the 6.
    assert_eq!(sizes, vec![(1, 5, 4), (2, 1, 0)]);
    assert!(b.seqs.iter().all(|q| q.sample));
    assert_eq!(s.num_blocks_used(), 3);
    s.postprocess(&sample_all(&b));
    assert_eq!(blocks_held(&s), 3);
}

#[test]
fn proposals_fit_the_context() {
    let mut c = cfg(32);
    c.max_model_len = 10;
    let mut s = Scheduler::new(c);
    s.add(seq(1, 6, 20)).unwrap();
    decode_steps(&mut s, 1);
    // 7 tokens of 10: room for 2 proposals and the token after them.
    assert_eq!(s.propose(RequestId(1), &[9; 5]), Ok(2));
    let b = s.schedule();
    let out = s.postprocess(&[(RequestId(1), 9), (RequestId(1), 9), (RequestId(1), 5)]);
    assert_eq!(b.seqs[0].proposed, 2);
    assert_eq!(out.last().unwrap().finish, Some(FinishReason::Length));
    assert_eq!(s.num_running(), 0);
}
