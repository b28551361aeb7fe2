//! Tokenizer and chat template of the default model against llama.cpp's: every tokenizer case
//! gives its ids, every chat case renders and tokenizes to exactly its `prompt_ids`.

mod common;

use wick_runner::{Device, LoadOptions};
use wick_server::{ChatTemplate, TemplateMessage};

fn assets() -> wick_runner::ModelAssets {
    wick_runner::load(&common::model_path(), &Device::Cpu, &LoadOptions::default())
        .expect("load model")
        .assets
}

#[test]
fn tokenizer_matches_llama_cpp() {
    let reference = common::reference();
    assert!(
        reference["tokenizer"]
            .as_array()
            .expect("tokenizer cases")
            .len()
            >= 10
    );
    tokenizer_cases_match(&assets(), &reference);
}

/// Renders every chat case of `reference` (with its tools, when it has some) with the model's
/// template and tokenizes it (BOS as the model asks): exactly llama.cpp's prompt text and
/// ids. Returns how many cases it checked.
fn chat_cases_match(assets: &wick_runner::ModelAssets, reference: &serde_json::Value) -> usize {
    let template = ChatTemplate::new(
        assets.chat_template.as_deref().expect("a chat template"),
        assets.bos_token.clone(),
        assets.eos_token.clone(),
    )
    .unwrap();
    let mut n = 0;
    for case in reference["cases"].as_array().unwrap() {
        if case["kind"] != "chat" {
            continue;
        }
        let messages: Vec<TemplateMessage> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                TemplateMessage::text(m["role"].as_str().unwrap(), m["content"].as_str().unwrap())
            })
            .collect();
        let tools = case.get("tools").and_then(|t| t.as_array());
        let text = template
            .render(&messages, tools.map(Vec::as_slice))
            .unwrap();
        let id = &case["id"];
        assert_eq!(text, case["prompt_text"].as_str().unwrap(), "case {id}");
        let enc = assets.tokenizer.encode(text, assets.add_bos).unwrap();
        assert_eq!(enc.get_ids(), common::ids(&case["prompt_ids"]), "case {id}");
        n += 1;
    }
    n
}

#[test]
fn chat_template_and_tokenizer_give_llama_cpp_prompt_ids() {
    assert_eq!(chat_cases_match(&assets(), &common::reference()), 12);
}

#[test]
fn end_of_turn_is_a_stop_token() {
    let assets = assets();
    let reference = common::reference();
    let eos = reference["eos_id"].as_u64().unwrap() as u32;
    assert!(assets.stop_token_ids.contains(&eos));
    assert_eq!(assets.max_model_len, 8192);
}

#[test]
fn incremental_detokenization_never_splits_a_character() {
    let assets = assets();
    let tok = std::sync::Arc::new(assets.tokenizer);
    for text in [
        "emoji 🎉🚀 and accents café naïve",
        "日本語のテキスト",
        "∑(x²) ≈ ∞",
        "  leading spaces\tand\nnewlines\r\n",
    ] {
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        let mut detok = wick_server::Detokenizer::new(tok.clone());
        let mut out = String::new();
        let mut held_back = false;
        for &id in &ids {
            let delta = detok.push(id);
            assert!(!delta.contains('\u{FFFD}'), "{text:?}: delta {delta:?}");
            held_back |= delta.is_empty();
            out.push_str(&delta);
        }
        out.push_str(&detok.flush());
        assert_eq!(out, text);
        if text.starts_with("emoji") || text.starts_with("日本") {
            // Byte-level tokens split these characters: some token completed no character.
            assert!(held_back, "{text:?}");
        }
    }
}

#[test]
fn token_bytes_spell_the_text_exactly() {
    let assets = assets();
    for text in [
        "emoji 🎉🚀 and accents café naïve",
        "日本語のテキスト",
        "  tabs\tand\nnewlines\r\n",
    ] {
        let ids = assets
            .tokenizer
            .encode(text, false)
            .unwrap()
            .get_ids()
            .to_vec();
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| wick_server::token_bytes(&assets.tokenizer, id))
            .collect();
        assert_eq!(bytes, text.as_bytes(), "{text:?}");
    }
    let im_end = assets.tokenizer.token_to_id("<|im_end|>").unwrap();
    assert_eq!(
        wick_server::token_bytes(&assets.tokenizer, im_end),
        b"<|im_end|>"
    );
}

