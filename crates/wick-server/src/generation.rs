//! From a [`GenRequest`] (any API shape) to engine submissions, one per choice, with every
//! check that needs the model made here; and from each choice's token events back to
//! pieces: text detokenized, stop strings applied, log-probabilities attached to the text
//! they produced, then split into reasoning, content and tool calls.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use futures::stream::{self, Stream, StreamExt};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use wick_core::{
    EngineRequest, ErrorKind, FinishReason, SubmitError, TokenConstraint, TokenEvent, TokenLogprobs,
};

use crate::detok::{Detokenizer, StopBuffer};
use crate::http::blocking;
use crate::openai::Usage;
use crate::structured::{Grammars, ResponseFormat};
use crate::tools::parse::{Out, OutputParser, Thinking};
use crate::tools::{ToolFormat, ToolSpec};
use crate::validate::{GenInput, GenRequest, PromptInput, ValidSampling};
use crate::{ApiError, AppState, RequestTag, Selected, ServedModel};

/// One generated token, with its log-probabilities if asked for.
#[derive(Debug, Clone)]
pub(crate) struct GenToken {
    pub id: u32,
    pub logprobs: Option<TokenLogprobs>,
}

/// How a choice ended, kept as a type until each dialect writes it in its own words (a
/// matched stop string is `Stop` with the `stop_sequence` beside it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Finish {
    /// The model ended its turn, or a stop string or token matched.
    #[default]
    Stop,
    /// The output budget (`max_tokens`, or the context) ran out.
    Length,
    /// The turn ended with tool calls.
    ToolCalls,
}

impl Finish {
    /// OpenAI's `finish_reason` (chat and text completions).
    pub(crate) fn openai(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::ToolCalls => "tool_calls",
        }
    }
}

