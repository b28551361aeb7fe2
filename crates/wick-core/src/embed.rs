//! The queue of embedding requests: handlers submit token ids and await the vectors on a
//! oneshot channel; the embedding engine thread takes every waiting request at once and
//! computes them in padded batches. Admission (429 past the limits, `Retry-After`) is the
//! one bounded queue's ([`crate::queue`]).

use std::time::Instant;

use tokio::sync::oneshot;

use crate::queue::{bounded, QueueReceiver, QueueSender};
use crate::QueueLimits;

/// A request's vectors in input order, or the error that ended it.
pub type EmbedReply = Result<Vec<Vec<f32>>, String>;

/// One request's inputs (token ids, each within the model's limit) and where its vectors
/// go, in input order, or the error that ended it.
#[derive(Debug)]
pub struct EmbedRequest {
    pub inputs: Vec<Vec<u32>>,
    pub arrived: Instant,
    pub reply: oneshot::Sender<EmbedReply>,
}

impl EmbedRequest {
    pub fn tokens(&self) -> usize {
        self.inputs.iter().map(Vec::len).sum()
    }
}

/// The cheap, cloneable sending side: [`QueueSender::submit`] with the request's
/// [`EmbedRequest::tokens`].
pub type EmbedHandle = QueueSender<EmbedRequest>;

/// The embedding engine's receiving side; the engine releases each request as it takes it.
pub type EmbedReceiver = QueueReceiver<EmbedRequest>;

/// An embedding queue bounded by `limits`.
pub fn embed_queue(limits: QueueLimits) -> (EmbedHandle, EmbedReceiver) {
    bounded(limits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Recv, SubmitError};

    fn req(tokens: usize) -> (EmbedRequest, oneshot::Receiver<EmbedReply>) {
        let (reply, rx) = oneshot::channel();
        let r = EmbedRequest {
            inputs: vec![vec![1; tokens]],
            arrived: Instant::now(),
            reply,
        };
        (r, rx)
    }

    #[test]
    fn refuses_past_the_limits_and_frees_room_when_taken() {
        let (h, rx) = embed_queue(QueueLimits {
            max_waiting_requests: 2,
            max_waiting_prompt_tokens: 0,
        });
        let submit = |r: EmbedRequest| {
            let tokens = r.tokens();
            h.submit(r, tokens)
        };
        submit(req(3).0).unwrap();
        submit(req(4).0).unwrap();
        assert!(matches!(
            submit(req(1).0),
            Err(SubmitError::QueueFull { waiting: 2, .. })
        ));
        let Recv::Item(first) = rx.try_recv() else {
            panic!("a request is queued")
        };
        assert_eq!(first.tokens(), 3);
        rx.release(first.tokens());
        assert_eq!(rx.num_waiting(), 1);
        submit(req(1).0).unwrap();
        rx.mark_failed();
        assert!(matches!(submit(req(1).0), Err(SubmitError::EngineStopped)));
    }
}
