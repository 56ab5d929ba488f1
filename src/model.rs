//! The event model shared by sources, transports and sinks.
//!
//! Values travel in PostgreSQL's text format (what pgoutput sends and what
//! every type's input function accepts), so a value read from the stream can
//! be written back with a plain cast and no type-specific code in between.
//! A column that is *absent* from a [`Row`] is an unchanged TOAST value: the
//! sink must leave it alone (invariant 4), which is different from `None`
//! (SQL NULL).

use std::fmt;

/// A WAL position (log sequence number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);

    /// Parses PostgreSQL's `X/Y` notation.
    pub fn parse(text: &str) -> Option<Lsn> {
        let (hi, lo) = text.split_once('/')?;
        let hi = u64::from_str_radix(hi, 16).ok()?;
        let lo = u64::from_str_radix(lo, 16).ok()?;
        Some(Lsn((hi << 32) | lo))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// One column value in text format; `None` is SQL NULL.
pub type Value = Option<String>;

/// A row as carried by a change event: values by source column position.
/// `values[i] == Absent` means the column was not carried (unchanged TOAST).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    Absent,
    Present(Value),
}

/// A row of source columns, positionally aligned with the stream's column list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub cells: Vec<Cell>,
}

impl Row {
    /// True when every column is carried (a full row image).
    pub fn is_complete(&self) -> bool {
        self.cells.iter().all(|c| matches!(c, Cell::Present(_)))
    }

    /// Copies the carried cells of `newer` over this row.
    pub fn overlay(&mut self, newer: &Row) {
        for (mine, theirs) in self.cells.iter_mut().zip(&newer.cells) {
            if let Cell::Present(v) = theirs {
                *mine = Cell::Present(v.clone());
            }
        }
    }

    /// The primary key values of this row, if all key columns are carried.
    pub fn key(&self, key_positions: &[usize]) -> Option<Key> {
        let mut parts = Vec::with_capacity(key_positions.len());
        for &pos in key_positions {
            match self.cells.get(pos) {
                Some(Cell::Present(v)) => parts.push(v.clone()),
                _ => return None,
            }
        }
        Some(Key(parts))
    }
}

/// A primary key value (text format, one entry per key column).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub Vec<Value>);

impl Key {
    /// The text parameters of a key range: `lo`'s columns, then `hi`'s.
    pub fn range_params(lo: Option<&Key>, hi: Option<&Key>) -> Vec<Option<String>> {
        [lo, hi]
            .into_iter()
            .flatten()
            .flat_map(|k| k.0.iter().cloned())
            .collect()
    }
}

/// One change to one row of the source table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Insert {
        new: Row,
    },
    /// `old_key` is set when the primary key changed (pgoutput's 'K'/'O' tuple).
    Update {
        old_key: Option<Key>,
        new: Row,
    },
    Delete {
        key: Key,
    },
    Truncate,
}

/// A change with the position of the transaction it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEvent {
    pub change: Change,
    /// Commit LSN of the source transaction (final LSN from BEGIN).
    pub commit_lsn: Lsn,
    /// Commit time in microseconds since the Unix epoch.
    pub commit_ts_us: i64,
    /// The source transaction's id as pgoutput names it (32 bits); 0
    /// (PostgreSQL's invalid id) when unknown, e.g. for a backfill row.
    pub xid: u32,
}

/// A unit handed from the source to a transport and on to a sink.
///
/// `ack` is the position the source may confirm to the slot once every event
/// of this batch (and of every earlier batch) is durable downstream. It is
/// only ever the end of a complete transaction or a heartbeat position, never
/// the middle of a transaction.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub seq: u64,
    pub events: Vec<ChangeEvent>,
    pub ack: Option<Lsn>,
    /// Heartbeat emitted at this wall-clock time (µs) was passed by this batch.
    pub heartbeat_us: Option<i64>,
    /// Source columns added (carried after the known ones from then on),
    /// each with the number of events of this batch that came before.
    pub columns_added: Vec<(usize, Vec<String>)>,
    /// Watermark messages of this pipeline, each with the number of events
    /// of this batch that came before it.
    pub watermarks: Vec<(usize, String)>,
    /// Transaction ids of the transactions that committed in this batch.
    pub xids: Vec<u32>,
    /// Set when `events` belong to a transaction still in progress on the
    /// source (see [`SourceMsg::Streamed`]): nothing of such a batch may
    /// become visible before the transaction's end says it committed.
    pub early: Option<Early>,
}

/// A batch of a transaction passed on before its commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Early {
    pub xid: u32,
    /// How the transaction ended, if it did with this batch.
    pub end: Option<EarlyEnd>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyEnd {
    /// Committed: `lsn` is the end of its commit record.
    Commit { lsn: Lsn, ts_us: i64 },
    /// Rolled back, or abandoned by the reader (it reconnects, and the
    /// transaction comes again, whole, if it commits).
    Abort,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.ack.is_none()
            && self.heartbeat_us.is_none()
            && self.early.is_none()
    }
}

/// What a source hands to a transport, in stream order.
#[derive(Debug)]
pub enum SourceMsg {
    Change(ChangeEvent),
    /// A transaction ended at this position.
    Commit {
        lsn: Lsn,
        xid: u32,
    },
    /// A transactional watermark message of this pipeline (its content).
    Watermark(String),
    /// Columns added to the source table: rows carry them after the
    /// columns known before (see `ReaderConfig::carry_added_columns`).
    ColumnsAdded(Vec<String>),
    /// A heartbeat written at `emitted_us` was passed at `lsn`.
    Heartbeat {
        lsn: Lsn,
        emitted_us: i64,
    },
    /// A change of transaction `xid`, passed on while the transaction is
    /// still in progress (its event carries no commit position yet). Only a
    /// reader asked to do so sends these (`ReaderConfig::early`), and for
    /// one transaction at a time.
    Streamed {
        xid: u32,
        event: ChangeEvent,
    },
    /// The end of a transaction whose changes came as [`SourceMsg::Streamed`].
    StreamEnd {
        xid: u32,
        end: EarlyEnd,
    },
    Failed(String),
}

/// SQL a sink runs inside the transaction of a write (a state checkpoint),
/// with text parameters; the sink writes and the checkpoint commit together.
#[derive(Debug, Clone, Default)]
pub struct Checkpoint {
    pub sql: String,
    pub params: Vec<Option<String>>,
    /// The checkpoint must change exactly one row, or the whole write is
    /// rolled back: another process took the pipeline over.
    pub fenced: bool,
}

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_text() {
        let lsn = Lsn::parse("16/B374D848").unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!(Lsn::parse("nonsense"), None);
    }

    #[test]
    fn overlay_keeps_absent_cells() {
        let mut base = Row {
            cells: vec![
                Cell::Present(Some("1".into())),
                Cell::Present(Some("big".into())),
            ],
        };
        let partial = Row {
            cells: vec![Cell::Present(Some("2".into())), Cell::Absent],
        };
        base.overlay(&partial);
        assert_eq!(base.cells[0], Cell::Present(Some("2".into())));
        assert_eq!(base.cells[1], Cell::Present(Some("big".into())));
        assert!(!partial.is_complete());
        assert_eq!(partial.key(&[1]), None);
        assert_eq!(partial.key(&[0]), Some(Key(vec![Some("2".into())])));
    }
}
