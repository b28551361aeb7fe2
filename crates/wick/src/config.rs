//! Wick's one configuration. Every setting is one field of a section struct below
//! ([`ServerSection`], [`ModelSection`], [`SchedulerSection`], [`QueueSection`],
//! [`LoggingSection`]): its doc comment is its `--help`, its `#[arg]` its flag, its `WICK_*`
//! variable and its default, and the same field, by name, is its key in the TOML file
//! (`[section] key`). `config/default.toml` documents every key (a test holds it to the
//! defaults here).
//!
//! Layers, lowest first: the defaults, the TOML file (`--config`), the variables and flags
//! that were given (a flag beats its variable). [`Config::resolve`] merges them in one place
//! and deserializes the result once into the same typed sections; `[[models]]` entries take
//! `[model]`'s and `[scheduler]`'s keys, over those sections. Unknown keys and bad values stop
//! start-up naming them (exit 2).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::time::Duration;

use wick_core::QueueLimits;
use wick_runner::{DTypeSpec, DeviceSpec, KvSizing, WeightFormat};
use wick_scheduler::SchedulerConfig;

/// `wick serve` options: the model list, the config file, and every section's settings.
#[derive(Debug, Args)]
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
    /// Name clients use in `model` (default: the file or directory name); with several
    /// --model, repeat it in the same order. [key: model.served_model_name]
    #[arg(long, env = "WICK_SERVED_MODEL_NAME")]
    pub served_model_name: Vec<String>,
    #[command(flatten)]
    pub settings: Settings,
}

/// The configuration file's shape, and the flags' (each section's fields are flags).
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[command(flatten)]
    pub server: ServerSection,
    #[command(flatten)]
    pub model: ModelSection,
    /// Several models, each a table of `[model]`'s and `[scheduler]`'s keys (file only).
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<Map<String, Value>>,
    #[command(flatten)]
    pub scheduler: SchedulerSection,
    #[command(flatten)]
    pub queue: QueueSection,
    #[command(flatten)]
    pub logging: LoggingSection,
}

/// `[server]`: the listener, access and shutdown.
#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
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
    #[arg(long, env = "WICK_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on. [key: server.port]
    #[arg(long, env = "WICK_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Also serve /metrics alone on this port (on the same host); 0 means off. [key: server.metrics_port]
    #[arg(long, env = "WICK_METRICS_PORT", default_value_t = 0)]
    pub metrics_port: u16,
    /// Seconds that requests in flight get to finish after SIGTERM/SIGINT before they are
    /// ended with an error. [key: server.drain_timeout]
    #[arg(long, env = "WICK_DRAIN_TIMEOUT", default_value_t = 30.0)]
    pub drain_timeout: f64,
    /// Seconds an engine with work may go without a step beginning or ending before /health and /health/live turn 503 (a hung step), logged and counted; 0 means not watched. [key: server.step_timeout]
    #[arg(long, env = "WICK_STEP_TIMEOUT", default_value_t = 60.0)]
    pub step_timeout: f64,
}

/// `[model]`, and each `[[models]]` entry: what to load and how.
#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The model (the flag is --model, repeatable).
    #[arg(skip)]
    pub path: Option<PathBuf>,
    /// With a Hub repository: the .gguf file to use when it has several. [key: model.file]
    #[arg(long = "model-file", env = "WICK_MODEL_FILE")]
    pub file: Option<String>,
    /// With a Hub repository: the branch, tag or commit. [key: model.revision]
    #[arg(long, env = "WICK_REVISION", default_value = "main")]
    pub revision: String,
    /// The name clients use (the flag is --served-model-name, repeatable).
    #[arg(skip)]
    pub served_model_name: Option<String>,
    /// A Jinja chat template file to use instead of the model's own (or for a model without
    /// one). [key: model.chat_template]
    #[arg(long, env = "WICK_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// cpu, cuda[:N] or metal[:N] (cuda and metal need the cargo feature of that name). [key: model.device]
    #[arg(long, env = "WICK_DEVICE", default_value = "cpu")]
    #[serde(with = "text")]
    pub device: DeviceSpec,
    /// GGUF linear weights: native (as stored), q8_0 or f32. [key: model.weight_format]
    #[arg(long, env = "WICK_WEIGHT_FORMAT", default_value = "native")]
    #[serde(with = "text")]
    pub weight_format: WeightFormat,
    /// Activations and KV cache of a Hugging Face model: auto (f32 on the CPU, bf16 on a
    /// GPU), f32, bf16 or f16. GGUF models compute in f32. [key: model.dtype]
    #[arg(long, env = "WICK_DTYPE", default_value = "auto")]
    #[serde(with = "text")]
    pub dtype: DTypeSpec,
    /// Output tokens a request may generate when it sets no max_tokens (max_completion_tokens,
    /// max_output_tokens); never more than the context leaves; 0 means the context's remainder. [key: model.max_tokens_default]
    #[arg(long, env = "WICK_MAX_TOKENS_DEFAULT", default_value_t = 0)]
    pub max_tokens_default: usize,
}

