//! The PostgreSQL sink: applies folded batches as a few multi-row statements
//! in one transaction, with `session_replication_role = replica` so target
//! triggers and foreign keys do not fire for replayed rows.
//!
//! Planner settings differ by [`Role`]. Stream statements all reach rows
//! by primary key, so their sessions allow only index nested loops
//! (sequential scans, hash and merge joins off) and plan once (generic
//! plans): a batch of 5 rows costs no planning, and a batch of 10,000 can
//! never be planned as a hash join over the whole target, whatever the
//! statistics say while the target is still empty. Chunk copies are planned
//! at every execution (`plan_cache_mode = force_custom_plan`), against the
//! target's current size; `random_page_cost = 1.1` prices index probes as
//! the cached lookups they are (with the default of 4, the already-there
//! probe of a large chunk is planned as a scan of the whole target).
//! `work_mem = 64MB` keeps a full batch, materialised once for the update and
//! the insert, in memory.

pub mod parallel;
mod split;
pub mod sql;
pub mod tentative;
pub mod typed;
mod write;

use super::fold::{fold, Segment};
use crate::error::{Error, Result};
use crate::model::{ChangeEvent, Checkpoint, Key, Row};
use crate::source::postgres::visibility::{Commits, SNAPSHOT_SQL};
use crate::spec::{Pipeline, TableName};
use crate::transform::Mapping;
use std::collections::HashMap;
use std::sync::Arc;
use tokio_postgres::{Client, Statement};
use typed::Bind;
use write::{column_arrays, run_checkpoint, sql_params, write_segments, SegmentStatements, Target};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Kind {
    /// How each source column's array is bound (see [`typed`]).
    UpdateRows(Vec<Bind>),
    InsertMissing(Vec<Bind>),
    /// The key columns' binds.
    Delete(Vec<Bind>),
    Refetch,
    Partial(Vec<usize>),
    /// Bounds present, and whether the "already in the target" probe runs.
    CopyRange(bool, bool, bool),
    NextBound(bool, bool),
    RepairUpsert(bool, bool),
    RepairDelete(bool, bool),
    /// A caller's checkpoint SQL (prepared once per distinct text).
    Checkpoint(String),
    /// The source's current snapshot (see [`Commits::wait_visible`]).
    Snapshot,
}

/// Counters of one apply.
#[derive(Debug, Default, Clone, Copy)]
pub struct Applied {
    pub upserts: u64,
    pub deletes: u64,
    pub partials: u64,
    pub refetches: u64,
}

impl std::ops::AddAssign for Applied {
    fn add_assign(&mut self, a: Applied) {
        self.upserts += a.upserts;
        self.deletes += a.deletes;
        self.partials += a.partials;
        self.refetches += a.refetches;
    }
}

pub struct PgSink {
    client: Client,
    mapping: Arc<Mapping>,
    source: TableName,
    target: TableName,
    statements: HashMap<Kind, Statement>,
    /// How each source column's values are bound when they all read.
    binds: Vec<Bind>,
    /// A transaction kept open across writes is in progress
    /// ([`PgSink::write_open`]).
    open: bool,
    /// The transactions received so far, when this sink reads the source
    /// (copies, refetches): such a read waits until they are all visible.
    commits: Option<Commits>,
}

/// What a sink session is used for; each gets the planner settings that fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Applies stream batches: every statement reaches rows by key.
    Stream,
    /// Copies backfill chunks (also used to plan key ranges).
    Copy,
}

impl Role {
    fn session_sql(self) -> &'static str {
        match self {
            Role::Stream => {
                "SET session_replication_role = replica; SET synchronous_commit = on; SET work_mem = '64MB'; \
                 SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off; \
                 SET enable_hashjoin = off; SET enable_mergejoin = off"
            }
            Role::Copy => {
                "SET session_replication_role = replica; SET synchronous_commit = on; SET work_mem = '64MB'; \
                 SET plan_cache_mode = force_custom_plan; SET random_page_cost = 1.1"
            }
        }
    }
}

