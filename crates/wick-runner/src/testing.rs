//! Tiny random models of every family, for tests against llama.cpp: deterministic weights
//! (a fixed-seed generator, so a regenerated file has the bytes its reference was made
//! from), the tokenizer of a real GGUF, and each family's particulars (sliding windows,
//! RoPE scaling, fused matrices, norms). Each is written as a GGUF file and as a Hugging Face
//! directory holding the same weights (dequantized to f32), its "twin".

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use half::{bf16, f16};
use serde_json::json;

use crate::gguf::{GgufWriter, Value};
use crate::quant::WeightType;
use crate::{Result, RunnerError};

/// How positions are encoded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TinyRope {
    Plain,
    /// Llama 3's frequency factors (factor 8, original context 64).
    Llama3,
    Linear(f32),
    /// YaRN with this factor over an original context of 64.
    Yarn(f32),
    /// Phi-3's LongRoPE, long factors (original context 64 < 4,096).
    LongRope,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TinyFamily {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    /// Gemma 2's soft-caps are [`GEMMA2_CAPS`].
    Gemma2,
    Gemma3,
    Phi3,
}

/// The tiny Gemma 2's attention and final soft-caps, chosen against llama.cpp on this file:
/// small enough to change its scores (which reach about +-5) and its logits (which reach
/// 100), so that a missing cap is seen, and large enough to keep the greedy paths stable
/// (llama.cpp's stable steps: 24, 24, 24, 6). Gemma 2's own 50 would leave these tiny
/// scores as they are, and a final cap of 15 flattens every step into near-ties.
pub const GEMMA2_CAPS: (f32, f32) = (2.0, 50.0);

/// One tiny model.
#[derive(Debug, Clone)]
pub struct Tiny {
    pub name: &'static str,
    pub family: TinyFamily,
    /// Type of the layers' matrices.
    pub ty: WeightType,
    /// Type of the embedding table (and of the output layer when tied).
    pub embed_ty: WeightType,
    pub tied: bool,
    pub rope: TinyRope,
    pub window: Option<usize>,
    /// Rotated dimensions of a head, when not all.
    pub rope_dims: Option<usize>,
    pub heads: usize,
}

pub const HIDDEN: usize = 256;
pub const INTER: usize = 512;
pub const LAYERS: usize = 3;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = 64;
pub const CONTEXT: usize = 4096;
const ORIGINAL_CONTEXT: usize = 64;
const EMBED_SCALE: f32 = 0.05;
const OUT_NORM: f32 = 20.0;

/// A tiny Llama in f32, untied: the source llama.cpp's `llama-quantize` turns into a K-quant
/// mix (Q4_K_M) for the GPU check, so that file's layout is llama.cpp's own.
pub fn kquant_source() -> Tiny {
    Tiny {
        name: "kquant-source",
        family: TinyFamily::Llama,
        ty: WeightType::F32,
        embed_ty: WeightType::F32,
        tied: false,
        rope: TinyRope::Llama3,
        window: None,
        rope_dims: None,
        heads: 4,
    }
}

/// The tiny models, one per family and feature, covering every weight type between them.
pub fn tiny_models() -> Vec<Tiny> {
    let t = |name, family, ty, embed_ty, tied, rope| Tiny {
        name,
        family,
        ty,
        embed_ty,
        tied,
        rope,
        window: None,
        rope_dims: None,
        heads: 4,
    };
    vec![
        t(
            "llama3-q4_0",
            TinyFamily::Llama,
            WeightType::Q4_0,
            WeightType::Q8_0,
            true,
            TinyRope::Llama3,
        ),
        t(
            "llama-linear-bf16",
            TinyFamily::Llama,
            WeightType::BF16,
            WeightType::Q4_1,
            false,
            TinyRope::Linear(2.0),
        ),
        t(
            "mistral-q5_1",
            TinyFamily::Mistral,
            WeightType::Q5_1,
            WeightType::Q6K,
            false,
            TinyRope::Plain,
        ),
        t(
            "qwen2-yarn-q2_k",
            TinyFamily::Qwen2,
            WeightType::Q2K,
            WeightType::Q5_0,
            true,
            TinyRope::Yarn(4.0),
        ),
        Tiny {
            heads: 8,
            ..t(
                "qwen3-q3_k",
                TinyFamily::Qwen3,
                WeightType::Q3K,
                WeightType::Q4K,
                true,
                TinyRope::Plain,
            )
        },
        Tiny {
            window: Some(8),
            ..t(
                "gemma3-q5_k",
                TinyFamily::Gemma3,
                WeightType::Q5K,
                WeightType::Q8_0,
                true,
                TinyRope::Plain,
            )
        },
        Tiny {
            window: Some(8),
            ..t(
                "gemma2-q4_k",
                TinyFamily::Gemma2,
                WeightType::Q4K,
                WeightType::Q6K,
                true,
                TinyRope::Plain,
            )
        },
        Tiny {
            rope_dims: Some(48),
            ..t(
                "phi3-f16",
                TinyFamily::Phi3,
                WeightType::F16,
                WeightType::F16,
                true,
                TinyRope::LongRope,
            )
        },
    ]
}

