//! The server's state: the served models (each a [`Backend`] and, once loaded, what the front
//! end knows of it), the options, and the selected-model handle every handler goes through.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tokenizers::Tokenizer;
use wick_core::{EmbedHandle, EngineHandle, Metrics, RequestId};

use crate::{
    embeddings, ops, tools, ApiError, BrowserPolicy, ChatTemplate, Grammars, TemplateError,
};

/// What a model is, as model listings show it (Ollama's `/api/tags`, `/api/show`, `/api/ps`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelDetails {
    /// `gguf` or `safetensors`.
    pub format: String,
    /// The family's name (`llama`, `qwen2`, `bert`, ...).
    pub family: String,
    pub parameters: u64,
    /// How the weights are stored (`Q4_K_M`, `BF16`); empty when unknown.
    pub quantization: String,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// When the file was last written.
    pub modified: Option<std::time::SystemTime>,
}

/// What the front end knows of the model being served.
pub struct ServedModel {
    /// The name clients put in `model`.
    pub name: String,
    pub tokenizer: Arc<Tokenizer>,
    /// The chat template (`None` for a base model without one: chat requests get a 400).
    pub template: Option<ChatTemplate>,
    /// Prompts start with this token (the GGUF's `add_bos_token`, the tokenizer's own
    /// post-processor), added once even when the template writes it too.
    pub bos_token_id: Option<u32>,
    pub add_bos: bool,
    pub stop_token_ids: Vec<u32>,
    /// Longest prompt plus output accepted.
    pub max_model_len: usize,
    /// The context the model was trained for.
    pub context_length: usize,
    /// The output budget of a request that sets none (`None`: what the context leaves).
    pub max_tokens_default: Option<usize>,
    /// Token ids below this are valid.
    pub vocab_size: usize,
    /// Grammar compilation for structured output; `None` if it could not be set up for
    /// this tokenizer (then `response_format` JSON is refused).
    pub grammars: Option<Arc<Grammars>>,
    pub details: ModelDetails,
}

/// What the binary knows of a loaded generation model, as plain data: the server derives
/// the rest (the compiled template, special token ids, the grammar compiler).
pub struct ModelSpec {
    /// The name clients put in `model`.
    pub name: String,
    pub tokenizer: Tokenizer,
    /// The chat template's Jinja source (`None`: chat requests get a 400).
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Whether prompts start with the BOS token.
    pub add_bos: bool,
    pub stop_token_ids: Vec<u32>,
    /// Longest prompt plus output accepted.
    pub max_model_len: usize,
    /// The context the model was trained for.
    pub context_length: usize,
    /// The output budget of a request that sets none (`None`: what the context leaves).
    pub max_tokens_default: Option<usize>,
    pub details: ModelDetails,
}

