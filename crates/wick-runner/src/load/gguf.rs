//! A GGUF file as a [`Source`]: llama.cpp's tensor names, its hyper-parameter keys under the
//! architecture's prefix, and the tokenizer and chat template in the metadata.
//!
//! Linear layers keep the file's blocks ([`WeightFormat::Native`]): repacked for the packed
//! kernels on the host (every common type but Q2_K), other types as stored. Matrices fused into one projection
//! (Q/K/V, gate/up) are stacked by rows when their types agree, and computed side by side
//! when they do not.

use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::build::{build, Part, Source};
use super::{model_name, ModelAssets, Placement, WeightFormat};
use crate::config::{ModelConfig, RopeScaling, RopeSpec};
use crate::gguf::GgufFile;
use crate::linear::{HalfMatrix, Linear};
use crate::model::Weights;
use crate::qgemm::Packed;
use crate::quant::WeightType;
use crate::{models, tokenizer, Result, RunnerError};

/// Control tokens that end a turn in common chat templates, beside `eos_token_id` (as
/// llama.cpp's end-of-generation set has them).
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<EOT>",
    "<end_of_utterance>",
    "</s>",
];

struct GgufSource {
    g: GgufFile,
    place: Placement,
}

impl GgufSource {
    fn bad(&self, m: String) -> RunnerError {
        RunnerError::invalid(self.g.path(), m)
    }

    /// The bytes of a `[rows, cols]` tensor, its shape checked.
    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<(WeightType, Vec<u8>)> {
        let info = self.g.info(name)?;
        if info.dims != [cols, rows] {
            return Err(self.bad(format!(
                "tensor {name} is {:?} (ggml order), expected [{cols}, {rows}]",
                info.dims
            )));
        }
        let ty = info.ty;
        Ok((ty, self.g.read(name)?))
    }

    /// One host matrix of `ty` in the format the host computes it in.
    fn host_linear(&self, ty: WeightType, bytes: Vec<u8>, n: usize, k: usize) -> Result<Linear> {
        match (self.place.format, ty) {
            (WeightFormat::Native, ty) if Packed::supports(ty) => Linear::packed(ty, &bytes, n, k),
            (WeightFormat::Native, WeightType::F16 | WeightType::BF16) => {
                Ok(Linear::Half(HalfMatrix::new(ty, &bytes, n, k)?))
            }
            (WeightFormat::Native, _) => Linear::candle(ty, &bytes, n, k, &Device::Cpu),
            (WeightFormat::Q8_0, _) if k.is_multiple_of(32) => {
                let q = QTensor::quantize(&dense(ty, &bytes, n, k)?, GgmlDType::Q8_0)?;
                Linear::packed(WeightType::Q8_0, &q.data()?, n, k)
            }
            (_, _) => Ok(Linear::Candle(candle_core::quantized::QMatMul::Tensor(
                dense(ty, &bytes, n, k)?,
            ))),
        }
    }
}

fn dense(ty: WeightType, bytes: &[u8], n: usize, k: usize) -> Result<Tensor> {
    let mut w = vec![0f32; n * k];
    ty.dequantize(bytes, &mut w);
    Ok(Tensor::from_vec(w, (n, k), &Device::Cpu)?)
}

impl Source for GgufSource {
    fn name(&self, layer: usize, part: Part) -> String {
        let n = match part {
            Part::AttnNorm => "attn_norm.weight",
            Part::Q => "attn_q.weight",
            Part::K => "attn_k.weight",
            Part::V => "attn_v.weight",
            Part::Qkv => "attn_qkv.weight",
            Part::QBias => "attn_q.bias",
            Part::KBias => "attn_k.bias",
            Part::VBias => "attn_v.bias",
            Part::QkvBias => "attn_qkv.bias",
            Part::QNorm => "attn_q_norm.weight",
            Part::KNorm => "attn_k_norm.weight",
            Part::O => "attn_output.weight",
            Part::OBias => "attn_output.bias",
            Part::PostAttnNorm => "post_attention_norm.weight",
            Part::FfnNorm => "ffn_norm.weight",
            Part::Gate => "ffn_gate.weight",
            Part::Up | Part::GateUp => "ffn_up.weight",
            Part::Down => "ffn_down.weight",
            Part::DownBias => "ffn_down.bias",
            Part::PostFfnNorm => "post_ffw_norm.weight",
        };
        format!("blk.{layer}.{n}")
    }

