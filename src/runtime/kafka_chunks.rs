//! Reading the kafka transport's backfill chunks and repair ranges: the
//! source rows of one key range in one snapshot, checked against the
//! transactions already streamed, followed by the high watermark (see
//! [`crate::transport::kafka::snapshot`] for why that is correct). The
//! producer ([`super::kafka_produce`]) then merges each chunk with the stream.

use crate::error::{Error, Result};
use crate::model::{Cell, Key, Row};
use crate::sink::postgres::sql;
use crate::source::postgres::visibility::{RecentXids, Snapshot};
use crate::spec::{quote_ident, Pipeline, TableName};
use crate::state::{self, RangeRecord};
use crate::transform::Mapping;
use crate::transport::kafka::snapshot::Chunk;
use tokio_postgres::Client;

/// Chunks read and waiting for their watermarks at most: each costs a trip
/// through the replication stream, so several overlap.
pub const MAX_OPEN: usize = 4;

/// An open chunk, and the repair request it serves (if any).
pub struct Open {
    pub chunk: Chunk,
    pub repair: Option<i64>,
}

fn text_row(r: &tokio_postgres::Row) -> Row {
    Row {
        cells: (0..r.len())
            .map(|i| Cell::Present(r.get::<_, Option<String>>(i)))
            .collect(),
    }
}

fn text_key(r: &tokio_postgres::Row) -> Key {
    Key((0..r.len())
        .map(|i| r.get::<_, Option<String>>(i))
        .collect())
}

fn refs(ps: &[Option<String>]) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    ps.iter().map(|p| p as _).collect()
}

/// The orphan-key query of a repair chunk, made from the rows it read.
type OrphanQuery<'a> = &'a dyn Fn(&[tokio_postgres::Row]) -> (String, Vec<Option<String>>);

/// Reads rows (and, for repairs, orphan keys) in one snapshot, checks it
/// against recently processed transactions, and writes the high watermark.
/// `None` when the snapshot raced a transaction (read again later).
async fn read_in_snapshot(
    p: &Pipeline,
    client: &Client,
    rows: (&str, &[Option<String>]),
    orphans: Option<OrphanQuery<'_>>,
    recent: &RecentXids,
    id: &str,
) -> Result<Option<(Vec<tokio_postgres::Row>, Vec<Key>)>> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(Error::db("begin chunk read"))?;
    let read = async {
        let snap: String = client
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await
            .map_err(Error::db("read snapshot"))?
            .get(0);
        let rows = client
            .query(rows.0, &refs(rows.1))
            .await
            .map_err(Error::db("read chunk"))?;
        let orphans = match orphans {
            Some(query) => {
                let (sql, params) = query(&rows);
                client
                    .query(&sql, &refs(&params))
                    .await
                    .map_err(Error::db("read orphan keys"))?
                    .iter()
                    .map(text_key)
                    .collect()
            }
            None => Vec::new(),
        };
        Ok::<_, Error>((snap, rows, orphans))
    }
    .await;
    client
        .batch_execute("COMMIT")
        .await
        .map_err(Error::db("end chunk read"))?;
    let (snap, rows, orphans) = read?;
    let snapshot = Snapshot::parse(&snap)
        .ok_or_else(|| Error::State(format!("cannot parse snapshot {snap}")))?;
    if recent.raced(&snapshot) {
        tracing::debug!(pipeline = %p.name, "a chunk's snapshot missed a transaction already streamed; reading again");
        return Ok(None);
    }
    client
        .execute(
            "SELECT pg_logical_emit_message(true, $1, $2)",
            &[&super::apply_loop::watermark_prefix(&p.name), &id],
        )
        .await
        .map_err(Error::db("write watermark"))?;
    Ok(Some((rows, orphans)))
}

/// The next backfill chunk after `cursor`.
pub async fn read_chunk(
    p: &Pipeline,
    client: &Client,
    (m, added): (&Mapping, &[String]),
    (cursor, hi): (&Option<Key>, &Option<Key>),
    recent: &RecentXids,
    seq: u64,
) -> Result<Option<Open>> {
    let n = p.backfill.chunk_rows.max(1) as usize;
    let sql = sql::source_rows(
        m,
        added,
        &p.source_table,
        cursor.is_some(),
        hi.is_some(),
        true,
    );
    let mut params = Key::range_params(cursor.as_ref(), hi.as_ref());
    params.push(Some(n.to_string()));
    let id = format!("chunk:{}:{seq}", std::process::id());
    let Some((rows, _)) = read_in_snapshot(p, client, (&sql, &params), None, recent, &id).await?
    else {
        return Ok(None);
    };
    let rows: Vec<Row> = rows.iter().map(text_row).collect();
    let done = rows.len() < n;
    let next = rows
        .last()
        .and_then(|r| r.key(&m.source_key))
        .or_else(|| cursor.clone());
    Ok(Some(Open {
        chunk: Chunk::new(id, rows, &m.source_key, next, done),
        repair: None,
    }))
}

