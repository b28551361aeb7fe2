//! Ollama's model routes: `/api/tags`, `/api/show`, `/api/ps`, `/api/version`, and clear
//! refusals for what a server whose models are fixed at start-up cannot do (pull, push,
//! create, copy, delete).

use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::Uri;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::request::{fim_tokens, thinks, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P};
use super::rfc3339;
use crate::http::body_bytes;
use crate::validate::parse_object;
use crate::{ApiError, AppState, ModelDetails, ReadyModel};

/// The Ollama release whose wire format these routes follow (clients compare it with the
/// version a feature needed).
pub(crate) const OLLAMA_API_VERSION: &str = "0.33.0";

/// A model as every listing names it: its name, details and facts.
struct Listed<'a> {
    name: &'a str,
    details: &'a ModelDetails,
    context_length: usize,
    embedding_length: Option<usize>,
    capabilities: Vec<&'static str>,
}

fn listed(m: &ReadyModel) -> Listed<'_> {
    match m {
        ReadyModel::Generate(m) => {
            let mut capabilities = vec!["completion"];
            if m.tool_format().is_ok() {
                capabilities.push("tools");
            }
            if fim_tokens(m).is_some() {
                capabilities.push("insert");
            }
            if thinks(m) {
                capabilities.push("thinking");
            }
            Listed {
                name: &m.name,
                details: &m.details,
                context_length: m.max_model_len,
                embedding_length: None,
                capabilities,
            }
        }
        ReadyModel::Embed(m) => Listed {
            name: &m.name,
            details: &m.details,
            context_length: m.max_input_tokens,
            embedding_length: Some(m.dimensions),
            capabilities: vec!["embedding"],
        },
    }
}

