//! Sentence-embedding models in the sentence-transformers layout: a BERT encoder
//! (`config.json`, `model.safetensors`, through candle-transformers' BERT), the pooling that
//! `modules.json` and `1_Pooling/config.json` name (mean, CLS or max over the tokens), an
//! optional L2 normalization (a `Normalize` module), and the input limit `max_seq_length` of
//! `sentence_bert_config.json`. The directory's `tokenizer.json` is used without its own
//! padding and truncation (all-MiniLM-L6-v2's pads and cuts to 128, which the model's limit,
//! 256, overrides).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::{Result, RunnerError};

/// How token vectors become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
}

#[derive(Deserialize)]
struct Module {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: usize,
}

/// A loaded sentence-embedding model.
pub struct EmbeddingModel {
    bert: BertModel,
    tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
    max_input_tokens: usize,
    dimensions: usize,
    device: Device,
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

impl EmbeddingModel {
    /// Whether `dir` is a sentence-transformers model (it has `modules.json`).
    pub fn is_embedding_model(dir: &Path) -> bool {
        dir.is_dir() && dir.join("modules.json").is_file()
    }

    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let modules: Vec<Module> = json(&dir.join("modules.json"))?;
        let find = |suffix: &str| modules.iter().find(|m| m.kind.ends_with(suffix));
        if find("models.Transformer").is_none() {
            return Err(RunnerError::invalid(
                &dir.join("modules.json"),
                "no sentence_transformers.models.Transformer module",
            ));
        }
        for m in &modules {
            let known = ["models.Transformer", "models.Pooling", "models.Normalize"];
            if !known.iter().any(|k| m.kind.ends_with(k)) {
                return Err(RunnerError::Unsupported(format!(
                    "sentence-transformers module {} (Wick knows Transformer, Pooling, Normalize)",
                    m.kind
                )));
            }
        }
        let pooling = match find("models.Pooling") {
            None => Pooling::Cls,
            Some(m) => {
                let path: PathBuf = dir.join(&m.path).join("config.json");
                let p: PoolingConfig = json(&path)?;
                match (
                    p.pooling_mode_mean_tokens,
                    p.pooling_mode_cls_token,
                    p.pooling_mode_max_tokens,
                    p.pooling_mode_mean_sqrt_len_tokens,
                ) {
                    (true, false, false, false) => Pooling::Mean,
                    (false, true, false, false) => Pooling::Cls,
                    (false, false, true, false) => Pooling::Max,
                    _ => {
                        return Err(RunnerError::Unsupported(format!(
                            "{}: one of mean, CLS or max pooling",
                            path.display()
                        )))
                    }
                }
            }
        };
        let config_path = dir.join("config.json");
        let config: Config = json(&config_path)?;
        let raw: serde_json::Value = json(&config_path)?;
        let dimensions = raw["hidden_size"]
            .as_u64()
            .ok_or_else(|| RunnerError::invalid(&config_path, "no hidden_size"))?
            as usize;
        let max_positions = raw["max_position_embeddings"].as_u64().unwrap_or(512) as usize;
        let sbert = dir.join("sentence_bert_config.json");
        let max_input_tokens = if sbert.is_file() {
            json::<SentenceBertConfig>(&sbert)?.max_seq_length
        } else {
            max_positions
        }
        .min(max_positions);
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| RunnerError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| RunnerError::Tokenizer(e.to_string()))?;
        let weights = dir.join("model.safetensors");
        // SAFETY: the file is mapped read-only and not modified while the model lives.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device)? };
        let bert = BertModel::load(vb, &config)
            .map_err(|e| RunnerError::invalid(&weights, e.to_string()))?;
        Ok(Self {
            bert,
            tokenizer,
            pooling,
            normalize: find("models.Normalize").is_some(),
            max_input_tokens,
            dimensions,
            device: device.clone(),
        })
    }

    /// Tokens of `text`, with the model's special tokens ([CLS] ... [SEP]).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, true)
            .map_err(|e| RunnerError::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// The longest input the model takes, in tokens.
    pub fn max_input_tokens(&self) -> usize {
        self.max_input_tokens
    }

    /// Size of the vectors.
    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// The tokenizer, without its own padding and truncation.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// One vector per input (token ids, each 1 to `max_input_tokens` long), computed as one
    /// padded batch; padding is masked out of attention and pooling.
    pub fn embed(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let longest = inputs.iter().map(Vec::len).max().unwrap_or(0);
        let vocab = self.vocab_size() as u32;
        if let Some(bad) = inputs
            .iter()
            .find(|i| i.is_empty() || i.len() > self.max_input_tokens)
        {
            return Err(RunnerError::Step(format!(
                "an input of {} tokens: 1 to {} allowed",
                bad.len(),
                self.max_input_tokens
            )));
        }
        if let Some(&id) = inputs.iter().flatten().find(|&&id| id >= vocab) {
            return Err(RunnerError::Step(format!(
                "token id {id} out of range (vocabulary {vocab})"
            )));
        }
        let b = inputs.len();
        let mut ids = vec![0u32; b * longest];
        let mut mask = vec![0f32; b * longest];
        for (i, input) in inputs.iter().enumerate() {
            ids[i * longest..i * longest + input.len()].copy_from_slice(input);
            mask[i * longest..i * longest + input.len()].fill(1.0);
        }
        let ids = Tensor::from_vec(ids, (b, longest), &self.device)?;
        let mask = Tensor::from_vec(mask, (b, longest), &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = self.bert.forward(&ids, &types, Some(&mask))?; // [b, n, h]
        let pooled = match self.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => {
                let m = mask.unsqueeze(2)?;
                let sum = hidden.broadcast_mul(&m)?.sum(1)?;
                sum.broadcast_div(&m.sum(1)?)?
            }
            Pooling::Max => {
                // Padding gets a large negative value so it never wins.
                let neg = ((mask.unsqueeze(2)? - 1.0)? * 1e9)?;
                hidden.broadcast_add(&neg)?.max(1)?
            }
        };
        let out = if self.normalize {
            let norm = pooled.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
            pooled.broadcast_div(&norm.clamp(1e-12, f64::MAX)?)?
        } else {
            pooled
        };
        Ok(out.to_dtype(DType::F32)?.to_vec2()?)
    }
}
