//! Gemma 3: local sliding-window layers (their own RoPE base, 10,000) alternating with global
//! ones (every sixth by default), GELU-tanh MLP, RMSNorm of the attention and MLP outputs,
//! per-head Q/K norms, embeddings scaled by `sqrt(hidden_size)`, `1 + w` norms in the Hugging
//! Face checkpoint (GGUF files store the sum), tied embeddings.

use serde_json::Value as Json;

use super::{Family, HfNames};
use crate::config::{Activation, ModelConfig, RopeSpec, RopeStyle};
use crate::gguf::{GgufFile, Value};
use crate::{Result, RunnerError};

pub(super) const FAMILY: Family = Family {
    name: "gemma3",
    gguf_archs: &["gemma3"],
    hf_model_types: &["gemma3_text", "gemma3"],
    hf_architectures: &["Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"],
    gguf_rope: RopeStyle::Half,
    gguf,
    hf,
    hf_names: &HF_NAMES,
};

/// Gemma's Hugging Face layer names (Gemma 2 and 3): a norm before and after the MLP.
pub(super) const HF_NAMES: HfNames = HfNames {
    fused_qkv: None,
    fused_gate_up: None,
    ffn_norm: "pre_feedforward_layernorm",
    post_attn_norm: "post_attention_layernorm",
    post_ffn_norm: "post_feedforward_layernorm",
};

/// Every layer but every sixth is local, unless the checkpoint says otherwise.
const DEFAULT_PATTERN: usize = 6;
const LOCAL_BASE: f32 = 10_000.0;

/// What Gemma 2 and 3 share: GELU-tanh, post-norms, embeddings scaled by `sqrt(hidden)`.
pub(super) fn gemma_common(cfg: &mut ModelConfig) {
    cfg.activation = Activation::GeluTanh;
    cfg.post_norms = true;
    cfg.embed_scale = (cfg.hidden_size as f32).sqrt();
}

/// Refuses a Hugging Face `hidden_activation` that is not a GELU.
pub(super) fn hf_gelu(j: &Json, family: &str) -> Result<()> {
    match j.get("hidden_activation").and_then(Json::as_str) {
        Some(a) if !a.starts_with("gelu") => Err(RunnerError::Unsupported(format!(
            "{family} hidden_activation {a:?}"
        ))),
        _ => Ok(()),
    }
}

fn common(cfg: &mut ModelConfig) {
    gemma_common(cfg);
    cfg.qk_norm = true;
}

/// Marks the local layers (`local[i]`) with the window and the local RoPE (a second spec).
pub(super) fn set_local(cfg: &mut ModelConfig, window: usize, local: &[bool], local_base: f32) {
    let global = &cfg.ropes[0];
    cfg.ropes
        .push(RopeSpec::plain(global.style, global.dims, local_base));
    for (l, &is_local) in cfg.layers.iter_mut().zip(local) {
        l.sliding_window = is_local.then_some(window);
        l.rope = if is_local { 1 } else { 0 };
    }
}

/// Which layers are local in a GGUF file: `{arch}.attention.sliding_window_pattern` as one
/// flag per layer, or a period (llama.cpp's), else the family's `default` period.
pub(super) fn gguf_pattern(
    g: &GgufFile,
    arch: &str,
    layers: usize,
    default: usize,
) -> Result<Vec<bool>> {
    let key = format!("{arch}.attention.sliding_window_pattern");
    Ok(match g.get(&key) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_bool())
            .collect::<Option<Vec<bool>>>()
            .filter(|v| v.len() == layers)
            .ok_or_else(|| RunnerError::invalid(g.path(), format!("{key}: one flag per layer")))?,
        Some(_) => period(g.usize(&key)?, layers),
        None => period(default, layers),
    })
}

/// Which layers are local in a `config.json`: its `layer_types`, else its
/// `sliding_window_pattern` period, else the family's `default` period.
pub(super) fn hf_pattern(j: &Json, cfg: &ModelConfig, default: usize) -> Result<Vec<bool>> {
    let layers = cfg.num_layers;
    let local: Vec<bool> = match j.get("layer_types").and_then(Json::as_array) {
        Some(types) => types
            .iter()
            .map(|t| t.as_str() == Some("sliding_attention"))
            .collect(),
        None => {
            let n = j
                .get("sliding_window_pattern")
                .and_then(Json::as_u64)
                .unwrap_or(default as u64) as usize;
            period(n, layers)
        }
    };
    if local.len() != layers {
        return Err(RunnerError::Unsupported(format!(
            "{} layer_types has {} entries for {layers} layers",
            cfg.family,
            local.len()
        )));
    }
    Ok(local)
}

/// llama.cpp's period pattern: layer `i` is local unless `i % n == n - 1` (all local for 0).
fn period(n: usize, layers: usize) -> Vec<bool> {
    (0..layers).map(|i| n == 0 || i % n < n - 1).collect()
}

fn gguf(g: &mut GgufFile, arch: &str, cfg: &mut ModelConfig) -> Result<()> {
    common(cfg);
    // llama.cpp's special case for the 27B model, whose query scale uses hidden / heads.
    let scale_dim = if cfg.num_layers == 62 {
        cfg.hidden_size / cfg.num_heads
    } else {
        cfg.head_dim
    };
    cfg.attn_scale = 1.0 / (scale_dim as f32).sqrt();
    cfg.final_logit_softcap = g
        .opt_f32(&format!("{arch}.final_logit_softcapping"))?
        .filter(|c| *c > 0.0);
    let window = g
        .opt_usize(&format!("{arch}.attention.sliding_window"))?
        .filter(|w| *w > 0);
    let Some(window) = window else {
        return Ok(());
    };
    let local = gguf_pattern(g, arch, cfg.num_layers, DEFAULT_PATTERN)?;
    let base = g
        .opt_f32(&format!("{arch}.rope.freq_base_swa"))?
        .unwrap_or(LOCAL_BASE);
    set_local(cfg, window, &local, base);
    Ok(())
}

fn hf(j: &Json, cfg: &mut ModelConfig) -> Result<()> {
    common(cfg);
    cfg.norm_weight_offset = 1.0;
    hf_gelu(j, "gemma3")?;
    let scalar = j
        .get("query_pre_attn_scalar")
        .and_then(Json::as_f64)
        .unwrap_or(cfg.head_dim as f64);
    cfg.attn_scale = (1.0 / scalar.sqrt()) as f32;
    cfg.final_logit_softcap = j
        .get("final_logit_softcapping")
        .and_then(Json::as_f64)
        .map(|c| c as f32);
    let Some(window) = j.get("sliding_window").and_then(Json::as_u64) else {
        return Ok(());
    };
    let local = hf_pattern(j, cfg, DEFAULT_PATTERN)?;
    let base = j
        .get("rope_local_base_freq")
        .and_then(Json::as_f64)
        .map_or(LOCAL_BASE, |b| b as f32);
    set_local(cfg, window as usize, &local, base);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::period;

    #[test]
    fn every_sixth_layer_is_global() {
        let p = period(6, 18);
        let global: Vec<usize> = (0..18).filter(|&i| !p[i]).collect();
        assert_eq!(global, vec![5, 11, 17]);
        assert!(period(0, 4).iter().all(|&l| l));
    }
}