/// `[scheduler]`: batching and the KV cache (each `[[models]]` entry may set its own).
#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSection {
    /// Most sequences computed at once. [key: scheduler.max_num_seqs]
    #[arg(long, env = "WICK_MAX_NUM_SEQS", default_value_t = 32)]
    pub max_num_seqs: usize,
    /// Most tokens computed in one engine step. [key: scheduler.max_num_batched_tokens]
    #[arg(long, env = "WICK_MAX_NUM_BATCHED_TOKENS", default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    /// Positions per KV cache block. [key: scheduler.block_size]
    #[arg(long, env = "WICK_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// KV cache size in blocks; default: sized from memory (--kv-cache-memory-fraction). [key: scheduler.kv_cache_blocks]
    #[arg(long, env = "WICK_KV_CACHE_BLOCKS")]
    pub kv_cache_blocks: Option<usize>,
    /// KV cache size as memory (e.g. 512MiB, 2GiB); overrides --kv-cache-blocks. [key: scheduler.kv_cache_memory]
    #[arg(long, env = "WICK_KV_CACHE_MEMORY")]
    #[serde(with = "opt_text", default)]
    pub kv_cache_memory: Option<ByteSize>,
    /// Without --kv-cache-blocks or --kv-cache-memory: the share of the memory available after loading (the host's, or the GPU's) the KV cache takes. [key: scheduler.kv_cache_memory_fraction]
    #[arg(long, env = "WICK_KV_CACHE_MEMORY_FRACTION", default_value_t = 0.5)]
    pub kv_cache_memory_fraction: f64,
    /// Longest prompt plus output; 0 means the model's own limit. [key: scheduler.max_model_len]
    #[arg(long, env = "WICK_MAX_MODEL_LEN", default_value_t = 0)]
    pub max_model_len: usize,
    /// Share the KV blocks of common prompt prefixes (true or false). [key: scheduler.enable_prefix_caching]
    #[arg(long, env = "WICK_ENABLE_PREFIX_CACHING", action = clap::ArgAction::Set, default_value_t = true)]
    pub enable_prefix_caching: bool,
    /// While streams decode, the share prompt chunks may add to a step's time (by the measured cost of steps); more when more prompts wait than streams decode. [key: scheduler.prefill_latency_share]
    #[arg(long, env = "WICK_PREFILL_LATENCY_SHARE", default_value_t = 0.25)]
    pub prefill_latency_share: f64,
    /// Until steps are measured: while streams decode, prompt tokens per step per decoding stream; 0 means no limit. [key: scheduler.prefill_tokens_per_decode]
    #[arg(long, env = "WICK_PREFILL_TOKENS_PER_DECODE", default_value_t = 1)]
    pub prefill_tokens_per_decode: usize,
    /// ... but at least this many prompt tokens per step. [key: scheduler.min_prefill_tokens_per_step]
    #[arg(long, env = "WICK_MIN_PREFILL_TOKENS_PER_STEP", default_value_t = 32)]
    pub min_prefill_tokens_per_step: usize,
}

