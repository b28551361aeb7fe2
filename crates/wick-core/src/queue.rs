use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::Duration;

use crate::{EngineRequest, RequestId};

/// What handlers send to the engine thread.
#[derive(Debug)]
pub enum EngineCommand {
    Add(Box<EngineRequest>),
    Abort(RequestId),
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full")]
    QueueFull,
    #[error("the engine has stopped")]
    EngineStopped,
}

/// The cheap, cloneable sending side of the one bounded request queue.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: SyncSender<EngineCommand>,
}

impl EngineHandle {
    /// Never blocks: a full queue is an error the caller turns into 429.
    pub fn submit(&self, request: EngineRequest) -> Result<(), SubmitError> {
        self.tx
            .try_send(EngineCommand::Add(Box::new(request)))
            .map_err(|e| match e {
                TrySendError::Full(_) => SubmitError::QueueFull,
                TrySendError::Disconnected(_) => SubmitError::EngineStopped,
            })
    }
}

/// The engine's receiving side.
#[derive(Debug)]
pub struct QueueReceiver {
    rx: Receiver<EngineCommand>,
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

/// The one request queue, bounded to `capacity` commands not yet taken by the engine.
pub fn request_queue(capacity: usize) -> (EngineHandle, QueueReceiver) {
    let (tx, rx) = sync_channel(capacity.max(1));
    (EngineHandle { tx }, QueueReceiver { rx })
}