impl ServedModel {
    /// Compiles the chat template and sets up structured output for the tokenizer (a
    /// tokenizer it cannot handle leaves structured output off, with a warning).
    pub fn new(spec: ModelSpec) -> Result<Self, TemplateError> {
        if spec.chat_template.is_none() {
            tracing::warn!("the model has no chat template: chat requests get a 400 (use --chat-template FILE to give one)");
        }
        let template = spec
            .chat_template
            .map(|s| ChatTemplate::new(&s, spec.bos_token.clone(), spec.eos_token.clone()))
            .transpose()?;
        let bos_token_id = spec
            .bos_token
            .as_deref()
            .and_then(|t| spec.tokenizer.token_to_id(t));
        let vocab_size = spec.tokenizer.get_vocab_size(true);
        let tokenizer = Arc::new(spec.tokenizer);
        let eos = spec
            .eos_token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t))
            .or(spec.stop_token_ids.first().copied());
        let started = std::time::Instant::now();
        let grammars = match eos.map(|eos| Grammars::new(Arc::clone(&tokenizer), vocab_size, eos)) {
            Some(Ok(g)) => Some(Arc::new(g)),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "structured output is unavailable for this tokenizer");
                None
            }
            None => None,
        };
        tracing::debug!(elapsed = ?started.elapsed(), "grammar support ready");
        Ok(ServedModel {
            name: spec.name,
            vocab_size,
            grammars,
            tokenizer,
            template,
            bos_token_id,
            add_bos: spec.add_bos,
            stop_token_ids: spec.stop_token_ids,
            max_model_len: spec.max_model_len,
            context_length: spec.context_length,
            max_tokens_default: spec.max_tokens_default,
            details: spec.details,
        })
    }

    /// Token ids of prompt `text` (special tokens in it are parsed; BOS first when the model
    /// asks for it, never twice), or a 400 naming `param`.
    pub(crate) fn encode(&self, text: &str, param: &str) -> Result<Vec<u32>, ApiError> {
        let enc = self
            .tokenizer
            .encode(text, self.add_bos)
            .map_err(|e| ApiError::invalid(param, format!("cannot tokenize: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if self.add_bos && ids.len() >= 2 && ids[0] == ids[1] && Some(ids[0]) == self.bos_token_id {
            ids.remove(0);
        }
        Ok(ids)
    }

    /// The chat template, or a 400 on `messages` saying that the model has none.
    pub(crate) fn chat_template(&self) -> Result<&ChatTemplate, ApiError> {
        self.template.as_ref().ok_or_else(|| {
            ApiError::invalid(
                "messages",
                "this model has no chat template (a base model?): use /v1/completions with a plain prompt, or start the server with --chat-template FILE",
            )
        })
    }

    /// How the model's template asks for tool calls, or a 400 on `tools` saying that it
    /// does not present tools (or in no syntax this server parses).
    pub(crate) fn tool_format(&self) -> Result<tools::ToolFormat, ApiError> {
        let template = self.chat_template()?;
        let syntax = tools::syntax_for(template.source()).ok_or_else(|| {
            ApiError::invalid(
                "tools",
                if template.supports_tools() {
                    "this model's chat template asks for tool calls in a syntax this server does not parse (it parses Hermes <tool_call>, Llama 3 JSON and Mistral [TOOL_CALLS])"
                } else {
                    "this model's chat template has no tool support: tools cannot be used with it"
                },
            )
        })?;
        // A marker that is one special token is named by id in grammars and written out
        // by the detokenizer (which skips other special tokens).
        let start_token = self.tokenizer.token_to_id(syntax.start()).filter(|_| {
            self.tokenizer
                .get_added_vocabulary()
                .is_special_token(syntax.start())
        });
        Ok(tools::ToolFormat {
            syntax,
            start_token,
        })
    }

    /// `ids` if every one is in the vocabulary, or a 400 naming `param`.
    pub(crate) fn check_ids(&self, ids: Vec<u32>, param: &str) -> Result<Vec<u32>, ApiError> {
        check_vocabulary(ids, self.vocab_size, param)
    }
}

/// What computes a served model's requests.
#[derive(Clone)]
pub enum Backend {
    /// A generation engine's queue (chat, completions, Responses, Messages).
    Generate(EngineHandle),
    /// An embedding engine's queue (`/v1/embeddings`).
    Embed(EmbedHandle),
}

impl Backend {
    fn has_failed(&self) -> bool {
        match self {
            Backend::Generate(h) => h.has_failed(),
            Backend::Embed(h) => h.has_failed(),
        }
    }

    fn busy(&self) -> Option<wick_core::Busy> {
        match self {
            Backend::Generate(h) => h.busy(),
            Backend::Embed(h) => h.busy(),
        }
    }
}

/// One model to serve, before it is loaded.
pub struct ModelEntry {
    /// The name clients put in `model`.
    pub name: String,
    pub backend: Backend,
    /// Its series, labelled with its name.
    pub metrics: Metrics,
}

/// What the front end knows of a loaded model, by kind.
pub(crate) enum ReadyModel {
    Generate(Box<ServedModel>),
    Embed(embeddings::EmbeddingModelInfo),
}

struct Slot {
    name: String,
    backend: Backend,
    metrics: Metrics,
    loaded: OnceLock<ReadyModel>,
}

/// `ids` if every one is below `vocab_size`, or a 400 naming `param`.
pub(crate) fn check_vocabulary(
    ids: Vec<u32>,
    vocab_size: usize,
    param: &str,
) -> Result<Vec<u32>, ApiError> {
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab_size) {
        return Err(ApiError::invalid(
            param,
            format!("token id {bad} is not in the vocabulary (size {vocab_size})"),
        ));
    }
    Ok(ids)
}

