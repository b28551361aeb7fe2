//! Qwen2 and Qwen2.5: Llama's layers with biases on Q, K and V, NeoX rotary pairs, and an
//! optional sliding window on the layers from `max_window_layers` on.

use serde_json::Value as Json;

use super::{Family, LLAMA_NAMES};
use crate::config::{ModelConfig, RopeStyle};
use crate::gguf::GgufFile;
use crate::Result;

pub(super) const FAMILY: Family = Family {
    name: "qwen2",
    gguf_archs: &["qwen2"],
    hf_model_types: &["qwen2"],
    hf_architectures: &["Qwen2ForCausalLM"],
    gguf_rope: RopeStyle::Half,
    gguf,
    hf,
    hf_names: &LLAMA_NAMES,
};

fn gguf(_: &mut GgufFile, _: &str, cfg: &mut ModelConfig) -> Result<()> {
    cfg.qkv_bias = true;
    Ok(())
}

fn hf(j: &Json, cfg: &mut ModelConfig) -> Result<()> {
    cfg.qkv_bias = true;
    if j.get("use_sliding_window").and_then(Json::as_bool) == Some(true) {
        let window = j.get("sliding_window").and_then(Json::as_u64);
        let from = j
            .get("max_window_layers")
            .and_then(Json::as_u64)
            .unwrap_or(0) as usize;
        for (i, l) in cfg.layers.iter_mut().enumerate() {
            if i >= from {
                l.sliding_window = window.map(|w| w as usize);
            }
        }
    }
    Ok(())
}
