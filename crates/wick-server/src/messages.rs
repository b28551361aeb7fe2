//! `POST /v1/messages` and `/v1/messages/count_tokens`: Anthropic's Messages API. The body
//! becomes one [`GenRequest`] (`system`, text, `tool_use` and `tool_result` blocks become chat
//! messages the template renders); the pieces come back as content blocks (`thinking`,
//! `text`, `tool_use`) and, streamed, as the API's events. Errors under `/v1/messages` are in
//! Anthropic's shape (`crate::error` renders each in its request's dialect).

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::generation::{count_prompt, start, Finish, Piece, Run};
use crate::http::{generation_body, reply_id};
use crate::openai::{SamplingFields, Stop};
use crate::sse::{sse, sse_event};
use crate::structured::ResponseFormat;
use crate::template::{TemplateFunction, TemplateMessage, TemplateToolCall};
use crate::tools::{self, Tool, ToolChoice, ToolSpec};
use crate::validate::{
    parse_object, required_str, sampling, text_parts, FieldNames, GenInput, GenRequest,
};
use crate::{ApiError, AppState, RequestTag};

#[derive(Debug, Deserialize)]
pub(crate) struct MessagesRequest {
    model: String,
    messages: Vec<Value>,
    max_tokens: Option<i64>,
    system: Option<Value>,
    stop_sequences: Option<Vec<String>>,
    stream: Option<bool>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    output_config: Option<Value>,
    container: Option<Value>,
    mcp_servers: Option<Value>,
    context_management: Option<Value>,
}

pub(crate) const FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "system",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "output_config",
    "container",
    "mcp_servers",
    "context_management",
];

/// Fields of the API that cannot change the output: accepted and ignored (`thinking`: a
/// thinking model thinks anyway, one that does not cannot).
pub(crate) const IGNORED: &[&str] = &[
    "metadata",
    "service_tier",
    "thinking",
    "inference_geo",
    "cache_control",
    "diagnostics",
    "speed",
    "user_profile_id",
    "workspace_id",
];

/// `count_tokens` takes the prompt's fields only.
pub(crate) const COUNT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "system",
    "tools",
    "tool_choice",
    "output_config",
];

pub(crate) fn parse(body: &[u8], count_only: bool) -> Result<GenRequest, ApiError> {
    let req: MessagesRequest = if count_only {
        parse_object(body, &[COUNT_FIELDS, IGNORED], &["model", "messages"])?
    } else {
        parse_object(
            body,
            &[FIELDS, IGNORED],
            &["model", "messages", "max_tokens"],
        )?
    };
    for (name, v) in [
        ("container", &req.container),
        ("mcp_servers", &req.mcp_servers),
        ("context_management", &req.context_management),
    ] {
        if v.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(ApiError::unsupported(
                name,
                "(server-side tools and context editing)",
            ));
        }
    }
    if let Some(t) = req.temperature.filter(|t| !(0.0..=1.0).contains(t)) {
        return Err(ApiError::invalid(
            "temperature",
            format!("{t} is not in [0, 1]: 'temperature'"),
        ));
    }
    let mut messages = Vec::new();
    match &req.system {
        None | Some(Value::Null) => {}
        v => messages.push(TemplateMessage::text(
            "system",
            text_parts(v.as_ref(), "system", &["text"])?,
        )),
    }
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "'messages' must not be empty",
        ));
    }
    for (i, m) in req.messages.iter().enumerate() {
        message(m, &format!("messages[{i}]"), &mut messages)?;
    }
    let (choice, parallel) = choice(req.tool_choice.as_ref())?;
    let tools = ToolSpec::new(
        anthropic_tools(req.tools.as_deref().unwrap_or_default())?,
        choice,
        parallel,
        "tool_choice",
    )?;
    let fields = SamplingFields {
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        stream: req.stream,
        stop: req.stop_sequences.map(Stop::Many),
        ..SamplingFields::default()
    };
    let max = req.max_tokens.map(|n| ("max_tokens", n));
    let sampling = sampling(&fields, &FieldNames::ANTHROPIC, max, None)?;
    // `output_config.format` is structured output; `effort` cannot be honoured and is ignored.
    let format = match req.output_config.as_ref().and_then(|c| c.get("format")) {
        None | Some(Value::Null) => ResponseFormat::Text,
        Some(f) => match (block_type(f), f.get("schema")) {
            ("json_schema", Some(s @ Value::Object(_))) => ResponseFormat::JsonSchema(s.clone()),
            _ => {
                return Err(ApiError::invalid(
                    "output_config.format",
                    "'output_config.format' must be {\"type\": \"json_schema\", \"schema\": {...}}",
                ))
            }
        },
    };
    Ok(GenRequest {
        model: req.model,
        input: GenInput::Chat(messages),
        sampling,
        format,
        tools,
        prompt_param: "messages",
    })
}

