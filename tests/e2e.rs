//! End to end: the real `wick` binary on the real default model, over HTTP.

mod common;

use std::time::{Duration, Instant};

use common::server::{chat, model_args, sample, stream_text, Server};
use futures::StreamExt;
use serde_json::{json, Value};
use wick_runner::gguf::{GgufWriter, Value as GgufValue};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_equals_non_streaming_and_matches_llama_cpp() {
    let s = Server::start(&[]).await;
    // A reference case whose greedy path is stable to its end: the text must equal llama.cpp's.
    let reference = common::reference();
    let case = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "chat-list")
        .expect("chat-list case");
    let content = case["messages"][0]["content"].as_str().unwrap();
    let body = chat(content, 64);

    let full = s.complete(&body).await;
    assert_eq!(full["object"], "chat.completion");
    assert_eq!(full["model"], "smollm2");
    assert!(full["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(full["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &full["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["finish_reason"], "stop");
    let text = choice["message"]["content"].as_str().unwrap();
    assert_eq!(text, case["text"].as_str().unwrap());
    let usage = &full["usage"];
    assert_eq!(
        usage["prompt_tokens"],
        case["prompt_ids"].as_array().unwrap().len()
    );
    // The steps include the end-of-turn token, as completion_tokens does.
    assert_eq!(
        usage["completion_tokens"],
        case["steps"].as_array().unwrap().len()
    );
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let events = s.stream(&sbody).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let (streamed, finish) = stream_text(&events);
    assert_eq!(streamed, text);
    assert_eq!(finish.as_deref(), Some("stop"));
    let usage_chunk: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage_chunk["usage"], full["usage"]);

    // max_tokens cuts with finish_reason "length".
    let short = s.complete(&chat(content, 3)).await;
    assert_eq!(short["choices"][0]["finish_reason"], "length");
    assert_eq!(short["usage"]["completion_tokens"], 3);
}

/// 32 concurrent greedy requests (the default `max_num_seqs`: all in the same steps) each give
/// token for token what they give alone: every kernel's order of operations is independent
/// of the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_each_equal_their_solo_output() {
    let s = Server::start(&[]).await;
    let reference = common::reference();
    let mut prompts: Vec<String> = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "chat" && c["messages"].as_array().unwrap().len() == 1)
        .map(|c| c["messages"][0]["content"].as_str().unwrap().to_string())
        .collect();
    let topics = [
        "volcanoes",
        "the moon",
        "coffee",
        "chess",
        "bees",
        "rain",
        "trains",
        "paper",
        "glass",
        "whales",
        "maps",
        "bread",
        "clocks",
        "salt",
        "kites",
        "copper",
        "owls",
        "bridges",
        "tea",
        "snow",
        "ants",
        "music",
    ];
    prompts.extend(
        topics
            .iter()
            .map(|t| format!("Tell me one surprising fact about {t}.")),
    );
    prompts.truncate(32);
    assert_eq!(prompts.len(), 32);
    let (solo, together) = s.solo_and_together(&prompts, 24).await;
    for (i, (a, b)) in solo.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "prompt {i}: solo and concurrent outputs differ");
    }
    // They really were batched: some step computed more than one sequence's token.
    let text = s.metrics().await;
    let one_token_steps = sample(&text, "wick_step_tokens_bucket{le=\"1\"}");
    let all_steps = sample(&text, "wick_step_tokens_count");
    assert!(
        all_steps > one_token_steps,
        "no step had more than one token"
    );
    let upto_16 = sample(&text, "wick_step_batch_size_bucket{le=\"16\"}");
    let steps = sample(&text, "wick_step_batch_size_count");
    assert!(upto_16 < steps, "no step computed more than 16 sequences");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_frees_its_blocks() {
    let s = Server::start(&[]).await;
    let mut body = chat(
        "Write a long story about a robot who learns to paint.",
        2000,
    );
    body["stream"] = json!(true);
    let r = s.post(&body).await;
    assert_eq!(r.status(), 200);
    let mut bytes = r.bytes_stream();
    let mut seen = 0;
    while seen < 4 {
        let chunk = bytes.next().await.expect("stream open").expect("chunk");
        seen += String::from_utf8_lossy(&chunk).matches("data: ").count();
    }
    assert!(s.metric("wick_kv_cache_blocks_used").await > 0.0);
    assert_eq!(s.metric("wick_requests_running").await, 1.0);
    drop(bytes);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let used = s.metric("wick_kv_cache_blocks_used").await;
        let running = s.metric("wick_requests_running").await;
        if used == 0.0 && running == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "blocks still used: {used}, running {running}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        s.metric("wick_request_success_total{finish_reason=\"abort\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_named_4xx_and_the_server_keeps_serving() {
    let s = Server::start(&["--max-model-len", "512"]).await;
    let ok = r#""model":"smollm2","messages":[{"role":"user","content":"hi"}]"#;
    let long = "hello ".repeat(600);
    let cases: Vec<(String, u16, Option<&str>)> = vec![
        ("{\"model\": ".into(), 400, None),
        ("[]".into(), 400, None),
        (r#"{"model":"smollm2"}"#.into(), 400, Some("messages")),
        (
            r#"{"model":"smollm2","messages":[]}"#.into(),
            400,
            Some("messages"),
        ),
        (
            r#"{"model":"smollm2","messages":"hi"}"#.into(),
            400,
            Some("messages"),
        ),
        (
            r#"{"model":"smollm2","messages":[{"role":"user"}]}"#.into(),
            400,
            Some("messages[0].content"),
        ),
        (
            r#"{"model":"smollm2","messages":[{"role":"robot","content":"x"}]}"#.into(),
            400,
            Some("messages[0].role"),
        ),
        (
            r#"{"model":"smollm2","messages":[{"role":"user","content":5}]}"#.into(),
            400,
            Some("messages[0].content"),
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}]}"#.into(),
            400,
            Some("model"),
        ),
        (
            format!("{{{ok},\"temperature\":-1}}"),
            400,
            Some("temperature"),
        ),
        (
            format!("{{{ok},\"temperature\":\"warm\"}}"),
            400,
            Some("temperature"),
        ),
        (format!("{{{ok},\"top_p\":1.5}}"), 400, Some("top_p")),
        (
            format!("{{{ok},\"max_tokens\":0}}"),
            400,
            Some("max_tokens"),
        ),
        (
            format!("{{{ok},\"max_tokens\":100000}}"),
            400,
            Some("max_tokens"),
        ),
        (format!("{{{ok},\"stream\":\"yes\"}}"), 400, Some("stream")),
        (format!("{{{ok},\"n\":0}}"), 400, Some("n")),
        (format!("{{{ok},\"bogus\":true}}"), 400, Some("bogus")),
        (
            format!(r#"{{"model":"smollm2","messages":[{{"role":"user","content":"{long}"}}]}}"#),
            400,
            Some("messages"),
        ),
        (
            r#"{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}"#.into(),
            404,
            Some("model"),
        ),
    ];
    for (body, status, param) in cases {
        let r = s.post_raw(&body).await;
        let got = r.status().as_u16();
        let v: Value = r.json().await.expect("an OpenAI error body");
        let shown = &body[..body.len().min(80)];
        assert_eq!(got, status, "{shown}: {v}");
        let err = &v["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{shown}: {v}"
        );
        assert!(err["type"].is_string(), "{shown}: {v}");
        assert!(err.get("code").is_some(), "{shown}: {v}");
        assert_eq!(err["param"].as_str(), param, "{shown}: {v}");
    }
    let v: Value = s
        .post_raw(&format!("{{{ok},\"max_tokens\":100000}}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let r = s
        .post_raw(r#"{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}"#)
        .await;
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "model_not_found"
    );
    let r = s.client.get(s.url("/v1/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // Still serving.
    let v = s.complete(&chat("Say yes.", 4)).await;
    assert!(v["choices"][0]["message"]["content"].is_string());
    let models = s.get_json("/v1/models").await;
    assert_eq!(models["data"][0]["id"], "smollm2");
    assert_eq!(models["data"][0]["max_model_len"], 512);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_12_mib_reads_its_413() {
    let s = Server::start(&[]).await;
    let huge = format!(
        r#"{{"model":"smollm2","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(12 << 20)
    );
    // With a Content-Length, and streamed in chunks without one.
    for chunked in [false, true] {
        let body = if chunked {
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> = huge
                .as_bytes()
                .chunks(1 << 16)
                .map(|c| Ok(c.to_vec()))
                .collect();
            reqwest::Body::wrap_stream(futures::stream::iter(chunks))
        } else {
            reqwest::Body::from(huge.clone())
        };
        let r = s
            .client
            .post(s.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("chunked={chunked}: {e:?}"));
        assert_eq!(r.status(), 413, "chunked={chunked}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "payload_too_large", "{v}");
    }
    // The server goes on serving.
    let (status, _) = s
        .post_json("/v1/chat/completions", &common::server::chat("Hi", 2))
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_are_cut_and_never_emitted() {
    let s = Server::start(&[]).await;
    let base = s
        .complete(&chat("List three fruits that are red.", 40))
        .await;
    let text = base["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    // Stop at the second word of the answer: the output is everything before it.
    let word = text
        .split_whitespace()
        .nth(2)
        .expect("a few words")
        .to_string();
    let at = text.find(&word).unwrap();
    let mut body = chat("List three fruits that are red.", 40);
    body["stop"] = json!([word.clone(), "never-appears"]);
    let v = s.complete(&body).await;
    assert_eq!(v["choices"][0]["message"]["content"], text[..at]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    body["stream"] = json!(true);
    let (streamed, finish) = stream_text(&s.stream(&body).await);
    assert_eq!(streamed, text[..at]);
    assert_eq!(finish.as_deref(), Some("stop"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_every_documented_series_for_both_kinds_of_request() {
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let s = Server::start(&["--metrics-port", &metrics_port]).await;
    let documented = common::documented_metrics();
    assert!(documented.len() >= 20, "{documented:?}");
    let per_request: Vec<&str> = documented
        .iter()
        .filter(|(n, t)| {
            t == "histogram"
                && !n.starts_with("wick_step_")
                && n != "wick_inter_token_latency_seconds"
        })
        .map(|(n, _)| n.as_str())
        .collect();
    // Each per-request histogram counts the non-streaming request, then the streaming one.
    let mut body = chat("Say yes.", 4);
    body["ignore_eos"] = json!(true);
    s.complete(&body).await;
    for name in &per_request {
        assert_eq!(
            s.metric(&format!("{name}_count")).await,
            1.0,
            "{name}, non-streaming"
        );
    }
    body["stream"] = json!(true);
    s.stream(&body).await;
    for name in &per_request {
        assert_eq!(
            s.metric(&format!("{name}_count")).await,
            2.0,
            "{name}, streaming"
        );
    }
    let text = s.metrics().await;
    for (name, kind) in &documented {
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no help for {name}"
        );
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "no type {kind} for {name}"
        );
    }
    assert_eq!(s.metric("wick_kv_cache_blocks").await, 1024.0);
    assert!(s.metric("wick_prompt_tokens_total").await > 20.0);
    assert_eq!(s.metric("wick_generation_tokens_total").await, 8.0);
    assert_eq!(s.metric("wick_request_generation_tokens_sum").await, 8.0);
    assert_eq!(
        s.metric("wick_inter_token_latency_seconds_count").await,
        6.0
    );
    assert!(s.metric("wick_step_batch_size_count").await >= 8.0);
    assert_eq!(
        s.metric("wick_request_success_total{finish_reason=\"length\"}")
            .await,
        2.0
    );
    // Every sample carries the served model's name, and no other label than the documented.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.contains("model=\"smollm2\""), "no model label: {line}");
        for label in ["request_id", "id="] {
            assert!(!line.contains(label), "unbounded label: {line}");
        }
    }
    let usage = s.metric("wick_kv_cache_usage_ratio").await;
    assert!((0.0..=1.0).contains(&usage));
    common::promtool_check(&text);

    // The same series on the separate metrics port.
    let other = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    assert!(other
        .text()
        .await
        .unwrap()
        .contains("# TYPE wick_request_queue_time_seconds histogram"));
}

/// A chat template from `--chat-template` on a model without one (Gemma 3 270M, a base model):
/// chat works through it, BOS is there once although both the template and the GGUF's
/// `add_bos_token` put it, and the template's `raise_exception` is a 400 with its words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_template_file_serves_a_base_model() {
    let dir = tempfile::tempdir().unwrap();
    let tmpl = dir.path().join("chat.jinja");
    std::fs::write(
        &tmpl,
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('system messages are not supported') }}{% endif %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}<start_of_turn>model\n",
    )
    .unwrap();
    let model = common::fetch_model("gemma");
    let args = [
        "--model",
        model.to_str().unwrap(),
        "--chat-template",
        tmpl.to_str().unwrap(),
        "--served-model-name",
        "gemma",
        "--kv-cache-blocks",
        "64",
    ];
    let server = Server::start_with(&args, &[]).await;
    let messages = json!([{"role": "user", "content": "Say hello."}]);
    let tok = server
        .post_json("/tokenize", &json!({ "messages": messages }))
        .await;
    assert_eq!(tok.0, 200, "{}", tok.1);
    let ids = tok.1["tokens"].as_array().unwrap();
    assert_eq!(ids[0], 2, "{}", tok.1);
    assert_ne!(ids[1], 2, "BOS twice: {}", tok.1);
    let (status, body) = server
        .post_json(
            "/v1/chat/completions",
            &json!({"model": "gemma", "messages": messages, "max_tokens": 8, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["prompt_tokens"], ids.len());
    let system = json!([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]);
    let (status, body) = server
        .post_json(
            "/v1/chat/completions",
            &json!({"model": "gemma", "messages": system, "max_tokens": 4}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "messages");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("system messages are not supported"), "{msg}");
}

#[test]
fn a_model_that_cannot_load_is_a_clear_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.gguf");
    std::fs::write(&bad, b"not a gguf file at all").unwrap();
    // A GGUF file of an architecture no family serves, and one with a tensor of a type Wick
    // does not load: each named.
    let mamba = dir.path().join("mamba.gguf");
    let mut w = GgufWriter::new();
    w.meta("general.architecture", GgufValue::String("mamba".into()));
    w.tensor_f32("token_embd.weight", &[4, 2], &[0.0; 8]);
    w.write(&mamba).unwrap();
    let iq = dir.path().join("iq4.gguf");
    let mut w = GgufWriter::new();
    w.meta("general.architecture", GgufValue::String("llama".into()));
    w.raw_tensor("blk.0.attn_q.weight", &[256, 2], 23, &[0u8; 272]);
    w.write(&iq).unwrap();
    for (model, needle) in [
        (dir.path().join("missing.gguf"), "cannot load model"),
        (bad, "not a GGUF file"),
        (mamba, "GGUF architecture \"mamba\""),
        (iq, "tensor blk.0.attn_q.weight"),
        (dir.path().join("iq4.gguf"), "IQ4_XS"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wick"))
            .args(["serve", "--port", "0", "--model"])
            .arg(&model)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "stderr: {err}");
        assert!(!err.contains("panicked"), "stderr: {err}");
    }
    // A bad configuration is a usage error: exit code 2, naming the key.
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[scheduler]\nmax_num_seq = 4\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(["serve", "--model", "m.gguf", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_num_seq"));
}

#[cfg(feature = "dev")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_measures_a_tiny_load() {
    let s = Server::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let (json_path, svg_path) = (dir.path().join("bench.json"), dir.path().join("bench.svg"));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wick"))
        .args([
            "bench",
            "--url",
            &s.base,
            "--requests",
            "4",
            "--sweep",
            "1,2",
            "--max-tokens",
            "5",
            "--quiet",
        ])
        .arg("--json")
        .arg(&json_path)
        .arg("--plot")
        .arg(&svg_path)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("TTFT ms p50/p90/p99"), "{table}");
    let reports: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let reports = reports.as_array().unwrap();
    assert_eq!(reports.len(), 2);
    for r in reports {
        assert_eq!(r["errors"], 0);
        // ignore_eos: every request generates exactly max_tokens.
        assert_eq!(r["output_tokens"], 20);
        assert!(r["ttft_ms"]["p50"].as_f64().unwrap() > 0.0);
        assert!(r["itl_ms"]["p99"].as_f64().unwrap() >= r["itl_ms"]["p50"].as_f64().unwrap());
        assert!(r["output_tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
}

/// `wick parity` (the GPU check's numerics step), run here CPU against CPU: identical weights
/// agree exactly and pass; re-quantized weights differ measurably and fail with exit code 1.
#[cfg(feature = "dev")]
#[test]
fn parity_passes_the_same_weights_and_catches_different_ones() {
    let model = common::model_path();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wick"))
            .args(["parity", "--prompts", "4", "--tokens", "12", "--model"])
            .arg(&model)
            .args(extra)
            .output()
            .unwrap();
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), report)
    };
    let (code, same) = run(&[]);
    assert_eq!(code, Some(0), "{same}");
    assert_eq!(same["steps"], 48);
    assert_eq!(same["max_abs_dlogp"], 0.0);
    assert_eq!(same["argmax_agreement"], 1.0);
    let (code, q8) = run(&["--weight-format", "q8_0"]);
    assert_eq!(code, Some(1), "{q8}");
    assert!(q8["max_abs_dlogp"].as_f64().unwrap() > 0.05, "{q8}");
    assert_eq!(q8["pass"], false);
}

/// `wick export-tokenizer` on the default model into `dir`.
fn export_tokenizer(dir: &std::path::Path) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(["export-tokenizer", "--model"])
        .arg(common::model_path())
        .arg("--out")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The GGUF's tokenizer written as Hugging Face files encodes text exactly as the GGUF does.
#[test]
fn export_tokenizer_writes_an_equivalent_tokenizer_json() {
    let dir = tempfile::tempdir().unwrap();
    export_tokenizer(dir.path());
    let exported = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    let gguf = wick_runner::load(
        &common::model_path(),
        &wick_runner::Device::Cpu,
        &wick_runner::LoadOptions::default(),
    )
    .unwrap()
    .assets
    .tokenizer;
    for text in [
        "Hello, world!",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
        "  spaces,\ttabs and ünïcödé → 🚀",
    ] {
        assert_eq!(
            exported.encode(text, false).unwrap().get_ids(),
            gguf.encode(text, false).unwrap().get_ids(),
            "{text:?}"
        );
    }
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert!(cfg["chat_template"].as_str().unwrap().contains("im_start"));
    assert_eq!(cfg["eos_token"], "<|im_end|>");
}

/// The exported tokenizer metadata alone is enough for `wick tiny-models` (the GPU check's
/// tiny models of every family): the files it writes are the ones the tests check.
#[cfg(feature = "dev")]
#[test]
fn tiny_models_from_the_exported_tokenizer_are_the_tested_files() {
    let dir = tempfile::tempdir().unwrap();
    export_tokenizer(dir.path());
    let tiny = dir.path().join("tiny");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(["tiny-models", "--tokenizer"])
        .arg(dir.path().join("tokenizer.gguf"))
        .arg("--out")
        .arg(&tiny)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(
            common::repo_root().join("tests/data/tiny/qwen3-q3_k.llamacpp.json"),
        )
        .unwrap(),
    )
    .unwrap();
    use sha2::Digest;
    let bytes = std::fs::read(tiny.join("qwen3-q3_k.gguf")).unwrap();
    let sha: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(sha, reference["model_sha256"].as_str().unwrap());
    assert!(tiny.join("phi3-f16-hf/config.json").exists());
}

/// The 32-concurrent-equals-solo check on the other test models (Qwen2.5's Q5_0/Q8_0/Q4_K/Q6_K
/// mix, Gemma 3's sliding windows and 256-wide heads): every packed kernel and the attention
/// give a sequence the same bits whatever shares its steps. Completions, 12 tokens each, to
/// keep the two bigger models' time small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_completions_equal_their_solo_output_on_qwen_and_gemma() {
    for key in ["qwen", "gemma"] {
        let args = model_args(&common::fetch_model(key), "m", &[]);
        let server = Server::start_with(&args, &[]).await;
        let prompts: Vec<String> = (0..32)
            .map(|i| match i % 4 {
                0 => format!("def function_{i}(x):\n    "),
                1 => format!("The {i}th reason to visit the mountains is"),
                2 => format!("Item {i}: a list of fruits: apple, banana,"),
                _ => format!("Once upon a time, in town number {i}, there"),
            })
            .collect();
        let body = |p: &str| json!({"model": "m", "prompt": p, "max_tokens": 12, "temperature": 0});
        let text = |v: &Value| v["choices"][0]["text"].as_str().unwrap_or("").to_string();
        let mut solo = Vec::new();
        for p in &prompts {
            let (status, v) = server.post_json("/v1/completions", &body(p)).await;
            assert_eq!(status, 200, "{v}");
            solo.push(text(&v));
        }
        let steps0 = server.metric("wick_step_batch_size_count").await;
        let seqs0 = server.metric("wick_step_batch_size_sum").await;
        let bodies: Vec<Value> = prompts.iter().map(|p| body(p)).collect();
        let runs = bodies
            .iter()
            .map(|b| server.post_json("/v1/completions", b));
        let together: Vec<String> = futures::future::join_all(runs)
            .await
            .iter()
            .map(|(_, v)| text(v))
            .collect();
        for (i, (a, b)) in solo.iter().zip(&together).enumerate() {
            assert_eq!(a, b, "{key} prompt {i}: solo and concurrent outputs differ");
        }
        let steps = server.metric("wick_step_batch_size_count").await - steps0;
        let seqs = server.metric("wick_step_batch_size_sum").await - seqs0;
        assert!(
            seqs > steps * 4.0,
            "{key}: the requests were not batched ({seqs} in {steps} steps)"
        );
    }
}

/// Structured output on Qwen2.5-Coder-0.5B: JSON mode lets the model write the whitespace
/// it writes unconstrained (its first token is `{\n`; forced compact, it answered
/// `{"city":null,...}`), log-probabilities under a constraint are numbers, and a tool call's
/// tokens have theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_mode_and_tool_calls_on_qwen_keep_the_models_path_and_their_logprobs() {
    let args = model_args(
        &common::fetch_model("qwen"),
        "m",
        &["--kv-cache-blocks", "512"],
    );
    let server = Server::start_with(&args, &[]).await;
    let question = "Extract the city and its country from this sentence: 'Paris is the capital of France.' Answer with a JSON object with the keys \"city\" and \"country\".";
    let mut body = json!({
        "model": "m",
        "messages": [{"role": "user", "content": question}],
        "response_format": {"type": "json_object"},
        "temperature": 0,
        "max_completion_tokens": 96,
        "logprobs": true,
        "top_logprobs": 5,
    });
    let (status, v) = server.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let answer: Value =
        serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {content:?}"));
    assert_eq!(answer["city"], "Paris", "{content:?}");
    assert_eq!(answer["country"], "France", "{content:?}");
    assert!(
        content.contains('\n'),
        "the model's own layout: {content:?}"
    );
    // Tokens the constraint rules out are left out of top_logprobs, never a null.
    let tokens = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!tokens.is_empty());
    for t in tokens {
        assert!(t["logprob"].is_f64(), "{t}");
        let top = t["top_logprobs"].as_array().unwrap();
        assert!((1..=5).contains(&top.len()), "{t}");
        assert!(top.iter().all(|x| x["logprob"].is_f64()), "{t}");
    }
    // A tool call's reply has the log-probabilities of the tokens that wrote it.
    body = json!({
        "model": "m",
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
        "tool_choice": "required",
        "temperature": 0,
        "max_completion_tokens": 48,
        "logprobs": true,
    });
    let (status, v) = server.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    let written: String = choice["logprobs"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("no logprobs on a tool call: {v}"))
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    assert!(written.contains("get_weather"), "{written:?}");
    assert!(written.contains("Paris"), "{written:?}");
}

/// Qwen2.5-Coder-1.5B-Instruct answers this request by writing its call in a fenced JSON
/// block; under `tool_choice: auto` that is a tool call, streamed and not. 1.1 GB and about
/// 5 s a request on two cores: outside `make test`; `make tool-call-check` runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the 1.5B model: make tool-call-check"]
async fn a_fenced_json_call_from_qwen_1_5b_is_a_tool_call() {
    let args = model_args(
        &common::fetch_model("qwen15"),
        "m",
        &["--kv-cache-blocks", "256"],
    );
    let server = Server::start_with(&args, &[]).await;
    let mut body = json!({
        "model": "m",
        "messages": [{"role": "user", "content": "Convert 100 US dollars to euros."}],
        "tools": [{"type": "function", "function": {
            "name": "convert_currency",
            "description": "Convert an amount of money from one currency to another.",
            "parameters": {"type": "object", "properties": {
                "amount": {"type": "number"},
                "from_currency": {"type": "string", "description": "ISO 4217 code"},
                "to_currency": {"type": "string", "description": "ISO 4217 code"}
            }, "required": ["amount", "from_currency", "to_currency"]}
        }}],
        "tool_choice": "auto",
        "temperature": 0,
        "max_completion_tokens": 128,
    });
    let (status, v) = server.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    assert!(choice["message"]["content"].is_null(), "{v}");
    let call = &choice["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "convert_currency");
    let arguments: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments["amount"], 100);
    assert_eq!(arguments["from_currency"], "USD");
    assert_eq!(arguments["to_currency"], "EUR");
    // Streamed: the same call in tool_calls deltas, no content.
    body["stream"] = json!(true);
    let events = server.stream(&body).await;
    let (mut name, mut streamed, mut content, mut finish) =
        (String::new(), String::new(), String::new(), String::new());
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let chunk: Value = serde_json::from_str(e).unwrap();
        let delta = &chunk["choices"][0]["delta"];
        content.push_str(delta["content"].as_str().unwrap_or(""));
        if let Some(f) = delta["tool_calls"][0]["function"].as_object() {
            name.push_str(f.get("name").and_then(Value::as_str).unwrap_or(""));
            streamed.push_str(f.get("arguments").and_then(Value::as_str).unwrap_or(""));
        }
        finish.push_str(chunk["choices"][0]["finish_reason"].as_str().unwrap_or(""));
    }
    assert_eq!(
        (name.as_str(), content.as_str(), finish.as_str()),
        ("convert_currency", "", "tool_calls")
    );
    assert_eq!(serde_json::from_str::<Value>(&streamed).unwrap(), arguments);
}

/// One rule on every endpoint: a field the endpoint does not know is a 400
/// `unknown_parameter` naming it (in Anthropic's shape under /v1/messages), never ignored.
/// Where `model` is optional (/tokenize, /detokenize) and two models are served, a request
/// that names none is a 400 on `model`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_refuses_unknown_fields_and_tokenize_needs_a_model_among_two() {
    let minilm = common::fetch_model("minilm");
    let mut args = model_args(&common::model_path(), "smollm2", &[]);
    args.extend(
        [
            "--model",
            minilm.to_str().unwrap(),
            "--served-model-name",
            "minilm",
        ]
        .map(String::from),
    );
    let s = Server::start_with(&args, &[]).await;
    let m = json!([{"role": "user", "content": "Hi"}]);
    let table = [
        (
            "/v1/chat/completions",
            json!({"model": "smollm2", "messages": m, "max_tokens": 2}),
        ),
        (
            "/v1/completions",
            json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 2}),
        ),
        (
            "/v1/responses",
            json!({"model": "smollm2", "input": "Hi", "max_output_tokens": 2}),
        ),
        (
            "/v1/messages",
            json!({"model": "smollm2", "messages": m, "max_tokens": 2}),
        ),
        (
            "/v1/messages/count_tokens",
            json!({"model": "smollm2", "messages": m}),
        ),
        ("/v1/embeddings", json!({"model": "minilm", "input": "Hi"})),
        ("/tokenize", json!({"model": "smollm2", "prompt": "Hi"})),
        ("/detokenize", json!({"model": "smollm2", "tokens": [1, 2]})),
    ];
    for (path, body) in table {
        let (status, v) = s.post_json(path, &body).await;
        assert_eq!(status, 200, "{path}: the valid request: {v}");
        let mut bad = body.clone();
        bad["frobnicate"] = json!(1);
        let (status, v) = s.post_json(path, &bad).await;
        assert_eq!(status, 400, "{path}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("frobnicate"), "{path}: {v}");
        if path.starts_with("/v1/messages") {
            assert_eq!(v["type"], "error", "{path}: {v}");
            assert_eq!(v["error"]["type"], "invalid_request_error", "{path}: {v}");
        } else {
            assert_eq!(v["error"]["code"], "unknown_parameter", "{path}: {v}");
            assert_eq!(v["error"]["param"], "frobnicate", "{path}: {v}");
        }
    }

    for (path, body) in [
        ("/tokenize", json!({"prompt": "Hi"})),
        ("/detokenize", json!({"tokens": [1, 2]})),
    ] {
        let (status, v) = s.post_json(path, &body).await;
        assert_eq!(status, 400, "{path}: {v}");
        assert_eq!(v["error"]["param"], "model", "{path}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("`smollm2`") && message.contains("`minilm`"),
            "{v}"
        );
    }
    let (status, v) = s
        .post_json(
            "/tokenize",
            &json!({"model": "smollm2", "prompt": "Hello there"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["count"], v["tokens"].as_array().unwrap().len(), "{v}");
    let (status, v) = s
        .post_json(
            "/detokenize",
            &json!({"model": "smollm2", "tokens": v["tokens"]}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert!(
        v["prompt"].as_str().unwrap().ends_with("Hello there"),
        "{v}"
    );
    // The embedding model has no generation tokenizer route: named, it is a 400 on `model`.
    let (status, v) = s
        .post_json("/tokenize", &json!({"model": "minilm", "prompt": "Hi"}))
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "model", "{v}");
}