/// Deterministic uniform numbers in `[-scale, scale)`.
struct Lcg(u64);

impl Lcg {
    fn uniform(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    fn norm(&mut self, n: usize) -> Vec<f32> {
        self.uniform(n, 0.1).into_iter().map(|v| 1.0 + v).collect()
    }
}

/// A matrix `[rows, cols]`: its encoding in `ty` and the values that encoding holds.
struct Matrix {
    rows: usize,
    ty: WeightType,
    bytes: Vec<u8>,
    values: Vec<f32>,
}

fn encode(values: Vec<f32>, rows: usize, cols: usize, ty: WeightType) -> Result<Matrix> {
    let bytes: Vec<u8> = match ty {
        WeightType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        WeightType::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        WeightType::BF16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => {
            let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu)?;
            QTensor::quantize(&t, ty.candle())?.data()?.to_vec()
        }
    };
    let mut back = vec![0f32; rows * cols];
    ty.dequantize(&bytes, &mut back);
    Ok(Matrix {
        rows,
        ty,
        bytes,
        values: back,
    })
}

/// llama.cpp's converter permutes Llama's Q and K rows so that rotary pairs are adjacent.
fn permute_rows(m: &Matrix, heads: usize) -> Vec<u8> {
    let row_bytes = m.bytes.len() / m.rows;
    let hd = m.rows / heads;
    let mut out = Vec::with_capacity(m.bytes.len());
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let r = h * hd + j * (hd / 2) + i;
                out.extend_from_slice(&m.bytes[r * row_bytes..(r + 1) * row_bytes]);
            }
        }
    }
    out
}

fn arch(f: TinyFamily) -> &'static str {
    match f {
        TinyFamily::Llama | TinyFamily::Mistral => "llama",
        TinyFamily::Qwen2 => "qwen2",
        TinyFamily::Qwen3 => "qwen3",
        TinyFamily::Gemma2 => "gemma2",
        TinyFamily::Gemma3 => "gemma3",
        TinyFamily::Phi3 => "phi3",
    }
}

