//! A Hugging Face directory as a [`Source`]: `config.json` (the family from `model_type` or
//! `architectures`), `*.safetensors` (memory-mapped), `tokenizer.json`,
//! `tokenizer_config.json` (with its `chat_template`) and `generation_config.json`.
//!
//! On the host, weights keep their stored width (f16 and bf16 as [`HalfMatrix`], f32 dense);
//! on a device they are tensors of the model's dtype.

use std::path::{Path, PathBuf};

use candle_core::quantized::QMatMul;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde_json::Value as Json;
use tokenizers::Tokenizer;

use super::build::{build, Part, Source};
use super::{model_name, ModelAssets, Placement};
use crate::config::{Activation, ModelConfig, RopeScaling, RopeSpec, RopeStyle};
use crate::linear::{HalfMatrix, Linear};
use crate::model::Weights;
use crate::models::{self, HfNames};
use crate::{Result, RunnerError};

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| RunnerError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn json(path: &Path) -> Result<Json> {
    serde_json::from_str(&read(path)?).map_err(|e| RunnerError::invalid(path, e.to_string()))
}

struct Keys<'a> {
    j: &'a Json,
    path: &'a Path,
}

impl Keys<'_> {
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.j.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => v.as_u64().map(|v| Some(v as usize)).ok_or_else(|| {
                RunnerError::invalid(self.path, format!("{key} is {v}, expected a count"))
            }),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| RunnerError::invalid(self.path, format!("missing {key}")))
    }

    fn opt_f64(&self, key: &str) -> Option<f64> {
        self.j.get(key).and_then(Json::as_f64)
    }
}

