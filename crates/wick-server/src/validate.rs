//! Turning a request body into validated parameters. Every rule is a 400 that names its
//! parameter; fields the server does not support are refused by name, never ignored.

use serde::de::DeserializeOwned;
use serde_json::Value;
use wick_core::SamplingParams;

use crate::openai::{
    ChatCompletionRequest, CompletionRequest, MessageContent, Prompt, SamplingFields, Stop,
    CHAT_FIELDS, COMPLETION_FIELDS, SAMPLING_FIELDS,
};
use crate::structured::ResponseFormat;
use crate::template::{TemplateFunction, TemplateMessage, TemplateToolCall};
use crate::tools::{self, ToolSpec};
use crate::ApiError;

const MAX_N: usize = 16;
const MAX_TOP_LOGPROBS: usize = 20;
const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

/// Sampling and control, checked; shared by both endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSampling {
    pub params: SamplingParams,
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Choices per prompt.
    pub n: usize,
    pub ignore_eos: bool,
    pub user: Option<String>,
    /// A context smaller than the model's that prompt and output must fit (Ollama's
    /// `num_ctx`); `None`: the model's.
    pub context: Option<usize>,
    /// `max_tokens` is a cap: past what the context leaves, it is cut to that (Ollama's
    /// `num_predict`) rather than refused.
    pub clamp_max_tokens: bool,
}

/// One generation request, whatever API shape it arrived in (chat completions,
/// completions, Responses, Anthropic Messages): every endpoint translates its body into
/// this, and `generation::start` makes the checks that need the model, in one place.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GenRequest {
    pub model: String,
    pub input: GenInput,
    pub sampling: ValidSampling,
    pub format: ResponseFormat,
    pub tools: ToolSpec,
    /// The request field that holds the prompt (named by context-length errors).
    pub prompt_param: &'static str,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum GenInput {
    /// Messages, rendered with the model's chat template.
    Chat(Vec<TemplateMessage>),
    /// Raw prompts, one or several.
    Prompts(Vec<PromptInput>),
}

/// One completions prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

fn invalid_json(message: String) -> ApiError {
    ApiError::InvalidRequest {
        message,
        param: None,
        code: Some("invalid_json"),
    }
}

/// Parses a JSON object body, refusing unknown fields by name and type errors by path.
pub(crate) fn parse_object<T: DeserializeOwned>(
    body: &[u8],
    fields: &[&[&str]],
    required: &[&str],
) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| invalid_json(format!("The request body is not valid JSON: {e}")))?;
    let Some(obj) = value.as_object() else {
        return Err(invalid_json(
            "The request body must be a JSON object.".into(),
        ));
    };
    let known = |k: &str| fields.iter().any(|f| f.contains(&k));
    if let Some(unknown) = obj.keys().find(|k| !known(k)) {
        return Err(ApiError::InvalidRequest {
            message: format!("Unrecognized request argument supplied: {unknown}"),
            param: Some(unknown.clone()),
            code: Some("unknown_parameter"),
        });
    }
    for &name in required {
        if obj.get(name).is_none_or(Value::is_null) {
            return Err(ApiError::invalid(
                name,
                format!("Missing required parameter: '{name}'."),
            ));
        }
    }
    // Type errors name their field; inside the flattened sampling fields serde loses the
    // path, so it is found by checking them one by one.
    serde_path_to_error::deserialize(&value).map_err(|e| {
        let path = e.path().to_string();
        let param = path.trim_start_matches('.').to_string();
        let param = if param.is_empty() || param == "?" {
            first_bad_field(obj).unwrap_or_else(|| "body".into())
        } else {
            param
        };
        ApiError::invalid(
            param.clone(),
            format!("Invalid value for '{param}': {}", e.inner()),
        )
    })
}

/// For errors inside the flattened sampling fields: the first field whose value has the
/// wrong type.
fn first_bad_field(obj: &serde_json::Map<String, Value>) -> Option<String> {
    obj.iter()
        .find(|(k, v)| {
            let single = serde_json::json!({ k.as_str(): v });
            serde_json::from_value::<SamplingFields>(single).is_err()
        })
        .map(|(k, _)| k.clone())
}

