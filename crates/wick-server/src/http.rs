//! HTTP helpers every endpoint shares: reading the body, the blocking pool, response ids.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;

use crate::{ApiError, AppState};

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A response id: the prefix, the time and a process-wide counter.
pub(crate) fn reply_id(prefix: &str, salt: usize) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{:x}{nanos:08x}{n:06x}{salt:x}", unix_now())
}

/// Runs CPU work (templating, tokenizing, grammar compilation) off the async reactor.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("blocking task failed: {e}")))?
}

/// A generation endpoint's body (as [`body_bytes`]); 503 while the model loads, before
/// the body's contents are checked.
pub(crate) fn generation_body(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, ApiError> {
    let body = body_bytes(body)?;
    state.ready()?;
    Ok(body)
}

/// The body, or 413 / 400 when it could not be read.
pub(crate) fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(crate::MAX_BODY_BYTES)
        } else {
            ApiError::invalid("body", e.body_text())
        }
    })
}
