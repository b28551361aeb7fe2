//! `wick bench`: a load generator for any OpenAI-compatible server. It sends N streaming
//! requests at concurrency C (or a sweep of C), with a fixed output length, and reports time
//! to first token, inter-token latency and end-to-end latency (p50/p90/p99), output and total
//! tokens/s, and errors, as a table and as JSON; with a sweep it can draw an SVG plot.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{json, Value};

const BUILT_IN_PROMPTS: &[&str] = &[
    "Write a story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash map works, with an example.",
    "Describe the water cycle to a ten-year-old.",
    "Write a poem about autumn in a city.",
    "List the steps to bake bread at home, with tips.",
    "Explain the difference between a process and a thread.",
    "Tell me about the history of the bicycle.",
    "Write a letter to a friend about a trip to the mountains.",
];

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// `wick bench` options.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Base URL of the server (without /v1).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Model name; default: the first one /v1/models lists.
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, value_enum, default_value = "chat")]
    pub endpoint: Endpoint,
    /// Requests per concurrency level.
    #[arg(long, short = 'n', default_value_t = 32)]
    pub requests: usize,
    /// Requests in flight at once.
    #[arg(long, short = 'c', default_value_t = 1)]
    pub concurrency: usize,
    /// A sweep of concurrency levels (e.g. 1,4,16), instead of --concurrency.
    #[arg(long, value_delimiter = ',')]
    pub sweep: Option<Vec<usize>>,
    /// Output tokens per request.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Ask the server to ignore end-of-turn tokens (`ignore_eos`), so every request
    /// generates exactly --max-tokens. Servers that refuse it get max_tokens only.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub ignore_eos: bool,
    /// Prompts, one per line (default: built in).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    #[arg(long, env = "WICK_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// With --sweep, draw throughput and latency against concurrency as SVG here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// One request's measurements.
#[derive(Debug, Default)]
struct Sample {
    ttft: Option<f64>,
    itls: Vec<f64>,
    e2e: f64,
    output_tokens: usize,
    prompt_tokens: usize,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// The figures of one concurrency level.
#[derive(Debug, Serialize)]
pub struct Report {
    pub concurrency: usize,
    pub requests: usize,
    pub errors: usize,
    /// Up to three distinct error messages.
    pub error_messages: Vec<String>,
    pub duration_s: f64,
    pub output_tokens: usize,
    pub output_tokens_per_s: f64,
    pub total_tokens_per_s: f64,
    pub ttft_ms: Percentiles,
    pub itl_ms: Percentiles,
    pub e2e_ms: Percentiles,
}

fn percentiles(mut v: Vec<f64>) -> Percentiles {
    if v.is_empty() {
        return Percentiles {
            p50: f64::NAN,
            p90: f64::NAN,
            p99: f64::NAN,
        };
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize] * 1e3;
    Percentiles {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
    }
}

struct Client {
    http: reqwest::Client,
    args_url: String,
    model: String,
    endpoint: Endpoint,
    max_tokens: usize,
    ignore_eos: bool,
    api_key: Option<String>,
}

impl Client {
    fn request(&self, prompt: &str) -> reqwest::RequestBuilder {
        let (path, mut body) = match self.endpoint {
            Endpoint::Chat => (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": prompt}]}),
            ),
            Endpoint::Completions => ("/v1/completions", json!({"prompt": prompt})),
        };
        body["model"] = json!(self.model);
        body["max_tokens"] = json!(self.max_tokens);
        body["temperature"] = json!(0);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        if self.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        let mut r = self
            .http
            .post(format!("{}{path}", self.args_url))
            .json(&body);
        if let Some(k) = &self.api_key {
            r = r.bearer_auth(k);
        }
        r
    }

