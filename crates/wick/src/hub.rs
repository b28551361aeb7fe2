//! `--model org/name`: a model from the Hugging Face Hub, through the `hf-hub` crate and its
//! cache (`$HF_HOME/hub`, the layout the Python `huggingface_hub` shares). With
//! `HF_HUB_OFFLINE=1` nothing is fetched: the cache must already hold the files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

/// What to load: a local path as given, or the files of a Hub repository.
pub fn resolve(model: &Path, file: Option<&str>, revision: &str) -> anyhow::Result<PathBuf> {
    if model.exists() {
        return Ok(model.to_path_buf());
    }
    let Some(id) = model.to_str().filter(|s| is_repo_id(s)) else {
        bail!("{} does not exist (give a .gguf file, a model directory, or a Hugging Face repository as org/name)", model.display());
    };
    let cache = match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => Cache::new(dir.into()),
        None => Cache::from_env(),
    };
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string());
    if offline() {
        from_cache(&cache, repo, id, file)
    } else {
        download(cache, repo, id, file)
    }
}

/// `org/name`: two non-empty parts of letters, digits, `-`, `_` and `.`.
fn is_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// The files to fetch from a repository's file list: one GGUF file, or a safetensors model.
fn pick(files: &[String], file: Option<&str>, id: &str) -> anyhow::Result<Vec<String>> {
    if let Some(f) = file {
        if !files.iter().any(|x| x == f) {
            bail!("{id} has no file {f:?}");
        }
        return Ok(vec![f.to_string()]);
    }
    let ggufs: Vec<&String> = files.iter().filter(|f| f.ends_with(".gguf")).collect();
    match ggufs.len() {
        1 => return Ok(vec![ggufs[0].clone()]),
        0 => {}
        _ => bail!(
            "{id} holds several GGUF files; choose one with --model-file: {}",
            ggufs
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
    let mut want: Vec<String> = ["config.json", "tokenizer.json", "tokenizer_config.json"]
        .into_iter()
        .filter(|f| files.iter().any(|x| x == f))
        .map(String::from)
        .collect();
    let weights: Vec<String> = files
        .iter()
        .filter(|f| f.ends_with(".safetensors") || f.ends_with(".safetensors.index.json"))
        .cloned()
        .collect();
    if weights.is_empty() || !want.iter().any(|f| f == "config.json") {
        bail!("{id} has neither a .gguf file nor config.json with *.safetensors");
    }
    want.extend(weights);
    Ok(want)
}

/// The path the loader takes: the GGUF file, or the snapshot directory.
fn target(snapshot_file: &Path, picked: &[String]) -> PathBuf {
    match picked {
        [one] if one.ends_with(".gguf") => snapshot_file.to_path_buf(),
        _ => snapshot_file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    }
}

fn from_cache(cache: &Cache, repo: Repo, id: &str, file: Option<&str>) -> anyhow::Result<PathBuf> {
    let not_cached = || {
        anyhow::anyhow!(
            "HF_HUB_OFFLINE is set and {id} (revision {}) is not in the Hugging Face cache at {}; run once online, or unset HF_HUB_OFFLINE",
            repo.revision(),
            cache.path().display()
        )
    };
    // The snapshot directory of the revision: refs/<revision> names the commit.
    let folder = cache.path().join(repo.folder_name());
    let commit = std::fs::read_to_string(folder.join("refs").join(repo.revision()))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| repo.revision().to_string());
    let snapshot = folder.join("snapshots").join(&commit);
    let files: Vec<String> = std::fs::read_dir(&snapshot)
        .map_err(|_| not_cached())?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let picked = pick(&files, file, id).map_err(|e| not_cached().context(e))?;
    let first = cache
        .repo(repo.clone())
        .get(&picked[0])
        .unwrap_or_else(|| snapshot.join(&picked[0]));
    tracing::info!(
        repo = id,
        commit,
        "model from the Hugging Face cache (offline)"
    );
    Ok(target(&first, &picked))
}

fn download(cache: Cache, repo: Repo, id: &str, file: Option<&str>) -> anyhow::Result<PathBuf> {
    let api = ApiBuilder::from_cache(cache)
        .with_progress(true)
        .with_token(std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()))
        .build()
        .context("cannot set up the Hugging Face Hub client")?;
    let api_repo = api.repo(repo);
    let info = api_repo.info().with_context(|| {
        format!("cannot list {id} on the Hugging Face Hub (offline? set HF_HUB_OFFLINE=1 to use the cache)")
    })?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let picked = pick(&files, file, id)?;
    let mut first = None;
    for f in &picked {
        let path = api_repo
            .get(f)
            .with_context(|| format!("cannot download {f} from {id}"))?;
        first.get_or_insert(path);
    }
    let first = first.context("nothing to download")?;
    tracing::info!(repo = id, path = %first.display(), "model from the Hugging Face Hub");
    Ok(target(&first, &picked))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn repo_ids_are_org_slash_name() {
        assert!(is_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(is_repo_id("a/b.c_d-e"));
        assert!(!is_repo_id("model.gguf"));
        assert!(!is_repo_id("/abs/path"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("../x"));
        assert!(!is_repo_id("a/"));
    }

    #[test]
    fn picks_the_gguf_or_the_safetensors_set() {
        let one = names(&["README.md", "m.Q4_1.gguf"]);
        assert_eq!(pick(&one, None, "o/n").unwrap(), names(&["m.Q4_1.gguf"]));
        let two = names(&["a.gguf", "b.gguf"]);
        assert!(pick(&two, None, "o/n")
            .unwrap_err()
            .to_string()
            .contains("--model-file"));
        assert_eq!(
            pick(&two, Some("b.gguf"), "o/n").unwrap(),
            names(&["b.gguf"])
        );
        assert!(pick(&two, Some("c.gguf"), "o/n").is_err());
        let st = names(&[
            "config.json",
            "tokenizer.json",
            "model.safetensors",
            "x.bin",
        ]);
        assert_eq!(
            pick(&st, None, "o/n").unwrap(),
            names(&["config.json", "tokenizer.json", "model.safetensors"])
        );
        assert!(pick(&names(&["README.md"]), None, "o/n").is_err());
    }
}
