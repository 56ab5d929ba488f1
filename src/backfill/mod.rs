//! The backfill: copies the rows that existed before the stream started, in
//! keyset chunks, while the stream keeps applying concurrent changes.
//!
//! # Why chunks and stream merge correctly ("copy at the sink's position")
//!
//! This is an equivalent of DBLog's watermarks that needs no watermark
//! table. The chunk copy (`INSERT INTO target SELECT <mapping> FROM source
//! WHERE lo < key <= hi AND <key not in target>`) runs **in the apply loop,
//! between two batches**, never concurrently with an apply:
//!
//! ```text
//!   stream:  ... e1 e2 e3 | e4 e5 e6 ...      (commit order; applied in order)
//!   sink:    apply ≤e3 ─▶ [copy chunk, snapshot R] ─▶ apply e4, e5, e6 ...
//! ```
//!
//! A backfill round copies chunks on all workers at once, and a worker
//! starts its next chunk as soon as its last one commits, until a change
//! batch is waiting; the round ends when its last chunk does, and only then
//! is the batch applied. So the argument below holds for every chunk of a
//! round, with P the sink's position when the round started.
//!
//! Let P be the sink's position when the copy starts (everything up to e3
//! applied). Call a target row *convergent* if it equals the source row at
//! some moment T and every change to that key after T is still to be
//! applied, in order. Replaying the remaining events over a convergent row
//! ends in the source's current row: an insert or a full update sets every
//! column, a delete removes the row, and a partial update (unchanged TOAST
//! absent) sets the columns it carries, the absent ones being unchanged
//! since T by definition.
//!
//! 1. The slot exists before the first chunk is read, so every change that
//!    commits after any chunk snapshot R is in the stream.
//! 2. Rows the target already has are convergent: each was written from a
//!    full row image (an insert, a full update, a refetch or an earlier
//!    chunk) and every later change to it is applied after it, in order.
//!    The copy leaves them alone.
//! 3. For a key the target lacks, the copy writes the source row at R. Every
//!    event the sink applied is visible in R, and every change after R is
//!    still to come, so the written row is convergent with T = R. "Visible
//!    in R" is not implied by "streamed": PostgreSQL can stream a commit a
//!    moment before other sessions see it, so each copy first waits until a
//!    snapshot shows every transaction received so far
//!    ([`crate::source::postgres::visibility`]). The torture test once lost
//!    an update this way, through the refetch, which waits the same way. Events between P and R are replays whose effect
//!    is already in the R-state; re-applying them is harmless by the same
//!    convergence argument once the sink passes R.
//! 4. No resurrection: a row deleted before R is not in the R-state, so the
//!    copy does not write it; a row deleted after R is written by the copy
//!    and removed by the delete event, which is applied afterwards.
//!    Primary-key changes are a delete of the old key plus an upsert of the
//!    new one, so the same argument covers them.
//! 5. Crash: the chunk and its cursor commit in one transaction; the slot is
//!    confirmed only past applied batches; after a restart the stream replays
//!    from the confirmed position, which points 2 and 3 already allow.
//!
//! Because nothing else writes the target while a copy or an apply runs, a
//! key absent when a statement starts stays absent until it ends: new rows
//! are written with a plain `INSERT`, without `ON CONFLICT`. The same
//! argument makes `Refetch` in the sink safe. A transient state older than
//! the source can exist until the replay passes R; the pipeline only reports
//! `caught_up` after a heartbeat written after the last chunk. No transaction
//! stays open longer than one chunk.

pub mod indexes;
pub mod throttle;

use crate::error::Result;
use crate::model::Key;
use crate::sink::postgres::PgSink;
use crate::source::postgres::visibility::Commits;
use crate::state::{chunk_checkpoint, RangeRecord};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// The chunks in flight: (range index, its connection, how long it took, result).
type ChunkSet = JoinSet<(usize, PgSink, Duration, Result<(u64, Option<Key>, bool)>)>;

/// Splits the key space into `workers` ranges of about equal row counts.
pub async fn plan_ranges(
    sink: &mut PgSink,
    workers: u32,
    estimated_rows: i64,
) -> Result<Vec<RangeRecord>> {
    let mut bounds: Vec<Option<Key>> = vec![None];
    if workers > 1 && estimated_rows > workers as i64 {
        let step = (estimated_rows / workers as i64).max(1);
        for _ in 1..workers {
            let lo = bounds.last().cloned().flatten();
            match sink.next_bound(lo.as_ref(), None, step).await? {
                Some(b) => bounds.push(Some(b)),
                None => break,
            }
        }
    }
    bounds.push(None);
    Ok(bounds
        .windows(2)
        .enumerate()
        .map(|(i, w)| RangeRecord {
            range_no: i as i32,
            lo: w[0].clone(),
            hi: w[1].clone(),
            cursor: None,
            done: false,
            rows_copied: 0,
            chunks_done: 0,
        })
        .collect())
}

