//! The small routes: models, health, metrics, and the 404 fallback.

use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::openai::{ModelCard, ModelList};
use crate::{ApiError, AppState};

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) async fn models(State(state): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    let model = state.model()?;
    Ok(Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: model.name.clone(),
            object: "model",
            created: unix_now(),
            owned_by: "wick",
            max_model_len: model.max_model_len,
        }],
    }))
}

/// 503 until the model is loaded, 200 after.
pub(crate) async fn health(State(state): State<AppState>) -> Response {
    match state.model() {
        Ok(_) => (StatusCode::OK, Json(serde_json::json!({"status": "ok"}))).into_response(),
        Err(e) => e.into_response(),
    }
}

pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics().render(),
    )
        .into_response()
}

pub(crate) async fn not_found(uri: Uri) -> ApiError {
    ApiError::RouteNotFound(uri.path().to_string())
}
