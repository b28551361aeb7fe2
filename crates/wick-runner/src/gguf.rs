//! Loading a Llama-architecture GGUF file (the default model is one).
//!
//! Weight format ([`WeightFormat`]): by default the linear layers keep the file's own weights,
//! fused (QKV, gate+up) by stacking their blocks; on the CPU, Q4_1 and Q8_0 run on Wick's
//! packed VNNI kernels ([`Linear::packed`]). `q8_0` re-quantizes every matrix to Q8_0 for
//! candle's kernels and `f32` dequantizes (both for comparison; see `benches/runner_step.rs`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Tensor};

use crate::linear::Linear;
use crate::model::{Layer, Weights};
use crate::runner::ModelAssets;
use crate::{tokenizer_from_gguf, LlamaConfig, Result, RopeStyle, RunnerError, WeightFormat};

/// Control tokens that end a turn in common chat templates, beside `eos_token_id`.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<|endoftext|>",
    "</s>",
];

struct Reader<'a> {
    path: &'a Path,
    file: File,
    content: Content,
    device: Device,
    format: WeightFormat,
}

impl Reader<'_> {
    fn md(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| RunnerError::invalid(self.path, format!("missing metadata {key}")))
    }

    fn md_u32(&self, key: &str) -> Result<usize> {
        let v = self.md(key)?;
        v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .map_err(|e| RunnerError::invalid(self.path, format!("{key}: {e}")))
    }

    fn md_f32(&self, key: &str) -> Result<f32> {
        self.md(key)?
            .to_f32()
            .map_err(|e| RunnerError::invalid(self.path, format!("{key}: {e}")))
    }

    fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        self.content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| RunnerError::invalid(self.path, format!("tensor {name}: {e}")))
    }

    fn vector(&mut self, name: &str) -> Result<Tensor> {
        let device = self.device.clone();
        Ok(self.qtensor(name)?.dequantize(&device)?)
    }

    /// The named matrices stacked by rows (fused), as one matmul in `self.format`.
    fn linear(&mut self, names: &[&str]) -> Result<Linear> {
        let parts: Vec<QTensor> = names
            .iter()
            .map(|n| self.qtensor(n))
            .collect::<Result<_>>()?;
        let dtype = parts[0].dtype();
        let same_dtype = parts.iter().all(|p| p.dtype() == dtype);
        let k = parts[0].shape().dims().last().copied().unwrap_or(0);
        let format = match self.format {
            WeightFormat::Q8_0 if dtype == GgmlDType::Q8_0 && same_dtype => WeightFormat::Native,
            WeightFormat::Q8_0 if k % GgmlDType::Q8_0.block_size() != 0 => WeightFormat::F32,
            f => f,
        };
        if format == WeightFormat::Native && same_dtype {
            if matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q8_0) && self.device.is_cpu() {
                return Linear::packed(&stack_rows(&parts, &Device::Cpu)?);
            }
            let stacked = stack_rows(&parts, &self.device)?;
            return Ok(Linear::Plain(QMatMul::from_qtensor(stacked)?));
        }
        let dense: Vec<Tensor> = parts
            .iter()
            .map(|q| q.dequantize(&Device::Cpu))
            .collect::<candle_core::Result<_>>()?;
        let w = Tensor::cat(&dense, 0)?;
        Ok(Linear::Plain(match format {
            WeightFormat::Q8_0 => {
                QMatMul::from_qtensor(QTensor::quantize_onto(&w, GgmlDType::Q8_0, &self.device)?)?
            }
            _ => QMatMul::Tensor(w.to_device(&self.device)?),
        }))
    }
}

/// Quantized matrices of one type stacked by rows, without converting: each row is a
/// whole number of blocks, so the stack is the concatenation of their bytes.
fn stack_rows(parts: &[QTensor], device: &Device) -> Result<QTensor> {
    let dtype = parts[0].dtype();
    let k = parts[0].shape().dims()[1];
    let mut rows = 0;
    let mut bytes = Vec::new();
    for p in parts {
        let (n, pk) = p.shape().dims2()?;
        if pk != k {
            return Err(RunnerError::Step(format!(
                "cannot stack widths {k} and {pk}"
            )));
        }
        rows += n;
        bytes.extend_from_slice(&p.data()?);
    }
    let storage = QStorage::from_data(Cow::Owned(bytes), device, dtype)?;
    Ok(QTensor::new(storage, (rows, k))?)
}

