use std::collections::VecDeque;

use wick_core::{FinishReason, RequestId, ScheduledBatch, ScheduledSeq};

use crate::{attended, BlockManager, Sequence, StepCost};

/// When at least as many prompts wait as streams decode (a backlog of prompts), each waiting
/// prompt gets this many decoding streams' worth of a step's time: small steps pay the fixed
/// cost of a step (a few ms) again and again, and the backlog, not the streams' latency, is
/// what clients wait on. Measured on a burst of 16 ~2,000-token prompts (Gemma 3 270M): 835
/// tokens/s with 1, 928 with 2, 1,012 with 4, TTFT p50 18.3 s -> 14.2 s, the streams'
/// inter-token p99 104 ms -> 263 ms.
const BACKLOG_WEIGHT: f64 = 4.0;

/// Limits the scheduler works within.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// Most sequences running (holding KV blocks) at once.
    pub max_num_seqs: usize,
    /// Most tokens computed in one step, over all sequences.
    pub max_num_batched_tokens: usize,
    /// Positions per KV block.
    pub block_size: usize,
    /// Blocks in the KV cache.
    pub num_blocks: usize,
    /// Longest sequence (prompt plus output) the model serves.
    pub max_model_len: usize,
    /// Share the KV blocks of common prefixes between sequences.
    pub enable_prefix_caching: bool,
    /// With a measured step cost: while sequences decode, prompt chunks add at most this
    /// share to the time of a step's decodes (so their inter-token latency stays within
    /// `1 + share` of what it is without prompts), or, when prompts wait, a decoding
    /// stream's time for each (four streams' when they are a backlog, see `BACKLOG_WEIGHT`),
    /// so that prompts are never starved.
    pub prefill_latency_share: f64,
    /// Without a measured step cost (the first steps, or a runner that does not time its
    /// attention): while sequences decode, a step computes at most this many prompt tokens
    /// per decoding sequence (0: no limit beyond `max_num_batched_tokens`) ...
    pub prefill_tokens_per_decode: usize,
    /// ... but never fewer than this many, so prompts keep moving.
    pub min_prefill_tokens_per_step: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("request {0} is already scheduled")]
    Duplicate(RequestId),
    #[error(
        "the request needs {needed} tokens of KV cache (prompt plus max_tokens) but the whole cache holds {capacity}"
    )]
    ExceedsCache { needed: usize, capacity: usize },
}

/// Why [`Scheduler::rollback`] or [`Scheduler::propose`] refused (and changed nothing).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error("request {0} is not running")]
    NotRunning(RequestId),
    #[error("request {0} is in the step being computed")]
    InFlight(RequestId),
    #[error("request {0} is not decoding (its prompt is still being computed, or it has proposed tokens already)")]
    NotDecoding(RequestId),
    #[error("request {id} has {available} tokens that can be taken back, not {n}")]
    TooMany {
        id: RequestId,
        n: usize,
        available: usize,
    },
    #[error("request {id}: the token to recompute after taking back {n} lies in a block shared through the prefix cache")]
    Shared { id: RequestId, n: usize },
}

/// What one step did to one sequence, for the engine to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqOutcome {
    pub id: RequestId,
    /// The sampled token, unless it was a stop token.
    pub token: Option<u32>,
    pub finish: Option<FinishReason>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Per-sequence bookkeeping of the last `schedule`, applied by `postprocess`.
#[derive(Debug, Clone, Copy)]
struct Planned {
    id: RequestId,
    chunk: usize,
    sample: bool,
}