/// Every tokenizer case of a reference file gives llama.cpp's ids (no BOS), and decodes back.
fn tokenizer_cases_match(assets: &wick_runner::ModelAssets, reference: &serde_json::Value) {
    let cases = reference["tokenizer"].as_array().expect("tokenizer cases");
    assert!(cases.len() >= 8);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = common::ids(&case["ids"]);
        let got = assets
            .tokenizer
            .encode(text, false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(got, want, "tokenizing {text:?}");
        assert_eq!(
            assets.tokenizer.decode(&got, false).unwrap(),
            text,
            "decoding {text:?}"
        );
    }
}

#[test]
fn qwen_tokenizer_and_template_match_llama_cpp() {
    let reference = common::reference_named("qwen2.5-coder-0.5b-q4_k_m.llamacpp.json");
    let assets = wick_runner::load_assets(&common::fetch_model("qwen")).unwrap();
    tokenizer_cases_match(&assets, &reference);
    assert!(!assets.add_bos);
    // Six chat cases, one with tools.
    assert_eq!(chat_cases_match(&assets, &reference), 6);
    let im_end = assets.tokenizer.token_to_id("<|im_end|>").unwrap();
    assert!(assets.stop_token_ids.contains(&im_end));
    assert_eq!(assets.max_model_len, 32768);
}

#[test]
fn gemma_sentencepiece_tokenizer_matches_llama_cpp() {
    let reference = common::reference_named("gemma-3-270m-q4_k_m.llamacpp.json");
    let assets = wick_runner::load_assets(&common::fetch_model("gemma")).unwrap();
    tokenizer_cases_match(&assets, &reference);
    // A base model: no chat template; prompts start with BOS, as the GGUF asks.
    assert!(assets.chat_template.is_none());
    assert!(assets.add_bos);
    assert_eq!(assets.bos_token.as_deref(), Some("<bos>"));
    for case in reference["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let ids = assets
            .tokenizer
            .encode(prompt, true)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(ids, common::ids(&case["prompt_ids"]), "case {}", case["id"]);
        assert_eq!(ids[0], 2);
    }
    let eot = assets.tokenizer.token_to_id("<end_of_turn>").unwrap();
    assert!(assets.stop_token_ids.contains(&eot) && assets.stop_token_ids.contains(&1));
    // SentencePiece pieces: spaces are `▁`, unknown bytes fall back to byte tokens.
    let detok_text = "naïve  café\n\t🙂 x";
    let ids = assets
        .tokenizer
        .encode(detok_text, false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(assets.tokenizer.decode(&ids, false).unwrap(), detok_text);
    let bytes: Vec<u8> = ids
        .iter()
        .flat_map(|&id| wick_server::token_bytes(&assets.tokenizer, id))
        .collect();
    assert_eq!(bytes, detok_text.as_bytes());
}

/// detokenize(tokenize(text)) == text for arbitrary UTF-8 text (no special-token strings,
/// no BOS added), on each test model's tokenizer: BPE (default, Qwen) and SentencePiece
/// (Gemma). A fixed number of cases per model, no persisted failures.
#[test]
fn detokenize_of_tokenize_is_the_text_on_every_test_model() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let models = [
        common::model_path(),
        common::fetch_model("qwen"),
        common::fetch_model("gemma"),
    ];
    for path in models {
        let assets = wick_runner::load_assets(&path).expect("assets");
        let tok = &assets.tokenizer;
        let specials: Vec<String> = tok
            .get_added_tokens_decoder()
            .values()
            .map(|t| t.content.clone())
            .filter(|c| !c.is_empty())
            .collect();
        let text = prop_oneof![
            any::<String>(),
            "\\PC{0,80}",
            "[ \\t\\na-zA-Z0-9.,!?'\"()-]{0,80}",
            "(  |\\n\\n|\\t| ?[a-z]+| ?[0-9]+| ?[éüßçøåñ]+| ?[中文日本語한국어]+| ?[😀🚀👍]| ?\\r\\n){0,20}",
        ]
        .prop_filter("no special-token strings", move |t: &String| {
            !specials.iter().any(|s| t.contains(s.as_str()))
        });
        let mut runner = TestRunner::new(Config {
            cases: 300,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&text, |text| {
                let ids = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
                let back = tok.decode(&ids, false).unwrap();
                prop_assert_eq!(&back, &text, "ids {:?}", ids);
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}
