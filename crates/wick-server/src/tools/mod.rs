//! Tool calling: the tools a request offers, how the model's template asks for calls (one
//! module per syntax behind [`ToolSyntax`]), the grammar that makes `required` and named
//! choices (and every call, once started) parse against the tools' schemas, and the parser
//! that turns the model's output back into calls, streamed.

mod hermes;
mod llama3;
mod mistral;
pub(crate) mod parse;

use serde_json::{json, Value};

use crate::ApiError;

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// JSON schema of the arguments (an object schema).
    pub parameters: Value,
}

impl Tool {
    /// OpenAI's function-tool object, which chat templates render.
    pub(crate) fn template_value(&self) -> Value {
        let mut f = json!({"name": self.name});
        if let Some(d) = &self.description {
            f["description"] = json!(d);
        }
        f["parameters"] = self.parameters.clone();
        json!({"type": "function", "function": f})
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// The tools of a request and how they may be used.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ToolSpec {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    /// Whether one answer may hold several calls.
    pub parallel: bool,
}

impl ToolSpec {
    /// No tools (and so no tool parsing).
    pub(crate) fn none() -> Self {
        Self {
            tools: Vec::new(),
            choice: ToolChoice::None,
            parallel: true,
        }
    }

    /// The tools as the chat template sees them (`None` when they are not in play).
    pub(crate) fn template_values(&self) -> Option<Vec<Value>> {
        self.active()
            .then(|| self.tools.iter().map(Tool::template_value).collect())
    }

    /// Whether the model is shown tools and its calls are parsed.
    pub(crate) fn active(&self) -> bool {
        !self.tools.is_empty() && self.choice != ToolChoice::None
    }

    /// Checks `choice` against `tools`; `param` names the request's field for errors.
    pub(crate) fn new(
        tools: Vec<Tool>,
        choice: Option<ToolChoice>,
        parallel: bool,
        choice_param: &str,
    ) -> Result<Self, ApiError> {
        let choice = choice.unwrap_or(if tools.is_empty() {
            ToolChoice::None
        } else {
            ToolChoice::Auto
        });
        match &choice {
            ToolChoice::Named(n) if !tools.iter().any(|t| &t.name == n) => {
                return Err(ApiError::invalid(
                    choice_param,
                    format!("the tool choice names '{n}', which is not among the tools"),
                ))
            }
            ToolChoice::Named(_) | ToolChoice::Required if tools.is_empty() => {
                return Err(ApiError::invalid(
                    choice_param,
                    "a tool choice other than none or auto needs tools",
                ))
            }
            _ => {}
        }
        Ok(Self {
            tools,
            choice,
            parallel,
        })
    }
}

/// Checks one tool's name and parameter schema.
pub(crate) fn tool(
    name: Option<&str>,
    description: Option<&str>,
    parameters: Option<&Value>,
    param: &str,
) -> Result<Tool, ApiError> {
    let name = name.ok_or_else(|| {
        ApiError::invalid(
            format!("{param}.name"),
            format!("Missing required parameter: '{param}.name'."),
        )
    })?;
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    if !ok {
        return Err(ApiError::invalid(
            format!("{param}.name"),
            format!("tool name {name:?} must be 1 to 64 letters, digits, '_', '-' or '.'"),
        ));
    }
    let parameters = match parameters {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(v @ Value::Object(_)) => v.clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                format!("{param}.parameters"),
                "the parameters must be a JSON schema object",
            ))
        }
    };
    Ok(Tool {
        name: name.to_string(),
        description: description.map(str::to_string),
        parameters,
    })
}

/// OpenAI's `tools` list: chat completions nest each function
/// (`{"type": "function", "function": {"name", ...}}`), Responses does not
/// (`{"type": "function", "name", ...}`).
pub(crate) fn openai_tools(v: Option<&Value>, nested: bool) -> Result<Vec<Tool>, ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let list = v
        .as_array()
        .ok_or_else(|| ApiError::invalid("tools", "'tools' must be an array"))?;
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            let p = format!("tools[{i}]");
            let kind = t.get("type").and_then(Value::as_str).unwrap_or("");
            if kind != "function" {
                return Err(ApiError::invalid(
                    format!("{p}.type"),
                    format!("tools of type '{kind}' are not supported (only 'function')"),
                ));
            }
            let (f, p) = if nested {
                let f = t.get("function").filter(|f| f.is_object()).ok_or_else(|| {
                    ApiError::invalid(format!("{p}.function"), "a function tool needs 'function'")
                })?;
                (f, format!("{p}.function"))
            } else {
                (t, p)
            };
            tool(
                f.get("name").and_then(Value::as_str),
                f.get("description").and_then(Value::as_str),
                f.get("parameters"),
                &p,
            )
        })
        .collect()
}

