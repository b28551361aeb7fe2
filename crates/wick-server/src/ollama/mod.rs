//! Ollama's native API under `/api/`: chat and generate (streamed as NDJSON unless
//! `stream: false`, durations in nanoseconds, `done_reason`), embed and the older
//! embeddings, and the model routes (`models`). A chat or generate body becomes the same
//! [`GenRequest`] every dialect does (`request`); the pieces come back as Ollama's chunks.
//! Errors under `/api/` are `{"error": "..."}` (`crate::error`).

pub(crate) mod models;
pub(crate) mod request;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokenizers::Tokenizer;

use crate::embeddings::{self, Input, Truncate};
use crate::generation::{finish_all, start, CallOut, Finish, Finished, GenToken, Piece, Run};
use crate::http::generation_body;
use crate::openai::Usage;
use crate::validate::parse_object;
use crate::{ApiError, AppState, RequestTag};

pub(crate) use models::{ps, show, tags, unsupported, version};
use request::{parse_chat, parse_generate, ChatRequest, GenerateRequest, Parsed};
pub(crate) use request::{CHAT_FIELDS, GENERATE_FIELDS};

/// A time as Ollama writes it: RFC 3339 in UTC with nanoseconds.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        d.subsec_nanos()
    )
}

/// The served name a request's `model` means: as given, or without Ollama's default tag
/// (`smollm2:latest` is `smollm2`).
pub(crate) fn served_name(state: &AppState, requested: String) -> String {
    match requested.strip_suffix(":latest") {
        Some(base) if state.select(&requested).is_err() && state.select(base).is_ok() => {
            base.to_string()
        }
        _ => requested,
    }
}

/// Which route's shape the answer takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Chat,
    Generate,
}

/// `POST /api/chat`.
#[utoipa::path(
    post,
    path = "/api/chat",
    request_body = Object,
    responses(
        (status = 200, description = "The message, or with stream unset or true an NDJSON stream of chunks", body = Object),
        (status = 400, description = "Bad input: {\"error\": \"...\"}", body = Object),
        (status = 404, description = "Unknown model", body = Object),
    )
)]
pub(crate) async fn chat(
    State(state): State<AppState>,
    Extension(tag): Extension<RequestTag>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let body = generation_body(&state, body)?;
    let mut req: ChatRequest = parse_object(&body, &[CHAT_FIELDS], &["model"])?;
    req.model = served_name(&state, req.model);
    answer(&state, &tag, parse_chat(req)?, Route::Chat, arrived).await
}

/// `POST /api/generate`.
#[utoipa::path(
    post,
    path = "/api/generate",
    request_body = Object,
    responses(
        (status = 200, description = "The response, or with stream unset or true an NDJSON stream of chunks", body = Object),
        (status = 400, description = "Bad input: {\"error\": \"...\"}", body = Object),
        (status = 404, description = "Unknown model", body = Object),
    )
)]
pub(crate) async fn generate(
    State(state): State<AppState>,
    Extension(tag): Extension<RequestTag>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let body = generation_body(&state, body)?;
    let mut req: GenerateRequest = parse_object(&body, &[GENERATE_FIELDS], &["model"])?;
    req.model = served_name(&state, req.model);
    let selected = state.select(&req.model)?;
    let parsed = parse_generate(req, selected.model()?)?;
    answer(&state, &tag, parsed, Route::Generate, arrived).await
}

