//! The OpenAPI description of every route, generated from the handlers' own types.

use axum::Json;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Wick",
        description = "An OpenAI-compatible LLM inference server."
    ),
    paths(
        crate::chat::chat_completions,
        crate::completions::completions,
        crate::responses::responses,
        crate::messages::messages,
        crate::messages::count_tokens,
        crate::embeddings::embeddings,
        crate::routes::models,
        crate::routes::model,
        crate::routes::tokenize,
        crate::routes::detokenize,
        crate::routes::health,
        crate::routes::live,
        crate::routes::metrics,
    ),
    // Streamed responses are sequences of these (one per SSE `data:` line).
    components(schemas(crate::openai::ChatCompletionChunk, crate::openai::Completion))
)]
pub struct ApiDoc;

pub(crate) async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