/// The server's own settings (beside the models).
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// With a key, every API route but `/`, `/health` and `/metrics` requires
    /// `Authorization: Bearer <key>` (or `x-api-key`).
    pub api_key: Option<String>,
    /// What web pages may do.
    pub browser: BrowserPolicy,
    /// An engine with work that has not moved for this long is stalled: `/health` and
    /// `/health/live` turn 503 until it moves again. `None`: not watched.
    pub step_timeout: Option<std::time::Duration>,
}

impl Default for ServerOptions {
    /// No key; a loopback server's browser policy; steps watched with a 60 s timeout.
    fn default() -> Self {
        ServerOptions {
            api_key: None,
            browser: BrowserPolicy::loopback(),
            step_timeout: Some(std::time::Duration::from_secs(60)),
        }
    }
}

struct Inner {
    slots: Vec<Slot>,
    api_key: Option<String>,
    browser: BrowserPolicy,
    step_timeout: Option<std::time::Duration>,
    next_id: AtomicU64,
    drain: Arc<ops::Drain>,
}

/// Shared by every handler; cheap to clone. It serves one or several models, each with its
/// own engine; a handler picks the request's model with [`AppState::select`], and the
/// [`Selected`] it gets is the only way to that model's engine, metrics and tokenizer.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

/// The model a request named: its engine, its series and, once loaded, what the front end
/// knows of it. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Selected {
    inner: Arc<Inner>,
    index: usize,
}

impl AppState {
    /// One generation model served as `name`. With `api_key`, every API route but `/`,
    /// `/health` and `/metrics` requires `Authorization: Bearer <api_key>`. The other
    /// options are [`ServerOptions::default`]'s (a loopback listener's browser policy).
    pub fn new(
        name: &str,
        engine: EngineHandle,
        metrics: Metrics,
        api_key: Option<String>,
    ) -> Self {
        Self::with_models(
            vec![ModelEntry {
                name: name.to_string(),
                backend: Backend::Generate(engine),
                metrics,
            }],
            ServerOptions {
                api_key,
                ..ServerOptions::default()
            },
        )
    }

