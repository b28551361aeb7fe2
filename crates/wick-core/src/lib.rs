//! Shared vocabulary of Wick.
//!
//! Every other crate speaks these types: the HTTP front end turns an OpenAI request into an
//! `EngineRequest` (prompt token ids, [`SamplingParams`], limits) and submits it through the
//! `EngineHandle`, the one bounded request queue. The engine thread drains that queue into the
//! scheduler, which hands the runner a [`ScheduledBatch`] each step; sampled tokens travel back
//! to the request's own channel as [`TokenEvent`]s. `Metrics` holds every Prometheus series.
//! No candle, no axum here.
//!
//! The scheduler and the runner use only the pure types (ids, batches, sampling parameters,
//! events). The channels (feature `queue`, with tokio's reply channels) and the Prometheus
//! series (feature `metrics`) are for the engine and the server: a crate that does not ask for
//! them does not depend on an async runtime or a metrics library.

mod batch;
#[cfg(feature = "queue")]
mod embed;
#[cfg(feature = "queue")]
mod engine_queue;
mod ids;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(feature = "queue")]
pub mod queue;
mod request;

pub use batch::{AdapterId, ScheduledBatch, ScheduledSeq};
#[cfg(feature = "queue")]
pub use embed::{embed_queue, EmbedHandle, EmbedReceiver, EmbedReply, EmbedRequest};
#[cfg(feature = "queue")]
pub use engine_queue::{request_queue, EngineCommand, EngineHandle, EngineReceiver, EngineRequest};
pub use ids::{BlockId, RequestId};
#[cfg(feature = "metrics")]
pub use metrics::Metrics;
#[cfg(feature = "queue")]
pub use queue::{Busy, QueueLimits, QueueReceiver, QueueSender, Recv, SubmitError};
pub use request::{
    ErrorKind, FinishReason, SamplingParams, TokenConstraint, TokenEvent, TokenLogprobs,
};

/// The values of `wick_request_failure_total`'s `error_type` label (also
/// `metrics::error_type`).
pub mod error_type {
    /// Refused with 429: the waiting queue was full.
    pub const QUEUE_FULL: &str = "queue_full";
    /// Waited longer than `--max-queue-time` without starting (503).
    pub const QUEUE_TIMEOUT: &str = "queue_timeout";
    /// Can never be served (larger than the whole KV cache).
    pub const REJECTED: &str = "rejected";
    /// The engine failed while computing it.
    pub const INTERNAL: &str = "internal";
    /// Still running when the drain timeout ran out at shutdown.
    pub const SHUTDOWN: &str = "shutdown";
    pub const ALL: &[&str] = &[QUEUE_FULL, QUEUE_TIMEOUT, REJECTED, INTERNAL, SHUTDOWN];
}
