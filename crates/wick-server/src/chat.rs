//! `POST /v1/chat/completions`: from a validated request to an engine submission, and from
//! token events back to a JSON body or an SSE stream.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use wick_core::{EngineRequest, ErrorKind, FinishReason, SubmitError, TokenEvent};

use crate::detok::{Detokenizer, StopBuffer};
use crate::openai::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, Choice, ChunkChoice, Delta, Usage,
};
use crate::routes::unix_now;
use crate::validate::{parse_chat, ValidChat};
use crate::{ApiError, AppState, ServedModel};

pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(crate::MAX_BODY_BYTES)
        } else {
            ApiError::invalid("body", e.body_text())
        }
    })?;
    let model = state.model()?;
    let req = parse_chat(&body)?;
    if req.model != model.name {
        return Err(ApiError::ModelNotFound(req.model));
    }
    let prompt = tokenize_prompt(&state, &req).await?;
    let max_tokens = output_budget(model, prompt.len(), req.max_tokens)?;
    if let Some(user) = &req.user {
        tracing::info!(user = %user, prompt_tokens = prompt.len(), "chat completion");
    }
    let id = state.next_id();
    let (tx, rx) = unbounded_channel();
    let prompt_tokens = prompt.len();
    state
        .engine()
        .submit(EngineRequest {
            id,
            prompt,
            max_tokens,
            stop_token_ids: model.stop_token_ids.clone(),
            sampling: req.sampling.clone(),
            arrived: Instant::now(),
            events: tx,
        })
        .map_err(|e| match e {
            SubmitError::QueueFull {
                waiting,
                waiting_tokens,
                retry_after_secs,
            } => {
                state
                    .metrics()
                    .requests_rejected
                    .with_label_values(&["queue_full"])
                    .inc();
                ApiError::QueueFull {
                    waiting,
                    waiting_tokens,
                    retry_after: retry_after_secs,
                }
            }
            SubmitError::EngineStopped => ApiError::EngineStopped,
        })?;
    let mut gen = Generation::new(rx, model, req.stop.clone(), prompt_tokens);
    // Wait for the first event, so that a request the engine refuses (queue timeout, too
    // large, failure) gets its own status code rather than a stream that fails at once.
    let first = match gen.next().await {
        Some(Piece::Error(e)) => return Err(e),
        Some(piece) => piece,
        None => return Err(ApiError::EngineStopped),
    };
    let reply = Reply {
        id: format!("chatcmpl-{:x}{:08x}", unix_now(), id.0),
        created: unix_now(),
        model: model.name.clone(),
    };
    Ok(if req.stream {
        stream(reply, first, gen, req.include_usage).into_response()
    } else {
        complete(reply, first, gen).await?.into_response()
    })
}

/// Renders the chat template and tokenizes the prompt on a blocking thread.
async fn tokenize_prompt(state: &AppState, req: &ValidChat) -> Result<Vec<u32>, ApiError> {
    let state = state.clone();
    let messages = req.messages.clone();
    tokio::task::spawn_blocking(move || {
        let model = state.model()?;
        let text = model
            .template
            .render(&messages)
            .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
        let enc = model
            .tokenizer
            .encode(text, false)
            .map_err(|e| ApiError::invalid("messages", format!("cannot tokenize: {e}")))?;
        Ok(enc.get_ids().to_vec())
    })
    .await
    .map_err(|e| ApiError::Internal(format!("tokenizer task failed: {e}")))?
}

/// How many tokens the request may generate, or a 400 if the prompt leaves no room.
fn output_budget(
    model: &ServedModel,
    prompt_len: usize,
    max_tokens: Option<usize>,
) -> Result<usize, ApiError> {
    let limit = model.max_model_len;
    if prompt_len >= limit {
        return Err(ApiError::InvalidRequest {
            message: format!(
                "This model's maximum context length is {limit} tokens; the messages take {prompt_len}."
            ),
            param: Some("messages".into()),
            code: Some("context_length_exceeded"),
        });
    }
    match max_tokens {
        Some(m) if prompt_len + m > limit => Err(ApiError::InvalidRequest {
            message: format!(
                "This model's maximum context length is {limit} tokens; the messages take {prompt_len} and max_tokens asks for {m}."
            ),
            param: Some("max_tokens".into()),
            code: Some("context_length_exceeded"),
        }),
        Some(m) => Ok(m),
        None => Ok(limit - prompt_len),
    }
}

/// What a generation yields, in order: text pieces, then one end.
enum Piece {
    Text(String),
    Finish { reason: &'static str, usage: Usage },
    Error(ApiError),
}

/// One request's token events turned into text: detokenized, stop strings applied.
struct Generation {
    rx: UnboundedReceiver<TokenEvent>,
    detok: Detokenizer,
    stop: StopBuffer,
    prompt_tokens: usize,
    completion_tokens: usize,
    pending: Option<Piece>,
    done: bool,
}

impl Generation {
    fn new(
        rx: UnboundedReceiver<TokenEvent>,
        model: &ServedModel,
        stops: Vec<String>,
        prompt_tokens: usize,
    ) -> Self {
        Self {
            rx,
            detok: Detokenizer::new(Arc::clone(&model.tokenizer)),
            stop: StopBuffer::new(stops),
            prompt_tokens,
            completion_tokens: 0,
            pending: None,
            done: false,
        }
    }

