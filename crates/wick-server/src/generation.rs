//! From a validated request to engine submissions (one per choice), and from each choice's
//! token events back to text pieces: detokenized, stop strings applied, log-probabilities
//! attached to the text they produced.

use std::sync::Arc;
use std::time::Instant;

use futures::stream::{self, Stream, StreamExt};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use wick_core::{
    EngineRequest, ErrorKind, FinishReason, SubmitError, TokenConstraint, TokenEvent, TokenLogprobs,
};

use crate::detok::{Detokenizer, StopBuffer};
use crate::openai::Usage;
use crate::routes::blocking;
use crate::structured::ResponseFormat;
use crate::validate::ValidSampling;
use crate::{ApiError, AppState, RequestTag, ServedModel};

/// One generated token, with its log-probabilities if asked for.
#[derive(Debug, Clone)]
pub(crate) struct GenToken {
    pub id: u32,
    pub logprobs: Option<TokenLogprobs>,
}

/// What a generation yields, in order: text pieces, then one end.
pub(crate) enum Piece {
    Text { text: String, tokens: Vec<GenToken> },
    Finish { reason: &'static str, usage: Usage },
    Error(ApiError),
}

/// One choice's token events turned into text.
pub(crate) struct Generation {
    rx: UnboundedReceiver<TokenEvent>,
    detok: Detokenizer,
    stop: StopBuffer,
    prompt_tokens: usize,
    completion_tokens: usize,
    tokens: Vec<GenToken>,
    pending: Option<Piece>,
    done: bool,
}

impl Generation {
    fn new(
        rx: UnboundedReceiver<TokenEvent>,
        model: &ServedModel,
        stops: Vec<String>,
        prompt_tokens: usize,
    ) -> Self {
        Self {
            rx,
            detok: Detokenizer::new(Arc::clone(&model.tokenizer)),
            stop: StopBuffer::new(stops),
            prompt_tokens,
            completion_tokens: 0,
            tokens: Vec::new(),
            pending: None,
            done: false,
        }
    }

    /// Ends the generation; the receiver is closed, so the engine frees the sequence.
    fn end(&mut self, piece: Piece, text: String) -> Option<Piece> {
        self.done = true;
        self.rx.close();
        if text.is_empty() {
            return Some(piece);
        }
        self.pending = Some(piece);
        Some(self.text(text))
    }

    fn text(&mut self, text: String) -> Piece {
        Piece::Text {
            text,
            tokens: std::mem::take(&mut self.tokens),
        }
    }

    pub(crate) async fn next(&mut self) -> Option<Piece> {
        if let Some(p) = self.pending.take() {
            return Some(p);
        }
        if self.done {
            return None;
        }
        loop {
            match self.rx.recv().await {
                Some(TokenEvent::Token { id, logprobs }) => {
                    self.completion_tokens += 1;
                    self.tokens.push(GenToken { id, logprobs });
                    let text = self.detok.push(id);
                    let (emit, stopped) = self.stop.push(&text);
                    if stopped {
                        let usage = Usage::new(self.prompt_tokens, self.completion_tokens);
                        return self.end(
                            Piece::Finish {
                                reason: "stop",
                                usage,
                            },
                            emit,
                        );
                    }
                    if !emit.is_empty() {
                        return Some(self.text(emit));
                    }
                }
                Some(TokenEvent::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    let (mut rest, stopped) = self.stop.push(&self.detok.flush());
                    if !stopped {
                        rest.push_str(&self.stop.finish());
                    }
                    let reason = match reason {
                        FinishReason::Stop => "stop",
                        FinishReason::Length => "length",
                        FinishReason::Abort => {
                            let e = ApiError::Internal("the request was aborted".into());
                            return self.end(Piece::Error(e), rest);
                        }
                    };
                    let usage = Usage::new(prompt_tokens, completion_tokens);
                    return self.end(Piece::Finish { reason, usage }, rest);
                }
                Some(TokenEvent::Error { kind, message }) => {
                    let e = match kind {
                        ErrorKind::QueueTimeout => ApiError::QueueTimeout(message),
                        ErrorKind::Rejected => ApiError::InvalidRequest {
                            message,
                            param: Some("max_tokens".into()),
                            code: Some("context_length_exceeded"),
                        },
                        ErrorKind::Internal => ApiError::Internal(message),
                        ErrorKind::Shutdown => ApiError::Drained(message),
                    };
                    return self.end(Piece::Error(e), String::new());
                }
                None => return self.end(Piece::Error(ApiError::EngineStopped), String::new()),
            }
        }
    }
}

/// One choice: its index, its first piece (already received) and the rest.
pub(crate) struct Run {
    pub index: usize,
    pub first: Option<Piece>,
    pub gen: Generation,
}

impl Run {
    pub(crate) async fn next(&mut self) -> Option<Piece> {
        match self.first.take() {
            Some(p) => Some(p),
            None => self.gen.next().await,
        }
    }

