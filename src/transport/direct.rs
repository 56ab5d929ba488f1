//! The `direct` transport: a bounded in-process queue between the
//! replication reader and the applier.
//!
//! The applier pulls a batch when it is ready, and a batch is everything
//! that arrived while it applied the previous one (at most `max_events`
//! changes), plus what arrives within `linger` of the batch's first message.
//! So batch size follows load: a backlog gives large batches that amortise
//! each batch's fixed cost (one transaction, one checkpoint, a few round
//! trips), and a busy stream of small transactions is not applied one
//! transaction per commit, which on a small machine would take the CPU the
//! walsender needs to decode. `linger` bounds the latency this adds. A full
//! queue stops the reader (back-pressure), and the slot keeps the WAL.

use crate::error::{Error, Result};
use crate::model::{Batch, SourceMsg};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The applier's end of the queue.
pub struct Receiver {
    rx: mpsc::Receiver<SourceMsg>,
    buf: Vec<SourceMsg>,
    pending: Batch,
    seq: u64,
    max_events: usize,
    in_tx: bool,
    linger: Duration,
    /// When the pending batch must be handed over at the latest.
    deadline: Option<Instant>,
}

impl Receiver {
    pub fn new(rx: mpsc::Receiver<SourceMsg>, max_events: usize, linger: Duration) -> Receiver {
        Receiver {
            rx,
            buf: Vec::with_capacity(max_events.min(65_536)),
            pending: Batch::default(),
            seq: 0,
            max_events: max_events.max(1),
            in_tx: false,
            linger,
            deadline: None,
        }
    }

    /// The next batch: waits for the first message, then takes what is
    /// queued and what arrives within `linger`, up to `max_events` changes.
    /// `None` when the source stopped.
    ///
    /// Cancel-safe: what a call received is kept in `self.pending` (and the
    /// linger deadline in `self.deadline`) before its next await, so dropping
    /// the future (in a `select!`) loses nothing.
    pub async fn next(&mut self) -> Result<Option<Batch>> {
        loop {
            let full = self.pending.events.len() >= self.max_events;
            let due = self.deadline.is_some_and(|d| Instant::now() >= d);
            if !self.pending.is_empty() && (full || (due && self.rx.is_empty())) {
                return Ok(Some(self.take()));
            }
            self.buf.clear();
            let room = self
                .max_events
                .saturating_sub(self.pending.events.len())
                .max(1);
            let got = match self.deadline {
                Some(deadline) if !self.pending.is_empty() => {
                    tokio::select! {
                        got = self.rx.recv_many(&mut self.buf, room) => got,
                        _ = tokio::time::sleep_until(deadline) => continue,
                    }
                }
                _ => self.rx.recv_many(&mut self.buf, room).await,
            };
            if got == 0 {
                return Ok((!self.pending.is_empty()).then(|| self.take()));
            }
            if self.deadline.is_none() {
                self.deadline = Some(Instant::now() + self.linger);
            }
            for msg in self.buf.drain(..) {
                match msg {
                    SourceMsg::Change(e) => {
                        self.in_tx = true;
                        self.pending.events.push(e);
                    }
                    SourceMsg::Commit { lsn, xid } => {
                        self.in_tx = false;
                        self.pending.ack = Some(lsn);
                        self.pending.xids.push(xid);
                    }
                    SourceMsg::Watermark(id) => {
                        let at = self.pending.events.len();
                        self.pending.watermarks.push((at, id));
                    }
                    SourceMsg::ColumnsAdded(names) => {
                        let at = self.pending.events.len();
                        self.pending.columns_added.push((at, names));
                    }
                    SourceMsg::Heartbeat { lsn, emitted_us } => {
                        if !self.in_tx {
                            self.pending.ack = Some(lsn);
                        }
                        self.pending.heartbeat_us = Some(emitted_us);
                    }
                    SourceMsg::Failed(reason) => return Err(Error::Replication(reason)),
                }
            }
        }
    }

    fn take(&mut self) -> Batch {
        self.deadline = None;
        let mut batch = std::mem::take(&mut self.pending);
        batch.seq = self.seq;
        self.seq += 1;
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Change, ChangeEvent, Key, Lsn};

    fn change(i: u64) -> SourceMsg {
        SourceMsg::Change(ChangeEvent {
            change: Change::Delete {
                key: Key(vec![Some(i.to_string())]),
            },
            commit_lsn: Lsn(i),
            commit_ts_us: 0,
        })
    }

    #[tokio::test]
    async fn batches_take_what_is_queued_and_ack_only_whole_transactions() {
        let (tx, rx) = mpsc::channel(100);
        let mut r = Receiver::new(rx, 3, Duration::from_millis(1));
        for m in [
            change(1),
            SourceMsg::Commit {
                lsn: Lsn(10),
                xid: 1,
            },
            change(2),
            change(3),
            change(4),
        ] {
            tx.send(m).await.unwrap();
        }
        let b = r.next().await.unwrap().unwrap();
        assert_eq!(b.events.len(), 3, "capped at max_events");
        assert_eq!(b.ack, Some(Lsn(10)));
        tx.send(SourceMsg::Heartbeat {
            lsn: Lsn(20),
            emitted_us: 5,
        })
        .await
        .unwrap();
        let b = r.next().await.unwrap().unwrap();
        assert_eq!(b.events.len(), 1);
        assert_eq!(
            b.ack, None,
            "a heartbeat inside an open transaction is not a safe position"
        );
        assert_eq!(b.heartbeat_us, Some(5));
        tx.send(SourceMsg::Commit {
            lsn: Lsn(30),
            xid: 2,
        })
        .await
        .unwrap();
        tx.send(SourceMsg::Heartbeat {
            lsn: Lsn(40),
            emitted_us: 6,
        })
        .await
        .unwrap();
        let b = r.next().await.unwrap().unwrap();
        assert_eq!(b.ack, Some(Lsn(40)));
        assert_eq!(b.seq, 2);
        tx.send(SourceMsg::Failed("boom".into())).await.unwrap();
        assert!(r.next().await.is_err());
        drop(tx);
        assert!(r.next().await.unwrap().is_none());
    }
}
