//! Large transactions applied while still in progress on the source.
//!
//! The walsender streams a transaction once its changes outgrow
//! `logical_decoding_work_mem`. In early mode the reader passes one such
//! transaction on as it arrives (`source::postgres::streamed`), and this
//! module writes it into target transactions that stay open until the
//! source's transaction ends: committed with it, or rolled back. Applying a
//! 200,000-row transaction then overlaps with the walsender decoding it,
//! instead of starting at its commit (PostgreSQL 16 calls this
//! `streaming = parallel`).
//!
//! **Nothing uncommitted becomes visible.** The open transactions commit
//! only at the source's commit, and the slot is acknowledged only after they
//! have (a crash in between replays the whole transaction, idempotently, as
//! for any batch).
//!
//! **No waiting on each other.** The apply loop handles everything in
//! stream order, one thing at a time: each batch of ordinary (committed)
//! transactions is committed before the early transaction's next write, so
//! an early write never waits on the loop's own connections. The other way
//! round, a committed transaction that arrives while the early one is open
//! cannot touch its rows: on the source it would have waited for the early
//! transaction's row locks, and committed after it. What the source's locks
//! do not cover (a unique index only the target has) could still make an
//! ordinary write wait on the early transaction, which waits on the loop: so
//! while an early transaction holds rows, the loop's connections run with a
//! `lock_timeout`, and a timeout gives the early writes up (below) and
//! retries the batch. Repairs and backfill chunks (reads of the source that
//! cannot see the open transaction) do not run while it is open; early mode
//! is only allowed once the backfill is done.
//!
//! **Giving up loses nothing.** Every batch of the early transaction is also
//! kept, folded. When an early write cannot be made (a TRUNCATE, a partial
//! update of a row the target lacks, which would need the source's row, an
//! error, or the lock timeout above), the open transactions are rolled back
//! and the kept batches are applied at the commit instead, exactly as a
//! buffered transaction would have been. A rollback to a savepoint cannot be
//! undone selectively: the reader gives streaming up, and this transaction's
//! end arrives as an abort; the walsender sends it again, whole, when it
//! commits.

use crate::error::{Error, Result};
use crate::model::{Batch, Checkpoint, EarlyEnd, Lsn};
use crate::sink::fold::{fold, Segment};
use crate::sink::postgres::parallel::ParallelSink;
use crate::sink::postgres::tentative::Tentative;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The loop's `lock_timeout` while an early transaction holds rows.
const LOCK_TIMEOUT_MS: u64 = 2_000;

pub struct EarlyApply {
    /// Read by the reader when a transaction starts streaming.
    pub allow: Arc<AtomicBool>,
    tentative: Tentative,
    source_key: Vec<usize>,
    open: Option<Open>,
}

/// The early transaction in progress.
struct Open {
    xid: u32,
    /// Its batches, folded, in order: what the commit applies if the open
    /// transactions were given up.
    kept: Vec<Vec<Segment>>,
    /// The open transactions hold every kept batch.
    writing: bool,
    /// The loop's connections run with the lock timeout.
    timeout_set: bool,
    events: usize,
    started: Instant,
}

/// What an early batch came to.
pub enum Outcome {
    /// Still in progress.
    Open,
    /// Committed on the target: acknowledge `ack`.
    Committed {
        ack: Lsn,
        events: usize,
    },
    RolledBack,
}

impl EarlyApply {
    pub fn new(tentative: Tentative, source_key: Vec<usize>) -> EarlyApply {
        EarlyApply {
            allow: Arc::new(AtomicBool::new(false)),
            tentative,
            source_key,
            open: None,
        }
    }

    /// An early transaction holds rows on the target.
    pub fn holds_rows(&self) -> bool {
        self.open.as_ref().is_some_and(|o| o.writing)
    }

