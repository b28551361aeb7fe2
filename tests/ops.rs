//! Operations, end to end on the real binary: graceful drain on SIGTERM, configuration
//! precedence, x-request-id, the metrics port, a model from an offline Hugging Face cache, and
//! what web pages may do (Origin, Host, CORS).

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use common::server::{chat, model_args, Server};

/// A streaming request that runs for `max_tokens` steps (end of turn ignored).
fn long_stream(max_tokens: usize) -> Value {
    let mut body = chat("Count from one to a thousand.", max_tokens);
    body["stream"] = json!(true);
    body["ignore_eos"] = json!(true);
    body
}

/// Reads an SSE body to its end; its `data:` payloads.
async fn read_events<B: AsRef<[u8]>>(
    first: String,
    mut body: impl futures::Stream<Item = reqwest::Result<B>> + Unpin,
) -> Vec<String> {
    let mut text = first;
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(
            chunk.expect("stream chunk").as_ref(),
        ));
    }
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

async fn status_of(s: &Server, path: &str) -> Option<u16> {
    s.client
        .get(s.url(path))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_stream_to_its_end_refuses_new_work_and_exits_0() {
    let mut s = Server::start(&["--drain-timeout", "60"]).await;
    let r = s.post(&long_stream(400)).await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let first = body.next().await.expect("a first chunk").expect("chunk");
    let first = String::from_utf8_lossy(&first).into_owned();

    s.terminate();
    // Readiness turns 503 at once; liveness stays 200.
    let deadline = Instant::now() + Duration::from_secs(5);
    while status_of(&s, "/health").await != Some(503) {
        assert!(Instant::now() < deadline, "/health did not turn 503");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status_of(&s, "/health/live").await, Some(200));
    // New work is refused with an OpenAI-shaped 503 while the stream goes on.
    let refused = s.post(&chat("Hello", 4)).await;
    assert_eq!(refused.status(), 503);
    let err: Value = refused.json().await.unwrap();
    assert_eq!(err["error"]["code"], "shutting_down", "{err}");
    assert!(s.child_running(), "exited before the stream ended");

    let events = read_events(first, body).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let (text, finish) = common::server::stream_text(&events);
    assert_eq!(
        finish.as_deref(),
        Some("length"),
        "the stream ran to its end"
    );
    assert!(!text.is_empty());
    assert!(events.iter().all(|e| !e.contains("\"error\"")));

    let status = s.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_drain_timeout_a_stream_ends_with_a_clear_error() {
    let mut s = Server::start(&["--drain-timeout", "0.5"]).await;
    // Far longer than the drain timeout.
    let r = s.post(&long_stream(4000)).await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let first = body.next().await.expect("a first chunk").expect("chunk");
    s.terminate();
    let events = read_events(String::from_utf8_lossy(&first).into_owned(), body).await;
    let error = events
        .iter()
        .find(|e| e.contains("\"error\""))
        .expect("an error event");
    let v: Value = serde_json::from_str(error).unwrap();
    assert_eq!(v["error"]["code"], "shutting_down", "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("drain timeout"));
    let status = s.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_step_fails_its_request_and_a_dead_engine_exits_non_zero() {
    // One panic (the first step): that request gets a 500, the next is served.
    let args = model_args(
        &common::model_path(),
        "smollm2",
        &["--kv-cache-blocks", "256"],
    );
    let s = Server::start_with(&args, &[("WICK_TEST_PANIC_STEPS", "0")]).await;
    let (status, body) = s.post_json("/v1/chat/completions", &chat("Hi", 4)).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "internal_error", "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("WICK_TEST_PANIC_STEPS: step 0"));
    let (status, body) = s.post_json("/v1/chat/completions", &chat("Hi", 4)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(status_of(&s, "/health").await, Some(200));
    assert_eq!(
        s.metric("wick_request_failure_total{error_type=\"internal\"}")
            .await,
        1.0
    );
    s.wait_idle().await;

    // Every step panics: the third in a row gives up, and the process exits 1.
    let mut s = Server::start_with(&args, &[("WICK_TEST_PANIC_STEPS", "all")]).await;
    for _ in 0..3 {
        let (status, body) = s.post_json("/v1/chat/completions", &chat("Hi", 4)).await;
        assert_eq!(status, 500, "{body}");
    }
    let status = s.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_step_turns_health_503_until_it_ends() {
    let extra = [
        "--kv-cache-blocks",
        "256",
        "--step-timeout",
        "1",
        "--log-format",
        "json",
    ];
    let args = model_args(&common::model_path(), "smollm2", &extra);
    let log = tempfile::NamedTempFile::new().unwrap();
    // Step 2 (the second decode) takes 4 s longer than it should.
    let stall = [("WICK_TEST_STALL_STEPS", "2:4")];
    let s = Server::start_logging(&args, &stall, log.reopen().unwrap()).await;
    let client = s.client.clone();
    let url = s.url("/v1/chat/completions");
    let request = tokio::spawn(async move {
        let r = client.post(url).json(&chat("Hi", 6)).send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    });
    let started = Instant::now();
    let get = |path: &'static str| {
        let (client, url) = (s.client.clone(), s.url(path));
        async move {
            let r = client.get(url).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    // Within the stall, past the timeout: readiness and liveness say why.
    let (health, live) = loop {
        let (health, live) = (get("/health").await, get("/health/live").await);
        if health.0 == 503 || started.elapsed() > Duration::from_secs(4) {
            break (health, live);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(health.0, 503, "{:?}", health.1);
    assert_eq!(health.1["error"]["code"], "engine_stalled");
    let message = health.1["error"]["message"].as_str().unwrap();
    assert!(message.contains("in step 2"), "{message}");
    assert_eq!(live.0, 503, "{:?}", live.1);
    // The step ends: the request is answered in full and both probes recover.
    let (status, body) = request.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(started.elapsed() >= Duration::from_secs(3));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get("/health").await.0, 200);
    assert_eq!(get("/health/live").await.0, 200);
    assert_eq!(s.metric("wick_engine_stalls_total").await, 1.0);
    let text = std::fs::read_to_string(log.path()).unwrap();
    let line = text.lines().find(|l| l.contains("engine stalled"));
    let line = line.unwrap_or_else(|| panic!("no stall logged: {text}"));
    let line: Value = serde_json::from_str(line).unwrap();
    assert_eq!(line["fields"]["step"], 2, "{line}");
    assert_eq!(line["fields"]["model"], "smollm2", "{line}");
    assert!(text.contains("engine moving again"), "{text}");
}

async fn served_name(s: &Server) -> String {
    let v = s.get_json("/v1/models").await;
    v["data"][0]["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_then_environment_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("wick.toml");
    let model = common::model_path();
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = {:?}\nserved_model_name = \"from-file\"\n[scheduler]\nkv_cache_blocks = 300\n",
            model.to_str().unwrap()
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let file_only = Server::start_with(&["--config", cfg], &[]).await;
    assert_eq!(served_name(&file_only).await, "from-file");
    assert_eq!(file_only.metric("wick_kv_cache_blocks").await, 300.0);
    drop(file_only);

    let env = [("WICK_SERVED_MODEL_NAME", "from-env")];
    let with_env = Server::start_with(&["--config", cfg], &env).await;
    assert_eq!(served_name(&with_env).await, "from-env");
    drop(with_env);

    let with_flag =
        Server::start_with(&["--config", cfg, "--served-model-name", "from-flag"], &env).await;
    assert_eq!(served_name(&with_flag).await, "from-flag");
    // Keys the layers above do not set still come from the file.
    assert_eq!(with_flag.metric("wick_kv_cache_blocks").await, 300.0);
}

/// `--max-tokens-default` is the output budget of a chat or Responses request that sets
/// none, never more than the context leaves; a request's own limit wins; completions keep
/// OpenAI's 16.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_default_bounds_a_request_that_sets_no_limit() {
    let s = Server::start(&["--max-tokens-default", "12", "--max-model-len", "64"]).await;
    let unbounded = |content: &str| {
        let mut body = chat(content, 0);
        body.as_object_mut().unwrap().remove("max_tokens");
        body["ignore_eos"] = json!(true);
        body
    };
    let (status, v) = s
        .post_json("/v1/chat/completions", &unbounded("Tell me a story."))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 12, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");

    // A prompt that leaves fewer than 12 positions gets what is left.
    let long = unbounded(&"Tell me a story about a dragon and a knight. ".repeat(2));
    let (status, v) = s.post_json("/v1/chat/completions", &long).await;
    assert_eq!(status, 200, "{v}");
    let (prompt, completion) = (
        &v["usage"]["prompt_tokens"],
        &v["usage"]["completion_tokens"],
    );
    assert!(completion.as_u64().unwrap() < 12, "{v}");
    assert_eq!(
        prompt.as_u64().unwrap() + completion.as_u64().unwrap(),
        64,
        "{v}"
    );

    let mut body = unbounded("Tell me a story.");
    body["max_tokens"] = json!(5);
    let (status, v) = s.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 5, "{v}");

    let (status, v) = s
        .post_json(
            "/v1/responses",
            &json!({"model": "smollm2", "input": "Tell me a story.", "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    // The model may end its turn first; it never goes past the default.
    let out = v["usage"]["output_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&out), "{v}");

    let (status, v) = s
        .post_json(
            "/v1/completions",
            &json!({"model": "smollm2", "prompt": "Once upon a time", "temperature": 0,
                    "ignore_eos": true}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 16, "{v}");
}

/// Without a size, the KV cache takes a share of the memory available: with the default
/// share, the default model's cap (32 sequences of its 8,192 positions, 16,384 blocks of 16)
/// on any machine with 12 GiB free, some share of it on a smaller one; with a tiny share, a
/// request longer than the whole cache is a 400, as with an explicit size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kv_cache_is_sized_from_memory_by_default() {
    let model = common::model_path();
    let model = model.to_str().unwrap();
    let s = Server::start_with(&["--model", model], &[]).await;
    let blocks = s.metric("wick_kv_cache_blocks").await;
    assert!((1024.0..=16384.0).contains(&blocks), "{blocks}");
    let max_len = s.get_json("/v1/models").await["data"][0]["max_model_len"].clone();
    assert_eq!(max_len, 8192, "the whole context fits");
    drop(s);

    // 0.00001 of a few GiB: a few hundred KiB, one or two blocks of 360 KiB.
    let s = Server::start_with(
        &[
            "--model",
            model,
            "--served-model-name",
            "smollm2",
            "--kv-cache-memory-fraction",
            "0.00002",
        ],
        &[],
    )
    .await;
    let blocks = s.metric("wick_kv_cache_blocks").await;
    assert!((1.0..=64.0).contains(&blocks), "{blocks}");
    let long = "word ".repeat(1200);
    let (status, body) = s.post_json("/v1/chat/completions", &chat(&long, 4)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_loading_exits_within_2_s() {
    // A model file that never finishes reading (a named pipe nobody writes: a stand-in for a
    // slow disk, network storage or download): the load never ends by itself.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("slow.gguf");
    let made = std::process::Command::new("mkfifo").arg(&model).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo");
    let log = tempfile::NamedTempFile::new().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(["serve", "--port", &port.to_string(), "--model"])
        .arg(&model)
        .env("RUST_LOG", "warn")
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.get(url("/health/live")).send().await.is_err() {
        assert!(Instant::now() < deadline, "wick did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let health = client.get(url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 503, "still loading");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(kill.is_ok_and(|s| s.success()));
    let sent = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if sent.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("still running 10 s after SIGTERM while loading");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = sent.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "exited {took:?} after SIGTERM"
    );
    assert_eq!(status.code(), Some(0));
    let text = std::fs::read_to_string(log.path()).unwrap();
    assert!(text.contains("shutdown while loading"), "{text}");
}

/// A memory cgroup of its own, removed when dropped (once the processes in it ended).
struct MemoryCgroup {
    dir: std::path::PathBuf,
    version: u8,
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A memory cgroup with `limit` bytes, where this machine lets a test make one and move a
/// process into it (root, a writable cgroup v1 memory hierarchy or v2 with the memory
/// controller).
fn make_memory_cgroup(limit: u64) -> Option<MemoryCgroup> {
    let name = format!("wick-test-{}", std::process::id());
    let v2 = std::path::Path::new("/sys/fs/cgroup");
    let controllers = std::fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
    let (dir, version, limit_file) = if controllers.split_whitespace().any(|c| c == "memory") {
        (v2.join(&name), 2, "memory.max")
    } else {
        (v2.join("memory").join(&name), 1, "memory.limit_in_bytes")
    };
    std::fs::create_dir(&dir).ok()?;
    let group = MemoryCgroup { dir, version };
    std::fs::write(group.dir.join(limit_file), limit.to_string()).ok()?;
    let procs = group.dir.join("cgroup.procs");
    let moved = std::process::Command::new("sh")
        .args(["-c", &format!("echo $$ > {}", procs.display())])
        .status();
    moved.is_ok_and(|s| s.success()).then_some(group)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_kv_cache_fits_a_memory_cgroup() {
    const LIMIT_MIB: u64 = 1024;
    let Some(group) = make_memory_cgroup(LIMIT_MIB << 20) else {
        eprintln!("skipped: this machine does not let a test make a memory cgroup (the cgroup reading is tested on fixture files in wick-runner)");
        return;
    };
    let model = common::model_path();
    let log = tempfile::NamedTempFile::new().unwrap();
    let (dir, version) = (&group.dir, group.version);
    let before = format!(
        "echo $$ > {} || exit 97",
        dir.join("cgroup.procs").display()
    );
    let args = ["--model", model.to_str().unwrap(), "--log-format", "json"];
    let s = Server::start_after(
        &before,
        &args,
        &[("RUST_LOG", "info")],
        log.reopen().unwrap(),
    )
    .await;
    let blocks = s.metric("wick_kv_cache_blocks").await;
    drop(s);
    let text = std::fs::read_to_string(log.path()).unwrap();
    let loaded: Value = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["message"] == "model loaded")
        .unwrap_or_else(|| panic!("no start-up line: {text}"));
    let f = &loaded["fields"];
    let by = f["kv_cache_sized_by"].as_str().unwrap();
    assert!(
        by.contains(&format!("cgroup v{version} limit {LIMIT_MIB} MiB")),
        "{by}"
    );
    // Half of what the 1 GiB limit leaves: not a share of the machine's memory.
    let mib = f["kv_cache_mib"].as_u64().unwrap();
    assert!((32..=LIMIT_MIB / 2).contains(&mib), "{mib} MiB");
    assert_eq!(f["kv_cache_blocks"].as_f64(), Some(blocks));
}

#[test]
fn bad_configuration_values_exit_2_naming_the_key() {
    for (env, needle) in [
        (("WICK_LOG_FORMAT", "xml"), "logging.format"),
        (("WICK_DRAIN_TIMEOUT", "-1"), "server.drain_timeout"),
        (
            ("WICK_KV_CACHE_MEMORY_FRACTION", "1.5"),
            "scheduler.kv_cache_memory_fraction",
        ),
        (
            ("WICK_OTLP_ENDPOINT", "collector:4318"),
            "logging.otlp_endpoint",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wick"))
            .args(["serve", "--model", "m.gguf"])
            .env(env.0, env.1)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{env:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{env:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_request_id_is_echoed_or_generated() {
    let s = Server::start(&[]).await;
    let given = s
        .client
        .post(s.url("/v1/chat/completions"))
        .header("x-request-id", "trace-me-42")
        .json(&chat("Hi", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(given.status(), 200);
    assert_eq!(given.headers()["x-request-id"], "trace-me-42");

    let mut body = chat("Hi", 2);
    body["stream"] = json!(true);
    let made = s.post(&body).await;
    let id = made.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    made.text().await.unwrap();

    // Errors carry it too, and an unusable one is replaced.
    let missing = s
        .client
        .get(s.url("/v2/nothing"))
        .header("x-request-id", "has spaces in it")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let replaced = missing.headers()["x-request-id"].to_str().unwrap();
    assert_eq!(replaced.len(), 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_loads_from_an_offline_hugging_face_cache() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--wick-test--smollm2-gguf");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    std::os::unix::fs::symlink(
        common::model_path(),
        repo.join("snapshots")
            .join(commit)
            .join("smollm2.Q4_1.gguf"),
    )
    .unwrap();
    let home_s = home.path().to_str().unwrap();
    let env = [("HF_HOME", home_s), ("HF_HUB_OFFLINE", "1")];
    let s = Server::start_with(&["--model", "wick-test/smollm2-gguf"], &env).await;
    assert_eq!(served_name(&s).await, "wick-test/smollm2-gguf");
    let mut body = chat("Say hi.", 3);
    body["model"] = json!("wick-test/smollm2-gguf");
    let v = s.complete(&body).await;
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
    drop(s);

    // Offline and not cached: a clear start-up error, exit 1.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(["serve", "--port", "0", "--model", "wick-test/absent"])
        .envs(env)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("wick-test/absent") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}

/// `--otlp-endpoint`: spans reach an OTLP/HTTP collector (here a bare listener that records
/// what is posted to it); the batch is flushed at the latest when the server shuts down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_to_an_otlp_endpoint() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            let mut buf = vec![0u8; 1 << 20];
            let mut got = Vec::new();
            conn.set_read_timeout(Some(Duration::from_millis(500))).ok();
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got);
                if let Some(h) = text.find("\r\n\r\n") {
                    let len = text[..h]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if got.len() >= h + 4 + len {
                        break;
                    }
                }
            }
            // Handed over before the answer, which the exporter waits for before exiting.
            let _ = tx.send(String::from_utf8_lossy(&got).into_owned());
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        }
    });
    let endpoint = format!("http://127.0.0.1:{port}/v1/traces");
    let mut s = Server::start(&["--otlp-endpoint", &endpoint, "--log-level", "info"]).await;
    let r = s
        .client
        .post(s.url("/v1/chat/completions"))
        .header("x-request-id", "otlp-trace-me")
        .json(&chat("Hi", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.terminate();
    assert_eq!(s.wait_exit(Duration::from_secs(30)).await.code(), Some(0));
    let mut posted = Vec::new();
    let request = loop {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(p) if p.starts_with("POST /v1/traces") => break p,
            Ok(p) => posted.push(p),
            Err(_) => panic!("no export received: {posted:?}"),
        }
    };
    assert!(request
        .to_ascii_lowercase()
        .contains("content-type: application/x-protobuf"));
    // The protobuf body carries the span attributes as strings.
    assert!(
        request.contains("otlp-trace-me"),
        "request id not in the exported spans"
    );
    assert!(request.contains("wick"), "service name missing");
}

/// Writes `request` on a new connection and reads the answer's first 4 KiB (within 5 s).
fn raw_exchange(s: &Server, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(s.base.trim_start_matches("http://")).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(request).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = conn.read(&mut buf).expect("an answer before the body");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// `POST path` with `body` as `text/plain` (a "simple" request a page can send without a
/// preflight) and these headers; the status and the JSON body.
async fn post_from_page(
    s: &Server,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut req = s
        .client
        .post(s.url(path))
        .header("content-type", "text/plain")
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("POST");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_cannot_drive_a_loopback_server_and_allowed_origins_get_cors() {
    let s = Server::start(&["--allowed-origins", "https://app.example.com"]).await;
    let body = json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 1});
    let generated = || async { s.metric("wick_generation_tokens_total").await };
    let before = generated().await;
    // A drive-by POST from another site: refused before the body is read, in the API's shape.
    let evil = [("origin", "https://evil.example")];
    let (status, err) = post_from_page(&s, "/v1/completions", &body, &evil).await;
    assert_eq!(status, 403, "{err}");
    assert_eq!(err["error"]["code"], "origin_not_allowed");
    assert_eq!(err["error"]["type"], "permission_error");
    let (status, err) = post_from_page(&s, "/v1/messages", &body, &evil).await;
    assert_eq!((status, &err["type"]), (403, &json!("error")), "{err}");
    assert_eq!(err["error"]["type"], "permission_error");
    // DNS rebinding: the page's own name, same-origin with itself, resolving to 127.0.0.1.
    let rebound = [
        ("host", "attacker.example:8080"),
        ("origin", "http://attacker.example:8080"),
    ];
    let (status, err) = post_from_page(&s, "/v1/completions", &body, &rebound).await;
    assert_eq!(status, 403, "{err}");
    assert_eq!(err["error"]["code"], "host_not_allowed");
    // Refused before the body is read: headers announcing 5 MB, and no body sent, get the
    // 403 at once (reading the body would wait, or give a 413).
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {}\r\nOrigin: https://evil.example\r\n\
         Content-Type: text/plain\r\nContent-Length: 5000000\r\n\r\n",
        s.base.trim_start_matches("http://")
    );
    let answer = raw_exchange(&s, head.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("origin_not_allowed"), "{answer}");
    let null = [("origin", "null")];
    let (status, _) = post_from_page(&s, "/v1/chat/completions", &body, &null).await;
    assert_eq!(status, 403);
    assert_eq!(generated().await, before, "a refused request generated");
    // Probes and scrapers are never refused.
    for path in ["/health", "/health/live", "/metrics"] {
        let r = s
            .client
            .get(s.url(path))
            .header("host", "attacker.example")
            .send()
            .await;
        assert_eq!(r.unwrap().status(), 200, "{path}");
        let r = s
            .client
            .get(s.url(path))
            .header("origin", "https://evil.example")
            .send()
            .await;
        assert_eq!(r.unwrap().status(), 200, "{path}");
    }
    // curl -d (no Origin, form content type) and the server's own page keep working.
    let (status, _) = post_from_page(&s, "/v1/completions", &body, &[]).await;
    assert_eq!(status, 200);
    let own = s.base.replace("http://", "");
    let own_origin = s.base.clone();
    let same = [("origin", own_origin.as_str()), ("host", own.as_str())];
    let (status, _) = post_from_page(&s, "/v1/completions", &body, &same).await;
    assert_eq!(status, 200);
    // A disallowed origin's preflight is refused too.
    let pre = s
        .client
        .request(reqwest::Method::OPTIONS, s.url("/v1/chat/completions"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(pre.status(), 403);
    assert!(pre.headers().get("access-control-allow-origin").is_none());
    // An allowed origin: its preflight is answered, its answers carry CORS headers.
    let pre = s
        .client
        .request(reqwest::Method::OPTIONS, s.url("/v1/chat/completions"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(pre.status(), 204);
    let h = pre.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(
        h["access-control-allow-headers"],
        "authorization, content-type"
    );
    assert!(h["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
    let r = s
        .client
        .post(s.url("/v1/completions"))
        .header("origin", "https://app.example.com")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(r.headers()["vary"], "Origin");
    // Without an allowed origin, OPTIONS is not a CORS answer (no route takes it).
    let r = s
        .client
        .request(reqwest::Method::OPTIONS, s.url("/v1/chat/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);

    // Listening on every address (the Dockerfile's), Host is not checked unless listed.
    let open = Server::start(&["--host", "0.0.0.0"]).await;
    let rebound_host = [("host", "wick.example.com:8080")];
    let (status, _) = post_from_page(&open, "/v1/completions", &body, &rebound_host).await;
    assert_eq!(status, 200);
    let (status, _) = post_from_page(&open, "/v1/completions", &body, &evil).await;
    assert_eq!(status, 403);
    drop(open);
    let listed = Server::start(&["--host", "0.0.0.0", "--allowed-hosts", "wick.example.com"]).await;
    let (status, _) = post_from_page(&listed, "/v1/completions", &body, &rebound_host).await;
    assert_eq!(status, 200);
    let (status, _) = post_from_page(
        &listed,
        "/v1/completions",
        &body,
        &[("host", "other.example")],
    )
    .await;
    assert_eq!(status, 403);
}
