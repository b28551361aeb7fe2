//! `POST /v1/embeddings`: OpenAI's embeddings API over an encoder model. Inputs (a string,
//! strings, token ids or lists of them) are tokenized off the reactor, checked against the
//! model's input limit (a 400 naming it, unless `truncate_prompt_tokens` asks to cut), and
//! submitted as one request to the model's embedding queue, which batches requests together.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenizers::Tokenizer;
use tokio::sync::oneshot;
use utoipa::ToSchema;
use wick_core::EmbedRequest;

use crate::generation::submit_error;
use crate::http::{blocking, generation_body};
use crate::validate::parse_object;
use crate::{check_vocabulary, ApiError, AppState, Selected};

/// Most inputs in one request (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// What the front end knows of a loaded embedding model.
pub struct EmbeddingModelInfo {
    /// The name clients put in `model`.
    pub name: String,
    /// Adds the model's special tokens; neither pads nor truncates.
    pub tokenizer: Arc<Tokenizer>,
    /// The longest input, in tokens.
    pub max_input_tokens: usize,
    /// Size of the vectors.
    pub dimensions: usize,
    /// Token ids below this are valid.
    pub vocab_size: usize,
    pub details: crate::ModelDetails,
}

/// The fields of [`EmbeddingRequest`]: any other is refused, as on every endpoint.
pub(crate) const FIELDS: &[&str] = &[
    "model",
    "input",
    "encoding_format",
    "dimensions",
    "truncate_prompt_tokens",
    "user",
];

#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct EmbeddingRequest {
    pub model: String,
    /// A string, a list of strings, a list of token ids, or a list of such lists.
    #[schema(value_type = Object)]
    pub input: Value,
    /// `float` (the default) or `base64` (little-endian f32 bytes).
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Only the model's own size: this model cannot shorten its vectors.
    #[serde(default)]
    pub dimensions: Option<i64>,
    /// Cut longer inputs to this many tokens (keeping the end; -1: the model's limit)
    /// instead of refusing them.
    #[serde(default)]
    pub truncate_prompt_tokens: Option<i64>,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct EmbeddingList {
    object: &'static str,
    data: Vec<EmbeddingData>,
    model: String,
    usage: EmbeddingUsage,
}

#[derive(Debug, Serialize, ToSchema)]
struct EmbeddingData {
    object: &'static str,
    index: usize,
    #[schema(value_type = Object)]
    embedding: Vector,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize, ToSchema)]
struct EmbeddingUsage {
    prompt_tokens: usize,
    total_tokens: usize,
}

/// One input as the client gave it.
pub(crate) enum Input {
    Text(String),
    Ids(Vec<u32>),
}

/// How an input longer than `to` tokens is cut: keeping the end of its content (vLLM's
/// `truncate_prompt_tokens`) or its start (Ollama's `truncate`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Truncate {
    pub to: usize,
    pub keep_start: bool,
}

/// Tokenizes `items` off the reactor (each within the model's limit, or cut as `truncate`
/// says; an empty text refused unless `empty_ok`, which embeds its special tokens alone)
/// and submits them as one request to the model's embedding queue; returns the vectors in
/// input order and the tokens they took.
pub(crate) async fn embed(
    state: &Selected,
    items: Vec<Input>,
    truncate: Option<Truncate>,
    empty_ok: bool,
) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
    let ids = {
        let state = state.clone();
        blocking(move || tokenize(state.embedding_model()?.0, items, truncate, empty_ok)).await?
    };
    let prompt_tokens = ids.iter().map(Vec::len).sum();
    let (reply, rx) = oneshot::channel();
    let (_, queue) = state.embedding_model()?;
    queue
        .submit(
            EmbedRequest {
                inputs: ids,
                arrived: Instant::now(),
                reply,
            },
            prompt_tokens,
        )
        .map_err(|e| submit_error(state, e))?;
    match rx.await {
        Ok(Ok(v)) => Ok((v, prompt_tokens)),
        Ok(Err(e)) => Err(ApiError::Internal(format!("embedding failed: {e}"))),
        Err(_) => Err(ApiError::EngineStopped),
    }
}

