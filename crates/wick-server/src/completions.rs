//! `POST /v1/completions`: raw prompts (text or token ids), one sequence per prompt and
//! choice, answered as one JSON body or as SSE.

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
use crate::openai::{Completion, CompletionChoice, CompletionLogprobs, Usage};
use crate::sse::{json_event, sse};
use crate::validate::parse_completion;
use crate::{logprobs, ApiError, AppState, RequestTag, Selected};

/// Text completion of raw prompts: JSON, or with `stream: true` SSE.
#[utoipa::path(
    post,
    path = "/v1/completions",
    request_body = crate::openai::CompletionRequest,
    responses(
        (status = 200, description = "The completion (or an SSE stream)", body = Completion),
        (status = 400, description = "Bad input, naming the parameter", body = crate::error::ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = crate::error::ErrorBody),
        (status = 404, description = "Unknown model", body = crate::error::ErrorBody),
        (status = 429, description = "Waiting queue full (see Retry-After)", body = crate::error::ErrorBody),
        (status = 503, description = "Loading, or could not start in time", body = crate::error::ErrorBody),
    )
)]
pub(crate) async fn completions(
    State(state): State<AppState>,
    Extension(tag): Extension<RequestTag>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = generation_body(&state, body)?;
    let req = parse_completion(&body)?;
    let started = start(&state, &tag, req).await?;
    let reply = Reply {
        id: reply_id("cmpl", started.runs.len()),
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
    fn body(&self, choices: Vec<CompletionChoice>, usage: Option<Option<Usage>>) -> Completion {
        Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }

    fn logprobs(&self, tokens: &[GenToken], offset: usize, out: &mut Option<CompletionLogprobs>) {
        if tokens.iter().all(|t| t.logprobs.is_none()) {
            return;
        }
        if let Ok(model) = self.state.model() {
            logprobs::completion(
                &model.tokenizer,
                tokens,
                offset,
                out.get_or_insert_with(Default::default),
            );
        }
    }
}

async fn complete(reply: Reply, started: Submitted) -> Result<Json<Completion>, ApiError> {
    let (done, usage) = finish_all(started.runs, &started.prompts).await?;
    let choices = done
        .into_iter()
        .map(|f| {
            let mut lps = None;
            reply.logprobs(&f.tokens, 0, &mut lps);
            CompletionChoice {
                index: f.index,
                text: f.text,
                logprobs: lps,
                finish_reason: Some(f.reason.openai()),
            }
        })
        .collect();
    Ok(Json(reply.body(choices, Some(Some(usage)))))
}

fn stream(reply: Reply, started: Submitted) -> impl IntoResponse {
    let Submitted {
        runs,
        prompts,
        include_usage,
        ..
    } = started;
    let usage_field = include_usage.then_some(None);
    let total = runs.len();
    let events = async_stream::stream! {
        let mut usages = Vec::new();
        let mut offsets = vec![0usize; total];
        let mut pieces = merge(runs);
        while let Some((index, piece)) = pieces.next().await {
            match piece {
                Piece::Text { text, tokens } => {
                    let mut lps = None;
                    reply.logprobs(&tokens, offsets[index], &mut lps);
                    offsets[index] += text.len();
                    let c = CompletionChoice { index, text, logprobs: lps, finish_reason: None };
                    yield Ok::<_, Infallible>(json_event(&reply.body(vec![c], usage_field)));
                }
                Piece::Finish { reason, usage, .. } => {
                    usages.push(usage);
                    let c = CompletionChoice { index, text: String::new(), logprobs: None, finish_reason: Some(reason.openai()) };
                    yield Ok(json_event(&reply.body(vec![c], usage_field)));
                }
                Piece::Error(e) => {
                    yield Ok(json_event(&e.body()));
                    break;
                }
                // Raw prompts are never parsed into reasoning or calls.
                Piece::Reasoning(_) | Piece::Call { .. } | Piece::Args { .. } => {}
            }
        }
        if include_usage && usages.len() == total {
            yield Ok(json_event(&reply.body(vec![], Some(Some(total_usage(&prompts, &usages))))));
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    sse(events)
}