/// The continuous-batching state machine: waiting and running sequences over one block pool.
#[derive(Debug, Clone)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    blocks: BlockManager,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    planned: Vec<Planned>,
    cost: Option<StepCost>,
    num_preemptions: u64,
    prefix_queries: u64,
    prefix_hits: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            blocks: BlockManager::new(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching),
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            planned: Vec::new(),
            cost: None,
            num_preemptions: 0,
            prefix_queries: 0,
            prefix_hits: 0,
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// The measured cost of a step, to size prompt chunks by time (see
    /// [`SchedulerConfig::prefill_latency_share`]); `None` sizes them by token counts.
    pub fn set_step_cost(&mut self, cost: Option<StepCost>) {
        self.cost = cost;
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_blocks_used(&self) -> usize {
        self.blocks.num_used()
    }

    pub fn num_blocks_total(&self) -> usize {
        self.blocks.num_blocks()
    }

    /// Preemptions since start.
    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    /// Prompt tokens looked up in the prefix cache since start, and those found.
    pub fn prefix_cache_stats(&self) -> (u64, u64) {
        (self.prefix_queries, self.prefix_hits)
    }

    /// The block pool (tests and metrics).
    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    /// Every sequence, running then waiting (tests).
    pub fn sequences(&self) -> impl Iterator<Item = &Sequence> {
        self.running.iter().chain(self.waiting.iter())
    }

    /// Whether the sequence has not been scheduled since it was added or preempted.
    pub fn is_waiting(&self, id: RequestId) -> bool {
        self.waiting.iter().any(|s| s.id == id)
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    fn contains(&self, id: RequestId) -> bool {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .any(|s| s.id == id)
    }

    /// Queues a new sequence. Refuses one that could never fit in the whole KV cache, so it
    /// cannot deadlock the scheduler.
    pub fn add(&mut self, seq: Sequence) -> Result<(), AddError> {
        if seq.tokens.is_empty() {
            return Err(AddError::EmptyPrompt);
        }
        if self.contains(seq.id) {
            return Err(AddError::Duplicate(seq.id));
        }
        let needed = (seq.tokens.len() + seq.max_tokens).min(self.cfg.max_model_len);
        let capacity = self.cfg.num_blocks * self.cfg.block_size;
        if needed > capacity {
            return Err(AddError::ExceedsCache { needed, capacity });
        }
        self.waiting.push_back(seq);
        Ok(())
    }

    /// Removes a sequence wherever it is and frees its blocks. Returns it, if it was here.
    pub fn abort(&mut self, id: RequestId) -> Option<Sequence> {
        self.planned.retain(|p| p.id != id);
        let mut seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i)
        } else {
            let i = self.waiting.iter().position(|s| s.id == id)?;
            self.waiting.remove(i)?
        };
        self.blocks.release(&mut seq.block_table);
        Some(seq)
    }

    /// The running sequence `id`, unless it is in the step being computed (between
    /// [`Scheduler::schedule`] and [`Scheduler::postprocess`]).
    fn settled(&mut self, id: RequestId) -> Result<&mut Sequence, EditError> {
        if self.planned.iter().any(|p| p.id == id) {
            return Err(EditError::InFlight(id));
        }
        self.running
            .iter_mut()
            .find(|s| s.id == id)
            .ok_or(EditError::NotRunning(id))
    }

    /// Shortens a running sequence by its last `n` generated tokens (never the prompt),
    /// freeing the whole blocks past its new end; tokens it has proposed are withdrawn first
    /// (with `n` = 0, only they are).
    /// Its new last token is computed again by the next step (its slot simply overwritten),
    /// to sample from, so it must not lie in a block shared through the prefix cache: a block
    /// is registered only once computed and verified. (A verification step needs no rollback:
    /// `postprocess` keeps the proposed tokens that were accepted and drops the others.)
    pub fn rollback(&mut self, id: RequestId, n: usize) -> Result<(), EditError> {
        let bs = self.cfg.block_size;
        let seq = self.settled(id)?;
        let available = seq.num_generated() - seq.num_proposed;
        if n > available {
            return Err(EditError::TooMany { id, n, available });
        }
        let len = seq.tokens.len() - seq.num_proposed - n;
        if seq.num_registered * bs >= len {
            return Err(EditError::Shared { id, n });
        }
        seq.num_proposed = 0;
        seq.tokens.truncate(len);
        seq.num_computed = seq.num_computed.min(len - 1);
        seq.block_hashes.truncate(len / bs);
        let mut past = seq.blocks_past(len, bs);
        self.blocks.release(&mut past);
        Ok(())
    }

    /// Proposes `draft` tokens to follow a decoding sequence's last token (speculative
    /// decoding): they join its tokens unverified, and its next step computes its last token
    /// and them, sampling after each (`ScheduledSeq::proposed`, `1 + proposed` rows).
    /// [`Scheduler::postprocess`] then takes the tokens the sequence emits: the proposed ones
    /// accepted, then the one sampled after them; the rest are dropped (their slots are
    /// overwritten later), and no block holding a proposed token is registered in the prefix
    /// cache before it is accepted. Takes at most as many as leave room, within `max_tokens`
    /// and the context limit, for the token sampled after them; returns how many it took. The
    /// next step verifies those that fit what its token budget and the free blocks leave
    /// after every decode's own token, and withdraws the rest.
    pub fn propose(&mut self, id: RequestId, draft: &[u32]) -> Result<usize, EditError> {
        let max_model_len = self.cfg.max_model_len;
        let seq = self.settled(id)?;
        if !seq.is_decoding() || seq.num_proposed > 0 {
            return Err(EditError::NotDecoding(id));
        }
        let room = (seq.max_tokens.saturating_sub(seq.num_generated()))
            .min(max_model_len.saturating_sub(seq.tokens.len()))
            .saturating_sub(1);
        let n = draft.len().min(room);
        seq.tokens.extend_from_slice(&draft[..n]);
        seq.num_proposed = n;
        Ok(n)
    }

    /// Chooses the work of the next step: running decodes first, then running prompt chunks,
    /// then waiting prompts in arrival order, all within the token budget.
    pub fn schedule(&mut self) -> ScheduledBatch {
        self.planned.clear();
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut preempted = false;
        let (decodes, chunks): (Vec<&Sequence>, Vec<&Sequence>) =
            self.running.iter().partition(|s| s.is_decoding());
        let decodes: Vec<RequestId> = decodes.iter().map(|s| s.id).collect();
        let chunks: Vec<RequestId> = chunks.iter().map(|s| s.id).collect();
        let mut num_decodes = 0;
        let mut decode_tokens = 0;
        let mut decode_attended = 0.0;
        for id in decodes {
            if budget == 0 {
                break;
            }
            match self.schedule_running(id, 1) {
                Some(0) => {}
                Some(_) => {
                    num_decodes += 1;
                    budget -= 1;
                }
                None => preempted = true,
            }
        }
        // Then the proposed tokens of the decodes, in what the budget and the free blocks
        // leave: speculation never takes a decode's token or another sequence's block.
        for p in self.planned.iter_mut() {
            let Some(seq) = self.running.iter_mut().find(|s| s.id == p.id) else {
                continue;
            };
            let room = (seq.block_table.len() + self.blocks.num_free()) * self.cfg.block_size
                - (seq.num_computed + 1);
            let mut k = seq.num_proposed.min(budget).min(room);
            if k > 0
                && !self
                    .blocks
                    .grow(&mut seq.block_table, seq.num_computed + 1 + k)
            {
                k = 0;
            }
            seq.withdraw(seq.num_proposed - k);
            p.chunk += k;
            budget -= k;
            p.sample = seq.num_computed + p.chunk == seq.tokens.len();
            decode_tokens += p.chunk;
            decode_attended += attended(seq.num_computed, p.chunk);
        }
        // A decode left out of the step keeps no proposals.
        for seq in self.running.iter_mut().filter(|s| s.num_proposed > 0) {
            if !self.planned.iter().any(|p| p.id == seq.id) {
                seq.withdraw(seq.num_proposed);
            }
        }
        let free_slots = self.cfg.max_num_seqs.saturating_sub(self.running.len());
        let waiting = chunks.len() + self.waiting.len().min(free_slots);
        let mut prompts = PromptBudget {
            tokens: budget,
            seconds: f64::INFINITY,
            cost: None,
            unserved: waiting,
        };
        if num_decodes > 0 {
            match self.cost {
                // While streams are decoding, prompts get a share of the step's time ...
                Some(cost) => {
                    let decode_s = cost.fixed + cost.variable(decode_tokens, decode_attended);
                    let weight = if waiting >= num_decodes {
                        BACKLOG_WEIGHT
                    } else {
                        1.0
                    };
                    let share = self
                        .cfg
                        .prefill_latency_share
                        .max(weight * waiting as f64 / num_decodes as f64);
                    prompts.seconds = decode_s * share;
                    prompts.cost = Some(cost);
                }
                // ... or, unmeasured, of its tokens, proportional to them.
                None => prompts.tokens = budget.min(self.prefill_cap(num_decodes)),
            }
        }
        for id in chunks {
            if prompts.tokens == 0 {
                break;
            }
            let Some(s) = self.running.iter().find(|s| s.id == id) else {
                continue;
            };
            let limit = prompts.limit(s);
            if limit == 0 {
                break;
            }
            match self.schedule_running(id, limit) {
                Some(chunk) => prompts.take(chunk, id, self),
                None => preempted = true,
            }
        }
        if !preempted {
            self.admit_waiting(&mut prompts);
        }
        self.batch()
    }

    /// Most prompt tokens in a step that also decodes `num_decodes` sequences.
    fn prefill_cap(&self, num_decodes: usize) -> usize {
        let per_decode = self.cfg.prefill_tokens_per_decode;
        if num_decodes == 0 || per_decode == 0 {
            return usize::MAX;
        }
        (per_decode * num_decodes).max(self.cfg.min_prefill_tokens_per_step)
    }

    /// Schedules up to `limit` pending tokens of a running sequence. Returns the tokens
    /// scheduled (0 if it was preempted earlier in this step), or `None` if it had to be
    /// preempted itself.
    fn schedule_running(&mut self, id: RequestId, limit: usize) -> Option<usize> {
        let Some(idx) = self.running.iter().position(|s| s.id == id) else {
            return Some(0);
        };
        let chunk = self.running[idx].num_pending().min(limit);
        let idx = self.reserve_running(idx, chunk)?;
        self.plan(idx, chunk);
        Some(chunk)
    }

    /// Grows the blocks of `running[idx]` for `chunk` more tokens, preempting the newest
    /// unscheduled sequences while blocks run short. Returns the sequence's index afterwards,
    /// or `None` if it had to be preempted itself.
    fn reserve_running(&mut self, mut idx: usize, chunk: usize) -> Option<usize> {
        loop {
            let seq = &mut self.running[idx];
            let target = seq.num_computed + chunk;
            if self.blocks.grow(&mut seq.block_table, target) {
                return Some(idx);
            }
            let id = seq.id;
            let victim = self
                .running
                .iter()
                .rposition(|s| s.id != id && !self.planned.iter().any(|p| p.id == s.id));
            match victim {
                Some(v) => {
                    self.preempt(v);
                    if v < idx {
                        idx -= 1;
                    }
                }
                None => {
                    self.preempt(idx);
                    return None;
                }
            }
        }
    }

    /// Frees a running sequence's blocks and puts it back at the head of the waiting queue;
    /// its tokens are kept and recomputed when it is admitted again.
    fn preempt(&mut self, idx: usize) {
        let mut seq = self.running.remove(idx);
        self.blocks.release(&mut seq.block_table);
        seq.num_computed = 0;
        seq.num_registered = 0;
        seq.withdraw(seq.num_proposed);
        self.waiting.push_front(seq);
        self.num_preemptions += 1;
    }

    fn admit_waiting(&mut self, prompts: &mut PromptBudget) {
        while prompts.tokens > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(seq) = self.waiting.front_mut() else {
                break;
            };
            if seq.block_table.is_empty() {
                let (queried, hit) = match_cached(&mut self.blocks, seq);
                self.prefix_queries += queried as u64;
                self.prefix_hits += hit as u64;
            }
            let chunk = prompts.limit(seq);
            if chunk == 0
                || !self
                    .blocks
                    .grow(&mut seq.block_table, seq.num_computed + chunk)
            {
                // First come, first served: nobody overtakes the head. Its prefix hits are
                // given back and looked up again next time.
                self.blocks.release(&mut seq.block_table);
                seq.num_computed = 0;
                seq.num_registered = 0;
                break;
            }
            if let Some(seq) = self.waiting.pop_front() {
                let id = seq.id;
                self.running.push(seq);
                self.plan(self.running.len() - 1, chunk);
                prompts.take(chunk, id, self);
            }
        }
    }

    fn plan(&mut self, idx: usize, chunk: usize) {
        let seq = &self.running[idx];
        self.planned.push(Planned {
            id: seq.id,
            chunk,
            sample: seq.num_computed + chunk == seq.tokens.len(),
        });
    }

    fn batch(&self) -> ScheduledBatch {
        let seqs = self
            .planned
            .iter()
            .filter_map(|p| {
                let seq = self.running.iter().find(|s| s.id == p.id)?;
                let start = seq.num_computed;
                Some(ScheduledSeq {
                    id: p.id,
                    tokens: seq.tokens[start..start + p.chunk].to_vec(),
                    start_pos: start,
                    block_table: seq.block_table.clone(),
                    sample: p.sample,
                    proposed: seq.num_proposed,
                    adapter: None,
                })
            })
            .collect();
        ScheduledBatch { seqs }
    }

    /// Applies the step's results: advances what the cache holds, appends the sampled tokens,
    /// finishes sequences on a stop token, `max_tokens` or the context limit, and frees their
    /// blocks at once. `sampled` has one entry per sequence scheduled with `sample`, or, for
    /// one that had proposed tokens, one per token it emits, in order: the proposed tokens
    /// accepted, then the token sampled after them. Each emitted token gets an outcome, in
    /// order; the proposed tokens not accepted are dropped, with the whole blocks past the
    /// sequence's new end. Blocks are registered in the prefix cache only up to its verified
    /// tokens.
    pub fn postprocess(&mut self, sampled: &[(RequestId, u32)]) -> Vec<SeqOutcome> {
        let max_model_len = self.cfg.max_model_len;
        let mut outcomes = Vec::new();
        for p in std::mem::take(&mut self.planned) {
            let Some(idx) = self.running.iter().position(|s| s.id == p.id) else {
                continue;
            };
            let seq = &mut self.running[idx];
            seq.num_computed += p.chunk;
            let verified = seq.tokens.len() - std::mem::take(&mut seq.num_proposed);
            // Tokens kept, and of them those whose keys and values this step left in the cache.
            let (mut end, mut valid) = (verified, verified);
            let mut finish = None;
            let emitted = sampled.iter().filter(|(id, _)| p.sample && *id == p.id);
            let mut emitted = emitted.map(|&(_, t)| t).peekable();
            while let Some(token) = emitted.next() {
                let at = end;
                let accepted =
                    at < seq.tokens.len() && seq.tokens[at] == token && emitted.peek().is_some();
                if !accepted {
                    seq.tokens.truncate(at);
                    seq.tokens.push(token);
                }
                end = at + 1;
                valid = if accepted { end } else { at };
                let is_stop = seq.stop_token_ids.contains(&token);
                let completion_tokens = end - seq.prompt_len;
                finish = if is_stop {
                    Some(FinishReason::Stop)
                } else if completion_tokens >= seq.max_tokens || end >= max_model_len {
                    Some(FinishReason::Length)
                } else {
                    None
                };
                outcomes.push(SeqOutcome {
                    id: p.id,
                    token: (!is_stop).then_some(token),
                    finish,
                    prompt_tokens: seq.prompt_len,
                    completion_tokens,
                });
                if finish.is_some() || !accepted {
                    break;
                }
            }
            seq.tokens.truncate(end);
            seq.num_computed = seq.num_computed.min(valid);
            let mut past = seq.blocks_past(end, self.cfg.block_size);
            self.blocks.release(&mut past);
            register_full_blocks(&mut self.blocks, seq);
            if finish.is_some() {
                let mut seq = self.running.remove(idx);
                self.blocks.release(&mut seq.block_table);
            }
        }
        outcomes
    }
}

