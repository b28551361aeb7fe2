//! A `tokenizers::Tokenizer` built from a GGUF file's `tokenizer.ggml.*` metadata, to give
//! llama.cpp's token ids:
//! - `gpt2`: byte-level BPE with the file's merges, split first by the regular expressions
//!   llama.cpp uses for the `tokenizer.ggml.pre` name;
//! - `llama`: SentencePiece BPE (scores, `▁` for spaces, byte fallback, an optional leading
//!   space), as merges derived from the scores: a pair merges when the joined piece is in the
//!   vocabulary, highest score first, which is llama.cpp's algorithm.
//!
//! Control tokens are special tokens; user-defined ones are matched in the text before
//! tokenization, as llama.cpp does. BOS (and EOS) are added per `add_bos_token` /
//! `add_eos_token` when special tokens are added.

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::gguf::Value;
use crate::{Result, RunnerError};

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A tokenizer and whether prompts start with BOS.
pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    pub add_bos: bool,
}

fn err(message: impl Into<String>) -> RunnerError {
    RunnerError::Tokenizer(message.into())
}

fn array<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a [Value]> {
    md.get(key)
        .ok_or_else(|| err(format!("missing {key}")))?
        .as_array()
        .ok_or_else(|| err(format!("{key} is not an array")))
}

fn strings(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>> {
    array(md, key)?
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| err(format!("{key}: not a string")))
        })
        .collect()
}

fn token_types(md: &HashMap<String, Value>, n: usize) -> Vec<i64> {
    match md
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
    {
        Some(v) if v.len() == n => v.iter().map(|t| t.as_i64().unwrap_or(1)).collect(),
        _ => vec![1; n],
    }
}

fn flag(md: &HashMap<String, Value>, key: &str) -> Option<bool> {
    md.get(key).and_then(Value::as_bool)
}

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const SEED_CODER: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
const BLOOM: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";

/// The regular expressions llama.cpp splits text with for a `tokenizer.ggml.pre` name, in
/// order, and whether whole pieces found in the vocabulary skip the merges.
fn pre_regexes(pre: &str) -> Option<(Vec<&'static str>, bool)> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" => (vec![LLAMA3], true),
        "dbrx" | "smaug-bpe" | "chatglm-bpe" => (vec![LLAMA3], false),
        "glm4" | "glm5" => (vec![LLAMA3], true),
        "deepseek-llm" => (
            vec![
                r"[\r\n]",
                r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
                r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
                r"\s+$",
                r"[一-龥ࠀ-一가-퟿]+",
                r"\p{N}+",
            ],
            false,
        ),
        "deepseek-coder" => (
            vec![
                r"[\r\n]",
                r"\s?\p{L}+",
                r"\s?\p{P}+",
                r"[一-龥ࠀ-一가-퟿]+",
                r"\p{N}",
            ],
            false,
        ),
        "deepseek-v3" => (
            vec![
                r"\p{N}{1,3}",
                r"[一-龥぀-ゟ゠-ヿ]+",
                r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
            ],
            false,
        ),
        "falcon" => (
            vec![
                r"[\p{P}\$\+<=>\^~\|`]+",
                r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
                r"[0-9][0-9][0-9]",
            ],
            false,
        ),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            (vec![r"\p{N}", GPT2], false)
        }
        "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "mpt" | "olmo" | "jais"
        | "gigachat" | "jina-v2-es" | "jina-v2-de" | "jina-v1-en" | "jina-v2-code"
        | "roberta-bpe" | "exaone4" | "trillion" | "mellum" | "a.x-4.0" => (vec![GPT2], false),
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "hunyuan" | "megrez" | "kormo" => {
            (vec![QWEN2], false)
        }
        "qwen35" => (vec![QWEN35], false),
        "tekken" => (vec![TEKKEN], true),
        "gpt-4o" | "llama4" => (vec![GPT4O], false),
        "seed-coder" => (vec![SEED_CODER], false),
        "poro-chat" | "bloom" | "gpt3-finnish" => (vec![BLOOM], false),
        "viking" => (vec![BLOOM, r"\p{N}"], false),
        "default" => (
            vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
            false,
        ),
        _ => return None,
    })
}

fn pre_tokenizer(pre: &str) -> Result<(PreTokenizerWrapper, bool)> {
    let (regexes, ignore_merges) = pre_regexes(pre).ok_or_else(|| {
        RunnerError::Unsupported(format!(
            "GGUF pre-tokenizer {pre:?} (supported: llama-bpe, qwen2, smollm, gpt-2, deepseek, tekken, gpt-4o and others llama.cpp names)"
        ))
    })?;
    let mut steps = Vec::with_capacity(regexes.len() + 1);
    for re in regexes {
        let split = Split::new(
            SplitPattern::Regex(re.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| err(format!("pre-tokenizer regex: {e}")))?;
        steps.push(PreTokenizerWrapper::Split(split));
    }
    steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false, true, false,
    )));
    Ok((
        PreTokenizerWrapper::Sequence(Sequence::new(steps)),
        ignore_merges,
    ))
}

fn bpe_model(
    md: &HashMap<String, Value>,
    tokens: &[String],
    pre: &str,
) -> Result<(BPE, PreTokenizerWrapper)> {
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
    let (pre_tok, ignore_merges) = pre_tokenizer(pre)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| err(format!("BPE: {e}")))?;
    Ok((bpe, pre_tok))
}

