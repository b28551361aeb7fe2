//! Shared vocabulary of Wick.
//!
//! Every other crate speaks these types: the HTTP front end turns an OpenAI request into an
//! [`EngineRequest`] (prompt token ids, [`SamplingParams`], limits) and submits it through the
//! [`EngineHandle`], the one bounded request queue. The engine thread drains that queue into the
//! scheduler, which hands the runner a [`ScheduledBatch`] each step; sampled tokens travel back
//! to the request's own channel as [`TokenEvent`]s. [`Metrics`] holds every Prometheus series.
//! No candle, no axum here.

mod batch;
mod embed;
mod ids;
pub mod metrics;
mod queue;
mod request;

pub use batch::{AdapterId, ScheduledBatch, ScheduledSeq};
pub use embed::{embed_queue, EmbedHandle, EmbedReceiver, EmbedReply, EmbedRequest};
pub use ids::{BlockId, RequestId};
pub use metrics::Metrics;
pub use queue::{
    request_queue, Busy, EngineCommand, EngineHandle, QueueLimits, QueueReceiver, Recv, SubmitError,
};
pub use request::{
    EngineRequest, ErrorKind, FinishReason, SamplingParams, TokenConstraint, TokenEvent,
    TokenLogprobs,
};
