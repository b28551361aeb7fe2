//! Ollama's request bodies (`/api/chat`, `/api/generate`) checked into the one
//! [`GenRequest`] every dialect becomes. Ollama's sampling defaults apply where `options`
//! leaves a field out (temperature 0.8, top_k 40, top_p 0.9); options that only place the
//! model (threads, GPU layers, batch size) are accepted and have no effect here; options that
//! would change the output and that Wick cannot honour are refused by name.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::openai::{SamplingFields, Stop};
use crate::structured::ResponseFormat;
use crate::template::TemplateMessage;
use crate::tools::{self, ToolSpec};
use crate::validate::{openai_tool_call, sampling, FieldNames, GenInput, GenRequest, PromptInput};
use crate::{ApiError, ServedModel};

#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    pub model: String,
    pub messages: Option<Vec<Value>>,
    pub stream: Option<bool>,
    pub format: Option<Value>,
    pub keep_alive: Option<Value>,
    pub tools: Option<Value>,
    pub options: Option<Map<String, Value>>,
    pub think: Option<Value>,
    /// Ollama cuts the oldest history to fit `num_ctx`, or shifts the context; here a
    /// prompt that does not fit is a 400 either way.
    #[allow(dead_code)]
    pub truncate: Option<bool>,
    #[allow(dead_code)]
    pub shift: Option<bool>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
}

pub(crate) const CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "stream",
    "format",
    "keep_alive",
    "tools",
    "options",
    "think",
    "truncate",
    "shift",
    "logprobs",
    "top_logprobs",
];

#[derive(Debug, Deserialize)]
pub(crate) struct GenerateRequest {
    pub model: String,
    pub prompt: Option<String>,
    pub suffix: Option<String>,
    pub system: Option<String>,
    pub template: Option<String>,
    pub context: Option<Vec<i64>>,
    pub stream: Option<bool>,
    pub raw: Option<bool>,
    pub format: Option<Value>,
    pub keep_alive: Option<Value>,
    pub images: Option<Vec<Value>>,
    pub options: Option<Map<String, Value>>,
    pub think: Option<Value>,
    /// Ollama cuts the oldest history to fit `num_ctx`, or shifts the context; here a
    /// prompt that does not fit is a 400 either way.
    #[allow(dead_code)]
    pub truncate: Option<bool>,
    #[allow(dead_code)]
    pub shift: Option<bool>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
}

pub(crate) const GENERATE_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "suffix",
    "system",
    "template",
    "context",
    "stream",
    "raw",
    "format",
    "keep_alive",
    "images",
    "options",
    "think",
    "truncate",
    "shift",
    "logprobs",
    "top_logprobs",
];

/// The options that only say where and how the model runs (threads, GPU layers, batch,
/// memory mapping) or that Ollama itself no longer reads (mirostat, tfs_z): accepted, with
/// no effect on the output. `repeat_last_n` too: Wick's `repeat_penalty` covers the whole
/// prompt and output.
const PLACEMENT_OPTIONS: &[&str] = &[
    "num_keep",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "use_mmap",
    "use_mlock",
    "num_thread",
    "numa",
    "low_vram",
    "f16_kv",
    "vocab_only",
    "logits_all",
    "embedding_only",
    "draft_num_predict",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
    "tfs_z",
    "penalize_newline",
    "repeat_last_n",
];

/// Ollama's defaults where a request's options leave a field out.
pub(crate) const DEFAULT_TEMPERATURE: f64 = 0.8;
pub(crate) const DEFAULT_TOP_K: i64 = 40;
pub(crate) const DEFAULT_TOP_P: f64 = 0.9;

/// What `think` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Think {
    /// Not given: a model that thinks reports its thinking.
    Default,
    On,
    /// The thinking is left out of the answer (the model may still think: Wick cannot
    /// switch a template's thinking off).
    Off,
}

