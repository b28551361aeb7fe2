//! The `wick` binary: `wick serve` reads the configuration, binds the listener, starts the
//! engine thread (which loads the model and reports back), and serves the HTTP API.

#[cfg(feature = "dev")]
mod bench;
mod config;
mod export;
mod hub;
#[cfg(feature = "dev")]
mod soak;
mod telemetry;
#[cfg(feature = "dev")]
mod tools;

use std::future::IntoFuture;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::time::Duration;
use tokio::net::TcpListener;

use wick_core::Metrics;
use wick_engine::{EmbedConfig, EngineConfig, Loaded, Ready, StepRunner};
use wick_runner::{CacheConfig, LoadOptions, Runner};
use wick_server::{
    AppState, Backend, BrowserPolicy, EmbeddingModelInfo, ModelDetails, ModelEntry, ModelSpec,
    ServedModel, ServerOptions,
};

use crate::config::{Config, ModelSettings, ServeArgs};

/// Used when a model carries no chat template of its own.

#[derive(Parser)]
#[command(
    name = "wick",
    version,
    about = "An OpenAI-compatible LLM inference server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model over the OpenAI API.
    Serve(Box<ServeArgs>),
    /// Write a GGUF file's tokenizer as tokenizer.json + tokenizer_config.json.
    ExportTokenizer(export::ExportTokenizerArgs),
    // The developer tools (`--features dev`): load generator, soak, GPU-check tools.
    /// Load-test an OpenAI-compatible server (this one or another) over streaming requests.
    #[cfg(feature = "dev")]
    Bench(bench::BenchArgs),
    /// A long, hostile mixed load (disconnects, malformed requests), then checks that the
    /// server is whole: no 5xx, KV blocks back to 0, memory flat.
    #[cfg(feature = "dev")]
    Soak(soak::SoakArgs),
    /// Compare a model's log-probabilities on a device against the CPU (the GPU check).
    #[cfg(feature = "dev")]
    Parity(tools::ParityArgs),
    /// Decode-step time at several batch sizes, and where it goes (the GPU check).
    #[cfg(feature = "dev")]
    StepProfile(tools::StepProfileArgs),
    /// Write the tests' tiny random models of every family (for the GPU check).
    #[command(hide = true)]
    #[cfg(feature = "dev")]
    TinyModels(tools::TinyModelsArgs),
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")
    };
    let result = match cli.command {
        Command::Serve(args) => match Config::resolve(
            *args,
            matches.subcommand_matches("serve").unwrap_or(&matches),
        ) {
            Ok(cfg) => {
                let telemetry = match telemetry::init(
                    cfg.logging.format,
                    &cfg.logging.level,
                    cfg.logging.otlp_endpoint(),
                ) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("wick: invalid configuration: {e:#}");
                        return ExitCode::from(2);
                    }
                };
                let r = runtime().and_then(|rt| {
                    let r = rt.block_on(serve(cfg));
                    // Not waiting for blocking tasks: one may still wait on a load that a
                    // shutdown abandoned (the engine threads end with the process).
                    rt.shutdown_background();
                    r
                });
                drop(telemetry);
                r
            }
            Err(e) => {
                // A configuration error is a usage error, like a bad flag.
                eprintln!("wick: invalid configuration: {e:#}");
                return ExitCode::from(2);
            }
        },
        #[cfg(feature = "dev")]
        Command::Parity(args) => {
            let _ = telemetry::init(config::LogFormat::Human, "warn", None);
            match tools::parity(args) {
                Ok(true) => Ok(()),
                Ok(false) => return ExitCode::FAILURE,
                Err(e) => Err(e),
            }
        }
        #[cfg(feature = "dev")]
        Command::StepProfile(args) => {
            let _ = telemetry::init(config::LogFormat::Human, "warn", None);
            tools::step_profile(args)
        }
        Command::ExportTokenizer(args) => export::export_tokenizer(args),
        #[cfg(feature = "dev")]
        Command::TinyModels(args) => tools::tiny_models(args),
        #[cfg(feature = "dev")]
        Command::Bench(args) => {
            let _ = telemetry::init(config::LogFormat::Human, "info", None);
            runtime().and_then(|rt| rt.block_on(bench::run(args)).map(drop))
        }
        #[cfg(feature = "dev")]
        Command::Soak(args) => runtime().and_then(|rt| rt.block_on(soak::main(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wick: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let addr = format!("{}:{}", cfg.server.host, cfg.server.port);
    let listener = TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    // Generation models share the memory the KV caches may take.
    let generation_models = cfg.models.iter().filter(|m| !is_embedding(m)).count();
    let mut entries = Vec::new();
    let mut loading = Vec::new();
    let mut threads = Vec::new();
    for m in &cfg.models {
        let name = m.served_name();
        let metrics = Metrics::for_model(&name);
        let backend = if is_embedding(m) {
            let started = start_embedding(&cfg, m, name.clone(), metrics.clone())?;
            threads.push(started.thread);
            loading.push(Loading::Embed(started.ready));
            Backend::Embed(started.handle)
        } else {
            let started = start_generation(&cfg, m, generation_models, metrics.clone())?;
            threads.push(started.thread);
            loading.push(Loading::Generate(started.ready));
            Backend::Generate(started.handle)
        };
        entries.push(ModelEntry {
            name,
            backend,
            metrics,
        });
    }
    let bound = listener.local_addr().context("the listener's address")?;
    let browser = BrowserPolicy::for_listener(
        &bound.ip().to_string(),
        cfg.server.allowed_origins.clone(),
        cfg.server.allowed_hosts.clone(),
    );
    if !browser.check_host {
        tracing::info!(
            %addr,
            "not a loopback address: the Host header is not checked (--allowed-hosts turns the check on)"
        );
    }
    let options = ServerOptions {
        api_key: cfg.server.api_key.clone(),
        browser,
        step_timeout: cfg.server.step_timeout(),
    };
    let state = AppState::with_models(entries, options);
    state.spawn_watchdog();
    let names: Vec<String> = cfg.models.iter().map(ModelSettings::served_name).collect();
    tracing::info!(%addr, models = ?names, "listening; loading the models");

    let drain_timeout = Duration::from_secs_f64(cfg.server.drain_timeout);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(port) = cfg.server.metrics_port() {
        let maddr = format!("{}:{port}", cfg.server.host);
        let mlistener = TcpListener::bind(&maddr)
            .await
            .with_context(|| format!("cannot listen on {maddr} (metrics)"))?;
        let mut stopped = stop_rx.clone();
        let app = wick_server::metrics_app(state.clone());
        tokio::spawn(async move {
            let stop = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(mlistener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::error!(error = %e, "metrics listener failed");
            }
        });
        tracing::info!(addr = %maddr, "serving /metrics");
    }
    let server = axum::serve(listener, wick_server::app(state.clone()))
        .with_graceful_shutdown(drain(state.clone(), drain_timeout, stop_tx))
        .into_future();
    tokio::pin!(server);
    let all_loaded = async {
        // The models load at once, each on its own engine thread; each is marked ready as
        // it comes, and /health turns 200 with the last.
        for (m, wait) in cfg.models.iter().zip(loading) {
            wait.ready(m, &state).await?;
        }
        anyhow::Ok(())
    };
    tokio::select! {
        r = all_loaded => r?,
        res = &mut server => {
            // SIGTERM while loading (a rollout, a slow disk or download): nothing was
            // served, so there is nothing to drain; the load is abandoned.
            if state.is_draining() {
                tracing::warn!("shutdown while loading: the load is abandoned; exiting");
            }
            return res.context("server failed");
        }
    };
    // An engine thread ends while serving only if it failed for good: then readiness is
    // already 503; the clients in flight get their errors, and the process exits non-zero
    // so that an orchestrator restarts it. Never a live process with a dead engine.
    let engine_ended = futures::future::select_all(
        threads
            .into_iter()
            .map(|t| tokio::task::spawn_blocking(move || t.join())),
    );
    tokio::select! {
        res = &mut server => res.context("server failed"),
        (joined, _, _) = engine_ended => {
            let panicked = !matches!(joined, Ok(Ok(())));
            if state.any_failed() || panicked {
                state.wait_idle(Duration::from_secs(2)).await;
                bail!("an engine failed (see the error above); exiting so that the server is restarted");
            }
            server.await.context("server failed")
        }
    }
}

/// The CPU kernels' limit: `WICK_NO_AVX512=1` skips AVX-512, `WICK_NO_SIMD=1` every vector
/// kernel (for tests and comparisons; every set gives the same bits).
pub(crate) fn simd_limit() -> wick_runner::SimdLimit {
    wick_runner::SimdLimit::from_overrides(
        std::env::var_os("WICK_NO_AVX512").is_some(),
        std::env::var_os("WICK_NO_SIMD").is_some(),
    )
}

/// Whether `m` is served on /v1/embeddings (a local sentence-transformers directory).
fn is_embedding(m: &ModelSettings) -> bool {
    wick_runner::EmbeddingModel::is_embedding_model(&m.path)
}

/// A model's load under way, on its engine thread.
enum Loading {
    Generate(std::sync::mpsc::Receiver<Result<Ready, String>>),
    Embed(std::sync::mpsc::Receiver<Result<EmbeddingModelInfo, String>>),
}

impl Loading {
    /// Waits for the load; marks the model ready, or says why it could not load.
    async fn ready(self, m: &ModelSettings, state: &AppState) -> anyhow::Result<()> {
        let failed =
            |message: String| anyhow::anyhow!("cannot load model {}: {message}", m.path.display());
        match self {
            Loading::Generate(rx) => {
                let ready = wait_for(rx, m).await?.map_err(failed)?;
                let num_blocks = ready.num_blocks;
                let served = served_model(m, ready)?;
                tracing::info!(
                    model = %served.name,
                    max_model_len = served.max_model_len,
                    kv_cache_blocks = num_blocks,
                    "ready"
                );
                state.set_ready(served);
            }
            Loading::Embed(rx) => {
                let info = wait_for(rx, m).await?.map_err(failed)?;
                tracing::info!(
                    model = %info.name,
                    dimensions = info.dimensions,
                    max_input_tokens = info.max_input_tokens,
                    "ready (embeddings)"
                );
                state.set_embedding_ready(info);
            }
        }
        Ok(())
    }
}

/// What an engine thread's ready handshake brings, waited for off the reactor; an error if
/// the thread ended without sending it.
async fn wait_for<T: Send + 'static>(
    rx: std::sync::mpsc::Receiver<T>,
    m: &ModelSettings,
) -> anyhow::Result<T> {
    match tokio::task::spawn_blocking(move || rx.recv()).await {
        Ok(Ok(x)) => Ok(x),
        _ => bail!(
            "the engine thread stopped while loading the model {}",
            m.path.display()
        ),
    }
}

/// Starts an embedding model's engine thread (it loads the model there).
fn start_embedding(
    cfg: &Config,
    m: &ModelSettings,
    name: String,
    metrics: Metrics,
) -> anyhow::Result<wick_engine::EmbedStarted<EmbeddingModelInfo>> {
    let device = m.model.device.open()?;
    let path = m.path.clone();
    let embed_cfg = EmbedConfig {
        queue: cfg.queue.limits(),
        max_batch_inputs: EMBED_BATCH_INPUTS,
        max_batch_tokens: EMBED_BATCH_TOKENS,
    };
    wick_engine::start_embedding(embed_cfg, metrics, move || {
        let model = wick_runner::EmbeddingModel::load(&path, &device).map_err(|e| e.to_string())?;
        tracing::info!(
            pooling = ?model.pooling(),
            dimensions = model.dimensions(),
            path = %path.display(),
            "embedding model loaded"
        );
        let info = EmbeddingModelInfo {
            name,
            tokenizer: Arc::new(model.tokenizer().clone()),
            max_input_tokens: model.max_input_tokens(),
            dimensions: model.dimensions(),
            vocab_size: model.vocab_size(),
            details: embedding_details(&path),
        };
        Ok((model, info))
    })
    .context("cannot start the embedding thread")
}

/// Most inputs in one embedding batch, and most padded tokens: 32 inputs of the model's
/// longest (256 tokens for MiniLM) fit.
const EMBED_BATCH_INPUTS: usize = 64;
const EMBED_BATCH_TOKENS: usize = 8192;

/// Starts a generation model's engine thread (it loads the model there; with a Hub
/// repository, after the download, so that /health/live answers meanwhile).
fn start_generation(
    cfg: &Config,
    m: &ModelSettings,
    generation_models: usize,
    metrics: Metrics,
) -> anyhow::Result<wick_engine::Started> {
    let device = m.model.device.open()?;
    let (weight_format, dtype) = (m.model.weight_format, m.model.dtype.dtype());
    let engine_cfg = EngineConfig {
        scheduler: m.scheduler.scheduler_config(),
        queue: cfg.queue.limits(),
        max_queue_time: cfg.queue.max_queue_time(),
    };
    // Several generation models share the memory.
    let sizing = m.scheduler.kv_sizing(generation_models);
    let (spec, file, revision) = (
        m.path.clone(),
        m.model.file.clone(),
        m.model.revision.clone(),
    );
    let simd = simd_limit();
    wick_engine::start(engine_cfg, metrics, move || {
        // On the engine thread, so that /health/live answers during a Hub download.
        let path = hub::resolve(&spec, file.as_deref(), &revision).map_err(|e| format!("{e:#}"))?;
        let loaded = wick_runner::load(
            &path,
            &device,
            &LoadOptions {
                weight_format,
                dtype,
                simd,
                ..Default::default()
            },
        )
        .map_err(|e| e.to_string())?;
        let kv = sizing
            .size_for(&loaded.model, &device)
            .map_err(|e| e.to_string())?;
        let num_blocks = kv.blocks;
        let m = &loaded.model;
        let c = m.config();
        tracing::info!(
            kv_cache_blocks = num_blocks,
            kv_cache_mib = kv.bytes >> 20,
            kv_cache_sized_by = %kv.sized_by,
            family = c.family,
            parameters_m = c.parameters() / 1_000_000,
            weights = %m.weight_types(),
            weight_memory_mib = m.weight_bytes() / (1 << 20),
            layers = c.num_layers,
            context_length = c.max_position_embeddings,
            path = if m.runs_on_host() { "host" } else { "tensor" },
            "model loaded"
        );
        let cache = CacheConfig {
            num_blocks,
            block_size: sizing.block_size,
        };
        let runner = Runner::new(loaded.model, cache).map_err(|e| e.to_string())?;
        Ok(Loaded {
            runner: FaultInjection::from_env(runner)?,
            assets: loaded.assets,
            num_blocks,
        })
    })
    .context("cannot start the engine thread")
}

/// The runner, with test hooks: `WICK_TEST_PANIC_STEPS` (`all`, or step numbers from 0
/// separated by commas) makes those steps panic, so that the end-to-end tests can drive the
/// engine's panic containment through the real binary; `WICK_TEST_STALL_STEPS` (`N:SECS`,
/// comma-separated) makes step N take SECS seconds longer, for the watchdog. Unset, they
/// cost two branches a step.
struct FaultInjection {
    runner: Runner,
    panic_on: Option<Option<Vec<u64>>>,
    stall_on: Vec<(u64, Duration)>,
    steps: u64,
}

impl FaultInjection {
    fn from_env(runner: Runner) -> Result<Self, String> {
        let panic_on = match std::env::var("WICK_TEST_PANIC_STEPS") {
            Err(_) => None,
            Ok(v) if v == "all" => Some(None),
            Ok(v) => Some(Some(
                v.split(',')
                    .map(|n| n.trim().parse::<u64>())
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("WICK_TEST_PANIC_STEPS={v}: {e}"))?,
            )),
        };
        let stall_on = match std::env::var("WICK_TEST_STALL_STEPS") {
            Err(_) => Vec::new(),
            Ok(v) => v
                .split(',')
                .map(|item| {
                    let (n, secs) = item.trim().split_once(':')?;
                    let secs = secs
                        .parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite() && *s >= 0.0)?;
                    Some((n.parse::<u64>().ok()?, Duration::from_secs_f64(secs)))
                })
                .collect::<Option<_>>()
                .ok_or_else(|| format!("WICK_TEST_STALL_STEPS={v}: expected STEP:SECONDS[,...]"))?,
        };
        Ok(Self {
            runner,
            panic_on,
            stall_on,
            steps: 0,
        })
    }
}