/// `[queue]`: admission (429 and 503 bounds).
#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSection {
    /// Requests accepted but not yet started before new ones get 429. [key: queue.max_waiting_requests]
    #[arg(long, env = "WICK_MAX_WAITING_REQUESTS", default_value_t = 256)]
    pub max_waiting_requests: usize,
    /// Their prompt tokens, in all, before new ones get 429; 0 means no bound. [key: queue.max_waiting_prompt_tokens]
    #[arg(
        long,
        env = "WICK_MAX_WAITING_PROMPT_TOKENS",
        default_value_t = 262_144
    )]
    pub max_waiting_prompt_tokens: usize,
    /// Seconds a request may wait to start before it gets 503; 0 means forever. [key: queue.max_queue_time]
    #[arg(long, env = "WICK_MAX_QUEUE_TIME", default_value_t = 60.0)]
    pub max_queue_time: f64,
}

/// `[logging]`: log lines and traces.
#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingSection {
    /// Log format: human or json. [key: logging.format]
    #[arg(long = "log-format", env = "WICK_LOG_FORMAT", default_value = "human")]
    #[serde(with = "text")]
    pub format: LogFormat,
    /// Log filter, e.g. info or wick_engine=debug,info (RUST_LOG, if set, wins). [key: logging.level]
    #[arg(long = "log-level", env = "WICK_LOG_LEVEL", default_value = "info")]
    pub level: String,
    /// Export traces (request and engine-step spans) over OTLP/HTTP to this endpoint, e.g.
    /// http://collector:4318/v1/traces; empty means off. [key: logging.otlp_endpoint]
    #[arg(long, env = "WICK_OTLP_ENDPOINT", default_value = "")]
    pub otlp_endpoint: String,
}

/// One model to serve: where it is, and its own `[model]` and `[scheduler]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSettings {
    /// A path, or a Hub repository id (see [`crate::hub`]).
    pub path: PathBuf,
    pub model: ModelSection,
    pub scheduler: SchedulerSection,
}

impl ModelSettings {
    /// The name clients put in `model`: `served_model_name`, else a Hub repository's id,
    /// else the GGUF file's stem or the model directory's name (as the loader names it).
    pub fn served_name(&self) -> String {
        if let Some(n) = &self.model.served_model_name {
            return n.clone();
        }
        let p = &self.path;
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

/// The resolved configuration: the sections, typed, and the models with their own.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Every model served, at least one.
    pub models: Vec<ModelSettings>,
    pub server: ServerSection,
    pub queue: QueueSection,
    pub logging: LoggingSection,
}

impl ServerSection {
    /// `None`: /metrics only on the main port.
    pub fn metrics_port(&self) -> Option<u16> {
        (self.metrics_port != 0).then_some(self.metrics_port)
    }

    /// `None`: engines are not watched.
    pub fn step_timeout(&self) -> Option<Duration> {
        (self.step_timeout > 0.0).then(|| Duration::from_secs_f64(self.step_timeout))
    }
}

impl QueueSection {
    /// `None`: no limit.
    pub fn max_queue_time(&self) -> Option<Duration> {
        (self.max_queue_time > 0.0).then(|| Duration::from_secs_f64(self.max_queue_time))
    }

    pub fn limits(&self) -> QueueLimits {
        QueueLimits {
            max_waiting_requests: self.max_waiting_requests,
            max_waiting_prompt_tokens: self.max_waiting_prompt_tokens,
        }
    }
}

impl LoggingSection {
    /// `None`: no export.
    pub fn otlp_endpoint(&self) -> Option<&str> {
        Some(self.otlp_endpoint.as_str()).filter(|e| !e.is_empty())
    }
}

impl SchedulerSection {
    /// The scheduler's configuration (`num_blocks` is set once the model is loaded and the
    /// KV cache sized).
    pub fn scheduler_config(&self) -> SchedulerConfig {
        SchedulerConfig {
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            block_size: self.block_size,
            num_blocks: self.kv_cache_blocks.unwrap_or(1),
            max_model_len: match self.max_model_len {
                0 => usize::MAX,
                n => n,
            },
            enable_prefix_caching: self.enable_prefix_caching,
            prefill_latency_share: self.prefill_latency_share,
            prefill_tokens_per_decode: self.prefill_tokens_per_decode,
            min_prefill_tokens_per_step: self.min_prefill_tokens_per_step,
        }
    }