fn block_type(b: &Value) -> &str {
    b.get("type").and_then(Value::as_str).unwrap_or("")
}

/// One Anthropic message as chat messages: a user turn's `tool_result` blocks become tool
/// messages (before its text); an assistant turn's `tool_use` blocks its tool calls.
fn message(m: &Value, param: &str, out: &mut Vec<TemplateMessage>) -> Result<(), ApiError> {
    let role = m.get("role").and_then(Value::as_str).unwrap_or("");
    if role != "user" && role != "assistant" {
        return Err(ApiError::invalid(
            format!("{param}.role"),
            format!("role must be 'user' or 'assistant', got '{role}'"),
        ));
    }
    let blocks = match m.get("content") {
        Some(Value::String(s)) => {
            out.push(TemplateMessage::text(role, s.clone()));
            return Ok(());
        }
        Some(Value::Array(blocks)) => blocks,
        _ => {
            return Err(ApiError::invalid(
                format!("{param}.content"),
                "content must be a string or a list of content blocks",
            ))
        }
    };
    let mut turn = TemplateMessage::text(role, "");
    for (j, b) in blocks.iter().enumerate() {
        let at = format!("{param}.content[{j}]");
        let str_field = |name: &str| required_str(b, name, &at);
        match (block_type(b), role) {
            ("text", _) => turn.content.push_str(str_field("text")?),
            ("thinking", "assistant") => turn
                .reasoning_content
                .get_or_insert_with(String::new)
                .push_str(str_field("thinking")?),
            ("redacted_thinking", "assistant") => {}
            ("tool_use", "assistant") => turn.tool_calls.push(TemplateToolCall {
                id: str_field("id")?.to_string(),
                kind: "function",
                function: TemplateFunction {
                    name: str_field("name")?.to_string(),
                    arguments: b.get("input").cloned().unwrap_or_else(|| json!({})),
                },
            }),
            ("tool_result", "user") => {
                let content = match b.get("content") {
                    None | Some(Value::Null) => String::new(),
                    v => text_parts(v, &format!("{at}.content"), &["text"])?,
                };
                out.push(TemplateMessage {
                    tool_call_id: Some(str_field("tool_use_id")?.to_string()),
                    ..TemplateMessage::text("tool", content)
                });
            }
            (kind, _) => {
                return Err(ApiError::invalid(
                    format!("{at}.type"),
                    format!("'{kind}' blocks are not supported in {role} messages"),
                ))
            }
        }
    }
    if !turn.content.is_empty() || !turn.tool_calls.is_empty() || role == "assistant" {
        out.push(turn);
    }
    Ok(())
}

/// Anthropic's client tools (`name`, `description`, `input_schema`); server tools are
/// refused by name.
fn anthropic_tools(list: &[Value]) -> Result<Vec<Tool>, ApiError> {
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            let kind = block_type(t);
            if !kind.is_empty() && kind != "custom" {
                return Err(ApiError::invalid(
                    format!("tools[{i}].type"),
                    format!("server tools ('{kind}') are not supported; give client tools with an input_schema"),
                ));
            }
            let schema = t.get("input_schema").ok_or_else(|| {
                ApiError::invalid(format!("tools[{i}].input_schema"), format!("'tools[{i}].input_schema' is required"))
            })?;
            tools::tool(
                t.get("name").and_then(Value::as_str),
                t.get("description").and_then(Value::as_str),
                Some(schema),
                &format!("tools[{i}]"),
            )
            .map_err(|e| match e {
                ApiError::InvalidRequest { param: Some(p), message, code } => ApiError::InvalidRequest {
                    param: Some(p.replace(".parameters", ".input_schema")),
                    message,
                    code,
                },
                e => e,
            })
        })
        .collect()
}

