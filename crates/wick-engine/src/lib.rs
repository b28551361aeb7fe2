//! Wick's engine loop: one dedicated OS thread owns the [`Scheduler`], the KV cache and the
//! runner, and loops schedule -> forward -> sample -> emit.
//!
//! [`start`] spawns the thread and returns at once with the [`EngineHandle`] (the sending side
//! of the one bounded request queue) and a receiver for the ready handshake: the model loads
//! on the engine thread, and its success ([`Ready`]) or failure (a message) arrives there.
//! Each request carries its own event channel; a request whose receiver is gone is aborted
//! and its blocks freed before the next step.

mod embed;
mod engine;

pub use embed::{start_embedding, EmbedConfig, EmbedStarted, Embedder};
pub use engine::{start, EngineConfig, Loaded, Ready, Started, StepRunner};
pub use wick_core::EngineHandle;