    /// How the KV cache is sized, its memory share split between `generation_models`.
    pub fn kv_sizing(&self, generation_models: usize) -> KvSizing {
        KvSizing {
            blocks: self.kv_cache_blocks,
            memory: self.kv_cache_memory.map(|b| b.0),
            fraction: self.kv_cache_memory_fraction / generation_models.max(1) as f64,
            block_size: self.block_size,
            max_num_seqs: self.max_num_seqs,
            max_model_len: self.max_model_len,
        }
    }
}

/// The file as a JSON value (its sections and keys are checked when merged).
fn read_file(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?;
    Ok(serde_json::to_value(table)?)
}

/// `wick serve`'s command with no environment variables behind its flags.
fn command_without_env() -> clap::Command {
    ServeArgs::augment_args(clap::Command::new("serve")).mut_args(|a| a.env(None::<&str>))
}

/// Every setting at its default, as the file's shape.
fn defaults() -> anyhow::Result<Value> {
    let matches = command_without_env().try_get_matches_from(["serve"])?;
    Ok(serde_json::to_value(
        ServeArgs::from_arg_matches(&matches)?.settings,
    )?)
}

/// The settings a flag or a variable gave (not those at their default).
fn given(settings: &Settings, matches: &ArgMatches) -> anyhow::Result<Value> {
    let mut all = serde_json::to_value(settings)?;
    if let Value::Object(sections) = &mut all {
        sections.retain(|_, v| v.is_object());
        for section in sections.values_mut() {
            if let Value::Object(keys) = section {
                keys.retain(|key, _| {
                    matches.ids().any(|id| id.as_str() == key)
                        && matches!(
                            matches.value_source(key),
                            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                        )
                });
            }
        }
    }
    Ok(all)
}

/// `top` over `base`: tables merged key by key, anything else replaced.
fn overlay(base: &mut Value, top: Value) {
    match (base, top) {
        (Value::Object(b), Value::Object(t)) => {
            for (k, v) in t {
                match b.get_mut(&k) {
                    Some(slot) if slot.is_object() && v.is_object() => overlay(slot, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, t) => *b = t,
    }
}

/// `T` from `value`, or an error naming the key (`scheduler.max_num_seqs: ...`).
fn typed<T: serde::de::DeserializeOwned>(value: Value, at: &str) -> anyhow::Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let key = match (at, path.as_str()) {
            (_, ".") | (_, "") => at.to_string(),
            ("", p) => p.to_string(),
            (a, p) => format!("{a}.{p}"),
        };
        anyhow::anyhow!("{key}: {}", e.inner())
    })
}

impl Config {
    /// `wick serve`'s flags (and the matches they were read from, which say what was given)
    /// over the file over the defaults.
    pub fn resolve(args: ServeArgs, matches: &ArgMatches) -> anyhow::Result<Self> {
        let mut merged = defaults()?;
        if let Some(path) = &args.config {
            overlay(&mut merged, read_file(path)?);
        }
        overlay(&mut merged, given(&args.settings, matches)?);
        let settings: Settings = typed(merged, "").with_context(|| match &args.config {
            Some(p) => format!("invalid config file {}", p.display()),
            None => "invalid settings".into(),
        })?;
        let cfg = Self::from_settings(settings, args.model, args.served_model_name)?;
        cfg.check()?;
        Ok(cfg)
    }

    /// `wick serve`'s flags as words, without reading `WICK_*` variables.
    #[cfg(test)]
    pub fn from_flags<I, T>(words: I) -> anyhow::Result<Self>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let words = std::iter::once("serve".into()).chain(words.into_iter().map(Into::into));
        let matches = command_without_env().try_get_matches_from(words)?;
        Self::resolve(ServeArgs::from_arg_matches(&matches)?, &matches)
    }

