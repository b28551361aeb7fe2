//! Structured output: `response_format` `json_object` and `json_schema`, enforced by
//! constrained decoding with llguidance. The grammar is compiled on a blocking thread before
//! the request reaches the engine; the engine masks each step's logits with it.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use tokenizers::Tokenizer;
use wick_core::TokenConstraint;

use crate::detok::token_bytes;
use crate::ApiError;

/// What `response_format` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema(Value),
}

impl ResponseFormat {
    /// Reads OpenAI's `response_format` object.
    pub fn parse(v: Option<&Value>) -> Result<Self, ApiError> {
        let Some(v) = v.filter(|v| !v.is_null()) else {
            return Ok(Self::Text);
        };
        let bad = |m: &str| ApiError::invalid("response_format", m.to_string());
        match v.get("type").and_then(Value::as_str) {
            Some("text") => Ok(Self::Text),
            Some("json_object") => Ok(Self::JsonObject),
            Some("json_schema") => {
                let schema = v
                    .get("json_schema")
                    .and_then(|s| s.get("schema"))
                    .ok_or_else(|| bad("'response_format.json_schema.schema' is required"))?;
                if !schema.is_object() {
                    return Err(bad(
                        "'response_format.json_schema.schema' must be an object",
                    ));
                }
                Ok(Self::JsonSchema(schema.clone()))
            }
            _ => Err(bad(
                "'response_format.type' must be text, json_object or json_schema",
            )),
        }
    }
}

/// The tokenizer as llguidance sees it: each token's bytes (special tokens behind the
/// 0xFF marker, so text can never produce them).
struct WickTokEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for WickTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        let text = String::from_utf8_lossy(s);
        match self.tokenizer.encode(text.as_ref(), false) {
            Ok(enc) => enc.get_ids().to_vec(),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// Compiles grammars for one model.
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// Builds the token trie over the whole vocabulary (once, at start-up).
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize, eos: u32) -> Result<Self, String> {
        let added = tokenizer.get_added_vocabulary();
        let words: Vec<Vec<u8>> = (0..vocab_size as u32)
            .map(|id| match tokenizer.id_to_token(id) {
                Some(t) if added.is_special_token(&t) => {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(t.as_bytes());
                    w
                }
                Some(_) => token_bytes(&tokenizer, id),
                None => Vec::new(),
            })
            .collect();
        let trie = TokTrie::from(&TokRxInfo::new(vocab_size as u32, eos), &words);
        let env: TokEnv = Arc::new(WickTokEnv { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// A fresh constraint for `format` (`None` for plain text). Compiling can take a while:
    /// call it off the async reactor.
    pub fn constraint(&self, format: &ResponseFormat) -> Result<Option<JsonConstraint>, ApiError> {
        let schema = match format {
            ResponseFormat::Text => return Ok(None),
            ResponseFormat::JsonObject => json!({"type": "object"}),
            ResponseFormat::JsonSchema(s) => s.clone(),
        };
        let mut schema = schema;
        // Compact JSON: a small model may otherwise spend its tokens on whitespace.
        if let Some(obj) = schema.as_object_mut() {
            obj.entry("x-guidance")
                .or_insert_with(|| json!({"whitespace_flexible": false}));
        }
        let grammar = TopLevelGrammar::from_json_schema(schema);
        let parser = self.factory.create_parser(grammar).map_err(|e| {
            ApiError::invalid(
                "response_format",
                format!("the JSON schema cannot be used: {e}"),
            )
        })?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ApiError::invalid(
                "response_format",
                format!("the JSON schema cannot be used: {e}"),
            ));
        }
        Ok(Some(JsonConstraint { matcher }))
    }
}

/// One sequence's grammar state.
pub struct JsonConstraint {
    matcher: Matcher,
}

impl std::fmt::Debug for JsonConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JsonConstraint")
    }
}

impl TokenConstraint for JsonConstraint {
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        for (id, l) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(id as TokenId) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    fn consume(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}
