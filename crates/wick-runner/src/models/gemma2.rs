//! Gemma 2: attention scores soft-capped (`cap * tanh(s / cap)`, 50 by default) and output
//! logits too (30), sliding-window layers alternating with global ones (every other one is
//! local, the first included; one RoPE base for both), GELU-tanh MLP, RMSNorm of the
//! attention and MLP outputs, embeddings scaled by `sqrt(hidden_size)`, `1 + w` norms in the
//! Hugging Face checkpoint (GGUF files store the sum), tied embeddings. No Q/K norms (Gemma 3
//! has them instead of the attention soft-cap).

use serde_json::Value as Json;

use super::gemma3::{gemma_common, gguf_pattern, hf_gelu, hf_pattern, set_local, HF_NAMES};
use super::Family;
use crate::config::{ModelConfig, RopeStyle};
use crate::gguf::GgufFile;
use crate::Result;

pub(super) const FAMILY: Family = Family {
    name: "gemma2",
    gguf_archs: &["gemma2"],
    hf_model_types: &["gemma2"],
    hf_architectures: &["Gemma2ForCausalLM"],
    gguf_rope: RopeStyle::Half,
    gguf,
    hf,
    hf_names: &HF_NAMES,
};

/// Every other layer is local (llama.cpp's and the checkpoints' pattern).
const PATTERN: usize = 2;
/// The window, the attention and the final soft-caps when a file does not say (llama.cpp's
/// and `Gemma2Config`'s defaults).
const WINDOW: usize = 4096;
const ATTN_CAP: f32 = 50.0;
const FINAL_CAP: f32 = 30.0;
/// The 27B model's layer count: its queries are scaled by `hidden / heads`, not the head size.
const LAYERS_27B: usize = 46;

/// Local layers get the window, and a second RoPE only when their base differs.
fn local_layers(cfg: &mut ModelConfig, window: usize, local: &[bool], base: Option<f32>) {
    match base.filter(|b| *b != cfg.ropes[0].base) {
        Some(b) => set_local(cfg, window, local, b),
        None => {
            for (l, &is_local) in cfg.layers.iter_mut().zip(local) {
                l.sliding_window = is_local.then_some(window);
            }
        }
    }
}

fn gguf(g: &mut GgufFile, arch: &str, cfg: &mut ModelConfig) -> Result<()> {
    gemma_common(cfg);
    let scale_dim = if cfg.num_layers == LAYERS_27B {
        cfg.hidden_size / cfg.num_heads.max(1)
    } else {
        cfg.head_dim
    };
    cfg.attn_scale = 1.0 / (scale_dim.max(1) as f32).sqrt();
    let cap = |g: &GgufFile, key: &str, default: f32| -> Result<f32> {
        Ok(g.opt_f32(&format!("{arch}.{key}"))?.unwrap_or(default))
    };
    cfg.attn_logit_softcap = Some(cap(g, "attn_logit_softcapping", ATTN_CAP)?);
    cfg.final_logit_softcap = Some(cap(g, "final_logit_softcapping", FINAL_CAP)?);
    let window = g
        .opt_usize(&format!("{arch}.attention.sliding_window"))?
        .unwrap_or(WINDOW);
    if window == 0 {
        return Ok(());
    }
    let local = gguf_pattern(g, arch, cfg.num_layers, PATTERN)?;
    let base = g.opt_f32(&format!("{arch}.rope.freq_base_swa"))?;
    local_layers(cfg, window, &local, base);
    Ok(())
}

/// A soft-cap of `config.json`: its value, none where `null`, the default where absent.
fn hf_cap(j: &Json, key: &str, default: f32) -> Option<f32> {
    match j.get(key) {
        None => Some(default),
        Some(v) => v.as_f64().map(|c| c as f32),
    }
}

fn hf(j: &Json, cfg: &mut ModelConfig) -> Result<()> {
    gemma_common(cfg);
    cfg.norm_weight_offset = 1.0;
    hf_gelu(j, "gemma2")?;
    let scalar = j
        .get("query_pre_attn_scalar")
        .and_then(Json::as_f64)
        .unwrap_or(cfg.head_dim as f64);
    cfg.attn_scale = (1.0 / scalar.sqrt()) as f32;
    cfg.attn_logit_softcap = hf_cap(j, "attn_logit_softcapping", ATTN_CAP);
    cfg.final_logit_softcap = hf_cap(j, "final_logit_softcapping", FINAL_CAP);
    let window = match j.get("sliding_window") {
        None => Some(WINDOW),
        Some(w) => w.as_u64().map(|w| w as usize).filter(|w| *w > 0),
    };
    let Some(window) = window else {
        return Ok(());
    };
    let local = hf_pattern(j, cfg, PATTERN)?;
    local_layers(cfg, window, &local, None);
    Ok(())
}
