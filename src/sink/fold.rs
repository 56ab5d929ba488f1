//! Folds a batch of events into one net operation per key, so a batch turns
//! into a few multi-row statements instead of one statement per event.
//!
//! Per key, in event order:
//!
//! | net so far     | insert / full update | partial update (TOAST absent) | delete | key change to k2            |
//! |----------------|----------------------|-------------------------------|--------|-----------------------------|
//! | none           | Upsert(row)          | Partial(row)                  | Delete | k1: Delete, k2: see below   |
//! | Upsert(r)      | Upsert(row)          | Upsert(r overlaid)            | Delete | k2: Upsert(r overlaid)      |
//! | Partial(p)     | Upsert(row)          | Partial(p overlaid)           | Delete | k2: Refetch                 |
//! | Refetch        | Upsert(row)          | Refetch                       | Delete | k2: Refetch                 |
//!
//! `Refetch` means "read the row's current state from the source and upsert
//! it". It must not be *older* than the batch: the read waits until the
//! batch's transactions are visible on the source
//! ([`crate::source::postgres::visibility`]). Writing a state *newer* than the batch is safe: every event after the
//! batch is applied afterwards in order, and re-applying older events on top
//! of a newer state converges to the newest state (the argument is in
//! [`crate::backfill`]). A TRUNCATE splits the batch into segments applied in
//! order.

use crate::model::{Cell, Change, ChangeEvent, Key, Row};
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Net {
    Upsert(Row),
    Partial(Row),
    Delete,
    Refetch,
}

/// The net effect of consecutive events, with no key twice.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Segment {
    pub ops: Vec<(Key, Net)>,
    /// Apply a TRUNCATE of the target before `ops`.
    pub truncate_first: bool,
    /// More INSERT events than UPDATE events went into this segment: its
    /// upserts are most likely new rows. Only the order the sink tries its
    /// two statements in depends on it, never the result.
    pub mostly_inserts: bool,
}

impl Segment {
    pub fn upserts(&self) -> impl Iterator<Item = &Row> {
        self.ops.iter().filter_map(|(_, n)| match n {
            Net::Upsert(r) => Some(r),
            _ => None,
        })
    }
    pub fn deletes(&self) -> impl Iterator<Item = &Key> {
        self.ops
            .iter()
            .filter_map(|(k, n)| matches!(n, Net::Delete).then_some(k))
    }
    pub fn refetches(&self) -> impl Iterator<Item = &Key> {
        self.ops
            .iter()
            .filter_map(|(k, n)| matches!(n, Net::Refetch).then_some(k))
    }
    /// Partial rows grouped by the positions of the columns they carry.
    pub fn partial_groups(&self) -> Vec<(Vec<usize>, Vec<&Row>)> {
        let mut groups: Vec<(Vec<usize>, Vec<&Row>)> = Vec::new();
        for (_, n) in &self.ops {
            if let Net::Partial(row) = n {
                let carried: Vec<usize> = row
                    .cells
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| matches!(c, Cell::Present(_)))
                    .map(|(i, _)| i)
                    .collect();
                match groups.iter_mut().find(|(c, _)| *c == carried) {
                    Some((_, rows)) => rows.push(row),
                    None => groups.push((carried, vec![row])),
                }
            }
        }
        groups
    }
}

/// The most keys [`fold`] makes room for before it sees them.
const PRESIZE_LIMIT: usize = 16_384;

/// Folds events (in commit order) into segments.
/// Takes the events by value: rows move into the result instead of being copied.
pub fn fold(events: Vec<ChangeEvent>, key_positions: &[usize]) -> Result<Vec<Segment>, String> {
    let mut segments = Vec::new();
    // Sized for the batch up front (up to a bound: a large transaction
    // may touch few keys many times): growing the index step by step
    // rehashed it, into fresh pages the kernel had to clear, several times
    // per batch.
    let room = events.len().min(PRESIZE_LIMIT);
    let mut current = Folder {
        index: KeyIndex::with_capacity(room),
        ops: Vec::with_capacity(room),
        ..Folder::default()
    };
    for event in events {
        match event.change {
            Change::Truncate => {
                let done = std::mem::take(&mut current).finish();
                if !done.ops.is_empty() || done.truncate_first {
                    segments.push(done);
                }
                current.truncate_first = true;
            }
            Change::Insert { new } => {
                let key = new
                    .key(key_positions)
                    .ok_or("an INSERT without its key columns")?;
                current.inserts += 1;
                current.set(key, Net::Upsert(new));
            }
            Change::Delete { key } => current.set(key, Net::Delete),
            Change::Update { old_key, new } => {
                current.updates += 1;
                let key = new
                    .key(key_positions)
                    .ok_or("an UPDATE without its key columns")?;
                match old_key {
                    None => current.update(key, new),
                    Some(old) => {
                        let carried_over = match current.take(&old) {
                            Some(Net::Upsert(mut r)) => {
                                r.overlay(&new);
                                Some(r)
                            }
                            _ => None,
                        };
                        current.set(old, Net::Delete);
                        let net = if new.is_complete() {
                            Net::Upsert(new)
                        } else {
                            match carried_over {
                                Some(r) => Net::Upsert(r),
                                None => Net::Refetch,
                            }
                        };
                        current.set(key, net);
                    }
                }
            }
        }
    }
    let last = current.finish();
    if !last.ops.is_empty() || last.truncate_first {
        segments.push(last);
    }
    Ok(segments)
}

