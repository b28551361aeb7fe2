//! Splitting a model's output as it streams into reasoning (`<think>...</think>`), content
//! and tool calls. Markers never reach the content: text that may be the start of one is
//! held back until the next piece decides. A non-streamed answer is the same pieces joined,
//! so both agree by construction.

use super::{call_id, ToolSyntax, BARE_START};
use crate::detok::partial_suffix;

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";

/// One piece of parsed output.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Out {
    Content(String),
    Reasoning(String),
    /// A call begins (its arguments follow as `Args`).
    Call {
        index: usize,
        id: String,
        name: String,
    },
    Args {
        index: usize,
        args: String,
    },
}

/// Where the output starts relative to the model's thinking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Thinking {
    /// The model does not think in `<think>` tags.
    Never,
    /// It may open its answer with `<think>`.
    MayOpen,
    /// The prompt opened `<think>`: the output starts inside it.
    Inside,
}

impl Thinking {
    /// From the template (does it know `<think>`?) and the rendered prompt's end.
    pub(crate) fn detect(template: &str, prompt: &str) -> Self {
        if !template.contains(THINK_CLOSE) {
            Thinking::Never
        } else if prompt.trim_end().ends_with(THINK_OPEN) {
            Thinking::Inside
        } else {
            Thinking::MayOpen
        }
    }
}

enum Think {
    Off,
    Maybe(String),
    In(String),
}

pub(crate) struct OutputParser {
    think: Think,
    /// Just past `</think>`: the whitespace that separates the answer is dropped.
    after_think: bool,
    calls: Option<Calls>,
    out: Vec<Out>,
}

impl OutputParser {
    /// `tools`: the syntax to parse calls in (`None`: all text is content); `names`: the
    /// declared tools (a fenced JSON block naming one is a call too).
    pub(crate) fn new(
        thinking: Thinking,
        tools: Option<&'static dyn ToolSyntax>,
        names: Vec<String>,
    ) -> Self {
        Self {
            think: match thinking {
                Thinking::Never => Think::Off,
                Thinking::MayOpen => Think::Maybe(String::new()),
                Thinking::Inside => Think::In(String::new()),
            },
            after_think: false,
            calls: tools.map(|syntax| Calls::new(syntax, names)),
            out: Vec::new(),
        }
    }

    /// Adds generated text; returns what it completes.
    pub(crate) fn push(&mut self, text: &str) -> Vec<Out> {
        match &mut self.think {
            Think::Off => self.content(text),
            Think::Maybe(held) => {
                held.push_str(text);
                let t = held.trim_start();
                if let Some(rest) = t.strip_prefix(THINK_OPEN) {
                    let rest = rest.to_string();
                    self.think = Think::In(String::new());
                    return self.push(&rest);
                }
                if !(t.is_empty() || THINK_OPEN.starts_with(t)) {
                    let held = std::mem::take(held);
                    self.think = Think::Off;
                    self.content(&held);
                }
            }
            Think::In(held) => {
                held.push_str(text);
                if let Some(at) = held.find(THINK_CLOSE) {
                    let reasoning = held[..at].to_string();
                    let rest = held[at + THINK_CLOSE.len()..].to_string();
                    self.think = Think::Off;
                    self.after_think = true;
                    self.reasoning(reasoning);
                    self.content(&rest);
                } else {
                    let keep = partial_suffix(held, THINK_CLOSE);
                    let ready: String = held.drain(..held.len() - keep).collect();
                    self.reasoning(ready);
                }
            }
        }
        std::mem::take(&mut self.out)
    }

    /// The end of the output: whatever was held back.
    pub(crate) fn finish(&mut self) -> Vec<Out> {
        match std::mem::replace(&mut self.think, Think::Off) {
            Think::Off => {}
            Think::Maybe(held) => self.content(&held),
            Think::In(held) => self.reasoning(held),
        }
        if let Some(calls) = &mut self.calls {
            calls.finish(&mut self.out);
        }
        std::mem::take(&mut self.out)
    }

    /// How many tool calls the output held.
    pub(crate) fn calls(&self) -> usize {
        self.calls.as_ref().map_or(0, |c| c.count)
    }

    fn reasoning(&mut self, text: String) {
        if !text.is_empty() {
            self.out.push(Out::Reasoning(text));
        }
    }

    fn content(&mut self, text: &str) {
        let text = if self.after_think {
            let t = text.trim_start();
            self.after_think = t.is_empty();
            t
        } else {
            text
        };
        match &mut self.calls {
            Some(calls) => calls.push(text, &mut self.out),
            None => push_content(&mut self.out, text.to_string()),
        }
    }
}

