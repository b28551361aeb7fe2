//! The unknown-field lists that `parse_object` checks are written by hand beside each request
//! struct; these tests hold them to the structs, so a field added to one and not the other
//! fails here rather than being refused (or silently accepted) in production.

use std::collections::BTreeSet;

use serde::de::{self, Deserialize, Visitor};
use utoipa::openapi::schema::Schema;
use utoipa::openapi::RefOr;
use utoipa::PartialSchema;

use crate::embeddings::{EmbeddingRequest, FIELDS as EMBEDDING_FIELDS};
use crate::messages::{
    MessagesRequest, COUNT_FIELDS, FIELDS as MESSAGES_FIELDS, IGNORED as MESSAGES_IGNORED,
};
use crate::ollama::models::{ShowRequest, SHOW_FIELDS};
use crate::ollama::request::{ChatRequest, GenerateRequest};
use crate::ollama::{
    EmbedRequest, EmbeddingsRequest, CHAT_FIELDS as OLLAMA_CHAT_FIELDS, EMBEDDINGS_FIELDS,
    EMBED_FIELDS, GENERATE_FIELDS,
};
use crate::openai::{
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, SamplingFields, TokenizeRequest,
    CHAT_FIELDS, COMPLETION_FIELDS, DETOKENIZE_FIELDS, SAMPLING_FIELDS, TOKENIZE_FIELDS,
};
use crate::responses::{
    ResponsesRequest, FIELDS as RESPONSES_FIELDS, IGNORED as RESPONSES_IGNORED,
};

/// A deserializer that only records the field names serde's derive asks it for.
struct Capture(Option<&'static [&'static str]>);

impl<'de> de::Deserializer<'de> for &mut Capture {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a plain struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        self.0 = Some(fields);
        Err(de::Error::custom("captured"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// The fields serde reads for `T` (a struct without `#[serde(flatten)]`).
fn serde_fields<T: for<'de> Deserialize<'de>>() -> BTreeSet<&'static str> {
    let mut c = Capture(None);
    let _ = T::deserialize(&mut c);
    c.0.expect("a struct without flatten")
        .iter()
        .copied()
        .collect()
}

/// The properties of `T`'s OpenAPI object, its own only (a flattened struct's come as a
/// reference, which is checked on its own).
fn own_properties<T: PartialSchema>() -> BTreeSet<String> {
    fn walk(s: &RefOr<Schema>, out: &mut BTreeSet<String>) {
        match s {
            RefOr::T(Schema::Object(o)) => out.extend(o.properties.keys().cloned()),
            RefOr::T(Schema::AllOf(a)) => a.items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    walk(&T::schema(), &mut out);
    out
}

fn set(lists: &[&[&'static str]]) -> BTreeSet<&'static str> {
    lists.iter().flat_map(|l| l.iter().copied()).collect()
}

#[test]
fn every_field_list_is_its_structs_fields() {
    let table: [(&str, BTreeSet<&str>, BTreeSet<&str>); 12] = [
        (
            "ollama chat",
            serde_fields::<ChatRequest>(),
            set(&[OLLAMA_CHAT_FIELDS]),
        ),
        (
            "ollama generate",
            serde_fields::<GenerateRequest>(),
            set(&[GENERATE_FIELDS]),
        ),
        (
            "ollama embed",
            serde_fields::<EmbedRequest>(),
            set(&[EMBED_FIELDS]),
        ),
        (
            "ollama embeddings",
            serde_fields::<EmbeddingsRequest>(),
            set(&[EMBEDDINGS_FIELDS]),
        ),
        (
            "ollama show",
            serde_fields::<ShowRequest>(),
            set(&[SHOW_FIELDS]),
        ),
        (
            "sampling",
            serde_fields::<SamplingFields>(),
            set(&[SAMPLING_FIELDS]),
        ),
        (
            "responses",
            serde_fields::<ResponsesRequest>(),
            set(&[RESPONSES_FIELDS]),
        ),
        (
            "messages",
            serde_fields::<MessagesRequest>(),
            set(&[MESSAGES_FIELDS]),
        ),
        (
            "embeddings",
            serde_fields::<EmbeddingRequest>(),
            set(&[EMBEDDING_FIELDS]),
        ),
        (
            "tokenize",
            serde_fields::<TokenizeRequest>(),
            set(&[TOKENIZE_FIELDS]),
        ),
        (
            "detokenize",
            serde_fields::<DetokenizeRequest>(),
            set(&[DETOKENIZE_FIELDS]),
        ),
        // count_tokens reads the prompt's fields of the Messages struct.
        (
            "count_tokens",
            serde_fields::<MessagesRequest>()
                .intersection(&set(&[COUNT_FIELDS]))
                .copied()
                .collect(),
            set(&[COUNT_FIELDS]),
        ),
    ];
    for (endpoint, read, listed) in table {
        assert_eq!(
            read, listed,
            "{endpoint}: the struct's fields and the list differ"
        );
    }
    for (endpoint, own, listed) in [
        (
            "chat",
            own_properties::<ChatCompletionRequest>(),
            CHAT_FIELDS,
        ),
        (
            "completions",
            own_properties::<CompletionRequest>(),
            COMPLETION_FIELDS,
        ),
    ] {
        let listed: BTreeSet<String> = listed.iter().map(|s| s.to_string()).collect();
        let own: BTreeSet<String> = own
            .into_iter()
            .filter(|p| !SAMPLING_FIELDS.contains(&p.as_str()))
            .collect();
        assert_eq!(
            own, listed,
            "{endpoint}: the struct's fields and the list differ"
        );
    }
}

#[test]
fn an_ignored_field_is_never_also_read() {
    for (dialect, read, ignored) in [
        ("responses", set(&[RESPONSES_FIELDS]), RESPONSES_IGNORED),
        ("messages", set(&[MESSAGES_FIELDS]), MESSAGES_IGNORED),
    ] {
        for f in ignored {
            assert!(!read.contains(f), "{dialect}: {f} is both read and ignored");
        }
    }
}
