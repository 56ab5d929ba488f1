//! Delivery reports counted per batch of records, not awaited per record.
//!
//! librdkafka reports every record's delivery (or failure) on the
//! producer's polling thread. A future per record (`FutureProducer`) costs
//! a channel allocation and a wake-up of the producing task for each one;
//! at tens of thousands of records a second that was a tenth of the
//! producer's CPU. Here each record carries only its batch's number (the
//! delivery opaque, no allocation), the report is counted into the batch
//! under a lock, and the waiting task is woken once, when the batch is
//! complete (every record queued and reported) or one of them failed.
//!
//! A batch completes only after it is closed, so records still being queued
//! cannot be mistaken for the whole batch.

use rdkafka::message::Message;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::ClientContext;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use tokio::sync::Notify;

use super::logs::{client_error, forward};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;

/// The reports of one batch so far.
#[derive(Debug, Default)]
struct Reports {
    /// Records queued, once the batch is closed.
    queued: Option<usize>,
    reported: usize,
    /// (partition, offset) of each delivered record, in report order (which
    /// within a partition is the order records were queued).
    offsets: Vec<(i32, i64)>,
    failed: Option<String>,
}

impl Reports {
    fn finished(&self) -> bool {
        self.failed.is_some() || self.queued.is_some_and(|q| q == self.reported)
    }
}

#[derive(Debug, Default)]
struct Open {
    next: u64,
    batches: HashMap<u64, Reports>,
}

/// The producer's context: forwards librdkafka's logs and counts reports.
#[derive(Debug, Default)]
pub struct Deliveries {
    open: Mutex<Open>,
    finished: Notify,
}

/// What a finished batch came to: every record's (partition, offset), or
/// the first failure.
pub type Outcome = std::result::Result<Vec<(i32, i64)>, String>;

impl Deliveries {
    fn lock(&self) -> MutexGuard<'_, Open> {
        // A panic while holding the lock cannot leave the counts half
        // updated in a way that matters more than the panic itself.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a batch; returns its number (the records' delivery opaque).
    pub fn open(&self) -> u64 {
        let mut open = self.lock();
        let n = open.next;
        open.next += 1;
        open.batches.insert(n, Reports::default());
        n
    }

    /// No more records join batch `n`: `queued` were queued.
    pub fn close(&self, n: u64, queued: usize) {
        let mut open = self.lock();
        if let Some(r) = open.batches.get_mut(&n) {
            r.queued = Some(queued);
            if r.finished() {
                self.finished.notify_waiters();
            }
        }
    }

    /// Waits until closed batch `n` is finished, and forgets it.
    pub async fn wait(&self, n: u64) -> Outcome {
        loop {
            let notified = self.finished.notified();
            tokio::pin!(notified);
            // Registered before looking, so a finish in between still wakes.
            notified.as_mut().enable();
            {
                let mut open = self.lock();
                match open.batches.get(&n) {
                    None => return Err(format!("batch {n} is not open")),
                    Some(r) if r.finished() => {
                        let r = open.batches.remove(&n).unwrap_or_default();
                        return match r.failed {
                            Some(e) => Err(e),
                            None => Ok(r.offsets),
                        };
                    }
                    Some(_) => {}
                }
            }
            notified.await;
        }
    }

    fn report(&self, n: u64, outcome: std::result::Result<(i32, i64), String>) {
        let mut open = self.lock();
        let Some(r) = open.batches.get_mut(&n) else {
            return;
        };
        r.reported += 1;
        match outcome {
            Ok(at) => r.offsets.push(at),
            Err(e) => {
                r.failed.get_or_insert(e);
            }
        }
        if r.finished() {
            self.finished.notify_waiters();
        }
    }
}

impl ClientContext for Deliveries {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        forward(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        client_error(&error, reason);
    }
}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, batch: usize) {
        let outcome = match result {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, _)) => Err(e.to_string()),
        };
        self.report(batch as u64, outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_batch_finishes_when_closed_and_every_record_reported() {
        let d = Arc::new(Deliveries::default());
        let (a, b) = (d.open(), d.open());
        d.report(a, Ok((0, 10)));
        d.report(b, Ok((1, 5)));
        d.report(a, Ok((1, 4)));
        // Every queued record reported, but not closed yet: not finished.
        let waiting = tokio::spawn({
            let d = d.clone();
            async move { d.wait(a).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        d.close(a, 2);
        assert_eq!(waiting.await.unwrap(), Ok(vec![(0, 10), (1, 4)]));
        // Closed with one record still to come.
        d.close(b, 2);
        let waiting = tokio::spawn({
            let d = d.clone();
            async move { d.wait(b).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        d.report(b, Ok((1, 6)));
        assert_eq!(waiting.await.unwrap(), Ok(vec![(1, 5), (1, 6)]));
        assert!(d.wait(b).await.is_err(), "a finished batch is forgotten");
    }

    #[tokio::test]
    async fn a_failure_finishes_the_batch_at_once() {
        let d = Deliveries::default();
        let n = d.open();
        d.report(n, Err("broker gone".into()));
        assert_eq!(d.wait(n).await, Err("broker gone".into()));
        let empty = d.open();
        d.close(empty, 0);
        assert_eq!(d.wait(empty).await, Ok(vec![]));
    }
}