/// Settings the backfill runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub chunk_rows: u32,
    pub target_chunk: Option<Duration>,
    pub rate_limit_rows_per_s: Option<u32>,
}

/// The running backfill: one sink connection per range worker.
pub struct Backfill {
    name: String,
    /// The fencing epoch every chunk checkpoint checks.
    epoch: i64,
    ranges: Vec<RangeRecord>,
    sinks: Vec<Option<PgSink>>,
    chunk_rows: u32,
    settings: Settings,
    limiter: Option<DefaultDirectRateLimiter>,
    not_before: Instant,
    /// Whether chunks probe the target for keys it already has (off while
    /// its indexes are deferred, see [`indexes`]).
    probe: bool,
}

impl Backfill {
    pub fn new(
        name: &str,
        epoch: i64,
        ranges: Vec<RangeRecord>,
        sinks: Vec<PgSink>,
        settings: Settings,
    ) -> Backfill {
        let limiter = settings
            .rate_limit_rows_per_s
            .and_then(NonZeroU32::new)
            .map(|rate| {
                let burst = rate.get().max(
                    settings
                        .chunk_rows
                        .saturating_mul(sinks.len().max(1) as u32),
                );
                RateLimiter::direct(
                    Quota::per_second(rate).allow_burst(NonZeroU32::new(burst).unwrap_or(rate)),
                )
            });
        Backfill {
            name: name.to_string(),
            epoch,
            chunk_rows: settings.chunk_rows,
            ranges,
            sinks: sinks.into_iter().map(Some).collect(),
            settings,
            limiter,
            not_before: Instant::now(),
            probe: true,
        }
    }

    /// Every chunk waits until the transactions in `commits` are visible
    /// to its snapshot (see [`crate::source::postgres::visibility`]).
    pub fn watch_commits(&mut self, commits: &Commits) {
        for s in self.sinks.iter_mut().flatten() {
            s.watch_commits(commits.clone());
        }
    }

    /// Chunks skip the probe while the target's indexes are deferred.
    pub fn set_indexes_deferred(&mut self, deferred: bool) {
        self.probe = !deferred;
    }

    pub fn finished(&self) -> bool {
        self.ranges.iter().all(|r| r.done)
    }

    pub fn rows_copied(&self) -> i64 {
        self.ranges.iter().map(|r| r.rows_copied).sum()
    }

    pub fn chunks_done(&self) -> i64 {
        self.ranges.iter().map(|r| r.chunks_done).sum()
    }

    /// True when the rate limit allows the next round now.
    pub fn due(&mut self) -> bool {
        let now = Instant::now();
        if now < self.not_before {
            return false;
        }
        let active = self.ranges.iter().filter(|r| !r.done).count().max(1) as u32;
        let Some(limiter) = &self.limiter else {
            return true;
        };
        let want = NonZeroU32::new(self.chunk_rows.saturating_mul(active).max(1))
            .unwrap_or(NonZeroU32::MIN);
        match limiter.check_n(want) {
            Ok(Ok(())) => true,
            Ok(Err(not_until)) => {
                self.not_before = now + not_until.wait_time_from(DefaultClock::default().now());
                false
            }
            Err(_) => {
                // The round is larger than the burst: shrink the chunks.
                self.chunk_rows = (self.chunk_rows / 2).max(1);
                false
            }
        }
    }

    /// When the next round may run (for the apply loop's sleep).
    pub fn not_before(&self) -> Instant {
        self.not_before
    }