/// What a generation yields, in order: text, reasoning and call pieces, then one end.
pub(crate) enum Piece {
    /// Content (the answer's text).
    Text {
        text: String,
        tokens: Vec<GenToken>,
    },
    Reasoning(String),
    /// A tool call begins; its arguments follow in `Args` pieces. `tokens`: those that
    /// wrote it (for their log-probabilities).
    Call {
        call: usize,
        id: String,
        name: String,
        tokens: Vec<GenToken>,
    },
    Args {
        call: usize,
        args: String,
        tokens: Vec<GenToken>,
    },
    /// How the choice ended; `stop_sequence` the stop string that ended it.
    Finish {
        reason: Finish,
        usage: Usage,
        stop_sequence: Option<String>,
    },
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
        visible: Vec<u32>,
    ) -> Self {
        Self {
            rx,
            detok: Detokenizer::new(Arc::clone(&model.tokenizer)).with_visible(visible),
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
                        let stop_sequence = self.stop.matched().map(str::to_string);
                        return self.end(
                            Piece::Finish {
                                reason: Finish::Stop,
                                usage,
                                stop_sequence,
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
                        FinishReason::Stop => Finish::Stop,
                        FinishReason::Length => Finish::Length,
                        FinishReason::Abort => {
                            let e = ApiError::Internal("the request was aborted".into());
                            return self.end(Piece::Error(e), rest);
                        }
                    };
                    let usage = Usage::new(prompt_tokens, completion_tokens);
                    let stop_sequence = self.stop.matched().map(str::to_string);
                    let finish = Piece::Finish {
                        reason,
                        usage,
                        stop_sequence,
                    };
                    return self.end(finish, rest);
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

/// One choice: its index, its first piece (already received) and the rest, split into
/// reasoning, content and tool calls when the request needs it.
pub(crate) struct Run {
    pub index: usize,
    first: Option<Piece>,
    gen: Generation,
    parser: Option<OutputParser>,
    ready: VecDeque<Piece>,
    /// Tokens whose text the parser holds back.
    tokens: Vec<GenToken>,
}

impl Run {
    pub(crate) async fn next(&mut self) -> Option<Piece> {
        loop {
            if let Some(p) = self.ready.pop_front() {
                return Some(p);
            }
            let piece = match self.first.take() {
                Some(p) => p,
                None => self.gen.next().await?,
            };
            let Some(parser) = &mut self.parser else {
                return Some(piece);
            };
            match piece {
                Piece::Text { text, tokens } => {
                    let outs = parser.push(&text);
                    self.queue(outs, tokens);
                }
                Piece::Finish {
                    reason,
                    usage,
                    stop_sequence,
                } => {
                    let outs = parser.finish();
                    let reason = if parser.calls() > 0 && reason == Finish::Stop {
                        Finish::ToolCalls
                    } else {
                        reason
                    };
                    self.queue(outs, Vec::new());
                    self.ready.push_back(Piece::Finish {
                        reason,
                        usage,
                        stop_sequence,
                    });
                }
                other => return Some(other),
            }
        }
    }

    /// Parsed pieces, ready to go. Tokens (for their log-probabilities) go with the next
    /// content or call piece, held while the parser holds their text; those that became
    /// reasoning are not reported.
    fn queue(&mut self, outs: Vec<Out>, tokens: Vec<GenToken>) {
        self.tokens.extend(tokens);
        for o in outs {
            self.ready.push_back(match o {
                Out::Content(text) => Piece::Text {
                    text,
                    tokens: std::mem::take(&mut self.tokens),
                },
                Out::Reasoning(t) => {
                    self.tokens.clear();
                    Piece::Reasoning(t)
                }
                Out::Call { index, id, name } => Piece::Call {
                    call: index,
                    id,
                    name,
                    tokens: std::mem::take(&mut self.tokens),
                },
                Out::Args { index, args } => Piece::Args {
                    call: index,
                    args,
                    tokens: std::mem::take(&mut self.tokens),
                },
            });
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

/// How many tokens a request may generate (without `max_tokens`: the model's default, never
/// more than the context leaves), or a 400 if the prompt leaves no room. The context is the
/// model's, or a smaller one the request asks for (`sampling.context`); with
/// `sampling.clamp_max_tokens`, a `max_tokens` past it is cut to what it leaves.
pub(crate) fn output_budget(
    model: &ServedModel,
    prompt_len: usize,
    sampling: &ValidSampling,
    param: &str,
) -> Result<usize, ApiError> {
    let (limit, whose) = match sampling.context {
        Some(c) if c < model.max_model_len => (c, "This request's context (num_ctx)"),
        _ => (model.max_model_len, "This model's maximum context length"),
    };
    if prompt_len >= limit {
        return Err(ApiError::InvalidRequest {
            message: format!("{whose} is {limit} tokens; the prompt takes {prompt_len}."),
            param: Some(param.into()),
            code: Some("context_length_exceeded"),
        });
    }
    let room = limit - prompt_len;
    match sampling.max_tokens {
        Some(m) if m > room && sampling.clamp_max_tokens => Ok(room),
        Some(m) if m > room => Err(ApiError::InvalidRequest {
            message: format!("{whose} is {limit} tokens; the prompt takes {prompt_len} and max_tokens asks for {m}."),
            param: Some("max_tokens".into()),
            code: Some("context_length_exceeded"),
        }),
        Some(m) => Ok(m),
        None => Ok(model.max_tokens_default.map_or(room, |d| d.min(room))),
    }
}

/// A generation under way: one run per choice, and what every answer reports.
pub(crate) struct Submitted {
    /// The request's model.
    pub state: Selected,
    pub runs: Vec<Run>,
    pub prompts: Vec<Vec<u32>>,
    /// The served model's name.
    pub model: String,
    /// Whether the sampling asked for a stream.
    pub stream: bool,
    pub include_usage: bool,
    /// Whether the answer may be tool calls.
    pub tools: bool,
}

/// A request checked against its model and ready for the engine: every rule has passed,
/// the prompts are token ids that fit the context, the grammars are compiled. Only this
/// reaches [`submit`].
pub(crate) struct ValidRequest {
    pub state: Selected,
    pub req: GenRequest,
    /// Each prompt's token ids and output budget.
    pub prompts: Vec<(Vec<u32>, usize)>,
    pub thinking: Thinking,
    pub tool_format: Option<ToolFormat>,
    /// One per choice (`prompts.len() * n`), in choice order.
    pub constraints: Vec<Option<Box<dyn TokenConstraint>>>,
}

/// The rules on `req` that need only the model: tools against the response format and the
/// template, `logit_bias` against the vocabulary. Returns how tool calls are written.
fn check(model: &ServedModel, req: &GenRequest) -> Result<Option<ToolFormat>, ApiError> {
    let tool_format = if req.tools.active() {
        if req.format != ResponseFormat::Text {
            return Err(ApiError::invalid(
                "response_format",
                "a JSON response format cannot be combined with tools",
            ));
        }
        let format = model.tool_format()?;
        tracing::debug!(syntax = format.syntax.name(), choice = ?req.tools.choice, "tool calls");
        Some(format)
    } else {
        None
    };
    if let Some(&(id, _)) = req
        .sampling
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
    Ok(tool_format)
}

/// Checks `req` against the model it names ([`check`]), renders and tokenizes its prompts
/// off the reactor, compiles its grammars and checks each prompt's context budget.
pub(crate) async fn validate(state: &AppState, req: GenRequest) -> Result<ValidRequest, ApiError> {
    let state = state.select(&req.model)?;
    let model = state.model()?;
    if let Some(user) = &req.sampling.user {
        tracing::info!(user = %user, "generation request");
    }
    let tool_format = check(model, &req)?;
    let (prompts, thinking) = {
        let state = state.clone();
        let (input, tools, param) = (req.input.clone(), req.tools.clone(), req.prompt_param);
        blocking(move || tokenize(state.model()?, input, &tools, param)).await?
    };
    let count = prompts.len() * req.sampling.n;
    let constraints = match tool_format {
        Some(f) => compile_tools(&state, f, &req.tools, count).await?,
        None => compile(&state, &req.format, count).await?,
    };
    let prompts = prompts
        .into_iter()
        .map(|p| {
            let budget = output_budget(model, p.len(), &req.sampling, req.prompt_param)?;
            Ok((p, budget))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(ValidRequest {
        state,
        req,
        prompts,
        thinking,
        tool_format,
        constraints,
    })
}

/// Submits `n` choices per prompt of a validated request (choice index `prompt * n + j`)
/// and returns their runs; a full queue is the request's 429.
pub(crate) fn submit(tag: &RequestTag, valid: ValidRequest) -> Result<Submitted, ApiError> {
    let ValidRequest {
        state,
        req,
        prompts,
        thinking,
        tool_format,
        constraints,
    } = valid;
    let model = state.model()?;
    let sampling = &req.sampling;
    let mut constraints = constraints.into_iter();
    let visible: Vec<u32> = tool_format
        .and_then(|f| f.start_token)
        .into_iter()
        .collect();
    let parse = thinking != Thinking::Never || tool_format.is_some();
    let mut runs = Vec::with_capacity(prompts.len() * sampling.n);
    for (p, (prompt, max_tokens)) in prompts.iter().enumerate() {
        for j in 0..sampling.n {
            let mut params = sampling.params.clone();
            // Choices of one request differ, reproducibly when seeded.
            params.seed = params.seed.map(|s| s.wrapping_add(j as u64));
            let (tx, rx) = unbounded_channel();
            state
                .engine()?
                .submit(EngineRequest {
                    id: state.next_id(),
                    tag: tag.0.to_string(),
                    prompt: prompt.clone(),
                    max_tokens: *max_tokens,
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
                .map_err(|e| submit_error(&state, e))?;
            runs.push(Run {
                index: p * sampling.n + j,
                first: None,
                gen: Generation::new(
                    rx,
                    model,
                    sampling.stop.clone(),
                    prompt.len(),
                    visible.clone(),
                ),
                parser: parse.then(|| {
                    let names = req.tools.tools.iter().map(|t| t.name.clone()).collect();
                    OutputParser::new(thinking, tool_format.map(|f| f.syntax), names)
                }),
                ready: VecDeque::new(),
                tokens: Vec::new(),
            });
        }
    }
    Ok(Submitted {
        model: model.name.clone(),
        stream: sampling.stream,
        include_usage: sampling.include_usage,
        tools: tool_format.is_some(),
        prompts: prompts.into_iter().map(|(p, _)| p).collect(),
        runs,
        state,
    })
}

/// Validates and submits `req`, then waits for each choice's first event, so that an engine
/// refusal becomes this request's status code.
pub(crate) async fn start(
    state: &AppState,
    tag: &RequestTag,
    req: GenRequest,
) -> Result<Submitted, ApiError> {
    let mut submitted = submit(tag, validate(state, req).await?)?;
    for run in &mut submitted.runs {
        match run.gen.next().await {
            Some(Piece::Error(e)) => return Err(e),
            Some(piece) => run.first = Some(piece),
            None => return Err(ApiError::EngineStopped),
        }
    }
    Ok(submitted)
}

/// How many tokens `req`'s prompt takes, rendered as a generation would render it.
pub(crate) async fn count_prompt(state: &AppState, req: GenRequest) -> Result<usize, ApiError> {
    let state = &state.select(&req.model)?;
    let model = state.model()?;
    if req.tools.active() {
        model.tool_format()?;
    }
    let state = state.clone();
    blocking(move || {
        let (prompts, _) = tokenize(state.model()?, req.input, &req.tools, req.prompt_param)?;
        Ok(prompts.iter().map(Vec::len).sum())
    })
    .await
}

/// The prompts' token ids (chat messages rendered with the template, and the tools when
/// they are in play), and where the output starts relative to the model's thinking.
pub(crate) fn tokenize(
    model: &ServedModel,
    input: GenInput,
    tools: &ToolSpec,
    param: &str,
) -> Result<(Vec<Vec<u32>>, Thinking), ApiError> {
    match input {
        GenInput::Chat(messages) => {
            let template = model.chat_template()?;
            let text = template
                .render(&messages, tools.template_values().as_deref())
                .map_err(|e| ApiError::invalid(param, e.to_string()))?;
            let thinking = Thinking::detect(template.source(), &text);
            Ok((vec![model.encode(&text, param)?], thinking))
        }
        GenInput::Prompts(prompts) => {
            let ids = prompts
                .into_iter()
                .map(|p| match p {
                    PromptInput::Text(t) => model.encode(&t, param),
                    PromptInput::Ids(ids) => model.check_ids(ids, param),
                })
                .collect::<Result<Vec<_>, ApiError>>()?;
            Ok((ids, Thinking::Never))
        }
    }
}

/// The tools' grammar, one per choice, compiled on a blocking thread.
async fn compile_tools(
    state: &Selected,
    format: ToolFormat,
    spec: &ToolSpec,
    count: usize,
) -> Result<Vec<Option<Box<dyn TokenConstraint>>>, ApiError> {
    let spec = spec.clone();
    let why = "(constrained tool calls) for this model's tokenizer";
    compile_each(state, "tools", why, count, move |g| {
        g.tool_constraint(format, &spec)
    })
    .await
}

/// One grammar per choice, compiled on a blocking thread (never on the engine's).
async fn compile(
    state: &Selected,
    format: &ResponseFormat,
    count: usize,
) -> Result<Vec<Option<Box<dyn TokenConstraint>>>, ApiError> {
    if *format == ResponseFormat::Text {
        return Ok((0..count).map(|_| None).collect());
    }
    let format = format.clone();
    let why = "(structured output) for this model's tokenizer";
    compile_each(state, "response_format", why, count, move |g| {
        let c = g.constraint(&format)?;
        Ok(c.map(|c| Box::new(c) as Box<dyn TokenConstraint>))
    })
    .await
}

/// `count` constraints made by `make` from the model's grammar support, on a blocking
/// thread; a 400 naming `param` where the model's tokenizer has none.
async fn compile_each<F>(
    state: &Selected,
    param: &'static str,
    unsupported: &'static str,
    count: usize,
    make: F,
) -> Result<Vec<Option<Box<dyn TokenConstraint>>>, ApiError>
where
    F: Fn(&Grammars) -> Result<Option<Box<dyn TokenConstraint>>, ApiError> + Send + 'static,
{
    let state = state.clone();
    blocking(move || {
        let grammars = state.model()?.grammars.clone();
        let grammars = grammars.ok_or_else(|| ApiError::unsupported(param, unsupported))?;
        (0..count).map(|_| make(&grammars)).collect()
    })
    .await
}

pub(crate) fn submit_error(state: &Selected, e: SubmitError) -> ApiError {
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

/// A tool call in a finished answer.
#[derive(Debug, Clone)]
pub(crate) struct CallOut {
    pub id: String,
    pub name: String,
    /// The arguments' JSON text, as the model wrote it.
    pub arguments: String,
}

/// One choice's whole output, for a non-streaming answer: its pieces joined.
#[derive(Default)]
pub(crate) struct Finished {
    pub index: usize,
    pub text: String,
    pub reasoning: String,
    pub calls: Vec<CallOut>,
    /// Every content and tool-call token with its log-probabilities, in order.
    pub tokens: Vec<GenToken>,
    pub reason: Finish,
    pub stop_sequence: Option<String>,
    pub usage: Usage,
}

impl Finished {
    /// Adds one piece; `Some` once the choice has ended.
    fn add(&mut self, piece: Piece) -> Option<Result<(), ApiError>> {
        match piece {
            Piece::Text { text, tokens } => {
                self.tokens.extend(tokens);
                self.text.push_str(&text);
            }
            Piece::Reasoning(t) => self.reasoning.push_str(&t),
            Piece::Call {
                id, name, tokens, ..
            } => {
                self.tokens.extend(tokens);
                self.calls.push(CallOut {
                    id,
                    name,
                    arguments: String::new(),
                })
            }
            Piece::Args { call, args, tokens } => {
                self.tokens.extend(tokens);
                if let Some(c) = self.calls.get_mut(call) {
                    c.arguments.push_str(&args);
                }
            }
            Piece::Error(e) => return Some(Err(e)),
            Piece::Finish {
                reason,
                usage,
                stop_sequence,
            } => {
                self.reason = reason;
                self.usage = usage;
                self.stop_sequence = stop_sequence;
                return Some(Ok(()));
            }
        }
        None
    }
}

/// Runs every choice to its end; returns them in index order, and the usage of all.
pub(crate) async fn finish_all(
    runs: Vec<Run>,
    prompts: &[Vec<u32>],
) -> Result<(Vec<Finished>, Usage), ApiError> {
    let results = futures::future::join_all(runs.into_iter().map(|mut run| async move {
        let mut done = Finished {
            index: run.index,
            ..Finished::default()
        };
        while let Some(piece) = run.next().await {
            if let Some(end) = done.add(piece) {
                return end.map(|()| done);
            }
        }
        Err(ApiError::Internal(
            "the generation ended without a finish".into(),
        ))
    }))
    .await;
    let mut done = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    done.sort_by_key(|f| f.index);
    let usages: Vec<Usage> = done.iter().map(|f| f.usage).collect();
    Ok((done, total_usage(prompts, &usages)))
}

/// Usage over several choices: each prompt counted once.
pub(crate) fn total_usage(prompts: &[Vec<u32>], per_choice: &[Usage]) -> Usage {
    let prompt_tokens = prompts.iter().map(Vec::len).sum();
    let completion_tokens = per_choice.iter().map(|u| u.completion_tokens).sum();
    Usage::new(prompt_tokens, completion_tokens)
}
