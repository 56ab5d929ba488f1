//! A change event's Kafka records written straight into Confluent-framed
//! Avro bytes, without building `apache_avro` values first.
//!
//! [`TableSchema::records`] builds each record as a tree of values (a
//! freshly allocated name for every field, a box for every union) that
//! [`super::wire::encode`] then walks; per change that was most of the
//! producer's own CPU. The producer writes the same bytes directly here,
//! into buffers it reuses. `records` stays the readable definition of the
//! envelope: the tests check both give the same bytes for every kind of
//! change, and `wire`'s tests check those are the bytes `apache_avro`
//! writes for the registered schemas.

use super::envelope::{TableSchema, CONNECTOR};
use super::wire::{bytes, long};
use crate::model::{Cell, Change, ChangeEvent, Key, Row};
use std::ops::Range;

/// The framed records of one change event: key bytes and value bytes
/// (`None`: a tombstone), in the order they are to be produced.
#[derive(Debug, Default)]
pub struct Frames {
    buf: Vec<u8>,
    spans: Vec<(Range<usize>, Option<Range<usize>>)>,
}

impl Frames {
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
        self.spans
            .iter()
            .map(|(k, v)| (&self.buf[k.clone()], v.clone().map(|v| &self.buf[v])))
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Starts a frame: magic byte 0, then the schema id (big-endian).
    fn start(&mut self, id: u32) -> usize {
        let at = self.buf.len();
        self.buf.push(0);
        self.buf.extend_from_slice(&id.to_be_bytes());
        at
    }
}

/// The schema ids the key and the value are registered under.
#[derive(Debug, Clone, Copy)]
pub struct Ids {
    pub key: u32,
    pub value: u32,
}

/// The value of a column in a row or, for a delete's `before`, a key.
enum Image<'a> {
    Row(&'a Row),
    Key(&'a Key),
}

impl TableSchema {
    /// Replaces `out` with the framed records of `e` (`snapshot`: a
    /// backfill read, op `r`), the bytes [`TableSchema::records`] encodes.
    pub fn write_records(
        &self,
        e: &ChangeEvent,
        snapshot: bool,
        now_ms: i64,
        ids: Ids,
        out: &mut Frames,
    ) -> Result<(), String> {
        out.buf.clear();
        out.spans.clear();
        match &e.change {
            Change::Insert { new } => {
                let op = if snapshot { "r" } else { "c" };
                self.write_upsert(op, new, e, now_ms, ids, out)?;
            }
            Change::Update { old_key, new } => {
                let op = match old_key {
                    Some(old) => {
                        self.write_delete(old, e, now_ms, ids, out)?;
                        "c"
                    }
                    None => "u",
                };
                self.write_upsert(op, new, e, now_ms, ids, out)?;
            }
            Change::Delete { key } => self.write_delete(key, e, now_ms, ids, out)?,
            Change::Truncate => {}
        }
        Ok(())
    }

    fn write_upsert(
        &self,
        op: &str,
        row: &Row,
        e: &ChangeEvent,
        now_ms: i64,
        ids: Ids,
        out: &mut Frames,
    ) -> Result<(), String> {
        let key = self.write_key_of(row, ids.key, out)?;
        let at = out.start(ids.value);
        long(0, &mut out.buf); // before: null
        long(1, &mut out.buf);
        self.write_image(&Image::Row(row), &mut out.buf)?;
        self.write_tail(op, e, now_ms, &mut out.buf);
        // unavailable: the columns the row did not carry.
        let absent = (0..self.columns.len())
            .filter(|&i| matches!(row.cells.get(i), Some(Cell::Absent) | None))
            .count();
        if absent > 0 {
            long(absent as i64, &mut out.buf);
            for (i, (name, _)) in self.columns.iter().enumerate() {
                if matches!(row.cells.get(i), Some(Cell::Absent) | None) {
                    bytes(name.as_bytes(), &mut out.buf);
                }
            }
        }
        out.buf.push(0);
        out.spans.push((key, Some(at..out.buf.len())));
        Ok(())
    }

    /// The delete (its `before` holds only the key) and the tombstone.
    fn write_delete(
        &self,
        key: &Key,
        e: &ChangeEvent,
        now_ms: i64,
        ids: Ids,
        out: &mut Frames,
    ) -> Result<(), String> {
        let k = self.write_key(key, ids.key, out)?;
        let at = out.start(ids.value);
        long(1, &mut out.buf);
        self.write_image(&Image::Key(key), &mut out.buf)?;
        long(0, &mut out.buf); // after: null
        self.write_tail("d", e, now_ms, &mut out.buf);
        out.buf.push(0); // unavailable: empty
        out.spans.push((k.clone(), Some(at..out.buf.len())));
        out.spans.push((k, None));
        Ok(())
    }

    /// The key record of a row's key columns.
    fn write_key_of(&self, row: &Row, id: u32, out: &mut Frames) -> Result<Range<usize>, String> {
        let at = out.start(id);
        for &pos in &self.key {
            let (name, t) = &self.columns[pos];
            match row.cells.get(pos) {
                Some(Cell::Present(Some(text))) => t.write(text, &mut out.buf)?,
                Some(Cell::Present(None)) => return Err(format!("key column {name} is NULL")),
                Some(Cell::Absent) | None => {
                    return Err("a row arrived without its key columns".into())
                }
            }
        }
        Ok(at..out.buf.len())
    }

    fn write_key(&self, key: &Key, id: u32, out: &mut Frames) -> Result<Range<usize>, String> {
        let at = out.start(id);
        for k in self.key_texts(key) {
            let (_, t, text) = k?;
            t.write(text, &mut out.buf)?;
        }
        Ok(at..out.buf.len())
    }

    /// The `Value` record: every column as a union of null and its type.
    fn write_image(&self, image: &Image<'_>, out: &mut Vec<u8>) -> Result<(), String> {
        for (i, (_, t)) in self.columns.iter().enumerate() {
            let text = match image {
                Image::Row(row) => match row.cells.get(i) {
                    Some(Cell::Present(Some(text))) => Some(text.as_str()),
                    _ => None,
                },
                Image::Key(key) => self
                    .key
                    .iter()
                    .position(|&p| p == i)
                    .and_then(|k| key.0.get(k))
                    .and_then(|v| v.as_deref()),
            };
            match text {
                Some(text) => {
                    long(1, out);
                    t.write(text, out)?;
                }
                None => long(0, out),
            }
        }
        Ok(())
    }

    /// `source`, `op` and `ts_ms`.
    fn write_tail(&self, op: &str, e: &ChangeEvent, now_ms: i64, out: &mut Vec<u8>) {
        bytes(env!("CARGO_PKG_VERSION").as_bytes(), out);
        bytes(CONNECTOR.as_bytes(), out);
        bytes(self.name.as_bytes(), out);
        long(e.commit_ts_us / 1000, out);
        bytes(self.db.as_bytes(), out);
        bytes(self.table.schema.as_bytes(), out);
        bytes(self.table.name.as_bytes(), out);
        match e.xid {
            0 => long(0, out), // txId: null
            xid => {
                long(1, out);
                long(xid as i64, out);
            }
        }
        long(1, out);
        long(e.commit_lsn.0 as i64, out);
        bytes(op.as_bytes(), out);
        long(1, out);
        long(now_ms, out);
    }
}
