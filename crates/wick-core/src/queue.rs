//! The one bounded queue, generic over what it carries: the generation engine's commands
//! ([`crate::EngineHandle`]) and the embedding engine's requests ([`crate::EmbedHandle`]) are
//! the same channel, admission (limits on waiting requests and their prompt tokens, 429 with
//! `Retry-After` past them), failure flag, shutdown flag and pulse.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
struct Admission {
    limits: QueueLimits,
    waiting: AtomicUsize,
    waiting_tokens: AtomicUsize,
    /// Requests finished per second (an f64's bits), measured by the engine.
    completion_rate: AtomicU64,
    /// Set once at shutdown: the engine ends every request it still has, with an error.
    end_all: AtomicBool,
    /// Set by the engine when it cannot go on (see [`QueueReceiver::mark_failed`]).
    failed: AtomicBool,
    /// When the engine last moved while it had work, for the watchdog.
    pulse: Pulse,
}

/// The engine's pulse: while it has work it beats at least once a step; a watchdog that sees
/// no beat for too long knows a step (or the loop) is stuck.
#[derive(Debug)]
struct Pulse {
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

    fn beat(&self, step: u64) {
        self.step.store(step, Ordering::Relaxed);
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms
            .store(ms.min(Self::IDLE - 1), Ordering::Release);
    }

    fn rest(&self) {
        self.last_ms.store(Self::IDLE, Ordering::Release);
    }

    fn busy(&self) -> Option<Busy> {
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
    fn new(limits: QueueLimits) -> Arc<Self> {
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

    fn reserve(&self, tokens: usize) -> Result<(), SubmitError> {
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

    fn release(&self, tokens: usize) {
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        self.waiting_tokens.fetch_sub(tokens, Ordering::AcqRel);
    }

    /// Time for the engine to start `waiting` more requests at its measured completion rate.
    fn retry_after(&self, waiting: usize) -> u64 {
        let rate = f64::from_bits(self.completion_rate.load(Ordering::Relaxed));
        let secs = if rate > 0.0 {
            (waiting.max(1) as f64 / rate).ceil()
        } else {
            waiting.max(1) as f64
        };
        secs.clamp(1.0, 600.0) as u64
    }
}

/// The cheap, cloneable sending side of a bounded queue.
#[derive(Debug)]
pub struct QueueSender<T> {
    tx: SyncSender<T>,
    admission: Arc<Admission>,
}

impl<T> Clone for QueueSender<T> {
    fn clone(&self) -> Self {
        QueueSender {
            tx: self.tx.clone(),
            admission: Arc::clone(&self.admission),
        }
    }
}

impl<T> QueueSender<T> {
    /// Never blocks: past the queue limits it fails at once, with a retry estimate. The item
    /// counts as waiting, with `tokens` prompt tokens, until the receiver releases it.
    pub fn submit(&self, item: T, tokens: usize) -> Result<(), SubmitError> {
        if self.has_failed() {
            return Err(SubmitError::EngineStopped);
        }
        self.admission.reserve(tokens)?;
        self.tx.try_send(item).map_err(|e| {
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

    /// Sends an item that does not count as waiting (a control message such as an abort).
    pub fn send_uncounted(&self, item: T) -> Result<(), SubmitError> {
        self.tx
            .try_send(item)
            .map_err(|_| SubmitError::EngineStopped)
    }

    /// At shutdown, once the drain timeout has run out: the receiver ends every request it
    /// still has (the generation engine does; the embedding engine answers each batch as it
    /// goes and does not look). A flag, not a queued item, so a full queue cannot refuse it.
    pub fn end_all(&self) {
        self.admission.end_all.store(true, Ordering::Release);
    }

    /// Items accepted and not yet released.
    pub fn num_waiting(&self) -> usize {
        self.admission.waiting.load(Ordering::Relaxed)
    }

    /// Whether the receiver has failed for good: readiness turns 503 and the process should
    /// exit so that it is restarted.
    pub fn has_failed(&self) -> bool {
        self.admission.failed.load(Ordering::Acquire)
    }

    /// `None` while the receiver has no work; else the step it is in and how long since it
    /// last moved (a step began or ended).
    pub fn busy(&self) -> Option<Busy> {
        self.admission.pulse.busy()
    }
}

/// The engine's receiving side.
#[derive(Debug)]
pub struct QueueReceiver<T> {
    rx: Receiver<T>,
    admission: Arc<Admission>,
}

impl<T> QueueReceiver<T> {
    /// Waits up to `timeout` for one item.
    pub fn recv_timeout(&self, timeout: Duration) -> Recv<T> {
        match self.rx.recv_timeout(timeout) {
            Ok(c) => Recv::Item(c),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Recv::Empty,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Recv::Closed,
        }
    }

    /// Waits for one item; `None` once every sender is gone.
    pub fn recv(&self) -> Option<T> {
        self.rx.recv().ok()
    }

    /// Takes one item if one is queued.
    pub fn try_recv(&self) -> Recv<T> {
        match self.rx.try_recv() {
            Ok(c) => Recv::Item(c),
            Err(TryRecvError::Empty) => Recv::Empty,
            Err(TryRecvError::Disconnected) => Recv::Closed,
        }
    }

    /// Items accepted and not yet released.
    pub fn num_waiting(&self) -> usize {
        self.admission.waiting.load(Ordering::Relaxed)
    }

    /// Whether [`QueueSender::end_all`] was called.
    pub fn end_all_requested(&self) -> bool {
        self.admission.end_all.load(Ordering::Acquire)
    }

    /// The receiver cannot go on (a panic it could not contain): every sender sees
    /// [`QueueSender::has_failed`] and new items are refused.
    pub fn mark_failed(&self) {
        self.admission.failed.store(true, Ordering::Release);
    }

    /// The receiver has work and is moving: step `step` begins (or the one before ended).
    pub fn beat(&self, step: u64) {
        self.admission.pulse.beat(step);
    }

    /// The receiver has no work: nothing to watch.
    pub fn rest(&self) {
        self.admission.pulse.rest();
    }

    /// An item with `prompt_tokens` stopped waiting (started, or ended unstarted).
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

/// What the receiver finds in the queue.
#[derive(Debug)]
pub enum Recv<T> {
    Item(T),
    /// Nothing queued (or nothing before the timeout).
    Empty,
    /// Every sender is gone: nothing will ever come.
    Closed,
}

/// A queue bounded by `limits` (its channel's capacity is `max_waiting_requests`).
pub fn bounded<T>(limits: QueueLimits) -> (QueueSender<T>, QueueReceiver<T>) {
    let (tx, rx) = sync_channel(limits.max_waiting_requests.max(1));
    let admission = Admission::new(limits);
    (
        QueueSender {
            tx,
            admission: Arc::clone(&admission),
        },
        QueueReceiver { rx, admission },
    )
}
