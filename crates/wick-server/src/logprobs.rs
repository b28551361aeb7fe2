//! Log-probabilities in the chat and the completions shapes.

use std::collections::BTreeMap;

use tokenizers::Tokenizer;

use crate::detok::token_bytes;
use crate::generation::GenToken;
use crate::openai::{ChatLogprob, ChatLogprobs, CompletionLogprobs, TopLogprob};

fn token_text(tokenizer: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = token_bytes(tokenizer, id);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// `{"content": [...]}` for these tokens, or `None` when logprobs were not asked for.
pub(crate) fn chat(tokenizer: &Tokenizer, tokens: &[GenToken]) -> Option<ChatLogprobs> {
    let content: Vec<ChatLogprob> = tokens
        .iter()
        .filter_map(|t| {
            let lp = t.logprobs.as_ref()?;
            let (token, bytes) = token_text(tokenizer, t.id);
            let top_logprobs = lp
                .top
                .iter()
                .map(|&(id, logprob)| {
                    let (token, bytes) = token_text(tokenizer, id);
                    TopLogprob {
                        token,
                        logprob,
                        bytes,
                    }
                })
                .collect();
            Some(ChatLogprob {
                token,
                logprob: lp.logprob,
                bytes,
                top_logprobs,
            })
        })
        .collect();
    (!content.is_empty()).then_some(ChatLogprobs { content })
}

/// The completions shape, appended to `out`; `offset` is where this piece's text starts.
pub(crate) fn completion(
    tokenizer: &Tokenizer,
    tokens: &[GenToken],
    mut offset: usize,
    out: &mut CompletionLogprobs,
) {
    for t in tokens {
        let Some(lp) = &t.logprobs else { continue };
        let (token, _) = token_text(tokenizer, t.id);
        out.text_offset.push(offset);
        offset += token.len();
        out.tokens.push(token);
        out.token_logprobs.push(lp.logprob);
        let top: BTreeMap<String, f32> = lp
            .top
            .iter()
            .map(|&(id, l)| (token_text(tokenizer, id).0, l))
            .collect();
        out.top_logprobs.push(top);
    }
}
