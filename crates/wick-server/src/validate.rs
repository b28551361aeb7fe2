//! Turning a request body into validated parameters. Every rule is a 400 that names its
//! parameter; fields the server does not support are refused by name, never ignored.

use serde_json::Value;
use wick_core::SamplingParams;

use crate::openai::{ChatCompletionRequest, MessageContent, Stop, CHAT_FIELDS};
use crate::template::TemplateMessage;
use crate::ApiError;

const MAX_STOP_STRINGS: usize = 4;
const ROLES: &[&str] = &["system", "developer", "user", "assistant"];

/// A chat request that passed every check.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidChat {
    pub model: String,
    pub messages: Vec<TemplateMessage>,
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub user: Option<String>,
}

/// Parses and checks a `POST /v1/chat/completions` body.
pub fn parse_chat(body: &[u8]) -> Result<ValidChat, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::InvalidRequest {
        message: format!("The request body is not valid JSON: {e}"),
        param: None,
        code: Some("invalid_json"),
    })?;
    let Some(obj) = value.as_object() else {
        return Err(ApiError::InvalidRequest {
            message: "The request body must be a JSON object.".into(),
            param: None,
            code: Some("invalid_json"),
        });
    };
    if let Some(unknown) = obj.keys().find(|k| !CHAT_FIELDS.contains(&k.as_str())) {
        return Err(ApiError::InvalidRequest {
            message: format!("Unrecognized request argument supplied: {unknown}"),
            param: Some(unknown.clone()),
            code: Some("unknown_parameter"),
        });
    }
    for required in ["model", "messages"] {
        if obj.get(required).is_none_or(Value::is_null) {
            return Err(ApiError::invalid(
                required,
                format!("Missing required parameter: '{required}'."),
            ));
        }
    }
    let req: ChatCompletionRequest = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let param = path.trim_start_matches('.').to_string();
        ApiError::invalid(
            if param.is_empty() {
                "body".into()
            } else {
                param.clone()
            },
            format!("Invalid type for '{param}': {}", e.inner()),
        )
    })?;
    check(req)
}

fn check(req: ChatCompletionRequest) -> Result<ValidChat, ApiError> {
    refuse_unsupported(&req)?;
    let messages = messages(&req)?;
    let max_tokens = match (req.max_completion_tokens, req.max_tokens) {
        (Some(n), _) => Some(positive("max_completion_tokens", n)?),
        (None, Some(n)) => Some(positive("max_tokens", n)?),
        (None, None) => None,
    };
    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("{temperature} is not in [0, 2]: 'temperature'"),
        ));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("{top_p} is not in (0, 1]: 'top_p'"),
        ));
    }
    let stop = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP_STRINGS || stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            format!("'stop' takes up to {MAX_STOP_STRINGS} non-empty strings"),
        ));
    }
    let stream = req.stream.unwrap_or(false);
    if req.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "'stream_options' is only allowed when 'stream' is true",
        ));
    }
    Ok(ValidChat {
        model: req.model,
        messages,
        max_tokens,
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_p: top_p as f32,
            seed: req.seed.map(|s| s as u64),
        },
        stop,
        stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        user: req.user,
    })
}

fn positive(param: &str, n: i64) -> Result<usize, ApiError> {
    if n < 1 {
        return Err(ApiError::invalid(
            param,
            format!("{n} is less than the minimum of 1: '{param}'"),
        ));
    }
    Ok(n as usize)
}

/// Fields OpenAI defines that this server does not implement yet: accepted only at their
/// neutral values, refused otherwise.
fn refuse_unsupported(req: &ChatCompletionRequest) -> Result<(), ApiError> {
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::unsupported("n", "other than 1"));
    }
    if req.presence_penalty.is_some_and(|p| p != 0.0) {
        return Err(ApiError::unsupported("presence_penalty", "other than 0"));
    }
    if req.frequency_penalty.is_some_and(|p| p != 0.0) {
        return Err(ApiError::unsupported("frequency_penalty", "other than 0"));
    }
    if req.logprobs == Some(true) {
        return Err(ApiError::unsupported("logprobs", "true"));
    }
    if req.top_logprobs.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(ApiError::unsupported("top_logprobs", "(any value)"));
    }
    if req.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(ApiError::unsupported("logit_bias", "(non-empty)"));
    }
    if let Some(rf) = &req.response_format {
        if rf.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::unsupported(
                "response_format",
                "other than {\"type\": \"text\"}",
            ));
        }
    }
    if req.tools.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(ApiError::unsupported("tools", "(tool calling)"));
    }
    if req
        .tool_choice
        .as_ref()
        .is_some_and(|v| !v.is_null() && v != "none")
    {
        return Err(ApiError::unsupported("tool_choice", "other than \"none\""));
    }
    Ok(())
}

