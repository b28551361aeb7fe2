//! Wick's model runner.
//!
//! [`load`] reads a model (a GGUF file, or a Hugging Face directory of `config.json`,
//! `tokenizer.json`, `tokenizer_config.json` and `*.safetensors`) into a [`LoadedModel`]: the
//! [`Runner`] that computes, plus the [`ModelAssets`] the front end needs (tokenizer, chat
//! template, stop tokens). Each engine step, [`Runner::step`] packs every scheduled token of a
//! [`wick_core::ScheduledBatch`] into one `[tokens, hidden]` input, runs each linear layer once
//! over it, attends per sequence over that sequence's blocks of the [`KvCache`], and returns
//! logits for the last position of each sequence that samples. [`Sampler`] draws the next token.

mod config;
mod error;
mod gguf;
mod hf;
mod kv_cache;
mod linear;
mod model;
#[doc(hidden)]
pub mod qgemm;
mod runner;
mod sampling;
mod tokenizer;

pub use candle_core::Device;
pub use config::{LlamaConfig, RopeStyle};
pub use error::RunnerError;
pub use kv_cache::{CacheConfig, KvCache};
pub use model::Llama;
pub use runner::{
    load, parse_device, parse_dtype, LoadOptions, LoadedModel, ModelAssets, Runner, WeightFormat,
};
pub use sampling::{argmax, logprobs, Sampled, Sampler};
pub use tokenizer::tokenizer_from_gguf;

pub type Result<T> = std::result::Result<T, RunnerError>;