    fn embed_name(&self) -> String {
        "token_embd.weight".into()
    }

    fn output_name(&self) -> String {
        "output.weight".into()
    }

    fn output_norm_name(&self) -> String {
        "output_norm.weight".into()
    }

    fn has(&self, name: &str) -> bool {
        self.g.has_tensor(name)
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.g.vector(name, len)
    }

    fn linear(&mut self, names: &[String], rows: &[usize], cols: usize) -> Result<Linear> {
        // Runs of adjacent parts of one type are stacked by rows (each row is a whole number
        // of blocks, so the stack is the concatenation of their bytes); runs of different
        // types are computed side by side.
        let mut runs: Vec<(WeightType, Vec<u8>, usize)> = Vec::with_capacity(names.len());
        for (name, &n) in names.iter().zip(rows) {
            let (ty, bytes) = self.matrix(name, n, cols)?;
            match runs.last_mut() {
                Some((t, b, r)) if *t == ty => {
                    b.extend_from_slice(&bytes);
                    *r += n;
                }
                _ => runs.push((ty, bytes, n)),
            }
        }
        let mut out = Vec::with_capacity(runs.len());
        for (ty, bytes, n) in runs {
            out.push(if self.place.host {
                self.host_linear(ty, bytes, n, cols)?
            } else {
                Linear::candle(ty, &bytes, n, cols, &self.place.device)?
            });
        }
        Ok(if out.len() == 1 {
            out.remove(0)
        } else {
            Linear::Concat(out)
        })
    }

    fn table(&mut self, name: &str, rows: usize, cols: usize) -> Result<Linear> {
        let (ty, bytes) = self.matrix(name, rows, cols)?;
        match ty {
            WeightType::F16 | WeightType::BF16 => {
                Ok(Linear::Half(HalfMatrix::new(ty, &bytes, rows, cols)?))
            }
            _ => Linear::candle(ty, &bytes, rows, cols, &Device::Cpu),
        }
    }
}

