//! The write path shared by the sink's transactions: a transaction's
//! folded segments turned into the statements prepared for them, executed
//! in order (deletes, whole rows, partial rows, rows read back from the
//! source), and the checkpoint written in the same transaction.

use super::sql;
use super::typed::Param;
use super::{Applied, Kind};
use crate::error::{Error, Result};
use crate::model::{Cell, Checkpoint, Key, Row};
use crate::sink::fold::Segment;
use crate::source::postgres::visibility::{Commits, SNAPSHOT_SQL};
use crate::spec::TableName;
use crate::transform::Mapping;
use std::collections::{HashMap, HashSet};
use tokio_postgres::{GenericClient, Statement};

/// Where segments are written, and whether rows may be read back from the
/// source (`refetch`: the cache the refetch statement is prepared into;
/// `commits`: the transactions a read back must see, when watched).
pub(super) struct Target<'s> {
    pub(super) mapping: &'s Mapping,
    pub(super) source: &'s TableName,
    pub(super) target: &'s TableName,
    pub(super) refetch: Option<&'s mut HashMap<Kind, Statement>>,
    pub(super) commits: Option<&'s Commits>,
}

/// Writes folded segments, in order, on `client` (a transaction).
pub(super) async fn write_segments<C: GenericClient + Sync>(
    client: &C,
    mut on: Target<'_>,
    segments: &[Segment],
    statements: &[SegmentStatements<'_>],
) -> Result<Applied> {
    let target = on.target.quoted();
    let mapping = on.mapping;
    let mut applied = Applied::default();
    for (seg, stmts) in segments.iter().zip(statements) {
        if seg.truncate_first {
            client
                .batch_execute(&format!("TRUNCATE {target}"))
                .await
                .map_err(Error::db("apply truncate"))?;
        }
        if stmts.deletes > 0 {
            applied.deletes +=
                exec_arrays(client, &stmts.delete, &stmts.delete_params, "apply deletes").await?;
        }
        if stmts.upserts > 0 {
            write_rows(client, stmts, stmts.upserts as u64, seg.mostly_inserts).await?;
            applied.upserts += stmts.upserts as u64;
        }
        let mut to_refetch: Vec<Key> = seg.refetches().cloned().collect();
        for (carried, rows, stmt, refetch_all) in &stmts.partials {
            if *refetch_all {
                to_refetch.extend(rows.iter().filter_map(|r| r.key(&mapping.source_key)));
                continue;
            }
            let params = column_arrays(rows, carried);
            let refs = sql_params(&params);
            let found = client
                .query(stmt, &refs)
                .await
                .map_err(Error::db("apply partial updates"))?;
            let found: HashSet<Key> = found
                .iter()
                .map(|r| {
                    Key((0..mapping.source_key.len())
                        .map(|i| r.get::<_, Option<String>>(i))
                        .collect())
                })
                .collect();
            applied.partials += found.len() as u64;
            to_refetch.extend(
                rows.iter()
                    .filter_map(|r| r.key(&mapping.source_key))
                    .filter(|k| !found.contains(k)),
            );
        }
        if !to_refetch.is_empty() {
            // Prepared on first use only: it reads the source table.
            let Some(prepared) = on.refetch.as_deref_mut() else {
                return Err(Error::State(
                    "a row must be read back from the source, which does not show a transaction in progress"
                        .into(),
                ));
            };
            let refetch = prepare(client, prepared, Kind::Refetch, || {
                sql::refetch(mapping, on.source, on.target)
            })
            .await?;
            // The row read back must include the change that asked for it,
            // whose commit may not be visible yet (see `visibility`).
            if let Some(commits) = on.commits {
                let snapshot =
                    prepare(client, prepared, Kind::Snapshot, || SNAPSHOT_SQL.into()).await?;
                commits.wait_visible(client, &snapshot).await?;
            }
            let keys: Vec<&Key> = to_refetch.iter().collect();
            applied.refetches +=
                exec_keys(client, &refetch, &keys, mapping.source_key.len()).await?;
        }
    }
    Ok(applied)
}

/// The statement `kind` from `cache`, prepared (text from `sql`) on first use.
async fn prepare<C: GenericClient + Sync>(
    client: &C,
    cache: &mut HashMap<Kind, Statement>,
    kind: Kind,
    sql: impl FnOnce() -> String,
) -> Result<Statement> {
    if let Some(s) = cache.get(&kind) {
        return Ok(s.clone());
    }
    let s = client
        .prepare(&sql())
        .await
        .map_err(Error::db(format!("prepare {kind:?}")))?;
    cache.insert(kind, s.clone());
    Ok(s)
}

pub(super) struct SegmentStatements<'a> {
    /// `None` when the target has only key columns.
    pub(super) update: Option<Statement>,
    pub(super) insert: Statement,
    pub(super) delete: Statement,
    pub(super) partials: Vec<(Vec<usize>, Vec<&'a Row>, Statement, bool)>,
    /// Whole rows, and their columns' arrays (`update` and `insert` bind them).
    pub(super) upserts: usize,
    pub(super) upsert_params: Vec<Param<'a>>,
    /// Deleted keys, and their columns' arrays.
    pub(super) deletes: usize,
    pub(super) delete_params: Vec<Param<'a>>,
}

pub(super) async fn run_checkpoint<C: GenericClient + Sync>(
    tx: &C,
    prepared: Option<&Statement>,
    checkpoint: &Checkpoint,
    count: Option<u64>,
) -> Result<()> {
    let Some(stmt) = prepared else { return Ok(()) };
    let mut params = checkpoint.params.clone();
    if let Some(n) = count {
        params.push(Some(n.to_string()));
    }
    let refs = sql_params(&params);
    let changed = tx
        .execute(stmt, &refs)
        .await
        .map_err(Error::db("write checkpoint"))?;
    if checkpoint.fenced && changed != 1 {
        // Returning drops the transaction, which rolls back this write.
        return Err(Error::fenced());
    }
    Ok(())
}

/// Writes whole rows (keys unique) so that every key holds its row, whatever
/// the target had: first the statement the segment most likely needs, then
/// the other only if the first's row count shows rows left over. An update
/// that reached every key, or an insert that added every key, is complete;
/// otherwise the insert adds the keys the update missed, or the update
/// rewrites every key (rows just inserted get the same values again).
pub(super) async fn write_rows<C: GenericClient + Sync>(
    tx: &C,
    stmts: &SegmentStatements<'_>,
    rows: u64,
    mostly_inserts: bool,
) -> Result<()> {
    let params = &stmts.upsert_params;
    let Some(update) = &stmts.update else {
        exec_arrays(tx, &stmts.insert, params, "apply inserts").await?;
        return Ok(());
    };
    if mostly_inserts {
        if exec_arrays(tx, &stmts.insert, params, "apply inserts").await? < rows {
            exec_arrays(tx, update, params, "apply updates").await?;
        }
    } else if exec_arrays(tx, update, params, "apply updates").await? < rows {
        exec_arrays(tx, &stmts.insert, params, "apply inserts").await?;
    }
    Ok(())
}

/// Statement parameters as tokio-postgres takes them.
pub(super) fn sql_params<T: tokio_postgres::types::ToSql + Sync>(
    params: &[T],
) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    params.iter().map(|p| p as _).collect()
}

/// One `text[]` per column position, one element per row.
pub(super) fn column_arrays<'a>(
    rows: &[&'a Row],
    positions: &[usize],
) -> Vec<Vec<Option<&'a str>>> {
    positions
        .iter()
        .map(|&p| {
            rows.iter()
                .map(|r| match r.cells.get(p) {
                    Some(Cell::Present(v)) => v.as_deref(),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

pub(super) async fn exec_arrays<C: GenericClient + Sync, P: tokio_postgres::types::ToSql + Sync>(
    tx: &C,
    stmt: &Statement,
    params: &[P],
    what: &'static str,
) -> Result<u64> {
    let refs = sql_params(params);
    tx.execute(stmt, &refs).await.map_err(Error::db(what))
}

pub(super) async fn exec_keys<C: GenericClient + Sync>(
    tx: &C,
    stmt: &Statement,
    keys: &[&Key],
    width: usize,
) -> Result<u64> {
    let params: Vec<Vec<Option<&str>>> = (0..width)
        .map(|i| keys.iter().map(|k| k.0[i].as_deref()).collect())
        .collect();
    exec_arrays(tx, stmt, &params, "apply by key").await
}