/// The next chunk of the oldest queued repair range (from `verify
/// --repair`, or the whole table after a broker lost records): up to a
/// backfill chunk of source rows after `lo`, and the target rows the source
/// lacks up to the last of them (or to `hi` when the range ends here). The
/// chunk's cursor, recorded once it is acknowledged, is the range's next
/// `lo`. `resume`: the range whose previous chunk is still open, and the
/// cursor after it.
pub async fn next_repair(
    p: &Pipeline,
    control: &Client,
    client: &Client,
    (m, added): (&Mapping, &[String]),
    recent: &RecentXids,
    seq: u64,
    resume: Option<&(i64, Key)>,
) -> Result<Option<Open>> {
    let Some(r) = control
        .query_opt(
            "SELECT id, lo, hi FROM rowshift.repairs WHERE pipeline = $1 AND done_at IS NULL \
             AND ($2::int8 IS NULL OR id = $2) ORDER BY id LIMIT 1",
            &[&p.name, &resume.map(|r| r.0)],
        )
        .await
        .map_err(Error::db("read repair requests"))?
    else {
        return Ok(None);
    };
    let id: i64 = r.get(0);
    let lo: Option<Key> = match resume {
        Some((_, cursor)) => Some(cursor.clone()),
        None => r.get::<_, Option<Vec<Option<String>>>>(1).map(Key),
    };
    let hi: Option<Key> = r.get::<_, Option<Vec<Option<String>>>>(2).map(Key);
    let source = &p.source_table;
    let n = p.backfill.chunk_rows.max(1) as usize;
    let rows_sql = sql::source_rows(m, added, source, lo.is_some(), hi.is_some(), true);
    let mut params = Key::range_params(lo.as_ref(), hi.as_ref());
    params.push(Some(n.to_string()));
    let upper = |rows: &[tokio_postgres::Row]| -> Option<Key> {
        match rows.last() {
            Some(last) if rows.len() >= n => Some(Key(m
                .source_key
                .iter()
                .map(|&i| last.get::<_, Option<String>>(i))
                .collect())),
            _ => hi.clone(),
        }
    };
    let orphans = |rows: &[tokio_postgres::Row]| {
        let upper = upper(rows);
        let sql = sql::orphan_keys(m, source, &p.target_table, lo.is_some(), upper.is_some());
        (sql, Key::range_params(lo.as_ref(), upper.as_ref()))
    };
    let wm = format!("repair:{}:{seq}", std::process::id());
    let Some((rows, orphans)) =
        read_in_snapshot(p, client, (&rows_sql, &params), Some(&orphans), recent, &wm).await?
    else {
        return Ok(None);
    };
    let done = rows.len() < n;
    let cursor = if done { None } else { upper(&rows) };
    let rows: Vec<Row> = rows.iter().map(text_row).collect();
    Ok(Some(Open {
        chunk: Chunk::new(wm, rows, &m.source_key, cursor, done).with_deletes(orphans),
        repair: Some(id),
    }))
}

/// The source's highest key (`None`: the table is empty).
async fn highest_key(client: &Client, m: &Mapping, source: &TableName) -> Result<Option<Key>> {
    let cols: Vec<String> = m
        .source_key
        .iter()
        .map(|&i| format!("src.{}", quote_ident(&m.source_columns[i].name)))
        .collect();
    let text: Vec<String> = cols.iter().map(|c| format!("{c}::text")).collect();
    let desc: Vec<String> = cols.iter().map(|c| format!("{c} DESC")).collect();
    let row = client
        .query_opt(
            &format!(
                "SELECT {} FROM ONLY {} AS src ORDER BY {} LIMIT 1",
                text.join(", "),
                source.quoted(),
                desc.join(", ")
            ),
            &[],
        )
        .await
        .map_err(Error::db("read the highest key"))?;
    Ok(row.as_ref().map(text_key))
}

/// Plans the backfill: one range, from the lowest key to today's highest.
/// Rows inserted after this point arrive through the stream, so the
/// backfill does not chase inserts.
pub async fn plan_range(client: &mut Client, p: &Pipeline, m: &Mapping) -> Result<()> {
    let hi = highest_key(client, m, &p.source_table).await?;
    let whole = RangeRecord {
        range_no: 0,
        lo: None,
        done: hi.is_none(),
        hi,
        cursor: None,
        rows_copied: 0,
        chunks_done: 0,
    };
    state::save_ranges(client, &p.name, &[whole]).await
}
