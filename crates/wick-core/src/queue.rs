use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{EngineRequest, RequestId};

/// What handlers send to the engine thread.
#[derive(Debug)]
pub enum EngineCommand {
    Add(Box<EngineRequest>),
    Abort(RequestId),
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the waiting queue is full ({waiting} requests, {waiting_tokens} prompt tokens)")]
    QueueFull {
        waiting: usize,
        waiting_tokens: usize,
        /// Seconds until a retry is likely to be accepted, from the measured throughput.
        retry_after_secs: u64,
    },
    #[error("the engine has stopped")]
    EngineStopped,
}

/// Bounds on the requests accepted but not yet started (0: unbounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Requests in the queue and waiting to be scheduled; also the channel's capacity.
    pub max_waiting_requests: usize,
    /// Their prompt tokens, in all (0: no bound).
    pub max_waiting_prompt_tokens: usize,
}

/// The waiting requests' counts, shared by handlers (who reserve) and the engine (who
/// releases when a request starts or ends while waiting), and the engine's completion rate.
#[derive(Debug)]
pub(crate) struct Admission {
    limits: QueueLimits,
    pub(crate) waiting: AtomicUsize,
    waiting_tokens: AtomicUsize,
    /// Requests finished per second (an f64's bits), measured by the engine.
    pub(crate) completion_rate: AtomicU64,
    /// Set once at shutdown: the engine ends every request it still has, with an error.
    end_all: AtomicBool,
    /// Set by the engine when it cannot go on (see [`QueueReceiver::mark_failed`]).
    pub(crate) failed: AtomicBool,
    /// When the engine last moved while it had work, for the watchdog.
    pub(crate) pulse: Pulse,
}

/// The engine's pulse: while it has work it beats at least once a step; a watchdog that sees
/// no beat for too long knows a step (or the loop) is stuck.
#[derive(Debug)]
pub(crate) struct Pulse {
    epoch: Instant,
    /// Milliseconds from `epoch` to the last beat; [`Pulse::IDLE`] while there is no work.
    last_ms: AtomicU64,
    /// The step the engine is in, or is about to start, at the last beat (from 0).
    step: AtomicU64,
}

impl Pulse {
    const IDLE: u64 = u64::MAX;

    fn new() -> Self {
        Pulse {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(Self::IDLE),
            step: AtomicU64::new(0),
        }
    }

    pub(crate) fn beat(&self, step: u64) {
        self.step.store(step, Ordering::Relaxed);
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms
            .store(ms.min(Self::IDLE - 1), Ordering::Release);
    }

    pub(crate) fn rest(&self) {
        self.last_ms.store(Self::IDLE, Ordering::Release);
    }

    pub(crate) fn busy(&self) -> Option<Busy> {
        let last = self.last_ms.load(Ordering::Acquire);
        if last == Self::IDLE {
            return None;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        Some(Busy {
            step: self.step.load(Ordering::Relaxed),
            unmoved: Duration::from_millis(now.saturating_sub(last)),
        })
    }
}

/// An engine with work: the step it is in and how long since it last moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    /// The step being computed (or about to be), counted from 0.
    pub step: u64,
    /// Time since the last step began or ended.
    pub unmoved: Duration,
}

impl Admission {
    pub(crate) fn new(limits: QueueLimits) -> Arc<Self> {
        Arc::new(Admission {
            limits,
            waiting: AtomicUsize::new(0),
            waiting_tokens: AtomicUsize::new(0),
            completion_rate: AtomicU64::new(0f64.to_bits()),
            end_all: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            pulse: Pulse::new(),
        })
    }

    pub(crate) fn reserve(&self, tokens: usize) -> Result<(), SubmitError> {
        let n = self.waiting.fetch_add(1, Ordering::AcqRel) + 1;
        let t = self.waiting_tokens.fetch_add(tokens, Ordering::AcqRel) + tokens;
        let over_tokens = self.limits.max_waiting_prompt_tokens > 0
            && t > self.limits.max_waiting_prompt_tokens
            && n > 1; // one request alone is always admitted: it was already checked to fit
        if n > self.limits.max_waiting_requests || over_tokens {
            self.release(tokens);
            return Err(SubmitError::QueueFull {
                waiting: n - 1,
                waiting_tokens: t - tokens,
                retry_after_secs: self.retry_after(n - 1),
            });
        }
        Ok(())
    }

    pub(crate) fn release(&self, tokens: usize) {
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        self.waiting_tokens.fetch_sub(tokens, Ordering::AcqRel);
    }

    /// Time for the engine to start `waiting` more requests at its measured completion rate.
    pub(crate) fn retry_after(&self, waiting: usize) -> u64 {
        let rate = f64::from_bits(self.completion_rate.load(Ordering::Relaxed));
        let secs = if rate > 0.0 {
            (waiting.max(1) as f64 / rate).ceil()
        } else {
            waiting.max(1) as f64
        };
        secs.clamp(1.0, 600.0) as u64
    }
}

