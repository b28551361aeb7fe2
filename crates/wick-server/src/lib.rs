//! Wick's OpenAI-compatible HTTP front end.
//!
//! [`app`] builds the axum `Router` over an [`AppState`]: per served model its [`Backend`]
//! (a generation engine's bounded request queue, or an embedding engine's), what the front
//! end knows of it once loaded ([`ServedModel`] or [`EmbeddingModelInfo`]) and its
//! [`Metrics`]; requests are routed by their `model` field. A chat request is parsed and
//! checked in `validate` (every rule a named [`ApiError`]), rendered with the model's
//! [`ChatTemplate`], tokenized off the reactor, and submitted as an
//! [`wick_core::EngineRequest`] with its own event channel; the handler turns the token events
//! back into text (`detok`) and answers as one JSON body or as SSE. Dropping the response
//! drops the channel, and the engine frees the sequence.

mod auth;
mod browser;
mod chat;
mod completions;
mod detok;
mod embeddings;
mod error;
mod generation;
mod http;
mod logprobs;
mod messages;
mod ollama;
pub mod openai;
mod openapi;
mod ops;
mod pyjson;
mod responses;
mod routes;
mod sse;
mod state;
mod structured;
mod template;
mod tools;
mod validate;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use axum::Router;

pub use browser::{is_loopback_host, is_origin, BrowserPolicy};
pub use detok::{token_bytes, Detokenizer, StopBuffer};
pub use embeddings::EmbeddingModelInfo;
pub use error::ApiError;
pub use openapi::ApiDoc;
pub use ops::{RequestTag, REQUEST_ID_HEADER};
pub(crate) use state::{check_vocabulary, ReadyModel, Selected};
pub use state::{
    AppState, Backend, ModelDetails, ModelEntry, ModelSpec, ServedModel, ServerOptions,
};
pub use structured::{Grammars, JsonConstraint, ResponseFormat};
pub use template::{
    ChatTemplate, TemplateError, TemplateFunction, TemplateMessage, TemplateToolCall,
};

/// Largest request body accepted (413 beyond).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// The whole HTTP API; tests drive it without a socket.
pub fn app(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/messages", post(messages::messages))
        .route("/v1/messages/count_tokens", post(messages::count_tokens))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(routes::models))
        .route("/v1/models/{*model}", get(routes::model))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/embed", post(ollama::embed))
        .route("/api/embeddings", post(ollama::embeddings))
        .route("/api/tags", get(ollama::tags))
        .route("/api/show", post(ollama::show))
        .route("/api/ps", get(ollama::ps))
        .route("/api/version", get(ollama::version))
        .route("/api/pull", post(ollama::unsupported))
        .route("/api/push", post(ollama::unsupported))
        .route("/api/create", post(ollama::unsupported))
        .route("/api/copy", post(ollama::unsupported))
        .route("/api/delete", delete(ollama::unsupported))
        .route(
            "/api/blobs/{digest}",
            post(ollama::unsupported).head(ollama::unsupported),
        )
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
        .route("/", get(routes::chat_page))
        .route("/health", get(routes::health))
        .route("/health/live", get(routes::live))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(ops::refuse_large_bodies))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            browser::guard,
        ))
        .layer(axum::middleware::from_fn(error::speak_dialect))
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