/// The common reading of a GGUF file's hyper-parameters, before the family's own.
fn config(g: &mut GgufFile, family: &'static models::Family, arch: &str) -> Result<ModelConfig> {
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = g.usize(&k("embedding_length"))?;
    let heads = g.usize(&k("attention.head_count"))?;
    let head_dim = match g.opt_usize(&k("attention.key_length"))? {
        Some(d) => d,
        None if heads > 0 && hidden.is_multiple_of(heads) => hidden / heads,
        None => {
            return Err(RunnerError::invalid(
                g.path(),
                format!(
                    "metadata {arch}.embedding_length {hidden} is not a multiple of \
                     {arch}.attention.head_count {heads} (and no key_length is given)"
                ),
            ))
        }
    };
    if let Some(v) = g.opt_usize(&k("attention.value_length"))? {
        if v != head_dim {
            return Err(RunnerError::Unsupported(format!(
                "value heads of {v} and key heads of {head_dim}"
            )));
        }
    }
    let layers = g.usize(&k("block_count"))?;
    // Against what the file holds, before anything is built per layer: blocks are numbered
    // from 0, so the count is one past the highest `blk.N` present.
    let blocks_present = g
        .order
        .iter()
        .filter_map(|name| {
            name.strip_prefix("blk.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |n| n + 1);
    if layers > blocks_present {
        return Err(RunnerError::invalid(
            g.path(),
            format!(
                "metadata {arch}.block_count is {layers} but the file holds tensors of {blocks_present} blocks (blk.N)"
            ),
        ));
    }
    let ctx = g.usize(&k("context_length"))?;
    let embed = g.info("token_embd.weight")?;
    let vocab = *embed
        .dims
        .get(1)
        .ok_or_else(|| RunnerError::invalid(g.path(), "token_embd.weight is not a matrix"))?;
    let rope = RopeSpec {
        style: family.gguf_rope,
        dims: g.opt_usize(&k("rope.dimension_count"))?.unwrap_or(head_dim),
        base: g.opt_f32(&k("rope.freq_base"))?.unwrap_or(10_000.0),
        freq_factors: None,
        scaling: rope_scaling(g, arch, ctx)?,
        attn_factor: g.opt_f32(&k("rope.scaling.attn_factor"))?.unwrap_or(1.0),
    };
    let mut rope = rope;
    if g.has_tensor("rope_freqs.weight") {
        rope.freq_factors = Some(g.vector("rope_freqs.weight", rope.dims / 2)?);
    }
    let window = g
        .opt_usize(&k("attention.sliding_window"))?
        .filter(|w| *w > 0);
    let mut cfg = ModelConfig {
        hidden_size: hidden,
        intermediate_size: g.usize(&k("feed_forward_length"))?,
        num_heads: heads,
        num_kv_heads: g.opt_usize(&k("attention.head_count_kv"))?.unwrap_or(heads),
        vocab_size: vocab,
        max_position_embeddings: ctx,
        norm_eps: g
            .opt_f32(&k("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| {
                RunnerError::invalid(
                    g.path(),
                    format!("missing metadata {arch}.attention.layer_norm_rms_epsilon"),
                )
            })?,
        ..ModelConfig::plain(family.name, layers, head_dim, rope)
            .map_err(|m| RunnerError::invalid(g.path(), m))?
    };
    for l in &mut cfg.layers {
        l.sliding_window = window;
    }
    Ok(cfg)
}

fn rope_scaling(g: &GgufFile, arch: &str, ctx: usize) -> Result<RopeScaling> {
    let k = |s: &str| format!("{arch}.{s}");
    let kind = g
        .opt_str(&k("rope.scaling.type"))?
        .unwrap_or("linear")
        .to_string();
    let factor = match g.opt_f32(&k("rope.scaling.factor"))? {
        Some(f) => f,
        None => g.opt_f32(&k("rope.scale_linear"))?.unwrap_or(0.0),
    };
    if g.opt_f32(&k("rope.scaling.yarn_log_multiplier"))?
        .is_some_and(|m| m != 0.0)
    {
        return Err(RunnerError::Unsupported(
            "YaRN with a log multiplier".into(),
        ));
    }
    Ok(match kind.as_str() {
        "none" => RopeScaling::None,
        "linear" if factor == 0.0 || factor == 1.0 => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor },
        "yarn" => RopeScaling::Yarn {
            factor: if factor == 0.0 { 1.0 } else { factor },
            original_context: g
                .opt_usize(&k("rope.scaling.original_context_length"))?
                .unwrap_or(ctx),
            beta_fast: g.opt_f32(&k("rope.scaling.yarn_beta_fast"))?.unwrap_or(32.0),
            beta_slow: g.opt_f32(&k("rope.scaling.yarn_beta_slow"))?.unwrap_or(1.0),
        },
        // Frequency factors in tensors, read by the family.
        "longrope" => RopeScaling::None,
        other => {
            return Err(RunnerError::Unsupported(format!(
                "RoPE scaling {other:?} (supported: linear, yarn, longrope, and Llama 3's frequency factors)"
            )))
        }
    })
}

/// A token id from the metadata, checked against the vocabulary's size.
fn token_id(g: &GgufFile, key: &str, vocab: usize) -> Result<Option<u32>> {
    match g.opt_usize(key)? {
        Some(id) if id >= vocab => Err(RunnerError::invalid(
            g.path(),
            format!("metadata {key} is {id}, past the vocabulary of {vocab} tokens"),
        )),
        id => Ok(id.map(|v| v as u32)),
    }
}

fn assets(path: &Path, g: &GgufFile, cfg: &ModelConfig) -> Result<ModelAssets> {
    let tok = tokenizer::from_gguf(&g.metadata)?;
    let name_of = |id: Option<u32>| id.and_then(|i| tok.tokenizer.id_to_token(i));
    let vocab = tok.tokenizer.get_vocab_size(true);
    let eos = token_id(g, "tokenizer.ggml.eos_token_id", vocab)?;
    let mut stop_token_ids: Vec<u32> = eos.into_iter().collect();
    stop_token_ids.extend(token_id(g, "tokenizer.ggml.eot_token_id", vocab)?);
    stop_token_ids.extend(token_id(g, "tokenizer.ggml.eom_token_id", vocab)?);
    for name in END_OF_TURN {
        if let Some(id) = tok.tokenizer.token_to_id(name) {
            stop_token_ids.push(id);
        }
    }
    stop_token_ids.sort_unstable();
    stop_token_ids.dedup();
    let bos = token_id(g, "tokenizer.ggml.bos_token_id", vocab)?;
    let (size_bytes, modified) = super::disk_facts(&[path]);
    let quantization = match g.opt_usize("general.file_type") {
        Ok(Some(t)) => super::file_type_name(t).map_or_else(|| format!("type {t}"), str::to_string),
        _ => String::new(),
    };
    Ok(ModelAssets {
        name: model_name(path, true),
        facts: super::ModelFacts {
            format: "gguf",
            family: cfg.family,
            // Every tensor's elements, norms included, as llama.cpp and Ollama count them.
            parameters: g
                .tensors
                .values()
                .map(|t| t.dims.iter().product::<usize>() as u64)
                .sum(),
            quantization,
            size_bytes,
            modified,
        },
        chat_template: g.opt_str("tokenizer.chat_template")?.map(str::to_string),
        bos_token: name_of(bos),
        eos_token: name_of(eos),
        add_bos: tok.add_bos,
        tokenizer: tok.tokenizer,
        stop_token_ids,
        max_model_len: cfg.max_position_embeddings,
    })
}

pub(crate) fn load_assets(path: &Path) -> Result<ModelAssets> {
    let mut g = GgufFile::open(path)?;
    let (cfg, _) = read_config(&mut g, path)?;
    assets(path, &g, &cfg)
}

/// The file's family and its config.
fn read_config(g: &mut GgufFile, path: &Path) -> Result<(ModelConfig, &'static models::Family)> {
    let arch = g
        .opt_str("general.architecture")?
        .ok_or_else(|| RunnerError::invalid(path, "missing metadata general.architecture"))?
        .to_string();
    let family = models::by_gguf_arch(&arch).ok_or_else(|| {
        RunnerError::Unsupported(format!(
            "GGUF architecture {arch:?} (supported: {})",
            models::known_gguf_archs()
        ))
    })?;
    let mut cfg = config(g, family, &arch)?;
    (family.gguf)(g, &arch, &mut cfg)?;
    cfg.validate().map_err(|m| RunnerError::invalid(path, m))?;
    Ok((cfg, family))
}

pub(crate) fn load(path: &Path, place: &Placement) -> Result<(ModelConfig, Weights, ModelAssets)> {
    let mut g = GgufFile::open(path)?;
    let (mut cfg, _) = read_config(&mut g, path)?;
    let assets = assets(path, &g, &cfg)?;
    let mut src = GgufSource {
        g,
        place: place.clone(),
    };
    let weights = build(&mut src, &mut cfg, place)?;
    Ok((cfg, weights, assets))
}