    /// The models from the flags, or else from the file's `[model]` and `[[models]]`.
    fn from_settings(
        settings: Settings,
        paths: Vec<PathBuf>,
        names: Vec<String>,
    ) -> anyhow::Result<Self> {
        let Settings {
            mut server,
            model: base,
            models: entries,
            scheduler,
            queue,
            logging,
        } = settings;
        let with = |path: PathBuf, served_model_name: Option<String>| ModelSettings {
            path,
            model: ModelSection {
                path: None,
                served_model_name,
                ..base.clone()
            },
            scheduler: scheduler.clone(),
        };
        let models = if !paths.is_empty() {
            if names.len() > paths.len() {
                bail!(
                    "{} --served-model-name for {} --model: give at most one name per model, in the same order",
                    names.len(),
                    paths.len()
                );
            }
            // The file's [model] name, when no flag names any model, goes to the first.
            let names = if names.is_empty() {
                base.served_model_name.clone().into_iter().collect()
            } else {
                names
            };
            let mut names = names.into_iter();
            paths.into_iter().map(|p| with(p, names.next())).collect()
        } else {
            if names.len() > 1 {
                bail!("several --served-model-name need as many --model");
            }
            let first = base.path.clone().map(|p| {
                let name = names.into_iter().next().or(base.served_model_name.clone());
                with(p, name)
            });
            let mut all: Vec<ModelSettings> = first.into_iter().collect();
            for (i, entry) in entries.into_iter().enumerate() {
                all.push(model_entry(i, entry, &base, &scheduler)?);
            }
            all
        };
        if models.is_empty() {
            bail!("no model given: pass --model PATH (a .gguf file or a model directory), set WICK_MODEL, or model.path (or [[models]]) in the config file; `make serve` fetches the default model");
        }
        server.api_key = server.api_key.filter(|k| !k.is_empty());
        server.allowed_origins = trimmed(server.allowed_origins);
        server.allowed_hosts = trimmed(server.allowed_hosts);
        Ok(Config {
            models,
            server,
            queue,
            logging,
        })
    }
}

/// `[[models]]` entry `i`: its keys over `[model]`'s (but its own path and name) and
/// `[scheduler]`'s.
fn model_entry(
    i: usize,
    entry: Map<String, Value>,
    base: &ModelSection,
    scheduler: &SchedulerSection,
) -> anyhow::Result<ModelSettings> {
    let mut model = serde_json::to_value(ModelSection {
        path: None,
        served_model_name: None,
        ..base.clone()
    })?;
    let mut sched = serde_json::to_value(scheduler)?;
    for (key, v) in entry {
        let target = if model.get(&key).is_some() {
            &mut model
        } else if sched.get(&key).is_some() {
            &mut sched
        } else {
            bail!("models[{i}]: unknown key `{key}` (an entry takes [model]'s and [scheduler]'s keys)");
        };
        overlay(target, serde_json::json!({ key: v }));
    }
    let model: ModelSection = typed(model, &format!("models[{i}]"))?;
    let Some(path) = model.path.clone() else {
        bail!("models[{i}] has no path");
    };
    Ok(ModelSettings {
        path,
        model,
        scheduler: typed(sched, &format!("models[{i}]"))?,
    })
}