impl PgSink {
    pub async fn connect(
        dsn: &str,
        mapping: Arc<Mapping>,
        source: TableName,
        target: TableName,
        role: Role,
    ) -> Result<PgSink> {
        let purpose = match role {
            Role::Stream => "sink",
            Role::Copy => "copy",
        };
        let client = crate::source::postgres::connect(dsn, purpose).await?;
        client
            .batch_execute(role.session_sql())
            .await
            .map_err(Error::db("prepare sink session"))?;
        Ok(PgSink {
            client,
            binds: typed::binds(&mapping),
            mapping,
            source,
            target,
            statements: HashMap::new(),
            open: false,
            commits: None,
        })
    }

    /// [`PgSink::connect`] between the pipeline's own source and target
    /// tables (the forward direction).
    pub async fn for_pipeline(
        dsn: &str,
        p: &Pipeline,
        mapping: Arc<Mapping>,
        role: Role,
    ) -> Result<PgSink> {
        Self::connect(
            dsn,
            mapping,
            p.source_table.clone(),
            p.target_table.clone(),
            role,
        )
        .await
    }

    /// From now on, every read of the source first waits until the
    /// transactions `commits` holds are visible to it (see
    /// [`crate::source::postgres::visibility`]).
    pub fn watch_commits(&mut self, commits: Commits) {
        self.commits = Some(commits);
    }

    /// Notes the transactions of `events`, received to be applied, when this
    /// sink watches commits (a sink that is their only reader).
    pub fn received(&self, events: &[ChangeEvent]) {
        if let Some(c) = &self.commits {
            c.push_events(events);
        }
    }

    /// Waits until the transactions received so far are visible to this
    /// session's next statement, if this sink watches them.
    async fn wait_visible(&mut self) -> Result<()> {
        let Some(commits) = self.commits.clone() else {
            return Ok(());
        };
        let stmt = self.statement(Kind::Snapshot).await?;
        commits.wait_visible(&self.client, &stmt).await?;
        Ok(())
    }

    async fn statement(&mut self, kind: Kind) -> Result<Statement> {
        if let Some(s) = self.statements.get(&kind) {
            return Ok(s.clone());
        }
        let m = &self.mapping;
        let text = match &kind {
            // Only asked for when the target has non-key columns.
            Kind::UpdateRows(b) => sql::update_rows(m, &self.target, b).unwrap_or_default(),
            Kind::InsertMissing(b) => sql::insert_missing(m, &self.target, b),
            Kind::Delete(b) => sql::delete(m, &self.target, b),
            Kind::Refetch => sql::refetch(m, &self.source, &self.target),
            Kind::Partial(carried) => {
                let (update, _) = m.partial_plan(carried);
                sql::partial_update(m, &self.target, carried, &update)
            }
            Kind::CopyRange(lo, hi, probe) => {
                sql::copy_range(m, &self.source, &self.target, *lo, *hi, *probe)
            }
            Kind::NextBound(lo, hi) => sql::next_bound(m, &self.source, *lo, *hi),
            Kind::RepairUpsert(lo, hi) => {
                sql::repair_upsert(m, &self.source, &self.target, *lo, *hi)
            }
            Kind::RepairDelete(lo, hi) => {
                sql::repair_delete(m, &self.source, &self.target, *lo, *hi)
            }
            Kind::Checkpoint(text) => text.clone(),
            Kind::Snapshot => SNAPSHOT_SQL.to_string(),
        };
        let stmt = self
            .client
            .prepare(&text)
            .await
            .map_err(Error::db(format!("prepare {kind:?}")))?;
        self.statements.insert(kind, stmt.clone());
        Ok(stmt)
    }

