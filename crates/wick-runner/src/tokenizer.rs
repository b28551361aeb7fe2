//! A `tokenizers::Tokenizer` built from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! candle's own `Tokenizer::from_gguf` adds a prefix space for some pre-tokenizers (`smollm`
//! among them), which llama.cpp does not: these are built to match llama.cpp's tokenization.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::{Result, RunnerError};

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn err(message: impl Into<String>) -> RunnerError {
    RunnerError::Tokenizer(message.into())
}

fn strings(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>> {
    let values = md
        .get(key)
        .ok_or_else(|| err(format!("missing {key}")))?
        .to_vec()
        .map_err(|e| err(format!("{key}: {e}")))?;
    values
        .iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| err(format!("{key}: {e}")))
        })
        .collect()
}

fn token_types(md: &HashMap<String, Value>, n: usize) -> Vec<i32> {
    md.get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.iter().map(|t| t.to_i32().unwrap_or(1)).collect())
        .unwrap_or_else(|| vec![1; n])
}

/// The pre-tokenizer llama.cpp uses for the `tokenizer.ggml.pre` name.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level =
        |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
    Ok(match pre {
        // llama.cpp: "\p{N}" then the GPT-2 pattern; digits are split one by one.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level(true),
            ]))
        }
        "default" | "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "olmo" => byte_level(true),
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" | "falcon3" | "pixtral" => {
            let split = Split::new(
                SplitPattern::Regex(LLAMA3_REGEX.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| err(format!("pre-tokenizer regex: {e}")))?;
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Split(split),
                byte_level(false),
            ]))
        }
        other => {
            return Err(RunnerError::Unsupported(format!(
                "GGUF pre-tokenizer {other:?} (supported: smollm, starcoder, gpt2, llama3 and their aliases)"
            )))
        }
    })
}

/// Builds the tokenizer a GGUF file describes: byte-level BPE with its merges, the
/// pre-tokenizer `tokenizer.ggml.pre` names, control tokens as special tokens, and a BOS
/// token only where `tokenizer.ggml.add_bos_token` asks for one.
pub fn tokenizer_from_gguf(md: &HashMap<String, Value>) -> Result<Tokenizer> {
    let model = md
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| err("missing tokenizer.ggml.model"))?;
    if model != "gpt2" {
        return Err(RunnerError::Unsupported(format!(
            "GGUF tokenizer model {model:?} (only byte-level BPE, \"gpt2\", is supported)"
        )));
    }
    let tokens = strings(md, "tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings(md, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| err(format!("merge {m:?} has no space")))
        })
        .collect::<Result<_>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| err(format!("BPE: {e}")))?;
    let pre = md
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
        .unwrap_or("default");

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    let types = token_types(md, tokens.len());
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, t)| *t == TOKEN_TYPE_CONTROL || *t == TOKEN_TYPE_USER_DEFINED)
        .map(|(tok, t)| AddedToken::from(tok.clone(), t == TOKEN_TYPE_CONTROL))
        .collect();
    tokenizer
        .add_special_tokens(added)
        .map_err(|e| err(format!("special tokens: {e}")))?;

    let add_bos = md
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    if add_bos {
        let bos_id = md
            .get("tokenizer.ggml.bos_token_id")
            .and_then(|v| v.to_u32().ok())
            .ok_or_else(|| err("add_bos_token is set but bos_token_id is missing"))?;
        let bos = tokens
            .get(bos_id as usize)
            .ok_or_else(|| err("bos_token_id out of range"))?
            .clone();
        let post = TemplateProcessing::builder()
            .try_single(format!("{bos} $A"))
            .and_then(|b| b.try_pair(format!("{bos} $A {bos} $B")))
            .map_err(|e| err(format!("post-processor: {e}")))?
            .special_tokens(vec![(bos, bos_id)])
            .build()
            .map_err(|e| err(format!("post-processor: {e}")))?;
        tokenizer.with_post_processor(Some(post));
    }
    Ok(tokenizer)
}