impl FaultInjection {
    fn before_step(&mut self) {
        let n = self.steps;
        self.steps += 1;
        if let Some(&(_, pause)) = self.stall_on.iter().find(|(step, _)| *step == n) {
            std::thread::sleep(pause);
        }
        if let Some(on) = &self.panic_on {
            if on.as_ref().is_none_or(|steps| steps.contains(&n)) {
                panic!("WICK_TEST_PANIC_STEPS: step {n}");
            }
        }
    }
}

impl StepRunner for FaultInjection {
    fn step(
        &mut self,
        batch: &wick_core::ScheduledBatch,
    ) -> Result<Vec<Vec<f32>>, wick_runner::RunnerError> {
        self.before_step();
        StepRunner::step(&mut self.runner, batch)
    }

    fn attention_seconds(&self) -> Option<f64> {
        self.runner.attention_seconds()
    }

    fn step_sampling(
        &mut self,
        batch: &wick_core::ScheduledBatch,
        seqs: &mut [wick_runner::SeqSampling<'_>],
    ) -> Result<Vec<wick_runner::Draw>, wick_runner::RunnerError> {
        self.before_step();
        StepRunner::step_sampling(&mut self.runner, batch, seqs)
    }
}

fn served_model(cfg: &ModelSettings, ready: Ready) -> anyhow::Result<ServedModel> {
    let a = ready.assets;
    let chat_template = match &cfg.model.chat_template {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the chat template {}", path.display()))?,
        ),
        None => a.chat_template,
    };
    Ok(ServedModel::new(ModelSpec {
        name: cfg.served_name(),
        tokenizer: a.tokenizer,
        chat_template,
        bos_token: a.bos_token,
        eos_token: a.eos_token,
        add_bos: a.add_bos,
        stop_token_ids: a.stop_token_ids,
        max_model_len: ready.max_model_len,
        context_length: a.max_model_len,
        max_tokens_default: (cfg.model.max_tokens_default > 0)
            .then_some(cfg.model.max_tokens_default),
        details: details(a.facts),
    })?)
}

