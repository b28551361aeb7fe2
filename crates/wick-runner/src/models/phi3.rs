//! Phi-3 (and Phi-3.5, Phi-4-mini): one fused QKV matrix and one fused gate+up matrix,
//! NeoX rotary pairs, partial rotation (`partial_rotary_factor`), and LongRoPE: per-pair
//! frequency factors, the long set when the served context exceeds the original one, with a
//! magnitude correction.

use serde_json::Value as Json;

use super::{Family, HfNames};
use crate::config::{ModelConfig, RopeStyle};
use crate::gguf::GgufFile;
use crate::{Result, RunnerError};

pub(super) const FAMILY: Family = Family {
    name: "phi3",
    gguf_archs: &["phi3"],
    hf_model_types: &["phi3"],
    hf_architectures: &["Phi3ForCausalLM"],
    gguf_rope: RopeStyle::Half,
    gguf,
    hf,
    hf_names: &HfNames {
        fused_qkv: Some("self_attn.qkv_proj"),
        fused_gate_up: Some("mlp.gate_up_proj"),
        ffn_norm: "post_attention_layernorm",
        post_attn_norm: "",
        post_ffn_norm: "",
    },
};

fn gguf(g: &mut GgufFile, arch: &str, cfg: &mut ModelConfig) -> Result<()> {
    // As llama.cpp does: Phi-3 GGUF files carry a window its converter does not set right.
    for l in &mut cfg.layers {
        l.sliding_window = None;
    }
    let original = g.opt_usize(&format!("{arch}.rope.scaling.original_context_length"))?;
    let long = original.is_some_and(|o| cfg.max_position_embeddings > o);
    let name = if long {
        "rope_factors_long.weight"
    } else {
        "rope_factors_short.weight"
    };
    if g.has_tensor(name) {
        let half = cfg.ropes[0].dims / 2;
        cfg.ropes[0].freq_factors = Some(g.vector(name, half)?);
    }
    Ok(())
}

fn floats(v: &Json, key: &str) -> Result<Vec<f32>> {
    v.get(key)
        .and_then(Json::as_array)
        .and_then(|a| a.iter().map(|x| x.as_f64().map(|f| f as f32)).collect())
        .ok_or_else(|| RunnerError::Unsupported(format!("rope_scaling without a list {key}")))
}

fn hf(j: &Json, cfg: &mut ModelConfig) -> Result<()> {
    if let Some(w) = j.get("sliding_window").and_then(Json::as_u64) {
        for l in &mut cfg.layers {
            l.sliding_window = Some(w as usize);
        }
    }
    let Some(rs) = j.get("rope_scaling").filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let kind = rs
        .get("type")
        .or_else(|| rs.get("rope_type"))
        .and_then(Json::as_str);
    if !matches!(kind, Some("longrope") | Some("su")) {
        // Other kinds were read by the common loader.
        return Ok(());
    }
    let original = j
        .get("original_max_position_embeddings")
        .and_then(Json::as_u64)
        .unwrap_or(cfg.max_position_embeddings as u64) as usize;
    let long = cfg.max_position_embeddings > original;
    let factors = floats(rs, if long { "long_factor" } else { "short_factor" })?;
    let rope = &mut cfg.ropes[0];
    rope.freq_factors = Some(factors);
    let scale = cfg.max_position_embeddings as f32 / original as f32;
    if scale > 1.0 {
        rope.attn_factor = (1.0 + scale.ln() / (original as f32).ln()).sqrt();
    }
    Ok(())
}
