//! Parallel apply: one batch on several connections, split by key.
//!
//! A folded batch holds one operation per key, so partitions by key
//! ([`super::split`]: pieces of neighbouring keys dealt out evenly per
//! batch for a single integer key, a hash of the key otherwise) touch
//! disjoint rows and never wait on each other. Every part commits before
//! the next batch is split, so per-key order is kept across batches even
//! where a key's part changes from one batch to the next. Each part
//! commits on its own, after checking under `FOR SHARE` that no newer
//! process fenced this one (see [`crate::state::bump_epoch`]). The batch's
//! checkpoint is written only when every part has committed, and the slot is
//! acknowledged after that: a crash between the parts' commits leaves a
//! partly applied batch, which the replay from the confirmed position applies
//! again, idempotently. A batch with a TRUNCATE (an exclusive lock) is
//! applied on one connection.

use super::split::{split, KeyRanges};
use super::{Applied, PgSink};
use crate::error::{Error, Result};
use crate::model::{ChangeEvent, Checkpoint};
use crate::sink::fold::{fold, Segment};
use std::future::Future;
use tokio::task::JoinSet;

pub struct ParallelSink {
    sinks: Vec<Option<PgSink>>,
    source_key: Vec<usize>,
}

impl ParallelSink {
    /// `sinks` must not be empty.
    pub fn new(sinks: Vec<PgSink>, source_key: Vec<usize>) -> ParallelSink {
        ParallelSink {
            sinks: sinks.into_iter().map(Some).collect(),
            source_key,
        }
    }

    /// Applies a batch. `fence` runs at the end of every part's transaction;
    /// `checkpoint` after all parts committed.
    pub async fn apply(
        &mut self,
        events: Vec<ChangeEvent>,
        fence: &Checkpoint,
        checkpoint: &Checkpoint,
    ) -> Result<Applied> {
        let segments =
            fold(events, &self.source_key).map_err(|e| Error::Replication(e.to_string()))?;
        self.apply_folded(segments, fence, checkpoint).await
    }

    /// [`ParallelSink::apply`] of a batch already folded.
    pub async fn apply_folded(
        &mut self,
        mut segments: Vec<Segment>,
        fence: &Checkpoint,
        checkpoint: &Checkpoint,
    ) -> Result<Applied> {
        let n = self.sinks.len();
        let simple = n < 2
            || segments.len() != 1
            || segments[0].truncate_first
            || segments[0].ops.len() < 2 * n;
        if simple {
            return self.first()?.apply_segments(&segments, checkpoint).await;
        }
        let parts = split(
            segments.pop().unwrap_or_default(),
            n,
            &mut KeyRanges::default(),
        );
        let (_, applied) = on_parts(&mut self.sinks, parts, |mut sink, part| {
            let fence = fence.clone();
            async move {
                let result = sink
                    .apply_segments(std::slice::from_ref(&part), &fence)
                    .await;
                (sink, part, result)
            }
        })
        .await;
        let total = applied?;
        self.first()?.checkpoint(checkpoint).await?;
        Ok(total)
    }

    /// Runs a checkpoint in a transaction of its own.
    pub async fn checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<()> {
        self.first()?.checkpoint(checkpoint).await
    }

    /// Sets or resets every connection's `lock_timeout`.
    pub async fn lock_timeout(&mut self, ms: Option<u64>) -> Result<()> {
        for sink in self.sinks.iter_mut().flatten() {
            sink.lock_timeout(ms).await?;
        }
        Ok(())
    }

    fn first(&mut self) -> Result<&mut PgSink> {
        self.sinks
            .first_mut()
            .and_then(Option::as_mut)
            .ok_or_else(|| Error::State("no apply connection".into()))
    }
}

/// Runs `op` on every non-empty part, with the sink of the same index, all
/// at once, and puts the sinks back. Returns the parts (by index, whatever
/// the outcome) and the sum of what was applied, or the first error.
pub(super) async fn on_parts<F, Fut>(
    sinks: &mut [Option<PgSink>],
    parts: Vec<Segment>,
    op: F,
) -> (Vec<Option<Segment>>, Result<Applied>)
where
    F: Fn(PgSink, Segment) -> Fut,
    Fut: Future<Output = (PgSink, Segment, Result<Applied>)> + Send + 'static,
{
    let mut kept: Vec<Option<Segment>> = Vec::with_capacity(parts.len());
    let mut set = JoinSet::new();
    let mut first_error = None;
    for (i, part) in parts.into_iter().enumerate() {
        let sink = sinks.get_mut(i).and_then(Option::take);
        match sink {
            Some(sink) if !part.ops.is_empty() => {
                kept.push(None);
                let fut = op(sink, part);
                set.spawn(async move {
                    let (sink, part, result) = fut.await;
                    (i, sink, part, result)
                });
            }
            sink => {
                if sink.is_none() && !part.ops.is_empty() {
                    first_error.get_or_insert(Error::State("an apply worker was lost".into()));
                }
                if let (Some(sink), Some(slot)) = (sink, sinks.get_mut(i)) {
                    *slot = Some(sink);
                }
                kept.push(Some(part));
            }
        }
    }
    let mut total = Applied::default();
    while let Some(joined) = set.join_next().await {
        let Ok((i, sink, part, result)) = joined else {
            first_error.get_or_insert(Error::State("an apply worker panicked".into()));
            continue;
        };
        sinks[i] = Some(sink);
        kept[i] = Some(part);
        match result {
            Ok(a) => total += a,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => (kept, Err(e)),
        None => (kept, Ok(total)),
    }
}