/// The cheap, cloneable sending side of the one bounded request queue.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: SyncSender<EngineCommand>,
    admission: Arc<Admission>,
}

impl EngineHandle {
    /// Never blocks: past the queue limits it fails at once, with a retry estimate.
    pub fn submit(&self, request: EngineRequest) -> Result<(), SubmitError> {
        if self.has_failed() {
            return Err(SubmitError::EngineStopped);
        }
        let tokens = request.prompt.len();
        self.admission.reserve(tokens)?;
        self.tx
            .try_send(EngineCommand::Add(Box::new(request)))
            .map_err(|e| {
                self.admission.release(tokens);
                match e {
                    TrySendError::Full(_) => SubmitError::QueueFull {
                        waiting: self.admission.waiting.load(Ordering::Relaxed),
                        waiting_tokens: self.admission.waiting_tokens.load(Ordering::Relaxed),
                        retry_after_secs: self.admission.retry_after(1),
                    },
                    TrySendError::Disconnected(_) => SubmitError::EngineStopped,
                }
            })
    }

    /// Asks the engine to end a request (its client gets `Finished` with `Abort`).
    pub fn abort(&self, id: RequestId) -> Result<(), SubmitError> {
        self.tx
            .try_send(EngineCommand::Abort(id))
            .map_err(|_| SubmitError::EngineStopped)
    }

    /// At shutdown, once the drain timeout has run out: the engine ends every request it
    /// still has with [`crate::ErrorKind::Shutdown`]. Not a queued command, so it cannot be
    /// refused by a full queue.
    pub fn end_all(&self) {
        self.admission.end_all.store(true, Ordering::Release);
    }

    /// Requests accepted and not yet started.
    pub fn num_waiting(&self) -> usize {
        self.admission.waiting.load(Ordering::Relaxed)
    }

    /// Whether the engine has failed for good: readiness turns 503 and the process should
    /// exit so that it is restarted.
    pub fn has_failed(&self) -> bool {
        self.admission.failed.load(Ordering::Acquire)
    }

    /// `None` while the engine has no work; else the step it is in and how long since it
    /// last moved (a step began or ended).
    pub fn busy(&self) -> Option<Busy> {
        self.admission.pulse.busy()
    }
}

/// The engine's receiving side.
#[derive(Debug)]
pub struct QueueReceiver {
    rx: Receiver<EngineCommand>,
    admission: Arc<Admission>,
}

impl QueueReceiver {
    /// Waits up to `timeout` for one command.
    pub fn recv_timeout(&self, timeout: Duration) -> Recv {
        match self.rx.recv_timeout(timeout) {
            Ok(c) => Recv::Command(c),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Recv::Empty,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Recv::Closed,
        }
    }

    /// Takes one command if one is queued.
    pub fn try_recv(&self) -> Recv {
        match self.rx.try_recv() {
            Ok(c) => Recv::Command(c),
            Err(TryRecvError::Empty) => Recv::Empty,
            Err(TryRecvError::Disconnected) => Recv::Closed,
        }
    }

    /// Whether [`EngineHandle::end_all`] was called.
    pub fn end_all_requested(&self) -> bool {
        self.admission.end_all.load(Ordering::Acquire)
    }

    /// The engine cannot go on (a panic it could not contain): every handle sees
    /// [`EngineHandle::has_failed`] and new requests are refused.
    pub fn mark_failed(&self) {
        self.admission.failed.store(true, Ordering::Release);
    }

    /// The engine has work and is moving: step `step` begins (or the one before ended).
    pub fn beat(&self, step: u64) {
        self.admission.pulse.beat(step);
    }

    /// The engine has no work: nothing to watch.
    pub fn rest(&self) {
        self.admission.pulse.rest();
    }

    /// A request with `prompt_tokens` left the waiting queue (started, or ended unstarted).
    pub fn release(&self, prompt_tokens: usize) {
        self.admission.release(prompt_tokens);
    }

    /// Records the measured completion rate (requests per second) for `Retry-After`.
    pub fn set_completion_rate(&self, per_sec: f64) {
        self.admission
            .completion_rate
            .store(per_sec.to_bits(), Ordering::Relaxed);
    }
}

/// What the engine finds in the queue.
#[derive(Debug)]
pub enum Recv {
    Command(EngineCommand),
    /// Nothing queued (or nothing before the timeout).
    Empty,
    /// Every handle is gone: no command will ever come.
    Closed,
}

/// The one request queue, bounded by `limits`.
pub fn request_queue(limits: QueueLimits) -> (EngineHandle, QueueReceiver) {
    let (tx, rx) = sync_channel(limits.max_waiting_requests.max(1));
    let admission = Admission::new(limits);
    (
        EngineHandle {
            tx,
            admission: Arc::clone(&admission),
        },
        QueueReceiver { rx, admission },
    )
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::sync::mpsc::unbounded_channel;

    use super::*;
    use crate::SamplingParams;

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
        assert!(matches!(rx.try_recv(), Recv::Command(_)));
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
