//! The small routes: models, health, metrics, tokenize, detokenize, the chat page and the
//! 404 / 405 fallbacks.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::generation;
use crate::http::{blocking, body_bytes, unix_now};
use crate::openai::{
    DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse,
    DETOKENIZE_FIELDS, TOKENIZE_FIELDS,
};
use crate::tools::{openai_tools, ToolSpec};
use crate::validate::{messages_from, parse_object, GenInput, PromptInput};
use crate::{ApiError, AppState, ReadyModel};

#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList)))]
pub(crate) async fn models(State(state): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    state.ready()?;
    let created = unix_now();
    let data = state.loaded().map(|m| card(m, created)).collect();
    Ok(Json(ModelList {
        object: "list",
        data,
    }))
}

/// `GET /v1/models/{model}`: one served model's card (the openai client's `models.retrieve`);
/// a name that is not served is a 404 `model_not_found`. Names may hold `/`.
#[utoipa::path(
    get,
    path = "/v1/models/{model}",
    params(("model" = String, Path, description = "A served model's name")),
    responses((status = 200, body = ModelCard), (status = 404, body = crate::error::ErrorBody))
)]
pub(crate) async fn model(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    state.ready()?;
    let selected = state.select(&name)?;
    let m = selected.loaded().ok_or(ApiError::NotReady)?;
    Ok(Json(card(m, unix_now())))
}

fn card(m: &ReadyModel, created: u64) -> ModelCard {
    match m {
        ReadyModel::Generate(m) => ModelCard {
            id: m.name.clone(),
            object: "model",
            created,
            owned_by: "wick",
            kind: "generate",
            max_model_len: m.max_model_len,
            context_length: m.context_length,
        },
        ReadyModel::Embed(m) => ModelCard {
            id: m.name.clone(),
            object: "model",
            created,
            owned_by: "wick",
            kind: "embed",
            max_model_len: m.max_input_tokens,
            context_length: m.max_input_tokens,
        },
    }
}

/// `POST /tokenize`: a `prompt`, or chat `messages` rendered with the model's template.
#[utoipa::path(
    post,
    path = "/tokenize",
    request_body = TokenizeRequest,
    responses((status = 200, body = TokenizeResponse), (status = 400, body = crate::error::ErrorBody))
)]
pub(crate) async fn tokenize(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let body = body_bytes(body)?;
    let req: TokenizeRequest = parse_object(&body, &[TOKENIZE_FIELDS], &[])?;
    let state = state.select_or_only(req.model.as_deref())?;
    let model = state.model()?;
    let max_model_len = model.max_model_len;
    let (input, tools, param) = match (req.prompt, req.messages) {
        (Some(p), None) => (
            GenInput::Prompts(vec![PromptInput::Text(p)]),
            ToolSpec::none(),
            "prompt",
        ),
        (None, Some(m)) => {
            let tools =
                ToolSpec::new(openai_tools(req.tools.as_ref(), true)?, None, true, "tools")?;
            model.chat_template()?;
            (GenInput::Chat(messages_from(&m)?), tools, "messages")
        }
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "give exactly one of 'prompt' and 'messages'",
            ))
        }
    };
    // Templating and tokenizing as a generation request does, off the reactor.
    let (mut prompts, _) =
        blocking(move || generation::tokenize(state.model()?, input, &tools, param)).await?;
    let tokens = prompts.pop().unwrap_or_default();
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        tokens,
        max_model_len,
    }))
}

/// `POST /detokenize`: token ids back to text.
#[utoipa::path(
    post,
    path = "/detokenize",
    request_body = DetokenizeRequest,
    responses((status = 200, body = DetokenizeResponse), (status = 400, body = crate::error::ErrorBody))
)]
pub(crate) async fn detokenize(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let body = body_bytes(body)?;
    let req: DetokenizeRequest = parse_object(&body, &[DETOKENIZE_FIELDS], &["tokens"])?;
    let state = state.select_or_only(req.model.as_deref())?;
    let prompt = blocking(move || {
        let model = state.model()?;
        let tokens = model.check_ids(req.tokens, "tokens")?;
        model
            .tokenizer
            .decode(&tokens, false)
            .map_err(|e| ApiError::invalid("tokens", e.to_string()))
    })
    .await?;
    Ok(Json(DetokenizeResponse { prompt }))
}

/// The chat page: one static file compiled into the binary, served without the API key
/// (it asks for the key and sends it with its API calls).
pub(crate) async fn chat_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; frame-ancestors 'none'",
            ),
        ],
        include_str!("chat_page.html"),
    )
        .into_response()
}

/// Liveness: 200 while the process serves HTTP, loaded or not, unless an engine with work
/// has not moved for `--step-timeout` (a hung step: 503 until it moves again).
#[utoipa::path(get, path = "/health/live", responses((status = 200), (status = 503, body = crate::error::ErrorBody)))]
pub(crate) async fn live(State(state): State<AppState>) -> Response {
    match state.check_stalls() {
        Ok(()) => Json(serde_json::json!({"status": "alive"})).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Readiness: 503 until the model is loaded, 200 after, 503 again once shutdown begins or
/// if the engine fails for good (the process then exits non-zero).
#[utoipa::path(get, path = "/health", responses((status = 200), (status = 503, body = crate::error::ErrorBody)))]
pub(crate) async fn health(State(state): State<AppState>) -> Response {
    if state.is_draining() {
        return ApiError::ShuttingDown.into_response();
    }
    match state.ready().and_then(|()| state.check_stalls()) {
        Ok(()) => (StatusCode::OK, Json(serde_json::json!({"status": "ok"}))).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain")))]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.render_metrics(),
    )
        .into_response()
}

pub(crate) async fn not_found(uri: Uri) -> ApiError {
    ApiError::RouteNotFound(uri.path().to_string())
}

/// A known path with another method: 405 in the request's error dialect.
pub(crate) async fn method_not_allowed(method: axum::http::Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}