fn push_content(out: &mut Vec<Out>, text: String) {
    if !text.is_empty() {
        out.push(Out::Content(text));
    }
}

/// JSON nesting, strings and escapes, one character at a time.
#[derive(Debug, Clone, Copy, Default)]
struct Scan {
    depth: i32,
    in_str: bool,
    esc: bool,
}

impl Scan {
    fn step(&mut self, c: char) {
        if self.in_str {
            if self.esc {
                self.esc = false;
            } else if c == '\\' {
                self.esc = true;
            } else if c == '"' {
                self.in_str = false;
            }
            return;
        }
        match c {
            '"' => self.in_str = true,
            '{' | '[' => self.depth += 1,
            '}' | ']' => self.depth -= 1,
            _ => {}
        }
    }

    fn outside(&self) -> bool {
        self.depth == 0 && !self.in_str
    }
}

enum State {
    /// Content; the marker has not appeared.
    Text(String),
    /// Between calls: waiting for a call's `{`.
    Seek,
    /// A call's opening, until its name and the start of its arguments are known.
    Head(String, Scan),
    /// Streaming a call's arguments; then the rest of the call object.
    Args {
        value: Scan,
        started: bool,
    },
    Tail(Scan),
    /// A call not in the expected key order: parsed whole once it closes.
    Whole(String, Scan),
    /// A Markdown code block that opened the answer with a JSON object (some models, Qwen2.5
    /// 1.5B among them, write their call so): held until it closes, then a call if the
    /// object names a declared tool with an arguments object, else content.
    Fence(String),
}

const FENCE: &str = "```";

/// Whether an answer starting with `t` opens a fenced JSON block (a fence, `json` or no
/// language, a line break, then `{`); `None`: too early to say.
fn opens_fence(t: &str) -> Option<bool> {
    for opening in ["```json\n", "```\n", "```json\r\n"] {
        if let Some(rest) = t.strip_prefix(opening) {
            let rest = rest.trim_start();
            return (!rest.is_empty()).then(|| rest.starts_with('{'));
        }
        if opening.starts_with(t) {
            return None;
        }
    }
    Some(false)
}

/// How a held fenced block stands.
enum FenceEnd {
    /// Still open: more text may close it.
    Open,
    /// The object `buf[object]` was followed by the closing fence, which ends at `after`.
    Closed {
        object: std::ops::Range<usize>,
        after: usize,
    },
    /// Not a single JSON object in a fence.
    Text,
}

/// `buf` opens with a fence and `{` (see [`opens_fence`]); `at_end`: no more text comes
/// (a fence the model left unclosed closes at the end).
fn fence_end(buf: &str, at_end: bool) -> FenceEnd {
    let Some(start) = buf.find('{') else {
        return FenceEnd::Text;
    };
    let mut scan = Scan::default();
    let mut end = None;
    for (i, c) in buf[start..].char_indices() {
        scan.step(c);
        if scan.outside() {
            end = Some(start + i + 1);
            break;
        }
    }
    let Some(end) = end else {
        return if at_end {
            FenceEnd::Text
        } else {
            FenceEnd::Open
        };
    };
    let rest = &buf[end..];
    let r = rest.trim_start();
    let fence_at = end + (rest.len() - r.len());
    if r.starts_with(FENCE) {
        FenceEnd::Closed {
            object: start..end,
            after: fence_at + FENCE.len(),
        }
    } else if FENCE.starts_with(r) {
        if at_end {
            FenceEnd::Closed {
                object: start..end,
                after: buf.len(),
            }
        } else {
            FenceEnd::Open
        }
    } else {
        FenceEnd::Text
    }
}

struct Calls {
    syntax: &'static dyn ToolSyntax,
    /// The declared tools' names.
    names: Vec<String>,
    /// Just past a fenced call: the whitespace before what follows is dropped.
    trim_next: bool,
    state: State,
    /// Whether content other than whitespace was emitted (a bare `{` no longer opens a call).
    wrote_text: bool,
    /// The text since the marker: content after all if no call parses.
    raw: String,
    count: usize,
}

enum Head {
    Need,
    No,
    Yes { name: String, value_at: usize },
}

