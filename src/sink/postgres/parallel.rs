//! Parallel apply: one batch on several connections, split by key.
//!
//! A folded batch holds one operation per key, so partitions by key (a hash
//! of the key, or its run of 64 dealt out evenly for a single integer key)
//! touch disjoint rows and never wait on each other; a key always falls in
//! the same partition, so per-key order is kept across batches. Each part
//! commits on its own, after checking under `FOR SHARE` that no newer
//! process fenced this one (see [`crate::state::bump_epoch`]). The batch's
//! checkpoint is written only when every part has committed, and the slot is
//! acknowledged after that: a crash between the parts' commits leaves a
//! partly applied batch, which the replay from the confirmed position applies
//! again, idempotently. A batch with a TRUNCATE (an exclusive lock) is
//! applied on one connection.

use super::{Applied, PgSink};
use crate::error::{Error, Result};
use crate::model::{ChangeEvent, Checkpoint, Key};
use crate::sink::fold::{fold, Segment};
use std::collections::hash_map::DefaultHasher;
use std::future::Future;
use std::hash::{Hash, Hasher};
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
        let parts = split(segments.pop().unwrap_or_default(), n);
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

/// Splits a segment's operations into `n` parts by key ([`part_of`]).
pub(super) fn split(segment: Segment, n: usize) -> Vec<Segment> {
    // Sized up front: growing each part step by step copied it several
    // times per batch, into fresh pages the kernel had to zero.
    let each = segment.ops.len() / n.max(1) + segment.ops.len() / 8 + 16;
    let mut parts: Vec<Segment> = (0..n)
        .map(|_| Segment {
            mostly_inserts: segment.mostly_inserts,
            ops: Vec::with_capacity(each),
            ..Segment::default()
        })
        .collect();
    for (key, net) in segment.ops {
        parts[part_of(&key, n)].ops.push((key, net));
    }
    parts
}

/// The part a key's changes go to: the same key always lands in the same
/// part. A single integer key is split by runs of 64 neighbours, so that
/// rows stored next to each other on the target are written by one
/// connection, not by all of them in turn. The runs are dealt out by a
/// Fibonacci hash (the run times 2^64/φ, scaled to `n`): consecutive runs
/// fall into the parts as evenly as dealing them in turn would, so a batch
/// of neighbouring keys (one large UPDATE) splits into parts of equal size
/// and neither connection waits for the other; a stride of keys does not
/// land them all in one part, as `run % n` would. (A random hash of the run
/// left parts of a 10,000-row batch about 4 % apart, and the faster
/// connection idle for the difference.)
fn part_of(key: &Key, n: usize) -> usize {
    let n = n.max(1) as u64;
    if let [Some(v)] = key.0.as_slice() {
        if let Ok(i) = v.parse::<i64>() {
            return spread(i.div_euclid(64) as u64, n);
        }
    }
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % n) as usize
}

/// `run`'s part out of `n`: the top bits of `run` × 2^64/φ, scaled.
fn spread(run: u64, n: u64) -> usize {
    let x = run.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (((x >> 32) * n) >> 32) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::fold::Net;

    #[test]
    fn a_key_always_lands_in_the_same_part_and_nothing_is_lost() {
        let ops: Vec<(Key, Net)> = (0..100)
            .map(|i| (Key(vec![Some((i * 64).to_string())]), Net::Delete))
            .collect();
        let a = split(
            Segment {
                ops: ops.clone(),
                ..Segment::default()
            },
            3,
        );
        let b = split(
            Segment {
                ops,
                ..Segment::default()
            },
            3,
        );
        assert_eq!(a.iter().map(|p| p.ops.len()).sum::<usize>(), 100);
        assert!(
            a.iter().all(|p| !p.ops.is_empty()),
            "100 keys spread over 3 parts"
        );
        assert_eq!(a, b);
    }

    #[test]
    fn integer_neighbours_share_a_part_and_other_keys_spread() {
        let int = |i: i64| Key(vec![Some(i.to_string())]);
        for run in [0i64, 64, -64, 6400] {
            let part = part_of(&int(run), 4);
            assert!((run..run + 64).all(|i| part_of(&int(i), 4) == part));
        }
        let runs: std::collections::HashSet<usize> =
            (0..64).map(|r| part_of(&int(r * 64), 4)).collect();
        assert_eq!(runs.len(), 4, "runs of 64 spread over every part");
        let text: std::collections::HashSet<usize> = (0..64)
            .map(|i| part_of(&Key(vec![Some(format!("k{i}"))]), 4))
            .collect();
        assert_eq!(text.len(), 4, "text keys spread key by key");
        let pairs: std::collections::HashSet<usize> = (0..64)
            .map(|i| part_of(&Key(vec![Some("1".into()), Some(i.to_string())]), 4))
            .collect();
        assert_eq!(pairs.len(), 4, "composite keys spread key by key");
    }

    #[test]
    fn neighbouring_keys_split_evenly_and_strides_spread() {
        let int = |i: i64| Key(vec![Some(i.to_string())]);
        // One large UPDATE: 10,000 neighbouring keys from anywhere.
        for (n, start) in [(2usize, 3i64), (2, 1_234_567), (3, 0), (4, 999_936)] {
            let mut sizes = vec![0usize; n];
            for k in start..start + 10_000 {
                sizes[part_of(&int(k), n)] += 1;
            }
            let (lo, hi) = (sizes.iter().min(), sizes.iter().max());
            let spread = hi.zip(lo).map(|(h, l)| h - l);
            assert!(
                spread.is_some_and(|d| d <= 3 * 64),
                "{n} parts from {start}: {sizes:?}"
            );
        }
        // Keys 128 apart (every other run) still reach both of two parts.
        let parts: std::collections::HashSet<usize> =
            (0..100).map(|i| part_of(&int(i * 128), 2)).collect();
        assert_eq!(parts.len(), 2);
    }
}