    /// Applies a batch of the early transaction (`batch.early` is set).
    /// `checkpoint(events)` is the one to commit its end with.
    pub async fn batch(
        &mut self,
        batch: Batch,
        main: &mut ParallelSink,
        fence: &Checkpoint,
        checkpoint: impl FnOnce(usize) -> Checkpoint,
    ) -> Result<Outcome> {
        let Some(early) = batch.early else {
            return Err(Error::State(
                "an ordinary batch given to early apply".into(),
            ));
        };
        if self.open.as_ref().is_some_and(|o| o.xid != early.xid) {
            // The reader passes one transaction on at a time and ends it
            // before the next: a different one means the old one is gone.
            self.give_up(main, Some("another transaction started"))
                .await?;
            self.open = None;
        }
        let open = self.open.get_or_insert_with(|| Open {
            xid: early.xid,
            kept: Vec::new(),
            writing: true,
            timeout_set: false,
            events: 0,
            started: Instant::now(),
        });
        let batch_events = batch.events.len();
        open.events += batch_events;
        if !batch.events.is_empty() {
            let mut segments = fold(batch.events, &self.source_key)
                .map_err(|e| Error::Replication(e.to_string()))?;
            let single = segments.len() == 1 && !segments[0].truncate_first;
            let open = self
                .open
                .as_mut()
                .ok_or_else(|| Error::State("no early transaction".into()))?;
            if open.writing && single {
                if !open.timeout_set {
                    main.lock_timeout(Some(LOCK_TIMEOUT_MS)).await?;
                    open.timeout_set = true;
                }
                let segment = segments.pop().unwrap_or_default();
                let started = Instant::now();
                let (parts, written) = self.tentative.write(segment).await;
                tracing::debug!(
                    xid = open.xid,
                    events = batch_events,
                    write_us = started.elapsed().as_micros() as u64,
                    "early batch written"
                );
                open.kept.push(parts);
                if let Err(e) = written {
                    self.give_up(main, Some(&e.to_string())).await?;
                }
            } else {
                open.kept.push(segments);
                if open.writing {
                    self.give_up(main, Some("a TRUNCATE")).await?;
                }
            }
        }
        let Some(end) = early.end else {
            return Ok(Outcome::Open);
        };
        let lsn = match end {
            EarlyEnd::Abort => {
                self.give_up(main, None).await?;
                self.open = None;
                return Ok(Outcome::RolledBack);
            }
            EarlyEnd::Commit { lsn, .. } => lsn,
        };
        let Some(mut open) = self.open.take() else {
            return Ok(Outcome::RolledBack);
        };
        if open.writing {
            if let Err(e) = self.tentative.commit(fence).await {
                if matches!(e, Error::Stopped(_)) {
                    return Err(e);
                }
                tracing::info!(xid = open.xid, error = %e, "committing a transaction applied early failed; applying it whole");
                self.tentative.rollback().await;
                open.writing = false;
            }
        }
        if open.timeout_set {
            main.lock_timeout(None).await?;
        }
        let batches = open.kept.len();
        if !open.writing {
            for segments in std::mem::take(&mut open.kept) {
                main.apply_folded(segments, fence, fence).await?;
            }
        }
        if open.events == 0 {
            // Nothing of this pipeline's table (the walsender streams every
            // large transaction): the next batch's checkpoint covers it.
            return Ok(Outcome::Committed {
                ack: lsn,
                events: 0,
            });
        }
        main.checkpoint(&checkpoint(open.events)).await?;
        tracing::info!(
            xid = open.xid,
            events = open.events,
            batches,
            early = open.writing,
            open_ms = open.started.elapsed().as_millis() as u64,
            "large transaction applied{}",
            if open.writing {
                " while in progress"
            } else {
                " at its commit"
            }
        );
        Ok(Outcome::Committed {
            ack: lsn,
            events: open.events,
        })
    }

    /// Gives the open early writes up: the kept batches are applied at the
    /// commit instead. `why` is logged (`None`: the transaction rolled back).
    pub async fn give_up(&mut self, main: &mut ParallelSink, why: Option<&str>) -> Result<()> {
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        if open.writing {
            if let Some(reason) = why {
                tracing::info!(xid = open.xid, reason, "a large transaction is no longer applied early; it will be applied at its commit");
            }
            open.writing = false;
            self.tentative.rollback().await;
        }
        if open.timeout_set {
            main.lock_timeout(None).await?;
            open.timeout_set = false;
        }
        Ok(())
    }

    /// Allows early mode from now on (the backfill is done).
    pub fn allow(&self) {
        self.allow.store(true, Ordering::Relaxed);
    }
}
