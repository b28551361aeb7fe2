/// How the next token is drawn from the logits. Processing order: `logit_bias`, then the
/// penalties, then (unless greedy) temperature, `top_k`, `top_p`, `min_p`.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` times the most likely one (0: none).
    pub min_p: f32,
    /// Seed of the request's own random generator; `None` draws one.
    pub seed: Option<u64>,
    /// OpenAI's: subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// OpenAI's: subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    /// Hugging Face's: logits of tokens in the prompt or output divided (if positive) or
    /// multiplied (if negative) by it (1: none).
    pub repetition_penalty: f32,
    /// Added to the logits of these tokens.
    pub logit_bias: Vec<(u32, f32)>,
    /// Report the chosen token's log-probability and this many alternatives (`None`: none).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with nothing else.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

/// The log-probability of a sampled token and of the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// Most likely first.
    pub top: Vec<(u32, f32)>,
}

/// A grammar that decides which tokens may come next (for example, JSON that matches a
/// schema). Compiled off the engine thread; the engine masks each step's logits with it and
/// feeds it every sampled token.
pub trait TokenConstraint: Send + std::fmt::Debug {
    /// Sets the logits of every token the grammar forbids now to minus infinity.
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), String>;
    /// Advances past a sampled token.
    fn consume(&mut self, token: u32) -> Result<(), String>;
    /// Whether the grammar is complete and generation must stop.
    fn is_finished(&self) -> bool;
}

/// Why a sequence ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-turn token or a stop string.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
    /// Cancelled by the client or ended by the server.
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// What the engine sends back on a request's channel.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenEvent {
    /// A sampled token. Stop tokens are not sent as tokens: they arrive as `Finished`.
    Token {
        id: u32,
        logprobs: Option<TokenLogprobs>,
    },
    /// The sequence ended; no further events follow.
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The engine could not serve the request; no further events follow.
    Error { kind: ErrorKind, message: String },
}

/// Why the engine could not serve a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// It waited longer than the queue time limit without starting.
    QueueTimeout,
    /// It can never be served (larger than the KV cache).
    Rejected,
    /// The engine failed while computing it.
    Internal,
    /// The server shut down (its drain timeout ran out) before the request ended.
    Shutdown,
}

impl ErrorKind {
    /// The `error_type` label of `wick_request_failure_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::QueueTimeout => crate::error_type::QUEUE_TIMEOUT,
            ErrorKind::Rejected => crate::error_type::REJECTED,
            ErrorKind::Internal => crate::error_type::INTERNAL,
            ErrorKind::Shutdown => crate::error_type::SHUTDOWN,
        }
    }
}
