//! `POST /v1/responses`: OpenAI's Responses API, stateless. The body becomes one
//! [`GenRequest`] (instructions and input items become chat messages; function calls and
//! their outputs render through the template like chat's); the pieces come back as `output`
//! items (`reasoning`, `message`, `function_call`) and, streamed, as the API's event sequence.
//! A non-streamed answer is the streamed one's final `response`.

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::generation::{start, Finish, Piece, Run};
use crate::http::{generation_body, reply_id, unix_now};
use crate::openai::SamplingFields;
use crate::sse::{sse, sse_event};
use crate::structured::ResponseFormat;
use crate::template::{TemplateFunction, TemplateMessage, TemplateToolCall};
use crate::tools::{self, ToolSpec};
use crate::validate::{
    call_arguments, parse_object, required_str, sampling, text_parts, FieldNames, GenInput,
    GenRequest,
};
use crate::{ApiError, AppState, RequestTag};

/// The request fields read here; the API's others are in `IGNORED` or refused.
#[derive(Debug, Deserialize)]
pub(crate) struct ResponsesRequest {
    model: String,
    input: Value,
    instructions: Option<String>,
    max_output_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    text: Option<Value>,
    stream: Option<bool>,
    store: Option<bool>,
    background: Option<bool>,
    truncation: Option<String>,
    top_logprobs: Option<i64>,
    previous_response_id: Option<Value>,
    conversation: Option<Value>,
    prompt: Option<Value>,
    max_tool_calls: Option<Value>,
}

pub(crate) const FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "stream",
    "store",
    "background",
    "truncation",
    "top_logprobs",
    "previous_response_id",
    "conversation",
    "prompt",
    "max_tool_calls",
];

/// Fields of the API that cannot change the output: accepted and ignored (`reasoning`
/// too: a thinking model thinks anyway, one that does not cannot).
pub(crate) const IGNORED: &[&str] = &[
    "metadata",
    "include",
    "service_tier",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "reasoning",
    "stream_options",
];

/// The Responses request as one generation request, and what the answer echoes back.
pub(crate) fn parse(body: &[u8]) -> Result<(GenRequest, Echo), ApiError> {
    let req: ResponsesRequest = parse_object(body, &[FIELDS, IGNORED], &["model", "input"])?;
    let refuse = |name: &str, what: &str| Err(ApiError::unsupported(name, what));
    let stateful = [
        ("previous_response_id", &req.previous_response_id),
        ("conversation", &req.conversation),
        ("prompt", &req.prompt),
        ("max_tool_calls", &req.max_tool_calls),
    ];
    if let Some((name, _)) = stateful
        .iter()
        .find(|(_, v)| v.as_ref().is_some_and(|v| !v.is_null()))
    {
        return refuse(name, "(this server keeps no state between requests)");
    }
    if req.store == Some(true) {
        return refuse(
            "store",
            "true (this server keeps no responses; send store: false)",
        );
    }
    if req.background == Some(true) {
        return refuse("background", "true");
    }
    if req.truncation.as_deref().is_some_and(|t| t != "disabled") {
        return refuse("truncation", "other than \"disabled\"");
    }
    if req.top_logprobs.is_some_and(|n| n != 0) {
        return refuse("top_logprobs", "(log-probabilities on /v1/responses)");
    }
    let mut messages = Vec::new();
    if let Some(i) = &req.instructions {
        messages.push(TemplateMessage::text("system", i.clone()));
    }
    input_messages(&req.input, &mut messages)?;
    let tools = ToolSpec::new(
        tools::openai_tools(req.tools.as_ref(), false)?,
        tools::openai_choice(req.tool_choice.as_ref())?,
        req.parallel_tool_calls.unwrap_or(true),
        "tool_choice",
    )?;
    let format_value = req.text.as_ref().and_then(|t| t.get("format"));
    let fields = SamplingFields {
        temperature: req.temperature,
        top_p: req.top_p,
        stream: req.stream,
        ..SamplingFields::default()
    };
    let max = req.max_output_tokens.map(|n| ("max_output_tokens", n));
    let echo = Echo {
        instructions: req.instructions.clone(),
        max_output_tokens: req.max_output_tokens,
        temperature: req.temperature.unwrap_or(1.0),
        top_p: req.top_p.unwrap_or(1.0),
        parallel_tool_calls: tools.parallel,
        tool_choice: req.tool_choice.clone().unwrap_or_else(|| json!("auto")),
        tools: req.tools.clone().unwrap_or_else(|| json!([])),
        text: json!({"format": format_value.cloned().unwrap_or_else(|| json!({"type": "text"}))}),
    };
    let gen = GenRequest {
        model: req.model,
        input: GenInput::Chat(messages),
        sampling: sampling(&fields, &FieldNames::OPENAI, max, None)?,
        format: ResponseFormat::from_text_format(format_value)?,
        tools,
        prompt_param: "input",
    };
    Ok((gen, echo))
}

