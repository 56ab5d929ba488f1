//! Large transactions streamed while still in progress (pgoutput protocol 2,
//! `streaming 'on'`, PostgreSQL 14 and later).
//!
//! Without streaming, the walsender holds a transaction's changes until its
//! commit, spilling to disk past `logical_decoding_work_mem`, then reads them
//! all back and sends them. With streaming, it sends a transaction once it
//! outgrows that memory, in blocks between `Stream Start` and `Stop`, and
//! later a `Stream Commit` or `Stream Abort`. Measured on a 200,000-row
//! UPDATE, the walsender delivered it in 0.95 s instead of 1.93 s
//! (docs/benchmarks.md, issue 2).
//!
//! The reader never passes on uncommitted changes: it keeps each streamed
//! transaction's messages here, and at its commit hands them on with the
//! commit's position and time, then the commit itself, exactly as if the
//! transaction had arrived whole. So nothing downstream knows about
//! streaming. A whole-transaction abort drops the buffer.
//!
//! **Early mode.** When the runtime allows it (`allow`, the direct transport
//! once the backfill is done), one streamed transaction at a time is not
//! kept here but passed on as it arrives ([`SourceMsg::Streamed`]), and its
//! end follows as [`SourceMsg::StreamEnd`]. The applier writes it into a
//! target transaction it keeps open until that end (see
//! `crate::runtime::early`). Only its size is counted against the limit.
//! Giving streaming up while such a transaction is open passes on its abort
//! first.
//!
//! Two cases make the reader give streaming up ([`Unstream`]): a rollback to
//! a savepoint inside a streamed transaction (the protocol names the aborted
//! subtransaction, but `pg_walstream` does not say which subtransaction made
//! each change), and buffers above their memory limit. The reader then
//! reconnects without streaming from the position after the last commit it
//! passed on; the walsender sends every later transaction whole, with rolled
//! back subtransactions already left out. Streaming comes back once the
//! transactions that caused this are over and can no longer be sent again
//! (see [`super::restream`]); [`Streams::xids`] names them.

use crate::model::{Change, EarlyEnd, Lsn, SourceMsg};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Why the reader stops streaming large transactions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unstream(pub String);

/// The streamed transactions not yet committed or aborted.
#[derive(Debug)]
pub struct Streams {
    open: HashMap<u32, Buffered>,
    /// The transaction whose block is being received.
    current: Option<u32>,
    bytes: usize,
    limit: usize,
    /// Whether a transaction that starts streaming may be passed on early.
    allow: Option<Arc<AtomicBool>>,
    /// The transaction being passed on early.
    early: Option<u32>,
}

#[derive(Debug, Default)]
struct Buffered {
    msgs: Vec<SourceMsg>,
    bytes: usize,
}

impl Streams {
    /// `limit`: bytes all buffers together may hold (approximately).
    pub fn new(limit: usize, allow: Option<Arc<AtomicBool>>) -> Streams {
        Streams {
            open: HashMap::new(),
            current: None,
            bytes: 0,
            limit,
            allow,
            early: None,
        }
    }

    /// Inside a streamed block: the messages decoded now belong to it.
    pub fn receiving(&self) -> bool {
        self.current.is_some()
    }

    /// `Stream Start`. A first segment starts the transaction over (after a
    /// reconnect the walsender streams it again from its beginning).
    /// A transaction passed on early that starts over ends first (`out`).
    pub fn start(&mut self, xid: u32, first_segment: bool, out: &mut Vec<SourceMsg>) {
        if first_segment {
            self.forget(xid);
            if self.early == Some(xid) {
                self.early = None;
                out.push(SourceMsg::StreamEnd {
                    xid,
                    end: EarlyEnd::Abort,
                });
            }
            let allowed = self
                .allow
                .as_ref()
                .is_some_and(|a| a.load(Ordering::Relaxed));
            if allowed && self.early.is_none() {
                self.early = Some(xid);
            }
        }
        self.current = Some(xid);
    }

    /// `Stream Stop`.
    pub fn stop(&mut self) {
        self.current = None;
    }

