//! The backfill of the kafka transport: chunks of existing rows produced
//! into the change stream itself, merged with it by watermarks (DBLog).
//!
//! With `direct`, the one applier copies chunks between two batches (see
//! [`crate::backfill`]). Through Kafka the stream is split over partitions
//! and applied by many processes, so no single place sits between "before"
//! and "after". Instead the producer puts the chunk's rows into the stream,
//! each at a position where it is the row's true state; every write of the
//! target then comes from the partitioned stream, in per-key order, and any
//! number of appliers can share it.
//!
//! # A chunk, step by step
//! Let P be the stream position up to which the producer has processed
//! changes when it starts a chunk.
//! 1. In one REPEATABLE READ transaction it reads `pg_current_snapshot()`
//!    (call it S) and the chunk: the next `n` source rows after the cursor,
//!    in key order, as text.
//! 2. It writes a high watermark H: a transactional logical message, which
//!    commits after S was taken.
//! 3. While it processes the stream from P to H, every key changed there is
//!    dropped from the chunk ([`Chunk::observe`]), except by a partial
//!    update (below); a TRUNCATE drops all.
//! 4. At H it produces the remaining rows as `op: r` records, right after
//!    the events before H and before any event after H.
//!
//! # Why that is correct
//! A row R kept for key K was read in S. It must equal K's state at H.
//! Changes to K that commit after H come after the `r` record in K's
//! partition, so they are applied over it, in order. Changes that commit
//! before H are of three kinds:
//! - processed before P, and visible in S: R already reflects them;
//! - between P and H: K was dropped (step 3), whether S saw them or not;
//! - processed before P but *not* visible in S. PostgreSQL makes a
//!   transaction visible slightly after its commit record is written, so a
//!   transaction can in principle be decoded and streamed before a snapshot
//!   taken later sees it. The producer keeps the ids of the transactions it
//!   processed recently ([`RecentXids`]); if any of them is still running in
//!   S ([`Snapshot::running`]), the chunk is read again (see
//!   [`crate::source::postgres::visibility`]).
//!
//! So a kept row is K's state at H, and K's later changes follow it. A
//! dropped key's rows reach the target through the stream: inserts and
//! updates carry the whole row, and an update that left a TOASTed column
//! out (`unavailable`) makes the applier re-read the row from the source
//! when the target lacks it, which is K's state at some point T after the
//! event, with every change after T still to come. Deletes are never
//! resurrected: a row deleted before H is either not in S (gone) or deleted
//! between P and H (dropped).
//!
//! # Partial updates
//! Dropping K for a partial update (same key, a TOASTed column left out
//! because it did not change) would leave the column's value to the target
//! row the update is applied over. That is right when the target lacks the
//! row (it is re-read, above) or holds a row that converges, but a repair
//! chunk exists because target rows may be wrong: after a broker lost
//! records, a row whose TOASTed column was set by a lost record and later
//! touched only by partial updates stayed wrong (the broker-outage test
//! caught it). So a partial update of a kept row patches it: the cells it
//! carries replace the row's. The patched row is still K's state at H: take
//! K's events e1..en between P and H, all partial updates (anything else
//! drops K), and ej the last one S saw. For each column, the last event
//! carrying it wins, which is its value at H whether it came before S (R
//! holds the same value) or after; a column no event carries did not change
//! from S to H, so R's value is right.
//!
//! # Crashes
//! The chunk's cursor is stored only after Kafka acknowledged every record
//! up to and including its `r` records, together with the slot position of
//! that batch. After a crash the stream replays from the slot and the chunk
//! is read again; the records produced twice are the same states in the
//! same per-key order, which the appliers apply idempotently.

use crate::model::{Cell, Change, ChangeEvent, Key, Row};
use std::collections::{HashMap, HashSet};

/// An open chunk: its rows, until the high watermark.
#[derive(Debug)]
pub struct Chunk {
    /// The content of its high watermark message.
    pub id: String,
    rows: HashMap<Key, Row>,
    /// Keys to delete at the watermark (a repair's target rows the source
    /// lacks), dropped like rows when changed before it.
    deletes: HashSet<Key>,
    /// The cursor after this chunk, and whether it ends the range.
    pub cursor: Option<Key>,
    pub done: bool,
    /// Rows read, before dropping.
    pub read: usize,
}

impl Chunk {
    pub fn new(
        id: String,
        rows: Vec<Row>,
        key: &[usize],
        cursor: Option<Key>,
        done: bool,
    ) -> Chunk {
        let read = rows.len();
        let rows = rows
            .into_iter()
            .filter_map(|r| r.key(key).map(|k| (k, r)))
            .collect();
        Chunk {
            id,
            rows,
            deletes: HashSet::new(),
            cursor,
            done,
            read,
        }
    }

    /// Adds keys to delete at the watermark.
    pub fn with_deletes(mut self, keys: Vec<Key>) -> Chunk {
        self.deletes.extend(keys);
        self
    }

    fn drop_key(&mut self, k: &Key) {
        self.rows.remove(k);
        self.deletes.remove(k);
    }