/// A parameter count as Ollama writes it (its `HumanNumber`: `135M`, `494.03M`, `1.5B`,
/// `23K`).
fn parameter_size(n: u64) -> String {
    let whole = |v: f64| v == v.floor();
    match n {
        0 => String::new(),
        n if n >= 1_000_000_000 => {
            let v = n as f64 / 1e9;
            if whole(v) {
                format!("{v:.0}B")
            } else {
                format!("{v:.1}B")
            }
        }
        n if n >= 1_000_000 => {
            let v = n as f64 / 1e6;
            if whole(v) {
                format!("{v:.0}M")
            } else {
                format!("{v:.2}M")
            }
        }
        n if n >= 1_000 => format!("{:.0}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

impl Listed<'_> {
    fn details(&self) -> Value {
        let d = self.details;
        json!({
            "parent_model": "",
            "format": d.format,
            "family": d.family,
            "families": [d.family],
            "parameter_size": parameter_size(d.parameters),
            "quantization_level": d.quantization,
        })
    }

    /// Identifies the file's version (its name, size and time), not its content: hashing a
    /// multi-gigabyte file at start-up would delay serving.
    fn digest(&self) -> String {
        let d = self.details;
        let modified = d
            .modified
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |t| t.as_nanos());
        let id = format!("{}\n{}\n{}\n{modified}", self.name, d.format, d.size_bytes);
        format!("{:x}", Sha256::digest(id.as_bytes()))
    }

    fn modified_at(&self) -> String {
        rfc3339(self.details.modified.unwrap_or(SystemTime::UNIX_EPOCH))
    }
}

/// `GET /api/tags`: every served model.
#[utoipa::path(get, path = "/api/tags", responses((status = 200, description = "Ollama's model list", body = Object)))]
pub(crate) async fn tags(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    state.ready()?;
    let models: Vec<Value> = state
        .loaded()
        .map(|m| {
            let l = listed(m);
            json!({
                "name": l.name, "model": l.name, "modified_at": l.modified_at(),
                "size": l.details.size_bytes, "digest": l.digest(), "details": l.details(),
                "capabilities": l.capabilities,
            })
        })
        .collect();
    Ok(Json(json!({ "models": models })))
}

/// `GET /api/ps`: the loaded models. Every model is loaded at start and kept (pinned), so
/// none expires.
#[utoipa::path(get, path = "/api/ps", responses((status = 200, description = "Ollama's loaded-model list", body = Object)))]
pub(crate) async fn ps(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    state.ready()?;
    // Ollama writes a model kept forever with an expiry far in the future.
    let forever = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    let models: Vec<Value> = state
        .loaded()
        .map(|m| {
            let l = listed(m);
            json!({
                "name": l.name, "model": l.name, "size": l.details.size_bytes,
                "digest": l.digest(), "details": l.details(), "expires_at": rfc3339(forever),
                "size_vram": 0, "context_length": l.context_length,
            })
        })
        .collect();
    Ok(Json(json!({ "models": models })))
}

#[derive(Debug, Deserialize)]
pub(crate) struct ShowRequest {
    pub model: Option<String>,
    pub name: Option<String>,
    /// Accepted: there are no tensors or vocabulary listed to expand.
    #[allow(dead_code)]
    pub verbose: Option<bool>,
}

pub(crate) const SHOW_FIELDS: &[&str] = &["model", "name", "verbose"];

/// `POST /api/show`: one model's template, default parameters, details and facts.
#[utoipa::path(post, path = "/api/show", request_body = Object, responses((status = 200, description = "The model", body = Object), (status = 404, body = Object)))]
pub(crate) async fn show(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body_bytes(body)?;
    let req: ShowRequest = parse_object(&body, &[SHOW_FIELDS], &[])?;
    let Some(name) = req.model.or(req.name).filter(|n| !n.is_empty()) else {
        return Err(ApiError::invalid("model", "model is required"));
    };
    state.ready()?;
    let selected = state.select(&super::served_name(&state, name))?;
    let m = selected.loaded().ok_or(ApiError::NotReady)?;
    let l = listed(m);
    let d = l.details;
    let mut info = json!({
        "general.architecture": d.family,
        "general.parameter_count": d.parameters,
        format!("{}.context_length", d.family): l.context_length,
    });
    if let Some(e) = l.embedding_length {
        info[format!("{}.embedding_length", d.family)] = json!(e);
    }
    let mut out = json!({
        "details": l.details(),
        "model_info": info,
        "capabilities": l.capabilities,
        "modified_at": l.modified_at(),
    });
    if let ReadyModel::Generate(g) = m {
        // The template is the model's Jinja chat template (not a Go template); the
        // parameters are the defaults the Ollama routes sample with.
        let template = g.template.as_ref().map(|t| t.source().to_string());
        let parameters = format!(
            "temperature {DEFAULT_TEMPERATURE}\ntop_k {DEFAULT_TOP_K}\ntop_p {DEFAULT_TOP_P}"
        );
        out["template"] = json!(template.clone().unwrap_or_default());
        out["parameters"] = json!(parameters);
        out["modelfile"] = json!(format!(
            "# Served by Wick; the template below is Jinja.\nFROM {}\nPARAMETER {}\n",
            g.name,
            parameters.replace('\n', "\nPARAMETER ")
        ));
    }
    Ok(Json(out))
}

/// `GET /api/version`: the Ollama API version these routes follow, and Wick's own.
#[utoipa::path(get, path = "/api/version", responses((status = 200, description = "The version", body = Object)))]
pub(crate) async fn version() -> Json<Value> {
    Json(json!({"version": OLLAMA_API_VERSION, "wick_version": env!("CARGO_PKG_VERSION")}))
}

/// Pull, push, create, copy, delete and blobs: a 501 saying why.
pub(crate) async fn unsupported(uri: Uri) -> ApiError {
    let path = uri.path();
    let what = match path {
        "/api/create" => "creating models from a Modelfile is not supported",
        p if p.starts_with("/api/blobs") => "creating models from a Modelfile is not supported",
        "/api/push" => "pushing models to a registry is not supported",
        _ => "this server serves the models named at start-up (--model, or the config's [[models]]): it cannot pull, copy or delete models",
    };
    ApiError::NotImplemented(format!("{path}: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_sizes_read_as_ollamas() {
        assert_eq!(parameter_size(134_515_008), "134.52M");
        assert_eq!(parameter_size(135_000_000), "135M");
        assert_eq!(parameter_size(1_543_714_304), "1.5B");
        assert_eq!(parameter_size(8_000_000_000), "8B");
        assert_eq!(parameter_size(22_700), "23K");
        assert_eq!(parameter_size(512), "512");
        assert_eq!(parameter_size(0), "");
    }
}
