//! `wick soak`: a long, hostile load against a running server, then checks that it is still
//! whole. Requests are mixed (chat and completions, streamed and not, short and long prompts
//! and outputs); a share of clients disconnect at random points (before the answer, mid
//! prefill, mid stream) and a share send malformed requests. Afterwards: no 5xx, every
//! request that stayed answered to its end or told why (a 4xx, a 429, an error event), the
//! KV blocks used back to 0, and the server's resident memory grown by less than 5% between
//! the second thousand requests and the last.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};

/// `wick soak` options.
#[derive(Debug, Args)]
pub struct SoakArgs {
    /// Base URL of the server (without /v1).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Model name; default: the first one /v1/models lists.
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, short = 'n', default_value_t = 10_000)]
    pub requests: usize,
    #[arg(long, short = 'c', default_value_t = 64)]
    pub concurrency: usize,
    /// Share of clients that disconnect at a random point.
    #[arg(long, default_value_t = 0.2)]
    pub disconnect: f64,
    /// Share of requests with a malformed body, method or model.
    #[arg(long, default_value_t = 0.05)]
    pub malformed: f64,
    /// The server's process id, to sample its resident memory (Linux `/proc`).
    #[arg(long)]
    pub pid: Option<u32>,
    /// The server's KV cache reservation in bytes (its start-up line's kv_cache_mib): with
    /// it, the check is that resident memory plateaus, ending at most 5% over the resident
    /// memory before the first request plus this (a cache sized from memory is committed as
    /// its blocks are first used); without it, that it grows less than 5% after the second
    /// thousand requests.
    #[arg(long)]
    pub kv_cache_bytes: Option<u64>,
    /// Seed of the request mix.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// What happened to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    /// Answered to its end (a finish reason, `[DONE]` when streamed).
    Finished,
    /// Refused with a 4xx in the API's error shape (malformed on purpose).
    Refused,
    /// 429 with `Retry-After`: told to come back.
    RateLimited,
    /// Left on purpose before the end.
    Disconnected,
    /// Told why it ended early: an error event in the stream, or a 503 with a reason.
    ToldWhy,
    /// 5xx.
    ServerError,
    /// A well-formed request refused with a 4xx, a malformed one accepted, or an error body
    /// not in OpenAI's shape.
    Unexpected,
    /// A connection error or a stream that ended without a finish, `[DONE]` or an error.
    Broken,
}

#[derive(Debug, Serialize)]
pub struct SoakReport {
    requests: usize,
    seconds: f64,
    outcomes: std::collections::BTreeMap<String, usize>,
    /// Examples of each bad outcome.
    examples: Vec<String>,
    kv_blocks_used_after: f64,
    /// Resident memory (KiB) before the first request (the model loaded, the KV cache
    /// reserved but not yet touched).
    rss_start_kib: Option<u64>,
    /// Resident memory (KiB) after each thousand requests.
    rss_kib: Vec<u64>,
    /// With `--kv-cache-bytes`: the most resident memory may end at (KiB).
    rss_bound_kib: Option<u64>,
    /// Growth between the sample after the second thousand and the last, in percent.
    rss_growth_percent: Option<f64>,
    failures: Vec<String>,
}

/// A small deterministic generator per request (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

const WORDS: &[&str] = &[
    "lighthouse",
    "river",
    "engine",
    "quiet",
    "seven",
    "mountain",
    "because",
    "letter",
    "the",
    "a",
    "of",
    "bread",
    "thread",
    "winter",
    "city",
    "ocean",
    "explain",
    "why",
    "story",
    "map",
];

/// What one request does.
enum Plan {
    /// A well-formed generation request; `leave` says when its client disconnects.
    Good {
        path: &'static str,
        body: Value,
        leave: Option<Leave>,
    },
    /// A malformed request: method, path, body bytes.
    Bad {
        method: reqwest::Method,
        path: &'static str,
        body: Vec<u8>,
    },
}