impl Think {
    fn parse(v: Option<&Value>) -> Result<Self, ApiError> {
        match v {
            None | Some(Value::Null) => Ok(Think::Default),
            Some(Value::Bool(true)) => Ok(Think::On),
            Some(Value::Bool(false)) => Ok(Think::Off),
            Some(Value::String(s)) if ["high", "medium", "low", "max"].contains(&s.as_str()) => {
                Ok(Think::On)
            }
            Some(Value::String(s)) => Err(ApiError::invalid(
                "think",
                format!("invalid think value: {s:?} (must be \"high\", \"medium\", \"low\", \"max\", true, or false)"),
            )),
            Some(_) => Err(ApiError::invalid(
                "think",
                "think must be a boolean or string (\"high\", \"medium\", \"low\", \"max\", true, or false)",
            )),
        }
    }

    /// Whether the answer carries the model's thinking; a 400 if thinking was asked of a
    /// model that does not think (Ollama's words).
    pub(crate) fn shows(self, model: &ServedModel, name: &str) -> Result<bool, ApiError> {
        let thinks = thinks(model);
        match self {
            Think::On if !thinks => Err(ApiError::invalid(
                "think",
                format!("{name:?} does not support thinking"),
            )),
            Think::Off => Ok(false),
            _ => Ok(thinks),
        }
    }
}

/// Whether the model's template knows thinking (`<think>` ... `</think>`).
pub(crate) fn thinks(model: &ServedModel) -> bool {
    model
        .template
        .as_ref()
        .is_some_and(|t| t.source().contains("</think>"))
}

/// The fill-in-the-middle tokens of the model's tokenizer (Qwen2.5-Coder's and StarCoder's
/// spellings), if it has them: prefix, suffix, middle.
pub(crate) fn fim_tokens(model: &ServedModel) -> Option<[&'static str; 3]> {
    [
        ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"],
        ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"],
    ]
    .into_iter()
    .find(|names| {
        names
            .iter()
            .all(|t| model.tokenizer.token_to_id(t).is_some())
    })
}

/// `keep_alive` checked: seconds as a number, or a Go duration (`"5m"`, `"1h30m"`, `"-1"` is
/// refused for its missing unit, as Ollama does). Models named at start are pinned, so it
/// changes nothing yet; returns the seconds (negative: forever).
pub(crate) fn keep_alive(v: Option<&Value>) -> Result<Option<f64>, ApiError> {
    let bad = |why: String| ApiError::invalid("keep_alive", why);
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(Value::String(s)) => go_duration(s)
            .map(Some)
            .ok_or_else(|| bad(format!("time: invalid duration {s:?} (give a number of seconds, or a duration such as \"5m\" or \"1h30m\")"))),
        Some(other) => Err(bad(format!(
            "keep_alive must be a number of seconds or a duration string, not {other}"
        ))),
    }
}

/// Seconds in a Go duration string (`300ms`, `1.5h`, `1h30m`, `-1m`, `0`).
fn go_duration(s: &str) -> Option<f64> {
    let (sign, mut rest) = match s.strip_prefix('-') {
        Some(r) => (-1.0, r),
        None => (1.0, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Some(0.0);
    }
    let mut total = 0.0;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * unit;
        rest = &rest[u..];
    }
    Some(sign * total)
}

/// `format`: `"json"`, a JSON schema, or nothing.
fn format(v: Option<&Value>) -> Result<ResponseFormat, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(ResponseFormat::Text),
        Some(Value::String(s)) if s.is_empty() => Ok(ResponseFormat::Text),
        Some(Value::String(s)) if s == "json" => Ok(ResponseFormat::JsonObject),
        Some(s @ Value::Object(_)) => Ok(ResponseFormat::JsonSchema(s.clone())),
        Some(other) => Err(ApiError::invalid(
            "format",
            format!("invalid format: {other}; expected \"json\" or a valid JSON Schema object"),
        )),
    }
}

/// An option's value as a number, or a 400 naming it.
fn number(name: &str, v: &Value) -> Result<f64, ApiError> {
    v.as_f64().ok_or_else(|| {
        ApiError::invalid(
            format!("options.{name}"),
            format!("option {name:?} must be a number, not {v}"),
        )
    })
}