/// Llama 3's frequency divisors, computed here independently of the loader's.
fn llama3_factors(base: f64, dims: usize) -> Vec<f32> {
    let (factor, low, high, old) = (8.0f64, 1.0f64, 4.0f64, ORIGINAL_CONTEXT as f64);
    (0..dims / 2)
        .map(|i| {
            let wavelen = 2.0 * std::f64::consts::PI * base.powf(2.0 * i as f64 / dims as f64);
            if wavelen < old / high {
                1.0
            } else if wavelen > old / low {
                factor as f32
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

fn longrope_factors(dims: usize, long: bool) -> Vec<f32> {
    (0..dims / 2)
        .map(|i| {
            let x = i as f32 / (dims / 2) as f32;
            if long {
                1.0 + 7.0 * x * x
            } else {
                1.0 + 0.25 * x
            }
        })
        .collect()
}

/// Ids whose text alone is not whole UTF-8 (byte pieces of a longer character).
fn partial_utf8_tokens(src: &crate::gguf::GgufFile, vocab: usize) -> Result<Vec<usize>> {
    let tok = crate::tokenizer::from_gguf(&src.metadata)?.tokenizer;
    Ok((0..vocab)
        .filter(|&id| {
            tok.decode(&[id as u32], false)
                .map(|s| s.contains('\u{FFFD}'))
                .unwrap_or(true)
        })
        .collect())
}

fn rope_base(t: &Tiny) -> f32 {
    match t.family {
        TinyFamily::Llama if t.rope == TinyRope::Llama3 => 500_000.0,
        TinyFamily::Gemma3 | TinyFamily::Qwen2 | TinyFamily::Qwen3 => 1_000_000.0,
        _ => 10_000.0,
    }
}

/// Writes `t` as `dir/NAME.gguf` and the directory `dir/NAME-hf`, with the tokenizer of the
/// GGUF file `tokenizer_from` (its `tokenizer.*` metadata, copied).
pub fn write_tiny(t: &Tiny, tokenizer_from: &Path, dir: &Path) -> Result<()> {
    let src = crate::gguf::GgufFile::open(tokenizer_from)?;
    let tok_md: Vec<(String, Value)> = {
        let mut v: Vec<_> = src
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let vocab = src
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .map(<[Value]>::len)
        .ok_or_else(|| RunnerError::Step("the tokenizer source has no tokens".into()))?;
    let mut rng = Lcg(0x5eed ^ (t.name.len() as u64 * 7919));
    let (h, q_dim, kv_dim) = (HIDDEN, t.heads * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let rot = t.rope_dims.unwrap_or(HEAD_DIM);
    let a = arch(t.family);
    let gemma = matches!(t.family, TinyFamily::Gemma2 | TinyFamily::Gemma3);
    let phi = t.family == TinyFamily::Phi3;

    let mut g = GgufWriter::new();
    let mut st: HashMap<String, Tensor> = HashMap::new();
    let mut put_hf = |name: String, values: &[f32], dims: &[usize]| -> Result<()> {
        st.insert(name, Tensor::from_slice(values, dims, &Device::Cpu)?);
        Ok(())
    };
    g.meta("general.architecture", Value::String(a.into()));
    // llama.cpp adjusts some vocabularies by the model's name: keep it neutral.
    g.meta("general.name", Value::String("wick tiny test model".into()));
    let k = |s: &str| format!("{a}.{s}");
    g.meta(&k("context_length"), Value::U32(CONTEXT as u32));
    g.meta(&k("embedding_length"), Value::U32(h as u32));
    g.meta(&k("block_count"), Value::U32(LAYERS as u32));
    g.meta(&k("feed_forward_length"), Value::U32(INTER as u32));
    g.meta(&k("attention.head_count"), Value::U32(t.heads as u32));
    g.meta(&k("attention.head_count_kv"), Value::U32(KV_HEADS as u32));
    g.meta(&k("attention.key_length"), Value::U32(HEAD_DIM as u32));
    g.meta(&k("attention.value_length"), Value::U32(HEAD_DIM as u32));
    g.meta(&k("rope.dimension_count"), Value::U32(rot as u32));
    g.meta(&k("rope.freq_base"), Value::F32(rope_base(t)));
    let eps = if gemma { 1e-6 } else { 1e-5 };
    g.meta(&k("attention.layer_norm_rms_epsilon"), Value::F32(eps));
    match t.rope {
        TinyRope::Linear(f) => {
            g.meta(&k("rope.scaling.type"), Value::String("linear".into()));
            g.meta(&k("rope.scaling.factor"), Value::F32(f));
        }
        TinyRope::Yarn(f) => {
            g.meta(&k("rope.scaling.type"), Value::String("yarn".into()));
            g.meta(&k("rope.scaling.factor"), Value::F32(f));
            g.meta(
                &k("rope.scaling.original_context_length"),
                Value::U32(ORIGINAL_CONTEXT as u32),
            );
        }
        TinyRope::LongRope => {
            g.meta(&k("rope.scaling.type"), Value::String("longrope".into()));
            g.meta(
                &k("rope.scaling.original_context_length"),
                Value::U32(ORIGINAL_CONTEXT as u32),
            );
            let scale = CONTEXT as f32 / ORIGINAL_CONTEXT as f32;
            let attn = (1.0 + scale.ln() / (ORIGINAL_CONTEXT as f32).ln()).sqrt();
            g.meta(&k("rope.scaling.attn_factor"), Value::F32(attn));
        }
        TinyRope::Plain | TinyRope::Llama3 => {}
    }
    if let Some(w) = t.window {
        g.meta(&k("attention.sliding_window"), Value::U32(w as u32));
        if gemma {
            g.meta(&k("attention.sliding_window_pattern"), Value::U32(2));
        }
    }
    if t.family == TinyFamily::Gemma2 {
        let (attn, last) = GEMMA2_CAPS;
        g.meta(&k("attn_logit_softcapping"), Value::F32(attn));
        g.meta(&k("final_logit_softcapping"), Value::F32(last));
    }
    for (key, v) in &tok_md {
        g.meta(key, v.clone());
    }

    // Tensors: GGUF in llama.cpp's names and layouts, the twin in Hugging Face's.
    let norm_hf = |v: &[f32]| -> Vec<f32> {
        if gemma {
            v.iter().map(|x| x - 1.0).collect()
        } else {
            v.to_vec()
        }
    };
    // Small embeddings, so that the residual stream is the layers' work rather than the
    // token's own embedding (with a tied output layer that would repeat the input token),
    // and a large final norm, so that next-token distributions are peaked all the same.
    //
    // Tokens that are not whole UTF-8 characters get zero rows: they are never the argmax,
    // because llama-server leaves them out of the probabilities it reports.
    let partial = partial_utf8_tokens(&src, vocab)?;
    let random_table = |rng: &mut Lcg| {
        let mut w = rng.uniform(vocab * h, EMBED_SCALE);
        for &id in &partial {
            w[id * h..(id + 1) * h].iter_mut().for_each(|v| *v = 0.0);
        }
        w
    };
    let embed = encode(random_table(&mut rng), vocab, h, t.embed_ty)?;
    g.raw_tensor(
        "token_embd.weight",
        &[h, vocab],
        embed.ty.ggml_id(),
        &embed.bytes,
    );
    put_hf(
        "model.embed_tokens.weight".into(),
        &embed.values,
        &[vocab, h],
    )?;
    if !t.tied {
        let out = encode(random_table(&mut rng), vocab, h, t.embed_ty)?;
        g.raw_tensor("output.weight", &[h, vocab], out.ty.ggml_id(), &out.bytes);
        put_hf("lm_head.weight".into(), &out.values, &[vocab, h])?;
    }
    let out_norm: Vec<f32> = rng.norm(h).iter().map(|v| v * OUT_NORM).collect();
    g.tensor_f32("output_norm.weight", &[h], &out_norm);
    put_hf("model.norm.weight".into(), &norm_hf(&out_norm), &[h])?;
    match t.rope {
        TinyRope::Llama3 => g.tensor_f32(
            "rope_freqs.weight",
            &[rot / 2],
            &llama3_factors(rope_base(t) as f64, rot),
        ),
        TinyRope::LongRope => {
            g.tensor_f32(
                "rope_factors_long.weight",
                &[rot / 2],
                &longrope_factors(rot, true),
            );
            g.tensor_f32(
                "rope_factors_short.weight",
                &[rot / 2],
                &longrope_factors(rot, false),
            );
        }
        _ => {}
    }
    let qk_scale = 2.0 / (h as f32).sqrt();
    let mlp_scale = 1.0 / (h as f32).sqrt();
    let out_scale = 4.0;
    for l in 0..LAYERS {
        let b = |n: &str| format!("blk.{l}.{n}");
        let p = |n: &str| format!("model.layers.{l}.{n}");
        let mut matrix = |rows: usize, cols: usize, scale: f32| {
            encode(rng.uniform(rows * cols, scale), rows, cols, t.ty)
        };
        let q = matrix(q_dim, h, qk_scale)?;
        let kk = matrix(kv_dim, h, qk_scale)?;
        let v = matrix(kv_dim, h, mlp_scale)?;
        let o = matrix(h, q_dim, out_scale / (q_dim as f32).sqrt())?;
        let gate = matrix(INTER, h, mlp_scale)?;
        let up = matrix(INTER, h, mlp_scale)?;
        let down = matrix(h, INTER, out_scale / (INTER as f32).sqrt())?;
        let llama_arch = a == "llama";
        let (q_bytes, k_bytes) = if llama_arch {
            (permute_rows(&q, t.heads), permute_rows(&kk, KV_HEADS))
        } else {
            (q.bytes.clone(), kk.bytes.clone())
        };
        if phi {
            let bytes = [q_bytes, k_bytes, v.bytes.clone()].concat();
            g.raw_tensor(
                &b("attn_qkv.weight"),
                &[h, q_dim + 2 * kv_dim],
                t.ty.ggml_id(),
                &bytes,
            );
            let vals = [q.values.clone(), kk.values.clone(), v.values.clone()].concat();
            put_hf(
                p("self_attn.qkv_proj.weight"),
                &vals,
                &[q_dim + 2 * kv_dim, h],
            )?;
            let bytes = [gate.bytes.clone(), up.bytes.clone()].concat();
            g.raw_tensor(&b("ffn_up.weight"), &[h, 2 * INTER], t.ty.ggml_id(), &bytes);
            let vals = [gate.values.clone(), up.values.clone()].concat();
            put_hf(p("mlp.gate_up_proj.weight"), &vals, &[2 * INTER, h])?;
        } else {
            g.raw_tensor(&b("attn_q.weight"), &[h, q_dim], t.ty.ggml_id(), &q_bytes);
            g.raw_tensor(&b("attn_k.weight"), &[h, kv_dim], t.ty.ggml_id(), &k_bytes);
            g.raw_tensor(&b("attn_v.weight"), &[h, kv_dim], t.ty.ggml_id(), &v.bytes);
            put_hf(p("self_attn.q_proj.weight"), &q.values, &[q_dim, h])?;
            put_hf(p("self_attn.k_proj.weight"), &kk.values, &[kv_dim, h])?;
            put_hf(p("self_attn.v_proj.weight"), &v.values, &[kv_dim, h])?;
            g.raw_tensor(
                &b("ffn_gate.weight"),
                &[h, INTER],
                t.ty.ggml_id(),
                &gate.bytes,
            );
            g.raw_tensor(&b("ffn_up.weight"), &[h, INTER], t.ty.ggml_id(), &up.bytes);
            put_hf(p("mlp.gate_proj.weight"), &gate.values, &[INTER, h])?;
            put_hf(p("mlp.up_proj.weight"), &up.values, &[INTER, h])?;
        }
        g.raw_tensor(
            &b("attn_output.weight"),
            &[q_dim, h],
            t.ty.ggml_id(),
            &o.bytes,
        );
        put_hf(p("self_attn.o_proj.weight"), &o.values, &[h, q_dim])?;
        g.raw_tensor(
            &b("ffn_down.weight"),
            &[INTER, h],
            t.ty.ggml_id(),
            &down.bytes,
        );
        put_hf(p("mlp.down_proj.weight"), &down.values, &[h, INTER])?;
        if t.family == TinyFamily::Qwen2 {
            for (n, len) in [("q", q_dim), ("k", kv_dim), ("v", kv_dim)] {
                let bias = rng.uniform(len, 0.1);
                g.tensor_f32(&b(&format!("attn_{n}.bias")), &[len], &bias);
                put_hf(p(&format!("self_attn.{n}_proj.bias")), &bias, &[len])?;
            }
        }
        if matches!(t.family, TinyFamily::Qwen3 | TinyFamily::Gemma3) {
            for n in ["q", "k"] {
                let w = rng.norm(HEAD_DIM);
                g.tensor_f32(&b(&format!("attn_{n}_norm.weight")), &[HEAD_DIM], &w);
                put_hf(
                    p(&format!("self_attn.{n}_norm.weight")),
                    &norm_hf(&w),
                    &[HEAD_DIM],
                )?;
            }
        }
        let attn_norm = rng.norm(h);
        let ffn_norm = rng.norm(h);
        g.tensor_f32(&b("attn_norm.weight"), &[h], &attn_norm);
        g.tensor_f32(&b("ffn_norm.weight"), &[h], &ffn_norm);
        put_hf(p("input_layernorm.weight"), &norm_hf(&attn_norm), &[h])?;
        if gemma {
            put_hf(
                p("pre_feedforward_layernorm.weight"),
                &norm_hf(&ffn_norm),
                &[h],
            )?;
            let post_attn = rng.norm(h);
            let post_ffn = rng.norm(h);
            g.tensor_f32(&b("post_attention_norm.weight"), &[h], &post_attn);
            g.tensor_f32(&b("post_ffw_norm.weight"), &[h], &post_ffn);
            put_hf(
                p("post_attention_layernorm.weight"),
                &norm_hf(&post_attn),
                &[h],
            )?;
            put_hf(
                p("post_feedforward_layernorm.weight"),
                &norm_hf(&post_ffn),
                &[h],
            )?;
        } else {
            put_hf(
                p("post_attention_layernorm.weight"),
                &norm_hf(&ffn_norm),
                &[h],
            )?;
        }
    }
    g.write(&dir.join(format!("{}.gguf", t.name)))
        .map_err(|source| RunnerError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    let hf = dir.join(format!("{}-hf", t.name));
    write_hf(t, &hf, &st, vocab, &src)
}

fn write_hf(
    t: &Tiny,
    dir: &Path,
    st: &HashMap<String, Tensor>,
    vocab: usize,
    src: &crate::gguf::GgufFile,
) -> Result<()> {
    let io = |source| RunnerError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    candle_core::safetensors::save(st, dir.join("model.safetensors"))?;
    let rot = t.rope_dims.unwrap_or(HEAD_DIM);
    let mut c = json!({
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": t.heads, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "vocab_size": vocab, "max_position_embeddings": CONTEXT,
        "rms_norm_eps": if matches!(t.family, TinyFamily::Gemma2 | TinyFamily::Gemma3) { 1e-6 } else { 1e-5 },
        "rope_theta": rope_base(t), "tie_word_embeddings": t.tied,
    });
    let (model_type, arch) = match t.family {
        TinyFamily::Llama => ("llama", "LlamaForCausalLM"),
        TinyFamily::Mistral => ("mistral", "MistralForCausalLM"),
        TinyFamily::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        TinyFamily::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
        TinyFamily::Gemma2 => ("gemma2", "Gemma2ForCausalLM"),
        TinyFamily::Gemma3 => ("gemma3_text", "Gemma3ForCausalLM"),
        TinyFamily::Phi3 => ("phi3", "Phi3ForCausalLM"),
    };
    c["model_type"] = json!(model_type);
    c["architectures"] = json!([arch]);
    match t.rope {
        TinyRope::Llama3 => {
            c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL_CONTEXT})
        }
        TinyRope::Linear(f) => c["rope_scaling"] = json!({"type": "linear", "factor": f}),
        TinyRope::Yarn(f) => {
            c["rope_scaling"] = json!({"rope_type": "yarn", "factor": f,
                "original_max_position_embeddings": ORIGINAL_CONTEXT})
        }
        TinyRope::LongRope => {
            c["rope_scaling"] = json!({"type": "longrope", "long_factor": longrope_factors(rot, true),
                "short_factor": longrope_factors(rot, false)});
            c["original_max_position_embeddings"] = json!(ORIGINAL_CONTEXT);
        }
        TinyRope::Plain => {}
    }
    if let Some(r) = t.rope_dims {
        c["partial_rotary_factor"] = json!(r as f64 / HEAD_DIM as f64);
    }
    match t.family {
        TinyFamily::Gemma2 => {
            let (attn, last) = GEMMA2_CAPS;
            c["sliding_window"] = json!(t.window);
            c["query_pre_attn_scalar"] = json!(HEAD_DIM);
            c["hidden_activation"] = json!("gelu_pytorch_tanh");
            c["attn_logit_softcapping"] = json!(attn);
            c["final_logit_softcapping"] = json!(last);
        }
        TinyFamily::Gemma3 => {
            c["sliding_window"] = json!(t.window);
            c["sliding_window_pattern"] = json!(2);
            c["query_pre_attn_scalar"] = json!(HEAD_DIM);
            c["hidden_activation"] = json!("gelu_pytorch_tanh");
            c["rope_local_base_freq"] = json!(10_000.0);
        }
        // As in Mistral's checkpoints; longer than the tests' sequences (llama.cpp, the
        // reference, has no window for these files).
        TinyFamily::Mistral => c["sliding_window"] = json!(CONTEXT),
        _ => {}
    }
    std::fs::write(dir.join("config.json"), c.to_string()).map_err(io)?;
    let tok = crate::tokenizer::from_gguf(&src.metadata)?;
    tok.tokenizer
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| RunnerError::Tokenizer(e.to_string()))?;
    let tc = json!({
        "eos_token": "<|im_end|>",
        "chat_template": src.get("tokenizer.chat_template").and_then(Value::as_str),
    });
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).map_err(io)
}

/// The host work of one step's attention metadata for `batch` over a cache of `num_blocks`
/// blocks of `block_size` (what the runner builds before a step's layers), and with
/// `block_tables` the paged op's block tables too (the tensor path's): for
/// `benches/runner_step.rs`, which times it. Returns the tokens and table entries built.
pub fn step_metadata(
    batch: &wick_core::ScheduledBatch,
    block_size: usize,
    num_blocks: usize,
    block_tables: bool,
) -> Result<usize> {
    let meta = crate::attention::AttentionMetadata::from_batch(batch, block_size, num_blocks)?;
    let tables = if block_tables {
        crate::attention::paged::BlockTables::new(&meta, num_blocks * block_size)?
            .tables
            .len()
    } else {
        0
    };
    Ok(meta.num_tokens() + tables)
}