#[derive(Default)]
struct Folder {
    index: KeyIndex,
    ops: Vec<(Key, Net)>,
    truncate_first: bool,
    inserts: usize,
    updates: usize,
}

/// The position in `ops` of each key, found by the key's hash: the keys
/// themselves are kept only in `ops`, so each event hashes its key once and
/// no key is copied. (A `HashMap<Key, usize>` hashed each new key twice and
/// kept a copy of it; this was about a third of a batch's fold.)
#[derive(Default)]
struct KeyIndex {
    /// Hash of a key (SipHash, randomly keyed) to the last op with it.
    heads: HashMap<u64, u32, BuildHasherDefault<Prehashed>>,
    /// For each op, the previous op whose key has the same hash.
    chain: Vec<u32>,
    state: RandomState,
}

const NO_OP: u32 = u32::MAX;

impl KeyIndex {
    fn with_capacity(n: usize) -> KeyIndex {
        KeyIndex {
            heads: HashMap::with_capacity_and_hasher(n, BuildHasherDefault::default()),
            chain: Vec::with_capacity(n),
            state: RandomState::new(),
        }
    }

    fn hash(&self, key: &Key) -> u64 {
        self.state.hash_one(key)
    }

    fn find(&self, hash: u64, key: &Key, ops: &[(Key, Net)]) -> Option<usize> {
        let mut at = *self.heads.get(&hash)?;
        while at != NO_OP {
            let i = at as usize;
            if ops.get(i).is_some_and(|(k, _)| k == key) {
                return Some(i);
            }
            at = self.chain.get(i).copied().unwrap_or(NO_OP);
        }
        None
    }

    /// Records that the op at `i` (the next one pushed) has a key of `hash`.
    fn add(&mut self, hash: u64, i: usize) {
        let previous = self.heads.insert(hash, i as u32).unwrap_or(NO_OP);
        self.chain.push(previous);
    }
}

