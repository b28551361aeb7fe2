//! Llama 2 and 3.x, SmolLM, TinyLlama, and Mistral's GGUF files (which llama.cpp writes as
//! `llama`): the baseline every other family adjusts. Llama 3's RoPE scaling arrives as
//! frequency factors (`rope_freqs.weight` in GGUF, `rope_scaling` in `config.json`), read by
//! the common loaders.

use super::{no_gguf, no_hf, Family, LLAMA_NAMES};
use crate::config::RopeStyle;

pub(super) const FAMILY: Family = Family {
    name: "llama",
    gguf_archs: &["llama"],
    hf_model_types: &["llama"],
    hf_architectures: &["LlamaForCausalLM"],
    // llama.cpp's converter permutes Q and K rows so that pairs are adjacent.
    gguf_rope: RopeStyle::Interleaved,
    gguf: no_gguf,
    hf: no_hf,
    hf_names: &LLAMA_NAMES,
};
