//! Writes of a source transaction still in progress, into target
//! transactions kept open until the source's transaction ends (see
//! `crate::runtime::early` for when and why).
//!
//! The writes are split by key over connections of their own, like
//! [`super::parallel`]: a key always lands on the same connection, so each
//! connection's transaction sees its keys' earlier writes of the same source
//! transaction. Each write hands its parts back, so that the caller can keep
//! them and apply them the ordinary way if the open transactions have to be
//! given up.
//!
//! A write waits for all its parts before the next batch is handed over.
//! Handing batches to per-connection queues instead (tried in session 11)
//! was not faster: on two cores the walsender needs the CPU the extra
//! overlap takes (docs/benchmarks.md, issue 2).

use super::parallel::on_parts;
use super::split::{split, KeyRanges};
use super::write::{run_checkpoint, write_segments, Target};
use super::{Applied, PgSink, Role};
use crate::error::{Error, Result};
use crate::model::Checkpoint;
use crate::sink::fold::Segment;
use crate::spec::TableName;
use crate::transform::Mapping;
use std::sync::Arc;

pub struct Tentative {
    dsn: String,
    mapping: Arc<Mapping>,
    source: TableName,
    target: TableName,
    /// Connected on first use; `None` also after a connection failed.
    sinks: Vec<Option<PgSink>>,
    /// Which connection each key range written so far went to: a key must
    /// stay on the connection whose open transaction holds its row.
    ranges: KeyRanges,
}

impl Tentative {
    pub fn new(
        dsn: &str,
        mapping: Arc<Mapping>,
        source: TableName,
        target: TableName,
        workers: usize,
    ) -> Tentative {
        Tentative {
            dsn: dsn.to_string(),
            mapping,
            source,
            target,
            sinks: (0..workers.max(1)).map(|_| None).collect(),
            ranges: KeyRanges::default(),
        }
    }

    /// Writes one segment (no TRUNCATE) into the open transactions. Returns
    /// the segment's parts, whatever the outcome, and the write's result.
    pub async fn write(&mut self, segment: Segment) -> (Vec<Segment>, Result<Applied>) {
        let n = self.sinks.len();
        if let Err(e) = self.connect().await {
            return (vec![segment], Err(e));
        }
        let parts = split(segment, n, &mut self.ranges);
        let (parts, written) = on_parts(&mut self.sinks, parts, |mut sink, part| async move {
            let result = sink.write_open(std::slice::from_ref(&part)).await;
            (sink, part, result)
        })
        .await;
        (parts.into_iter().flatten().collect(), written)
    }

    /// Commits every open transaction, each after `fence`. (A connection is
    /// only ever missing here if it never wrote: one lost with writes in it
    /// made its write fail, and the caller gave the transactions up.)
    pub async fn commit(&mut self, fence: &Checkpoint) -> Result<()> {
        self.ranges.clear();
        for sink in self.sinks.iter_mut().flatten() {
            sink.commit_open(fence).await?;
        }
        Ok(())
    }

    /// Rolls every open transaction back; a connection that cannot is
    /// dropped (its server session rolls back as it ends).
    pub async fn rollback(&mut self) {
        self.ranges.clear();
        for sink in &mut self.sinks {
            if let Some(s) = sink.as_mut() {
                if let Err(e) = s.rollback_open().await {
                    tracing::debug!(error = %e, "early apply rollback; dropping the connection");
                    *sink = None;
                }
            }
        }
    }

    async fn connect(&mut self) -> Result<()> {
        for sink in &mut self.sinks {
            if sink.is_none() {
                *sink = Some(
                    PgSink::connect(
                        &self.dsn,
                        self.mapping.clone(),
                        self.source.clone(),
                        self.target.clone(),
                        Role::Stream,
                    )
                    .await?,
                );
            }
        }
        Ok(())
    }
}

/// A sink's transaction kept open across writes.
impl PgSink {
    /// Writes segments into a transaction kept open across calls (begun by
    /// the first), for a source transaction still in progress. A row that
    /// would need reading back from the source is an error here: the source
    /// does not show the transaction's own changes yet.
    pub async fn write_open(&mut self, segments: &[Segment]) -> Result<Applied> {
        let statements = self.statements_for_all(segments).await?;
        if !self.open {
            self.client
                .batch_execute("BEGIN")
                .await
                .map_err(Error::db("begin an early apply"))?;
            self.open = true;
        }
        let on = Target {
            mapping: &self.mapping,
            source: &self.source,
            target: &self.target,
            refetch: None,
            commits: None,
        };
        write_segments(&self.client, on, segments, &statements).await
    }

    /// Commits the open transaction after `fence` (nothing if none is open).
    pub async fn commit_open(&mut self, fence: &Checkpoint) -> Result<()> {
        if !self.open {
            return Ok(());
        }
        let stmt = self.checkpoint_statement(fence).await?;
        run_checkpoint(&self.client, stmt.as_ref(), fence, None).await?;
        self.end_open("COMMIT", "commit an early apply").await
    }

    /// Rolls the open transaction back (nothing if none is open).
    pub async fn rollback_open(&mut self) -> Result<()> {
        if !self.open {
            return Ok(());
        }
        self.end_open("ROLLBACK", "roll an early apply back").await
    }

    /// Ends the open transaction with `COMMIT` or `ROLLBACK`.
    async fn end_open(&mut self, sql: &str, what: &'static str) -> Result<()> {
        self.client
            .batch_execute(sql)
            .await
            .map_err(Error::db(what))?;
        self.open = false;
        Ok(())
    }

    /// Sets (`Some`) or resets the session's `lock_timeout`.
    pub async fn lock_timeout(&mut self, ms: Option<u64>) -> Result<()> {
        let sql = match ms {
            Some(ms) => format!("SET lock_timeout = {ms}"),
            None => "RESET lock_timeout".to_string(),
        };
        self.client
            .batch_execute(&sql)
            .await
            .map_err(Error::db("set the lock timeout"))
    }
}