/// `tool_choice` (`auto`, `any`, `tool` with a name, `none`) and whether calls may come
/// several at once.
fn choice(v: Option<&Value>) -> Result<(Option<ToolChoice>, bool), ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok((None, true));
    };
    let parallel = !v
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let c = match (block_type(v), v.get("name").and_then(Value::as_str)) {
        ("auto", _) => ToolChoice::Auto,
        ("any", _) => ToolChoice::Required,
        ("none", _) => ToolChoice::None,
        ("tool", Some(name)) => ToolChoice::Named(name.to_string()),
        _ => {
            return Err(ApiError::invalid(
                "tool_choice",
                "'tool_choice.type' must be auto, any, none, or tool with a name",
            ))
        }
    };
    Ok((Some(c), parallel))
}

/// A message: JSON, or with `stream: true` Anthropic's event stream.
#[utoipa::path(
    post,
    path = "/v1/messages",
    request_body = Object,
    responses(
        (status = 200, description = "The message (or an SSE stream of events)", body = Object),
        (status = 400, description = "Bad input, in Anthropic's error shape", body = Object),
    )
)]
pub(crate) async fn messages(
    State(state): State<AppState>,
    Extension(tag): Extension<RequestTag>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = generation_body(&state, body)?;
    let req = parse(&body, false)?;
    let started = start(&state, &tag, req).await?;
    let mut builder = Builder {
        id: reply_id("msg", 0).replacen('-', "_", 1),
        model: started.model.clone(),
        input_tokens: started.prompts.first().map_or(0, Vec::len),
        content: Vec::new(),
        open: None,
    };
    let Some(mut run) = started.runs.into_iter().next() else {
        return Err(ApiError::Internal("no generation was started".into()));
    };
    if started.stream {
        return Ok(sse(events(builder, run)).into_response());
    }
    while let Some(piece) = run.next().await {
        match piece {
            Piece::Error(e) => return Err(e),
            piece => {
                if let Some(end) = builder.piece(piece, &mut Vec::new()) {
                    return Ok(Json(builder.message(Some(end))).into_response());
                }
            }
        }
    }
    Err(ApiError::Internal(
        "the generation ended without a finish".into(),
    ))
}

/// `POST /v1/messages/count_tokens`: the prompt's token count, as the template renders it.
#[utoipa::path(post, path = "/v1/messages/count_tokens", request_body = Object, responses((status = 200, body = Object)))]
pub(crate) async fn count_tokens(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = generation_body(&state, body)?;
    let req = parse(&body, true)?;
    let n = count_prompt(&state, req).await?;
    Ok(Json(json!({"input_tokens": n})))
}

/// How the message ended: stop reason, stop sequence, output tokens.
struct End {
    stop_reason: &'static str,
    stop_sequence: Option<String>,
    output_tokens: usize,
}

enum Block {
    Thinking,
    Text,
    ToolUse,
}

struct Builder {
    id: String,
    model: String,
    input_tokens: usize,
    /// Finished blocks.
    content: Vec<Value>,
    /// The block being written: its kind, its start, its text (a tool call's JSON).
    open: Option<(Block, Value, String)>,
}

