use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a model: expected a .gguf file or a directory with config.json and *.safetensors")]
    NotAModel { path: PathBuf },
    #[error("invalid model file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("device {0:?}: {1}")]
    Device(String, String),
    #[error("{what} is smaller than one KV block ({per_block} bytes)")]
    KvCacheTooSmall { what: String, per_block: u64 },
    #[error("step: {0}")]
    Step(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl RunnerError {
    pub(crate) fn invalid(path: &std::path::Path, message: impl Into<String>) -> Self {
        RunnerError::Invalid {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}