    /// The prepared form of a checkpoint (`None` when there is none).
    async fn checkpoint_statement(&mut self, checkpoint: &Checkpoint) -> Result<Option<Statement>> {
        if checkpoint.sql.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            self.statement(Kind::Checkpoint(checkpoint.sql.clone()))
                .await?,
        ))
    }

    /// Applies one batch and runs `checkpoint` (SQL) in the same transaction.
    /// The events are consumed (their rows move into the statements' input).
    pub async fn apply(
        &mut self,
        events: Vec<ChangeEvent>,
        checkpoint: &Checkpoint,
    ) -> Result<Applied> {
        let segments = fold(events, &self.mapping.source_key)
            .map_err(|e| Error::Replication(e.to_string()))?;
        self.apply_segments(&segments, checkpoint).await
    }

    /// Applies a batch in one transaction that *starts* with `claim` (the
    /// kafka appliers' per-partition positions: a competing applier waits on
    /// them before it writes any row, see `state::kafka::claim`).
    pub async fn apply_claimed(
        &mut self,
        events: Vec<ChangeEvent>,
        claim: &Checkpoint,
    ) -> Result<Applied> {
        let segments = fold(events, &self.mapping.source_key)
            .map_err(|e| Error::Replication(e.to_string()))?;
        self.write(&segments, Some(claim), &Checkpoint::default())
            .await
    }

    /// Applies folded segments, in order, in one transaction that ends with
    /// `checkpoint`.
    pub async fn apply_segments(
        &mut self,
        segments: &[Segment],
        checkpoint: &Checkpoint,
    ) -> Result<Applied> {
        self.write(segments, None, checkpoint).await
    }

    async fn write(
        &mut self,
        segments: &[Segment],
        claim: Option<&Checkpoint>,
        checkpoint: &Checkpoint,
    ) -> Result<Applied> {
        let statements = self.statements_for_all(segments).await?;
        let ckpt = self.checkpoint_statement(checkpoint).await?;
        let claim_stmt = match claim {
            Some(c) => self.checkpoint_statement(c).await?,
            None => None,
        };
        let tx = self
            .client
            .transaction()
            .await
            .map_err(Error::db("begin apply"))?;
        if let Some(c) = claim {
            run_checkpoint(&tx, claim_stmt.as_ref(), c, None).await?;
        }
        let on = Target {
            mapping: &self.mapping,
            source: &self.source,
            target: &self.target,
            refetch: Some(&mut self.statements),
            commits: self.commits.as_ref(),
        };
        let applied = write_segments(&tx, on, segments, &statements).await?;
        run_checkpoint(&tx, ckpt.as_ref(), checkpoint, None).await?;
        tx.commit().await.map_err(Error::db("commit apply"))?;
        Ok(applied)
    }

    /// Runs a checkpoint in a transaction of its own.
    pub async fn checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<()> {
        let ckpt = self.checkpoint_statement(checkpoint).await?;
        let tx = self
            .client
            .transaction()
            .await
            .map_err(Error::db("begin checkpoint"))?;
        run_checkpoint(&tx, ckpt.as_ref(), checkpoint, None).await?;
        tx.commit().await.map_err(Error::db("commit checkpoint"))
    }

    /// [`Self::statements_for`] each segment, in order.
    async fn statements_for_all<'a>(
        &mut self,
        segments: &'a [Segment],
    ) -> Result<Vec<SegmentStatements<'a>>> {
        let mut statements = Vec::with_capacity(segments.len());
        for seg in segments {
            statements.push(self.statements_for(seg).await?);
        }
        Ok(statements)
    }

    async fn statements_for<'a>(&mut self, seg: &'a Segment) -> Result<SegmentStatements<'a>> {
        let mut partials = Vec::new();
        for (carried, rows) in seg.partial_groups() {
            let (_, refetch_all) = self.mapping.partial_plan(&carried);
            let stmt = self.statement(Kind::Partial(carried.clone())).await?;
            partials.push((carried, rows, stmt, refetch_all));
        }
        // Each column's array in binary when all its values read; the
        // statements are the variant that binds them so.
        let upserts: Vec<&'a Row> = seg.upserts().collect();
        let upsert_params = if upserts.is_empty() {
            Vec::new()
        } else {
            let all: Vec<usize> = (0..self.mapping.source_columns.len()).collect();
            typed::columns(column_arrays(&upserts, &all), &self.binds)
        };
        let row_binds = typed::used_binds(&upsert_params, &self.binds);
        let deletes: Vec<&'a Key> = seg.deletes().collect();
        let key_binds: Vec<Bind> = self
            .mapping
            .source_key
            .iter()
            .map(|&p| self.binds[p])
            .collect();
        let delete_params = if deletes.is_empty() {
            Vec::new()
        } else {
            let values = (0..key_binds.len())
                .map(|i| deletes.iter().map(|k| k.0[i].as_deref()).collect())
                .collect();
            typed::columns(values, &key_binds)
        };
        let delete_binds = typed::used_binds(&delete_params, &key_binds);
        let update = if sql::non_key_columns(&self.mapping).is_empty() {
            None
        } else {
            Some(self.statement(Kind::UpdateRows(row_binds.clone())).await?)
        };
        Ok(SegmentStatements {
            update,
            insert: self.statement(Kind::InsertMissing(row_binds)).await?,
            delete: self.statement(Kind::Delete(delete_binds)).await?,
            partials,
            upserts: upserts.len(),
            upsert_params,
            deletes: deletes.len(),
            delete_params,
        })
    }

    /// The upper bound of the chunk of `rows` keys after `lo`, not past `hi`
    /// (`None`: fewer than `rows` keys remain in the range).
    pub async fn next_bound(
        &mut self,
        lo: Option<&Key>,
        hi: Option<&Key>,
        rows: i64,
    ) -> Result<Option<Key>> {
        let stmt = self
            .statement(Kind::NextBound(lo.is_some(), hi.is_some()))
            .await?;
        let mut params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = Vec::new();
        for k in [lo, hi].into_iter().flatten() {
            for v in &k.0 {
                params.push(Box::new(v.clone()));
            }
        }
        params.push(Box::new(rows - 1));
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p.as_ref() as _).collect();
        let row = self
            .client
            .query_opt(&stmt, &refs)
            .await
            .map_err(Error::db("find chunk bound"))?;
        Ok(row.map(|r| {
            Key((0..self.mapping.source_key.len())
                .map(|i| r.get::<_, Option<String>>(i))
                .collect())
        }))
    }

    /// Copies the source rows with `lo < key <= hi` into the target and runs
    /// `checkpoint` in the same transaction. Returns the rows written.
    /// The number of rows copied is bound as the checkpoint's last parameter.
    /// Without `probe` the copy assumes the target holds no key of the range
    /// (indexes deferred: nothing but disjoint chunks writes it).
    pub async fn copy_range(
        &mut self,
        lo: Option<&Key>,
        hi: Option<&Key>,
        checkpoint: &Checkpoint,
        probe: bool,
    ) -> Result<u64> {
        let stmt = self
            .statement(Kind::CopyRange(lo.is_some(), hi.is_some(), probe))
            .await?;
        let params = Key::range_params(lo, hi);
        let ckpt = self.checkpoint_statement(checkpoint).await?;
        let refs = sql_params(&params);
        // The copy must see every change already applied (see `backfill`).
        self.wait_visible().await?;
        let tx = self
            .client
            .transaction()
            .await
            .map_err(Error::db("begin chunk"))?;
        let n = tx
            .execute(&stmt, &refs)
            .await
            .map_err(Error::db("copy chunk"))?;
        run_checkpoint(&tx, ckpt.as_ref(), checkpoint, Some(n)).await?;
        tx.commit().await.map_err(Error::db("commit chunk"))?;
        Ok(n)
    }
}