/// Llama 3's frequency factors: long wavelengths slowed by `factor`, short ones kept, a
/// smooth blend between (`rope_scaling.rope_type == "llama3"`).
fn llama3_factors(rs: &Json, base: f64, dims: usize) -> Vec<f32> {
    let f = |k: &str, d: f64| rs.get(k).and_then(Json::as_f64).unwrap_or(d);
    let factor = f("factor", 8.0);
    let (low, high) = (f("low_freq_factor", 1.0), f("high_freq_factor", 4.0));
    let old = f("original_max_position_embeddings", 8192.0);
    let (low_wavelen, high_wavelen) = (old / low, old / high);
    (0..dims / 2)
        .map(|i| {
            let freq = base.powf(-2.0 * i as f64 / dims as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let divisor = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            divisor as f32
        })
        .collect()
}

/// The common reading of `rope_scaling` (Phi-3's LongRoPE is its family's own).
fn rope(k: &Keys, head_dim: usize, ctx: usize) -> Result<RopeSpec> {
    let partial = k.opt_f64("partial_rotary_factor").unwrap_or(1.0);
    let dims = ((head_dim as f64 * partial) as usize) & !1;
    let base = k.opt_f64("rope_theta").unwrap_or(10_000.0);
    let mut spec = RopeSpec::plain(RopeStyle::Half, dims, base as f32);
    let Some(rs) = k.j.get("rope_scaling").filter(|v| !v.is_null()) else {
        return Ok(spec);
    };
    let kind = rs
        .get("rope_type")
        .or_else(|| rs.get("type"))
        .and_then(Json::as_str)
        .unwrap_or("default");
    let factor = rs.get("factor").and_then(Json::as_f64).unwrap_or(1.0) as f32;
    match kind {
        "default" => {}
        "linear" => spec.scaling = RopeScaling::Linear { factor },
        "llama3" => spec.freq_factors = Some(llama3_factors(rs, base, dims)),
        "yarn" => {
            spec.scaling = RopeScaling::Yarn {
                factor,
                original_context: rs
                    .get("original_max_position_embeddings")
                    .and_then(Json::as_u64)
                    .map_or(ctx, |v| v as usize),
                beta_fast: rs.get("beta_fast").and_then(Json::as_f64).unwrap_or(32.0) as f32,
                beta_slow: rs.get("beta_slow").and_then(Json::as_f64).unwrap_or(1.0) as f32,
            };
            if let Some(a) = rs.get("attention_factor").and_then(Json::as_f64) {
                // The rope adds YaRN's own `1 + 0.1 ln(factor)`; an explicit factor replaces it.
                spec.attn_factor = a as f32 / (1.0 + 0.1 * factor.max(1.0).ln());
            }
        }
        "longrope" | "su" => {}
        other => {
            return Err(RunnerError::Unsupported(format!(
                "rope_scaling type {other:?} (supported: linear, llama3, yarn, longrope)"
            )))
        }
    }
    Ok(spec)
}

fn config(path: &Path, root: &Json, family: &'static models::Family) -> Result<ModelConfig> {
    let j = root
        .get("text_config")
        .filter(|v| v.is_object())
        .unwrap_or(root);
    let k = Keys { j, path };
    let hidden = k.usize("hidden_size")?;
    let heads = k.usize("num_attention_heads")?;
    let head_dim = k.opt_usize("head_dim")?.unwrap_or(hidden / heads.max(1));
    let layers = k.usize("num_hidden_layers")?;
    let ctx = k.usize("max_position_embeddings")?;
    let mut cfg = ModelConfig {
        hidden_size: hidden,
        intermediate_size: k.usize("intermediate_size")?,
        num_heads: heads,
        num_kv_heads: k.opt_usize("num_key_value_heads")?.unwrap_or(heads),
        vocab_size: k.usize("vocab_size")?,
        max_position_embeddings: ctx,
        norm_eps: k.opt_f64("rms_norm_eps").unwrap_or(1e-6) as f32,
        qkv_bias: j.get("attention_bias").and_then(Json::as_bool) == Some(true),
        ..ModelConfig::plain(family.name, layers, head_dim, rope(&k, head_dim, ctx)?)
            .map_err(|m| RunnerError::invalid(path, m))?
    };
    if let Some(act) = j.get("hidden_act").and_then(Json::as_str) {
        if act != "silu" && !act.starts_with("gelu") {
            return Err(RunnerError::Unsupported(format!("hidden_act {act:?}")));
        }
        if act.starts_with("gelu") {
            cfg.activation = Activation::GeluTanh;
        }
    }
    (family.hf)(j, &mut cfg)?;
    let longrope = j
        .get("rope_scaling")
        .and_then(|r| r.get("type").or_else(|| r.get("rope_type")))
        .and_then(Json::as_str)
        .is_some_and(|t| t == "longrope" || t == "su");
    if longrope && cfg.ropes[0].freq_factors.is_none() {
        return Err(RunnerError::Unsupported(format!(
            "LongRoPE scaling in a {} model",
            family.name
        )));
    }
    cfg.validate().map_err(|m| RunnerError::invalid(path, m))?;
    Ok(cfg)
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

struct HfSource {
    dir: PathBuf,
    st: MmapedSafetensors,
    /// `model.` (or where a multimodal checkpoint keeps its language model).
    prefix: String,
    names: &'static HfNames,
    place: Placement,
}

impl HfSource {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        self.st
            .load(name, &Device::Cpu)
            .map_err(|e| RunnerError::invalid(&self.dir, format!("tensor {name}: {e}")))
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor> {
        let t = self.tensor(name)?;
        if t.dims() != [rows, cols] {
            return Err(RunnerError::invalid(
                &self.dir,
                format!("tensor {name} is {:?}, expected [{rows}, {cols}]", t.dims()),
            ));
        }
        Ok(t)
    }

    /// A host matrix in its stored width.
    fn host(&self, t: Tensor) -> Result<Linear> {
        let (n, k) = t.dims2()?;
        Ok(match t.dtype() {
            DType::BF16 => {
                let bits = t.flatten_all()?.to_vec1::<half::bf16>()?;
                Linear::Half(HalfMatrix::from_bits(
                    true,
                    bits.iter().map(|b| b.to_bits()).collect(),
                    n,
                    k,
                )?)
            }
            DType::F16 => {
                let bits = t.flatten_all()?.to_vec1::<half::f16>()?;
                Linear::Half(HalfMatrix::from_bits(
                    false,
                    bits.iter().map(|b| b.to_bits()).collect(),
                    n,
                    k,
                )?)
            }
            _ => Linear::Candle(QMatMul::Tensor(t.to_dtype(DType::F32)?)),
        })
    }
}

impl Source for HfSource {
    fn name(&self, layer: usize, part: Part) -> String {
        let fused = |n: Option<&str>, d: &str| format!("{}.weight", n.unwrap_or(d));
        let n = match part {
            Part::AttnNorm => "input_layernorm.weight".to_string(),
            Part::Q => "self_attn.q_proj.weight".into(),
            Part::K => "self_attn.k_proj.weight".into(),
            Part::V => "self_attn.v_proj.weight".into(),
            Part::Qkv => fused(self.names.fused_qkv, "self_attn.qkv_proj"),
            Part::QBias => "self_attn.q_proj.bias".into(),
            Part::KBias => "self_attn.k_proj.bias".into(),
            Part::VBias => "self_attn.v_proj.bias".into(),
            Part::QkvBias => format!(
                "{}.bias",
                self.names.fused_qkv.unwrap_or("self_attn.qkv_proj")
            ),
            Part::QNorm => "self_attn.q_norm.weight".into(),
            Part::KNorm => "self_attn.k_norm.weight".into(),
            Part::O => "self_attn.o_proj.weight".into(),
            Part::OBias => "self_attn.o_proj.bias".into(),
            Part::PostAttnNorm => format!("{}.weight", self.names.post_attn_norm),
            Part::FfnNorm => format!("{}.weight", self.names.ffn_norm),
            Part::Gate => "mlp.gate_proj.weight".into(),
            Part::Up => "mlp.up_proj.weight".into(),
            Part::GateUp => fused(self.names.fused_gate_up, "mlp.gate_up_proj"),
            Part::Down => "mlp.down_proj.weight".into(),
            Part::DownBias => "mlp.down_proj.bias".into(),
            Part::PostFfnNorm => format!("{}.weight", self.names.post_ffn_norm),
        };
        format!("{}layers.{layer}.{n}", self.prefix)
    }

    fn embed_name(&self) -> String {
        format!("{}embed_tokens.weight", self.prefix)
    }

    fn output_name(&self) -> String {
        "lm_head.weight".into()
    }

    fn output_norm_name(&self) -> String {
        format!("{}norm.weight", self.prefix)
    }

    fn has(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.tensor(name)?;
        if t.elem_count() != len {
            return Err(RunnerError::invalid(
                &self.dir,
                format!(
                    "tensor {name} has {} values, expected {len}",
                    t.elem_count()
                ),
            ));
        }
        Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }

    fn linear(&mut self, names: &[String], rows: &[usize], cols: usize) -> Result<Linear> {
        let parts = names
            .iter()
            .zip(rows)
            .map(|(n, &r)| self.matrix(n, r, cols))
            .collect::<Result<Vec<_>>>()?;
        let dtype = parts[0].dtype();
        let parts = parts
            .into_iter()
            .map(|p| p.to_dtype(dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let w = Tensor::cat(&parts, 0)?;
        if self.place.host {
            return self.host(w);
        }
        Ok(Linear::Candle(QMatMul::Tensor(
            w.to_dtype(self.place.dtype)?
                .to_device(&self.place.device)?,
        )))
    }

    fn table(&mut self, name: &str, rows: usize, cols: usize) -> Result<Linear> {
        let t = self.matrix(name, rows, cols)?;
        self.host(t)
    }
}

/// `"<s>"` or `{"content": "<s>", ...}` as `tokenizer_config.json` writes special tokens.
fn token_text(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// A template string, or the one named "default" in a list of named templates.
fn chat_template(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

fn ids(v: Option<&Json>) -> Vec<u32> {
    match v {
        Some(Json::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Json::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

fn assets(dir: &Path, cfg: &ModelConfig, root: &Json) -> Result<ModelAssets> {
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path)
        .map_err(|e| RunnerError::invalid(&tok_path, e.to_string()))?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc: Json = if tc_path.exists() {
        json(&tc_path)?
    } else {
        Json::Null
    };
    let eos_token = token_text(tc.get("eos_token"));
    let bos_token = token_text(tc.get("bos_token"));
    let mut stop_token_ids = ids(root.get("eos_token_id"));
    let gen = dir.join("generation_config.json");
    if gen.exists() {
        stop_token_ids.extend(ids(json(&gen)?.get("eos_token_id")));
    }
    if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
        stop_token_ids.push(id);
    }
    stop_token_ids.sort_unstable();
    stop_token_ids.dedup();
    // Whether the tokenizer's own post-processor starts a prompt with BOS.
    let bos_id = bos_token.as_deref().and_then(|t| tokenizer.token_to_id(t));
    let add_bos = bos_id.is_some()
        && tokenizer
            .encode("a", true)
            .map(|e| e.get_ids().first().copied() == bos_id)
            .unwrap_or(false);
    let chat = chat_template(tc.get("chat_template")).or_else(|| {
        let jinja = dir.join("chat_template.jinja");
        std::fs::read_to_string(jinja).ok()
    });
    let files = safetensors_files(dir).unwrap_or_default();
    let (size_bytes, modified) =
        super::disk_facts(&files.iter().map(PathBuf::as_path).collect::<Vec<_>>());
    let dtype = root.get("torch_dtype").or_else(|| root.get("dtype"));
    let quantization = match dtype.and_then(Json::as_str) {
        Some("bfloat16") => "BF16".to_string(),
        Some("float16") => "F16".to_string(),
        Some("float32") => "F32".to_string(),
        Some(other) => other.to_uppercase(),
        None => String::new(),
    };
    Ok(ModelAssets {
        name: model_name(dir, false),
        facts: super::ModelFacts {
            format: "safetensors",
            family: cfg.family,
            parameters: cfg.parameters(),
            quantization,
            size_bytes,
            modified,
        },
        tokenizer,
        chat_template: chat,
        bos_token,
        eos_token,
        add_bos,
        stop_token_ids,
        max_model_len: cfg.max_position_embeddings,
    })
}

pub(crate) fn load_assets(dir: &Path) -> Result<ModelAssets> {
    let root = json(&dir.join("config.json"))?;
    let (cfg, _) = read_config(dir, &root)?;
    assets(dir, &cfg, &root)
}

fn read_config(dir: &Path, root: &Json) -> Result<(ModelConfig, &'static models::Family)> {
    let path = dir.join("config.json");
    let j = root
        .get("text_config")
        .filter(|v| v.is_object())
        .unwrap_or(root);
    let model_type = j
        .get("model_type")
        .or_else(|| root.get("model_type"))
        .and_then(Json::as_str);
    let architectures: Vec<String> = root
        .get("architectures")
        .and_then(Json::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let family = models::by_hf(model_type, &architectures).ok_or_else(|| {
        RunnerError::Unsupported(format!(
            "model_type {:?} / architectures {architectures:?} in {} (supported: {})",
            model_type.unwrap_or("?"),
            path.display(),
            models::known_hf_types()
        ))
    })?;
    Ok((config(&path, root, family)?, family))
}

pub(crate) fn load(dir: &Path, place: &Placement) -> Result<(ModelConfig, Weights, ModelAssets)> {
    let root = json(&dir.join("config.json"))?;
    let (mut cfg, family) = read_config(dir, &root)?;
    let files = safetensors_files(dir)?;
    // SAFETY: the files are mapped read-only and not modified while the model loads.
    let st = unsafe { MmapedSafetensors::multi(&files) }
        .map_err(|e| RunnerError::invalid(dir, e.to_string()))?;
    let prefix = ["model.", "model.language_model.", "language_model.model."]
        .into_iter()
        .find(|p| st.get(&format!("{p}embed_tokens.weight")).is_ok())
        .ok_or_else(|| RunnerError::invalid(dir, "no embed_tokens.weight tensor"))?
        .to_string();
    let mut src = HfSource {
        dir: dir.to_path_buf(),
        st,
        prefix,
        names: family.hf_names,
        place: place.clone(),
    };
    let weights = build(&mut src, &mut cfg, place)?;
    let assets = assets(dir, &cfg, &root)?;
    Ok((cfg, weights, assets))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cfg(j: Json) -> ModelConfig {
        let base = json!({
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5
        });
        let mut merged = base.as_object().unwrap().clone();
        merged.extend(j.as_object().unwrap().clone());
        let root = Json::Object(merged);
        read_config(Path::new("/nonexistent"), &root).unwrap().0
    }

    #[test]
    fn each_family_reads_its_own_keys() {
        let m = cfg(json!({"model_type": "mistral", "sliding_window": 16}));
        assert_eq!(m.family, "mistral");
        assert!(m.layers.iter().all(|l| l.sliding_window == Some(16)));

        let q = cfg(
            json!({"model_type": "qwen2", "use_sliding_window": true, "sliding_window": 32, "max_window_layers": 2}),
        );
        assert!(q.qkv_bias);
        let w: Vec<_> = q.layers.iter().map(|l| l.sliding_window).collect();
        assert_eq!(w, vec![None, None, Some(32), Some(32)]);
        let q = cfg(json!({"model_type": "qwen2", "sliding_window": 32}));
        assert!(q.layers.iter().all(|l| l.sliding_window.is_none()));

        let q3 = cfg(json!({"model_type": "qwen3", "head_dim": 32}));
        assert!(q3.qk_norm && q3.head_dim == 32 && q3.q_dim() == 128);

        let g = cfg(
            json!({"model_type": "gemma3_text", "sliding_window": 8, "head_dim": 16,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            "query_pre_attn_scalar": 64, "rope_theta": 1e6, "rope_local_base_freq": 1e4}),
        );
        assert_eq!(g.norm_weight_offset, 1.0);
        assert_eq!(g.activation, Activation::GeluTanh);
        assert!(g.post_norms && g.qk_norm && g.embed_scale == 8.0);
        assert_eq!(g.attn_scale, 0.125);
        let w: Vec<_> = g
            .layers
            .iter()
            .map(|l| (l.sliding_window, l.rope))
            .collect();
        assert_eq!(w, vec![(Some(8), 1), (None, 0), (Some(8), 1), (None, 0)]);
        assert_eq!((g.ropes[0].base, g.ropes[1].base), (1e6, 1e4));

        let g2 = cfg(
            json!({"model_type": "gemma2", "sliding_window": 16, "head_dim": 16,
            "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": null, "hidden_activation": "gelu_pytorch_tanh"}),
        );
        assert_eq!(g2.family, "gemma2");
        assert!(g2.post_norms && !g2.qk_norm && g2.norm_weight_offset == 1.0);
        assert_eq!(g2.activation, Activation::GeluTanh);
        assert_eq!(g2.attn_scale, 1.0 / 16.0);
        assert_eq!(
            (g2.attn_logit_softcap, g2.final_logit_softcap),
            (Some(50.0), None)
        );
        let w: Vec<_> = g2
            .layers
            .iter()
            .map(|l| (l.sliding_window, l.rope))
            .collect();
        assert_eq!(w, vec![(Some(16), 0), (None, 0), (Some(16), 0), (None, 0)]);
        assert_eq!(
            g2.ropes.len(),
            1,
            "one RoPE base for local and global layers"
        );
        // Gemma2Config's defaults where the file says nothing; a null window is none.
        let g2 = cfg(json!({"model_type": "gemma2", "sliding_window": null}));
        assert_eq!(
            (g2.attn_logit_softcap, g2.final_logit_softcap),
            (Some(50.0), Some(30.0))
        );
        assert!(g2.layers.iter().all(|l| l.sliding_window.is_none()));
        let g2 = cfg(json!({"architectures": ["Gemma2ForCausalLM"]}));
        assert_eq!(g2.layers[0].sliding_window, Some(4096));
        let bad = json!({"model_type": "gemma2", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10,
            "max_position_embeddings": 64, "attn_logit_softcapping": 0.0});
        let err = read_config(Path::new("/x"), &bad)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("attention logit soft-cap 0"), "{err}");

        let p = cfg(json!({"model_type": "phi3", "partial_rotary_factor": 0.75,
            "original_max_position_embeddings": 1024,
            "rope_scaling": {"type": "longrope", "long_factor": vec![2.0; 6], "short_factor": vec![1.0; 6]}}));
        assert_eq!(p.ropes[0].dims, 12);
        assert_eq!(p.ropes[0].freq_factors.as_deref(), Some(&[2.0f32; 6][..]));
        assert!((p.ropes[0].attn_factor - (1.0 + 4f32.ln() / 1024f32.ln()).sqrt()).abs() < 1e-6);
    }

    #[test]
    fn rope_scaling_kinds() {
        let l = cfg(
            json!({"model_type": "llama", "rope_theta": 500000.0, "rope_scaling":
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}}),
        );
        let f = l.ropes[0].freq_factors.as_ref().unwrap();
        assert_eq!((f[0], f[f.len() - 1]), (1.0, 8.0));
        let y = cfg(
            json!({"model_type": "qwen2", "rope_scaling": {"type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": 1024}}),
        );
        assert!(
            matches!(y.ropes[0].scaling, RopeScaling::Yarn { factor, original_context: 1024, .. } if factor == 4.0)
        );
        let root = json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10,
            "max_position_embeddings": 64, "rope_scaling": {"type": "dynamic", "factor": 2.0}});
        let err = read_config(Path::new("/x"), &root)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("dynamic"), "{err}");
        let root = json!({"model_type": "mamba"});
        let err = read_config(Path::new("/x"), &root)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("mamba") && err.contains("qwen2"), "{err}");
    }
}
