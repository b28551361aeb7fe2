//! The queue of embedding requests: handlers submit token ids and await the vectors on a
//! oneshot channel; the embedding engine thread takes every waiting request at once and
//! computes them in padded batches. Admission (429 past the limits, `Retry-After`) is the
//! generation queue's.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::queue::Admission;
use crate::{QueueLimits, SubmitError};

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

/// The cheap, cloneable sending side.
#[derive(Debug, Clone)]
pub struct EmbedHandle {
    tx: SyncSender<EmbedRequest>,
    admission: Arc<Admission>,
}

impl EmbedHandle {
    /// Never blocks: past the queue limits it fails at once, with a retry estimate.
    pub fn submit(&self, request: EmbedRequest) -> Result<(), SubmitError> {
        if self.has_failed() {
            return Err(SubmitError::EngineStopped);
        }
        let tokens = request.tokens();
        self.admission.reserve(tokens)?;
        self.tx.try_send(request).map_err(|e| {
            self.admission.release(tokens);
            match e {
                TrySendError::Full(_) => SubmitError::QueueFull {
                    waiting: self.admission.waiting.load(Ordering::Relaxed),
                    waiting_tokens: 0,
                    retry_after_secs: self.admission.retry_after(1),
                },
                TrySendError::Disconnected(_) => SubmitError::EngineStopped,
            }
        })
    }

    /// Whether the engine thread has stopped for good.
    pub fn has_failed(&self) -> bool {
        self.admission.failed.load(Ordering::Acquire)
    }

    /// As [`crate::EngineHandle::busy`]: the batch being computed and how long it has run.
    pub fn busy(&self) -> Option<crate::Busy> {
        self.admission.pulse.busy()
    }
}

/// The embedding engine's receiving side.
#[derive(Debug)]
pub struct EmbedReceiver {
    rx: Receiver<EmbedRequest>,
    admission: Arc<Admission>,
}

impl EmbedReceiver {
    /// Waits for a request; `None` once every handle is gone.
    pub fn recv(&self) -> Option<EmbedRequest> {
        let r = self.rx.recv().ok()?;
        self.admission.release(r.tokens());
        Some(r)
    }

    /// A request if one is queued.
    pub fn try_recv(&self) -> Option<EmbedRequest> {
        match self.rx.try_recv() {
            Ok(r) => {
                self.admission.release(r.tokens());
                Some(r)
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => None,
        }
    }

    /// Requests accepted and not yet taken.
    pub fn num_waiting(&self) -> usize {
        self.admission.waiting.load(Ordering::Relaxed)
    }

    /// Batch `batch` (counted from 0) begins, or requests were taken.
    pub fn beat(&self, batch: u64) {
        self.admission.pulse.beat(batch);
    }

    /// No request in hand.
    pub fn rest(&self) {
        self.admission.pulse.rest();
    }

    /// The engine cannot go on: new requests are refused.
    pub fn mark_failed(&self) {
        self.admission.failed.store(true, Ordering::Release);
    }

    /// Records the measured completion rate (requests per second) for `Retry-After`.
    pub fn set_completion_rate(&self, per_sec: f64) {
        self.admission
            .completion_rate
            .store(per_sec.to_bits(), Ordering::Relaxed);
    }
}

/// An embedding queue bounded by `limits`.
pub fn embed_queue(limits: QueueLimits) -> (EmbedHandle, EmbedReceiver) {
    let (tx, rx) = sync_channel(limits.max_waiting_requests.max(1));
    let admission = Admission::new(limits);
    (
        EmbedHandle {
            tx,
            admission: Arc::clone(&admission),
        },
        EmbedReceiver { rx, admission },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
        h.submit(req(3).0).unwrap();
        h.submit(req(4).0).unwrap();
        assert!(matches!(
            h.submit(req(1).0),
            Err(SubmitError::QueueFull { waiting: 2, .. })
        ));
        assert_eq!(rx.try_recv().map(|r| r.tokens()), Some(3));
        assert_eq!(rx.num_waiting(), 1);
        h.submit(req(1).0).unwrap();
        rx.mark_failed();
        assert!(matches!(
            h.submit(req(1).0),
            Err(SubmitError::EngineStopped)
        ));
    }
}
