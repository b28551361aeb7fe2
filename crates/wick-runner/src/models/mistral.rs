//! Mistral: Llama's layers with a sliding window on every layer (`sliding_window` in
//! `config.json`). Its GGUF files say `llama` (that is what llama.cpp's converter writes) and
//! load through the llama family, which honours `llama.attention.sliding_window` when present.

use serde_json::Value as Json;

use super::{no_gguf, Family, LLAMA_NAMES};
use crate::config::{ModelConfig, RopeStyle};
use crate::Result;

pub(super) const FAMILY: Family = Family {
    name: "mistral",
    gguf_archs: &[],
    hf_model_types: &["mistral"],
    hf_architectures: &["MistralForCausalLM"],
    gguf_rope: RopeStyle::Interleaved,
    gguf: no_gguf,
    hf,
    hf_names: &LLAMA_NAMES,
};

fn hf(j: &Json, cfg: &mut ModelConfig) -> Result<()> {
    if let Some(w) = j.get("sliding_window").and_then(Json::as_u64) {
        for l in &mut cfg.layers {
            l.sliding_window = Some(w as usize);
        }
    }
    Ok(())
}
