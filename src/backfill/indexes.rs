//! The target's indexes, built after the copy instead of row by row during
//! it (`backfill.defer_indexes`, on by default for the `direct` transport).
//!
//! In the transaction that creates the target, rowshift records every index
//! of the new table (the primary key and other index-backed constraints as
//! `ALTER TABLE ... ADD CONSTRAINT`, plain indexes as `CREATE INDEX`) in
//! `rowshift.deferred_indexes` and drops it. The chunks then write heap rows
//! only, and each index is built once, by sorting, when the copy ends: one
//! WAL record per row instead of two (which the walsender must also decode,
//! see README.md, "rowshift's own writes"), and an index as compact as a
//! single writer's instead of the half-full pages two concurrent writers
//! leave. pg_repack and pg_squeeze build their indexes after the copy for
//! the same reasons.
//!
//! # Why the result is the same
//!
//! Without indexes nothing but the chunks may write the target: a change
//! applied by key would have to scan the table. So while indexes are
//! deferred the apply loop *holds* change batches instead of applying them
//! (in order, unacknowledged, so the slot keeps them across a crash), and
//! builds the indexes when the copy ends, or earlier when the held changes
//! reach `backfill.hold_changes`. Then it applies the held batches in order
//! and goes on as usual. The backfill's argument (see [`crate::backfill`])
//! holds with the sink's position P at the stream's start for every chunk
//! copied meanwhile: each such chunk holds its rows at its snapshot R, every
//! change after R is applied after it, and changes before R replay over the
//! R-state harmlessly. Chunks without indexes skip the "already in the
//! target" probe: their key ranges are disjoint and each commits with its
//! cursor, so none writes a key twice; the primary key's build checks it.
//!
//! Each build commits with the deletion of its record, so a crash at any
//! moment leaves each index either built and unrecorded or recorded and
//! absent; the next run builds what is left before it applies anything.
//! Deferral is refused (the indexes stay) for a partitioned target, one
//! whose replica identity is an index, and one another table's foreign key
//! references.

use crate::error::{Error, Result};
use crate::spec::{quote_ident, TableName};
use std::time::Instant;
use tokio_postgres::{Client, GenericClient, Transaction};

/// One index (or index-backed constraint) waiting to be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deferred {
    pub seq: i32,
    pub name: String,
    pub create_sql: String,
}

/// What happened to the new target's indexes at expand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expand {
    /// Dropped and recorded, to be built after the copy.
    Deferred(Vec<String>),
    /// Kept, and why.
    Kept(String),
}

/// The index query: every index of the table with its constraint, if one
/// owns it. Primary key first.
const INDEXES: &str = "SELECT ci.relname::text, c.conname::text, \
       CASE WHEN c.oid IS NULL THEN pg_get_indexdef(i.indexrelid) ELSE pg_get_constraintdef(c.oid) END, \
       i.indisprimary, \
       ARRAY(SELECT a.attname::text FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.ord) \
     FROM pg_index i JOIN pg_class ci ON ci.oid = i.indexrelid \
     LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid AND c.contype IN ('p', 'u', 'x') \
     WHERE i.indrelid = $1::text::regclass \
     ORDER BY i.indisprimary DESC, ci.relname";

/// Inside the transaction that creates `target`: records its indexes for
/// `pipeline` and drops them, unless the table cannot do without them.
pub async fn defer(tx: &Transaction<'_>, pipeline: &str, target: &TableName) -> Result<Expand> {
    let table = target.quoted();
    let shape = tx
        .query_one(
            "SELECT c.relkind::text, c.relreplident::text, \
                    EXISTS (SELECT 1 FROM pg_constraint f WHERE f.confrelid = c.oid AND f.contype = 'f') \
             FROM pg_class c WHERE c.oid = $1::text::regclass",
            &[&table],
        )
        .await
        .map_err(Error::db("inspect the new target"))?;
    let (relkind, replident, referenced): (String, String, bool) =
        (shape.get(0), shape.get(1), shape.get(2));
    let refused = if relkind != "r" {
        Some("the target is partitioned")
    } else if replident == "i" {
        Some("the target's replica identity is an index")
    } else if referenced {
        Some("a foreign key references the target")
    } else {
        None
    };
    if let Some(reason) = refused {
        return Ok(Expand::Kept(reason.into()));
    }
    let rows = tx
        .query(INDEXES, &[&table])
        .await
        .map_err(Error::db("read the new target's indexes"))?;
    let mut names = Vec::new();
    for (seq, r) in rows.iter().enumerate() {
        let index: String = r.get(0);
        let constraint: Option<String> = r.get(1);
        let definition: String = r.get(2);
        let primary: bool = r.get(3);
        let columns: Vec<String> = r.get(4);
        let (create, drop, name) = match constraint {
            Some(con) => (
                format!(
                    "ALTER TABLE {table} ADD CONSTRAINT {} {definition}",
                    quote_ident(&con)
                ),
                format!("ALTER TABLE {table} DROP CONSTRAINT {}", quote_ident(&con)),
                con,
            ),
            None => (
                definition,
                format!(
                    "DROP INDEX {}.{}",
                    quote_ident(&target.schema),
                    quote_ident(&index)
                ),
                index,
            ),
        };
        tx.execute(
            "INSERT INTO rowshift.deferred_indexes (pipeline, seq, name, create_sql, primary_key) \
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &pipeline,
                &(seq as i32),
                &name,
                &create,
                &primary.then_some(columns),
            ],
        )
        .await
        .map_err(Error::db("record a deferred index"))?;
        tx.batch_execute(&drop)
            .await
            .map_err(Error::db("drop an index until the copy ends"))?;
        names.push(name);
    }
    Ok(Expand::Deferred(names))
}