    async fn run(&self, prompt: &str) -> Sample {
        let start = Instant::now();
        let mut s = Sample::default();
        let resp = match self.request(prompt).send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                s.error = Some(format!(
                    "{status}: {}",
                    text.chars().take(200).collect::<String>()
                ));
                return s;
            }
            Err(e) => {
                s.error = Some(e.to_string());
                return s;
            }
        };
        let mut last: Option<Instant> = None;
        let mut buf = String::new();
        let mut bytes = resp.bytes_stream();
        while let Some(chunk) = bytes.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    s.error = Some(e.to_string());
                    break;
                }
            };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else {
                    continue;
                };
                if data == "[DONE]" {
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else {
                    continue;
                };
                if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
                    s.error = Some(e.to_string());
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    s.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
                    s.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
                }
                let has_text = v["choices"].as_array().is_some_and(|cs| {
                    cs.iter().any(|c| {
                        let t = c["delta"]["content"].as_str().or(c["text"].as_str());
                        t.is_some_and(|t| !t.is_empty())
                    })
                });
                if has_text {
                    let now = Instant::now();
                    match last {
                        None => s.ttft = Some((now - start).as_secs_f64()),
                        Some(t) => s.itls.push((now - t).as_secs_f64()),
                    }
                    last = Some(now);
                }
            }
        }
        s.e2e = start.elapsed().as_secs_f64();
        if s.output_tokens == 0 {
            s.output_tokens = s.itls.len() + s.ttft.is_some() as usize;
        }
        s
    }
}