/// Blanks dropped, the rest trimmed.
fn trimmed(items: Vec<String>) -> Vec<String> {
    items
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

impl Config {
    /// The rules a value's type does not state (ranges, names, files).
    fn check(&self) -> anyhow::Result<()> {
        let mut names = std::collections::HashSet::new();
        for m in &self.models {
            let name = m.served_name();
            if !names.insert(name.clone()) {
                bail!("two models are served as {name:?}: give each its own served_model_name");
            }
            let s = &m.scheduler;
            for (key, v) in [
                ("scheduler.max_num_batched_tokens", s.max_num_batched_tokens),
                ("scheduler.block_size", s.block_size),
                (
                    "scheduler.min_prefill_tokens_per_step",
                    s.min_prefill_tokens_per_step,
                ),
                ("scheduler.max_num_seqs", s.max_num_seqs),
                ("scheduler.kv_cache_blocks", s.kv_cache_blocks.unwrap_or(1)),
            ] {
                if v == 0 {
                    bail!("{key} must be at least 1 (model {name:?})");
                }
            }
            if let Some(t) = &m.model.chat_template {
                if !t.is_file() {
                    bail!(
                        "model.chat_template: {} is not a readable file",
                        t.display()
                    );
                }
            }
            if s.kv_cache_memory == Some(ByteSize(0)) {
                bail!("scheduler.kv_cache_memory must be more than 0");
            }
            let share = s.prefill_latency_share;
            if !(share > 0.0 && share.is_finite()) {
                bail!("scheduler.prefill_latency_share must be a number more than 0");
            }
            let f = s.kv_cache_memory_fraction;
            if !(f > 0.0 && f <= 1.0) {
                bail!("scheduler.kv_cache_memory_fraction must be more than 0 and at most 1");
            }
        }
        if self.queue.max_waiting_requests == 0 {
            bail!("queue.max_waiting_requests must be at least 1");
        }
        let server = &self.server;
        if !(server.drain_timeout >= 0.0 && server.drain_timeout.is_finite()) {
            bail!("server.drain_timeout must be a number of seconds, 0 or more");
        }
        if let Some(o) = server
            .allowed_origins
            .iter()
            .find(|o| !wick_server::is_origin(o))
        {
            bail!("server.allowed_origins: {o:?} is not an origin (scheme://host[:port] as browsers send it, with no path; null; or *)");
        }
        if let Some(h) = server
            .allowed_hosts
            .iter()
            .find(|h| h.is_empty() || h.contains('/'))
        {
            bail!("server.allowed_hosts: {h:?} is not a host name (name, name:port or *)");
        }
        if !(server.step_timeout >= 0.0 && server.step_timeout.is_finite()) {
            bail!("server.step_timeout must be a number of seconds, 0 or more");
        }
        if let Some(e) = self.logging.otlp_endpoint() {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                bail!("logging.otlp_endpoint must be an http:// or https:// URL, not {e:?}");
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.logging.level).is_err() {
            bail!("logging.level: {:?} is not a log filter (try info, debug or wick_engine=debug,info)", self.logging.level);
        }
        let q = self.queue.max_queue_time;
        if !(q >= 0.0 && q.is_finite()) {
            bail!("queue.max_queue_time must be a number of seconds, 0 or more");
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
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "human" | "text" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "logging.format must be human or json, not {other:?}"
            )),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        })
    }
}