async fn answer(
    state: &AppState,
    tag: &RequestTag,
    parsed: Parsed,
    route: Route,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let (req, think) = match parsed {
        Parsed::Load { model, .. } => {
            // The model is loaded (every model is, from start-up): say so, once.
            state.select(&model)?.model()?;
            let mut reply = Builder::new(route, model, false, arrived).base();
            reply["done"] = json!(true);
            reply["done_reason"] = json!("load");
            return Ok(Json(reply).into_response());
        }
        Parsed::Generate { req, think } => (*req, think),
    };
    let shows_thinking = think.shows(state.select(&req.model)?.model()?, &req.model)?;
    let wants_logprobs = req.sampling.params.logprobs.is_some();
    let started = start(state, tag, req).await?;
    let mut builder = Builder::new(route, started.model.clone(), shows_thinking, arrived);
    if wants_logprobs {
        builder.tokenizer = Some(Arc::clone(&started.state.model()?.tokenizer));
    }
    if started.stream {
        let Some(run) = started.runs.into_iter().next() else {
            return Err(ApiError::Internal("no generation was started".into()));
        };
        let lines =
            chunks(builder, run).map(|v| Ok::<_, Infallible>(Bytes::from(format!("{v}\n"))));
        return Ok((
            [
                (header::CONTENT_TYPE, "application/x-ndjson"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            Body::from_stream(lines),
        )
            .into_response());
    }
    let (mut done, _) = finish_all(started.runs, &started.prompts).await?;
    let Some(done) = done.pop() else {
        return Err(ApiError::Internal("no generation was started".into()));
    };
    Ok(Json(builder.whole(done)).into_response())
}

/// A tool call as Ollama writes it: the arguments an object (arguments that do not parse:
/// an empty one).
fn call_value(index: usize, call: &CallOut) -> Value {
    let arguments = match serde_json::from_str::<Value>(&call.arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ => Value::Object(Map::new()),
    };
    json!({"id": call.id, "function": {"index": index, "name": call.name, "arguments": arguments}})
}

/// Drops the last call if the output budget cut it off (its arguments do not parse): it is
/// not a call.
fn drop_cut_call(calls: &mut Vec<CallOut>, reason: Finish) {
    let cut = calls
        .last()
        .is_some_and(|c| serde_json::from_str::<Map<String, Value>>(&c.arguments).is_err());
    if reason == Finish::Length && cut {
        calls.pop();
    }
}

/// Writes Ollama's chunks: one per piece as a stream goes, and the whole answer.
struct Builder {
    route: Route,
    model: String,
    shows_thinking: bool,
    arrived: Instant,
    first_token: Instant,
    /// The stream's calls: those sent, then the one being written.
    calls: Vec<CallOut>,
    sent: usize,
    /// Set when log-probabilities were asked for; the stream's tokens not yet reported.
    tokenizer: Option<Arc<Tokenizer>>,
    pending: Vec<GenToken>,
}

impl Builder {
    fn new(route: Route, model: String, shows_thinking: bool, arrived: Instant) -> Self {
        Self {
            route,
            model,
            shows_thinking,
            arrived,
            first_token: Instant::now(),
            calls: Vec::new(),
            sent: 0,
            tokenizer: None,
            pending: Vec::new(),
        }
    }

    /// `tokens`' log-probabilities (`token`, `logprob`, `bytes`, `top_logprobs`), if asked
    /// for and any.
    fn logprobs(&self, tokens: &[GenToken]) -> Option<Vec<Value>> {
        let lp = crate::logprobs::chat(self.tokenizer.as_ref()?, tokens)?;
        // An f32 written as its shortest decimal (as the OpenAI dialect writes it), not
        // widened to f64's digits.
        let num = |x: f32| {
            x.to_string()
                .parse::<f64>()
                .map_or(Value::Null, |f| json!(f))
        };
        Some(
            lp.content
                .iter()
                .map(|l| {
                    let top: Vec<Value> = l
                        .top_logprobs
                        .iter()
                        .map(|t| json!({"token": t.token, "logprob": num(t.logprob), "bytes": t.bytes}))
                        .collect();
                    json!({"token": l.token, "logprob": num(l.logprob), "bytes": l.bytes, "top_logprobs": top})
                })
                .collect(),
        )
    }

    /// A chunk with no text yet: the model, the time and an empty message or response.
    fn base(&mut self) -> Value {
        let mut v = json!({"model": self.model, "created_at": rfc3339(SystemTime::now())});
        match self.route {
            Route::Chat => v["message"] = json!({"role": "assistant", "content": ""}),
            Route::Generate => v["response"] = json!(""),
        }
        v
    }

    /// Sets `v`'s text, thinking, calls (chat only) and log-probabilities.
    fn fill(
        &self,
        v: &mut Value,
        content: &str,
        thinking: &str,
        calls: Vec<Value>,
        logprobs: Option<Vec<Value>>,
    ) {
        let at = match self.route {
            Route::Chat => {
                v["message"]["content"] = json!(content);
                &mut v["message"]
            }
            Route::Generate => {
                v["response"] = json!(content);
                &mut *v
            }
        };
        if !thinking.is_empty() {
            at["thinking"] = json!(thinking);
        }
        if !calls.is_empty() {
            at["tool_calls"] = Value::Array(calls);
        }
        if let Some(lp) = logprobs {
            v["logprobs"] = Value::Array(lp);
        }
    }

    /// A streamed chunk of `content` and `thinking`, and `calls`, with the pending tokens'
    /// log-probabilities.
    fn chunk(&mut self, content: &str, thinking: &str, calls: Vec<Value>) -> Value {
        let mut v = self.base();
        let pending = std::mem::take(&mut self.pending);
        let lp = self.logprobs(&pending);
        self.fill(&mut v, content, thinking, calls, lp);
        v["done"] = json!(false);
        v
    }

    /// The calls finished and not yet sent, as a chunk.
    fn flush_calls(&mut self, out: &mut Vec<Value>) {
        let upto = self.calls.len();
        if upto > self.sent {
            let calls = (self.sent..upto)
                .map(|i| call_value(i, &self.calls[i]))
                .collect();
            self.sent = upto;
            let c = self.chunk("", "", calls);
            out.push(c);
        }
    }

    /// Adds a streamed piece, with its chunks; true at the end.
    fn piece(&mut self, piece: Piece, out: &mut Vec<Value>) -> bool {
        match piece {
            Piece::Text { text, tokens } => {
                self.pending.extend(tokens);
                let c = self.chunk(&text, "", Vec::new());
                out.push(c);
            }
            Piece::Reasoning(t) if self.shows_thinking => {
                let c = self.chunk("", &t, Vec::new());
                out.push(c);
            }
            Piece::Reasoning(_) => {}
            Piece::Call {
                id, name, tokens, ..
            } => {
                self.pending.extend(tokens);
                self.flush_calls(out);
                self.calls.push(CallOut {
                    id,
                    name,
                    arguments: String::new(),
                });
            }
            Piece::Args { call, args, tokens } => {
                self.pending.extend(tokens);
                if let Some(c) = self.calls.get_mut(call) {
                    c.arguments.push_str(&args);
                }
            }
            Piece::Finish { reason, usage, .. } => {
                if self.calls.len() > self.sent {
                    drop_cut_call(&mut self.calls, reason);
                }
                self.flush_calls(out);
                let last = self.last(reason, usage);
                out.push(last);
                return true;
            }
            Piece::Error(_) => {}
        }
        false
    }

    /// The final chunk: done, why, and the counts and durations (nanoseconds, measured at
    /// the server: from the request's arrival to its first token, and from there to the
    /// end).
    fn last(&mut self, reason: Finish, usage: Usage) -> Value {
        let mut v = self.base();
        let ns = |d: std::time::Duration| d.as_nanos() as u64;
        let now = Instant::now();
        let fields = json!({
            "done": true,
            // A turn that ends in tool calls ends as a stop, in Ollama's words.
            "done_reason": if reason == Finish::Length { "length" } else { "stop" },
            "total_duration": ns(now - self.arrived),
            "load_duration": 0,
            "prompt_eval_count": usage.prompt_tokens,
            "prompt_eval_duration": ns(self.first_token - self.arrived),
            "eval_count": usage.completion_tokens,
            "eval_duration": ns(now - self.first_token),
        });
        if let (Value::Object(v), Value::Object(f)) = (&mut v, fields) {
            v.extend(f);
        }
        v
    }

    /// The whole answer, for `stream: false`.
    fn whole(&mut self, mut done: Finished) -> Value {
        let mut v = self.last(done.reason, done.usage);
        drop_cut_call(&mut done.calls, done.reason);
        let calls = done
            .calls
            .iter()
            .enumerate()
            .map(|(i, c)| call_value(i, c))
            .collect();
        let thinking = if self.shows_thinking {
            done.reasoning.as_str()
        } else {
            ""
        };
        let lp = self
            .logprobs(&done.tokens)
            .or(self.tokenizer.as_ref().map(|_| Vec::new()));
        self.fill(&mut v, &done.text, thinking, calls, lp);
        v
    }
}

/// The streamed chunks; an error after the first is one last `{"error": ...}` line.
fn chunks(mut builder: Builder, mut run: Run) -> impl futures::Stream<Item = Value> + Send {
    async_stream::stream! {
        while let Some(piece) = run.next().await {
            if let Piece::Error(e) = piece {
                yield e.ollama_body();
                break;
            }
            let mut out = Vec::new();
            let end = builder.piece(piece, &mut out);
            for c in out {
                yield c;
            }
            if end {
                break;
            }
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct EmbedRequest {
    pub model: String,
    pub input: Option<Value>,
    pub truncate: Option<bool>,
    pub dimensions: Option<i64>,
    pub keep_alive: Option<Value>,
    pub options: Option<Map<String, Value>>,
}

pub(crate) const EMBED_FIELDS: &[&str] = &[
    "model",
    "input",
    "truncate",
    "dimensions",
    "keep_alive",
    "options",
];

#[derive(Debug, Deserialize)]
pub(crate) struct EmbeddingsRequest {
    pub model: String,
    pub prompt: Option<String>,
    pub keep_alive: Option<Value>,
    pub options: Option<Map<String, Value>>,
}

pub(crate) const EMBEDDINGS_FIELDS: &[&str] = &["model", "prompt", "keep_alive", "options"];

/// Embedding options: checked as the generation options are (a misspelt or mistyped option
/// is a 400), with no effect on the vectors.
fn embed_options(options: Option<&Map<String, Value>>) -> Result<(), ApiError> {
    request::checked_sampling(options, false).map(|_| ())
}

/// `v` scaled to unit length (a zero vector stays as it is).
fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// Embeds texts as Ollama does: a long input cut to keep its start (unless `truncate` is
/// false: then Ollama's length error), an empty text its special tokens alone, every vector
/// of unit length, any number of inputs (submitted in requests of at most
/// [`embeddings::MAX_INPUTS`], in order).
async fn embed_texts(
    state: &AppState,
    model: &str,
    texts: Vec<String>,
    truncate: bool,
) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
    let selected = state.select(model)?;
    let limit = selected.embedding_model()?.0.max_input_tokens;
    let truncate = truncate.then_some(Truncate {
        to: limit,
        keep_start: true,
    });
    let mut vectors = Vec::with_capacity(texts.len());
    let mut tokens = 0;
    let mut texts = texts.into_iter().peekable();
    while texts.peek().is_some() {
        let items = texts
            .by_ref()
            .take(embeddings::MAX_INPUTS)
            .map(Input::Text)
            .collect();
        let (v, n) = embeddings::embed(&selected, items, truncate, true)
            .await
            .map_err(|e| match e {
                ApiError::InvalidRequest {
                    code: Some("context_length_exceeded"),
                    param,
                    ..
                } => ApiError::InvalidRequest {
                    message: format!("the input length exceeds the context length ({limit} tokens): set truncate to true to cut it"),
                    param,
                    code: Some("context_length_exceeded"),
                },
                e => e,
            })?;
        vectors.extend(v);
        tokens += n;
    }
    vectors.iter_mut().for_each(|v| normalize(v));
    Ok((vectors, tokens))
}

/// `POST /api/embed`: unit vectors, one per input (cut to `dimensions` and renormalized).
#[utoipa::path(post, path = "/api/embed", request_body = Object, responses((status = 200, description = "One vector per input", body = Object), (status = 400, body = Object)))]
pub(crate) async fn embed(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let arrived = Instant::now();
    let body = generation_body(&state, body)?;
    let mut req: EmbedRequest = parse_object(&body, &[EMBED_FIELDS], &["model"])?;
    req.model = served_name(&state, req.model);
    request::keep_alive(req.keep_alive.as_ref())?;
    embed_options(req.options.as_ref())?;
    let bad = || {
        ApiError::invalid(
            "input",
            "invalid input type: give a string or a list of strings",
        )
    };
    let texts = match req.input {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) if s.is_empty() => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad()),
    };
    if texts.is_empty() {
        // Ollama's request to load the model: it is loaded.
        state.select(&req.model)?.embedding_model()?;
        return Ok(Json(json!({"model": req.model, "embeddings": []})));
    }
    let (mut vectors, tokens) =
        embed_texts(&state, &req.model, texts, req.truncate.unwrap_or(true)).await?;
    if let Some(d) = req.dimensions.and_then(|d| usize::try_from(d).ok()) {
        for v in &mut vectors {
            if d > 0 && d < v.len() {
                v.truncate(d);
                normalize(v);
            }
        }
    }
    Ok(Json(json!({
        "model": req.model,
        "embeddings": vectors,
        "total_duration": arrived.elapsed().as_nanos() as u64,
        "load_duration": 0,
        "prompt_eval_count": tokens,
    })))
}

/// `POST /api/embeddings` (Ollama's older route): one vector (a unit vector here, where
/// Ollama's is not normalized).
#[utoipa::path(post, path = "/api/embeddings", request_body = Object, responses((status = 200, description = "The vector", body = Object), (status = 400, body = Object)))]
pub(crate) async fn embeddings(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = generation_body(&state, body)?;
    let mut req: EmbeddingsRequest = parse_object(&body, &[EMBEDDINGS_FIELDS], &["model"])?;
    req.model = served_name(&state, req.model);
    request::keep_alive(req.keep_alive.as_ref())?;
    embed_options(req.options.as_ref())?;
    let prompt = req.prompt.unwrap_or_default();
    if prompt.is_empty() {
        state.select(&req.model)?.embedding_model()?;
        return Ok(Json(json!({"embedding": []})));
    }
    let (mut vectors, _) = embed_texts(&state, &req.model, vec![prompt], true).await?;
    Ok(Json(
        json!({"embedding": vectors.pop().unwrap_or_default()}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_in_utc_with_nanoseconds() {
        let t = |s: u64, n: u32| rfc3339(SystemTime::UNIX_EPOCH + std::time::Duration::new(s, n));
        assert_eq!(t(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(t(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(
            t(1_783_338_645, 499_127_000),
            "2026-07-06T11:50:45.499127000Z"
        );
        assert_eq!(t(253_402_300_799, 0), "9999-12-31T23:59:59.000000000Z");
    }
}