    /// Drops the rows (and deletes) whose key this event changes; a partial
    /// update (a TOASTed column left out, unchanged) patches the row instead
    /// (see the module docs).
    pub fn observe(&mut self, e: &ChangeEvent, key: &[usize]) {
        if let Change::Update { old_key, new } = &e.change {
            if let Some(k) = new.key(key) {
                let same_key = old_key.as_ref().is_none_or(|o| *o == k);
                let partial = new.cells.iter().any(|c| matches!(c, Cell::Absent));
                if same_key && partial && self.patch(&k, new) {
                    return;
                }
            }
        }
        match &e.change {
            Change::Insert { new } => {
                if let Some(k) = new.key(key) {
                    self.drop_key(&k);
                }
            }
            Change::Update { old_key, new } => {
                if let Some(k) = old_key {
                    self.drop_key(k);
                }
                if let Some(k) = new.key(key) {
                    self.drop_key(&k);
                }
            }
            Change::Delete { key: k } => self.drop_key(k),
            Change::Truncate => {
                self.rows.clear();
                self.deletes.clear();
            }
        }
    }

    /// Sets the cells a partial update carries on the row held for `k`;
    /// false (nothing changed) if the chunk holds no such row of the same
    /// shape (a column added since the chunk was read).
    fn patch(&mut self, k: &Key, new: &Row) -> bool {
        match self.rows.get_mut(k) {
            Some(row) if row.cells.len() == new.cells.len() => {
                for (cell, update) in row.cells.iter_mut().zip(&new.cells) {
                    if !matches!(update, Cell::Absent) {
                        *cell = update.clone();
                    }
                }
                true
            }
            Some(_) => false,
            // Not held (read after it was dropped, or out of range): the
            // update reaches the target through the stream.
            None => {
                self.deletes.remove(k);
                true
            }
        }
    }

    /// The rows that are their keys' state at the high watermark, and the
    /// keys that are absent there.
    pub fn into_parts(self) -> (Vec<Row>, Vec<Key>) {
        (
            self.rows.into_values().collect(),
            self.deletes.into_iter().collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Lsn;

    fn row(id: &str, v: &str) -> Row {
        Row {
            cells: vec![
                Cell::Present(Some(id.into())),
                Cell::Present(Some(v.into())),
            ],
        }
    }

    fn at(change: Change) -> ChangeEvent {
        ChangeEvent {
            change,
            commit_lsn: Lsn(1),
            commit_ts_us: 0,
            xid: 0,
        }
    }

    fn k(id: &str) -> Key {
        Key(vec![Some(id.into())])
    }

    #[test]
    fn keys_changed_before_the_watermark_are_dropped() {
        let rows = (1..=6).map(|i| row(&i.to_string(), "old")).collect();
        let mut c = Chunk::new("w".into(), rows, &[0], Some(k("6")), false).with_deletes(vec![
            k("5"),
            k("7"),
            k("8"),
        ]);
        c.observe(&at(Change::Insert { new: row("1", "x") }), &[0]);
        c.observe(
            &at(Change::Update {
                old_key: None,
                new: Row {
                    cells: vec![Cell::Present(Some("2".into())), Cell::Absent],
                },
            }),
            &[0],
        );
        c.observe(
            &at(Change::Update {
                old_key: Some(k("3")),
                new: row("4", "moved"),
            }),
            &[0],
        );
        c.observe(&at(Change::Delete { key: k("5") }), &[0]);
        c.observe(
            &at(Change::Insert {
                new: row("99", "x"),
            }),
            &[0],
        );
        c.observe(&at(Change::Insert { new: row("8", "x") }), &[0]);
        let (mut kept, mut deletes) = c.into_parts();
        kept.sort_by_key(|r| r.key(&[0]));
        deletes.sort();
        assert_eq!(kept, vec![row("2", "old"), row("6", "old")]);
        assert_eq!(
            deletes,
            vec![k("7")],
            "5 and 8 changed before the watermark"
        );
    }

    /// A partial update patches the row it finds (the cells it carries);
    /// a full update after it still drops the key, and a key change with a
    /// partial row drops both keys.
    #[test]
    fn partial_updates_patch_the_rows_they_find() {
        let three = |id: &str, a: &str, t: &str| Row {
            cells: vec![
                Cell::Present(Some(id.into())),
                Cell::Present(Some(a.into())),
                Cell::Present(Some(t.into())),
            ],
        };
        let partial = |id: &str, a: &str| Row {
            cells: vec![
                Cell::Present(Some(id.into())),
                Cell::Present(Some(a.into())),
                Cell::Absent,
            ],
        };
        let rows = ["1", "2", "3", "4"]
            .iter()
            .map(|id| three(id, "a0", "long"))
            .collect();
        let mut c = Chunk::new("w".into(), rows, &[0], None, true);
        let update = |old_key: Option<Key>, new: Row| at(Change::Update { old_key, new });
        c.observe(&update(None, partial("1", "a1")), &[0]);
        c.observe(&update(Some(k("2")), partial("2", "a2")), &[0]);
        c.observe(&update(None, partial("3", "a3")), &[0]);
        c.observe(&update(None, three("3", "a4", "new")), &[0]);
        c.observe(&update(Some(k("4")), partial("9", "moved")), &[0]);
        c.observe(&update(None, partial("7", "not held")), &[0]);
        let (mut kept, _) = c.into_parts();
        kept.sort_by_key(|r| r.key(&[0]));
        assert_eq!(
            kept,
            vec![three("1", "a1", "long"), three("2", "a2", "long")]
        );
    }

    #[test]
    fn a_truncate_drops_the_whole_chunk() {
        let mut c = Chunk::new("w".into(), vec![row("1", "a")], &[0], None, true);
        c.observe(&at(Change::Truncate), &[0]);
        assert!(c.into_parts().0.is_empty());
    }
}