impl PgSink {
    /// Re-copies the key range `lo < key <= hi` from the source (a
    /// verification repair): deletes target rows the source lacks and
    /// upserts every source row, then runs `checkpoint`, in one transaction.
    /// Safe for the same reason a chunk copy is (see [`crate::backfill`]): it
    /// runs in the apply loop between batches. Returns (deleted, written).
    pub async fn repair_range(
        &mut self,
        lo: Option<&Key>,
        hi: Option<&Key>,
        checkpoint: &Checkpoint,
    ) -> Result<(u64, u64)> {
        let bounds = (lo.is_some(), hi.is_some());
        let delete = self
            .statement(Kind::RepairDelete(bounds.0, bounds.1))
            .await?;
        let upsert = self
            .statement(Kind::RepairUpsert(bounds.0, bounds.1))
            .await?;
        let ckpt = self.checkpoint_statement(checkpoint).await?;
        let params = Key::range_params(lo, hi);
        let refs = sql_params(&params);
        self.wait_visible().await?;
        let tx = self
            .client
            .transaction()
            .await
            .map_err(Error::db("begin repair"))?;
        let deleted = tx
            .execute(&delete, &refs)
            .await
            .map_err(Error::db("repair: delete extra rows"))?;
        let written = tx
            .execute(&upsert, &refs)
            .await
            .map_err(Error::db("repair: re-copy rows"))?;
        run_checkpoint(&tx, ckpt.as_ref(), checkpoint, None).await?;
        tx.commit().await.map_err(Error::db("commit repair"))?;
        Ok((deleted, written))
    }
}
