//! The OpenAPI description of every route, generated from the handlers' own types.

use axum::Json;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Wick",
        description = "An LLM inference server speaking OpenAI's API, Anthropic's Messages and Ollama's native API (under /api/)."
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
        crate::ollama::chat,
        crate::ollama::generate,
        crate::ollama::embed,
        crate::ollama::embeddings,
        crate::ollama::models::tags,
        crate::ollama::models::show,
        crate::ollama::models::ps,
        crate::ollama::models::version,
    ),
    // Streamed responses are sequences of these (one per SSE `data:` line).
    components(schemas(crate::openai::ChatCompletionChunk, crate::openai::Completion))
)]
pub struct ApiDoc;

pub(crate) async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
