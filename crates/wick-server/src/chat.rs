//! `POST /v1/chat/completions`: render the model's template, submit one sequence per choice,
//! answer as one JSON body or as SSE.

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::StreamExt;

use crate::generation::{finish_all, merge, start, total_usage, GenToken, Piece, Submitted};
use crate::http::{generation_body, reply_id, unix_now};
use crate::openai::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatLogprobs, Choice, ChunkChoice,
    Delta, FunctionCall, FunctionDelta, ToolCall, ToolCallDelta, Usage,
};
use crate::sse::{json_event, sse};
use crate::validate::parse_chat;
use crate::{logprobs, ApiError, AppState, RequestTag, Selected};

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
    let body = generation_body(&state, body)?;
    let req = parse_chat(&body)?;
    let started = start(&state, &tag, req).await?;
    let reply = Reply {
        id: reply_id("chatcmpl", started.runs.len()),
        created: unix_now(),
        model: started.model.clone(),
        state: started.state.clone(),
    };
    Ok(if started.stream {
        stream(reply, started).into_response()
    } else {
        complete(reply, started).await?.into_response()
    })
}

struct Reply {
    id: String,
    created: u64,
    model: String,
    state: Selected,
}

impl Reply {
    fn logprobs(&self, tokens: &[GenToken]) -> Option<ChatLogprobs> {
        let model = self.state.model().ok()?;
        logprobs::chat(&model.tokenizer, tokens)
    }
}

async fn complete(reply: Reply, started: Submitted) -> Result<Json<ChatCompletion>, ApiError> {
    let (done, usage) = finish_all(started.runs, &started.prompts).await?;
    let choices = done
        .into_iter()
        .map(|f| {
            let reasoning = (!f.reasoning.is_empty()).then_some(f.reasoning);
            Choice {
                index: f.index,
                logprobs: reply.logprobs(&f.tokens),
                message: AssistantMessage {
                    role: "assistant",
                    // Null when the answer is only tool calls, as OpenAI's is.
                    content: if f.calls.is_empty() || !f.text.is_empty() {
                        Some(f.text)
                    } else {
                        None
                    },
                    reasoning_content: reasoning.clone(),
                    reasoning,
                    tool_calls: f
                        .calls
                        .into_iter()
                        .map(|c| ToolCall {
                            id: c.id,
                            kind: "function",
                            function: FunctionCall {
                                name: c.name,
                                arguments: c.arguments,
                            },
                        })
                        .collect(),
                },
                finish_reason: Some(f.reason.openai()),
            }
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

/// One call's piece of a stream delta.
fn call_delta(index: usize, id: Option<String>, name: Option<String>, arguments: String) -> Delta {
    Delta {
        tool_calls: Some(vec![ToolCallDelta {
            index,
            kind: id.as_ref().map(|_| "function"),
            id,
            function: FunctionDelta { name, arguments },
        }]),
        ..Delta::default()
    }
}

fn stream(reply: Reply, started: Submitted) -> impl IntoResponse {
    let Submitted {
        runs,
        prompts,
        include_usage,
        tools,
        ..
    } = started;
    let usage_field = include_usage.then_some(None);
    let indices: Vec<usize> = runs.iter().map(|r| r.index).collect();
    // An answer that may be only tool calls starts without content (null, as OpenAI's).
    let first_content = (!tools).then(String::new);
    let events = async_stream::stream! {
        for &index in &indices {
            let delta = Delta { role: Some("assistant"), content: first_content.clone(), ..Delta::default() };
            let c = ChunkChoice { index, delta, logprobs: None, finish_reason: None };
            yield Ok::<_, Infallible>(chunk(&reply, c, usage_field));
        }
        let mut usages = Vec::new();
        let mut pieces = merge(runs);
        while let Some((index, piece)) = pieces.next().await {
            let (delta, logprobs, finish_reason) = match piece {
                Piece::Text { text, tokens } => {
                    (Delta { content: Some(text), ..Delta::default() }, reply.logprobs(&tokens), None)
                }
                Piece::Reasoning(text) => {
                    let delta = Delta { reasoning_content: Some(text.clone()), reasoning: Some(text), ..Delta::default() };
                    (delta, None, None)
                }
                Piece::Call { call, id, name, tokens } => (call_delta(call, Some(id), Some(name), String::new()), reply.logprobs(&tokens), None),
                Piece::Args { call, args, tokens } => (call_delta(call, None, None, args), reply.logprobs(&tokens), None),
                Piece::Finish { reason, usage, .. } => {
                    usages.push(usage);
                    (Delta::default(), None, Some(reason.openai()))
                }
                Piece::Error(e) => {
                    yield Ok(json_event(&e.body()));
                    break;
                }
            };
            let c = ChunkChoice { index, delta, logprobs, finish_reason };
            yield Ok(chunk(&reply, c, usage_field));
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
    sse(events)
}
