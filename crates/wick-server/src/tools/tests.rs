use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::json;

use super::parse::{Out, OutputParser, Thinking};
use super::*;

/// Joined pieces of one parse: (content, reasoning, calls as (name, arguments)).
type Parsed = (String, String, Vec<(String, String)>);

fn run(thinking: Thinking, syntax: Option<&'static dyn ToolSyntax>, pieces: &[&str]) -> Parsed {
    let names = ["get_weather", "convert_currency", "a", "b", "x"];
    let mut p = OutputParser::new(thinking, syntax, names.map(String::from).to_vec());
    let mut outs = Vec::new();
    for piece in pieces {
        outs.extend(p.push(piece));
    }
    outs.extend(p.finish());
    let (mut content, mut reasoning, mut calls) = (String::new(), String::new(), Vec::new());
    for o in outs {
        match o {
            Out::Content(t) => content.push_str(&t),
            Out::Reasoning(t) => reasoning.push_str(&t),
            Out::Call { index, name, id } => {
                assert_eq!(index, calls.len());
                assert!(id.starts_with("call_"));
                calls.push((name, String::new()));
            }
            Out::Args { index, args } => calls[index].1.push_str(&args),
        }
    }
    assert_eq!(p.calls(), calls.len());
    (content, reasoning, calls)
}

/// The same parse for the whole text at once, one character at a time, and in chunks of
/// 2 to 7 characters.
fn parse_all_ways(
    thinking: Thinking,
    syntax: Option<&'static dyn ToolSyntax>,
    text: &str,
) -> Parsed {
    let whole = run(thinking, syntax, &[text]);
    let chars: Vec<String> = text.chars().map(String::from).collect();
    let by_char: Vec<&str> = chars.iter().map(String::as_str).collect();
    assert_eq!(run(thinking, syntax, &by_char), whole, "one char at a time");
    for n in 2..8 {
        let chunks: Vec<String> = chars.chunks(n).map(|c| c.concat()).collect();
        let chunks: Vec<&str> = chunks.iter().map(String::as_str).collect();
        assert_eq!(run(thinking, syntax, &chunks), whole, "chunks of {n}");
    }
    whole
}

fn calls(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, a)| (n.to_string(), a.to_string()))
        .collect()
}

