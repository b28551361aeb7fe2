//! `wick export-tokenizer`: a GGUF file's tokenizer and chat template as `tokenizer.json` and
//! `tokenizer_config.json` (so a Hugging Face model directory can be written around them),
//! and its tokenizer metadata alone as `tokenizer.gguf`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::json;

#[derive(Debug, Args)]
pub struct ExportTokenizerArgs {
    /// The GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// Directory to write tokenizer.json, tokenizer_config.json and tokenizer.gguf (the
    /// file's tokenizer metadata alone) into.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn export_tokenizer(args: ExportTokenizerArgs) -> anyhow::Result<()> {
    let a = wick_runner::load_assets(&args.model)
        .with_context(|| format!("cannot load {}", args.model.display()))?;
    std::fs::create_dir_all(&args.out)?;
    a.tokenizer
        .save(args.out.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("cannot write tokenizer.json: {e}"))?;
    let cfg = json!({
        "chat_template": a.chat_template,
        "bos_token": a.bos_token,
        "eos_token": a.eos_token,
        "model_max_length": a.max_model_len,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    std::fs::write(
        args.out.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&cfg)?,
    )?;
    if args.model.is_file() {
        wick_runner::write_tokenizer_gguf(&args.model, &args.out.join("tokenizer.gguf"))?;
    }
    let eos_id = a
        .eos_token
        .as_deref()
        .and_then(|t| a.tokenizer.token_to_id(t));
    println!(
        "{}",
        json!({"vocab_size": a.tokenizer.get_vocab_size(true), "eos_token_id": eos_id, "stop_token_ids": a.stop_token_ids})
    );
    Ok(())
}