/// What is left of a step for prompt chunks: tokens, and, with a measured cost, seconds.
/// Every prompt that can run gets at least one token of every step (while the token budget
/// lasts), so every admitted request has started and keeps moving; the oldest get the rest.
struct PromptBudget {
    tokens: usize,
    seconds: f64,
    cost: Option<StepCost>,
    /// Prompts (mid-prefill or admissible) not yet given their chunk in this step.
    unserved: usize,
}

impl PromptBudget {
    /// The largest chunk of `seq`'s pending prompt that fits, leaving one token for each
    /// prompt after it.
    fn limit(&self, seq: &Sequence) -> usize {
        let cap = self
            .tokens
            .saturating_sub(self.unserved.saturating_sub(1))
            .max(self.tokens.min(1));
        let pending = seq.num_pending().min(cap);
        match self.cost {
            None => pending,
            Some(c) => c
                .max_chunk(seq.num_computed, pending, self.seconds)
                .max(pending.min(1)),
        }
    }

    /// Charges a chunk of `chunk` tokens just planned for sequence `id`.
    fn take(&mut self, chunk: usize, id: RequestId, sched: &Scheduler) {
        self.tokens -= chunk;
        self.unserved = self.unserved.saturating_sub(1);
        if let (Some(c), Some(s)) = (self.cost, sched.running.iter().find(|s| s.id == id)) {
            self.seconds -= c.variable(chunk, attended(s.num_computed, chunk));
        }
    }
}

