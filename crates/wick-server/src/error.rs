//! Every error the API returns, with its status code mapped here and nowhere else, in the
//! dialect of the API the request spoke: OpenAI's (`{"error": {"message", "type", "param",
//! "code"}}`), under `/v1/messages` Anthropic's (`{"type": "error", "error": {"type",
//! "message"}}`), under `/api/` Ollama's (`{"error": "..."}`). The dialect is the request's, set once around it ([`speak_dialect`]), and
//! read where the response is built.

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{json, Value};

/// Whose error shape a request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    OpenAi,
    Anthropic,
    Ollama,
}

impl Dialect {
    /// Anthropic's under `/v1/messages` (the routes, and anything refused on the way to
    /// them: authentication, the body limit, an unknown route or method); Ollama's under
    /// `/api/`; OpenAI's elsewhere.
    fn of(path: &str) -> Self {
        if path.starts_with("/v1/messages") {
            Dialect::Anthropic
        } else if path.starts_with("/api/") {
            Dialect::Ollama
        } else {
            Dialect::OpenAi
        }
    }
}

tokio::task_local! {
    static DIALECT: Dialect;
}

/// Runs the rest of the request's handling with its dialect known to every error built in it.
pub(crate) async fn speak_dialect(req: Request, next: Next) -> Response {
    let dialect = Dialect::of(req.uri().path());
    DIALECT.scope(dialect, next.run(req)).await
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Bad input: a 400 that names the parameter.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error("The server is busy: {waiting} requests ({waiting_tokens} prompt tokens) are waiting. Retry in {retry_after} s.")]
    QueueFull {
        waiting: usize,
        waiting_tokens: usize,
        retry_after: u64,
    },
    #[error("{0}")]
    QueueTimeout(String),
    #[error("The model is still loading.")]
    NotReady,
    #[error("The engine has stopped: the server is shutting down or restarting.")]
    EngineStopped,
    #[error("The server is shutting down and accepts no new requests; retry on another replica.")]
    ShuttingDown,
    /// Ended by shutdown after the drain timeout.
    #[error("{0}")]
    Drained(String),
    #[error("{0}")]
    Internal(String),
    /// An engine's step has run past `--step-timeout`.
    #[error("{0}")]
    Stalled(String),
    #[error("Not found: {0}")]
    RouteNotFound(String),
    /// A route the API has that this server does not implement.
    #[error("{0}")]
    NotImplemented(String),
    #[error("Method {method} is not allowed on {path}.")]
    MethodNotAllowed { method: String, path: String },
    #[error("The request body is larger than {0} bytes.")]
    PayloadTooLarge(usize),
    #[error(
        "Incorrect or missing API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`."
    )]
    Unauthorized,
    /// Refused by the browser policy (an `Origin` or `Host` not allowed).
    #[error("{message}")]
    Forbidden { message: String, code: &'static str },
}

impl ApiError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: Some(param.into()),
            code: None,
        }
    }

    pub fn unsupported(param: &str, what: &str) -> Self {
        ApiError::InvalidRequest {
            message: format!("`{param}` {what} is not supported by this server."),
            param: Some(param.into()),
            code: Some("unsupported_parameter"),
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::ModelNotFound(_) | ApiError::RouteNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotReady
            | ApiError::EngineStopped
            | ApiError::QueueTimeout(_)
            | ApiError::ShuttingDown
            | ApiError::Drained(_)
            | ApiError::Stalled(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// Anthropic's error `type` for this status.
    fn anthropic_type(&self) -> &'static str {
        match self.status().as_u16() {
            400 | 405 | 422 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            _ => "api_error",
        }
    }

    /// The error in Anthropic's shape, also sent as an `error` event when a stream fails.
    pub(crate) fn anthropic_body(&self) -> Value {
        json!({"type": "error", "error": {"type": self.anthropic_type(), "message": self.to_string()}})
    }

    /// The error in Ollama's shape, also sent as the last NDJSON line when a stream fails;
    /// an unknown model in Ollama's words.
    pub(crate) fn ollama_body(&self) -> Value {
        let message = match self {
            ApiError::ModelNotFound(name) => format!("model '{name}' not found"),
            e => e.to_string(),
        };
        json!({ "error": message })
    }

    /// The error object, also sent as a JSON `data:` line when a stream fails mid-way.
    pub fn body(&self) -> ErrorBody {
        let (kind, param, code) = match self {
            ApiError::InvalidRequest { param, code, .. } => {
                ("invalid_request_error", param.clone(), *code)
            }
            ApiError::ModelNotFound(_) => (
                "invalid_request_error",
                Some("model".to_string()),
                Some("model_not_found"),
            ),
            ApiError::RouteNotFound(_) => ("invalid_request_error", None, Some("not_found")),
            ApiError::NotImplemented(_) => ("invalid_request_error", None, Some("not_implemented")),
            ApiError::MethodNotAllowed { .. } => {
                ("invalid_request_error", None, Some("method_not_allowed"))
            }
            ApiError::Unauthorized => ("invalid_request_error", None, Some("invalid_api_key")),
            ApiError::Forbidden { code, .. } => ("permission_error", None, Some(*code)),
            ApiError::PayloadTooLarge(_) => {
                ("invalid_request_error", None, Some("payload_too_large"))
            }
            ApiError::QueueFull { .. } => ("rate_limit_error", None, Some("rate_limit_exceeded")),
            ApiError::QueueTimeout(_) => ("service_unavailable_error", None, Some("queue_timeout")),
            ApiError::NotReady | ApiError::EngineStopped => (
                "service_unavailable_error",
                None,
                Some("service_unavailable"),
            ),
            ApiError::ShuttingDown | ApiError::Drained(_) => {
                ("service_unavailable_error", None, Some("shutting_down"))
            }
            ApiError::Internal(_) => ("server_error", None, Some("internal_error")),
            ApiError::Stalled(_) => ("service_unavailable_error", None, Some("engine_stalled")),
        };
        ErrorBody {
            error: ErrorObject {
                message: self.to_string(),
                kind,
                param,
                code,
            },
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorObject,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorObject {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let dialect = DIALECT.try_with(|d| *d).unwrap_or(Dialect::OpenAi);
        let mut res = match dialect {
            Dialect::OpenAi => (self.status(), axum::Json(self.body())).into_response(),
            Dialect::Anthropic => {
                (self.status(), axum::Json(self.anthropic_body())).into_response()
            }
            Dialect::Ollama => (self.status(), axum::Json(self.ollama_body())).into_response(),
        };
        if let ApiError::QueueFull { retry_after, .. } = self {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        }
        res
    }
}