/// `options` checked into sampling fields (Ollama's defaults where absent; `null` values
/// skipped, as Ollama does) and the context (`num_ctx`) the request asks for.
fn options(
    map: Option<&Map<String, Value>>,
    stream: bool,
) -> Result<(SamplingFields, Option<usize>), ApiError> {
    let mut f = SamplingFields {
        temperature: Some(DEFAULT_TEMPERATURE),
        top_k: Some(DEFAULT_TOP_K),
        top_p: Some(DEFAULT_TOP_P),
        stream: Some(stream),
        ..SamplingFields::default()
    };
    let mut context = None;
    for (k, v) in map.into_iter().flatten() {
        if v.is_null() {
            continue;
        }
        match k.as_str() {
            "temperature" => f.temperature = Some(number(k, v)?),
            "top_p" => f.top_p = Some(number(k, v)?),
            "min_p" => f.min_p = Some(number(k, v)?),
            "top_k" => f.top_k = Some(number(k, v)? as i64),
            "presence_penalty" => f.presence_penalty = Some(number(k, v)?),
            "frequency_penalty" => f.frequency_penalty = Some(number(k, v)?),
            "repeat_penalty" => f.repetition_penalty = Some(number(k, v)?),
            // Ollama's -1: a random seed.
            "seed" => f.seed = Some(number(k, v)? as i64).filter(|s| *s >= 0),
            "num_predict" => match number(k, v)? as i64 {
                // -1: no limit; -2: fill the context. Both: what the context leaves.
                n if n < 0 => f.max_tokens = None,
                0 => {
                    return Err(ApiError::invalid(
                        "options.num_predict",
                        "option \"num_predict\" must be positive, or -1 for no limit",
                    ))
                }
                n => f.max_tokens = Some(n),
            },
            "num_ctx" => match number(k, v)? as i64 {
                n if n >= 1 => context = Some(n as usize),
                n => {
                    return Err(ApiError::invalid(
                        "options.num_ctx",
                        format!("option \"num_ctx\" must be positive, not {n}"),
                    ))
                }
            },
            "stop" => {
                let stops = v.as_array().and_then(|a| {
                    a.iter()
                        .map(|s| s.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                });
                let stops = stops.ok_or_else(|| {
                    ApiError::invalid(
                        "options.stop",
                        "option \"stop\" must be an array of strings",
                    )
                })?;
                f.stop = Some(Stop::Many(stops));
            }
            "typical_p" if number(k, v)? == 1.0 => {}
            "typical_p" => {
                return Err(ApiError::unsupported(
                    "options.typical_p",
                    "(locally typical sampling) other than 1.0",
                ))
            }
            k if PLACEMENT_OPTIONS.contains(&k) => {}
            k => {
                return Err(ApiError::InvalidRequest {
                    message: format!("Unrecognized option: {k}"),
                    param: Some(format!("options.{k}")),
                    code: Some("unknown_parameter"),
                })
            }
        }
    }
    Ok((f, context))
}

/// The shared sampling rules, with errors naming the option the client sent.
pub(crate) fn checked_sampling(
    map: Option<&Map<String, Value>>,
    stream: bool,
) -> Result<crate::validate::ValidSampling, ApiError> {
    let (fields, context) = options(map, stream)?;
    let max_tokens = fields.max_tokens.map(|n| ("options.num_predict", n));
    let mut s = sampling(&fields, &FieldNames::OLLAMA, max_tokens, None).map_err(|e| match e {
        ApiError::InvalidRequest {
            message,
            param: Some(p),
            code,
        } => {
            let ollama = match p.as_str() {
                "repetition_penalty" => "repeat_penalty",
                p => p.strip_prefix("options.").unwrap_or(p),
            };
            let name = format!("options.{ollama}");
            ApiError::InvalidRequest {
                message: message.replace(&format!("'{p}'"), &format!("'{name}'")),
                param: Some(name),
                code,
            }
        }
        e => e,
    })?;
    s.context = context;
    s.clamp_max_tokens = true;
    Ok(s)
}

/// `logprobs` and `top_logprobs` (0 to 20 alternatives) as the engine's setting.
fn logprobs(logprobs: Option<bool>, top: Option<i64>) -> Result<Option<usize>, ApiError> {
    match (logprobs.unwrap_or(false), top) {
        (_, Some(n)) if !(0..=20).contains(&n) => Err(ApiError::invalid(
            "top_logprobs",
            "top_logprobs must be between 0 and 20",
        )),
        (false, _) => Ok(None),
        (true, n) => Ok(Some(n.unwrap_or(0) as usize)),
    }
}

/// Sampling from `options`, with the log-probabilities asked for.
fn sampling_with(
    options: Option<&Map<String, Value>>,
    stream: bool,
    logprobs: Option<usize>,
) -> Result<crate::validate::ValidSampling, ApiError> {
    let mut s = checked_sampling(options, stream)?;
    s.params.logprobs = logprobs;
    Ok(s)
}

/// What a parsed chat or generate request is.
pub(crate) enum Parsed {
    /// Empty messages or prompt: Ollama's request to load the model (it is loaded already).
    Load {
        model: String,
    },
    Generate {
        req: Box<GenRequest>,
        think: Think,
    },
}

/// An Ollama chat message as a template message.
fn message(m: &Value, param: &str) -> Result<TemplateMessage, ApiError> {
    let Some(obj) = m.as_object() else {
        return Err(ApiError::invalid(param, "a message must be an object"));
    };
    const KEYS: &[&str] = &[
        "role",
        "content",
        "thinking",
        "images",
        "tool_calls",
        "tool_name",
        "tool_call_id",
    ];
    if let Some(k) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(ApiError::invalid(
            format!("{param}.{k}"),
            format!("Unrecognized message field: {k}"),
        ));
    }
    let str_of = |k: &str| -> Result<Option<String>, ApiError> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ApiError::invalid(
                format!("{param}.{k}"),
                format!("'{param}.{k}' must be a string"),
            )),
        }
    };
    let role = str_of("role")?.unwrap_or_default().to_lowercase();
    if !["system", "user", "assistant", "tool"].contains(&role.as_str()) {
        return Err(ApiError::invalid(
            format!("{param}.role"),
            format!("role must be system, user, assistant or tool, got {role:?}"),
        ));
    }
    if obj
        .get("images")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
    {
        return Err(ApiError::invalid(
            format!("{param}.images"),
            "this model has no vision input: images cannot be given",
        ));
    }
    let mut calls = Vec::new();
    for (j, c) in obj
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        // OpenAI's shape, the arguments an object; Ollama allows them left out (no
        // arguments). Ids are left to `with_call_ids` (Ollama's clients drop them).
        let mut c = c.clone();
        if let Some(f) = c.get_mut("function").and_then(Value::as_object_mut) {
            let args = f.entry("arguments").or_insert(Value::Null);
            if args.is_null() {
                *args = Value::Object(Map::new());
            }
        }
        calls.push(openai_tool_call(&c, &format!("{param}.tool_calls[{j}]"))?);
    }
    if !calls.is_empty() && role != "assistant" {
        return Err(ApiError::invalid(
            format!("{param}.tool_calls"),
            "only assistant messages have tool calls",
        ));
    }
    Ok(TemplateMessage {
        content: str_of("content")?.unwrap_or_default(),
        name: str_of("tool_name")?,
        tool_calls: calls,
        tool_call_id: str_of("tool_call_id")?,
        reasoning_content: str_of("thinking")?,
        ..TemplateMessage::text(&role, "")
    })
}