/// Reads `{"name": "...", "arguments": ` (or `"parameters"`) at the start of `buf`, up to
/// the first character of the arguments.
fn head(buf: &str) -> Head {
    let b = buf.as_bytes();
    let mut i = 0;
    let ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    // Some(true): matched; Some(false): cannot match; None: need more text.
    let lit = |i: &mut usize, s: &str| -> Option<bool> {
        let rest = &buf[*i..];
        if rest.starts_with(s) {
            *i += s.len();
            Some(true)
        } else if s.starts_with(rest) {
            None
        } else {
            Some(false)
        }
    };
    macro_rules! expect {
        ($s:expr) => {
            match lit(&mut i, $s) {
                Some(true) => {}
                Some(false) => return Head::No,
                None => return Head::Need,
            }
        };
    }
    ws(&mut i);
    expect!("{");
    ws(&mut i);
    expect!("\"name\"");
    ws(&mut i);
    expect!(":");
    ws(&mut i);
    expect!("\"");
    let start = i - 1;
    let mut esc = false;
    let end = loop {
        match b.get(i) {
            None => return Head::Need,
            Some(b'\\') if !esc => esc = true,
            Some(b'"') if !esc => break i,
            _ => esc = false,
        }
        i += 1;
    };
    let Ok(name) = serde_json::from_str::<String>(&buf[start..=end]) else {
        return Head::No;
    };
    i = end + 1;
    ws(&mut i);
    expect!(",");
    ws(&mut i);
    match (lit(&mut i, "\"arguments\""), lit(&mut i, "\"parameters\"")) {
        (Some(true), _) | (_, Some(true)) => {}
        (None, _) | (_, None) => return Head::Need,
        _ => return Head::No,
    }
    ws(&mut i);
    expect!(":");
    ws(&mut i);
    if i >= b.len() {
        return Head::Need;
    }
    Head::Yes { name, value_at: i }
}

impl Calls {
    fn new(syntax: &'static dyn ToolSyntax, names: Vec<String>) -> Self {
        Self {
            syntax,
            names,
            trim_next: false,
            state: State::Text(String::new()),
            wrote_text: false,
            raw: String::new(),
            count: 0,
        }
    }

    fn push(&mut self, text: &str, out: &mut Vec<Out>) {
        if let State::Fence(buf) = &mut self.state {
            buf.push_str(text);
            self.settle_fence(false, out);
            return;
        }
        let State::Text(held) = &mut self.state else {
            self.feed(text, out);
            return;
        };
        let text = if self.trim_next {
            let t = text.trim_start();
            self.trim_next = t.is_empty();
            t
        } else {
            text
        };
        held.push_str(text);
        let start = self.syntax.start();
        if let Some(at) = held.find(start) {
            let before = held[..at].to_string();
            let rest = held[at + start.len()..].to_string();
            push_content(out, before);
            self.raw = start.to_string();
            self.state = State::Seek;
            self.feed(&rest, out);
            return;
        }
        if !self.wrote_text && !self.names.is_empty() {
            match opens_fence(held.trim_start()) {
                Some(true) => {
                    let buf = held.trim_start().to_string();
                    self.state = State::Fence(buf);
                    self.settle_fence(false, out);
                    return;
                }
                None => return,
                Some(false) => {}
            }
        }
        if self.syntax.bare_json() && !self.wrote_text {
            let t = held.trim_start();
            if t.starts_with(BARE_START) {
                let rest = t.to_string();
                self.state = State::Seek;
                self.feed(&rest, out);
                return;
            }
            if BARE_START.starts_with(t) {
                return;
            }
        }
        let keep = partial_suffix(held, start);
        let ready: String = held.drain(..held.len() - keep).collect();
        self.wrote_text |= !ready.trim().is_empty();
        push_content(out, ready);
    }

    fn feed(&mut self, text: &str, out: &mut Vec<Out>) {
        self.raw.push_str(text);
        let mut args = String::new();
        for c in text.chars() {
            self.state = match std::mem::replace(&mut self.state, State::Seek) {
                state @ (State::Text(_) | State::Fence(_)) => state,
                State::Seek if c == '{' => {
                    let mut scan = Scan::default();
                    scan.step(c);
                    State::Head(c.to_string(), scan)
                }
                State::Seek => State::Seek,
                State::Head(mut buf, mut scan) => {
                    buf.push(c);
                    scan.step(c);
                    match head(&buf) {
                        Head::Need if scan.outside() => self.whole(&buf, out),
                        Head::Need => State::Head(buf, scan),
                        Head::No => State::Whole(buf, scan),
                        Head::Yes { name, value_at } => {
                            out.push(Out::Call {
                                index: self.count,
                                id: call_id(),
                                name,
                            });
                            self.count += 1;
                            let mut state = State::Args {
                                value: Scan::default(),
                                started: false,
                            };
                            for c in buf[value_at..].chars() {
                                state = self.args(state, c, &mut args);
                            }
                            state
                        }
                    }
                }
                state @ (State::Args { .. } | State::Tail(_)) => self.args(state, c, &mut args),
                State::Whole(mut buf, mut scan) => {
                    buf.push(c);
                    scan.step(c);
                    if scan.outside() {
                        self.whole(&buf, out)
                    } else {
                        State::Whole(buf, scan)
                    }
                }
            };
            if !args.is_empty() && !matches!(self.state, State::Args { .. }) {
                self.flush_args(&mut args, out);
            }
        }
        self.flush_args(&mut args, out);
    }