/// SentencePiece BPE as merges: every split of a piece into two pieces of the vocabulary is a
/// merge, ranked by the joined piece's score (highest first).
fn spm_model(md: &HashMap<String, Value>, tokens: &[String]) -> Result<BPE> {
    let scores: Vec<f32> = match md.get("tokenizer.ggml.scores").and_then(Value::as_array) {
        Some(s) if s.len() == tokens.len() => s.iter().map(|v| v.as_f32().unwrap_or(0.0)).collect(),
        _ => return Err(err("tokenizer.ggml.scores is missing or not one per token")),
    };
    let ids: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect();
    let mut merges: Vec<(f32, u32, &str, &str)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        for (at, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(at);
            if ids.contains_key(a) && ids.contains_key(b) {
                merges.push((scores[id], id as u32, a, b));
            }
        }
    }
    // Highest score first; among equal scores, the lower id (llama.cpp's own tie-break is the
    // leftmost position, which only differs for pieces of equal score).
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    let merges = merges
        .into_iter()
        .map(|(_, _, a, b)| (a.to_string(), b.to_string()))
        .collect();
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let unk = md
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(Value::as_u64)
        .and_then(|i| tokens.get(i as usize));
    let mut b = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(u) = unk {
        b = b.unk_token(u.clone());
    }
    b.build()
        .map_err(|e| err(format!("SentencePiece BPE: {e}")))
}

/// Builds the tokenizer a GGUF file describes (see the module comment).
pub fn from_gguf(md: &HashMap<String, Value>) -> Result<GgufTokenizer> {
    let model = md
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .ok_or_else(|| err("missing tokenizer.ggml.model"))?;
    let tokens = strings(md, "tokenizer.ggml.tokens")?;
    let pre = md
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let (mut tokenizer, default_bos) = match model {
        "gpt2" => {
            let (bpe, pre_tok) = bpe_model(md, &tokens, pre)?;
            let mut t = Tokenizer::new(bpe);
            t.with_pre_tokenizer(Some(pre_tok));
            t.with_decoder(Some(ByteLevelDecoder::default()));
            (t, false)
        }
        "llama" => {
            let mut t = Tokenizer::new(spm_model(md, &tokens)?);
            let space_prefix = flag(md, "tokenizer.ggml.add_space_prefix").unwrap_or(true);
            let replace = Replace::new(" ", "▁").map_err(|e| err(e.to_string()))?;
            let mut norm: Vec<NormalizerWrapper> = Vec::new();
            if space_prefix {
                norm.push(Prepend::new("▁".into()).into());
            }
            norm.push(replace.into());
            t.with_normalizer(Some(NormalizerSequence::new(norm)))
                .map_err(|e| err(format!("normalizer: {e}")))?;
            let mut dec: Vec<DecoderWrapper> = vec![
                Replace::new("▁", " ").map_err(|e| err(e.to_string()))?.into(),
                ByteFallback::default().into(),
                Fuse::default().into(),
            ];
            if space_prefix {
                dec.push(Strip::new(' ', 1, 0).into());
            }
            t.with_decoder(Some(DecoderSequence::new(dec)));
            (t, true)
        }
        other => {
            return Err(RunnerError::Unsupported(format!(
                "GGUF tokenizer model {other:?} (supported: \"gpt2\" byte-level BPE, \"llama\" SentencePiece)"
            )))
        }
    };
    let types = token_types(md, tokens.len());
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL || **t == TOKEN_TYPE_USER_DEFINED)
        .map(|(tok, &t)| AddedToken::from(tok.clone(), t == TOKEN_TYPE_CONTROL).normalized(false))
        .collect();
    tokenizer
        .add_special_tokens(added)
        .map_err(|e| err(format!("special tokens: {e}")))?;

    let add_bos = flag(md, "tokenizer.ggml.add_bos_token").unwrap_or(default_bos);
    let add_eos = flag(md, "tokenizer.ggml.add_eos_token").unwrap_or(false);
    let special = |key: &str| -> Result<(String, u32)> {
        let id = md
            .get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| err(format!("{key} is missing")))? as u32;
        let t = tokens
            .get(id as usize)
            .ok_or_else(|| err(format!("{key} out of range")))?;
        Ok((t.clone(), id))
    };
    if add_bos || add_eos {
        let mut single = Vec::new();
        let mut specials = Vec::new();
        if add_bos {
            let (t, id) = special("tokenizer.ggml.bos_token_id")?;
            single.push(t.clone());
            specials.push((t, id));
        }
        single.push("$A".to_string());
        if add_eos {
            let (t, id) = special("tokenizer.ggml.eos_token_id")?;
            single.push(t.clone());
            specials.push((t, id));
        }
        let single = single.join(" ");
        let post = TemplateProcessing::builder()
            .try_single(single.as_str())
            .map_err(|e| err(format!("post-processor: {e}")))?
            .special_tokens(specials)
            .build()
            .map_err(|e| err(format!("post-processor: {e}")))?;
        tokenizer.with_post_processor(Some(post));
    }
    Ok(GgufTokenizer { tokenizer, add_bos })
}
