//! Writes Wick's tiny random test models (see `wick_runner::testing`) into a directory:
//! `NAME.gguf` and its Hugging Face twin `NAME-hf/` for each.
//!
//! Usage: tiny_models TOKENIZER.gguf OUT_DIR

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(tok), Some(out)) = (args.next(), args.next()) else {
        return Err("usage: tiny_models TOKENIZER.gguf OUT_DIR".into());
    };
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out)?;
    for t in wick_runner::testing::tiny_models() {
        wick_runner::testing::write_tiny(&t, &PathBuf::from(&tok), &out)?;
        println!("{}", out.join(format!("{}.gguf", t.name)).display());
    }
    Ok(())
}