async fn level(
    client: Arc<Client>,
    prompts: &[String],
    requests: usize,
    concurrency: usize,
    quiet: bool,
) -> Report {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(requests as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("c={msg} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(concurrency.to_string());
    let start = Instant::now();
    let samples: Vec<Sample> = futures::stream::iter(0..requests)
        .map(|i| {
            let client = Arc::clone(&client);
            let prompt = prompts[i % prompts.len()].clone();
            let bar = bar.clone();
            async move {
                let s = client.run(&prompt).await;
                bar.inc(1);
                s
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    bar.finish_and_clear();
    let duration = start.elapsed().as_secs_f64();
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.error.is_none()).collect();
    let output: usize = ok.iter().map(|s| s.output_tokens).sum();
    let prompt: usize = ok.iter().map(|s| s.prompt_tokens).sum();
    let mut error_messages: Vec<String> = Vec::new();
    for e in samples.iter().filter_map(|s| s.error.clone()) {
        if error_messages.len() < 3 && !error_messages.contains(&e) {
            error_messages.push(e);
        }
    }
    Report {
        concurrency,
        requests,
        errors: samples.len() - ok.len(),
        error_messages,
        duration_s: duration,
        output_tokens: output,
        output_tokens_per_s: output as f64 / duration,
        total_tokens_per_s: (output + prompt) as f64 / duration,
        ttft_ms: percentiles(ok.iter().filter_map(|s| s.ttft).collect()),
        itl_ms: percentiles(ok.iter().flat_map(|s| s.itls.iter().copied()).collect()),
        e2e_ms: percentiles(ok.iter().map(|s| s.e2e).collect()),
    }
}

fn print_table(reports: &[Report]) {
    println!(
        "{:>5} {:>5} {:>4} {:>10} {:>10} {:>24} {:>24} {:>24}",
        "conc",
        "reqs",
        "err",
        "out tok/s",
        "all tok/s",
        "TTFT ms p50/p90/p99",
        "ITL ms p50/p90/p99",
        "E2E ms p50/p90/p99"
    );
    let p = |x: &Percentiles| format!("{:.0}/{:.0}/{:.0}", x.p50, x.p90, x.p99);
    for r in reports {
        println!(
            "{:>5} {:>5} {:>4} {:>10.1} {:>10.1} {:>24} {:>24} {:>24}",
            r.concurrency,
            r.requests,
            r.errors,
            r.output_tokens_per_s,
            r.total_tokens_per_s,
            p(&r.ttft_ms),
            p(&r.itl_ms),
            p(&r.e2e_ms)
        );
    }
}

/// Throughput (left) and latency p50s (right) against concurrency, as a small SVG.
fn plot(reports: &[Report]) -> String {
    let (w, h, pad) = (360.0, 240.0, 40.0);
    let xs: Vec<f64> = reports
        .iter()
        .map(|r| (r.concurrency as f64).max(1.0).log2())
        .collect();
    let xmax = xs.iter().copied().fold(1.0, f64::max);
    let panel = |ox: f64, title: &str, series: &[(&str, &str, Vec<f64>)]| {
        let ymax = series
            .iter()
            .flat_map(|s| s.2.iter().copied())
            .filter(|v| v.is_finite())
            .fold(1.0, f64::max);
        let mut out = format!(
            r#"<g transform="translate({ox},0)"><rect x="{pad}" y="20" width="{}" height="{}" fill="none" stroke="gray"/><text x="{}" y="14" font-size="12" text-anchor="middle">{title}</text><text x="{pad}" y="{}" font-size="10">0</text><text x="{pad}" y="30" font-size="10">{ymax:.0}</text>"#,
            w - 2.0 * pad,
            h - pad - 20.0,
            w / 2.0,
            h - pad + 12.0
        );
        for (name, color, ys) in series {
            let pts: Vec<String> = xs
                .iter()
                .zip(ys)
                .map(|(x, y)| {
                    let px = pad + x / xmax * (w - 2.0 * pad);
                    let py = h - pad - y / ymax * (h - pad - 20.0);
                    format!("{px:.1},{py:.1}")
                })
                .collect();
            out.push_str(&format!(r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/><text x="{}" y="{}" font-size="10" fill="{color}">{name}</text>"#, pts.join(" "), w - pad - 60.0, 40.0 + 12.0 * series.iter().position(|s| s.0 == *name).unwrap_or(0) as f64));
        }
        for (r, x) in reports.iter().zip(&xs) {
            let px = pad + x / xmax * (w - 2.0 * pad);
            out.push_str(&format!(
                r#"<text x="{px:.1}" y="{}" font-size="10" text-anchor="middle">{}</text>"#,
                h - pad + 24.0,
                r.concurrency
            ));
        }
        out.push_str("</g>");
        out
    };
    let tput = panel(
        0.0,
        "tokens/s vs concurrency",
        &[
            (
                "output",
                "#1f77b4",
                reports.iter().map(|r| r.output_tokens_per_s).collect(),
            ),
            (
                "total",
                "#2ca02c",
                reports.iter().map(|r| r.total_tokens_per_s).collect(),
            ),
        ],
    );
    let lat = panel(
        w,
        "latency p50 (ms) vs concurrency",
        &[
            (
                "TTFT",
                "#d62728",
                reports.iter().map(|r| r.ttft_ms.p50).collect(),
            ),
            (
                "ITL",
                "#9467bd",
                reports.iter().map(|r| r.itl_ms.p50).collect(),
            ),
        ],
    );
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{h}" font-family="sans-serif">{tput}{lat}</svg>"#,
        2.0 * w
    )
}

pub async fn run(args: BenchArgs) -> anyhow::Result<Vec<Report>> {
    // A fresh connection per request: some servers close idle keep-alive connections, and a
    // reused one that was just closed fails the request before it is sent.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3600))
        .pool_max_idle_per_host(0)
        .build()
        .context("HTTP client")?;
    let url = args.url.trim_end_matches('/').to_string();
    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            let mut r = http.get(format!("{url}/v1/models"));
            if let Some(k) = &args.api_key {
                r = r.bearer_auth(k);
            }
            let v: Value = r
                .send()
                .await
                .context("GET /v1/models")?
                .json()
                .await
                .context("GET /v1/models")?;
            v["data"][0]["id"]
                .as_str()
                .context("/v1/models lists no model")?
                .to_string()
        }
    };
    let prompts: Vec<String> = match &args.prompts {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("read {}", p.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect(),
        None => BUILT_IN_PROMPTS.iter().map(|s| s.to_string()).collect(),
    };
    if prompts.is_empty() {
        bail!("no prompts");
    }
    let client = Arc::new(Client {
        http,
        args_url: url,
        model,
        endpoint: args.endpoint,
        max_tokens: args.max_tokens,
        ignore_eos: args.ignore_eos,
        api_key: args.api_key.clone(),
    });
    let levels = args.sweep.clone().unwrap_or_else(|| vec![args.concurrency]);
    let mut reports = Vec::new();
    for c in levels {
        reports.push(level(Arc::clone(&client), &prompts, args.requests, c, args.quiet).await);
    }
    print_table(&reports);
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&reports)?)
            .with_context(|| format!("write {}", p.display()))?;
    }
    if let Some(p) = &args.plot {
        std::fs::write(p, plot(&reports)).with_context(|| format!("write {}", p.display()))?;
    }
    Ok(reports)
}
