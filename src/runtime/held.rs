//! Change batches held back while the target's indexes are deferred (see
//! [`crate::backfill::indexes`]): kept in order and unacknowledged until
//! the indexes are built, then applied first.

use crate::model::{Batch, Cell, Change};
use std::collections::VecDeque;

/// Bytes of held values at which the indexes are built early whatever the
/// change count, so holding stays bounded in memory.
const MAX_BYTES: usize = 64 << 20;

/// The held batches and their size.
#[derive(Debug, Default)]
pub struct Held {
    /// Each batch with its size, counted once.
    batches: VecDeque<(Batch, usize)>,
    changes: usize,
    bytes: usize,
    max_changes: usize,
}

impl Held {
    pub fn new(max_changes: u32) -> Held {
        Held {
            max_changes: max_changes as usize,
            ..Held::default()
        }
    }

    /// While `deferring`, keeps `batch` and returns `None`, except a batch
    /// without changes (a heartbeat) when nothing is held: that one is
    /// returned to be acknowledged at once. Otherwise returns it unchanged.
    pub fn admit(&mut self, deferring: bool, batch: Batch) -> Option<Batch> {
        let quiet = batch.events.is_empty() && batch.early.is_none();
        if !deferring || (quiet && self.batches.is_empty()) {
            return Some(batch);
        }
        let bytes = batch_bytes(&batch);
        self.changes += batch.events.len();
        self.bytes += bytes;
        self.batches.push_back((batch, bytes));
        None
    }

    /// True when the held changes reached their bound: build the indexes now.
    pub fn full(&self) -> bool {
        !self.batches.is_empty() && (self.changes >= self.max_changes || self.bytes >= MAX_BYTES)
    }

    /// The oldest held batch (to apply once the indexes are built).
    pub fn next(&mut self) -> Option<Batch> {
        let (b, bytes) = self.batches.pop_front()?;
        self.changes -= b.events.len();
        self.bytes -= bytes;
        Some(b)
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Changes held.
    pub fn changes(&self) -> usize {
        self.changes
    }
}

/// About what a batch's values take in memory.
fn batch_bytes(b: &Batch) -> usize {
    let row_bytes = |cells: &[Cell]| -> usize {
        cells
            .iter()
            .map(|c| match c {
                Cell::Present(Some(v)) => v.len() + 24,
                _ => 24,
            })
            .sum()
    };
    b.events
        .iter()
        .map(|e| {
            64 + match &e.change {
                Change::Insert { new } | Change::Update { new, .. } => row_bytes(&new.cells),
                Change::Delete { key } => key
                    .0
                    .iter()
                    .map(|v| v.as_ref().map_or(8, String::len))
                    .sum(),
                Change::Truncate => 0,
            }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ChangeEvent, Lsn, Row};

    fn batch(seq: u64, inserts: usize, value: &str) -> Batch {
        Batch {
            seq,
            events: (0..inserts)
                .map(|i| ChangeEvent {
                    change: Change::Insert {
                        new: Row {
                            cells: vec![
                                Cell::Present(Some(i.to_string())),
                                Cell::Present(Some(value.into())),
                            ],
                        },
                    },
                    commit_lsn: Lsn(seq),
                    commit_ts_us: 0,
                    xid: 0,
                })
                .collect(),
            ack: Some(Lsn(seq)),
            ..Batch::default()
        }
    }

    #[test]
    fn not_deferring_passes_everything_through() {
        let mut h = Held::new(10);
        assert!(h.admit(false, batch(1, 3, "x")).is_some());
        assert!(h.is_empty());
    }

    #[test]
    fn heartbeats_pass_only_while_nothing_is_held() {
        let mut h = Held::new(10);
        // A heartbeat with nothing held is acknowledged at once.
        assert!(h.admit(true, batch(1, 0, "")).is_some());
        assert!(h.admit(true, batch(2, 2, "x")).is_none());
        // Behind held changes, a heartbeat waits its turn: acknowledging it
        // would confirm the held changes' positions too.
        assert!(h.admit(true, batch(3, 0, "")).is_none());
        assert_eq!(h.changes(), 2);
        assert_eq!(h.next().map(|b| b.seq), Some(2));
        assert_eq!(h.next().map(|b| b.seq), Some(3));
        assert!(h.next().is_none());
        assert_eq!((h.changes, h.bytes), (0, 0));
    }

    #[test]
    fn full_at_the_change_bound_or_the_byte_bound() {
        let mut h = Held::new(5);
        h.admit(true, batch(1, 4, "x"));
        assert!(!h.full());
        h.admit(true, batch(2, 1, "x"));
        assert!(h.full());
        let mut h = Held::new(1_000_000);
        let big = "v".repeat(1 << 20);
        for i in 0..63 {
            h.admit(true, batch(i, 1, &big));
        }
        assert!(!h.full());
        h.admit(true, batch(64, 1, &big));
        assert!(h.full());
        // A bound of zero builds at the first change held.
        let mut h = Held::new(0);
        assert!(!h.full());
        h.admit(true, batch(1, 1, "x"));
        assert!(h.full());
    }
}
