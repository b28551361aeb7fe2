use super::*;

fn param_of(body: &str) -> Option<String> {
    match parse_chat(body.as_bytes()) {
        Err(ApiError::InvalidRequest { param, .. }) => param,
        other => panic!("expected a 400 for {body}, got {other:?}"),
    }
}

#[test]
fn a_full_chat_request_parses() {
    let v = parse_chat(
        br#"{"model":"m","messages":[{"role":"developer","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},{"role":"user","content":"hi"}],
             "max_completion_tokens":5,"temperature":0,"top_p":0.5,"seed":3,"stop":"x",
             "stream":true,"stream_options":{"include_usage":true},"n":2,"user":"u",
             "top_k":4,"min_p":0.1,"presence_penalty":0.5,"frequency_penalty":-0.5,
             "repetition_penalty":1.1,"logit_bias":{"42":-100},"logprobs":true,"top_logprobs":3,
             "ignore_eos":true}"#,
    )
    .unwrap();
    let GenInput::Chat(messages) = &v.input else {
        panic!("{v:?}")
    };
    assert_eq!(messages[0].role, "system");
    assert_eq!(messages[0].content, "ab");
    let s = &v.sampling;
    assert_eq!(s.max_tokens, Some(5));
    assert_eq!(s.params.temperature, 0.0);
    assert_eq!(s.params.seed, Some(3));
    assert_eq!(s.params.top_k, 4);
    assert_eq!(s.params.logit_bias, vec![(42, -100.0)]);
    assert_eq!(s.params.logprobs, Some(3));
    assert_eq!(s.stop, vec!["x".to_string()]);
    assert!(s.stream && s.include_usage && s.ignore_eos);
    assert_eq!(s.n, 2);
}

#[test]
fn every_bad_chat_field_is_named() {
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
    for (field, value) in [
        ("temperature", "\"hot\""),
        ("temperature", "2.5"),
        ("top_p", "0"),
        ("max_tokens", "0"),
        ("max_tokens", "1.5"),
        ("max_completion_tokens", "-3"),
        ("stop", r#"["a","b","c","d","e"]"#),
        ("n", "0"),
        ("n", "99"),
        ("top_k", "-5"),
        ("min_p", "2"),
        ("presence_penalty", "3"),
        ("frequency_penalty", "\"x\""),
        ("repetition_penalty", "0"),
        ("logit_bias", r#"{"abc": 1}"#),
        ("logit_bias", r#"{"5": 1000}"#),
        ("top_logprobs", "3"),
        ("tools", "{}"),
        ("tool_choice", "\"sometimes\""),
        ("tool_choice", "\"required\""),
        ("parallel_tool_calls", "1"),
        ("response_format", r#"{"type":"xml"}"#),
        (
            "response_format",
            r#"{"type":"json_schema","json_schema":{"name":"x"}}"#,
        ),
        ("stream", "\"yes\""),
        ("seed", "\"s\""),
        ("frobnicate", "1"),
        ("stream_options", r#"{"include_usage":true}"#),
    ] {
        assert_eq!(
            param_of(&format!("{{{m},\"{field}\":{value}}}")).as_deref(),
            Some(field),
            "{field}: {value}"
        );
    }
}

#[test]
fn completions_prompts_and_refusals() {
    let v = parse_completion(br#"{"model":"m","prompt":["a","b"],"n":2,"logprobs":2}"#).unwrap();
    assert!(matches!(&v.input, GenInput::Prompts(p) if p.len() == 2));
    assert_eq!(v.sampling.max_tokens, Some(16));
    assert_eq!(v.sampling.params.logprobs, Some(2));
    let v = parse_completion(br#"{"model":"m","prompt":[[1,2],[3]],"max_tokens":4}"#).unwrap();
    assert_eq!(
        v.input,
        GenInput::Prompts(vec![
            PromptInput::Ids(vec![1, 2]),
            PromptInput::Ids(vec![3])
        ])
    );
    for (body, param) in [
        (r#"{"model":"m","prompt":"a","echo":true}"#, "echo"),
        (r#"{"model":"m","prompt":"a","suffix":"z"}"#, "suffix"),
        (r#"{"model":"m","prompt":"a","best_of":3}"#, "best_of"),
        (r#"{"model":"m","prompt":"a","logprobs":50}"#, "logprobs"),
        (r#"{"model":"m","prompt":[]}"#, "prompt"),
        (r#"{"model":"m"}"#, "prompt"),
    ] {
        match parse_completion(body.as_bytes()) {
            Err(ApiError::InvalidRequest { param: got, .. }) => {
                assert_eq!(got.as_deref(), Some(param), "{body}")
            }
            other => panic!("{body}: {other:?}"),
        }
    }
}

#[test]
fn tools_and_tool_messages_parse() {
    let body = r#"{"model":"m","messages":[{"role":"user","content":"w?"},
        {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"get_weather","arguments":"{\"city\": \"Paris\"}"}}]},
        {"role":"tool","tool_call_id":"c1","content":"sunny"}],
        "tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}],
        "tool_choice":{"type":"function","function":{"name":"get_weather"}},"parallel_tool_calls":false}"#;
    let v = parse_chat(body.as_bytes()).unwrap();
    assert_eq!(
        v.tools.choice,
        crate::tools::ToolChoice::Named("get_weather".into())
    );
    assert!(!v.tools.parallel);
    let GenInput::Chat(messages) = &v.input else {
        panic!("{v:?}")
    };
    let call = &messages[1].tool_calls[0];
    assert_eq!(
        (call.id.as_str(), call.function.name.as_str()),
        ("c1", "get_weather")
    );
    assert_eq!(
        call.function.arguments,
        serde_json::json!({"city": "Paris"})
    );
    assert_eq!(messages[2].tool_call_id.as_deref(), Some("c1"));

    let m = r#""model":"m","messages":[{"role":"user","content":"hi"}]"#;
    for (extra, param) in [
        (r#""tools":[{"type":"retrieval"}]"#, "tools[0].type"),
        (
            r#""tools":[{"type":"function","function":{"name":"a b"}}]"#,
            "tools[0].function.name",
        ),
        (
            r#""tools":[{"type":"function","function":{"name":"f","parameters":3}}]"#,
            "tools[0].function.parameters",
        ),
        (
            r#""tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":{"type":"function","function":{"name":"g"}}"#,
            "tool_choice",
        ),
    ] {
        assert_eq!(
            param_of(&format!("{{{m},{extra}}}")).as_deref(),
            Some(param),
            "{extra}"
        );
    }
    let bad_args = body.replace(r#"{\"city\": \"Paris\"}"#, "{oops");
    assert_eq!(
        param_of(&bad_args).as_deref(),
        Some("messages[1].tool_calls[0].function.arguments")
    );
}