/// Parses and checks a `POST /v1/chat/completions` body.
pub(crate) fn parse_chat(body: &[u8]) -> Result<GenRequest, ApiError> {
    let req: ChatCompletionRequest = parse_object(
        body,
        &[CHAT_FIELDS, SAMPLING_FIELDS],
        &["model", "messages"],
    )?;
    let parallel = match &req.parallel_tool_calls {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::invalid(
                "parallel_tool_calls",
                "'parallel_tool_calls' must be a boolean",
            ))
        }
    };
    let tools = ToolSpec::new(
        tools::openai_tools(req.tools.as_ref(), true)?,
        tools::openai_choice(req.tool_choice.as_ref())?,
        parallel,
        "tool_choice",
    )?;
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "'top_logprobs' needs 'logprobs' set to true",
            ))
        }
        (false, None) => None,
        (true, n) => Some(in_range(
            "top_logprobs",
            n.unwrap_or(0),
            0,
            MAX_TOP_LOGPROBS,
        )?),
    };
    let max_tokens = match req.max_completion_tokens {
        Some(n) => Some(("max_completion_tokens", n)),
        None => req.sampling.max_tokens.map(|n| ("max_tokens", n)),
    };
    Ok(GenRequest {
        format: ResponseFormat::parse(req.response_format.as_ref())?,
        input: GenInput::Chat(messages_from(&req.messages)?),
        sampling: sampling(&req.sampling, &FieldNames::OPENAI, max_tokens, logprobs)?,
        model: req.model,
        tools,
        prompt_param: "messages",
    })
}

/// Parses and checks a `POST /v1/completions` body.
pub(crate) fn parse_completion(body: &[u8]) -> Result<GenRequest, ApiError> {
    let req: CompletionRequest = parse_object(
        body,
        &[COMPLETION_FIELDS, SAMPLING_FIELDS],
        &["model", "prompt"],
    )?;
    if req.echo == Some(true) {
        return Err(ApiError::unsupported("echo", "true"));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported("suffix", "(insertion)"));
    }
    let n = req.sampling.n.unwrap_or(1);
    if req.best_of.is_some_and(|b| b != n) {
        return Err(ApiError::unsupported("best_of", "other than n"));
    }
    let logprobs = req
        .logprobs
        .map(|n| in_range("logprobs", n, 0, MAX_TOP_LOGPROBS))
        .transpose()?;
    let prompts = match req.prompt {
        Prompt::Text(t) => vec![PromptInput::Text(t)],
        Prompt::Texts(ts) => ts.into_iter().map(PromptInput::Text).collect(),
        Prompt::Ids(ids) => vec![PromptInput::Ids(ids)],
        Prompt::IdLists(lists) => lists.into_iter().map(PromptInput::Ids).collect(),
    };
    if prompts.is_empty() || prompts.len() > MAX_N {
        return Err(ApiError::invalid(
            "prompt",
            format!("'prompt' takes 1 to {MAX_N} prompts"),
        ));
    }
    if prompts
        .iter()
        .any(|p| matches!(p, PromptInput::Ids(ids) if ids.is_empty()))
    {
        return Err(ApiError::invalid("prompt", "a token-id prompt is empty"));
    }
    // OpenAI's completions default to 16 tokens.
    let max_tokens = Some(("max_tokens", req.sampling.max_tokens.unwrap_or(16)));
    Ok(GenRequest {
        sampling: sampling(&req.sampling, &FieldNames::OPENAI, max_tokens, logprobs)?,
        input: GenInput::Prompts(prompts),
        model: req.model,
        format: ResponseFormat::Text,
        tools: ToolSpec::none(),
        prompt_param: "prompt",
    })
}

pub(crate) fn in_range(param: &str, n: i64, lo: usize, hi: usize) -> Result<usize, ApiError> {
    if n < lo as i64 || n > hi as i64 {
        return Err(ApiError::invalid(
            param,
            format!("{n} is not in [{lo}, {hi}]: '{param}'"),
        ));
    }
    Ok(n as usize)
}