    /// Keeps a message of the block being received, or passes a change of
    /// the early transaction on (`out`).
    pub fn push(&mut self, msg: SourceMsg, out: &mut Vec<SourceMsg>) -> Result<(), Unstream> {
        let Some(xid) = self.current else {
            return Err(Unstream("a streamed change outside a stream block".into()));
        };
        let size = approx_bytes(&msg);
        let buffer = self.open.entry(xid).or_default();
        buffer.bytes += size;
        self.bytes += size;
        match msg {
            SourceMsg::Change(event) if self.early == Some(xid) => {
                out.push(SourceMsg::Streamed { xid, event });
            }
            SourceMsg::Watermark(_) if self.early == Some(xid) => {
                return Err(Unstream(
                    "a watermark inside a transaction applied early".into(),
                ));
            }
            msg => buffer.msgs.push(msg),
        }
        if self.bytes > self.limit {
            return Err(Unstream(format!(
                "streamed transactions hold more than {} MiB",
                self.limit >> 20
            )));
        }
        Ok(())
    }

    /// `Stream Commit`: the transaction's messages, stamped with its commit
    /// position and time, then the commit.
    pub fn commit(
        &mut self,
        xid: u32,
        commit_lsn: Lsn,
        commit_ts_us: i64,
        end_lsn: Lsn,
        out: &mut Vec<SourceMsg>,
    ) {
        let buffer = self.open.remove(&xid).unwrap_or_default();
        self.bytes -= buffer.bytes;
        if self.early == Some(xid) {
            self.early = None;
            out.push(SourceMsg::StreamEnd {
                xid,
                end: EarlyEnd::Commit {
                    lsn: end_lsn,
                    ts_us: commit_ts_us,
                },
            });
            return;
        }
        out.reserve(buffer.msgs.len() + 1);
        for mut msg in buffer.msgs {
            if let SourceMsg::Change(e) = &mut msg {
                e.commit_lsn = commit_lsn;
                e.commit_ts_us = commit_ts_us;
                e.xid = xid;
            }
            out.push(msg);
        }
        out.push(SourceMsg::Commit { lsn: end_lsn, xid });
    }

    /// `Stream Abort` of the transaction (dropped) or of one of its
    /// subtransactions (streaming must stop, see the module docs).
    /// A savepoint rollback in a transaction that sent nothing of this
    /// publication (rowshift's own preflight dry-run, for one) loses nothing.
    /// The early transaction's abort is passed on (`out`).
    pub fn abort(
        &mut self,
        xid: u32,
        subxid: u32,
        out: &mut Vec<SourceMsg>,
    ) -> Result<(), Unstream> {
        let sent_nothing = self.open.get(&xid).is_none_or(|b| b.bytes == 0);
        if subxid != xid && !sent_nothing {
            return Err(Unstream(
                "a streamed transaction rolled back to a savepoint".into(),
            ));
        }
        self.forget(xid);
        if self.early == Some(xid) {
            self.early = None;
            out.push(SourceMsg::StreamEnd {
                xid,
                end: EarlyEnd::Abort,
            });
        }
        Ok(())
    }

    /// The transactions streamed and not yet ended.
    pub fn xids(&self) -> Vec<u32> {
        let mut xids: Vec<u32> = self.open.keys().copied().collect();
        xids.extend(self.early.iter().chain(self.current.iter()));
        xids.sort_unstable();
        xids.dedup();
        xids
    }

    /// Drops every buffer (the reader reconnects). Returns the abort of the
    /// transaction passed on early, if one is open.
    pub fn clear(&mut self) -> Option<SourceMsg> {
        self.open.clear();
        self.current = None;
        self.bytes = 0;
        self.early.take().map(|xid| SourceMsg::StreamEnd {
            xid,
            end: EarlyEnd::Abort,
        })
    }

    fn forget(&mut self, xid: u32) {
        if let Some(b) = self.open.remove(&xid) {
            self.bytes -= b.bytes;
        }
    }
}

