//! Property tests of request parsing: whatever the body (arbitrary bytes, arbitrary JSON,
//! objects of the APIs' own field names holding arbitrary values), each API's parser returns
//! a request or a 4xx error, never a panic or a 5xx; well-formed requests always parse.

use proptest::prelude::*;
use serde_json::{Map, Value};

use super::{parse_chat, parse_completion};
use crate::openai::{CHAT_FIELDS, COMPLETION_FIELDS, SAMPLING_FIELDS};
use crate::{messages, responses, ApiError};

/// Strings that mean something to some parser, and some that mean nothing.
fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "user",
            "assistant",
            "system",
            "developer",
            "tool",
            "text",
            "input_text",
            "function",
            "function_call",
            "function_call_output",
            "message",
            "tool_use",
            "tool_result",
            "auto",
            "required",
            "none",
            "any",
            "json_schema",
            "json_object",
            "object",
            "string",
            "m",
        ])
        .prop_map(str::to_string),
        "\\PC{0,12}",
    ]
}

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(vec![
            -1i64,
            0,
            1,
            2,
            5,
            20,
            21,
            100,
            1 << 31,
            u32::MAX as i64
        ])
        .prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        word().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Field names of every API (and of their messages and parts), or any name.
fn key() -> impl Strategy<Value = String> {
    let mut names: Vec<&str> = [
        CHAT_FIELDS,
        COMPLETION_FIELDS,
        SAMPLING_FIELDS,
        messages::FIELDS,
        responses::FIELDS,
    ]
    .concat();
    names.extend([
        "role",
        "content",
        "type",
        "text",
        "name",
        "arguments",
        "tool_calls",
        "tool_call_id",
        "id",
        "function",
        "parameters",
        "schema",
        "json_schema",
        "input",
        "tool_use_id",
        "call_id",
        "output",
        "include_usage",
    ]);
    prop_oneof![
        prop::sample::select(names).prop_map(str::to_string),
        "[a-z_]{1,10}",
    ]
}

/// An object with a `model`, the API's input field, and some of the fields any API knows.
fn body(input: &'static str) -> impl Strategy<Value = Vec<u8>> {
    (json(), prop::collection::vec((key(), json()), 0..6)).prop_map(move |(inp, fields)| {
        let mut m: Map<String, Value> = fields.into_iter().collect();
        m.insert("model".into(), Value::from("m"));
        m.insert(input.into(), inp);
        serde_json::to_vec(&Value::Object(m)).unwrap()
    })
}

fn client_error<T>(r: Result<T, ApiError>) -> Result<(), TestCaseError> {
    if let Err(e) = r {
        prop_assert!(
            e.status().is_client_error(),
            "{} for a client's body: {e}",
            e.status()
        );
    }
    Ok(())
}

/// Every parser on one body.
fn all(body: &[u8]) -> Result<(), TestCaseError> {
    client_error(parse_chat(body))?;
    client_error(parse_completion(body))?;
    client_error(responses::parse(body))?;
    client_error(messages::parse(body, false))?;
    client_error(messages::parse(body, true))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_are_a_request_or_a_4xx(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        all(&bytes)?;
    }

    #[test]
    fn arbitrary_json_is_a_request_or_a_4xx(v in json()) {
        all(&serde_json::to_vec(&v).unwrap())?;
    }

    #[test]
    fn objects_of_known_fields_are_a_request_or_a_4xx(
        chat in body("messages"),
        completion in body("prompt"),
        response in body("input"),
    ) {
        all(&chat)?;
        all(&completion)?;
        all(&response)?;
    }

    #[test]
    fn well_formed_chat_requests_parse(
        turns in prop::collection::vec(("user|assistant|system", "\\PC{0,40}"), 1..6),
        max_tokens in 1u32..100_000,
        temperature in 0.0f64..=2.0,
        top_p in 0.0f64..=1.0,
        seed in any::<u32>(),
        stream in any::<bool>(),
    ) {
        let messages: Vec<Value> = turns
            .iter()
            .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
            .collect();
        let body = serde_json::json!({
            "model": "m", "messages": messages, "max_tokens": max_tokens,
            "temperature": temperature, "top_p": top_p, "seed": seed, "stream": stream,
        });
        let parsed = parse_chat(&serde_json::to_vec(&body).unwrap());
        prop_assert!(parsed.is_ok(), "{body}: {parsed:?}");
        let parsed = parsed.unwrap();
        prop_assert_eq!(parsed.sampling.max_tokens, Some(max_tokens as usize));
    }
}
