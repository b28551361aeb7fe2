//! `POST /v1/chat/completions`: render the model's template, submit one sequence per choice,
//! answer as one JSON body or as SSE.

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::StreamExt;

use crate::generation::{finish_all, merge, submit, total_usage, GenToken, Piece, Run};
use crate::openai::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatLogprobs, Choice, ChunkChoice,
    Delta, Usage,
};
use crate::routes::{blocking, body_bytes, check_model, json_event, reply_id, unix_now};
use crate::validate::parse_chat;
use crate::{logprobs, ApiError, AppState, RequestTag};

/// Chat completion: JSON, or with `stream: true` an SSE stream of `ChatCompletionChunk`s
/// ending with `data: [DONE]`.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    request_body = crate::openai::ChatCompletionRequest,
    responses(
        (status = 200, description = "The completion (or an SSE stream)", body = ChatCompletion),
        (status = 400, description = "Bad input, naming the parameter", body = crate::error::ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = crate::error::ErrorBody),
        (status = 404, description = "Unknown model", body = crate::error::ErrorBody),
        (status = 429, description = "Waiting queue full (see Retry-After)", body = crate::error::ErrorBody),
        (status = 503, description = "Loading, or could not start in time", body = crate::error::ErrorBody),
    )
)]
pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    Extension(tag): Extension<RequestTag>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let model = state.model()?;
    let req = parse_chat(&body)?;
    check_model(model, &req.model)?;
    if let Some(user) = &req.sampling.user {
        tracing::info!(user = %user, "chat completion");
    }
    let prompt = {
        let state = state.clone();
        let messages = req.messages.clone();
        blocking(move || {
            let model = state.model()?;
            let text = model
                .chat_template()?
                .render(&messages)
                .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
            model.encode(&text, "messages")
        })
        .await?
    };
    let prompts = [prompt];
    let runs = submit(
        &state,
        &tag,
        model,
        &prompts,
        &req.sampling,
        &req.response_format,
        "messages",
    )
    .await?;
    let reply = Reply {
        id: reply_id("chatcmpl", runs.len()),
        created: unix_now(),
        model: model.name.clone(),
        state: state.clone(),
    };
    Ok(if req.sampling.stream {
        stream(reply, runs, req.sampling.include_usage, prompts.to_vec()).into_response()
    } else {
        complete(reply, runs, &prompts).await?.into_response()
    })
}

struct Reply {
    id: String,
    created: u64,
    model: String,
    state: AppState,
}

impl Reply {
    fn logprobs(&self, tokens: &[GenToken]) -> Option<ChatLogprobs> {
        let model = self.state.model().ok()?;
        logprobs::chat(&model.tokenizer, tokens)
    }
}

async fn complete(
    reply: Reply,
    runs: Vec<Run>,
    prompts: &[Vec<u32>],
) -> Result<Json<ChatCompletion>, ApiError> {
    let (done, usage) = finish_all(runs, prompts).await?;
    let choices = done
        .into_iter()
        .map(|f| Choice {
            index: f.index,
            logprobs: reply.logprobs(&f.tokens),
            message: AssistantMessage {
                role: "assistant",
                content: f.text,
            },
            finish_reason: Some(f.reason),
        })
        .collect();
    Ok(Json(ChatCompletion {
        id: reply.id,
        object: "chat.completion",
        created: reply.created,
        model: reply.model,
        choices,
        usage,
    }))
}

fn chunk(reply: &Reply, choice: ChunkChoice, usage: Option<Option<Usage>>) -> Event {
    json_event(&ChatCompletionChunk {
        id: reply.id.clone(),
        object: "chat.completion.chunk",
        created: reply.created,
        model: reply.model.clone(),
        choices: vec![choice],
        usage,
    })
}

fn stream(
    reply: Reply,
    runs: Vec<Run>,
    include_usage: bool,
    prompts: Vec<Vec<u32>>,
) -> impl IntoResponse {
    let usage_field = include_usage.then_some(None);
    let indices: Vec<usize> = runs.iter().map(|r| r.index).collect();
    let events = async_stream::stream! {
        for &index in &indices {
            let delta = Delta { role: Some("assistant"), content: Some(String::new()) };
            let c = ChunkChoice { index, delta, logprobs: None, finish_reason: None };
            yield Ok::<_, Infallible>(chunk(&reply, c, usage_field));
        }
        let mut usages = Vec::new();
        let mut pieces = merge(runs);
        while let Some((index, piece)) = pieces.next().await {
            match piece {
                Piece::Text { text, tokens } => {
                    let delta = Delta { role: None, content: Some(text) };
                    let c = ChunkChoice { index, delta, logprobs: reply.logprobs(&tokens), finish_reason: None };
                    yield Ok(chunk(&reply, c, usage_field));
                }
                Piece::Finish { reason, usage } => {
                    usages.push(usage);
                    let c = ChunkChoice { index, delta: Delta::default(), logprobs: None, finish_reason: Some(reason) };
                    yield Ok(chunk(&reply, c, usage_field));
                }
                Piece::Error(e) => {
                    yield Ok(json_event(&e.body()));
                    break;
                }
            }
        }
        if include_usage && usages.len() == indices.len() {
            yield Ok(json_event(&ChatCompletionChunk {
                id: reply.id.clone(),
                object: "chat.completion.chunk",
                created: reply.created,
                model: reply.model.clone(),
                choices: vec![],
                usage: Some(Some(total_usage(&prompts, &usages))),
            }));
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    (
        [("x-accel-buffering", "no"), ("cache-control", "no-cache")],
        Sse::new(events).keep_alive(KeepAlive::default()),
    )
}