/// Roughly what a message costs in memory.
fn approx_bytes(msg: &SourceMsg) -> usize {
    let row = |cells: &[crate::model::Cell]| -> usize {
        cells
            .iter()
            .map(|c| match c {
                crate::model::Cell::Present(Some(s)) => 32 + s.len(),
                _ => 32,
            })
            .sum()
    };
    64 + match msg {
        SourceMsg::Change(e) => match &e.change {
            Change::Insert { new } | Change::Update { new, .. } => row(&new.cells),
            Change::Delete { key } => key
                .0
                .iter()
                .map(|v| 32 + v.as_ref().map_or(0, |s| s.len()))
                .sum(),
            Change::Truncate => 0,
        },
        SourceMsg::Watermark(w) => w.len(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Cell, ChangeEvent, Row};

    fn change(id: &str) -> SourceMsg {
        SourceMsg::Change(ChangeEvent {
            change: Change::Insert {
                new: Row {
                    cells: vec![Cell::Present(Some(id.into()))],
                },
            },
            commit_lsn: Lsn::ZERO,
            commit_ts_us: 0,
            xid: 0,
        })
    }

    fn ids(out: &[SourceMsg]) -> Vec<String> {
        out.iter()
            .map(|m| match m {
                SourceMsg::Change(e) => match &e.change {
                    Change::Insert { new } => match &new.cells[0] {
                        Cell::Present(Some(s)) => {
                            format!("{s}@{}/{}", e.commit_lsn.0, e.commit_ts_us)
                        }
                        _ => "?".into(),
                    },
                    _ => "?".into(),
                },
                SourceMsg::Commit { lsn, xid } => format!("commit {xid} {}", lsn.0),
                SourceMsg::Watermark(w) => format!("watermark {w}"),
                SourceMsg::Streamed { xid, event } => match &event.change {
                    Change::Insert { new } => match &new.cells[0] {
                        Cell::Present(Some(s)) => format!("early {xid} {s}"),
                        _ => "?".into(),
                    },
                    _ => "?".into(),
                },
                SourceMsg::StreamEnd { xid, end } => match end {
                    EarlyEnd::Commit { lsn, ts_us } => {
                        format!("early {xid} committed {}/{ts_us}", lsn.0)
                    }
                    EarlyEnd::Abort => format!("early {xid} aborted"),
                },
                _ => "?".into(),
            })
            .collect()
    }

    #[test]
    fn interleaved_blocks_come_out_whole_at_each_commit() {
        let mut sink = Vec::new();
        let mut s = Streams::new(1 << 20, None);
        s.start(7, true, &mut sink);
        s.push(change("a1"), &mut sink).unwrap();
        s.stop();
        s.start(8, true, &mut sink);
        s.push(change("b1"), &mut sink).unwrap();
        s.stop();
        s.start(7, false, &mut sink);
        s.push(SourceMsg::Watermark("w".into()), &mut sink).unwrap();
        s.push(change("a2"), &mut sink).unwrap();
        s.stop();
        assert!(!s.receiving());
        let mut out = Vec::new();
        s.commit(8, Lsn(90), 5, Lsn(100), &mut out);
        s.commit(7, Lsn(190), 6, Lsn(200), &mut out);
        assert_eq!(
            ids(&out),
            [
                "b1@90/5",
                "commit 8 100",
                "a1@190/6",
                "watermark w",
                "a2@190/6",
                "commit 7 200"
            ]
        );
        assert_eq!(s.bytes, 0);
        assert!(sink.is_empty(), "nothing passed on early");
    }

    #[test]
    fn aborts_drop_and_first_segments_start_over() {
        let mut sink = Vec::new();
        let mut s = Streams::new(1 << 20, None);
        s.start(7, true, &mut sink);
        s.push(change("gone"), &mut sink).unwrap();
        s.stop();
        s.abort(7, 7, &mut sink).unwrap();
        s.start(9, true, &mut sink);
        s.push(change("sent twice"), &mut sink).unwrap();
        s.stop();
        s.start(9, true, &mut sink); // streamed again from its start
        s.push(change("once"), &mut sink).unwrap();
        s.stop();
        let mut out = Vec::new();
        s.commit(7, Lsn(1), 0, Lsn(2), &mut out); // nothing left of 7
        s.commit(9, Lsn(3), 0, Lsn(4), &mut out);
        assert_eq!(ids(&out), ["commit 7 2", "once@3/0", "commit 9 4"]);
        assert_eq!(s.bytes, 0);
    }

    #[test]
    fn savepoint_rollbacks_and_the_memory_limit_end_streaming() {
        let mut sink = Vec::new();
        let mut s = Streams::new(1 << 20, None);
        s.start(7, true, &mut sink);
        s.push(change("a"), &mut sink).unwrap();
        s.stop();
        assert!(s.abort(7, 8, &mut sink).is_err());
        s.start(9, true, &mut sink);
        s.stop();
        s.abort(9, 10, &mut sink)
            .expect("nothing of 9 was sent: nothing to lose");
        s.abort(11, 12, &mut sink).expect("11 never streamed");
        let mut small = Streams::new(200, None);
        small.start(1, true, &mut sink);
        small.push(change("x"), &mut sink).unwrap();
        assert!(small
            .push(change("y".repeat(200).as_str()), &mut sink)
            .is_err());
        assert!(Streams::new(200, None)
            .push(change("no block"), &mut sink)
            .is_err());
        assert!(small.clear().is_none(), "nothing was passed on early");
        assert_eq!(small.bytes, 0);
        assert!(!small.receiving());
    }

    #[test]
    fn xids_name_every_transaction_not_yet_ended() {
        let allow = Arc::new(AtomicBool::new(true));
        let mut s = Streams::new(1 << 20, Some(allow));
        let mut out = Vec::new();
        s.start(9, true, &mut out); // passed on early
        s.push(change("e"), &mut out).unwrap();
        s.stop();
        s.start(4, true, &mut out); // kept; its block still being received
        s.push(change("k"), &mut out).unwrap();
        assert_eq!(s.xids(), [4, 9]);
        s.stop();
        s.start(6, true, &mut out);
        s.stop();
        s.commit(6, Lsn(1), 0, Lsn(2), &mut out);
        s.start(4, false, &mut out);
        s.stop();
        assert_eq!(s.xids(), [4, 9], "6 has ended");
        s.commit(9, Lsn(3), 0, Lsn(4), &mut out);
        assert_eq!(s.xids(), [4]);
    }

    #[test]
    fn one_transaction_at_a_time_is_passed_on_early_once_allowed() {
        let allow = Arc::new(AtomicBool::new(false));
        let mut s = Streams::new(1 << 20, Some(allow.clone()));
        let mut out = Vec::new();
        // Started before early mode was allowed: kept to its commit.
        s.start(5, true, &mut out);
        s.push(change("kept"), &mut out).unwrap();
        s.stop();
        allow.store(true, Ordering::Relaxed);
        s.start(7, true, &mut out);
        s.push(change("a1"), &mut out).unwrap();
        s.stop();
        // A second streamed transaction while 7 is open: kept.
        s.start(8, true, &mut out);
        s.push(change("b1"), &mut out).unwrap();
        s.stop();
        s.start(7, false, &mut out);
        s.push(change("a2"), &mut out).unwrap();
        s.stop();
        s.start(5, false, &mut out);
        s.push(change("kept too"), &mut out).unwrap();
        s.stop();
        assert!(s.bytes > 0);
        s.commit(7, Lsn(90), 4, Lsn(100), &mut out);
        s.commit(5, Lsn(190), 5, Lsn(200), &mut out);
        s.abort(8, 8, &mut out).unwrap();
        assert_eq!(
            ids(&out),
            [
                "early 7 a1",
                "early 7 a2",
                "early 7 committed 100/4",
                "kept@190/5",
                "kept too@190/5",
                "commit 5 200",
            ]
        );
        assert_eq!(s.bytes, 0);
        // The next one goes early; its abort, a restart and the reader's
        // reconnect each end it.
        out.clear();
        s.start(9, true, &mut out);
        s.push(change("c1"), &mut out).unwrap();
        s.stop();
        s.abort(9, 9, &mut out).unwrap();
        s.start(10, true, &mut out);
        s.push(change("d1"), &mut out).unwrap();
        s.stop();
        s.start(10, true, &mut out); // sent again from its start
        s.push(change("d2"), &mut out).unwrap();
        assert!(s.push(SourceMsg::Watermark("w".into()), &mut out).is_err());
        s.stop();
        assert!(s.abort(10, 11, &mut out).is_err(), "savepoint rollback");
        assert!(matches!(
            s.clear(),
            Some(SourceMsg::StreamEnd {
                xid: 10,
                end: EarlyEnd::Abort
            })
        ));
        assert_eq!(
            ids(&out),
            [
                "early 9 c1",
                "early 9 aborted",
                "early 10 d1",
                "early 10 aborted",
                "early 10 d2",
            ]
        );
    }
}
