//! The generation engine's queue: handlers submit [`EngineRequest`]s (and aborts) through the
//! [`EngineHandle`]; the engine thread drains its [`EngineReceiver`] into the scheduler.

use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::queue::{bounded, QueueReceiver, QueueSender};
use crate::{
    Busy, QueueLimits, RequestId, SamplingParams, SubmitError, TokenConstraint, TokenEvent,
};

/// A validated request, ready for the engine: token ids computed, limits checked.
#[derive(Debug)]
pub struct EngineRequest {
    pub id: RequestId,
    /// The request's `x-request-id` (the client's or a generated one), for log lines.
    pub tag: String,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    /// Token ids that end the sequence (end of turn, end of text).
    pub stop_token_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub arrived: Instant,
    /// The request's own channel back; dropping its receiver aborts the sequence.
    pub events: UnboundedSender<TokenEvent>,
    /// Constrained decoding (structured output), compiled before submission.
    pub constraint: Option<Box<dyn TokenConstraint>>,
}

/// What handlers send to the engine thread.
#[derive(Debug)]
pub enum EngineCommand {
    Add(Box<EngineRequest>),
    Abort(RequestId),
}

/// The engine's receiving side: a request counts as waiting until the engine releases it
/// (when it starts, or ends unstarted).
pub type EngineReceiver = QueueReceiver<EngineCommand>;

/// The cheap, cloneable sending side of the one bounded request queue.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    queue: QueueSender<EngineCommand>,
}

impl EngineHandle {
    /// Never blocks: past the queue limits it fails at once, with a retry estimate.
    pub fn submit(&self, request: EngineRequest) -> Result<(), SubmitError> {
        let tokens = request.prompt.len();
        self.queue
            .submit(EngineCommand::Add(Box::new(request)), tokens)
    }

    /// Asks the engine to end a request (its client gets `Finished` with `Abort`).
    pub fn abort(&self, id: RequestId) -> Result<(), SubmitError> {
        self.queue.send_uncounted(EngineCommand::Abort(id))
    }

    /// At shutdown, once the drain timeout has run out: the engine ends every request it
    /// still has with [`crate::ErrorKind::Shutdown`].
    pub fn end_all(&self) {
        self.queue.end_all();
    }

    /// Requests accepted and not yet started.
    pub fn num_waiting(&self) -> usize {
        self.queue.num_waiting()
    }

    /// Whether the engine has failed for good.
    pub fn has_failed(&self) -> bool {
        self.queue.has_failed()
    }

    /// `None` while the engine has no work; else the step it is in and how long since it
    /// last moved.
    pub fn busy(&self) -> Option<Busy> {
        self.queue.busy()
    }
}

/// The one request queue, bounded by `limits`.
pub fn request_queue(limits: QueueLimits) -> (EngineHandle, EngineReceiver) {
    let (queue, rx) = bounded(limits);
    (EngineHandle { queue }, rx)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio::sync::mpsc::unbounded_channel;

    use super::*;
    use crate::Recv;

    fn req(id: u64, tokens: usize) -> EngineRequest {
        EngineRequest {
            id: RequestId(id),
            tag: format!("t{id}"),
            prompt: vec![1; tokens],
            max_tokens: 1,
            stop_token_ids: vec![],
            sampling: SamplingParams::default(),
            arrived: Instant::now(),
            events: unbounded_channel().0,
            constraint: None,
        }
    }

    #[test]
    fn limits_requests_and_tokens_and_estimates_retry() {
        let (h, rx) = request_queue(QueueLimits {
            max_waiting_requests: 2,
            max_waiting_prompt_tokens: 100,
        });
        h.submit(req(1, 60)).unwrap();
        // 60 + 50 tokens is over the token bound.
        assert!(matches!(
            h.submit(req(2, 50)),
            Err(SubmitError::QueueFull { .. })
        ));
        h.submit(req(3, 40)).unwrap();
        rx.set_completion_rate(0.5);
        match h.submit(req(4, 1)) {
            Err(SubmitError::QueueFull {
                waiting: 2,
                retry_after_secs,
                ..
            }) => assert_eq!(retry_after_secs, 4),
            other => panic!("{other:?}"),
        }
        // The engine starts one: room again.
        assert!(matches!(rx.try_recv(), Recv::Item(_)));
        rx.release(60);
        h.submit(req(5, 1)).unwrap();
        assert_eq!(h.num_waiting(), 2);
    }

    #[test]
    fn the_pulse_says_how_long_the_engine_has_not_moved() {
        let (h, rx) = request_queue(QueueLimits {
            max_waiting_requests: 2,
            max_waiting_prompt_tokens: 0,
        });
        assert_eq!(h.busy(), None);
        rx.beat(7);
        std::thread::sleep(Duration::from_millis(30));
        let busy = h.busy().unwrap();
        assert_eq!(busy.step, 7);
        assert!(busy.unmoved >= Duration::from_millis(30), "{busy:?}");
        rx.beat(8);
        assert!(h.busy().unwrap().unmoved < Duration::from_secs(1));
        rx.rest();
        assert_eq!(h.busy(), None);
    }
}