fn float_in(
    param: &str,
    v: Option<f64>,
    default: f64,
    ok: impl Fn(f64) -> bool,
    range: &str,
) -> Result<f32, ApiError> {
    let v = v.unwrap_or(default);
    if !ok(v) {
        return Err(ApiError::invalid(
            param,
            format!("{v} is not in {range}: '{param}'"),
        ));
    }
    Ok(v as f32)
}

/// An API's names for the sampling fields whose names differ between APIs, so that an error
/// names the field the client sent.
pub(crate) struct FieldNames {
    pub stop: &'static str,
    /// Most stop strings the API takes.
    pub max_stop: usize,
}

impl FieldNames {
    pub(crate) const OPENAI: FieldNames = FieldNames {
        stop: "stop",
        max_stop: 4,
    };
    pub(crate) const ANTHROPIC: FieldNames = FieldNames {
        stop: "stop_sequences",
        max_stop: 4,
    };
    /// Ollama sets no limit (clients send a model's several end-of-turn strings); this one
    /// bounds the stop buffer's work.
    pub(crate) const OLLAMA: FieldNames = FieldNames {
        stop: "options.stop",
        max_stop: 32,
    };
}

/// The sampling fields of any API (named in `names`; `max_tokens` with its API's name)
/// checked into engine parameters.
pub(crate) fn sampling(
    f: &SamplingFields,
    names: &FieldNames,
    max_tokens: Option<(&str, i64)>,
    logprobs: Option<usize>,
) -> Result<ValidSampling, ApiError> {
    let max_tokens = max_tokens
        .map(|(param, n)| in_range(param, n, 1, usize::MAX >> 1))
        .transpose()?;
    let temperature = float_in(
        "temperature",
        f.temperature,
        1.0,
        |t| (0.0..=2.0).contains(&t),
        "[0, 2]",
    )?;
    let top_p = float_in("top_p", f.top_p, 1.0, |p| p > 0.0 && p <= 1.0, "(0, 1]")?;
    let min_p = float_in(
        "min_p",
        f.min_p,
        0.0,
        |p| (0.0..=1.0).contains(&p),
        "[0, 1]",
    )?;
    let penalty = |v| (-2.0..=2.0).contains(&v);
    let presence_penalty = float_in(
        "presence_penalty",
        f.presence_penalty,
        0.0,
        penalty,
        "[-2, 2]",
    )?;
    let frequency_penalty = float_in(
        "frequency_penalty",
        f.frequency_penalty,
        0.0,
        penalty,
        "[-2, 2]",
    )?;
    let repetition_penalty = float_in(
        "repetition_penalty",
        f.repetition_penalty,
        1.0,
        |v| v > 0.0 && v <= 10.0,
        "(0, 10]",
    )?;
    let top_k = match f.top_k {
        None | Some(-1) => 0,
        Some(k) => in_range("top_k", k, 0, u32::MAX as usize)?,
    };
    let n = in_range("n", f.n.unwrap_or(1), 1, MAX_N)?;
    let mut logit_bias = Vec::new();
    for (k, &v) in f.logit_bias.iter().flatten() {
        let id = k.parse::<u32>().map_err(|_| {
            ApiError::invalid(
                "logit_bias",
                format!("'logit_bias' key {k:?} is not a token id"),
            )
        })?;
        if !(-100.0..=100.0).contains(&v) {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("'logit_bias' value {v} is not in [-100, 100]"),
            ));
        }
        logit_bias.push((id, v as f32));
    }
    let stop = match &f.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > names.max_stop || stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            names.stop,
            format!(
                "'{}' takes up to {} non-empty strings",
                names.stop, names.max_stop
            ),
        ));
    }
    let stream = f.stream.unwrap_or(false);
    if f.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "'stream_options' is only allowed when 'stream' is true",
        ));
    }
    Ok(ValidSampling {
        params: SamplingParams {
            temperature,
            top_p,
            top_k,
            min_p,
            seed: f.seed.map(|s| s as u64),
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
            logit_bias,
            logprobs,
        },
        max_tokens,
        stop,
        stream,
        include_usage: f.stream_options.as_ref().is_some_and(|o| o.include_usage),
        n,
        ignore_eos: f.ignore_eos.unwrap_or(false),
        user: f.user.clone(),
        context: None,
        clamp_max_tokens: false,
    })
}

