//! Wick's model runner.
//!
//! [`load`] reads a model (a GGUF file, or a Hugging Face directory) through its family's
//! module in `models` into a [`LoadedModel`]: the [`Model`] that computes, plus the
//! [`ModelAssets`] the front end needs (tokenizer, chat template, stop tokens). Every family
//! is described by one [`ModelConfig`]; the forward, the KV cache and the runner read only
//! that. Each engine step, [`Runner::step`] packs every scheduled token of a
//! [`wick_core::ScheduledBatch`] into one `[tokens, hidden]` input, runs each projection once
//! over it, attends per sequence over that sequence's blocks of the KV cache, and returns
//! logits for the last position of each sequence that samples. [`Sampler`] draws the next
//! token.

mod adapter;
mod attention;
mod config;
mod cpu;
mod embedding;
mod error;
#[cfg(feature = "testing")]
pub mod gguf;
#[cfg(not(feature = "testing"))]
mod gguf;
mod kv_cache;
mod linear;
mod load;
mod memory;
mod model;
mod models;
mod profile;
#[cfg(feature = "testing")]
pub mod qgemm;
#[cfg(not(feature = "testing"))]
mod qgemm;
pub mod quant;
mod rope;
mod runner;
mod sampling;
#[cfg(test)]
mod test_support;
#[cfg(feature = "testing")]
pub mod testing;
mod tokenizer;

pub use adapter::{Adapters, Projection, Site};
pub use candle_core::Device;
pub use config::{Activation, LayerSpec, ModelConfig, RopeScaling, RopeSpec, RopeStyle};
pub use cpu::SimdLimit;
pub use embedding::{EmbeddingModel, Pooling};
pub use error::RunnerError;
pub use gguf::write_tokenizer_gguf;
pub use kv_cache::{CacheConfig, KvCache, KvSize, KvSizing};
pub use load::{
    load, load_assets, parse_device, parse_dtype, DTypeSpec, DeviceSpec, LoadOptions, LoadedModel,
    ModelAssets, ModelFacts, WeightFormat,
};
pub use memory::{host_memory, host_memory_under, HostMemory, MemoryBound};
pub use model::Model;
pub use profile::StepProfile;
pub use runner::{Runner, StepRow};
pub use sampling::device::DrawParams;
pub use sampling::{argmax, draw_on_host, logprobs, Draw, Sampled, Sampler, SeqSampling};
pub use tokenizer::{from_gguf as tokenizer_from_gguf, GgufTokenizer};

pub type Result<T> = std::result::Result<T, RunnerError>;
