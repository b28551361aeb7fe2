//! Starts the real `wick` binary on a free loopback port and talks HTTP to it.

use std::ffi::OsStr;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct Server {
    child: Child,
    pub base: String,
    pub client: reqwest::Client,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `wick serve`'s flags for `model` served as `name`, then `extra`. Tests run several servers
/// at once: each gets an explicit KV cache (1024 blocks) unless `extra` sizes it, rather than
/// a share of the machine's memory.
pub fn model_args(model: &std::path::Path, name: &str, extra: &[&str]) -> Vec<String> {
    let model = model.to_str().expect("UTF-8 model path");
    let mut args: Vec<String> = ["--model", model, "--served-model-name", name]
        .map(String::from)
        .to_vec();
    if !extra.iter().any(|a| a.starts_with("--kv-cache")) {
        args.extend(["--kv-cache-blocks".to_string(), "1024".to_string()]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

impl Server {
    /// Starts `wick serve` on the default model (as `smollm2`) with `extra` flags (see
    /// [`model_args`]); waits for `/health`.
    pub async fn start(extra: &[&str]) -> Server {
        Server::start_with(&model_args(&super::model_path(), "smollm2", extra), &[]).await
    }

    /// Starts `wick serve` with exactly `args` (and a free `--port`) and extra environment
    /// variables; waits for `/health`.
    pub async fn start_with<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Server {
        Server::start_logging(args, env, Stdio::inherit()).await
    }

    /// As [`Server::start_with`], its log (stderr) going to `log`.
    pub async fn start_logging<S: AsRef<OsStr>>(
        args: &[S],
        env: &[(&str, &str)],
        log: impl Into<Stdio>,
    ) -> Server {
        Server::start_after("", args, env, log).await
    }

    /// As [`Server::start_logging`], run by `sh` after the shell command `before` (which
    /// may, say, move the shell into a cgroup that `wick` then inherits).
    pub async fn start_after<S: AsRef<OsStr>>(
        before: &str,
        args: &[S],
        env: &[(&str, &str)],
        log: impl Into<Stdio>,
    ) -> Server {
        let port = free_port();
        let script = format!("{before}\nexec \"$0\" \"$@\"");
        let child = Command::new("sh")
            .args(["-c", &script, env!("CARGO_BIN_EXE_wick")])
            .arg("serve")
            .args(["--port", &port.to_string()])
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn wick");
        let mut server = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("wick exited during start-up: {status}");
            }
            if let Ok(r) = server.client.get(server.url("/health")).send().await {
                if r.status() == 200 {
                    return server;
                }
            }
            assert!(Instant::now() < deadline, "wick did not become healthy");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the process is still running.
    pub fn child_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM, as Kubernetes does to stop a pod.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits (up to `limit`) for the process to exit; its status.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "wick did not exit in {limit:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `GET path` as JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        let r = self.client.get(self.url(path)).send().await;
        let r = r.unwrap_or_else(|e| panic!("GET {path}: {e}"));
        r.json().await.unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub async fn post(&self, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url("/v1/chat/completions"))
            .json(body)
            .send()
            .await
            .expect("POST /v1/chat/completions")
    }

    /// POSTs `body` to `path`: the status and the JSON body.
    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_raw(&self, body: &str) -> reqwest::Response {
        self.client
            .post(self.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("POST /v1/chat/completions")
    }

    /// A non-streaming completion's JSON (asserting 200).
    pub async fn complete(&self, body: &Value) -> Value {
        let r = self.post(body).await;
        assert_eq!(r.status(), 200);
        r.json().await.expect("JSON body")
    }

    /// A streaming completion: every `data:` payload, in order, up to and including `[DONE]`.
    pub async fn stream(&self, body: &Value) -> Vec<String> {
        let r = self.post(body).await;
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let text = r.text().await.expect("SSE body");
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Waits (up to 20 s) until no request runs or waits and no KV block is used: the
    /// gauges are updated at the end of the engine's turn, just after a client's last event.
    pub async fn wait_idle(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let used = self.metric("wick_kv_cache_blocks_used").await;
            let running = self.metric("wick_requests_running").await;
            let waiting = self.metric("wick_requests_waiting").await;
            if used == 0.0 && running == 0.0 && waiting == 0.0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not idle: {used} blocks used, {running} running, {waiting} waiting"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A metric's value: the first sample of `query` (`name` or `name{label="v",...}`) whose
    /// labels include the query's (the server adds `model="..."` to every series).
    pub async fn metric(&self, query: &str) -> f64 {
        sample(&self.metrics().await, query)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A greedy chat request for one user message.
pub fn chat(content: &str, max_tokens: usize) -> Value {
    json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
    })
}

/// Concatenated content deltas of a stream, and its finish reason.
pub fn stream_text(events: &[String]) -> (String, Option<String>) {
    let mut text = String::new();
    let mut finish = None;
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let v: Value = serde_json::from_str(e).expect("chunk JSON");
        for c in v["choices"].as_array().unwrap() {
            if let Some(t) = c["delta"]["content"].as_str() {
                text.push_str(t);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    (text, finish)
}

impl Server {
    /// Each prompt's greedy output alone (one after another), then all of them at once as
    /// concurrent streams: the two lists, in prompt order.
    pub async fn solo_and_together(
        &self,
        prompts: &[String],
        max_tokens: usize,
    ) -> (Vec<String>, Vec<String>) {
        let mut solo = Vec::new();
        for p in prompts {
            let v = self.complete(&chat(p, max_tokens)).await;
            solo.push(
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        let runs = prompts.iter().map(|p| {
            let mut body = chat(p, max_tokens);
            body["stream"] = serde_json::json!(true);
            async move { stream_text(&self.stream(&body).await).0 }
        });
        (solo, futures::future::join_all(runs).await)
    }
}

/// Name and label pairs of `name{a="x",b="y"}` (or a bare name).
fn parse_series(s: &str) -> (&str, Vec<(String, String)>) {
    let Some((name, rest)) = s.split_once('{') else {
        return (s, Vec::new());
    };
    let labels = rest
        .trim_end_matches('}')
        .split(',')
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect();
    (name, labels)
}

/// The value of the first sample in a Prometheus text exposition that has the query's name
/// and at least its labels.
pub fn sample(text: &str, query: &str) -> f64 {
    let (qname, qlabels) = parse_series(query);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = parse_series(series);
            (name == qname && qlabels.iter().all(|q| labels.contains(q)))
                .then(|| value.parse().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("metric {query} missing"))
}
