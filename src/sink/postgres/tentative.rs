//! Writes of a source transaction still in progress, into target
//! transactions kept open until the source's transaction ends (see
//! `crate::runtime::early` for when and why).
//!
//! The writes are split by key hash over connections of their own, like
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

use super::parallel::split;
use super::{Applied, PgSink, Role};
use crate::error::{Error, Result};
use crate::model::Checkpoint;
use crate::sink::fold::Segment;
use crate::spec::TableName;
use crate::transform::Mapping;
use std::sync::Arc;
use tokio::task::JoinSet;

pub struct Tentative {
    dsn: String,
    mapping: Arc<Mapping>,
    source: TableName,
    target: TableName,
    /// Connected on first use; `None` also after a connection failed.
    sinks: Vec<Option<PgSink>>,
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
        }
    }

    /// Writes one segment (no TRUNCATE) into the open transactions. Returns
    /// the segment's parts, whatever the outcome, and the write's result.
    pub async fn write(&mut self, segment: Segment) -> (Vec<Segment>, Result<Applied>) {
        let n = self.sinks.len();
        if let Err(e) = self.connect().await {
            return (vec![segment], Err(e));
        }
        let mut parts: Vec<Option<Segment>> = split(segment, n).into_iter().map(Some).collect();
        let mut set = JoinSet::new();
        for (i, slot) in parts.iter_mut().enumerate() {
            if slot.as_ref().is_none_or(|p| p.ops.is_empty()) {
                continue;
            }
            let (Some(mut sink), Some(part)) = (self.sinks[i].take(), slot.take()) else {
                continue;
            };
            set.spawn(async move {
                let result = sink.write_open(std::slice::from_ref(&part)).await;
                (i, sink, part, result)
            });
        }
        let mut total = Applied::default();
        let mut first_error = None;
        while let Some(joined) = set.join_next().await {
            let Ok((i, sink, part, result)) = joined else {
                first_error.get_or_insert(Error::State("an early apply worker panicked".into()));
                continue;
            };
            self.sinks[i] = Some(sink);
            parts[i] = Some(part);
            match result {
                Ok(a) => total += a,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let parts = parts.into_iter().flatten().collect();
        match first_error {
            Some(e) => (parts, Err(e)),
            None => (parts, Ok(total)),
        }
    }

    /// Commits every open transaction, each after `fence`. (A connection is
    /// only ever missing here if it never wrote: one lost with writes in it
    /// made its write fail, and the caller gave the transactions up.)
    pub async fn commit(&mut self, fence: &Checkpoint) -> Result<()> {
        for sink in self.sinks.iter_mut().flatten() {
            sink.commit_open(fence).await?;
        }
        Ok(())
    }

    /// Rolls every open transaction back; a connection that cannot is
    /// dropped (its server session rolls back as it ends).
    pub async fn rollback(&mut self) {
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