/// `input`: a string (one user message) or a list of items.
fn input_messages(input: &Value, out: &mut Vec<TemplateMessage>) -> Result<(), ApiError> {
    let items = match input {
        Value::String(s) => {
            out.push(TemplateMessage::text("user", s.clone()));
            return Ok(());
        }
        Value::Array(items) if !items.is_empty() => items,
        _ => {
            return Err(ApiError::invalid(
                "input",
                "'input' must be a string or a non-empty list of items",
            ))
        }
    };
    for (i, item) in items.iter().enumerate() {
        let param = format!("input[{i}]");
        let kind = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message");
        let str_field = |name: &str| required_str(item, name, &param);
        match kind {
            "message" => {
                let role = str_field("role")?;
                if !["user", "system", "developer", "assistant"].contains(&role) {
                    return Err(ApiError::invalid(
                        format!("{param}.role"),
                        format!("unsupported role '{role}'"),
                    ));
                }
                let role = if role == "developer" { "system" } else { role };
                let content = text_parts(item.get("content"), &format!("{param}.content"), TEXT)?;
                out.push(TemplateMessage::text(role, content));
            }
            "function_call" => {
                let call = TemplateToolCall {
                    id: str_field("call_id")?.to_string(),
                    kind: "function",
                    function: TemplateFunction {
                        name: str_field("name")?.to_string(),
                        arguments: call_arguments(
                            &json!(str_field("arguments")?),
                            &format!("{param}.arguments"),
                        )?,
                    },
                };
                // Calls join the assistant turn they follow, as the model wrote them.
                match out.last_mut() {
                    Some(m) if m.role == "assistant" => m.tool_calls.push(call),
                    _ => out.push(TemplateMessage {
                        tool_calls: vec![call],
                        ..TemplateMessage::text("assistant", "")
                    }),
                }
            }
            "function_call_output" => {
                let output = match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    other => text_parts(other, &format!("{param}.output"), TEXT)?,
                };
                out.push(TemplateMessage {
                    tool_call_id: Some(str_field("call_id")?.to_string()),
                    ..TemplateMessage::text("tool", output)
                });
            }
            // Earlier reasoning is not shown to the model again (templates drop it too).
            "reasoning" => {}
            other => {
                return Err(ApiError::invalid(
                    format!("{param}.type"),
                    format!("input items of type '{other}' are not supported (message, function_call, function_call_output, reasoning are)"),
                ))
            }
        }
    }
    Ok(())
}

/// The text part types of input items.
const TEXT: &[&str] = &["input_text", "output_text", "text"];

/// Request settings the response object repeats.
pub(crate) struct Echo {
    instructions: Option<String>,
    max_output_tokens: Option<i64>,
    temperature: f64,
    top_p: f64,
    parallel_tool_calls: bool,
    tool_choice: Value,
    tools: Value,
    text: Value,
}

enum OpenKind {
    Reasoning,
    Message,
    Call { call_id: String, name: String },
}

/// The item being written.
struct Open {
    kind: OpenKind,
    id: String,
    text: String,
}