/// Ids for the calls that came without one (unique in the conversation, nine letters and
/// digits, as Mistral's template asks), and each tool result without a `tool_call_id` the
/// id of the next call not yet answered, in order (Ollama's clients send neither).
fn with_call_ids(messages: &mut [TemplateMessage]) {
    let mut unanswered = std::collections::VecDeque::new();
    for (i, m) in messages.iter_mut().enumerate() {
        for (j, c) in m.tool_calls.iter_mut().enumerate() {
            if c.id.is_empty() {
                c.id = format!("c{:05}{:03}", i % 100_000, j % 1000);
            }
            unanswered.push_back(c.id.clone());
        }
        if m.role == "tool" {
            match &m.tool_call_id {
                Some(id) => unanswered.retain(|u| u != id),
                None => m.tool_call_id = unanswered.pop_front(),
            }
        }
    }
}

/// A `POST /api/chat` body.
pub(crate) fn parse_chat(req: ChatRequest) -> Result<Parsed, ApiError> {
    keep_alive(req.keep_alive.as_ref())?;
    let lp = logprobs(req.logprobs, req.top_logprobs)?;
    let think = Think::parse(req.think.as_ref())?;
    let stream = req.stream.unwrap_or(true);
    let list = req.messages.unwrap_or_default();
    if list.is_empty() {
        return Ok(Parsed::Load { model: req.model });
    }
    let mut messages = list
        .iter()
        .enumerate()
        .map(|(i, m)| message(m, &format!("messages[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    with_call_ids(&mut messages);
    let tools = ToolSpec::new(
        tools::openai_tools(req.tools.as_ref(), true)?,
        None,
        true,
        "tools",
    )?;
    Ok(Parsed::Generate {
        req: Box::new(GenRequest {
            sampling: sampling_with(req.options.as_ref(), stream, lp)?,
            format: format(req.format.as_ref())?,
            input: GenInput::Chat(messages),
            model: req.model,
            tools,
            prompt_param: "messages",
        }),
        think,
    })
}

/// A `POST /api/generate` body, for `model` (whose template and tokenizer decide how the
/// prompt is written: through the chat template as a user turn, raw, or fill-in-the-middle
/// with `suffix`).
pub(crate) fn parse_generate(
    req: GenerateRequest,
    model: &ServedModel,
) -> Result<Parsed, ApiError> {
    keep_alive(req.keep_alive.as_ref())?;
    let lp = logprobs(req.logprobs, req.top_logprobs)?;
    let think = Think::parse(req.think.as_ref())?;
    let stream = req.stream.unwrap_or(true);
    if req.images.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(ApiError::invalid(
            "images",
            "this model has no vision input: images cannot be given",
        ));
    }
    if req.template.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::unsupported(
            "template",
            "(a Go template in the request; the model's own chat template is used)",
        ));
    }
    if req.context.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(ApiError::unsupported(
            "context",
            "(Ollama's deprecated token context; send the conversation to /api/chat)",
        ));
    }
    let raw = req.raw.unwrap_or(false);
    let system = req.system.filter(|s| !s.is_empty());
    if raw && system.is_some() {
        return Err(ApiError::invalid(
            "raw",
            "raw mode does not support template, system, or context",
        ));
    }
    let prompt = req.prompt.unwrap_or_default();
    let suffix = req.suffix.filter(|s| !s.is_empty());
    if prompt.is_empty() && suffix.is_none() {
        return Ok(Parsed::Load { model: req.model });
    }
    let input = match (suffix, &model.template) {
        (Some(suffix), _) => {
            let Some([pre, suf, mid]) = fim_tokens(model) else {
                return Err(ApiError::invalid(
                    "suffix",
                    format!("{} does not support insert", req.model),
                ));
            };
            GenInput::Prompts(vec![PromptInput::Text(format!(
                "{pre}{prompt}{suf}{suffix}{mid}"
            ))])
        }
        (None, _) if raw => GenInput::Prompts(vec![PromptInput::Text(prompt)]),
        (None, Some(_)) => {
            let mut m: Vec<TemplateMessage> = system
                .map(|s| TemplateMessage::text("system", s))
                .into_iter()
                .collect();
            m.push(TemplateMessage::text("user", prompt));
            GenInput::Chat(m)
        }
        (None, None) if system.is_some() => {
            return Err(ApiError::invalid(
                "system",
                "this model has no chat template to put a system prompt in: send the whole prompt with raw: true",
            ))
        }
        // A base model without a template: the prompt as it is (Ollama's `{{ .Prompt }}`).
        (None, None) => GenInput::Prompts(vec![PromptInput::Text(prompt)]),
    };
    Ok(Parsed::Generate {
        req: Box::new(GenRequest {
            sampling: sampling_with(req.options.as_ref(), stream, lp)?,
            format: format(req.format.as_ref())?,
            input,
            model: req.model,
            tools: ToolSpec::none(),
            prompt_param: "prompt",
        }),
        think,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::parse_object;

    fn chat(body: &str) -> Result<Parsed, ApiError> {
        parse_chat(parse_object(body.as_bytes(), &[CHAT_FIELDS], &["model"])?)
    }

    fn param_of(body: &str) -> Option<String> {
        match chat(body) {
            Err(ApiError::InvalidRequest { param, .. }) => param,
            Err(e) => panic!("expected a 400 for {body}, got {e:?}"),
            Ok(_) => panic!("expected a 400 for {body}"),
        }
    }

    fn gen(body: &str) -> GenRequest {
        match chat(body) {
            Ok(Parsed::Generate { req, .. }) => *req,
            Ok(Parsed::Load { .. }) => panic!("a load for {body}"),
            Err(e) => panic!("{body}: {e}"),
        }
    }

    #[test]
    fn options_map_onto_sampling_with_ollamas_defaults() {
        let m = r#""model":"m","messages":[{"role":"user","content":"hi"}]"#;
        let r = gen(&format!("{{{m}}}"));
        assert!(r.sampling.stream, "Ollama streams unless told not to");
        assert_eq!(r.sampling.params.temperature, 0.8);
        assert_eq!(r.sampling.params.top_k, 40);
        assert_eq!(r.sampling.params.top_p, 0.9);
        assert_eq!(r.sampling.max_tokens, None);
        let r = gen(&format!(
            r#"{{{m},"stream":false,"options":{{"temperature":0,"top_k":null,"num_predict":7,"stop":["\n"],"seed":42,
                "repeat_penalty":1.2,"num_ctx":512,"num_thread":2,"mirostat":0,"min_p":0.05}}}}"#
        ));
        assert!(!r.sampling.stream);
        assert_eq!(r.sampling.params.temperature, 0.0);
        assert_eq!(
            r.sampling.params.top_k, 40,
            "a null option keeps the default"
        );
        assert_eq!(r.sampling.max_tokens, Some(7));
        assert_eq!(r.sampling.stop, vec!["\n".to_string()]);
        assert_eq!(r.sampling.params.seed, Some(42));
        assert_eq!(r.sampling.params.repetition_penalty, 1.2);
        assert_eq!(r.sampling.params.min_p, 0.05);
        assert_eq!(r.sampling.context, Some(512));
        let r = gen(&format!(
            r#"{{{m},"options":{{"num_predict":-1,"seed":-1}}}}"#
        ));
        assert_eq!(
            (r.sampling.max_tokens, r.sampling.params.seed),
            (None, None)
        );
    }

    #[test]
    fn messages_tools_and_format_become_the_shared_request() {
        let r = gen(
            r#"{"model":"m","format":{"type":"object"},"tools":[{"type":"function","function":{"name":"w","parameters":{"type":"object","properties":{}}}}],
               "messages":[{"role":"system","content":"be brief"},{"role":"user","content":"weather?"},
               {"role":"assistant","tool_calls":[{"function":{"name":"w","arguments":{"city":"Paris"}}}]},
               {"role":"tool","content":"sunny","tool_name":"w"}],"keep_alive":"5m","think":false}"#,
        );
        let GenInput::Chat(m) = &r.input else {
            panic!()
        };
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool"]);
        assert_eq!(m[2].tool_calls[0].function.arguments["city"], "Paris");
        assert_eq!(m[3].name.as_deref(), Some("w"));
        // The call gets an id of Mistral's shape, and its result the same id.
        let id = &m[2].tool_calls[0].id;
        assert!(
            id.len() == 9 && id.chars().all(|c| c.is_ascii_alphanumeric()),
            "{id}"
        );
        assert_eq!(m[3].tool_call_id.as_ref(), Some(id));
        assert_eq!(r.tools.tools.len(), 1);
        assert_eq!(
            r.format,
            ResponseFormat::JsonSchema(serde_json::json!({"type": "object"}))
        );
        let r = gen(r#"{"model":"m","format":"json","messages":[{"role":"user","content":"x"}]}"#);
        assert_eq!(r.format, ResponseFormat::JsonObject);
        assert!(matches!(
            chat(r#"{"model":"m","messages":[]}"#),
            Ok(Parsed::Load { .. })
        ));
    }

    #[test]
    fn every_bad_or_unsupported_field_is_named() {
        let m = r#""model":"m","messages":[{"role":"user","content":"hi"}]"#;
        for (extra, param) in [
            (r#""options":{"temperature":5}"#, "options.temperature"),
            (r#""options":{"temperature":"hot"}"#, "options.temperature"),
            (
                r#""options":{"repeat_penalty":0}"#,
                "options.repeat_penalty",
            ),
            (r#""options":{"num_predict":0}"#, "options.num_predict"),
            (r#""options":{"num_ctx":-5}"#, "options.num_ctx"),
            (r#""options":{"stop":"x"}"#, "options.stop"),
            (r#""options":{"typical_p":0.5}"#, "options.typical_p"),
            (r#""options":{"warp":1}"#, "options.warp"),
            (r#""think":"hard""#, "think"),
            (r#""keep_alive":"300""#, "keep_alive"),
            (r#""keep_alive":[1]"#, "keep_alive"),
            (r#""format":"xml""#, "format"),
            (r#""top_logprobs":21,"logprobs":true"#, "top_logprobs"),
            (r#""tools":[{"type":"function"}]"#, "tools[0].function"),
            (r#""raw":true"#, "raw"),
        ] {
            assert_eq!(
                param_of(&format!("{{{m},{extra}}}")).as_deref(),
                Some(param),
                "{extra}"
            );
        }
        for (messages, param) in [
            (r#"[{"role":"robot","content":"x"}]"#, "messages[0].role"),
            (
                r#"[{"role":"user","content":"x","images":["aGk="]}]"#,
                "messages[0].images",
            ),
            (r#"[{"role":"user","content":5}]"#, "messages[0].content"),
            (
                r#"[{"role":"user","content":"x","mood":1}]"#,
                "messages[0].mood",
            ),
            (
                r#"[{"role":"user","tool_calls":[{"function":{"name":"f"}}]}]"#,
                "messages[0].tool_calls",
            ),
        ] {
            let body = format!(r#"{{"model":"m","messages":{messages}}}"#);
            assert_eq!(param_of(&body).as_deref(), Some(param), "{messages}");
        }
    }

    #[test]
    fn keep_alive_reads_seconds_and_go_durations() {
        let k = |v: Value| keep_alive(Some(&v)).ok().flatten();
        assert_eq!(k(serde_json::json!(0.0)), Some(0.0));
        assert_eq!(k(serde_json::json!("5m")), Some(300.0));
        assert_eq!(k(serde_json::json!("1h30m")), Some(5400.0));
        assert_eq!(k(serde_json::json!("300ms")), Some(0.3));
        assert_eq!(k(serde_json::json!("-1m")), Some(-60.0));
        assert_eq!(k(serde_json::json!("0")), Some(0.0));
        for bad in ["300", "-1", "", "5 m", "5x", "m"] {
            assert!(keep_alive(Some(&serde_json::json!(bad))).is_err(), "{bad}");
        }
    }
}