    /// Copies chunks of the unfinished ranges, one at a time on each worker,
    /// each chunk with its checkpoint in the same transaction. A worker whose
    /// chunk ends starts its next one at once while `more()` says so (no
    /// change batch waiting, the round's time not up) and the rate limit
    /// allows, so the workers do not wait for each other between chunks. The
    /// round returns when every chunk it started has ended: no apply runs
    /// while a chunk does. Returns the rows copied.
    pub async fn round(&mut self, mut more: impl FnMut() -> bool) -> Result<u64> {
        let mut set = JoinSet::new();
        let mut busy = vec![false; self.ranges.len()];
        for i in 0..self.ranges.len() {
            if !self.ranges[i].done {
                self.spawn(&mut set, i, &mut busy);
            }
        }
        let workers = self.sinks.len().max(1);
        let mut copied = 0;
        let mut first_error = None;
        while let Some(joined) = set.join_next().await {
            let Ok((i, sink, took, result)) = joined else {
                continue;
            };
            busy[i] = false;
            self.sinks[i % workers] = Some(sink);
            match result {
                Ok((n, cursor, done)) => {
                    let r = &mut self.ranges[i];
                    r.cursor = cursor;
                    r.done = done;
                    r.rows_copied += n as i64;
                    r.chunks_done += 1;
                    copied += n;
                    self.adapt(took);
                    if first_error.is_none() && more() && self.allow_chunk() {
                        let free = |j: usize| !self.ranges[j].done && !busy[j];
                        if let Some(j) = next_range(self.ranges.len(), workers, i, free) {
                            self.spawn(&mut set, j, &mut busy);
                        }
                    }
                }
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        if self.sinks.iter().any(Option::is_none) {
            return Err(crate::Error::State("a backfill worker task failed".into()));
        }
        Ok(copied)
    }

    /// Starts a chunk of range `i` on its worker's connection, if free.
    fn spawn(&mut self, set: &mut ChunkSet, i: usize, busy: &mut [bool]) {
        let workers = self.sinks.len().max(1);
        let Some(mut sink) = self.sinks.get_mut(i % workers).and_then(Option::take) else {
            return;
        };
        busy[i] = true;
        let range = self.ranges[i].clone();
        let name = self.name.clone();
        let epoch = self.epoch;
        let rows = self.chunk_rows as i64;
        let probe = self.probe;
        set.spawn(async move {
            let started = Instant::now();
            let result = copy_chunk(&mut sink, &name, epoch, &range, rows, probe).await;
            (i, sink, started.elapsed(), result)
        });
    }

    /// Whether the rate limit allows one more chunk now (a round's first
    /// chunks are allowed by [`Backfill::due`]).
    fn allow_chunk(&self) -> bool {
        let Some(limiter) = &self.limiter else {
            return true;
        };
        let want = NonZeroU32::new(self.chunk_rows.max(1)).unwrap_or(NonZeroU32::MIN);
        matches!(limiter.check_n(want), Ok(Ok(())))
    }

    fn adapt(&mut self, took: Duration) {
        let Some(target) = self.settings.target_chunk else {
            return;
        };
        let ratio = target.as_secs_f64() / took.as_secs_f64().max(0.001);
        let next = (self.chunk_rows as f64 * ratio.clamp(0.5, 2.0)) as u32;
        self.chunk_rows = next.clamp(100, 1_000_000);
    }
}

/// The range the worker that just finished range `i` copies next: the next
/// `free` (unfinished and idle) one of the `n` ranges sharing its connection
/// (range `j` runs on worker `j % workers`), in turn; `i` itself when it is
/// the only one.
fn next_range(n: usize, workers: usize, i: usize, free: impl Fn(usize) -> bool) -> Option<usize> {
    (1..=n)
        .map(|k| (i + k) % n)
        .find(|&j| j % workers == i % workers && free(j))
}

/// One chunk of one range: find the bound, copy, checkpoint.
async fn copy_chunk(
    sink: &mut PgSink,
    name: &str,
    epoch: i64,
    range: &RangeRecord,
    rows: i64,
    probe: bool,
) -> Result<(u64, Option<Key>, bool)> {
    let lo = range.cursor.as_ref().or(range.lo.as_ref());
    let bound = sink.next_bound(lo, range.hi.as_ref(), rows).await?;
    let (hi, done) = match bound {
        Some(b) => (Some(b), false),
        None => (range.hi.clone(), true),
    };
    let cursor = hi.clone().or_else(|| lo.cloned());
    let checkpoint = chunk_checkpoint(name, epoch, range.range_no, &cursor, done);
    let n = sink.copy_range(lo, hi.as_ref(), &checkpoint, probe).await?;
    Ok((n, cursor, done))
}

#[cfg(test)]
mod tests {
    /// `next_range` over explicit flags.
    fn next(done: &[bool], busy: &[bool], workers: usize, i: usize) -> Option<usize> {
        super::next_range(done.len(), workers, i, |j| !done[j] && !busy[j])
    }

    #[test]
    fn a_worker_keeps_its_own_range() {
        // Two ranges, two workers: each worker goes on with its range until done.
        assert_eq!(next(&[false, false], &[false, true], 2, 0), Some(0));
        assert_eq!(next(&[true, false], &[false, true], 2, 0), None);
    }

    #[test]
    fn ranges_sharing_a_worker_take_turns() {
        // Four ranges on two workers: worker 0 has ranges 0 and 2.
        let done = [false; 4];
        assert_eq!(next(&done, &[false, true, false, true], 2, 0), Some(2));
        assert_eq!(next(&done, &[false, true, false, true], 2, 2), Some(0));
        // A finished range is skipped; the worker returns to the one left.
        assert_eq!(
            next(&[false, false, true, false], &[false; 4], 2, 0),
            Some(0)
        );
        assert_eq!(next(&[true, false, true, false], &[false; 4], 2, 2), None);
        // One worker, three ranges: in turn.
        assert_eq!(next(&[false; 3], &[false; 3], 1, 2), Some(0));
    }
}