    /// Several models, routed by the requests' `model` field.
    pub fn with_models(models: Vec<ModelEntry>, options: ServerOptions) -> Self {
        let slots = models
            .into_iter()
            .map(|m| Slot {
                name: m.name,
                backend: m.backend,
                metrics: m.metrics,
                loaded: OnceLock::new(),
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                slots,
                api_key: options.api_key,
                browser: options.browser,
                step_timeout: options.step_timeout,
                next_id: AtomicU64::new(1),
                drain: Arc::default(),
            }),
        }
    }

    /// The generation model named `model.name` is loaded. `/health` turns 200 once every
    /// model is.
    pub fn set_ready(&self, model: ServedModel) {
        if let Some(slot) = self.slot_for(&model.name) {
            let _ = slot.loaded.set(ReadyModel::Generate(Box::new(model)));
        }
    }

    /// The embedding model named `info.name` is loaded.
    pub fn set_embedding_ready(&self, info: embeddings::EmbeddingModelInfo) {
        if let Some(slot) = self.slot_for(&info.name) {
            let _ = slot.loaded.set(ReadyModel::Embed(info));
        }
    }

    fn slot_for(&self, name: &str) -> Option<&Slot> {
        self.inner.slots.iter().find(|s| s.name == name)
    }

    /// The model named `requested`, or a 404 `model_not_found`.
    pub(crate) fn select(&self, requested: &str) -> Result<Selected, ApiError> {
        let index = self
            .inner
            .slots
            .iter()
            .position(|s| s.name == requested)
            .ok_or_else(|| ApiError::ModelNotFound(requested.to_string()))?;
        Ok(Selected {
            inner: Arc::clone(&self.inner),
            index,
        })
    }

    /// Where `model` is optional (`/tokenize`): the model named, else the only one served,
    /// else a 400 on `model` listing the names.
    pub(crate) fn select_or_only(&self, requested: Option<&str>) -> Result<Selected, ApiError> {
        match (requested, &self.inner.slots[..]) {
            (Some(name), _) => self.select(name),
            (None, [_]) => Ok(Selected {
                inner: Arc::clone(&self.inner),
                index: 0,
            }),
            (None, slots) => {
                let names: Vec<String> = slots.iter().map(|s| format!("`{}`", s.name)).collect();
                Err(ApiError::invalid(
                    "model",
                    format!(
                        "this server serves {} models ({}): name one in 'model'",
                        slots.len(),
                        names.join(", ")
                    ),
                ))
            }
        }
    }

    /// 503 until every model is loaded (or once an engine has failed for good).
    pub(crate) fn ready(&self) -> Result<(), ApiError> {
        for slot in &self.inner.slots {
            if slot.backend.has_failed() {
                return Err(ApiError::EngineStopped);
            }
            if slot.loaded.get().is_none() {
                return Err(ApiError::NotReady);
            }
        }
        Ok(())
    }

    pub(crate) fn api_key(&self) -> Option<&str> {
        self.inner.api_key.as_deref()
    }

    pub(crate) fn browser(&self) -> &BrowserPolicy {
        &self.inner.browser
    }

    /// Each model whose engine has work and has not moved for `--step-timeout`: its name
    /// and what the engine is in.
    fn stalls(&self) -> impl Iterator<Item = (&Slot, wick_core::Busy)> {
        let timeout = self.inner.step_timeout;
        self.inner.slots.iter().filter_map(move |slot| {
            let busy = slot.backend.busy()?;
            (busy.unmoved >= timeout?).then_some((slot, busy))
        })
    }

    /// A 503 naming the first stalled engine, if one is.
    pub(crate) fn check_stalls(&self) -> Result<(), ApiError> {
        match self.stalls().next() {
            Some((slot, busy)) => Err(ApiError::Stalled(format!(
                "The engine of model `{}` is stalled: it has not moved for {2:.0} s, in step {1} \
                 or just before it (--step-timeout {3:.0} s).",
                slot.name,
                busy.step,
                busy.unmoved.as_secs_f64(),
                self.inner.step_timeout.unwrap_or_default().as_secs_f64()
            ))),
            None => Ok(()),
        }
    }

    /// Watches the engines (with `--step-timeout`): a stall is logged with its step and
    /// counted in `wick_engine_stalls_total` once when it begins, and logged when it ends.
    /// Needs a tokio runtime.
    pub fn spawn_watchdog(&self) {
        let Some(timeout) = self.inner.step_timeout else {
            return;
        };
        let state = self.clone();
        let period = (timeout / 4).clamp(
            std::time::Duration::from_millis(50),
            std::time::Duration::from_secs(1),
        );
        tokio::spawn(async move {
            // Per slot: the step of the stall being reported, if one is.
            let mut stalled: Vec<Option<u64>> = vec![None; state.inner.slots.len()];
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                for (i, slot) in state.inner.slots.iter().enumerate() {
                    let busy = slot.backend.busy();
                    let now = busy.filter(|b| b.unmoved >= timeout);
                    match (stalled[i], now) {
                        (None, Some(b)) => {
                            slot.metrics.engine_stalls.inc();
                            tracing::error!(
                                model = %slot.name,
                                step = b.step,
                                seconds = b.unmoved.as_secs_f64(),
                                "engine stalled: the step has not finished within --step-timeout; /health and /health/live turn 503"
                            );
                            stalled[i] = Some(b.step);
                        }
                        (Some(step), None) => {
                            tracing::warn!(model = %slot.name, step, "engine moving again after a stall");
                            stalled[i] = None;
                        }
                        // Moved on, and stalled again before this tick saw it move.
                        (Some(step), Some(b)) if b.step != step => {
                            slot.metrics.engine_stalls.inc();
                            tracing::error!(model = %slot.name, step = b.step, seconds = b.unmoved.as_secs_f64(), "engine stalled again");
                            stalled[i] = Some(b.step);
                        }
                        _ => {}
                    }
                }
            }
        });
    }

    /// Every model's series, in one exposition.
    pub(crate) fn render_metrics(&self) -> String {
        let all: Vec<&Metrics> = self.inner.slots.iter().map(|s| &s.metrics).collect();
        Metrics::render_all(&all)
    }

    pub(crate) fn drain(&self) -> &Arc<ops::Drain> {
        &self.inner.drain
    }

    /// Whether shutdown has begun (see [`AppState::start_draining`]).
    pub fn is_draining(&self) -> bool {
        self.inner.drain.is_draining()
    }

    /// At shutdown, once the drain timeout has run out: every generation engine ends the
    /// requests it still has ([`EngineHandle::end_all`]).
    pub fn end_all(&self) {
        for slot in &self.inner.slots {
            if let Backend::Generate(h) = &slot.backend {
                h.end_all();
            }
        }
    }

    /// Whether any model's engine has failed for good.
    pub fn any_failed(&self) -> bool {
        self.inner.slots.iter().any(|s| s.backend.has_failed())
    }

    /// Every loaded model, in the order they were given.
    pub(crate) fn loaded(&self) -> impl Iterator<Item = &ReadyModel> {
        self.inner.slots.iter().filter_map(|s| s.loaded.get())
    }
}