/// The inputs of `input`, or a 400 saying what shape is expected.
fn inputs(input: Value) -> Result<Vec<Input>, ApiError> {
    let shape = "`input` must be a string, a list of strings, a list of token ids, or a list of lists of token ids";
    let ids = |v: &[Value], param: &str| -> Result<Vec<u32>, ApiError> {
        v.iter()
            .map(|t| {
                t.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(|| ApiError::invalid(param, format!("{t} is not a token id")))
            })
            .collect()
    };
    let items = match input {
        Value::String(s) => vec![Input::Text(s)],
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::invalid("input", "`input` is an empty list"))
        }
        Value::Array(items) if items.iter().all(Value::is_number) => {
            vec![Input::Ids(ids(&items, "input")?)]
        }
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(Input::Text(s)),
                Value::Array(v) => Ok(Input::Ids(ids(&v, &format!("input[{i}]"))?)),
                _ => Err(ApiError::invalid(format!("input[{i}]"), shape)),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(ApiError::invalid("input", shape)),
    };
    if items.len() > MAX_INPUTS {
        return Err(ApiError::invalid(
            "input",
            format!(
                "{} inputs: at most {MAX_INPUTS} in one request",
                items.len()
            ),
        ));
    }
    Ok(items)
}

/// The token ids of each input, within the model's limit (cut as `truncate` says when
/// given: a text keeps its special tokens at both ends).
fn tokenize(
    model: &EmbeddingModelInfo,
    items: Vec<Input>,
    truncate: Option<Truncate>,
    empty_ok: bool,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let many = items.len() > 1;
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let param = if many {
                format!("input[{i}]")
            } else {
                "input".to_string()
            };
            let ids = match item {
                Input::Text(t) if t.is_empty() && !empty_ok => {
                    return Err(ApiError::invalid(param, "an input cannot be an empty string"))
                }
                Input::Text(t) => {
                    let enc = model
                        .tokenizer
                        .encode(t, true)
                        .map_err(|e| ApiError::invalid(&param, format!("cannot tokenize: {e}")))?;
                    let ids = enc.get_ids().to_vec();
                    match truncate {
                        Some(t) if ids.len() > t.to => {
                            cut_text(ids, enc.get_special_tokens_mask(), t, &param)?
                        }
                        _ => ids,
                    }
                }
                Input::Ids(ids) if ids.is_empty() => {
                    return Err(ApiError::invalid(param, "an input cannot be an empty list"))
                }
                Input::Ids(ids) => {
                    let ids = check_vocabulary(ids, model.vocab_size, &param)?;
                    match truncate {
                        Some(t) if ids.len() > t.to && t.keep_start => ids[..t.to].to_vec(),
                        Some(t) if ids.len() > t.to => ids[ids.len() - t.to..].to_vec(),
                        _ => ids,
                    }
                }
            };
            if ids.len() > model.max_input_tokens {
                return Err(ApiError::InvalidRequest {
                    message: format!(
                        "{param} is {} tokens, more than this model's limit of {} tokens: shorten it, or set truncate_prompt_tokens to cut it",
                        ids.len(),
                        model.max_input_tokens
                    ),
                    param: Some(param),
                    code: Some("context_length_exceeded"),
                });
            }
            Ok(ids)
        })
        .collect()
}

/// `ids` cut to `t.to` tokens: the special tokens at its start and end kept, and the last
/// (or with `keep_start` the first) of its content.
fn cut_text(
    ids: Vec<u32>,
    special: &[u32],
    t: Truncate,
    param: &str,
) -> Result<Vec<u32>, ApiError> {
    let k = t.to;
    let head = special.iter().take_while(|&&s| s == 1).count();
    let tail = special.iter().rev().take_while(|&&s| s == 1).count();
    if head + tail >= ids.len() || head + tail >= k {
        return Err(ApiError::invalid(
            param,
            format!(
                "truncate_prompt_tokens={k} leaves no room beside the model's {} special tokens",
                head + tail
            ),
        ));
    }
    let content = &ids[head..ids.len() - tail];
    let keep = k - head - tail;
    let mut out = ids[..head].to_vec();
    if t.keep_start {
        out.extend_from_slice(&content[..keep]);
    } else {
        out.extend_from_slice(&content[content.len() - keep..]);
    }
    out.extend_from_slice(&ids[ids.len() - tail..]);
    Ok(out)
}

