//! How a folded batch is split by key over the apply connections.
//!
//! Every part must touch rows no other part touches, and, for writes kept
//! open across batches ([`super::tentative`]), a key must land on the same
//! connection every time while the transactions are open: that connection's
//! transaction holds the key's row lock and sees its earlier write.
//!
//! A single integer key is split into key ranges cut to measure for each
//! batch: the keys no earlier range covers are sorted and cut into pieces of
//! up to [`PIECE`] neighbours, dealt to the parts in turn so that their
//! sizes come out even, and each piece is remembered as a range of its part
//! ([`KeyRanges`]).
//!
//! - **Pieces larger than a leaf page.** Two connections writing
//!   neighbouring keys share btree leaf pages (a bigint key has ~370 to a
//!   page) and wait on each other's page locks, bottom-up deletion included.
//!   Two connections rewriting 200,000 rows split by runs of 64 keys took
//!   0.86 s (median of 6), by runs of 512 0.74 s (docs/benchmarks.md,
//!   session 34).
//! - **Pieces, not halves.** Contiguous halves of each batch did as well
//!   in the bench, but pieces from all over the batch give each connection
//!   some of every region, so a region that costs more per row (more dead
//!   versions, fuller pages) is not one connection's alone. (The bench's
//!   large UPDATE has a cost that stays with one connection either way: one
//!   spends a quarter of its time in btree bottom-up deletion, the other
//!   almost none; docs/benchmarks.md, session 34.)
//! - **Cut to measure.** Fixed runs of 512 cannot be balanced per batch (a
//!   10,000-row batch is about 20 of them, so parts would differ by a run).
//!
//! Other keys are spread by a hash of the key ([`part_of`]), as are integer
//! keys once a transaction has made [`MAX_RANGES`] ranges.

use crate::model::Key;
use crate::sink::fold::{Net, Segment};
use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

/// The most ranges one [`KeyRanges`] keeps (about 40 bytes each). Past it,
/// keys no range covers go by [`part_of`], and no range is added, so a key
/// still always lands in the same part.
pub(super) const MAX_RANGES: usize = 65_536;

/// Integer key ranges and the part each belongs to; disjoint.
#[derive(Debug, Default)]
pub(super) struct KeyRanges {
    /// A range's lowest key → (its highest key, its part).
    by_lo: BTreeMap<i64, (i64, usize)>,
}

impl KeyRanges {
    /// Forgets every range (the transactions they were kept for ended).
    pub(super) fn clear(&mut self) {
        self.by_lo.clear();
    }

    /// The part of the range that covers `k`, if one does.
    fn part(&self, k: i64) -> Option<usize> {
        let (_, &(hi, part)) = self.by_lo.range(..=k).next_back()?;
        (hi >= k).then_some(part)
    }

    /// Whether a range starts strictly between `after` and `before`.
    fn starts_between(&self, after: i64, before: i64) -> bool {
        after < before && self.by_lo.range(after + 1..before).next().is_some()
    }
}

/// The most keys in one piece: more than a btree leaf page holds, few
/// enough that each connection's part of a batch mixes pieces from all over
/// it (see the module docs).
pub(super) const PIECE: usize = 512;

/// A piece of new keys being cut.
struct Piece {
    part: usize,
    lo: i64,
    hi: i64,
    keys: usize,
}

impl Piece {
    /// Remembers the piece as a range of its part.
    fn keep(self, ranges: &mut KeyRanges) {
        ranges.by_lo.insert(self.lo, (self.hi, self.part));
    }
}

/// Splits a segment's operations into `n` parts (see the module docs).
/// `ranges` holds the ranges of earlier batches that must be kept to, and
/// gains this batch's; pass a fresh one where a key may change parts between
/// batches.
pub(super) fn split(segment: Segment, n: usize, ranges: &mut KeyRanges) -> Vec<Segment> {
    if n < 2 {
        return vec![segment];
    }
    // Sized up front: growing each part step by step copied it several
    // times per batch, into fresh pages the kernel had to zero.
    let each = segment.ops.len() / n + segment.ops.len() / 8 + 16;
    let mut parts: Vec<Segment> = (0..n)
        .map(|_| Segment {
            mostly_inserts: segment.mostly_inserts,
            ops: Vec::with_capacity(each),
            ..Segment::default()
        })
        .collect();
    let open = ranges.by_lo.len() < MAX_RANGES;
    let mut new: Vec<(i64, (Key, Net))> = Vec::new();
    for (key, net) in segment.ops {
        let part = match int_key(&key) {
            Some(k) => match ranges.part(k) {
                Some(p) => p,
                None if open => {
                    new.push((k, (key, net)));
                    continue;
                }
                None => part_of(&key, n),
            },
            None => part_of(&key, n),
        };
        parts[part].ops.push((key, net));
    }
    if new.is_empty() {
        return parts;
    }
    new.sort_unstable_by_key(|(k, _)| *k);
    // Each part's share of the batch, and what it still lacks of it.
    let total = parts.iter().map(|p| p.ops.len()).sum::<usize>() + new.len();
    let mut lacks: Vec<usize> = parts
        .iter()
        .enumerate()
        .map(|(i, p)| (total / n + usize::from(i < total % n)).saturating_sub(p.ops.len()))
        .collect();
    let mut piece: Option<Piece> = None;
    for (k, op) in new {
        // A piece ends at [`PIECE`] keys, where its part has its share, and
        // before an earlier range, which it must not cover. (Equal values,
        // such as text keys "7" and "07", stay together: a range must not end
        // on a key the next one starts on.)
        let goes_on = piece.as_ref().is_some_and(|c| {
            k == c.hi || (c.keys < PIECE && lacks[c.part] > 0 && !ranges.starts_between(c.hi, k))
        });
        if !goes_on {
            if let Some(done) = piece.take() {
                done.keep(ranges);
            }
        }
        // A new piece goes to the part that lacks most (the shares add up to
        // the batch, so some part lacks a key while any are left): full
        // pieces go to the parts in turn.
        let current = piece.get_or_insert_with(|| Piece {
            part: (0..n).max_by_key(|&p| lacks[p]).unwrap_or(0),
            lo: k,
            hi: k,
            keys: 0,
        });
        current.hi = k;
        current.keys += 1;
        lacks[current.part] = lacks[current.part].saturating_sub(1);
        parts[current.part].ops.push(op);
    }
    if let Some(done) = piece {
        done.keep(ranges);
    }
    parts
}

/// A single integer key's value.
fn int_key(key: &Key) -> Option<i64> {
    match key.0.as_slice() {
        [Some(v)] => v.parse().ok(),
        _ => None,
    }
}

/// The part a key goes to when no range decides: a hash of the key for
/// most keys; for a single integer key, its run of 64 neighbours dealt out
/// by a Fibonacci hash (the run times 2^64/φ, scaled to `n`), so that
/// consecutive runs fall into the parts as evenly as dealing them in turn
/// would, and a stride of keys does not land them all in one part, as
/// `run % n` would.
fn part_of(key: &Key, n: usize) -> usize {
    let n = n.max(1) as u64;
    if let Some(i) = int_key(key) {
        return spread(i.div_euclid(64) as u64, n);
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
mod tests;
