//! What operators need around every request: an `x-request-id` (the client's, or one made
//! here) echoed in the response and carried by every log line of the request's span; and
//! graceful drain, which counts the API requests in flight (until their bodies, streams
//! included, are fully sent) and refuses new ones with 503 once shutdown begins.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::sync::Notify;
use tracing::Instrument;

use crate::{ApiError, AppState};

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id for logs: the client's `x-request-id` when usable, else a new one.
#[derive(Debug, Clone)]
pub struct RequestTag(pub Arc<str>);

/// A client's id is kept if it is 1-128 visible ASCII characters; otherwise (or if absent) a
/// random 128-bit one, as 32 hex digits, is made.
fn tag_of(req: &Request) -> Arc<str> {
    let given = req
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()));
    match given {
        Some(s) => s.into(),
        None => format!("{:032x}", rand::random::<u128>()).into(),
    }
}

/// Outermost layer: tags the request, runs it inside a `request` span with that id, echoes
/// the id, and logs the outcome (API routes at info, probes and scrapes at debug).
pub(crate) async fn tag_requests(mut req: Request, next: Next) -> Response {
    let tag = tag_of(&req);
    req.extensions_mut().insert(RequestTag(tag.clone()));
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let span = tracing::info_span!("request", request_id = %tag, %method, %path);
    let started = Instant::now();
    let mut res = next.run(req).instrument(span.clone()).await;
    let status = res.status().as_u16();
    let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    span.in_scope(|| {
        let quiet = path == "/metrics" || path.starts_with("/health");
        // The id is also a field of the line itself, so it is there even when the span's
        // level is filtered out.
        if quiet {
            tracing::debug!(request_id = %tag, status, elapsed_ms, "handled");
        } else if status >= 500 && status != 503 {
            tracing::warn!(request_id = %tag, status, elapsed_ms, "handled");
        } else {
            tracing::info!(request_id = %tag, status, elapsed_ms, "handled");
        }
    });
    if let Ok(v) = HeaderValue::from_str(&tag) {
        res.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    res
}

#[derive(Debug, Default)]
pub(crate) struct Drain {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
}

/// One API request in flight; dropped when its response body has been sent (or dropped).
struct InFlight(Arc<Drain>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Drain {
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// On the API routes: 503 while draining; otherwise counts the request until its body ends.
pub(crate) async fn count_in_flight(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let drain = state.drain();
    if drain.is_draining() {
        return ApiError::ShuttingDown.into_response();
    }
    drain.in_flight.fetch_add(1, Ordering::AcqRel);
    let guard = InFlight(Arc::clone(drain));
    let res = next.run(req).await;
    let (parts, body) = res.into_parts();
    let body = Body::from_stream(body.into_data_stream().map(move |chunk| {
        let _held = &guard;
        chunk
    }));
    Response::from_parts(parts, body)
}

impl AppState {
    /// Starts shutdown: `/health` turns 503 and new API requests get 503 at once; requests
    /// in flight go on.
    pub fn start_draining(&self) {
        self.drain().draining.store(true, Ordering::Release);
        tracing::info!(
            in_flight = self.in_flight(),
            "draining: new requests get 503"
        );
    }

    /// API requests whose responses are not yet fully sent.
    pub fn in_flight(&self) -> usize {
        self.drain().in_flight.load(Ordering::Acquire)
    }

    /// Waits until no API request is in flight, or `timeout`; true if none is left.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let drain = Arc::clone(self.drain());
        let wait = async move {
            loop {
                let notified = drain.idle.notified();
                if drain.in_flight.load(Ordering::Acquire) == 0 {
                    return;
                }
                // A request that ends between the check and the wait still wakes this up:
                // `notified` was created before the check.
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

/// A body declared larger than this is refused without reading it (the connection closes).
const DRAIN_CAP: u64 = 64 << 20;
/// How long a refused body may take to arrive before the connection is closed.
const DRAIN_TIME: Duration = Duration::from_secs(30);

/// Bodies larger than [`crate::MAX_BODY_BYTES`] get their 413 after the server has read and
/// discarded what the client sends (up to [`DRAIN_CAP`] bytes and [`DRAIN_TIME`]): answering
/// while the client still sends, then closing, resets the connection, and the client sees a
/// broken pipe instead of the 413. A body declared small enough by its `Content-Length`
/// passes as it is (the handlers' extractors hold it to the limit); one without a length
/// (chunked) is read here, up to the limit, and passed on whole.
pub(crate) async fn refuse_large_bodies(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let limit = crate::MAX_BODY_BYTES;
    match declared {
        Some(n) if n <= limit as u64 => return next.run(req).await,
        Some(n) if n > DRAIN_CAP => return too_large(),
        Some(_) => {}
        None if req.method() == axum::http::Method::GET => return next.run(req).await,
        None => {}
    }
    let (parts, body) = req.into_parts();
    let mut body = body.into_data_stream();
    let mut kept = Vec::new();
    let mut seen = 0u64;
    let read = async {
        while let Some(Ok(chunk)) = body.next().await {
            seen += chunk.len() as u64;
            if seen > DRAIN_CAP {
                return;
            }
            if seen <= limit as u64 {
                kept.extend_from_slice(&chunk);
            }
        }
    };
    if tokio::time::timeout(DRAIN_TIME, read).await.is_err() || seen > limit as u64 {
        return too_large();
    }
    next.run(Request::from_parts(parts, Body::from(kept))).await
}

fn too_large() -> Response {
    let mut res = ApiError::PayloadTooLarge(crate::MAX_BODY_BYTES).into_response();
    res.headers_mut().insert(
        axum::http::header::CONNECTION,
        HeaderValue::from_static("close"),
    );
    res
}