    /// Ends the generation; the receiver is closed, so the engine frees the sequence.
    fn end(&mut self, piece: Piece, text: String) -> Option<Piece> {
        self.done = true;
        self.rx.close();
        if text.is_empty() {
            return Some(piece);
        }
        self.pending = Some(piece);
        Some(Piece::Text(text))
    }

    async fn next(&mut self) -> Option<Piece> {
        if let Some(p) = self.pending.take() {
            return Some(p);
        }
        if self.done {
            return None;
        }
        loop {
            match self.rx.recv().await {
                Some(TokenEvent::Token { id }) => {
                    self.completion_tokens += 1;
                    let text = self.detok.push(id);
                    let (emit, stopped) = self.stop.push(&text);
                    if stopped {
                        let usage = Usage::new(self.prompt_tokens, self.completion_tokens);
                        return self.end(
                            Piece::Finish {
                                reason: "stop",
                                usage,
                            },
                            emit,
                        );
                    }
                    if !emit.is_empty() {
                        return Some(Piece::Text(emit));
                    }
                }
                Some(TokenEvent::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    let (mut rest, stopped) = self.stop.push(&self.detok.flush());
                    if !stopped {
                        rest.push_str(&self.stop.finish());
                    }
                    let reason = match reason {
                        FinishReason::Stop => "stop",
                        FinishReason::Length => "length",
                        FinishReason::Abort => {
                            let e = ApiError::Internal("the request was aborted".into());
                            return self.end(Piece::Error(e), rest);
                        }
                    };
                    let usage = Usage::new(prompt_tokens, completion_tokens);
                    return self.end(Piece::Finish { reason, usage }, rest);
                }
                Some(TokenEvent::Error { kind, message }) => {
                    let e = match kind {
                        ErrorKind::QueueTimeout => ApiError::QueueTimeout(message),
                        ErrorKind::Rejected => ApiError::InvalidRequest {
                            message,
                            param: Some("max_tokens".into()),
                            code: Some("context_length_exceeded"),
                        },
                        ErrorKind::Internal => ApiError::Internal(message),
                    };
                    return self.end(Piece::Error(e), String::new());
                }
                None => return self.end(Piece::Error(ApiError::EngineStopped), String::new()),
            }
        }
    }
}

struct Reply {
    id: String,
    created: u64,
    model: String,
}

async fn complete(
    reply: Reply,
    first: Piece,
    mut gen: Generation,
) -> Result<Json<ChatCompletion>, ApiError> {
    let mut content = String::new();
    let mut first = Some(first);
    loop {
        let piece = match first.take() {
            Some(p) => p,
            None => match gen.next().await {
                Some(p) => p,
                None => break,
            },
        };
        match piece {
            Piece::Text(t) => content.push_str(&t),
            Piece::Error(e) => return Err(e),
            Piece::Finish { reason, usage } => {
                return Ok(Json(ChatCompletion {
                    id: reply.id,
                    object: "chat.completion",
                    created: reply.created,
                    model: reply.model,
                    choices: vec![Choice {
                        index: 0,
                        message: AssistantMessage {
                            role: "assistant",
                            content,
                        },
                        logprobs: None,
                        finish_reason: Some(reason),
                    }],
                    usage,
                }))
            }
        }
    }
    Err(ApiError::Internal(
        "the generation ended without a finish".into(),
    ))
}

fn chunk(
    reply: &Reply,
    delta: Delta,
    finish: Option<&'static str>,
    usage: Option<Option<Usage>>,
) -> Event {
    let c = ChatCompletionChunk {
        id: reply.id.clone(),
        object: "chat.completion.chunk",
        created: reply.created,
        model: reply.model.clone(),
        choices: vec![ChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason: finish,
        }],
        usage,
    };
    json_event(&c)
}

fn json_event<T: serde::Serialize>(value: &T) -> Event {
    Event::default().data(serde_json::to_string(value).unwrap_or_else(|_| "{}".into()))
}

fn stream(
    reply: Reply,
    first: Piece,
    mut gen: Generation,
    include_usage: bool,
) -> impl IntoResponse {
    let usage_field = include_usage.then_some(None);
    let events = async_stream::stream! {
        let role = Delta { role: Some("assistant"), content: Some(String::new()) };
        yield Ok::<_, Infallible>(chunk(&reply, role, None, usage_field));
        let mut first = Some(first);
        loop {
            let piece = match first.take() {
                Some(p) => p,
                None => match gen.next().await {
                    Some(p) => p,
                    None => break,
                },
            };
            match piece {
                Piece::Text(t) => {
                    let delta = Delta { role: None, content: Some(t) };
                    yield Ok(chunk(&reply, delta, None, usage_field));
                }
                Piece::Finish { reason, usage } => {
                    yield Ok(chunk(&reply, Delta::default(), Some(reason), usage_field));
                    if include_usage {
                        let last = ChatCompletionChunk {
                            id: reply.id.clone(),
                            object: "chat.completion.chunk",
                            created: reply.created,
                            model: reply.model.clone(),
                            choices: vec![],
                            usage: Some(Some(usage)),
                        };
                        yield Ok(json_event(&last));
                    }
                    break;
                }
                Piece::Error(e) => {
                    yield Ok(json_event(&e.body()));
                    break;
                }
            }
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    (
        [("x-accel-buffering", "no"), ("cache-control", "no-cache")],
        Sse::new(events).keep_alive(KeepAlive::default()),
    )
}

#[allow(dead_code)]
fn assert_stream_is_send<S: Stream + Send>(_: S) {}