fn messages(req: &ChatCompletionRequest) -> Result<Vec<TemplateMessage>, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "'messages' must not be empty",
        ));
    }
    req.messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    format!(
                        "Unsupported role '{}' in messages[{i}]: expected one of {}",
                        m.role,
                        ROLES.join(", ")
                    ),
                ));
            }
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::invalid(
                                    format!("messages[{i}].content[{j}]"),
                                    format!(
                                        "Only text content parts are supported, got '{}'",
                                        p.kind
                                    ),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            if m.content.is_none() && m.role != "assistant" {
                return Err(ApiError::invalid(
                    format!("messages[{i}].content"),
                    format!("Missing required parameter: 'messages[{i}].content'."),
                ));
            }
            // Templates know "system"; OpenAI's newer "developer" role means the same.
            let role = if m.role == "developer" {
                "system"
            } else {
                &m.role
            };
            Ok(TemplateMessage {
                role: role.to_string(),
                content,
                name: m.name.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param_of(body: &str) -> Option<String> {
        match parse_chat(body.as_bytes()) {
            Err(ApiError::InvalidRequest { param, .. }) => param,
            other => panic!("expected a 400 for {body}, got {other:?}"),
        }
    }

    #[test]
    fn a_full_request_parses() {
        let v = parse_chat(
            br#"{"model":"m","messages":[{"role":"developer","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},{"role":"user","content":"hi"}],
                 "max_completion_tokens":5,"temperature":0,"top_p":0.5,"seed":3,"stop":"x",
                 "stream":true,"stream_options":{"include_usage":true},"n":1,"user":"u"}"#,
        )
        .unwrap();
        assert_eq!(v.messages[0].role, "system");
        assert_eq!(v.messages[0].content, "ab");
        assert_eq!(v.max_tokens, Some(5));
        assert_eq!(v.sampling.temperature, 0.0);
        assert_eq!(v.sampling.seed, Some(3));
        assert_eq!(v.stop, vec!["x".to_string()]);
        assert!(v.stream && v.include_usage);
    }

    #[test]
    fn every_bad_field_is_named() {
        let m = r#""model":"m","messages":[{"role":"user","content":"hi"}]"#;
        assert_eq!(param_of("{not json"), None);
        assert_eq!(param_of("[1]"), None);
        assert_eq!(param_of(r#"{"model":"m"}"#).as_deref(), Some("messages"));
        assert_eq!(param_of(r#"{"messages":[]}"#).as_deref(), Some("model"));
        assert_eq!(
            param_of(r#"{"model":"m","messages":[]}"#).as_deref(),
            Some("messages")
        );
        assert_eq!(
            param_of(r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#).as_deref(),
            Some("messages[0].role")
        );
        assert_eq!(
            param_of(r#"{"model":"m","messages":"hi"}"#).as_deref(),
            Some("messages")
        );
        assert_eq!(
            param_of(&format!(r#"{{{m},"temperature":"hot"}}"#)).as_deref(),
            Some("temperature")
        );
        assert_eq!(
            param_of(&format!(r#"{{{m},"temperature":2.5}}"#)).as_deref(),
            Some("temperature")
        );
        assert_eq!(
            param_of(&format!(r#"{{{m},"top_p":0}}"#)).as_deref(),
            Some("top_p")
        );
        assert_eq!(
            param_of(&format!(r#"{{{m},"max_tokens":0}}"#)).as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            param_of(&format!(r#"{{{m},"max_tokens":1.5}}"#)).as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            param_of(&format!(r#"{{{m},"stop":["a","b","c","d","e"]}}"#)).as_deref(),
            Some("stop")
        );
        assert_eq!(param_of(&format!(r#"{{{m},"n":2}}"#)).as_deref(), Some("n"));
        assert_eq!(
            param_of(&format!(r#"{{{m},"logprobs":true}}"#)).as_deref(),
            Some("logprobs")
        );
        assert_eq!(
            param_of(&format!(r#"{{{m},"tools":[]}}"#)).as_deref(),
            Some("tools")
        );
        assert_eq!(
            param_of(&format!(r#"{{{m},"frobnicate":1}}"#)).as_deref(),
            Some("frobnicate")
        );
        assert_eq!(
            param_of(&format!(
                r#"{{{m},"stream_options":{{"include_usage":true}}}}"#
            ))
            .as_deref(),
            Some("stream_options")
        );
    }
}
