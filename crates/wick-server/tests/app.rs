//! The router without a socket or a model: what a client sees before the model is loaded,
//! and the errors that need no engine.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use wick_core::{request_queue, Metrics, QueueLimits};

const LIMITS: QueueLimits = QueueLimits {
    max_waiting_requests: 1,
    max_waiting_prompt_tokens: 0,
};
use wick_server::{app, AppState, MAX_BODY_BYTES};

async fn call(req: Request<Body>) -> (StatusCode, Value) {
    let (handle, _queue) = request_queue(LIMITS);
    let res = app(AppState::new("m", handle, Metrics::new(), None))
        .oneshot(req)
        .await
        .unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn post(body: Vec<u8>) -> Request<Body> {
    Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap()
}

#[tokio::test]
async fn not_ready_until_the_model_is_loaded() {
    let (status, body) = call(Request::get("/health").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"]["code"], "service_unavailable");
    let (status, _) = call(post(br#"{"model":"m","messages":[]}"#.to_vec())).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _) = call(Request::get("/v1/models").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // Alive all the same.
    let (status, body) = call(Request::get("/health/live").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "alive");
}

#[tokio::test]
async fn a_failed_engine_turns_readiness_503() {
    let (handle, queue) = request_queue(LIMITS);
    let app = app(AppState::new("m", handle, Metrics::new(), None));
    queue.mark_failed();
    for path in ["/health", "/v1/models"] {
        let res = app
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("engine has stopped"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn metrics_are_served_before_ready() {
    let (handle, _queue) = request_queue(LIMITS);
    let res = app(AppState::new("m", handle, Metrics::new(), None))
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let text = res.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&text).contains("# TYPE wick_requests_running gauge"));
}

#[tokio::test]
async fn unknown_routes_and_huge_bodies_get_openai_errors() {
    let (status, body) = call(Request::get("/v2/nothing").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v2/nothing"));
    assert_eq!(body["error"]["code"], "not_found");
    let (status, body) = call(post(vec![b' '; MAX_BODY_BYTES + 10])).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"]["code"], "payload_too_large");
    // Declared too large: the same answer, once the body has been read.
    let mut req = post(vec![b' '; MAX_BODY_BYTES + 10]);
    req.headers_mut()
        .insert("content-length", (MAX_BODY_BYTES + 10).into());
    let (status, body) = call(req).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"]["code"], "payload_too_large");
    // A known path with another method.
    for (method, path) in [("GET", "/v1/chat/completions"), ("POST", "/health")] {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let (status, body) = call(req).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(body["error"]["message"].as_str().unwrap().contains(path));
    }
}

#[tokio::test]
async fn an_api_key_guards_the_api_but_not_health_or_metrics() {
    let (handle, _queue) = request_queue(LIMITS);
    let app = app(AppState::new(
        "m",
        handle,
        Metrics::new(),
        Some("sekrit".into()),
    ));
    let get = |path: &str, auth: Option<&str>| {
        let mut r = Request::get(path);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.body(Body::empty()).unwrap()
    };
    let status = |r: axum::response::Response| r.status();
    let r = app.clone().oneshot(get("/v1/models", None)).await.unwrap();
    assert_eq!(status(r), StatusCode::UNAUTHORIZED);
    let r = app
        .clone()
        .oneshot(get("/v1/models", Some("Bearer wrong")))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body = r.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    // The right key gets through (to a 503: no model in this test).
    let r = app
        .clone()
        .oneshot(get("/v1/models", Some("Bearer sekrit")))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let r = app.clone().oneshot(get("/metrics", None)).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = app.clone().oneshot(get("/health", None)).await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    // The chat page needs no key: it asks for one.
    let r = app.clone().oneshot(get("/", None)).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let page = r.into_body().collect().await.unwrap().to_bytes();
    let page = String::from_utf8_lossy(&page);
    assert!(page.contains("/v1/chat/completions") && page.contains("Authorization"));
}

#[tokio::test]
async fn openapi_describes_every_route_from_the_handler_types() {
    let (status, doc) = call(Request::get("/openapi.json").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/tokenize",
        "/detokenize",
        "/health",
        "/metrics",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "no {path} in {}",
            doc["paths"]
        );
    }
    let schemas = &doc["components"]["schemas"];
    let chat = serde_json::to_string(&schemas["ChatCompletionRequest"]).unwrap();
    for field in ["messages", "model", "top_logprobs", "response_format"] {
        assert!(
            chat.contains(&format!("\"{field}\"")),
            "ChatCompletionRequest lacks {field}: {chat}"
        );
    }
    // The shared sampling fields are one schema both requests include.
    assert!(chat.contains("#/components/schemas/SamplingFields"));
    let completion = serde_json::to_string(&schemas["CompletionRequest"]).unwrap();
    assert!(completion.contains("#/components/schemas/SamplingFields"));
    let sampling = serde_json::to_string(&schemas["SamplingFields"]).unwrap();
    for field in [
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "n",
        "seed",
        "stop",
        "logit_bias",
        "ignore_eos",
        "stream_options",
    ] {
        assert!(
            sampling.contains(&format!("\"{field}\"")),
            "SamplingFields lacks {field}"
        );
    }
    for name in [
        "ErrorBody",
        "ChatCompletion",
        "ChatCompletionChunk",
        "Completion",
    ] {
        assert!(schemas[name].is_object(), "no schema {name}");
    }
}

/// Every error under /v1/messages is in Anthropic's shape, whatever produced it (the
/// handler, the key check, the body limit, an unknown route or method); the key may come as
/// x-api-key; other routes keep OpenAI's shape.
#[tokio::test]
async fn messages_errors_are_in_anthropics_shape() {
    let (handle, _queue) = request_queue(LIMITS);
    let app = app(AppState::new(
        "m",
        handle,
        Metrics::new(),
        Some("sekrit".into()),
    ));
    let send = |req: Request<Body>| {
        let app = app.clone();
        async move {
            let res = app.oneshot(req).await.unwrap();
            let status = res.status();
            let bytes = res.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null),
            )
        }
    };
    let post = |path: &str, key: Option<&str>, body: Vec<u8>| {
        let mut r = Request::post(path).header("content-type", "application/json");
        if let Some(k) = key {
            r = r.header("x-api-key", k);
        }
        r.body(Body::from(body)).unwrap()
    };
    let anthropic = |v: &Value, kind: &str| {
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], kind, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
    };
    let (status, v) = send(post("/v1/messages", None, b"{}".to_vec())).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    anthropic(&v, "authentication_error");
    // The key as x-api-key gets through, to a 503 (no model here).
    let (status, v) = send(post("/v1/messages", Some("sekrit"), b"{}".to_vec())).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    anthropic(&v, "overloaded_error");
    let (status, v) = send(post(
        "/v1/messages",
        Some("sekrit"),
        vec![b' '; MAX_BODY_BYTES + 10],
    ))
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    anthropic(&v, "request_too_large");
    let (status, v) = send(post("/v1/messages/nothing", Some("sekrit"), b"{}".to_vec())).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    anthropic(&v, "not_found_error");
    let get = Request::get("/v1/messages")
        .header("x-api-key", "sekrit")
        .body(Body::empty())
        .unwrap();
    let (status, v) = send(get).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    anthropic(&v, "invalid_request_error");
    // Elsewhere, OpenAI's shape.
    let (status, v) = send(post("/v1/responses", Some("sekrit"), b"{}".to_vec())).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["error"]["code"], "service_unavailable");
}