impl Selected {
    fn slot(&self) -> &Slot {
        &self.inner.slots[self.index]
    }

    /// The generation model, once loaded and while its engine runs; a 400 for an
    /// embedding model.
    pub(crate) fn model(&self) -> Result<&ServedModel, ApiError> {
        let slot = self.slot();
        if slot.backend.has_failed() {
            return Err(ApiError::EngineStopped);
        }
        match slot.loaded.get() {
            Some(ReadyModel::Generate(m)) => Ok(m),
            Some(ReadyModel::Embed(m)) => Err(ApiError::invalid(
                "model",
                format!(
                    "`{}` is an embedding model: it serves /v1/embeddings, not text generation",
                    m.name
                ),
            )),
            None => Err(ApiError::NotReady),
        }
    }

    /// The embedding model and its queue; a 400 for a generation model.
    pub(crate) fn embedding_model(
        &self,
    ) -> Result<(&embeddings::EmbeddingModelInfo, &EmbedHandle), ApiError> {
        let slot = self.slot();
        if slot.backend.has_failed() {
            return Err(ApiError::EngineStopped);
        }
        match (slot.loaded.get(), &slot.backend) {
            (Some(ReadyModel::Embed(m)), Backend::Embed(h)) => Ok((m, h)),
            (Some(ReadyModel::Generate(m)), _) => Err(ApiError::invalid(
                "model",
                format!(
                    "`{}` is a text generation model, not an embedding model: it cannot serve /v1/embeddings",
                    m.name
                ),
            )),
            _ => Err(ApiError::NotReady),
        }
    }

    /// The generation model's engine.
    pub(crate) fn engine(&self) -> Result<&EngineHandle, ApiError> {
        match &self.slot().backend {
            Backend::Generate(h) => Ok(h),
            Backend::Embed(_) => Err(ApiError::Internal(
                "a generation request reached an embedding model's queue".into(),
            )),
        }
    }

    /// The model's series.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.slot().metrics
    }

    /// The model, once loaded.
    pub(crate) fn loaded(&self) -> Option<&ReadyModel> {
        self.slot().loaded.get()
    }

    pub(crate) fn next_id(&self) -> RequestId {
        RequestId(self.inner.next_id.fetch_add(1, Ordering::Relaxed))
    }
}