enum Leave {
    /// Before the answer starts: the request future is dropped after this long.
    After(Duration),
    /// After this many stream events.
    Events(usize),
}

fn plan(seed: u64, i: usize, model: &str, args: &SoakArgs) -> Plan {
    let mut r = Rng(seed ^ (i as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
    if r.chance(args.malformed) {
        return malformed(&mut r, model);
    }
    // Prompts of 3 to ~600 words; outputs mostly short, some long.
    let words = match r.below(10) {
        0 => 200 + r.below(400),
        1..=3 => 20 + r.below(100),
        _ => 3 + r.below(20),
    };
    let prompt: Vec<&str> = (0..words)
        .map(|_| WORDS[r.below(WORDS.len() as u64) as usize])
        .collect();
    let prompt = prompt.join(" ");
    let max_tokens = match r.below(10) {
        0 => 64 + r.below(128),
        1..=4 => 8 + r.below(32),
        _ => 1 + r.below(8),
    };
    let stream = r.chance(0.5);
    let chat = r.chance(0.7);
    let (path, mut body) = if chat {
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": prompt}]}),
        )
    } else {
        ("/v1/completions", json!({"prompt": prompt}))
    };
    body["model"] = json!(model);
    body["max_tokens"] = json!(max_tokens);
    body["stream"] = json!(stream);
    if r.chance(0.5) {
        body["temperature"] = json!(0.8);
        body["seed"] = json!(r.below(1000));
    } else {
        body["temperature"] = json!(0);
    }
    let leave = r.chance(args.disconnect).then(|| {
        if stream && r.chance(0.7) {
            Leave::Events(r.below(12) as usize)
        } else {
            Leave::After(Duration::from_millis(r.below(400)))
        }
    });
    Plan::Good { path, body, leave }
}

fn malformed(r: &mut Rng, model: &str) -> Plan {
    let post = reqwest::Method::POST;
    let chat = "/v1/chat/completions";
    let json = |v: Value| serde_json::to_vec(&v).unwrap_or_default();
    let (method, path, body) = match r.below(10) {
        0 => (post, chat, b"{\"model\": ".to_vec()),
        1 => (
            post,
            chat,
            json(json!({"model": model, "messages": "hello"})),
        ),
        2 => (
            post,
            chat,
            json(
                json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}),
            ),
        ),
        3 => (
            post,
            chat,
            json(
                json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "temperature": 1e9}),
            ),
        ),
        4 => (
            post,
            chat,
            json(
                json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),
            ),
        ),
        5 => (
            post,
            chat,
            json(json!({"model": model, "messages": [{"role": "wizard", "content": "hi"}]})),
        ),
        6 => (
            post,
            "/v1/completions",
            json(json!({"model": model, "prompt": [4_000_000_000u64]})),
        ),
        7 => (reqwest::Method::GET, chat, Vec::new()),
        8 => (post, chat, vec![0xff, 0xfe, 0x00, 0x7b]),
        _ => (
            post,
            "/v1/completions",
            json(json!({"model": model, "prompt": "hi", "bogus_field": true})),
        ),
    };
    Plan::Bad { method, path, body }
}

/// Whether `v` is OpenAI's error object.
fn openai_error(v: &Value) -> bool {
    v["error"]["message"].is_string() && v["error"]["type"].is_string()
}