#[test]
fn hermes_calls_are_split_from_the_text_before_them() {
    let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris \\\"}\\\"\", \"days\": [1, 2]}}\n</tool_call>";
    let (content, reasoning, got) = parse_all_ways(Thinking::Never, Some(&hermes::Hermes), text);
    assert_eq!(content, "Let me check.\n");
    assert_eq!(reasoning, "");
    assert_eq!(
        got,
        calls(&[("get_weather", r#"{"city": "Paris \"}\"", "days": [1, 2]}"#)])
    );
}

#[test]
fn hermes_parallel_calls_and_keys_in_another_order() {
    let text = "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"arguments\": {\"x\": 1}, \"name\": \"b\"}\n</tool_call>";
    let (content, _, got) = parse_all_ways(Thinking::Never, Some(&hermes::Hermes), text);
    assert_eq!(content, "");
    assert_eq!(got, calls(&[("a", "{}"), ("b", r#"{"x": 1}"#)]));
}

#[test]
fn a_bare_hermes_call_is_a_call_only_as_the_whole_answer() {
    let text = " {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}";
    let (content, _, got) = parse_all_ways(Thinking::Never, Some(&hermes::Hermes), text);
    assert_eq!(content, "");
    assert_eq!(got, calls(&[("get_weather", r#"{"city": "Paris"}"#)]));
    for text in [
        "{\"names\": 1}",
        "Here: {\"name\": \"x\", \"arguments\": {}}",
        "{}",
    ] {
        let (content, _, got) = parse_all_ways(Thinking::Never, Some(&hermes::Hermes), text);
        assert_eq!((content.as_str(), got.len()), (text, 0));
    }
}

#[test]
fn a_fenced_json_call_of_a_declared_tool_is_a_call() {
    // Qwen2.5-Coder-1.5B's answer to "Convert 100 US dollars to euros.".
    let text = "```json\n{\n  \"name\": \"convert_currency\",\n  \"arguments\": {\n    \"amount\": 100,\n    \"from_currency\": \"USD\",\n    \"to_currency\": \"EUR\"\n  }\n}\n```";
    for syntax in [
        &hermes::Hermes as &'static dyn ToolSyntax,
        &llama3::Llama3,
        &mistral::Mistral,
    ] {
        let (content, _, got) = parse_all_ways(Thinking::Never, Some(syntax), text);
        assert_eq!(content, "", "{}", syntax.name());
        assert_eq!(
            got,
            calls(&[(
                "convert_currency",
                r#"{"amount": 100, "from_currency": "USD", "to_currency": "EUR"}"#
            )])
        );
    }
    // Without the language tag, left unclosed at the end, or with whitespace around it.
    for text in [
        "```\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n```",
        "\n```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n",
        "```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n``",
    ] {
        let (content, _, got) = parse_all_ways(Thinking::Never, Some(&hermes::Hermes), text);
        assert_eq!(content, "", "{text:?}");
        assert_eq!(
            got,
            calls(&[("get_weather", r#"{"city": "Paris"}"#)]),
            "{text:?}"
        );
    }
}

#[test]
fn text_and_calls_after_a_fenced_call() {
    let call = |city: &str| {
        format!(
            "```json\n{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"{city}\"}}}}\n```"
        )
    };
    let text = format!("{}\n\nI'll check that.", call("Paris"));
    let (content, _, got) = parse_all_ways(Thinking::Never, Some(&hermes::Hermes), &text);
    assert_eq!(content, "I'll check that.");
    assert_eq!(got, calls(&[("get_weather", r#"{"city": "Paris"}"#)]));
    let text = format!("{}\n{}", call("Paris"), call("Rome"));
    let (content, _, got) = parse_all_ways(Thinking::Never, Some(&hermes::Hermes), &text);
    assert_eq!(content, "");
    assert_eq!(
        got,
        calls(&[
            ("get_weather", r#"{"city": "Paris"}"#),
            ("get_weather", r#"{"city": "Rome"}"#)
        ])
    );
}

#[test]
fn a_fenced_block_that_is_not_a_call_stays_content() {
    for text in [
        // An undeclared tool, arguments that are not an object, code, two objects, text
        // after the object, text before the block.
        "```json\n{\"name\": \"delete_everything\", \"arguments\": {}}\n```",
        "```json\n{\"name\": \"get_weather\", \"arguments\": \"Paris\"}\n```",
        "```python\nprint({\"name\": \"get_weather\"})\n```",
        "```json\n{\"a\": 1}\n{\"b\": 2}\n```",
        "```json\n{\"name\": \"get_weather\", \"arguments\": {}} and more\n```\n",
        "Like this:\n```json\n{\"name\": \"get_weather\", \"arguments\": {}}\n```",
        "```json\n{\"city\": \"Paris\", \"country\": \"France\"}\n```",
        "``` not a fence",
    ] {
        let (content, _, got) = parse_all_ways(Thinking::Never, Some(&hermes::Hermes), text);
        assert_eq!((content.as_str(), got.len()), (text, 0), "{text:?}");
    }
}

#[test]
fn text_without_a_call_is_all_content_even_with_a_marker_like_start() {
    let text = "Use <tool or <tool_call> nothing";
    let (content, _, got) = parse_all_ways(Thinking::Never, Some(&hermes::Hermes), text);
    assert_eq!(content, text);
    assert!(got.is_empty());
}

#[test]
fn mistral_lists_and_llama_bare_json() {
    let text = "[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"q\": \"x]\"}}, {\"name\": \"b\", \"arguments\": {}}]";
    let (content, _, got) = parse_all_ways(Thinking::Never, Some(&mistral::Mistral), text);
    assert_eq!(content, "");
    assert_eq!(got, calls(&[("a", r#"{"q": "x]"}"#), ("b", "{}")]));

    let text =
        "  {\"name\": \"a\", \"parameters\": {\"n\": 3}}; {\"name\": \"b\", \"parameters\": {}}";
    let (content, _, got) = parse_all_ways(Thinking::Never, Some(&llama3::Llama3), text);
    assert_eq!(content, "");
    assert_eq!(got, calls(&[("a", r#"{"n": 3}"#), ("b", "{}")]));
    let text = "<|python_tag|>{\"name\": \"a\", \"parameters\": {\"n\": 3}}";
    let (_, _, got) = parse_all_ways(Thinking::Never, Some(&llama3::Llama3), text);
    assert_eq!(got, calls(&[("a", r#"{"n": 3}"#)]));
    // A `{` after text is text.
    let text = "Sure: {\"name\": \"a\"}";
    let (content, _, got) = parse_all_ways(Thinking::Never, Some(&llama3::Llama3), text);
    assert_eq!((content.as_str(), got.len()), (text, 0));
}

#[test]
fn thinking_goes_to_reasoning_never_to_content() {
    let text = "<think>\nIs it 4?\n</think>\n\nIt is 4.";
    let (content, reasoning, _) = parse_all_ways(Thinking::MayOpen, None, text);
    assert_eq!(
        (content.as_str(), reasoning.as_str()),
        ("It is 4.", "\nIs it 4?\n")
    );
    let (content, reasoning, _) =
        parse_all_ways(Thinking::Inside, None, "Is it 4?</think>It is 4.");
    assert_eq!(
        (content.as_str(), reasoning.as_str()),
        ("It is 4.", "Is it 4?")
    );
    // Cut off while thinking: all of it is reasoning.
    let (content, reasoning, _) = parse_all_ways(Thinking::Inside, None, "Is it </thi");
    assert_eq!((content.as_str(), reasoning.as_str()), ("", "Is it </thi"));
    // A model that may think but does not.
    let (content, reasoning, _) = parse_all_ways(Thinking::MayOpen, None, "<thought> no");
    assert_eq!((content.as_str(), reasoning.as_str()), ("<thought> no", ""));
    let (content, reasoning, _) = parse_all_ways(Thinking::Never, None, "<think>x</think>y");
    assert_eq!(
        (content.as_str(), reasoning.as_str()),
        ("<think>x</think>y", "")
    );
    // Thinking, then a call.
    let text =
        "<think>weather?</think><tool_call>\n{\"name\": \"w\", \"arguments\": {}}\n</tool_call>";
    let (content, reasoning, got) = parse_all_ways(Thinking::MayOpen, Some(&hermes::Hermes), text);
    assert_eq!((content.as_str(), reasoning.as_str()), ("", "weather?"));
    assert_eq!(got, calls(&[("w", "{}")]));
    assert_eq!(
        Thinking::detect("{{ '<think>' }}..</think>", "a<think>\n"),
        Thinking::Inside
    );
    assert_eq!(Thinking::detect("..</think>", "a"), Thinking::MayOpen);
    assert_eq!(Thinking::detect("plain", "a<think>"), Thinking::Never);
}

#[test]
fn each_family_template_gets_its_syntax() {
    let qwen = include_str!("../../../../tests/data/templates/qwen2.5.jinja");
    assert_eq!(syntax_for(qwen).map(|s| s.name()), Some("hermes"));
    let mistral = "{% if tools %}[AVAILABLE_TOOLS]{{ tools|tojson }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]";
    assert_eq!(syntax_for(mistral).map(|s| s.name()), Some("mistral"));
    let llama = "{% if tools %}{\"name\": function name, \"parameters\": ...}<|eot_id|>{% endif %}";
    assert_eq!(syntax_for(llama).map(|s| s.name()), Some("llama3_json"));
    assert!(syntax_for("{% for m in messages %}{{ m.content }}{% endfor %}").is_none());
    assert!(syntax_for("{% if tools %}<function>{% endif %}").is_none());
}

/// A matcher over a vocabulary of single bytes: checks what a grammar accepts, byte by byte.
fn accepts(grammar: &str, text: &str) -> bool {
    let mut words: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    words.push(vec![TokTrie::SPECIAL_TOKEN_MARKER, b'x']);
    let trie = TokTrie::from(&TokRxInfo::new(words.len() as u32, 256), &words);
    let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
    let mut factory = ParserFactory::new_simple(&env).unwrap();
    factory.quiet();
    let parser = factory
        .create_parser(TopLevelGrammar::from_lark(grammar.to_string()))
        .unwrap_or_else(|e| panic!("{e}\n{grammar}"));
    let mut m = Matcher::new(Ok(parser));
    for b in text.bytes() {
        if m.consume_token(b as u32).is_err() {
            return false;
        }
    }
    m.is_accepting().unwrap_or(false)
}

fn weather_tools(choice: ToolChoice, parallel: bool) -> ToolSpec {
    let params =
        json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]});
    ToolSpec::new(
        vec![
            tool(Some("get_weather"), None, Some(&params), "tools[0]").unwrap(),
            tool(Some("get_time"), Some("now"), None, "tools[1]").unwrap(),
        ],
        Some(choice),
        parallel,
        "tool_choice",
    )
    .unwrap()
}

#[test]
fn the_grammar_allows_only_calls_that_validate() {
    let hermes = ToolFormat {
        syntax: &hermes::Hermes,
        start_token: None,
    };
    let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    let g = hermes.grammar(&weather_tools(ToolChoice::Required, true), Entry::Forced);
    assert!(accepts(&g, call));
    assert!(accepts(&g, &format!("{call}\n{call}")));
    assert!(!accepts(&g, &call.replace("\"Paris\"", "5")), "wrong type");
    assert!(
        !accepts(&g, &call.replace("\"city\": \"Paris\"", "")),
        "missing argument"
    );
    assert!(
        !accepts(&g, &call.replace("get_weather", "get_wetter")),
        "unknown tool"
    );
    assert!(!accepts(&g, &format!("Hi {call}")), "text first");
    // Or one bare call, the form small models prefer.
    let json = "{\"name\": \"get_time\", \"arguments\": {}}";
    assert!(accepts(&g, json));
    assert!(!accepts(&g, &format!("{json}\n{json}")));
    let single = hermes.grammar(&weather_tools(ToolChoice::Required, false), Entry::Forced);
    assert!(!accepts(&single, &format!("{call}\n{call}")));
    let named = hermes.grammar(
        &weather_tools(ToolChoice::Named("get_time".into()), true),
        Entry::Forced,
    );
    assert!(accepts(
        &named,
        "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>"
    ));
    assert!(!accepts(&named, call));
    // After the marker (the model began the call itself).
    let rest = hermes.grammar(&weather_tools(ToolChoice::Auto, true), Entry::AfterMarker);
    assert!(accepts(&rest, call.strip_prefix("<tool_call>").unwrap()));
    // A bare call: one, its JSON alone.
    let bare = hermes.grammar(&weather_tools(ToolChoice::Auto, true), Entry::Bare);
    let json = "{\"name\": \"get_time\", \"arguments\": {}}";
    assert!(accepts(&bare, json));
    assert!(!accepts(&bare, &format!("{json}\n{json}")));
    // A special-token marker is named by id.
    let mistral = ToolFormat {
        syntax: &mistral::Mistral,
        start_token: Some(256),
    };
    let g = mistral.grammar(&weather_tools(ToolChoice::Required, true), Entry::Forced);
    assert!(g.starts_with("start: <[256]> \"[\""), "{g}");
    assert!(!g.contains('|'), "no bare calls in Mistral's syntax: {g}");
    let llama = ToolFormat {
        syntax: &llama3::Llama3,
        start_token: Some(256),
    };
    let g = llama.grammar(&weather_tools(ToolChoice::Required, true), Entry::Forced);
    let json = "{\"name\": \"get_time\", \"parameters\": {}}";
    assert!(accepts(&g, json));
    assert!(accepts(&g, &format!("{json}; {json}")));
}

#[test]
fn tool_choices_are_checked_against_the_tools() {
    let t = tool(Some("f"), None, None, "tools[0]").unwrap();
    let err = |r: Result<ToolSpec, ApiError>| match r {
        Err(ApiError::InvalidRequest { param, .. }) => param,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        err(ToolSpec::new(
            vec![t.clone()],
            Some(ToolChoice::Named("g".into())),
            true,
            "tool_choice"
        ))
        .as_deref(),
        Some("tool_choice")
    );
    assert_eq!(
        err(ToolSpec::new(
            vec![],
            Some(ToolChoice::Required),
            true,
            "tool_choice"
        ))
        .as_deref(),
        Some("tool_choice")
    );
    assert!(ToolSpec::new(vec![t], None, true, "tool_choice")
        .unwrap()
        .active());
    assert!(!ToolSpec::new(vec![], None, true, "tool_choice")
        .unwrap()
        .active());
    for bad in ["", "has space", &"x".repeat(65)] {
        assert!(tool(Some(bad), None, None, "tools[0]").is_err());
    }
    assert!(tool(Some("f"), None, Some(&json!([1])), "tools[0]").is_err());
    assert!(openai_choice(Some(&json!("sometimes"))).is_err());
    assert_eq!(
        openai_choice(Some(
            &json!({"type": "function", "function": {"name": "f"}})
        ))
        .unwrap(),
        Some(ToolChoice::Named("f".into()))
    );
    assert_eq!(
        openai_choice(Some(&json!({"type": "function", "name": "f"}))).unwrap(),
        Some(ToolChoice::Named("f".into()))
    );
}
