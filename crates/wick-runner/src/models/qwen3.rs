//! Qwen3: Llama's layers with a per-head RMSNorm of queries and keys before RoPE, NeoX rotary
//! pairs, and a head size of its own (`head_dim`, not `hidden_size / heads`).

use serde_json::Value as Json;

use super::{Family, LLAMA_NAMES};
use crate::config::{ModelConfig, RopeStyle};
use crate::gguf::GgufFile;
use crate::Result;

pub(super) const FAMILY: Family = Family {
    name: "qwen3",
    gguf_archs: &["qwen3"],
    hf_model_types: &["qwen3"],
    hf_architectures: &["Qwen3ForCausalLM"],
    gguf_rope: RopeStyle::Half,
    gguf,
    hf,
    hf_names: &LLAMA_NAMES,
};

fn gguf(_: &mut GgufFile, _: &str, cfg: &mut ModelConfig) -> Result<()> {
    cfg.qk_norm = true;
    Ok(())
}

fn hf(_: &Json, cfg: &mut ModelConfig) -> Result<()> {
    cfg.qk_norm = true;
    Ok(())
}