/// A size in bytes, written `"512MiB"`, `"2GiB"`, `"1.5GB"` or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("scheduler.kv_cache_memory: {text:?} is not a size"))?;
        let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "k" | "kb" => 1e3,
            "kib" => 1024.0,
            "m" | "mb" => 1e6,
            "mib" => 1024.0 * 1024.0,
            "g" | "gb" => 1e9,
            "gib" => 1024.0 * 1024.0 * 1024.0,
            other => {
                return Err(format!(
                    "scheduler.kv_cache_memory: unknown unit {other:?} (use MiB, GiB, MB, GB)"
                ))
            }
        };
        Ok(ByteSize((n * mult) as u64))
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Serde through a type's text form (`Display` and `FromStr`), as flags are parsed.
mod text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<T: std::fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
        D: Deserializer<'de>,
    {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// [`text`] for an optional value (`null` or absent: `None`).
mod opt_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<T: std::fmt::Display, S: Serializer>(
        v: &Option<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
        D: Deserializer<'de>,
    {
        Option::<String>::deserialize(d)?
            .map(|s| s.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// The flags' help for `wick serve`, as the README's table should list them.
#[cfg(test)]
fn flag_keys() -> Vec<(String, String)> {
    let defaults = defaults().unwrap();
    let cmd = command_without_env();
    let mut out = Vec::new();
    for (section, keys) in defaults.as_object().unwrap() {
        for key in keys.as_object().into_iter().flat_map(|k| k.keys()) {
            if let Some(arg) = cmd.get_arguments().find(|a| a.get_id().as_str() == key) {
                let long = arg.get_long().unwrap_or_default().to_string();
                out.push((format!("--{long}"), format!("{section}.{key}")));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    fn with_file(f: &tempfile::NamedTempFile, flags: &[&str]) -> anyhow::Result<Config> {
        let path = f.path().to_str().unwrap();
        Config::from_flags(["--config", path].iter().chain(flags))
    }

    fn repo_file(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(name)
    }

    #[test]
    fn flags_beat_file_beat_defaults() {
        let f = file("[model]\npath = \"a.gguf\"\n[server]\nport = 9000\nhost = \"0.0.0.0\"\n[scheduler]\nmax_num_seqs = 4\n");
        let cfg = with_file(&f, &["--port", "9100"]).unwrap();
        assert_eq!(cfg.models.len(), 1);
        assert_eq!(cfg.models[0].path, PathBuf::from("a.gguf"));
        assert_eq!(cfg.server.port, 9100);
        assert_eq!(cfg.server.host, "0.0.0.0");
        assert_eq!(cfg.models[0].scheduler.max_num_seqs, 4);
        assert_eq!(cfg.models[0].scheduler.block_size, 16);
        // A flag given at its default value still beats the file.
        let cfg = with_file(&f, &["--max-num-seqs", "32"]).unwrap();
        assert_eq!(cfg.models[0].scheduler.max_num_seqs, 32);
    }

    #[test]
    fn the_shipped_default_config_parses() {
        let path = repo_file("config/default.toml");
        let cfg = Config::from_flags([
            "--config".as_ref(),
            path.as_os_str(),
            "--model".as_ref(),
            "m.gguf".as_ref(),
        ])
        .unwrap();
        assert_eq!(cfg, Config::from_flags(["--model", "m.gguf"]).unwrap());
        assert_eq!(cfg.server.port, 8080);
        assert_eq!(cfg.models[0].scheduler.kv_cache_blocks, None);
        assert_eq!(cfg.models[0].scheduler.kv_cache_memory_fraction, 0.5);
    }

    /// config/default.toml states every key at exactly the code's default; the keys with
    /// no default are there as comments (`# key = ...`).
    #[test]
    fn default_toml_states_exactly_the_codes_defaults() {
        let text = std::fs::read_to_string(repo_file("config/default.toml")).unwrap();
        let shipped = serde_json::to_value(toml::from_str::<toml::Table>(&text).unwrap()).unwrap();
        let defaults = defaults().unwrap();
        let mut lines_by_section: std::collections::HashMap<String, Vec<&str>> = Default::default();
        let mut section = String::new();
        for line in text.lines() {
            if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = s.trim_matches(|c| c == '[' || c == ']').to_string();
            }
            lines_by_section
                .entry(section.clone())
                .or_default()
                .push(line);
        }
        for (section, keys) in defaults.as_object().unwrap() {
            for (key, value) in keys.as_object().unwrap() {
                let stated = shipped.get(section).and_then(|s| s.get(key));
                if value.is_null() {
                    assert!(stated.is_none(), "{section}.{key} has no default");
                    let commented = format!("# {key} = ");
                    assert!(
                        lines_by_section[section]
                            .iter()
                            .any(|l| l.starts_with(&commented)),
                        "{section}.{key} is not documented in config/default.toml"
                    );
                } else {
                    assert_eq!(stated, Some(value), "{section}.{key}");
                }
            }
        }
        // And nothing else: every key it sets is a setting (else parsing it fails).
        for (section, keys) in shipped.as_object().unwrap() {
            for key in keys.as_object().unwrap().keys() {
                assert!(defaults[section].get(key).is_some(), "{section}.{key}");
            }
        }
    }

    /// The README's table of settings names every flag with its key.
    #[test]
    fn the_readme_lists_every_flag_with_its_key() {
        let readme = std::fs::read_to_string(repo_file("README.md")).unwrap();
        for (flag, key) in flag_keys() {
            let row = format!("| `{flag}` |");
            let line = readme.lines().find(|l| l.starts_with(&row));
            assert!(
                line.is_some_and(|l| l.contains(&format!("`{key}`"))),
                "README: no row `{flag}` with `{key}`"
            );
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let f = file("[scheduler]\nmax_num_seq = 4\n");
        let err = with_file(&f, &["--model", "m"]).unwrap_err();
        assert!(format!("{err:#}").contains("max_num_seq"), "{err:#}");
        let f = file("[scheduler]\nmax_num_seqs = \"four\"\n");
        let err = with_file(&f, &["--model", "m"]).unwrap_err();
        assert!(
            format!("{err:#}").contains("scheduler.max_num_seqs"),
            "{err:#}"
        );
        let f = file("[model]\ndevice = \"tpu\"\n");
        let err = with_file(&f, &["--model", "m"]).unwrap_err();
        assert!(format!("{err:#}").contains("model.device"), "{err:#}");
        let f = file("[[models]]\npath = \"a\"\ncolour = \"red\"\n");
        let err = with_file(&f, &[]).unwrap_err();
        assert!(
            format!("{err:#}").contains("models[0]: unknown key `colour`"),
            "{err:#}"
        );
        let err = Config::from_flags(["--model", "m", "--block-size", "0"]).unwrap_err();
        assert!(err.to_string().contains("scheduler.block_size"));
        let err = Config::from_flags(["--model", "m", "--log-format", "xml"]).unwrap_err();
        assert!(err.to_string().contains("logging.format"), "{err}");
        assert!(Config::from_flags(Vec::<String>::new()).is_err());
    }

    #[test]
    fn several_models_from_flags_or_the_file_each_with_its_options() {
        let cfg = Config::from_flags([
            "--model",
            "chat.gguf",
            "--model",
            "minilm",
            "--served-model-name",
            "chat",
            "--max-num-seqs",
            "8",
        ])
        .unwrap();
        let names: Vec<String> = cfg.models.iter().map(ModelSettings::served_name).collect();
        assert_eq!(names, ["chat", "minilm"]);
        assert!(cfg.models.iter().all(|m| m.scheduler.max_num_seqs == 8));
        let f = file(
            "[model]\npath = \"a.gguf\"\nserved_model_name = \"a\"\ndevice = \"cuda:1\"\n[scheduler]\nmax_num_seqs = 4\n\
             [[models]]\npath = \"b.gguf\"\nserved_model_name = \"b\"\nkv_cache_blocks = 64\nmax_num_seqs = 2\n\
             [[models]]\npath = \"e\"\nserved_model_name = \"e\"\ndevice = \"cpu\"\n",
        );
        let cfg = with_file(&f, &[]).unwrap();
        let got: Vec<(String, usize, Option<usize>, String)> = cfg
            .models
            .iter()
            .map(|m| {
                let s = &m.scheduler;
                (
                    m.served_name(),
                    s.max_num_seqs,
                    s.kv_cache_blocks,
                    m.model.device.to_string(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("a".to_string(), 4, None, "cuda:1".to_string()),
                ("b".to_string(), 2, Some(64), "cuda:1".to_string()),
                ("e".to_string(), 4, None, "cpu".to_string())
            ]
        );
        // Two models under one name, and more names than models, are refused.
        let err = Config::from_flags([
            "--model",
            "x.gguf",
            "--model",
            "y.gguf",
            "--served-model-name",
            "m",
            "--served-model-name",
            "m",
        ])
        .unwrap_err();
        assert!(
            err.to_string().contains("two models are served as"),
            "{err}"
        );
        assert!(Config::from_flags([
            "--model",
            "m.gguf",
            "--served-model-name",
            "a",
            "--served-model-name",
            "b"
        ])
        .is_err());
    }

    #[test]
    fn browser_lists_from_flags_or_the_file_and_bad_origins_are_named() {
        let f = file(
            "[server]\nallowed_origins = [\"https://a.example\"]\nallowed_hosts = [\"wick.lan\"]\n",
        );
        let from_file = with_file(&f, &["--model", "m.gguf"]).unwrap();
        assert_eq!(from_file.server.allowed_origins, ["https://a.example"]);
        assert_eq!(from_file.server.allowed_hosts, ["wick.lan"]);
        let flags = with_file(
            &f,
            &[
                "--model",
                "m.gguf",
                "--allowed-origins",
                "http://b.example:3000, ",
            ],
        )
        .unwrap();
        assert_eq!(flags.server.allowed_origins, ["http://b.example:3000"]);
        let err = Config::from_flags(["--model", "m.gguf", "--allowed-origins", "b.example"])
            .unwrap_err();
        assert!(err.to_string().contains("server.allowed_origins"), "{err}");
    }

    #[test]
    fn memory_sizes_parse() {
        let b = |s: &str| s.parse::<ByteSize>().map(|b| b.0);
        assert_eq!(b("512MiB").unwrap(), 512 << 20);
        assert_eq!(b("2 GiB").unwrap(), 2 << 30);
        assert_eq!(b("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(b("4096").unwrap(), 4096);
        assert!(b("lots").is_err());
        assert!(b("3 parsecs").is_err());
        let f = file("[scheduler]\nkv_cache_memory = \"1GiB\"\n");
        let cfg = with_file(&f, &["--model", "m"]).unwrap();
        assert_eq!(
            cfg.models[0].scheduler.kv_cache_memory,
            Some(ByteSize(1 << 30))
        );
    }
}