async fn run_one(http: &reqwest::Client, base: &str, plan: Plan) -> (Outcome, String) {
    match plan {
        Plan::Bad { method, path, body } => {
            let r = http
                .request(method, format!("{base}{path}"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            match r {
                Ok(r) => {
                    let status = r.status();
                    let v: Value = r.json().await.unwrap_or(Value::Null);
                    if status.is_server_error() {
                        (Outcome::ServerError, format!("{status} {v}"))
                    } else if status.is_client_error() && openai_error(&v) {
                        (Outcome::Refused, String::new())
                    } else {
                        (Outcome::Unexpected, format!("malformed got {status} {v}"))
                    }
                }
                Err(e) => (Outcome::Broken, format!("malformed: {e}")),
            }
        }
        Plan::Good { path, body, leave } => {
            let stream = body["stream"] == json!(true);
            let send = http.post(format!("{base}{path}")).json(&body).send();
            let events_limit = match leave {
                Some(Leave::After(d)) => {
                    return match tokio::time::timeout(d, good(send, stream, None)).await {
                        Ok(done) => done,
                        Err(_) => (Outcome::Disconnected, String::new()),
                    };
                }
                Some(Leave::Events(n)) => Some(n),
                None => None,
            };
            good(send, stream, events_limit).await
        }
    }
}

/// A well-formed request to its end (or to `leave_after` events).
async fn good(
    send: impl std::future::Future<Output = reqwest::Result<reqwest::Response>>,
    stream: bool,
    leave_after: Option<usize>,
) -> (Outcome, String) {
    let r = match send.await {
        Ok(r) => r,
        Err(e) => return (Outcome::Broken, e.to_string()),
    };
    let status = r.status();
    if !status.is_success() {
        let retry = r.headers().contains_key("retry-after");
        let v: Value = r.json().await.unwrap_or(Value::Null);
        return match status.as_u16() {
            429 if retry && openai_error(&v) => (Outcome::RateLimited, String::new()),
            503 if openai_error(&v) => (Outcome::ToldWhy, format!("{v}")),
            s if s >= 500 => (Outcome::ServerError, format!("{status} {v}")),
            _ => (Outcome::Unexpected, format!("{status} {v}")),
        };
    }
    if !stream {
        let v: Value = match r.json().await {
            Ok(v) => v,
            Err(e) => return (Outcome::Broken, e.to_string()),
        };
        return if v["choices"][0]["finish_reason"].is_string() {
            (Outcome::Finished, String::new())
        } else {
            (Outcome::Unexpected, format!("no finish_reason: {v}"))
        };
    }
    let mut bytes = r.bytes_stream();
    let mut buf = String::new();
    let (mut events, mut finished, mut done, mut error) = (0usize, false, false, None);
    while let Some(chunk) = bytes.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return (Outcome::Broken, format!("stream: {e}")),
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            events += 1;
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
            if openai_error(&v) {
                error = Some(v.to_string());
            }
            if v["choices"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["finish_reason"].is_string()))
            {
                finished = true;
            }
        }
        if leave_after.is_some_and(|n| events >= n) && !done {
            return (Outcome::Disconnected, String::new());
        }
    }
    match (done, finished, error) {
        (true, true, None) => (Outcome::Finished, String::new()),
        (_, _, Some(e)) if e.contains("server_error") => (Outcome::ServerError, e),
        (_, _, Some(e)) => (Outcome::ToldWhy, e),
        _ if leave_after.is_some() => (Outcome::Disconnected, String::new()),
        (d, f, None) => (
            Outcome::Broken,
            format!("stream ended: [DONE] {d}, finish {f}"),
        ),
    }
}