/// Builds the response from the pieces, with the stream's events on the way.
struct Builder {
    id: String,
    created: u64,
    model: String,
    echo: Echo,
    output: Vec<Value>,
    open: Option<Open>,
    seq: u64,
    status: &'static str,
    usage: Value,
}

impl Builder {
    fn event(&mut self, kind: &str, mut body: Value) -> (String, Value) {
        body["type"] = json!(kind);
        body["sequence_number"] = json!(self.seq);
        self.seq += 1;
        (kind.to_string(), body)
    }

    fn response(&self) -> Value {
        let e = &self.echo;
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": self.status,
            "error": null,
            "incomplete_details": (self.status == "incomplete").then(|| json!({"reason": "max_output_tokens"})),
            "instructions": e.instructions,
            "max_output_tokens": e.max_output_tokens,
            "model": self.model,
            "output": self.output,
            "parallel_tool_calls": e.parallel_tool_calls,
            "previous_response_id": null,
            "reasoning": {"effort": null, "summary": null},
            "store": false,
            "temperature": e.temperature,
            "text": e.text,
            "tool_choice": e.tool_choice,
            "tools": e.tools,
            "top_p": e.top_p,
            "truncation": "disabled",
            "usage": self.usage,
            "metadata": {},
        })
    }

    fn open_item(&self, open: &Open, status: &str) -> Value {
        match &open.kind {
            OpenKind::Reasoning => json!({
                "type": "reasoning", "id": open.id, "summary": [],
                "content": [{"type": "reasoning_text", "text": open.text}],
            }),
            OpenKind::Message => json!({
                "type": "message", "id": open.id, "status": status, "role": "assistant",
                "content": if status == "in_progress" { json!([]) } else { json!([text_part(&open.text)]) },
            }),
            OpenKind::Call { call_id, name } => json!({
                "type": "function_call", "id": open.id, "call_id": call_id, "name": name,
                "arguments": open.text, "status": status,
            }),
        }
    }

    /// Starts an item of `kind` unless one is open already.
    fn begin(&mut self, kind: OpenKind, events: &mut Vec<(String, Value)>) {
        let same = matches!(
            (&self.open, &kind),
            (
                Some(Open {
                    kind: OpenKind::Reasoning,
                    ..
                }),
                OpenKind::Reasoning
            ) | (
                Some(Open {
                    kind: OpenKind::Message,
                    ..
                }),
                OpenKind::Message
            )
        );
        if same {
            return;
        }
        self.close(events);
        let prefix = match kind {
            OpenKind::Reasoning => "rs",
            OpenKind::Message => "msg",
            OpenKind::Call { .. } => "fc",
        };
        let open = Open {
            kind,
            id: item_id(prefix),
            text: String::new(),
        };
        let index = self.output.len();
        let item = self.open_item(&open, "in_progress");
        events.push(self.event(
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        ));
        if let OpenKind::Message = open.kind {
            events.push(self.event(
                "response.content_part.added",
                json!({"item_id": open.id, "output_index": index, "content_index": 0, "part": text_part("")}),
            ));
        }
        self.open = Some(open);
    }

    fn close(&mut self, events: &mut Vec<(String, Value)>) {
        let Some(open) = self.open.take() else {
            return;
        };
        let index = self.output.len();
        let at = json!({"item_id": open.id, "output_index": index});
        let with = |extra: Value| {
            let mut v = at.clone();
            if let (Some(v), Value::Object(e)) = (v.as_object_mut(), extra) {
                v.extend(e);
            }
            v
        };
        match &open.kind {
            OpenKind::Reasoning => events.push(self.event(
                "response.reasoning_text.done",
                with(json!({"content_index": 0, "text": open.text})),
            )),
            OpenKind::Message => {
                events.push(self.event(
                    "response.output_text.done",
                    with(json!({"content_index": 0, "text": open.text, "logprobs": []})),
                ));
                events.push(self.event(
                    "response.content_part.done",
                    with(json!({"content_index": 0, "part": text_part(&open.text)})),
                ));
            }
            OpenKind::Call { name, .. } => events.push(self.event(
                "response.function_call_arguments.done",
                with(json!({"arguments": open.text, "name": name})),
            )),
        }
        let item = self.open_item(&open, "completed");
        events.push(self.event(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        ));
        self.output.push(item);
    }

    /// Adds a piece; returns the stream's events for it, and whether the response ended.
    fn piece(&mut self, piece: Piece) -> (Vec<(String, Value)>, bool) {
        let mut events = Vec::new();
        let (kind, delta, text) = match piece {
            Piece::Text { text, .. } => {
                self.begin(OpenKind::Message, &mut events);
                (
                    "response.output_text.delta",
                    json!({"content_index": 0, "delta": text, "logprobs": []}),
                    text,
                )
            }
            Piece::Reasoning(text) => {
                self.begin(OpenKind::Reasoning, &mut events);
                (
                    "response.reasoning_text.delta",
                    json!({"content_index": 0, "delta": text}),
                    text,
                )
            }
            Piece::Call { id, name, .. } => {
                self.begin(OpenKind::Call { call_id: id, name }, &mut events);
                return (events, false);
            }
            Piece::Args { args, .. } => (
                "response.function_call_arguments.delta",
                json!({"delta": args}),
                args,
            ),
            Piece::Finish { reason, usage, .. } => {
                self.close(&mut events);
                if self.output.is_empty() {
                    // An empty answer is still one (empty) message.
                    self.begin(OpenKind::Message, &mut events);
                    self.close(&mut events);
                }
                self.status = if reason == Finish::Length {
                    "incomplete"
                } else {
                    "completed"
                };
                self.usage = json!({
                    "input_tokens": usage.prompt_tokens,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": usage.completion_tokens,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": usage.total_tokens,
                });
                let kind = if reason == Finish::Length {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                let body = json!({"response": self.response()});
                events.push(self.event(kind, body));
                return (events, true);
            }
            Piece::Error(e) => {
                let b = e.body().error;
                let body = json!({"code": b.code, "message": b.message, "param": b.param});
                events.push(self.event("error", body));
                return (events, true);
            }
        };
        if let Some(open) = &mut self.open {
            open.text.push_str(&text);
            let mut body = json!({"item_id": open.id, "output_index": self.output.len()});
            if let (Some(b), Value::Object(d)) = (body.as_object_mut(), delta) {
                b.extend(d);
            }
            events.push(self.event(kind, body));
        }
        (events, false)
    }
}

fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

/// An id in OpenAI's style (`resp_...`, `msg_...`).
fn item_id(prefix: &str) -> String {
    reply_id(prefix, 0).replacen('-', "_", 1)
}

/// A response: JSON, or with `stream: true` the Responses event stream.
#[utoipa::path(
    post,
    path = "/v1/responses",
    request_body = Object,
    responses(
        (status = 200, description = "The response object (or an SSE stream of events)", body = Object),
        (status = 400, description = "Bad input, naming the parameter", body = crate::error::ErrorBody),
        (status = 404, description = "Unknown model", body = crate::error::ErrorBody),
        (status = 429, description = "Waiting queue full (see Retry-After)", body = crate::error::ErrorBody),
    )
)]
pub(crate) async fn responses(
    State(state): State<AppState>,
    Extension(tag): Extension<RequestTag>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = generation_body(&state, body)?;
    let (req, echo) = parse(&body)?;
    let started = start(&state, &tag, req).await?;
    let stream = started.stream;
    let mut builder = Builder {
        id: item_id("resp"),
        created: unix_now(),
        model: started.model.clone(),
        echo,
        output: Vec::new(),
        open: None,
        seq: 0,
        status: "in_progress",
        usage: Value::Null,
    };
    let Some(mut run) = started.runs.into_iter().next() else {
        return Err(ApiError::Internal("no generation was started".into()));
    };
    if !stream {
        while let Some(piece) = run.next().await {
            if let Piece::Error(e) = piece {
                return Err(e);
            }
            if builder.piece(piece).1 {
                return Ok(Json(builder.response()).into_response());
            }
        }
        return Err(ApiError::Internal(
            "the generation ended without a finish".into(),
        ));
    }
    Ok(sse(events(builder, run)).into_response())
}

