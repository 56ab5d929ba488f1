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
//! Two cases make the reader give streaming up ([`Unstream`]): a rollback to
//! a savepoint inside a streamed transaction (the protocol names the aborted
//! subtransaction, but `pg_walstream` does not say which subtransaction made
//! each change), and buffers above their memory limit. The reader then
//! reconnects without streaming from the position after the last commit it
//! passed on; the walsender sends every later transaction whole, with rolled
//! back subtransactions already left out.

use crate::model::{Change, Lsn, SourceMsg};
use std::collections::HashMap;

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
}

#[derive(Debug, Default)]
struct Buffered {
    msgs: Vec<SourceMsg>,
    bytes: usize,
}

impl Streams {
    /// `limit`: bytes all buffers together may hold (approximately).
    pub fn new(limit: usize) -> Streams {
        Streams {
            open: HashMap::new(),
            current: None,
            bytes: 0,
            limit,
        }
    }

    /// Inside a streamed block: the messages decoded now belong to it.
    pub fn receiving(&self) -> bool {
        self.current.is_some()
    }

    /// `Stream Start`. A first segment starts the transaction over (after a
    /// reconnect the walsender streams it again from its beginning).
    pub fn start(&mut self, xid: u32, first_segment: bool) {
        if first_segment {
            self.forget(xid);
        }
        self.current = Some(xid);
    }

    /// `Stream Stop`.
    pub fn stop(&mut self) {
        self.current = None;
    }

    /// Keeps a message of the block being received.
    pub fn push(&mut self, msg: SourceMsg) -> Result<(), Unstream> {
        let Some(xid) = self.current else {
            return Err(Unstream("a streamed change outside a stream block".into()));
        };
        let size = approx_bytes(&msg);
        let buffer = self.open.entry(xid).or_default();
        buffer.msgs.push(msg);
        buffer.bytes += size;
        self.bytes += size;
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
        out.reserve(buffer.msgs.len() + 1);
        for mut msg in buffer.msgs {
            if let SourceMsg::Change(e) = &mut msg {
                e.commit_lsn = commit_lsn;
                e.commit_ts_us = commit_ts_us;
            }
            out.push(msg);
        }
        out.push(SourceMsg::Commit { lsn: end_lsn, xid });
    }

    /// `Stream Abort` of the transaction (dropped) or of one of its
    /// subtransactions (streaming must stop, see the module docs).
    /// A savepoint rollback in a transaction that sent nothing of this
    /// publication (rowshift's own preflight dry-run, for one) loses nothing.
    pub fn abort(&mut self, xid: u32, subxid: u32) -> Result<(), Unstream> {
        let sent_nothing = self.open.get(&xid).is_none_or(|b| b.msgs.is_empty());
        if subxid != xid && !sent_nothing {
            return Err(Unstream(
                "a streamed transaction rolled back to a savepoint".into(),
            ));
        }
        self.forget(xid);
        Ok(())
    }

    /// Drops every buffer (the reader reconnects).
    pub fn clear(&mut self) {
        self.open.clear();
        self.current = None;
        self.bytes = 0;
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
                _ => "?".into(),
            })
            .collect()
    }

    #[test]
    fn interleaved_blocks_come_out_whole_at_each_commit() {
        let mut s = Streams::new(1 << 20);
        s.start(7, true);
        s.push(change("a1")).unwrap();
        s.stop();
        s.start(8, true);
        s.push(change("b1")).unwrap();
        s.stop();
        s.start(7, false);
        s.push(SourceMsg::Watermark("w".into())).unwrap();
        s.push(change("a2")).unwrap();
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
    }

    #[test]
    fn aborts_drop_and_first_segments_start_over() {
        let mut s = Streams::new(1 << 20);
        s.start(7, true);
        s.push(change("gone")).unwrap();
        s.stop();
        s.abort(7, 7).unwrap();
        s.start(9, true);
        s.push(change("sent twice")).unwrap();
        s.stop();
        s.start(9, true); // streamed again from its start
        s.push(change("once")).unwrap();
        s.stop();
        let mut out = Vec::new();
        s.commit(7, Lsn(1), 0, Lsn(2), &mut out); // nothing left of 7
        s.commit(9, Lsn(3), 0, Lsn(4), &mut out);
        assert_eq!(ids(&out), ["commit 7 2", "once@3/0", "commit 9 4"]);
        assert_eq!(s.bytes, 0);
    }

    #[test]
    fn savepoint_rollbacks_and_the_memory_limit_end_streaming() {
        let mut s = Streams::new(1 << 20);
        s.start(7, true);
        s.push(change("a")).unwrap();
        s.stop();
        assert!(s.abort(7, 8).is_err());
        s.start(9, true);
        s.stop();
        s.abort(9, 10)
            .expect("nothing of 9 was sent: nothing to lose");
        s.abort(11, 12).expect("11 never streamed");
        let mut small = Streams::new(200);
        small.start(1, true);
        small.push(change("x")).unwrap();
        assert!(small.push(change("y".repeat(200).as_str())).is_err());
        assert!(Streams::new(200).push(change("no block")).is_err());
        small.clear();
        assert_eq!(small.bytes, 0);
        assert!(!small.receiving());
    }
}