fn details(f: wick_runner::ModelFacts) -> ModelDetails {
    ModelDetails {
        format: f.format.to_string(),
        family: f.family.to_string(),
        parameters: f.parameters,
        quantization: f.quantization,
        size_bytes: f.size_bytes,
        modified: f.modified,
    }
}

/// A sentence-transformers directory's listing facts: its weight files' size and time.
fn embedding_details(dir: &std::path::Path) -> ModelDetails {
    let files = std::fs::read_dir(dir).into_iter().flatten().flatten();
    let mut d = ModelDetails {
        format: "safetensors".into(),
        family: "bert".into(),
        ..ModelDetails::default()
    };
    for m in files
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| e.metadata().ok())
    {
        d.size_bytes += m.len();
        d.modified = d.modified.max(m.modified().ok());
    }
    d
}

/// Graceful drain: on SIGTERM or SIGINT, readiness and new requests turn 503 at once while
/// the requests in flight finish; after `timeout` the engine ends the rest with an error.
/// Returning lets axum stop accepting and close the (now idle) connections.
async fn drain(state: AppState, timeout: Duration, stop: tokio::sync::watch::Sender<bool>) {
    shutdown_signal().await;
    state.start_draining();
    if state.wait_idle(timeout).await {
        tracing::info!("drained: every request finished");
    } else {
        tracing::warn!(
            in_flight = state.in_flight(),
            timeout_s = timeout.as_secs_f64(),
            "drain timeout: ending the requests still in flight"
        );
        state.end_all();
        if !state.wait_idle(Duration::from_secs(5)).await {
            tracing::warn!(
                in_flight = state.in_flight(),
                "exiting with requests unfinished"
            );
        }
    }
    let _ = stop.send(true);
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal: draining");
}
