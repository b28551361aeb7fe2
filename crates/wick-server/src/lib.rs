//! Wick's OpenAI-compatible HTTP front end.
//!
//! [`app`] builds the axum `Router` over an [`AppState`]: the [`EngineHandle`] (the one
//! bounded request queue), the [`ServedModel`] once the engine reports it loaded, and the
//! [`Metrics`]. A chat request is parsed and checked in `validate` (every rule a named
//! [`ApiError`]), rendered with the model's [`ChatTemplate`], tokenized off the reactor,
//! and submitted as an [`wick_core::EngineRequest`] with its own event channel; the handler
//! turns the token events back into text (`detok`) and answers as one JSON body or as SSE.
//! Dropping the response drops the channel, and the engine frees the sequence.

mod auth;
mod chat;
mod completions;
mod detok;
mod error;
mod generation;
mod logprobs;
mod messages;
pub mod openai;
mod openapi;
mod ops;
mod pyjson;
mod responses;
mod routes;
mod structured;
mod template;
mod tools;
mod validate;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tokenizers::Tokenizer;
use wick_core::{EngineHandle, Metrics, RequestId};

pub use detok::{token_bytes, Detokenizer, StopBuffer};
pub use error::ApiError;
pub use openapi::ApiDoc;
pub use ops::{RequestTag, REQUEST_ID_HEADER};
pub use structured::{Grammars, JsonConstraint, ResponseFormat};
pub use template::{
    ChatTemplate, TemplateError, TemplateFunction, TemplateMessage, TemplateToolCall,
};

/// Largest request body accepted (413 beyond).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// What the front end knows of the model being served.
pub struct ServedModel {
    /// The name clients put in `model`.
    pub name: String,
    pub tokenizer: Arc<Tokenizer>,
    /// The chat template (`None` for a base model without one: chat requests get a 400).
    pub template: Option<ChatTemplate>,
    /// Prompts start with this token (the GGUF's `add_bos_token`, the tokenizer's own
    /// post-processor), added once even when the template writes it too.
    pub bos_token_id: Option<u32>,
    pub add_bos: bool,
    pub stop_token_ids: Vec<u32>,
    /// Longest prompt plus output accepted.
    pub max_model_len: usize,
    /// The context the model was trained for.
    pub context_length: usize,
    /// Token ids below this are valid.
    pub vocab_size: usize,
    /// Grammar compilation for structured output; `None` if it could not be set up for
    /// this tokenizer (then `response_format` JSON is refused).
    pub grammars: Option<Arc<Grammars>>,
}

impl ServedModel {
    /// Token ids of prompt `text` (special tokens in it are parsed; BOS first when the model
    /// asks for it, never twice), or a 400 naming `param`.
    pub(crate) fn encode(&self, text: &str, param: &str) -> Result<Vec<u32>, ApiError> {
        let enc = self
            .tokenizer
            .encode(text, self.add_bos)
            .map_err(|e| ApiError::invalid(param, format!("cannot tokenize: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if self.add_bos && ids.len() >= 2 && ids[0] == ids[1] && Some(ids[0]) == self.bos_token_id {
            ids.remove(0);
        }
        Ok(ids)
    }

    /// The chat template, or a 400 on `messages` saying that the model has none.
    pub(crate) fn chat_template(&self) -> Result<&ChatTemplate, ApiError> {
        self.template.as_ref().ok_or_else(|| {
            ApiError::invalid(
                "messages",
                "this model has no chat template (a base model?): use /v1/completions with a plain prompt, or start the server with --chat-template FILE",
            )
        })
    }

    /// How the model's template asks for tool calls, or a 400 on `tools` saying that it
    /// does not present tools (or in no syntax this server parses).
    pub(crate) fn tool_format(&self) -> Result<tools::ToolFormat, ApiError> {
        let template = self.chat_template()?;
        let syntax = tools::syntax_for(template.source()).ok_or_else(|| {
            ApiError::invalid(
                "tools",
                if template.supports_tools() {
                    "this model's chat template asks for tool calls in a syntax this server does not parse (it parses Hermes <tool_call>, Llama 3 JSON and Mistral [TOOL_CALLS])"
                } else {
                    "this model's chat template has no tool support: tools cannot be used with it"
                },
            )
        })?;
        // A marker that is one special token is named by id in grammars and written out
        // by the detokenizer (which skips other special tokens).
        let start_token = self.tokenizer.token_to_id(syntax.start()).filter(|_| {
            self.tokenizer
                .get_added_vocabulary()
                .is_special_token(syntax.start())
        });
        Ok(tools::ToolFormat {
            syntax,
            start_token,
        })
    }

    /// `ids` if every one is in the vocabulary, or a 400 naming `param`.
    pub(crate) fn check_ids(&self, ids: Vec<u32>, param: &str) -> Result<Vec<u32>, ApiError> {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(ApiError::invalid(
                param,
                format!(
                    "token id {bad} is not in the vocabulary (size {})",
                    self.vocab_size
                ),
            ));
        }
        Ok(ids)
    }
}

struct Inner {
    engine: EngineHandle,
    api_key: Option<String>,
    model: OnceLock<ServedModel>,
    metrics: Metrics,
    next_id: AtomicU64,
    drain: Arc<ops::Drain>,
}

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

impl AppState {
    /// With `api_key`, every API route but `/health` and `/metrics` requires
    /// `Authorization: Bearer <api_key>`.
    pub fn new(engine: EngineHandle, metrics: Metrics, api_key: Option<String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                engine,
                api_key,
                model: OnceLock::new(),
                metrics,
                next_id: AtomicU64::new(1),
                drain: Arc::default(),
            }),
        }
    }

    /// Marks the server ready: `/health` turns 200 and requests are served.
    pub fn set_ready(&self, model: ServedModel) {
        let _ = self.inner.model.set(model);
    }

    /// The served model, once loaded and while its engine runs.
    pub(crate) fn model(&self) -> Result<&ServedModel, ApiError> {
        if self.inner.engine.has_failed() {
            return Err(ApiError::EngineStopped);
        }
        self.inner.model.get().ok_or(ApiError::NotReady)
    }

    pub(crate) fn api_key(&self) -> Option<&str> {
        self.inner.api_key.as_deref()
    }

    pub(crate) fn engine(&self) -> &EngineHandle {
        &self.inner.engine
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub(crate) fn drain(&self) -> &Arc<ops::Drain> {
        &self.inner.drain
    }

    /// Whether shutdown has begun (see [`AppState::start_draining`]).
    pub fn is_draining(&self) -> bool {
        self.inner.drain.is_draining()
    }

    /// The engine's queue, for shutdown ([`EngineHandle::end_all`]).
    pub fn engine_handle(&self) -> &EngineHandle {
        &self.inner.engine
    }

    pub(crate) fn next_id(&self) -> RequestId {
        RequestId(self.inner.next_id.fetch_add(1, Ordering::Relaxed))
    }
}

/// The whole HTTP API; tests drive it without a socket.
pub fn app(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/messages", post(messages::messages))
        .route("/v1/messages/count_tokens", post(messages::count_tokens))
        .route("/v1/models", get(routes::models))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            ops::count_in_flight,
        ));
    Router::new()
        .merge(api)
        .route("/health", get(routes::health))
        .route("/health/live", get(routes::live))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(ops::refuse_large_bodies))
        .layer(axum::middleware::from_fn(messages::anthropic_errors))
        .layer(axum::middleware::from_fn(ops::tag_requests))
        .with_state(state)
}

/// `/metrics` alone, for `--metrics-port`.
pub fn metrics_app(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(routes::metrics))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .with_state(state)
}
