//! Wick's one configuration: built-in defaults, overridden by a TOML file (`--config`),
//! overridden by `WICK_*` environment variables and command-line flags (clap reads both; a
//! flag beats its variable). `config/default.toml` documents every key.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;

/// `wick serve` options. Each is also a `WICK_*` environment variable and a config key.
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// TOML configuration file (see config/default.toml).
    #[arg(long, env = "WICK_CONFIG")]
    pub config: Option<PathBuf>,
    /// Model: a .gguf file; a Hugging Face directory (config.json, tokenizer.json,
    /// tokenizer_config.json, *.safetensors); a sentence-transformers directory (modules.json:
    /// served on /v1/embeddings); or a Hugging Face Hub repository `org/name`, downloaded
    /// into the Hub cache (HF_HOME; HF_HUB_OFFLINE=1 uses the cache only; HF_TOKEN for gated
    /// repositories). Repeat to serve several models from one process, each with its own
    /// engine and KV cache. [key: model.path, or [[models]]]
    #[arg(long, env = "WICK_MODEL")]
    pub model: Vec<PathBuf>,
    /// With a Hub repository: the .gguf file to use when it has several. [key: model.file]
    #[arg(long, env = "WICK_MODEL_FILE")]
    pub model_file: Option<String>,
    /// With a Hub repository: the branch, tag or commit. [key: model.revision]
    #[arg(long, env = "WICK_REVISION")]
    pub revision: Option<String>,
    /// A Jinja chat template file to use instead of the model's own (or for a model without
    /// one). [key: model.chat_template]
    #[arg(long, env = "WICK_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// Name clients use in `model` (default: the file or directory name); with several
    /// --model, repeat it in the same order. [key: model.served_model_name]
    #[arg(long, env = "WICK_SERVED_MODEL_NAME")]
    pub served_model_name: Vec<String>,
    /// cpu, cuda[:N] or metal[:N] (cuda and metal need the cargo feature of that name). [key: model.device]
    #[arg(long, env = "WICK_DEVICE")]
    pub device: Option<String>,
    /// GGUF linear weights: native (as stored), q8_0 or f32. [key: model.weight_format]
    #[arg(long, env = "WICK_WEIGHT_FORMAT")]
    pub weight_format: Option<String>,
    /// Activations and KV cache of a Hugging Face model: auto (f32 on the CPU, bf16 on a
    /// GPU), f32, bf16 or f16. GGUF models compute in f32. [key: model.dtype]
    #[arg(long, env = "WICK_DTYPE")]
    pub dtype: Option<String>,
    /// Require `Authorization: Bearer <key>` (or `x-api-key: <key>`) on the API (not on /health and /metrics). [key: server.api_key]
    #[arg(long, env = "WICK_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Web origins (scheme://host[:port]) whose pages may call the API, with CORS; comma-separated or repeated; * allows any. Requests from other origins get 403. [key: server.allowed_origins]
    #[arg(long, env = "WICK_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Host names (any port) or host:port accepted in the Host header beside loopback ones; comma-separated or repeated; * accepts any. Checked when listening on a loopback address, or on any address once given. [key: server.allowed_hosts]
    #[arg(long, env = "WICK_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// Address to listen on. [key: server.host]
    #[arg(long, env = "WICK_HOST")]
    pub host: Option<String>,
    /// Port to listen on. [key: server.port]
    #[arg(long, env = "WICK_PORT")]
    pub port: Option<u16>,
    /// Also serve /metrics alone on this port (on the same host); 0 means off. [key: server.metrics_port]
    #[arg(long, env = "WICK_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// Seconds that requests in flight get to finish after SIGTERM/SIGINT before they are
    /// ended with an error. [key: server.drain_timeout]
    #[arg(long, env = "WICK_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<f64>,
    /// Seconds an engine with work may go without a step beginning or ending before /health and /health/live turn 503 (a hung step), logged and counted; 0 means not watched. [key: server.step_timeout]
    #[arg(long, env = "WICK_STEP_TIMEOUT")]
    pub step_timeout: Option<f64>,
    /// Log format: human or json. [key: logging.format]
    #[arg(long, env = "WICK_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Log filter, e.g. info or wick_engine=debug,info (RUST_LOG, if set, wins). [key: logging.level]
    #[arg(long, env = "WICK_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Export traces (request and engine-step spans) over OTLP/HTTP to this endpoint, e.g.
    /// http://collector:4318/v1/traces; empty means off. [key: logging.otlp_endpoint]
    #[arg(long, env = "WICK_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Most sequences computed at once. [key: scheduler.max_num_seqs]
    #[arg(long, env = "WICK_MAX_NUM_SEQS")]
    pub max_num_seqs: Option<usize>,
    /// Most tokens computed in one engine step. [key: scheduler.max_num_batched_tokens]
    #[arg(long, env = "WICK_MAX_NUM_BATCHED_TOKENS")]
    pub max_num_batched_tokens: Option<usize>,
    /// Positions per KV cache block. [key: scheduler.block_size]
    #[arg(long, env = "WICK_BLOCK_SIZE")]
    pub block_size: Option<usize>,
    /// KV cache size in blocks; default: sized from memory (--kv-cache-memory-fraction). [key: scheduler.kv_cache_blocks]
    #[arg(long, env = "WICK_KV_CACHE_BLOCKS")]
    pub kv_cache_blocks: Option<usize>,
    /// Without --kv-cache-blocks or --kv-cache-memory: the share of the memory available after loading (the host's, or the GPU's) the KV cache takes. [key: scheduler.kv_cache_memory_fraction]
    #[arg(long, env = "WICK_KV_CACHE_MEMORY_FRACTION")]
    pub kv_cache_memory_fraction: Option<f64>,
    /// Longest prompt plus output; 0 means the model's own limit. [key: scheduler.max_model_len]
    #[arg(long, env = "WICK_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// KV cache size as memory (e.g. 512MiB, 2GiB); overrides --kv-cache-blocks. [key: scheduler.kv_cache_memory]
    #[arg(long, env = "WICK_KV_CACHE_MEMORY")]
    pub kv_cache_memory: Option<String>,
    /// While streams decode, the share prompt chunks may add to a step's time (by the measured cost of steps); more when more prompts wait than streams decode. [key: scheduler.prefill_latency_share]
    #[arg(long, env = "WICK_PREFILL_LATENCY_SHARE")]
    pub prefill_latency_share: Option<f64>,
    /// Until steps are measured: while streams decode, prompt tokens per step per decoding stream; 0 means no limit. [key: scheduler.prefill_tokens_per_decode]
    #[arg(long, env = "WICK_PREFILL_TOKENS_PER_DECODE")]
    pub prefill_tokens_per_decode: Option<usize>,
    /// ... but at least this many prompt tokens per step. [key: scheduler.min_prefill_tokens_per_step]
    #[arg(long, env = "WICK_MIN_PREFILL_TOKENS_PER_STEP")]
    pub min_prefill_tokens_per_step: Option<usize>,
    /// Share the KV blocks of common prompt prefixes (true or false). [key: scheduler.enable_prefix_caching]
    #[arg(long, env = "WICK_ENABLE_PREFIX_CACHING", action = clap::ArgAction::Set)]
    pub enable_prefix_caching: Option<bool>,
    /// Requests accepted but not yet started before new ones get 429. [key: queue.max_waiting_requests]
    #[arg(long, env = "WICK_MAX_WAITING_REQUESTS")]
    pub max_waiting_requests: Option<usize>,
    /// Their prompt tokens, in all, before new ones get 429; 0 means no bound. [key: queue.max_waiting_prompt_tokens]
    #[arg(long, env = "WICK_MAX_WAITING_PROMPT_TOKENS")]
    pub max_waiting_prompt_tokens: Option<usize>,
    /// Seconds a request may wait to start before it gets 503; 0 means forever. [key: queue.max_queue_time]
    #[arg(long, env = "WICK_MAX_QUEUE_TIME")]
    pub max_queue_time: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: FileServer,
    #[serde(default)]
    model: FileModel,
    /// Several models, each with its own options (beating `[model]` and `[scheduler]`'s).
    #[serde(default)]
    models: Vec<FileModelEntry>,
    #[serde(default)]
    scheduler: FileScheduler,
    #[serde(default)]
    queue: FileQueue,
    #[serde(default)]
    logging: FileLogging,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLogging {
    format: Option<String>,
    level: Option<String>,
    otlp_endpoint: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    api_key: Option<String>,
    allowed_origins: Option<Vec<String>>,
    allowed_hosts: Option<Vec<String>>,
    host: Option<String>,
    port: Option<u16>,
    metrics_port: Option<u16>,
    drain_timeout: Option<f64>,
    step_timeout: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModel {
    path: Option<PathBuf>,
    file: Option<String>,
    revision: Option<String>,
    served_model_name: Option<String>,
    chat_template: Option<PathBuf>,
    device: Option<String>,
    weight_format: Option<String>,
    dtype: Option<String>,
}

/// One of `[[models]]`: a model's keys and its own scheduler sizes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModelEntry {
    path: Option<PathBuf>,
    file: Option<String>,
    revision: Option<String>,
    served_model_name: Option<String>,
    chat_template: Option<PathBuf>,
    device: Option<String>,
    weight_format: Option<String>,
    dtype: Option<String>,
    max_num_seqs: Option<usize>,
    kv_cache_blocks: Option<usize>,
    kv_cache_memory: Option<String>,
    max_model_len: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileScheduler {
    max_num_seqs: Option<usize>,
    max_num_batched_tokens: Option<usize>,
    block_size: Option<usize>,
    kv_cache_blocks: Option<usize>,
    kv_cache_memory: Option<String>,
    kv_cache_memory_fraction: Option<f64>,
    max_model_len: Option<usize>,
    enable_prefix_caching: Option<bool>,
    prefill_latency_share: Option<f64>,
    prefill_tokens_per_decode: Option<usize>,
    min_prefill_tokens_per_step: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileQueue {
    max_waiting_requests: Option<usize>,
    max_waiting_prompt_tokens: Option<usize>,
    max_queue_time: Option<f64>,
}

/// One model to serve, with its own options.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSettings {
    /// A path, or a Hub repository id (see [`crate::hub`]).
    pub model: PathBuf,
    pub model_file: Option<String>,
    pub revision: String,
    pub served_model_name: Option<String>,
    /// A chat template file that replaces the model's.
    pub chat_template: Option<PathBuf>,
    pub device: String,
    pub weight_format: String,
    pub dtype: String,
    pub max_num_seqs: usize,
    /// `None`: sized from memory.
    pub kv_cache_blocks: Option<usize>,
    /// Bytes of KV cache, when given as memory (it then sets the number of blocks).
    pub kv_cache_memory: Option<u64>,
    /// 0: the model's own limit.
    pub max_model_len: usize,
}

impl ModelSettings {
    /// The name clients put in `model`: `served_model_name`, else a Hub repository's id,
    /// else the GGUF file's stem or the model directory's name (as the loader names it).
    pub fn served_name(&self) -> String {
        if let Some(n) = &self.served_model_name {
            return n.clone();
        }
        let p = &self.model;
        if !p.exists() {
            return p.display().to_string();
        }
        let name = if p.is_dir() {
            p.file_name()
        } else {
            p.file_stem()
        };
        name.map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    }
}

/// The resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Every model served, at least one.
    pub models: Vec<ModelSettings>,
    pub api_key: Option<String>,
    /// Web origins whose pages may call the API.
    pub allowed_origins: Vec<String>,
    /// Host header names accepted beside the loopback ones.
    pub allowed_hosts: Vec<String>,
    pub host: String,
    pub port: u16,
    /// None: /metrics only on the main port.
    pub metrics_port: Option<u16>,
    /// Seconds.
    pub drain_timeout: f64,
    /// Seconds; 0: engines are not watched.
    pub step_timeout: f64,
    pub log_format: LogFormat,
    pub log_level: String,
    pub otlp_endpoint: Option<String>,
    pub max_num_batched_tokens: usize,
    pub block_size: usize,
    pub kv_cache_memory_fraction: f64,
    pub enable_prefix_caching: bool,
    pub prefill_latency_share: f64,
    pub prefill_tokens_per_decode: usize,
    pub min_prefill_tokens_per_step: usize,
    pub max_waiting_requests: usize,
    /// 0: no bound.
    pub max_waiting_prompt_tokens: usize,
    /// Seconds; 0: no limit.
    pub max_queue_time: f64,
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

impl Config {
    pub fn resolve(args: ServeArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        // The options every model gets unless its own entry says otherwise.
        let base = ModelSettings {
            model: PathBuf::new(),
            model_file: args.model_file.or(file.model.file),
            revision: args
                .revision
                .or(file.model.revision)
                .unwrap_or_else(|| "main".into()),
            served_model_name: None,
            chat_template: args.chat_template.or(file.model.chat_template),
            device: args
                .device
                .or(file.model.device)
                .unwrap_or_else(|| "cpu".into()),
            weight_format: args
                .weight_format
                .or(file.model.weight_format)
                .unwrap_or_else(|| "native".into()),
            dtype: args
                .dtype
                .or(file.model.dtype)
                .unwrap_or_else(|| "auto".into()),
            max_num_seqs: args
                .max_num_seqs
                .or(file.scheduler.max_num_seqs)
                .unwrap_or(32),
            kv_cache_blocks: args.kv_cache_blocks.or(file.scheduler.kv_cache_blocks),
            kv_cache_memory: args
                .kv_cache_memory
                .or(file.scheduler.kv_cache_memory)
                .map(|m| parse_bytes(&m))
                .transpose()?,
            max_model_len: args
                .max_model_len
                .or(file.scheduler.max_model_len)
                .unwrap_or(0),
        };
        let models = if !args.model.is_empty() {
            if args.served_model_name.len() > args.model.len() {
                bail!(
                    "{} --served-model-name for {} --model: give at most one name per model, in the same order",
                    args.served_model_name.len(),
                    args.model.len()
                );
            }
            // The file's [model] name, when no flag names any model, goes to the first.
            let names = if args.served_model_name.is_empty() {
                file.model.served_model_name.into_iter().collect()
            } else {
                args.served_model_name
            };
            let mut names = names.into_iter();
            args.model
                .into_iter()
                .map(|model| ModelSettings {
                    model,
                    served_model_name: names.next(),
                    ..base.clone()
                })
                .collect()
        } else {
            if args.served_model_name.len() > 1 {
                bail!("several --served-model-name need as many --model");
            }
            let first = file.model.path.map(|model| ModelSettings {
                model,
                served_model_name: args
                    .served_model_name
                    .into_iter()
                    .next()
                    .or(file.model.served_model_name),
                ..base.clone()
            });
            let entries = file
                .models
                .into_iter()
                .enumerate()
                .map(|(i, e)| {
                    let Some(model) = e.path else {
                        bail!("models[{i}] has no path");
                    };
                    Ok(ModelSettings {
                        model,
                        model_file: e.file.or(base.model_file.clone()),
                        revision: e.revision.unwrap_or(base.revision.clone()),
                        served_model_name: e.served_model_name,
                        chat_template: e.chat_template.or(base.chat_template.clone()),
                        device: e.device.unwrap_or(base.device.clone()),
                        weight_format: e.weight_format.unwrap_or(base.weight_format.clone()),
                        dtype: e.dtype.unwrap_or(base.dtype.clone()),
                        max_num_seqs: e.max_num_seqs.unwrap_or(base.max_num_seqs),
                        kv_cache_blocks: e.kv_cache_blocks.or(base.kv_cache_blocks),
                        kv_cache_memory: match e.kv_cache_memory {
                            Some(m) => Some(parse_bytes(&m)?),
                            None => base.kv_cache_memory,
                        },
                        max_model_len: e.max_model_len.unwrap_or(base.max_model_len),
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            first.into_iter().chain(entries).collect::<Vec<_>>()
        };
        if models.is_empty() {
            bail!("no model given: pass --model PATH (a .gguf file or a model directory), set WICK_MODEL, or model.path (or [[models]]) in the config file; `make serve` fetches the default model");
        }
        let cfg = Config {
            models,
            api_key: args
                .api_key
                .or(file.server.api_key)
                .filter(|k| !k.is_empty()),
            allowed_origins: list(args.allowed_origins, file.server.allowed_origins),
            allowed_hosts: list(args.allowed_hosts, file.server.allowed_hosts),
            host: args
                .host
                .or(file.server.host)
                .unwrap_or_else(|| "127.0.0.1".into()),
            port: args.port.or(file.server.port).unwrap_or(8080),
            metrics_port: args
                .metrics_port
                .or(file.server.metrics_port)
                .filter(|&p| p != 0),
            drain_timeout: args
                .drain_timeout
                .or(file.server.drain_timeout)
                .unwrap_or(30.0),
            step_timeout: args
                .step_timeout
                .or(file.server.step_timeout)
                .unwrap_or(60.0),
            log_format: args
                .log_format
                .or(file.logging.format)
                .map(|f| f.parse())
                .transpose()?
                .unwrap_or(LogFormat::Human),
            log_level: args
                .log_level
                .or(file.logging.level)
                .unwrap_or_else(|| "info".into()),
            otlp_endpoint: args
                .otlp_endpoint
                .or(file.logging.otlp_endpoint)
                .filter(|e| !e.is_empty()),
            max_num_batched_tokens: args
                .max_num_batched_tokens
                .or(file.scheduler.max_num_batched_tokens)
                .unwrap_or(512),
            block_size: args.block_size.or(file.scheduler.block_size).unwrap_or(16),
            kv_cache_memory_fraction: args
                .kv_cache_memory_fraction
                .or(file.scheduler.kv_cache_memory_fraction)
                .unwrap_or(0.5),
            enable_prefix_caching: args
                .enable_prefix_caching
                .or(file.scheduler.enable_prefix_caching)
                .unwrap_or(true),
            prefill_latency_share: args
                .prefill_latency_share
                .or(file.scheduler.prefill_latency_share)
                .unwrap_or(0.25),
            prefill_tokens_per_decode: args
                .prefill_tokens_per_decode
                .or(file.scheduler.prefill_tokens_per_decode)
                .unwrap_or(1),
            min_prefill_tokens_per_step: args
                .min_prefill_tokens_per_step
                .or(file.scheduler.min_prefill_tokens_per_step)
                .unwrap_or(32),
            max_waiting_requests: args
                .max_waiting_requests
                .or(file.queue.max_waiting_requests)
                .unwrap_or(256),
            max_waiting_prompt_tokens: args
                .max_waiting_prompt_tokens
                .or(file.queue.max_waiting_prompt_tokens)
                .unwrap_or(262_144),
            max_queue_time: args
                .max_queue_time
                .or(file.queue.max_queue_time)
                .unwrap_or(60.0),
        };
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> anyhow::Result<()> {
        let positive = [
            (
                "scheduler.max_num_batched_tokens",
                self.max_num_batched_tokens,
            ),
            ("scheduler.block_size", self.block_size),
            (
                "scheduler.min_prefill_tokens_per_step",
                self.min_prefill_tokens_per_step,
            ),
            ("queue.max_waiting_requests", self.max_waiting_requests),
        ];
        for (key, v) in positive {
            if v == 0 {
                bail!("{key} must be at least 1");
            }
        }
        let mut names = std::collections::HashSet::new();
        for m in &self.models {
            let name = m.served_name();
            if !names.insert(name.clone()) {
                bail!("two models are served as {name:?}: give each its own served_model_name");
            }
            for (key, v) in [
                ("scheduler.max_num_seqs", m.max_num_seqs),
                ("scheduler.kv_cache_blocks", m.kv_cache_blocks.unwrap_or(1)),
            ] {
                if v == 0 {
                    bail!("{key} must be at least 1 (model {name:?})");
                }
            }
            if wick_runner::parse_dtype(&m.dtype).is_err() {
                bail!(
                    "model.dtype must be auto, f32, bf16 or f16, not {:?} (model {name:?})",
                    m.dtype
                );
            }
            if let Some(t) = &m.chat_template {
                if !t.is_file() {
                    bail!(
                        "model.chat_template: {} is not a readable file",
                        t.display()
                    );
                }
            }
            if m.kv_cache_memory == Some(0) {
                bail!("scheduler.kv_cache_memory must be more than 0");
            }
        }
        if !(self.drain_timeout >= 0.0 && self.drain_timeout.is_finite()) {
            bail!("server.drain_timeout must be a number of seconds, 0 or more");
        }
        if let Some(o) = self
            .allowed_origins
            .iter()
            .find(|o| !wick_server::is_origin(o))
        {
            bail!("server.allowed_origins: {o:?} is not an origin (scheme://host[:port] as browsers send it, with no path; null; or *)");
        }
        if let Some(h) = self
            .allowed_hosts
            .iter()
            .find(|h| h.is_empty() || h.contains('/'))
        {
            bail!("server.allowed_hosts: {h:?} is not a host name (name, name:port or *)");
        }
        if !(self.step_timeout >= 0.0 && self.step_timeout.is_finite()) {
            bail!("server.step_timeout must be a number of seconds, 0 or more");
        }
        if let Some(e) = &self.otlp_endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                bail!("logging.otlp_endpoint must be an http:// or https:// URL, not {e:?}");
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            bail!("logging.level: {:?} is not a log filter (try info, debug or wick_engine=debug,info)", self.log_level);
        }
        if !(self.max_queue_time >= 0.0 && self.max_queue_time.is_finite()) {
            bail!("queue.max_queue_time must be a number of seconds, 0 or more");
        }
        let share = self.prefill_latency_share;
        if !(share > 0.0 && share.is_finite()) {
            bail!("scheduler.prefill_latency_share must be a number more than 0");
        }
        let f = self.kv_cache_memory_fraction;
        if !(f > 0.0 && f <= 1.0) {
            bail!("scheduler.kv_cache_memory_fraction must be more than 0 and at most 1");
        }
        Ok(())
    }
}

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "human" | "text" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            other => bail!("logging.format must be human or json, not {other:?}"),
        }
    }
}

/// A list from the flags (or their variable), else the file's; blanks dropped.
fn list(flags: Vec<String>, file: Option<Vec<String>>) -> Vec<String> {
    let items = if flags.is_empty() {
        file.unwrap_or_default()
    } else {
        flags
    };
    items
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// `"512MiB"`, `"2GiB"`, `"1.5GB"` or a plain number of bytes.
fn parse_bytes(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("scheduler.kv_cache_memory: {text:?} is not a size"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => bail!("scheduler.kv_cache_memory: unknown unit {other:?} (use MiB, GiB, MB, GB)"),
    };
    Ok((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn flags_beat_file_beat_defaults() {
        let f = file("[model]\npath = \"a.gguf\"\n[server]\nport = 9000\nhost = \"0.0.0.0\"\n[scheduler]\nmax_num_seqs = 4\n");
        let cfg = Config::resolve(ServeArgs {
            config: Some(f.path().into()),
            port: Some(9100),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.models.len(), 1);
        assert_eq!(cfg.models[0].model, PathBuf::from("a.gguf"));
        assert_eq!(cfg.port, 9100);
        assert_eq!(cfg.host, "0.0.0.0");
        assert_eq!(cfg.models[0].max_num_seqs, 4);
        assert_eq!(cfg.block_size, 16);
    }

    #[test]
    fn the_shipped_default_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/default.toml");
        let cfg = Config::resolve(ServeArgs {
            config: Some(path),
            model: vec!["m.gguf".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.port, 8080);
        assert_eq!(cfg.models[0].kv_cache_blocks, None);
        assert_eq!(cfg.kv_cache_memory_fraction, 0.5);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let f = file("[scheduler]\nmax_num_seq = 4\n");
        let err = Config::resolve(ServeArgs {
            config: Some(f.path().into()),
            model: vec!["m".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("max_num_seq"), "{err:#}");
        let err = Config::resolve(ServeArgs {
            model: vec!["m".into()],
            block_size: Some(0),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("scheduler.block_size"));
        assert!(Config::resolve(ServeArgs::default()).is_err());
    }

    #[test]
    fn several_models_from_flags_or_the_file_each_with_its_options() {
        let cfg = Config::resolve(ServeArgs {
            model: vec!["chat.gguf".into(), "minilm".into()],
            served_model_name: vec!["chat".into()],
            max_num_seqs: Some(8),
            ..Default::default()
        })
        .unwrap();
        let names: Vec<String> = cfg.models.iter().map(ModelSettings::served_name).collect();
        assert_eq!(names, ["chat", "minilm"]);
        assert!(cfg.models.iter().all(|m| m.max_num_seqs == 8));
        let f = file(
            "[model]\npath = \"a.gguf\"\nserved_model_name = \"a\"\n[scheduler]\nmax_num_seqs = 4\n\
             [[models]]\npath = \"b.gguf\"\nserved_model_name = \"b\"\nkv_cache_blocks = 64\nmax_num_seqs = 2\n\
             [[models]]\npath = \"e\"\nserved_model_name = \"e\"\n",
        );
        let cfg = Config::resolve(ServeArgs {
            config: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap();
        let got: Vec<(String, usize, Option<usize>)> = cfg
            .models
            .iter()
            .map(|m| (m.served_name(), m.max_num_seqs, m.kv_cache_blocks))
            .collect();
        assert_eq!(
            got,
            [
                ("a".to_string(), 4, None),
                ("b".to_string(), 2, Some(64)),
                ("e".to_string(), 4, None)
            ]
        );
        // Two models under one name, and more names than models, are refused.
        let err = Config::resolve(ServeArgs {
            model: vec!["x.gguf".into(), "y.gguf".into()],
            served_model_name: vec!["m".into(), "m".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("two models are served as"),
            "{err}"
        );
        assert!(Config::resolve(ServeArgs {
            model: vec!["m.gguf".into()],
            served_model_name: vec!["a".into(), "b".into()],
            ..Default::default()
        })
        .is_err());
    }

    #[test]
    fn browser_lists_from_flags_or_the_file_and_bad_origins_are_named() {
        let f = file(
            "[server]\nallowed_origins = [\"https://a.example\"]\nallowed_hosts = [\"wick.lan\"]\n",
        );
        let from_file = Config::resolve(ServeArgs {
            config: Some(f.path().into()),
            model: vec!["m.gguf".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(from_file.allowed_origins, ["https://a.example"]);
        assert_eq!(from_file.allowed_hosts, ["wick.lan"]);
        let flags = Config::resolve(ServeArgs {
            config: Some(f.path().into()),
            model: vec!["m.gguf".into()],
            allowed_origins: vec!["http://b.example:3000".into(), " ".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(flags.allowed_origins, ["http://b.example:3000"]);
        let err = Config::resolve(ServeArgs {
            model: vec!["m.gguf".into()],
            allowed_origins: vec!["b.example".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("server.allowed_origins"), "{err}");
    }

    #[test]
    fn memory_sizes_parse() {
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("2 GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
    }
}
