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
use crate::tools::{Entry, ToolChoice, ToolFormat, ToolSpec, BARE_START};
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

impl ResponseFormat {
    /// Reads the Responses API's `text.format` (the schema sits beside `type`).
    pub(crate) fn from_text_format(v: Option<&Value>) -> Result<Self, ApiError> {
        let Some(v) = v.filter(|v| !v.is_null()) else {
            return Ok(Self::Text);
        };
        let bad = |m: &str| ApiError::invalid("text.format", m.to_string());
        match v.get("type").and_then(Value::as_str) {
            Some("text") => Ok(Self::Text),
            Some("json_object") => Ok(Self::JsonObject),
            Some("json_schema") => match v.get("schema") {
                Some(s @ Value::Object(_)) => Ok(Self::JsonSchema(s.clone())),
                _ => Err(bad("'text.format.schema' must be a JSON schema object")),
            },
            _ => Err(bad(
                "'text.format.type' must be text, json_object or json_schema",
            )),
        }
    }
}

/// What may stand between two tokens of constrained JSON (a regex): one space, or a line
/// break and up to 20 spaces or tabs (llama.cpp's `ws` rule).
const JSON_WHITESPACE: &str = r"( |\r?\n[ \t]{0,20})";

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
    env: TokEnv,
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
        Ok(Self { factory, env })
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
        // The whitespace models write (`{\n  "city": "Paris",\n  ...}`: Qwen2.5's first
        // token is `{\n`), as llama.cpp's JSON grammar allows it, but bounded: between two
        // tokens of the JSON at most one space, or one line break and an indentation of up
        // to 20, so that a model cannot pad forever. Forcing compact JSON pushed models off
        // their path into wrong answers.
        if let Some(obj) = schema.as_object_mut() {
            obj.entry("x-guidance")
                .or_insert_with(|| json!({"whitespace_pattern": JSON_WHITESPACE}));
        }
        let matcher = self.matcher(TopLevelGrammar::from_json_schema(schema), "response_format")?;
        Ok(Some(JsonConstraint { matcher }))
    }

    fn matcher(&self, grammar: TopLevelGrammar, param: &str) -> Result<Matcher, ApiError> {
        let bad =
            |e: String| ApiError::invalid(param, format!("the JSON schema cannot be used: {e}"));
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| bad(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        match matcher.get_error() {
            Some(e) => Err(bad(e)),
            None => Ok(matcher),
        }
    }

    /// The constraint for a request's tools: with `required` or a named tool, the output
    /// is calls from the first token; with `auto`, the model writes freely until it starts a
    /// call, and from there on the call must parse and match a tool's schema.
    pub(crate) fn tool_constraint(
        &self,
        format: ToolFormat,
        spec: &ToolSpec,
    ) -> Result<Option<Box<dyn TokenConstraint>>, ApiError> {
        let grammar = |entry| TopLevelGrammar::from_lark(format.grammar(spec, entry));
        Ok(Some(match spec.choice {
            ToolChoice::None => return Ok(None),
            ToolChoice::Auto => Box::new(CallConstraint {
                after_marker: Some(self.matcher(grammar(Entry::AfterMarker), "tools")?),
                bare: format
                    .syntax
                    .bare_json()
                    .then(|| self.matcher(grammar(Entry::Bare), "tools"))
                    .transpose()?,
                env: self.env.clone(),
                format,
                seen: Vec::new(),
                searched: 0,
                active: None,
            }),
            _ => Box::new(JsonConstraint {
                matcher: self.matcher(grammar(Entry::Forced), "tools")?,
            }),
        }))
    }
}

/// Masks `logits` to what `matcher` allows; ids past the tokenizer's vocabulary (a padded
/// output layer) are never allowed.
fn mask_with(matcher: &mut Matcher, logits: &mut [f32]) -> Result<(), String> {
    let allowed = matcher.compute_mask_or_eos().map_err(|e| e.to_string())?;
    for (id, l) in logits.iter_mut().enumerate() {
        if id >= allowed.len() || !allowed.is_allowed(id as TokenId) {
            *l = f32::NEG_INFINITY;
        }
    }
    Ok(())
}

/// `auto` tool choice: no constraint until the output opens a call (with the marker, or
/// bare where the syntax allows), then the grammar of calls from there.
pub struct CallConstraint {
    after_marker: Option<Matcher>,
    bare: Option<Matcher>,
    env: TokEnv,
    format: ToolFormat,
    /// The output's bytes so far (until a call opens).
    seen: Vec<u8>,
    /// How much of `seen` was searched for the start marker.
    searched: usize,
    /// The grammar in force once a call has opened.
    active: Option<Matcher>,
}

impl std::fmt::Debug for CallConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallConstraint")
    }
}

impl CallConstraint {
    /// Where the grammar takes over in `seen` and which entry, once a call has opened.
    fn call_opened(&self, token: u32) -> Option<(usize, Entry)> {
        if self.format.start_token == Some(token) {
            return Some((self.seen.len(), Entry::AfterMarker));
        }
        let start = self.format.syntax.start().as_bytes();
        let from = self.searched.saturating_sub(start.len());
        if let Some(at) = self.seen[from..]
            .windows(start.len())
            .position(|w| w == start)
        {
            return Some((from + at + start.len(), Entry::AfterMarker));
        }
        let first = self.seen.iter().position(|b| !b.is_ascii_whitespace())?;
        (self.bare.is_some() && self.seen[first..].starts_with(BARE_START.as_bytes()))
            .then_some((first, Entry::Bare))
    }
}

impl TokenConstraint for CallConstraint {
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        match &mut self.active {
            Some(m) => mask_with(m, logits),
            None => Ok(()),
        }
    }

    fn consume(&mut self, token: u32) -> Result<(), String> {
        if let Some(m) = &mut self.active {
            return m.consume_token(token).map_err(|e| e.to_string());
        }
        self.seen
            .extend_from_slice(self.env.tok_trie().token(token));
        let opened = self.call_opened(token);
        self.searched = self.seen.len();
        let Some((at, entry)) = opened else {
            return Ok(());
        };
        let grammar = match entry {
            Entry::Bare => self.bare.take(),
            _ => self.after_marker.take(),
        };
        let Some(mut m) = grammar else {
            return Ok(());
        };
        // What the model wrote of the call so far; if the grammar cannot take it (a spelling
        // the grammar does not allow), the call goes on unconstrained rather than failing
        // the request: the parser still reads it.
        let rest = self.env.tokenize_bytes(&self.seen[at..]);
        if rest.iter().all(|&t| m.consume_token(t).is_ok()) {
            self.active = Some(m);
        } else {
            tracing::debug!(
                "a tool call began in a form its grammar does not take; left unconstrained"
            );
        }
        Ok(())
    }

    fn is_finished(&self) -> bool {
        self.active.as_ref().is_some_and(|m| m.is_stopped())
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
        mask_with(&mut self.matcher, logits)
    }

    fn consume(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}