type Events = Vec<(&'static str, Value)>;

impl Builder {
    fn message(&self, end: Option<End>) -> Value {
        let (stop_reason, stop_sequence, output_tokens) = match end {
            Some(e) => (Some(e.stop_reason), e.stop_sequence, e.output_tokens),
            None => (None, None, 0),
        };
        json!({
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": if stop_reason.is_some() { json!(self.content) } else { json!([]) },
            "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": output_tokens,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
        })
    }

    fn begin(&mut self, kind: Block, start: Value, events: &mut Events) {
        let same = matches!(
            (&self.open, &kind),
            (Some((Block::Thinking, ..)), Block::Thinking) | (Some((Block::Text, ..)), Block::Text)
        );
        if same {
            return;
        }
        self.close(events);
        let index = self.content.len();
        events.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": start}),
        ));
        self.open = Some((kind, start, String::new()));
    }

    fn close(&mut self, events: &mut Events) {
        let Some((kind, mut block, text)) = self.open.take() else {
            return;
        };
        let index = self.content.len();
        match kind {
            Block::Thinking => block["thinking"] = json!(text),
            Block::Text => block["text"] = json!(text),
            // Arguments cut off by max_tokens do not parse: the input is then empty.
            Block::ToolUse => {
                block["input"] = serde_json::from_str(&text).unwrap_or_else(|_| json!({}))
            }
        }
        events.push((
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
        self.content.push(block);
    }

    /// Adds a piece, with the stream's events for it; `Some` at the end.
    fn piece(&mut self, piece: Piece, events: &mut Events) -> Option<End> {
        let (delta, text) = match piece {
            Piece::Text { text, .. } => {
                self.begin(Block::Text, json!({"type": "text", "text": ""}), events);
                (json!({"type": "text_delta", "text": text}), text)
            }
            Piece::Reasoning(text) => {
                let start = json!({"type": "thinking", "thinking": "", "signature": ""});
                self.begin(Block::Thinking, start, events);
                (json!({"type": "thinking_delta", "thinking": text}), text)
            }
            Piece::Call { id, name, .. } => {
                let id = id.replacen("call_", "toolu_", 1);
                let start = json!({"type": "tool_use", "id": id, "name": name, "input": {}});
                self.begin(Block::ToolUse, start, events);
                return None;
            }
            Piece::Args { args, .. } => (
                json!({"type": "input_json_delta", "partial_json": args}),
                args,
            ),
            Piece::Finish {
                reason,
                usage,
                stop_sequence,
            } => {
                self.close(events);
                let stop_reason = match reason {
                    Finish::Length => "max_tokens",
                    Finish::ToolCalls => "tool_use",
                    _ if stop_sequence.is_some() => "stop_sequence",
                    _ => "end_turn",
                };
                return Some(End {
                    stop_reason,
                    stop_sequence,
                    output_tokens: usage.completion_tokens,
                });
            }
            Piece::Error(_) => return None,
        };
        if let Some((_, _, t)) = &mut self.open {
            t.push_str(&text);
            let index = self.content.len();
            events.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": delta}),
            ));
        }
        None
    }
}

