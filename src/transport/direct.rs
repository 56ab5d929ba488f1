//! The `direct` transport: a bounded in-process channel of batches.

use crate::error::{Error, Result};
use crate::model::Batch;
use tokio::sync::mpsc;

/// The source's end.
pub struct DirectSender(mpsc::Sender<Result<Batch>>);
/// The applier's end.
pub struct DirectReceiver(mpsc::Receiver<Result<Batch>>);

/// A channel holding at most `capacity` batches in flight.
pub fn channel(capacity: usize) -> (DirectSender, DirectReceiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (DirectSender(tx), DirectReceiver(rx))
}

impl DirectSender {
    /// Waits for room (back-pressure); fails when the applier is gone.
    pub async fn send(&self, batch: Result<Batch>) -> Result<()> {
        self.0
            .send(batch)
            .await
            .map_err(|_| Error::Stopped("the applier stopped".into()))
    }
}

impl DirectReceiver {
    /// The next batch; `None` when the source ended. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Result<Batch>> {
        self.0.recv().await
    }
}