    /// The pieces as a stream of `(choice index, piece)`.
    pub(crate) fn into_stream(self) -> impl Stream<Item = (usize, Piece)> + Send {
        stream::unfold(self, |mut run| async move {
            let piece = run.next().await?;
            Some(((run.index, piece), run))
        })
    }
}

/// Pieces of several runs as they come, each tagged with its choice index.
pub(crate) fn merge(runs: Vec<Run>) -> impl Stream<Item = (usize, Piece)> + Send {
    stream::select_all(runs.into_iter().map(|r| r.into_stream().boxed()))
}

/// How many tokens a request may generate, or a 400 if the prompt leaves no room.
pub(crate) fn output_budget(
    model: &ServedModel,
    prompt_len: usize,
    max_tokens: Option<usize>,
    param: &str,
) -> Result<usize, ApiError> {
    let limit = model.max_model_len;
    if prompt_len >= limit {
        return Err(ApiError::InvalidRequest {
            message: format!("This model's maximum context length is {limit} tokens; the prompt takes {prompt_len}."),
            param: Some(param.into()),
            code: Some("context_length_exceeded"),
        });
    }
    match max_tokens {
        Some(m) if prompt_len + m > limit => Err(ApiError::InvalidRequest {
            message: format!("This model's maximum context length is {limit} tokens; the prompt takes {prompt_len} and max_tokens asks for {m}."),
            param: Some("max_tokens".into()),
            code: Some("context_length_exceeded"),
        }),
        Some(m) => Ok(m),
        None => Ok(limit - prompt_len),
    }
}

/// Submits `n` choices for each prompt (choice index `prompt * n + j`) and waits for each
/// one's first event, so that an engine refusal becomes this request's status code.
pub(crate) async fn submit(
    state: &AppState,
    tag: &RequestTag,
    model: &ServedModel,
    prompts: &[Vec<u32>],
    sampling: &ValidSampling,
    format: &ResponseFormat,
    prompt_param: &str,
) -> Result<Vec<Run>, ApiError> {
    let mut constraints = compile(state, format, prompts.len() * sampling.n)
        .await?
        .into_iter();
    let mut runs = Vec::with_capacity(prompts.len() * sampling.n);
    for (p, prompt) in prompts.iter().enumerate() {
        let max_tokens = output_budget(model, prompt.len(), sampling.max_tokens, prompt_param)?;
        if let Some(&(id, _)) = sampling
            .params
            .logit_bias
            .iter()
            .find(|(id, _)| *id as usize >= model.vocab_size)
        {
            return Err(ApiError::invalid(
                "logit_bias",
                format!(
                    "token id {id} is not in the vocabulary (size {})",
                    model.vocab_size
                ),
            ));
        }
        for j in 0..sampling.n {
            let mut params = sampling.params.clone();
            // Choices of one request differ, reproducibly when seeded.
            params.seed = params.seed.map(|s| s.wrapping_add(j as u64));
            let (tx, rx) = unbounded_channel();
            state
                .engine()
                .submit(EngineRequest {
                    id: state.next_id(),
                    tag: tag.0.to_string(),
                    prompt: prompt.clone(),
                    max_tokens,
                    stop_token_ids: if sampling.ignore_eos {
                        Vec::new()
                    } else {
                        model.stop_token_ids.clone()
                    },
                    sampling: params,
                    arrived: Instant::now(),
                    events: tx,
                    constraint: constraints.next().flatten(),
                })
                .map_err(|e| submit_error(state, e))?;
            runs.push(Run {
                index: p * sampling.n + j,
                first: None,
                gen: Generation::new(rx, model, sampling.stop.clone(), prompt.len()),
            });
        }
    }
    for run in &mut runs {
        match run.gen.next().await {
            Some(Piece::Error(e)) => return Err(e),
            Some(piece) => run.first = Some(piece),
            None => return Err(ApiError::EngineStopped),
        }
    }
    Ok(runs)
}

/// One grammar per choice, compiled on a blocking thread (never on the engine's).
async fn compile(
    state: &AppState,
    format: &ResponseFormat,
    count: usize,
) -> Result<Vec<Option<Box<dyn TokenConstraint>>>, ApiError> {
    if *format == ResponseFormat::Text {
        return Ok((0..count).map(|_| None).collect());
    }
    let state = state.clone();
    let format = format.clone();
    blocking(move || {
        let grammars = state.model()?.grammars.clone().ok_or_else(|| {
            ApiError::unsupported(
                "response_format",
                "(structured output) for this model's tokenizer",
            )
        })?;
        (0..count)
            .map(|_| {
                let c = grammars.constraint(&format)?;
                Ok(c.map(|c| Box::new(c) as Box<dyn TokenConstraint>))
            })
            .collect()
    })
    .await
}

fn submit_error(state: &AppState, e: SubmitError) -> ApiError {
    match e {
        SubmitError::QueueFull {
            waiting,
            waiting_tokens,
            retry_after_secs,
        } => {
            state
                .metrics()
                .failure(wick_core::metrics::error_type::QUEUE_FULL);
            ApiError::QueueFull {
                waiting,
                waiting_tokens,
                retry_after: retry_after_secs,
            }
        }
        SubmitError::EngineStopped => ApiError::EngineStopped,
    }
}

/// One choice's whole output, for a non-streaming answer.
pub(crate) struct Finished {
    pub index: usize,
    pub text: String,
    /// Every token with its log-probabilities, in order.
    pub tokens: Vec<GenToken>,
    pub reason: &'static str,
}

/// Runs every choice to its end; returns them in index order, and the usage of all.
pub(crate) async fn finish_all(
    runs: Vec<Run>,
    prompts: &[Vec<u32>],
) -> Result<(Vec<Finished>, Usage), ApiError> {
    let results = futures::future::join_all(runs.into_iter().map(|mut run| async move {
        let mut text = String::new();
        let mut tokens = Vec::new();
        while let Some(piece) = run.next().await {
            match piece {
                Piece::Text {
                    text: t,
                    tokens: ts,
                } => {
                    tokens.extend(ts);
                    text.push_str(&t);
                }
                Piece::Error(e) => return Err(e),
                Piece::Finish { reason, usage } => {
                    let index = run.index;
                    return Ok((
                        Finished {
                            index,
                            text,
                            tokens,
                            reason,
                        },
                        usage,
                    ));
                }
            }
        }
        Err(ApiError::Internal(
            "the generation ended without a finish".into(),
        ))
    }))
    .await;
    let mut done = Vec::with_capacity(results.len());
    let mut usages = Vec::with_capacity(results.len());
    for r in results {
        let (f, u) = r?;
        done.push(f);
        usages.push(u);
    }
    done.sort_by_key(|f| f.index);
    Ok((done, total_usage(prompts, &usages)))
}

/// Usage over several choices: each prompt counted once.
pub(crate) fn total_usage(prompts: &[Vec<u32>], per_choice: &[Usage]) -> Usage {
    let prompt_tokens = prompts.iter().map(Vec::len).sum();
    let completion_tokens = per_choice.iter().map(|u| u.completion_tokens).sum();
    Usage::new(prompt_tokens, completion_tokens)
}
