//! Wick's continuous-batching scheduler: a pure, synchronous state machine.
//!
//! [`Scheduler::add`] queues a sequence, [`Scheduler::schedule`] picks the work of the next
//! engine step (decodes first, then chunks of waiting prompts, within `max_num_seqs` and the
//! `max_num_batched_tokens` budget, with KV blocks from the [`BlockManager`]), and
//! [`Scheduler::postprocess`] applies the sampled tokens and reports which sequences finished.
//! [`Scheduler::abort`] frees a sequence at any point; [`Scheduler::rollback`] shortens one,
//! freeing the blocks past its new end. [`Scheduler::propose`] gives a decoding sequence
//! tokens to verify (speculative decoding): its next step computes them with its last token,
//! and `postprocess` keeps those the sampled tokens accept, dropping the rest and the blocks
//! past them. Full blocks of computed, verified tokens are shared between sequences with the
//! same prefix (automatic prefix caching); when blocks run out, the newest running sequence is
//! preempted (its proposals dropped) and later recomputed. No tensors, no async, no locks.

mod block_manager;
mod cost;
mod scheduler;
mod sequence;

pub use block_manager::{block_hash, BlockManager};
pub use cost::{attended, CostFit, StepCost};
pub use scheduler::{AddError, EditError, Scheduler, SchedulerConfig, SeqOutcome};
pub use sequence::Sequence;