    fn flush_args(&self, args: &mut String, out: &mut Vec<Out>) {
        if !args.is_empty() {
            out.push(Out::Args {
                index: self.count - 1,
                args: std::mem::take(args),
            });
        }
    }

    /// One character of a call's arguments (written to `args`) or of what follows them.
    fn args(&self, state: State, c: char, args: &mut String) -> State {
        match state {
            State::Args {
                mut value,
                mut started,
            } => {
                if started && value.outside() && (c == ',' || c == '}') {
                    // A bare value ended; the character belongs to the call object.
                    let mut outer = Scan {
                        depth: 1,
                        ..Scan::default()
                    };
                    outer.step(c);
                    return if outer.outside() {
                        State::Seek
                    } else {
                        State::Tail(outer)
                    };
                }
                value.step(c);
                started |= !c.is_whitespace();
                args.push(c);
                if started && value.outside() && (c == '}' || c == ']') {
                    State::Tail(Scan {
                        depth: 1,
                        ..Scan::default()
                    })
                } else {
                    State::Args { value, started }
                }
            }
            State::Tail(mut scan) => {
                scan.step(c);
                if scan.outside() {
                    State::Seek
                } else {
                    State::Tail(scan)
                }
            }
            other => other,
        }
    }

    /// A whole call object, parsed at once.
    fn whole(&mut self, buf: &str, out: &mut Vec<Out>) -> State {
        let Ok(serde_json::Value::Object(obj)) = serde_json::from_str(buf) else {
            return State::Seek;
        };
        let name = obj.get("name").and_then(|n| n.as_str());
        let args = obj.get("arguments").or_else(|| obj.get("parameters"));
        if let (Some(name), Some(args)) = (name, args) {
            self.call(name, args, out);
        }
        State::Seek
    }

    /// A whole call: its name and its arguments at once.
    fn call(&mut self, name: &str, args: &serde_json::Value, out: &mut Vec<Out>) {
        out.push(Out::Call {
            index: self.count,
            id: call_id(),
            name: name.to_string(),
        });
        out.push(Out::Args {
            index: self.count,
            args: crate::pyjson::dumps(args),
        });
        self.count += 1;
    }

    /// Decides a held fenced block once it can: a call (then what follows is fed on), or
    /// content.
    fn settle_fence(&mut self, at_end: bool, out: &mut Vec<Out>) {
        let State::Fence(buf) = &self.state else {
            return;
        };
        let (object, after) = match fence_end(buf, at_end) {
            FenceEnd::Open => return,
            FenceEnd::Closed { object, after } => (object, after),
            FenceEnd::Text => return self.fence_was_text(out),
        };
        let call = serde_json::from_str::<serde_json::Value>(&buf[object]).ok();
        let call = call.as_ref().and_then(|v| {
            let name = v.get("name")?.as_str()?;
            let args = v.get("arguments").or_else(|| v.get("parameters"))?;
            (args.is_object() && self.names.iter().any(|n| n == name)).then_some((name, args))
        });
        let Some((name, args)) = call else {
            return self.fence_was_text(out);
        };
        let (name, args) = (name.to_string(), args.clone());
        // What follows is text again: prose (content), or another fenced call.
        let rest = buf[after..].to_string();
        self.call(&name, &args, out);
        self.state = State::Text(String::new());
        self.trim_next = true;
        self.push(&rest, out);
    }

    /// The held block is content after all (and no call can open the answer now).
    fn fence_was_text(&mut self, out: &mut Vec<Out>) {
        if let State::Fence(buf) = std::mem::replace(&mut self.state, State::Text(String::new())) {
            self.wrote_text = true;
            self.push(&buf, out);
        }
    }

    fn finish(&mut self, out: &mut Vec<Out>) {
        if matches!(self.state, State::Fence(_)) {
            self.settle_fence(true, out);
        }
        match std::mem::replace(&mut self.state, State::Seek) {
            State::Text(held) => push_content(out, held),
            // The marker was not followed by a call: it was text after all.
            _ if self.count == 0 => push_content(out, std::mem::take(&mut self.raw)),
            _ => {}
        }
    }
}