/// Resident memory of `pid`, KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The first sample of a metric in `/metrics` text whose name (and labels) start `query`.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub async fn run(args: SoakArgs) -> anyhow::Result<SoakReport> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let base = args.url.trim_end_matches('/').to_string();
    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            let v: Value = http
                .get(format!("{base}/v1/models"))
                .send()
                .await
                .context("GET /v1/models")?
                .json()
                .await?;
            v["data"][0]["id"]
                .as_str()
                .context("no model listed")?
                .to_string()
        }
    };
    let rss_start = args.pid.and_then(rss_kib);
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let results: Arc<Mutex<Vec<(Outcome, String)>>> = Arc::default();
    let rss: Arc<Mutex<Vec<u64>>> = Arc::default();
    let args = Arc::new(args);
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (http, base, model, args) = (http.clone(), base.clone(), model.clone(), args.clone());
        let (next, done, results, rss) = (next.clone(), done.clone(), results.clone(), rss.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= args.requests {
                    break;
                }
                let outcome = run_one(&http, &base, plan(args.seed, i, &model, &args)).await;
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(outcome);
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_multiple_of(1000) {
                    if let Some(kib) = args.pid.and_then(rss_kib) {
                        rss.lock().unwrap_or_else(|e| e.into_inner()).push(kib);
                    }
                    eprintln!("{n} requests, {:.0} s", started.elapsed().as_secs_f64());
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    // The server notices the last disconnects within a step or two: wait for it to be idle.
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = http
            .get(format!("{base}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let busy = [
            "wick_requests_running",
            "wick_requests_waiting",
            "wick_kv_cache_blocks_used",
        ]
        .iter()
        .any(|m| metric(&text, m).unwrap_or(0.0) > 0.0);
        if !busy || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let kv = metric(&text, "wick_kv_cache_blocks_used").unwrap_or(f64::NAN);
    let results = std::mem::take(&mut *results.lock().unwrap_or_else(|e| e.into_inner()));
    let rss = std::mem::take(&mut *rss.lock().unwrap_or_else(|e| e.into_inner()));
    let mut outcomes = std::collections::BTreeMap::new();
    let mut examples = Vec::new();
    for (o, detail) in &results {
        let key = serde_json::to_value(o)?.as_str().unwrap_or("?").to_string();
        let count = outcomes.entry(key.clone()).or_insert(0usize);
        *count += 1;
        let bad = matches!(
            o,
            Outcome::ServerError | Outcome::Unexpected | Outcome::Broken
        );
        if bad && examples.len() < 10 {
            examples.push(format!(
                "{key}: {}",
                detail.chars().take(300).collect::<String>()
            ));
        }
    }
    let rss_growth_percent = (rss.len() >= 3).then(|| {
        let (second, last) = (rss[1] as f64, rss[rss.len() - 1] as f64);
        (last - second) / second * 100.0
    });
    let count = |o: &str| outcomes.get(o).copied().unwrap_or(0);
    let mut failures = Vec::new();
    for bad in ["server_error", "unexpected", "broken"] {
        if count(bad) > 0 {
            failures.push(format!("{} requests {bad}", count(bad)));
        }
    }
    if kv != 0.0 {
        failures.push(format!("{kv} KV blocks still used"));
    }
    let rss_bound = args
        .kv_cache_bytes
        .zip(rss_start)
        .map(|(kv, start)| ((start + kv / 1024) as f64 * 1.05) as u64);
    match (rss_bound, rss.last()) {
        (Some(bound), Some(&last)) if last > bound => failures.push(format!(
            "resident memory ended at {} MiB, past {} MiB (before the first request) + the KV cache's {} MiB + 5%",
            last >> 10,
            rss_start.unwrap_or(0) >> 10,
            args.kv_cache_bytes.unwrap_or(0) >> 20
        )),
        (Some(_), _) => {}
        (None, _) => {
            if let Some(g) = rss_growth_percent.filter(|g| *g >= 5.0) {
                failures.push(format!("resident memory grew {g:.1}%"));
            }
        }
    }
    Ok(SoakReport {
        requests: results.len(),
        seconds,
        outcomes,
        examples,
        kv_blocks_used_after: kv,
        rss_start_kib: rss_start,
        rss_kib: rss,
        rss_bound_kib: rss_bound,
        rss_growth_percent,
        failures,
    })
}

/// Runs the soak, prints the report, and fails if a check failed.
pub async fn main(args: SoakArgs) -> anyhow::Result<()> {
    let json_path = args.json.clone();
    let report = run(args).await?;
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(p) = json_path {
        std::fs::write(&p, &text).with_context(|| format!("write {}", p.display()))?;
    }
    if !report.failures.is_empty() {
        bail!("soak failed: {}", report.failures.join("; "));
    }
    Ok(())
}