fn config(r: &Reader) -> Result<LlamaConfig> {
    let arch = r
        .md("general.architecture")?
        .to_string()
        .cloned()
        .unwrap_or_default();
    if arch != "llama" {
        return Err(RunnerError::Unsupported(format!(
            "GGUF architecture {arch:?} (only \"llama\" is supported)"
        )));
    }
    let hidden_size = r.md_u32("llama.embedding_length")?;
    let num_heads = r.md_u32("llama.attention.head_count")?;
    let head_dim = hidden_size / num_heads.max(1);
    if let Ok(rope_dim) = r.md_u32("llama.rope.dimension_count") {
        if rope_dim != head_dim {
            return Err(RunnerError::Unsupported(format!(
                "partial rotary embeddings ({rope_dim} of {head_dim} dimensions)"
            )));
        }
    }
    let vocab_size = r
        .md("tokenizer.ggml.tokens")?
        .to_vec()
        .map(|v| v.len())
        .unwrap_or(0);
    let cfg = LlamaConfig {
        hidden_size,
        intermediate_size: r.md_u32("llama.feed_forward_length")?,
        num_layers: r.md_u32("llama.block_count")?,
        num_heads,
        num_kv_heads: r
            .md_u32("llama.attention.head_count_kv")
            .unwrap_or(num_heads),
        head_dim,
        vocab_size,
        rms_norm_eps: r.md_f32("llama.attention.layer_norm_rms_epsilon")? as f64,
        rope_theta: r.md_f32("llama.rope.freq_base").unwrap_or(10_000.0),
        rope_style: RopeStyle::Interleaved,
        max_position_embeddings: r.md_u32("llama.context_length")?,
    };
    cfg.validate()
        .map_err(|m| RunnerError::invalid(r.path, m))?;
    Ok(cfg)
}

fn weights(r: &mut Reader, cfg: &LlamaConfig) -> Result<Weights> {
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = |n: &str| format!("blk.{i}.{n}.weight");
        layers.push(Layer {
            attn_norm: r.vector(&p("attn_norm"))?,
            qkv: r.linear(&[&p("attn_q"), &p("attn_k"), &p("attn_v")])?,
            o: r.linear(&[&p("attn_output")])?,
            ffn_norm: r.vector(&p("ffn_norm"))?,
            gate_up: r.linear(&[&p("ffn_gate"), &p("ffn_up")])?,
            down: r.linear(&[&p("ffn_down")])?,
        });
    }
    let device = r.device.clone();
    let embed = r.qtensor("token_embd.weight")?.dequantize(&device)?;
    let tied = !r.content.tensor_infos.contains_key("output.weight");
    let lm_head = r.linear(&[if tied {
        "token_embd.weight"
    } else {
        "output.weight"
    }])?;
    Ok(Weights {
        embed,
        layers,
        norm: r.vector("output_norm.weight")?,
        lm_head,
    })
}

fn token_name(md: &HashMap<String, Value>, key: &str) -> Option<(u32, String)> {
    let id = md.get(key)?.to_u32().ok()?;
    let tokens = md.get("tokenizer.ggml.tokens")?.to_vec().ok()?;
    Some((id, tokens.get(id as usize)?.to_string().ok()?.clone()))
}

fn assets(path: &Path, md: &HashMap<String, Value>, cfg: &LlamaConfig) -> Result<ModelAssets> {
    let tokenizer = tokenizer_from_gguf(md)?;
    let eos = token_name(md, "tokenizer.ggml.eos_token_id");
    let mut stop_token_ids: Vec<u32> = eos.iter().map(|(id, _)| *id).collect();
    if let Some((id, _)) = token_name(md, "tokenizer.ggml.eot_token_id") {
        stop_token_ids.push(id);
    }
    for name in END_OF_TURN {
        if let Some(id) = tokenizer.token_to_id(name) {
            stop_token_ids.push(id);
        }
    }
    stop_token_ids.sort_unstable();
    stop_token_ids.dedup();
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    Ok(ModelAssets {
        name,
        tokenizer,
        chat_template: md
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned(),
        bos_token: token_name(md, "tokenizer.ggml.bos_token_id").map(|(_, t)| t),
        eos_token: eos.map(|(_, t)| t),
        stop_token_ids,
        max_model_len: cfg.max_position_embeddings,
    })
}

pub(crate) fn load(
    path: &Path,
    device: &Device,
    format: WeightFormat,
) -> Result<(LlamaConfig, Weights, ModelAssets)> {
    let mut file = File::open(path).map_err(|source| RunnerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let content = Content::read(&mut file)
        .map_err(|e| RunnerError::invalid(path, format!("not a GGUF file: {e}")))?;
    let mut r = Reader {
        path,
        file,
        content,
        device: device.clone(),
        format,
    };
    let cfg = config(&r)?;
    let w = weights(&mut r, &cfg)?;
    let assets = assets(path, &r.content.metadata, &cfg)?;
    Ok((cfg, w, assets))
}