pub(crate) fn messages_from(
    list: &[crate::openai::ChatMessage],
) -> Result<Vec<TemplateMessage>, ApiError> {
    if list.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "'messages' must not be empty",
        ));
    }
    list.iter()
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
                None if m.role == "assistant" => String::new(),
                None => {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].content"),
                        format!("Missing required parameter: 'messages[{i}].content'."),
                    ))
                }
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
            // Templates know "system"; OpenAI's newer "developer" role means the same.
            let role = if m.role == "developer" {
                "system"
            } else {
                &m.role
            };
            let tool_calls = m
                .tool_calls
                .iter()
                .flatten()
                .enumerate()
                .map(|(j, c)| openai_tool_call(c, &format!("messages[{i}].tool_calls[{j}]")))
                .collect::<Result<Vec<_>, _>>()?;
            if !tool_calls.is_empty() && m.role != "assistant" {
                return Err(ApiError::invalid(
                    format!("messages[{i}].tool_calls"),
                    "only assistant messages have tool calls",
                ));
            }
            Ok(TemplateMessage {
                role: role.to_string(),
                content,
                name: m.name.clone(),
                tool_calls,
                tool_call_id: m.tool_call_id.clone(),
                reasoning_content: m.reasoning_content.clone().or_else(|| m.reasoning.clone()),
            })
        })
        .collect()
}

/// One of an assistant message's earlier tool calls, its arguments parsed (templates write
/// them as JSON).
pub(crate) fn openai_tool_call(v: &Value, param: &str) -> Result<TemplateToolCall, ApiError> {
    let name = v.pointer("/function/name").and_then(Value::as_str);
    let args = v.pointer("/function/arguments");
    let (Some(name), Some(args)) = (name, args) else {
        return Err(ApiError::invalid(
            param,
            "a tool call needs 'function.name' and 'function.arguments'",
        ));
    };
    Ok(TemplateToolCall {
        id: v
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        kind: "function",
        function: TemplateFunction {
            name: name.to_string(),
            arguments: call_arguments(args, &format!("{param}.function.arguments"))?,
        },
    })
}

/// `v[name]` as a string, or a 400 naming `param.name` as required.
pub(crate) fn required_str<'a>(v: &'a Value, name: &str, param: &str) -> Result<&'a str, ApiError> {
    v.get(name).and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid(
            format!("{param}.{name}"),
            format!("'{param}.{name}' is required"),
        )
    })
}

/// Content given as a string or as a list of text parts whose `type` is one of `kinds`
/// (Responses' `input_text`, Anthropic's `text` blocks): their text joined.
pub(crate) fn text_parts(
    v: Option<&Value>,
    param: &str,
    kinds: &[&str],
) -> Result<String, ApiError> {
    match v {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
                match p.get("text").and_then(Value::as_str) {
                    Some(t) if kinds.contains(&kind) => text.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            format!("{param}[{j}]"),
                            format!("only text parts are supported here, got '{kind}'"),
                        ))
                    }
                }
            }
            Ok(text)
        }
        _ => Err(ApiError::invalid(
            param,
            "content must be a string or a list of text parts",
        )),
    }
}

/// Call arguments as a JSON value: given as a JSON string (OpenAI) or as an object.
pub(crate) fn call_arguments(args: &Value, param: &str) -> Result<Value, ApiError> {
    match args {
        Value::String(s) => serde_json::from_str(s)
            .map_err(|e| ApiError::invalid(param, format!("the arguments are not JSON: {e}"))),
        other => Ok(other.clone()),
    }
}

#[cfg(test)]
mod fields;
#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
