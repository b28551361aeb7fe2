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
    /// Model: a .gguf file, or a Hugging Face directory (config.json, tokenizer.json,
    /// tokenizer_config.json, *.safetensors). [key: model.path]
    #[arg(long, env = "WICK_MODEL")]
    pub model: Option<PathBuf>,
    /// Name clients use in `model` (default: the file or directory name). [key: model.served_model_name]
    #[arg(long, env = "WICK_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// cpu, cuda[:N] or metal[:N] (cuda and metal need the cargo feature of that name). [key: model.device]
    #[arg(long, env = "WICK_DEVICE")]
    pub device: Option<String>,
    /// GGUF linear weights: native (as stored), q8_0 or f32. [key: model.weight_format]
    #[arg(long, env = "WICK_WEIGHT_FORMAT")]
    pub weight_format: Option<String>,
    /// Address to listen on. [key: server.host]
    #[arg(long, env = "WICK_HOST")]
    pub host: Option<String>,
    /// Port to listen on. [key: server.port]
    #[arg(long, env = "WICK_PORT")]
    pub port: Option<u16>,
    /// Most sequences computed at once. [key: scheduler.max_num_seqs]
    #[arg(long, env = "WICK_MAX_NUM_SEQS")]
    pub max_num_seqs: Option<usize>,
    /// Most tokens computed in one engine step. [key: scheduler.max_num_batched_tokens]
    #[arg(long, env = "WICK_MAX_NUM_BATCHED_TOKENS")]
    pub max_num_batched_tokens: Option<usize>,
    /// Positions per KV cache block. [key: scheduler.block_size]
    #[arg(long, env = "WICK_BLOCK_SIZE")]
    pub block_size: Option<usize>,
    /// KV cache size in blocks. [key: scheduler.kv_cache_blocks]
    #[arg(long, env = "WICK_KV_CACHE_BLOCKS")]
    pub kv_cache_blocks: Option<usize>,
    /// Longest prompt plus output; 0 means the model's own limit. [key: scheduler.max_model_len]
    #[arg(long, env = "WICK_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Requests the queue holds before answering 429. [key: queue.capacity]
    #[arg(long, env = "WICK_QUEUE_CAPACITY")]
    pub queue_capacity: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: FileServer,
    #[serde(default)]
    model: FileModel,
    #[serde(default)]
    scheduler: FileScheduler,
    #[serde(default)]
    queue: FileQueue,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    host: Option<String>,
    port: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModel {
    path: Option<PathBuf>,
    served_model_name: Option<String>,
    device: Option<String>,
    weight_format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileScheduler {
    max_num_seqs: Option<usize>,
    max_num_batched_tokens: Option<usize>,
    block_size: Option<usize>,
    kv_cache_blocks: Option<usize>,
    max_model_len: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileQueue {
    capacity: Option<usize>,
}

/// The resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub model: PathBuf,
    pub served_model_name: Option<String>,
    pub device: String,
    pub weight_format: String,
    pub host: String,
    pub port: u16,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub block_size: usize,
    pub kv_cache_blocks: usize,
    /// 0: the model's own limit.
    pub max_model_len: usize,
    pub queue_capacity: usize,
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
        let Some(model) = args.model.or(file.model.path) else {
            bail!("no model given: pass --model PATH (a .gguf file or a model directory), set WICK_MODEL, or model.path in the config file; `make serve` fetches the default model");
        };
        let cfg = Config {
            model,
            served_model_name: args.served_model_name.or(file.model.served_model_name),
            device: args
                .device
                .or(file.model.device)
                .unwrap_or_else(|| "cpu".into()),
            weight_format: args
                .weight_format
                .or(file.model.weight_format)
                .unwrap_or_else(|| "native".into()),
            host: args
                .host
                .or(file.server.host)
                .unwrap_or_else(|| "127.0.0.1".into()),
            port: args.port.or(file.server.port).unwrap_or(8080),
            max_num_seqs: args
                .max_num_seqs
                .or(file.scheduler.max_num_seqs)
                .unwrap_or(32),
            max_num_batched_tokens: args
                .max_num_batched_tokens
                .or(file.scheduler.max_num_batched_tokens)
                .unwrap_or(512),
            block_size: args.block_size.or(file.scheduler.block_size).unwrap_or(16),
            kv_cache_blocks: args
                .kv_cache_blocks
                .or(file.scheduler.kv_cache_blocks)
                .unwrap_or(1024),
            max_model_len: args
                .max_model_len
                .or(file.scheduler.max_model_len)
                .unwrap_or(0),
            queue_capacity: args.queue_capacity.or(file.queue.capacity).unwrap_or(256),
        };
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> anyhow::Result<()> {
        let positive = [
            ("scheduler.max_num_seqs", self.max_num_seqs),
            (
                "scheduler.max_num_batched_tokens",
                self.max_num_batched_tokens,
            ),
            ("scheduler.block_size", self.block_size),
            ("scheduler.kv_cache_blocks", self.kv_cache_blocks),
            ("queue.capacity", self.queue_capacity),
        ];
        for (key, v) in positive {
            if v == 0 {
                bail!("{key} must be at least 1");
            }
        }
        Ok(())
    }
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
        assert_eq!(cfg.model, PathBuf::from("a.gguf"));
        assert_eq!(cfg.port, 9100);
        assert_eq!(cfg.host, "0.0.0.0");
        assert_eq!(cfg.max_num_seqs, 4);
        assert_eq!(cfg.block_size, 16);
    }

    #[test]
    fn the_shipped_default_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/default.toml");
        let cfg = Config::resolve(ServeArgs {
            config: Some(path),
            model: Some("m.gguf".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.port, 8080);
        assert_eq!(cfg.kv_cache_blocks, 1024);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let f = file("[scheduler]\nmax_num_seq = 4\n");
        let err = Config::resolve(ServeArgs {
            config: Some(f.path().into()),
            model: Some("m".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("max_num_seq"), "{err:#}");
        let err = Config::resolve(ServeArgs {
            model: Some("m".into()),
            block_size: Some(0),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("scheduler.block_size"));
        assert!(Config::resolve(ServeArgs::default()).is_err());
    }
}