/// The indexes of `pipeline` still to be built, in build order.
pub async fn load(client: &Client, pipeline: &str) -> Result<Vec<Deferred>> {
    let rows = client
        .query(
            "SELECT seq, name, create_sql FROM rowshift.deferred_indexes WHERE pipeline = $1 ORDER BY seq",
            &[&pipeline],
        )
        .await
        .map_err(Error::db("read deferred indexes"))?;
    Ok(rows
        .iter()
        .map(|r| Deferred {
            seq: r.get(0),
            name: r.get(1),
            create_sql: r.get(2),
        })
        .collect())
}

/// The primary key columns of a target whose primary key is deferred
/// (`None` when it is not, or before the state schema exists).
pub async fn deferred_primary_key(
    client: &impl GenericClient,
    pipeline: &str,
) -> Result<Option<Vec<String>>> {
    let row = client
        .query_one(
            "SELECT to_regclass('rowshift.deferred_indexes') IS NOT NULL",
            &[],
        )
        .await
        .map_err(Error::db("look for deferred indexes"))?;
    if !row.get::<_, bool>(0) {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT primary_key FROM rowshift.deferred_indexes WHERE pipeline = $1 AND primary_key IS NOT NULL",
            &[&pipeline],
        )
        .await
        .map_err(Error::db("read the deferred primary key"))?;
    Ok(row.map(|r| r.get(0)))
}

/// Builds the deferred indexes in order, each in a transaction with the
/// deletion of its record (fenced by `epoch`). Empties `pending`. `when`
/// goes into the audit log ("after the copy", "while copying").
pub async fn build(
    client: &mut Client,
    pipeline: &str,
    epoch: i64,
    pending: &mut Vec<Deferred>,
    when: &str,
) -> Result<()> {
    let started = Instant::now();
    let count = pending.len();
    for d in std::mem::take(pending) {
        let one = Instant::now();
        let tx = client
            .transaction()
            .await
            .map_err(Error::db("begin index build"))?;
        tx.batch_execute(&d.create_sql)
            .await
            .map_err(|e| build_error(&d.name, e))?;
        let removed = tx
            .execute(
                "DELETE FROM rowshift.deferred_indexes WHERE pipeline = $1 AND seq = $2 \
                 AND (SELECT epoch FROM rowshift.pipelines WHERE name = $1 FOR SHARE) = $3",
                &[&pipeline, &d.seq, &epoch],
            )
            .await
            .map_err(Error::db("record an index built"))?;
        if removed != 1 {
            return Err(Error::fenced());
        }
        tx.commit().await.map_err(Error::db("commit index build"))?;
        tracing::info!(pipeline, index = %d.name, ms = one.elapsed().as_millis() as u64, "index built");
        crate::failpoint::hit("indexes:one-built").await;
    }
    if count > 0 {
        crate::state::audit(
            client,
            pipeline,
            "indexes built",
            &format!("{count} {when}, in {} ms", started.elapsed().as_millis()),
        )
        .await?;
    }
    Ok(())
}

/// An index that cannot be built from the copied rows is the rows' fault
/// (a unique or exclusion constraint they violate): a definite error that
/// names the index but not the values (the server's detail carries them).
fn build_error(name: &str, e: tokio_postgres::Error) -> Error {
    match e.as_db_error() {
        Some(d) if d.code().code().starts_with("23") => Error::State(format!(
            "building {name} on the target after the copy failed: {} ({}); the mapped rows violate it. \
             Fix the mapping or target.ddl, then `rowshift abort` and run again",
            d.message(),
            d.code().code()
        )),
        _ => Error::db(format!("build {name}"))(e),
    }
}