/// The hasher of [`KeyIndex::heads`], whose keys are already SipHash values.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl Folder {
    fn position(&self, key: &Key) -> (u64, Option<usize>) {
        let hash = self.index.hash(key);
        (hash, self.index.find(hash, key, &self.ops))
    }

    fn set(&mut self, key: Key, net: Net) {
        match self.position(&key) {
            (_, Some(i)) => self.ops[i].1 = net,
            (hash, None) => {
                self.index.add(hash, self.ops.len());
                self.ops.push((key, net));
            }
        }
    }

    fn take(&mut self, key: &Key) -> Option<Net> {
        let i = self.position(key).1?;
        Some(std::mem::replace(&mut self.ops[i].1, Net::Delete))
    }

    fn update(&mut self, key: Key, new: Row) {
        if new.is_complete() {
            return self.set(key, Net::Upsert(new));
        }
        let (hash, found) = self.position(&key);
        match found.map(|i| &mut self.ops[i].1) {
            Some(Net::Upsert(r)) => r.overlay(&new),
            Some(Net::Partial(p)) => p.overlay(&new),
            Some(Net::Refetch) => {}
            Some(slot @ Net::Delete) => *slot = Net::Partial(new),
            None => {
                self.index.add(hash, self.ops.len());
                self.ops.push((key, Net::Partial(new)));
            }
        }
    }

    fn finish(self) -> Segment {
        Segment {
            ops: self.ops,
            truncate_first: self.truncate_first,
            mostly_inserts: self.inserts > self.updates,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Lsn;

    fn v(s: &str) -> Cell {
        Cell::Present(Some(s.to_string()))
    }
    fn row(cells: Vec<Cell>) -> Row {
        Row { cells }
    }
    fn ev(change: Change) -> ChangeEvent {
        ChangeEvent {
            change,
            commit_lsn: Lsn(1),
            commit_ts_us: 0,
            xid: 0,
        }
    }
    fn key(s: &str) -> Key {
        Key(vec![Some(s.to_string())])
    }

    #[test]
    fn insert_update_delete_fold_to_last_state() {
        let events = vec![
            ev(Change::Insert {
                new: row(vec![v("1"), v("a"), v("x")]),
            }),
            ev(Change::Update {
                old_key: None,
                new: row(vec![v("1"), v("b"), Cell::Absent]),
            }),
            ev(Change::Insert {
                new: row(vec![v("2"), v("c"), v("y")]),
            }),
            ev(Change::Delete { key: key("2") }),
        ];
        let segs = fold(events, &[0]).unwrap();
        assert_eq!(segs.len(), 1);
        assert_eq!(
            segs[0].ops[0],
            (key("1"), Net::Upsert(row(vec![v("1"), v("b"), v("x")])))
        );
        assert_eq!(segs[0].ops[1], (key("2"), Net::Delete));
    }

    #[test]
    fn partial_updates_merge_and_group_by_carried_columns() {
        let events = vec![
            ev(Change::Update {
                old_key: None,
                new: row(vec![v("1"), v("a"), Cell::Absent]),
            }),
            ev(Change::Update {
                old_key: None,
                new: row(vec![v("1"), v("b"), Cell::Absent]),
            }),
            ev(Change::Update {
                old_key: None,
                new: row(vec![v("2"), Cell::Absent, v("z")]),
            }),
        ];
        let segs = fold(events, &[0]).unwrap();
        let groups = segs[0].partial_groups();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].0, vec![0, 1]);
        assert_eq!(groups[0].1[0].cells[1], v("b"));
        assert_eq!(groups[1].0, vec![0, 2]);
    }

    #[test]
    fn key_changes_delete_the_old_key() {
        let events = vec![
            ev(Change::Insert {
                new: row(vec![v("1"), v("a"), v("x")]),
            }),
            ev(Change::Update {
                old_key: Some(key("1")),
                new: row(vec![v("5"), v("a"), Cell::Absent]),
            }),
            ev(Change::Update {
                old_key: Some(key("7")),
                new: row(vec![v("8"), v("q"), Cell::Absent]),
            }),
        ];
        let segs = fold(events, &[0]).unwrap();
        let ops = &segs[0].ops;
        assert!(ops.contains(&(key("1"), Net::Delete)));
        assert!(ops.contains(&(key("5"), Net::Upsert(row(vec![v("5"), v("a"), v("x")])))));
        assert!(ops.contains(&(key("7"), Net::Delete)));
        assert!(ops.contains(&(key("8"), Net::Refetch)));
    }

    #[test]
    fn delete_then_reinsert_is_an_upsert_and_truncate_splits() {
        let events = vec![
            ev(Change::Delete { key: key("1") }),
            ev(Change::Insert {
                new: row(vec![v("1"), v("n"), v("m")]),
            }),
            ev(Change::Truncate),
            ev(Change::Insert {
                new: row(vec![v("3"), v("n"), v("m")]),
            }),
        ];
        let segs = fold(events, &[0]).unwrap();
        assert_eq!(segs.len(), 2);
        assert!(!segs[0].truncate_first);
        assert!(matches!(segs[0].ops[0].1, Net::Upsert(_)));
        assert!(segs[1].truncate_first);
        assert_eq!(segs[1].upserts().count(), 1);
    }

    #[test]
    fn keys_with_the_same_hash_are_told_apart() {
        // Every key under one hash: each is still found at its own op.
        let mut index = KeyIndex::with_capacity(4);
        let mut ops = Vec::new();
        for k in ["a", "b", "c"] {
            assert_eq!(index.find(7, &key(k), &ops), None);
            index.add(7, ops.len());
            ops.push((key(k), Net::Delete));
        }
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            assert_eq!(index.find(7, &key(k), &ops), Some(i));
        }
        assert_eq!(index.find(7, &key("d"), &ops), None);
        assert_eq!(index.find(8, &key("a"), &ops), None);
    }

    #[test]
    fn many_keys_fold_to_one_op_each_in_first_seen_order() {
        // Updates of 5,000 keys, each key twice, the second time last.
        let mut events = Vec::new();
        for round in ["x", "y"] {
            for i in 0..5_000 {
                events.push(ev(Change::Update {
                    old_key: None,
                    new: row(vec![v(&i.to_string()), v(round), Cell::Absent]),
                }));
            }
        }
        let segs = fold(events, &[0]).unwrap();
        assert_eq!(segs.len(), 1);
        assert_eq!(segs[0].ops.len(), 5_000);
        for (i, (k, net)) in segs[0].ops.iter().enumerate() {
            assert_eq!(*k, key(&i.to_string()));
            assert_eq!(
                *net,
                Net::Partial(row(vec![v(&i.to_string()), v("y"), Cell::Absent]))
            );
        }
    }
}