/// `POST /v1/embeddings`.
#[utoipa::path(
    post,
    path = "/v1/embeddings",
    request_body = EmbeddingRequest,
    responses(
        (status = 200, description = "One vector per input", body = EmbeddingList),
        (status = 400, description = "Bad input, an input past the model's limit, or not an embedding model", body = crate::error::ErrorBody),
        (status = 404, description = "Unknown model", body = crate::error::ErrorBody),
        (status = 429, description = "Waiting queue full (see Retry-After)", body = crate::error::ErrorBody),
    )
)]
pub(crate) async fn embeddings(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<EmbeddingList>, ApiError> {
    let body = generation_body(&state, body)?;
    let req: EmbeddingRequest = parse_object(&body, &[FIELDS], &["model", "input"])?;
    let state = state.select(&req.model)?;
    let (model, _) = state.embedding_model()?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("encoding_format must be float or base64, not {other:?}"),
            ))
        }
    };
    if let Some(d) = req.dimensions {
        if d != model.dimensions as i64 {
            return Err(ApiError::InvalidRequest {
                message: format!(
                    "dimensions={d}: this model's vectors have {} dimensions and it cannot shorten them",
                    model.dimensions
                ),
                param: Some("dimensions".into()),
                code: Some("unsupported_parameter"),
            });
        }
    }
    let truncate = match req.truncate_prompt_tokens {
        None => None,
        Some(-1) => Some(model.max_input_tokens),
        Some(k) if k >= 1 && k as usize <= model.max_input_tokens => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                "truncate_prompt_tokens",
                format!(
                    "truncate_prompt_tokens={k}: give -1 (the model's limit) or 1 to {}",
                    model.max_input_tokens
                ),
            ))
        }
    };
    if let Some(user) = &req.user {
        tracing::info!(user = %user, "embedding request");
    }
    let items = inputs(req.input)?;
    let truncate = truncate.map(|to| Truncate {
        to,
        keep_start: false,
    });
    let (vectors, prompt_tokens) = embed(&state, items, truncate, false).await?;
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| EmbeddingData {
            object: "embedding",
            index,
            embedding: if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Vector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                Vector::Float(v)
            },
        })
        .collect();
    Ok(Json(EmbeddingList {
        object: "list",
        data,
        model: model.name.clone(),
        usage: EmbeddingUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_take_every_shape_and_name_what_is_wrong() {
        let n = |v: Value| inputs(v).map(|i| i.len());
        assert_eq!(n(serde_json::json!("a")).unwrap(), 1);
        assert_eq!(n(serde_json::json!(["a", "b"])).unwrap(), 2);
        assert_eq!(n(serde_json::json!([1, 2, 3])).unwrap(), 1);
        assert_eq!(n(serde_json::json!([[1, 2], [3]])).unwrap(), 2);
        for bad in [
            serde_json::json!([]),
            serde_json::json!(5),
            serde_json::json!([1, -2]),
            serde_json::json!([["a"]]),
            serde_json::json!([{"x": 1}]),
        ] {
            let e = n(bad.clone()).unwrap_err();
            assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST, "{bad}");
        }
        let many = Value::Array(vec![Value::String("a".into()); MAX_INPUTS + 1]);
        assert!(n(many).unwrap_err().to_string().contains("at most 2048"));
    }

    #[test]
    fn a_cut_text_keeps_its_special_tokens_and_its_end() {
        let ids = vec![101, 1, 2, 3, 4, 5, 102];
        let special = [1, 0, 0, 0, 0, 0, 1];
        let cut = |to, keep_start| Truncate { to, keep_start };
        assert_eq!(
            cut_text(ids.clone(), &special, cut(4, false), "input").unwrap(),
            vec![101, 4, 5, 102]
        );
        assert_eq!(
            cut_text(ids.clone(), &special, cut(4, true), "input").unwrap(),
            vec![101, 1, 2, 102]
        );
        assert!(cut_text(ids, &special, cut(2, false), "input").is_err());
    }
}
