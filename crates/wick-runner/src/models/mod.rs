//! The families Wick serves, one module each, and the registry that finds a file's family.
//!
//! A family says what is its own: the names it is known by (the GGUF `general.architecture`,
//! the Hugging Face `model_type` and `architectures`), how its hyper-parameters differ from the
//! common reading (gemma3's alternating sliding windows, qwen2's QKV bias, ...), and its
//! Hugging Face tensor names. Everything else (loading, the forward, the KV cache) is shared
//! and reads only [`ModelConfig`]. Adding a family is a module here and one line in
//! [`FAMILIES`].

mod gemma2;
mod gemma3;
mod llama;
mod mistral;
mod phi3;
mod qwen2;
mod qwen3;

use serde_json::Value as Json;

use crate::config::{ModelConfig, RopeStyle};
use crate::gguf::GgufFile;
use crate::Result;

/// How a family's Hugging Face checkpoint names the parts of a layer (under
/// `model.layers.N.`), where they differ between families.
pub(crate) struct HfNames {
    /// `Some("self_attn.qkv_proj")` when Q, K and V are one matrix.
    pub fused_qkv: Option<&'static str>,
    /// `Some("mlp.gate_up_proj")` when gate and up are one matrix (gate rows first).
    pub fused_gate_up: Option<&'static str>,
    /// The norm before the MLP.
    pub ffn_norm: &'static str,
    /// The norms of the attention and MLP outputs, when [`ModelConfig::post_norms`].
    pub post_attn_norm: &'static str,
    pub post_ffn_norm: &'static str,
}

pub(crate) const LLAMA_NAMES: HfNames = HfNames {
    fused_qkv: None,
    fused_gate_up: None,
    ffn_norm: "post_attention_layernorm",
    post_attn_norm: "",
    post_ffn_norm: "",
};

/// One family.
pub(crate) struct Family {
    pub name: &'static str,
    pub gguf_archs: &'static [&'static str],
    pub hf_model_types: &'static [&'static str],
    pub hf_architectures: &'static [&'static str],
    /// llama.cpp's rotary layout for this architecture's GGUF files.
    pub gguf_rope: RopeStyle,
    /// Adjusts the common GGUF reading (`cfg`) with what is the family's own.
    pub gguf: fn(&mut GgufFile, &str, &mut ModelConfig) -> Result<()>,
    /// Adjusts the common `config.json` reading likewise.
    pub hf: fn(&Json, &mut ModelConfig) -> Result<()>,
    pub hf_names: &'static HfNames,
}

/// Every family, in the order they are tried.
pub(crate) const FAMILIES: &[&Family] = &[
    &llama::FAMILY,
    &mistral::FAMILY,
    &qwen2::FAMILY,
    &qwen3::FAMILY,
    &gemma2::FAMILY,
    &gemma3::FAMILY,
    &phi3::FAMILY,
];

/// The family of a GGUF `general.architecture`.
pub(crate) fn by_gguf_arch(arch: &str) -> Option<&'static Family> {
    FAMILIES
        .iter()
        .copied()
        .find(|f| f.gguf_archs.contains(&arch))
}

/// The family of a `config.json`: its `model_type`, else its `architectures`.
pub(crate) fn by_hf(model_type: Option<&str>, architectures: &[String]) -> Option<&'static Family> {
    if let Some(t) = model_type {
        if let Some(f) = FAMILIES.iter().find(|f| f.hf_model_types.contains(&t)) {
            return Some(f);
        }
    }
    FAMILIES.iter().copied().find(|f| {
        architectures
            .iter()
            .any(|a| f.hf_architectures.contains(&a.as_str()))
    })
}

/// Every name the registry knows, for an "unsupported" message.
pub(crate) fn known_gguf_archs() -> String {
    FAMILIES
        .iter()
        .flat_map(|f| f.gguf_archs.iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn known_hf_types() -> String {
    FAMILIES
        .iter()
        .flat_map(|f| f.hf_model_types.iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A family hook with nothing of its own to add.
fn no_gguf(_: &mut GgufFile, _: &str, _: &mut ModelConfig) -> Result<()> {
    Ok(())
}

fn no_hf(_: &Json, _: &mut ModelConfig) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_maps_to_exactly_one_family() {
        let mut seen = std::collections::HashSet::new();
        for f in FAMILIES {
            for a in f.gguf_archs {
                assert!(seen.insert(format!("gguf:{a}")), "{a} twice");
                assert_eq!(by_gguf_arch(a).unwrap().name, f.name);
            }
            for t in f.hf_model_types {
                assert!(seen.insert(format!("hf:{t}")), "{t} twice");
                assert_eq!(by_hf(Some(t), &[]).unwrap().name, f.name);
            }
        }
        assert!(by_gguf_arch("mamba").is_none());
        let arch = vec!["Qwen2ForCausalLM".to_string()];
        assert_eq!(by_hf(None, &arch).unwrap().name, "qwen2");
    }
}