/// OpenAI's `tool_choice` (chat completions and Responses spell a named function
/// differently; both are read).
pub(crate) fn openai_choice(v: Option<&Value>) -> Result<Option<ToolChoice>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "tool_choice",
            "'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
        )
    };
    Ok(match v {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            _ => return Err(bad()),
        }),
        Some(o @ Value::Object(_)) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = o
                .pointer("/function/name")
                .or_else(|| o.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(bad)?;
            Some(ToolChoice::Named(name.to_string()))
        }
        Some(_) => return Err(bad()),
    })
}

/// How one family's template asks for tool calls: the marker that opens them and how calls
/// are framed after it. Each call is a JSON object `{"name": ..., <args_key>: {...}}`.
pub(crate) trait ToolSyntax: Send + Sync + std::fmt::Debug {
    /// Whether a chat template is written for this syntax.
    fn detect(&self, template: &str) -> bool;
    /// The name in logs and errors.
    fn name(&self) -> &'static str;
    /// The text that opens the model's tool calls.
    fn start(&self) -> &'static str;
    /// What the grammar writes after `start` and before the first call, between calls, and
    /// after the last.
    fn open(&self) -> &'static str;
    fn between(&self) -> &'static str;
    fn close(&self) -> &'static str;
    /// The key of a call's arguments.
    fn args_key(&self) -> &'static str {
        "arguments"
    }
    /// Whether a call may also come bare, as the first thing the model writes
    /// (`{"name": ...` without the marker): Llama 3's calls have no marker, and small
    /// Hermes-style models often leave it out.
    fn bare_json(&self) -> bool {
        false
    }
    /// What separates bare calls (`None`: one bare call at most).
    fn bare_between(&self) -> Option<&'static str> {
        None
    }
    /// Whether calls are bare unless the model chooses the marker (then `required` and
    /// named choices ask for bare calls).
    fn marker_optional(&self) -> bool {
        false
    }
}

/// What opens bare calls.
pub(crate) const BARE_START: &str = "{\"name\"";

/// Where a tool grammar starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    /// From the first token: the model must call (`required`, a named tool).
    Forced,
    /// Just after the start marker the model wrote.
    AfterMarker,
    /// At a bare call's `{`.
    Bare,
}

/// The syntax a chat template asks for, if it presents tools in one this server parses.
pub(crate) fn syntax_for(template: &str) -> Option<&'static dyn ToolSyntax> {
    if !template.contains("tools") {
        return None;
    }
    [
        &hermes::Hermes as &dyn ToolSyntax,
        &mistral::Mistral,
        &llama3::Llama3,
    ]
    .into_iter()
    .find(|s| s.detect(template))
}

/// A model's tool-call syntax, with the id of its start marker when that is one special
/// token (which the grammar must name by id and the detokenizer must write out).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ToolFormat {
    pub syntax: &'static dyn ToolSyntax,
    pub start_token: Option<u32>,
}

impl ToolFormat {
    /// The grammar (llguidance's Lark) of the calls `spec` allows, from `entry` on.
    pub(crate) fn grammar(&self, spec: &ToolSpec, entry: Entry) -> String {
        let s = self.syntax;
        let tools: Vec<&Tool> = match &spec.choice {
            ToolChoice::Named(n) => spec.tools.iter().filter(|t| &t.name == n).collect(),
            _ => spec.tools.iter().collect(),
        };
        let one: Vec<Value> = tools
            .iter()
            .map(|t| {
                json!({
                    "type": "object",
                    "properties": {"name": {"const": t.name}, s.args_key(): t.parameters},
                    "required": ["name", s.args_key()],
                    "additionalProperties": false,
                })
            })
            .collect();
        let schema = json!({
            "x-guidance": {"key_separator": ": ", "item_separator": ", ", "whitespace_flexible": false},
            "anyOf": one,
        });
        let lit = |t: &str| {
            if t.is_empty() {
                String::new()
            } else {
                serde_json::to_string(t).unwrap_or_default()
            }
        };
        let several = spec.parallel && !matches!(spec.choice, ToolChoice::Named(_));
        let bare = match s.bare_between() {
            Some(between) if several => format!("call ({} call)*", lit(between)),
            _ => "call".to_string(),
        };
        let after_marker = if several {
            format!(
                "{} call ({} call)* {}",
                lit(s.open()),
                lit(s.between()),
                lit(s.close())
            )
        } else {
            format!("{} call {}", lit(s.open()), lit(s.close()))
        };
        let marker = match self.start_token {
            Some(id) => format!("<[{id}]>"),
            None => lit(s.start()),
        };
        let start = match entry {
            Entry::AfterMarker => after_marker,
            Entry::Bare => bare,
            Entry::Forced if s.marker_optional() => bare,
            // The model may call in either form; a bare call is a single one.
            Entry::Forced if s.bare_json() => format!("{marker} {after_marker} | {bare}"),
            Entry::Forced => format!("{marker} {after_marker}"),
        };
        format!("start: {start}\ncall: %json {schema}\n")
    }
}

/// A fresh call id, OpenAI's style.
pub(crate) fn call_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!(
        "call_{:016x}{n:08x}",
        nanos.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    )
}

#[cfg(test)]
mod tests;