fn events(
    mut builder: Builder,
    mut run: Run,
) -> impl futures::Stream<Item = Result<Event, Infallible>> + Send {
    async_stream::stream! {
        let created = json!({"response": builder.response()});
        for (kind, body) in [
            builder.event("response.created", created.clone()),
            builder.event("response.in_progress", created),
        ] {
            yield Ok(sse_event(&kind, &body));
        }
        while let Some(piece) = run.next().await {
            let (events, done) = builder.piece(piece);
            for (kind, body) in events {
                yield Ok(sse_event(&kind, &body));
            }
            if done {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param_of(body: &str) -> Option<String> {
        match parse(body.as_bytes()) {
            Err(ApiError::InvalidRequest { param, .. }) => param,
            other => panic!("expected a 400 for {body}, got {:?}", other.map(|r| r.0)),
        }
    }

    #[test]
    fn input_items_become_messages() {
        let (req, echo) = parse(
            br#"{"model":"m","instructions":"be brief","input":[
                {"role":"user","content":[{"type":"input_text","text":"weather?"}]},
                {"type":"function_call","call_id":"c1","name":"w","arguments":"{\"city\":\"Paris\"}"},
                {"type":"function_call_output","call_id":"c1","output":"sunny"}],
                "tools":[{"type":"function","name":"w","parameters":{"type":"object"}}],
                "max_output_tokens":20,"text":{"format":{"type":"json_schema","name":"x","schema":{"type":"object"}}},
                "store":false,"metadata":{"a":"b"},"include":[],"reasoning":{"effort":"low"},"user":"u"}"#,
        )
        .unwrap();
        let GenInput::Chat(m) = &req.input else {
            panic!()
        };
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool"]);
        assert_eq!(m[1].content, "weather?");
        assert_eq!(
            m[2].tool_calls[0].function.arguments,
            json!({"city": "Paris"})
        );
        assert_eq!(m[3].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(req.sampling.max_tokens, Some(20));
        assert_eq!(
            req.format,
            ResponseFormat::JsonSchema(json!({"type": "object"}))
        );
        assert_eq!(req.tools.tools[0].name, "w");
        assert_eq!(echo.max_output_tokens, Some(20));
        let (req, _) = parse(br#"{"model":"m","input":"hi"}"#).unwrap();
        assert_eq!(
            req.input,
            GenInput::Chat(vec![TemplateMessage::text("user", "hi")])
        );
    }

    #[test]
    fn every_bad_or_unsupported_field_is_named() {
        let m = r#""model":"m","input":"hi""#;
        for (extra, param) in [
            (r#""previous_response_id":"resp_1""#, "previous_response_id"),
            (r#""store":true"#, "store"),
            (r#""background":true"#, "background"),
            (r#""truncation":"auto""#, "truncation"),
            (r#""conversation":"c""#, "conversation"),
            (r#""temperature":3"#, "temperature"),
            (r#""max_output_tokens":0"#, "max_output_tokens"),
            (r#""tools":[{"type":"web_search"}]"#, "tools[0].type"),
            (r#""tool_choice":"sometimes""#, "tool_choice"),
            (r#""text":{"format":{"type":"xml"}}"#, "text.format"),
            (r#""frobnicate":1"#, "frobnicate"),
            (r#""messages":[]"#, "messages"),
        ] {
            assert_eq!(
                param_of(&format!("{{{m},{extra}}}")).as_deref(),
                Some(param),
                "{extra}"
            );
        }
        assert_eq!(
            param_of(r#"{"model":"m","input":[]}"#).as_deref(),
            Some("input")
        );
        assert_eq!(
            param_of(r#"{"model":"m","input":[{"type":"image","url":"x"}]}"#).as_deref(),
            Some("input[0].type")
        );
        assert_eq!(param_of(r#"{"model":"m"}"#).as_deref(), Some("input"));
    }
}
