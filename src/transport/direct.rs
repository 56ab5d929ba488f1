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
//!
//! Changes of a transaction still in progress ([`SourceMsg::Streamed`]) never
//! share a batch with anything else: such a batch holds changes of that one
//! transaction, and possibly its end ([`Batch::early`]).

use crate::error::{Error, Result};
use crate::model::{Batch, ChangeEvent, Early, EarlyEnd, SourceMsg};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The applier's end of the queue.
pub struct Receiver {
    rx: mpsc::Receiver<SourceMsg>,
    buf: Vec<SourceMsg>,
    /// Received, not yet in a batch (what follows a cut).
    queue: VecDeque<SourceMsg>,
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
            queue: VecDeque::new(),
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
            if self.absorb()? {
                return Ok(Some(self.take()));
            }
            let full = self.pending.events.len() >= self.max_events;
            let due = self.deadline.is_some_and(|d| Instant::now() >= d);
            // Changes of a transaction in progress wait until a batch is
            // full, or something else comes: nothing can commit before its
            // end, and full batches cost the least to write.
            let in_progress = matches!(&self.pending.early, Some(e) if e.end.is_none());
            let lingers = !self.pending.is_empty() && !in_progress;
            if !self.pending.is_empty() && (full || (due && lingers && self.rx.is_empty())) {
                return Ok(Some(self.take()));
            }
            self.buf.clear();
            let room = self
                .max_events
                .saturating_sub(self.pending.events.len())
                .max(1);
            let got = match self.deadline {
                Some(deadline) if lingers => {
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
            self.queue.extend(self.buf.drain(..));
        }
    }

    /// Moves received messages into the pending batch. True when the batch
    /// must be handed over before the next message (see the module docs).
    fn absorb(&mut self) -> Result<bool> {
        while let Some(msg) = self.queue.pop_front() {
            let early_xid = match &msg {
                SourceMsg::Streamed { xid, .. } | SourceMsg::StreamEnd { xid, .. } => Some(*xid),
                _ => None,
            };
            let p = &self.pending;
            let holds = !p.is_empty() || !p.watermarks.is_empty() || !p.columns_added.is_empty();
            let cut = holds
                && match &p.early {
                    Some(e) => e.end.is_some() || early_xid != Some(e.xid),
                    None => early_xid.is_some(),
                };
            if cut {
                self.queue.push_front(msg);
                return Ok(true);
            }
            match msg {
                SourceMsg::Change(e) => {
                    self.in_tx = true;
                    self.push(e);
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
                SourceMsg::Streamed { xid, event } => {
                    self.pending.early.get_or_insert(Early { xid, end: None });
                    self.push(event);
                }
                SourceMsg::StreamEnd { xid, end } => {
                    if let EarlyEnd::Commit { lsn, .. } = end {
                        self.pending.ack = Some(lsn);
                        self.pending.xids.push(xid);
                    }
                    self.pending.early = Some(Early {
                        xid,
                        end: Some(end),
                    });
                }
                SourceMsg::Failed(reason) => return Err(Error::Replication(reason)),
            }
        }
        Ok(false)
    }

    /// Adds a change to the pending batch, whose list is sized for a full
    /// batch at its first change: growing it step by step copied it several
    /// times per batch, into fresh pages the kernel had to zero.
    fn push(&mut self, event: ChangeEvent) {
        let events = &mut self.pending.events;
        if events.capacity() == 0 {
            events.reserve(self.max_events.min(16_384));
        }
        events.push(event);
    }

    /// True when a batch could be handed over now or soon: something was
    /// received and not yet taken. (The backfill stops starting chunks then,
    /// so the stream is not held up.)
    pub fn ready(&self) -> bool {
        !self.queue.is_empty() || !self.pending.is_empty() || !self.rx.is_empty()
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
            xid: 0,
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

    fn early(xid: u32, i: u64) -> SourceMsg {
        let SourceMsg::Change(event) = change(i) else {
            unreachable!()
        };
        SourceMsg::Streamed { xid, event }
    }

    #[tokio::test]
    async fn changes_of_a_transaction_in_progress_get_batches_of_their_own() {
        let (tx, rx) = mpsc::channel(100);
        let mut r = Receiver::new(rx, 3, Duration::from_millis(1));
        let end = |xid, lsn| SourceMsg::StreamEnd {
            xid,
            end: EarlyEnd::Commit {
                lsn: Lsn(lsn),
                ts_us: 7,
            },
        };
        for m in [
            change(1),
            early(9, 2),
            early(9, 3),
            SourceMsg::Commit {
                lsn: Lsn(10),
                xid: 1,
            },
            early(9, 4),
            early(9, 5),
            early(9, 6),
            early(9, 7),
            end(9, 20),
            SourceMsg::StreamEnd {
                xid: 11,
                end: EarlyEnd::Abort,
            },
            change(8),
        ] {
            tx.send(m).await.unwrap();
        }
        let mut got = Vec::new();
        for _ in 0..6 {
            let b = r.next().await.unwrap().unwrap();
            let ids: Vec<u64> = b.events.iter().map(|e| e.commit_lsn.0).collect();
            got.push((ids, b.early.clone(), b.ack));
        }
        let open = |xid| Some(Early { xid, end: None });
        assert_eq!(
            got,
            [
                (vec![1], None, None),
                (vec![2, 3], open(9), None),
                (vec![], None, Some(Lsn(10))),
                (vec![4, 5, 6], open(9), None),
                (
                    vec![7],
                    Some(Early {
                        xid: 9,
                        end: Some(EarlyEnd::Commit {
                            lsn: Lsn(20),
                            ts_us: 7
                        })
                    }),
                    Some(Lsn(20))
                ),
                (
                    vec![],
                    Some(Early {
                        xid: 11,
                        end: Some(EarlyEnd::Abort)
                    }),
                    None
                ),
            ]
        );
        drop(tx);
        let last = r.next().await.unwrap().unwrap();
        assert_eq!(last.events.len(), 1);
        assert!(last.early.is_none());
        assert!(r.next().await.unwrap().is_none());
    }
}
