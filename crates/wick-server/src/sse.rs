//! Server-sent events: the one SSE response shape and its two kinds of event (OpenAI's
//! unnamed `data:` chunks; the named events of Responses and Messages).

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;

pub(crate) fn json_event<T: serde::Serialize>(value: &T) -> Event {
    Event::default().data(serde_json::to_string(value).unwrap_or_else(|_| "{}".into()))
}

/// One named SSE event (`event: <kind>` and its JSON), as Responses and Messages stream.
pub(crate) fn sse_event(kind: &str, body: &serde_json::Value) -> Event {
    Event::default().event(kind).data(body.to_string())
}

/// An SSE response of `events` (no proxy buffering, no caching, keep-alive comments).
pub(crate) fn sse<S>(events: S) -> impl IntoResponse
where
    S: futures::Stream<Item = Result<Event, std::convert::Infallible>> + Send + 'static,
{
    (
        [("x-accel-buffering", "no"), ("cache-control", "no-cache")],
        Sse::new(events).keep_alive(KeepAlive::default()),
    )
}