fn events(
    mut builder: Builder,
    mut run: Run,
) -> impl futures::Stream<Item = Result<axum::response::sse::Event, Infallible>> + Send {
    async_stream::stream! {
        let start = json!({"type": "message_start", "message": builder.message(None)});
        yield Ok(sse_event("message_start", &start));
        while let Some(piece) = run.next().await {
            if let Piece::Error(e) = piece {
                yield Ok(sse_event("error", &e.anthropic_body()));
                break;
            }
            let mut events = Vec::new();
            let end = builder.piece(piece, &mut events);
            for (kind, body) in events {
                yield Ok(sse_event(kind, &body));
            }
            if let Some(end) = end {
                let delta = json!({
                    "type": "message_delta",
                    "delta": {"stop_reason": end.stop_reason, "stop_sequence": end.stop_sequence},
                    "usage": {"output_tokens": end.output_tokens},
                });
                yield Ok(sse_event("message_delta", &delta));
                yield Ok(sse_event("message_stop", &json!({"type": "message_stop"})));
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param_of(body: &str) -> Option<String> {
        match parse(body.as_bytes(), false) {
            Err(ApiError::InvalidRequest { param, .. }) => param,
            other => panic!("expected a 400 for {body}, got {other:?}"),
        }
    }

    #[test]
    fn blocks_become_messages() {
        let req = parse(
            br#"{"model":"m","max_tokens":30,"system":[{"type":"text","text":"be brief","cache_control":{"type":"ephemeral"}}],
                "messages":[{"role":"user","content":"weather?"},
                {"role":"assistant","content":[{"type":"text","text":"Checking."},{"type":"tool_use","id":"t1","name":"w","input":{"city":"Paris"}}]},
                {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":[{"type":"text","text":"sunny"}]},{"type":"text","text":"thanks"}]}],
                "tools":[{"name":"w","input_schema":{"type":"object"}}],"tool_choice":{"type":"any","disable_parallel_tool_use":true},
                "stop_sequences":["\n\n"],"top_k":5,"metadata":{"user_id":"u"},"thinking":{"type":"enabled","budget_tokens":1024},
                "cache_control":{"type":"ephemeral"},"speed":"fast","output_config":{"effort":"low","format":{"type":"json_schema","schema":{"type":"object"}}}}"#,
            false,
        )
        .unwrap();
        let GenInput::Chat(m) = &req.input else {
            panic!()
        };
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "user"]);
        assert_eq!(m[0].content, "be brief");
        assert_eq!(m[2].content, "Checking.");
        assert_eq!(
            m[2].tool_calls[0].function.arguments,
            json!({"city": "Paris"})
        );
        assert_eq!(
            (m[3].content.as_str(), m[3].tool_call_id.as_deref()),
            ("sunny", Some("t1"))
        );
        assert_eq!(req.tools.choice, ToolChoice::Required);
        assert!(!req.tools.parallel);
        assert_eq!(req.sampling.stop, vec!["\n\n".to_string()]);
        assert_eq!(req.sampling.params.top_k, 5);
        assert_eq!(req.sampling.max_tokens, Some(30));
        assert_eq!(
            req.format,
            ResponseFormat::JsonSchema(json!({"type": "object"}))
        );
    }

    #[test]
    fn every_bad_or_unsupported_field_is_named() {
        let m = r#""model":"m","messages":[{"role":"user","content":"hi"}]"#;
        assert_eq!(param_of(&format!("{{{m}}}")).as_deref(), Some("max_tokens"));
        for (extra, param) in [
            (r#""max_tokens":0"#, "max_tokens"),
            (r#""max_tokens":5,"temperature":1.5"#, "temperature"),
            (
                r#""max_tokens":5,"stop_sequences":["a","b","c","d","e"]"#,
                "stop_sequences",
            ),
            (
                r#""max_tokens":5,"tools":[{"type":"web_search_20250305","name":"s"}]"#,
                "tools[0].type",
            ),
            (
                r#""max_tokens":5,"tools":[{"name":"f"}]"#,
                "tools[0].input_schema",
            ),
            (
                r#""max_tokens":5,"tool_choice":{"type":"sometimes"}"#,
                "tool_choice",
            ),
            (r#""max_tokens":5,"mcp_servers":[{}]"#, "mcp_servers"),
            (r#""max_tokens":5,"n":2"#, "n"),
            (
                r#""max_tokens":5,"output_config":{"format":{"type":"xml"}}"#,
                "output_config.format",
            ),
        ] {
            assert_eq!(
                param_of(&format!("{{{m},{extra}}}")).as_deref(),
                Some(param),
                "{extra}"
            );
        }
        assert_eq!(
            param_of(
                r#"{"model":"m","max_tokens":5,"messages":[{"role":"system","content":"x"}]}"#
            )
            .as_deref(),
            Some("messages[0].role")
        );
        assert_eq!(
            param_of(r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[{"type":"image","source":{}}]}]}"#).as_deref(),
            Some("messages[0].content[0].type")
        );
        // count_tokens needs no max_tokens, and takes no sampling fields.
        assert!(parse(format!("{{{m}}}").as_bytes(), true).is_ok());
        assert!(parse(format!("{{{m},\"max_tokens\":5}}").as_bytes(), true).is_err());
    }
}
