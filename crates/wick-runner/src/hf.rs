//! Loading a Hugging Face Llama-family directory: `config.json`, `tokenizer.json`,
//! `tokenizer_config.json` (with its `chat_template`) and `*.safetensors`.
//! Weights stay dense (f32), fused like the GGUF path.

use std::path::{Path, PathBuf};

use candle_core::quantized::QMatMul;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::linear::Linear;
use crate::model::{Layer, Weights};
use crate::runner::ModelAssets;
use crate::{LlamaConfig, Result, RopeStyle, RunnerError};

#[derive(Debug, Deserialize)]
struct HfConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    max_position_embeddings: usize,
    tie_word_embeddings: Option<bool>,
    rope_scaling: Option<Value>,
    model_type: Option<String>,
    eos_token_id: Option<Value>,
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| RunnerError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    serde_json::from_str(&read(path)?).map_err(|e| RunnerError::invalid(path, e.to_string()))
}

fn config(dir: &Path) -> Result<(LlamaConfig, HfConfig)> {
    let path = dir.join("config.json");
    let hf: HfConfig = json(&path)?;
    match hf.model_type.as_deref() {
        None | Some("llama") | Some("mistral") => {}
        Some(other) => {
            return Err(RunnerError::Unsupported(format!("model_type {other:?}")));
        }
    }
    if hf.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(RunnerError::Unsupported(
            "rope_scaling in config.json".into(),
        ));
    }
    let cfg = LlamaConfig {
        hidden_size: hf.hidden_size,
        intermediate_size: hf.intermediate_size,
        num_layers: hf.num_hidden_layers,
        num_heads: hf.num_attention_heads,
        num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        head_dim: hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
        vocab_size: hf.vocab_size,
        rms_norm_eps: hf.rms_norm_eps,
        rope_theta: hf.rope_theta.unwrap_or(10_000.0),
        rope_style: RopeStyle::Half,
        max_position_embeddings: hf.max_position_embeddings,
    };
    cfg.validate().map_err(|m| RunnerError::invalid(&path, m))?;
    Ok((cfg, hf))
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|source| RunnerError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(RunnerError::NotAModel {
            path: dir.to_path_buf(),
        });
    }
    Ok(files)
}

fn weights(
    dir: &Path,
    cfg: &LlamaConfig,
    tied: bool,
    device: &Device,
    dtype: DType,
) -> Result<Weights> {
    let files = safetensors_files(dir)?;
    // SAFETY: the files are mapped read-only and not modified while the model loads.
    let st = unsafe { MmapedSafetensors::multi(&files) }
        .map_err(|e| RunnerError::invalid(dir, e.to_string()))?;
    let get = |name: &str| -> Result<Tensor> {
        st.load(name, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| RunnerError::invalid(dir, format!("tensor {name}: {e}")))
    };
    let vector = |name: &str| -> Result<Tensor> { Ok(get(name)?.to_device(device)?) };
    let linear = |names: &[String]| -> Result<Linear> {
        let parts: Vec<Tensor> = names.iter().map(|n| get(n)).collect::<Result<_>>()?;
        Ok(Linear::Plain(QMatMul::Tensor(
            Tensor::cat(&parts, 0)?.to_device(device)?,
        )))
    };
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = |n: &str| format!("model.layers.{i}.{n}.weight");
        layers.push(Layer {
            attn_norm: vector(&p("input_layernorm"))?,
            qkv: linear(&[
                p("self_attn.q_proj"),
                p("self_attn.k_proj"),
                p("self_attn.v_proj"),
            ])?,
            o: linear(&[p("self_attn.o_proj")])?,
            ffn_norm: vector(&p("post_attention_layernorm"))?,
            gate_up: linear(&[p("mlp.gate_proj"), p("mlp.up_proj")])?,
            down: linear(&[p("mlp.down_proj")])?,
        });
    }
    let head = if tied && st.get("lm_head.weight").is_err() {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    Ok(Weights {
        embed: vector("model.embed_tokens.weight")?,
        layers,
        norm: vector("model.norm.weight")?,
        lm_head: linear(&[head.to_string()])?,
    })
}

/// `"<s>"` or `{"content": "<s>", ...}` as `tokenizer_config.json` writes special tokens.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// A template string, or the one named "default" in a list of named templates.
fn chat_template(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

fn assets(dir: &Path, cfg: &LlamaConfig, hf: &HfConfig) -> Result<ModelAssets> {
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path)
        .map_err(|e| RunnerError::invalid(&tok_path, e.to_string()))?;
    let tc: Value = json(&dir.join("tokenizer_config.json"))?;
    let eos_token = token_text(tc.get("eos_token"));
    let mut stop_token_ids = ids(hf.eos_token_id.as_ref());
    let gen = dir.join("generation_config.json");
    if gen.exists() {
        let g: Value = json(&gen)?;
        stop_token_ids.extend(ids(g.get("eos_token_id")));
    }
    if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
        stop_token_ids.push(id);
    }
    stop_token_ids.sort_unstable();
    stop_token_ids.dedup();
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    Ok(ModelAssets {
        name,
        tokenizer,
        chat_template: chat_template(tc.get("chat_template")),
        bos_token: token_text(tc.get("bos_token")),
        eos_token,
        stop_token_ids,
        max_model_len: cfg.max_position_embeddings,
    })
}

pub(crate) fn load(
    dir: &Path,
    device: &Device,
    dtype: DType,
) -> Result<(LlamaConfig, Weights, ModelAssets)> {
    let (cfg, hf) = config(dir)?;
    let w = weights(
        dir,
        &cfg,
        hf.tie_word_embeddings.unwrap_or(false),
        device,
        dtype,
    )?;
    let assets = assets(dir, &cfg, &hf)?;
    Ok((cfg, w, assets))
}