/// Shares the cached blocks of the longest cached prefix of `seq` (never its last token:
/// that one is computed, to sample from). Returns the tokens looked up and those found.
fn match_cached(blocks: &mut BlockManager, seq: &mut Sequence) -> (usize, usize) {
    if !blocks.caching() {
        return (0, 0);
    }
    let bs = blocks.block_size();
    let full = (seq.tokens.len() - 1) / bs;
    seq.hash_blocks(full, bs);
    let lookups = seq.block_hashes[..full]
        .iter()
        .copied()
        .zip(seq.tokens.chunks_exact(bs));
    seq.block_table = blocks.match_prefix(lookups);
    seq.num_registered = seq.block_table.len();
    seq.num_computed = seq.block_table.len() * bs;
    (seq.tokens.len(), seq.num_computed)
}

/// Registers the sequence's newly completed full blocks in the prefix cache.
fn register_full_blocks(blocks: &mut BlockManager, seq: &mut Sequence) {
    if !blocks.caching() {
        return;
    }
    let bs = blocks.block_size();
    let full = seq.num_computed / bs;
    seq.hash_blocks(full, bs);
    for i in seq.num_registered..full {
        let tokens = &seq.tokens[i * bs..(i + 1) * bs];
        blocks.register(seq.block_table[i], seq.block_hashes[i], tokens);
    }
    seq.num_registered = seq.num_registered.max(full);
}

#[cfg(test)]
mod tests;
