use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};

fn int(i: i64) -> Key {
    Key(vec![Some(i.to_string())])
}

fn segment(keys: impl IntoIterator<Item = Key>) -> Segment {
    Segment {
        ops: keys.into_iter().map(|k| (k, Net::Delete)).collect(),
        ..Segment::default()
    }
}

/// Each key's part in `parts`.
fn parts_of(parts: &[Segment]) -> HashMap<Key, usize> {
    parts
        .iter()
        .enumerate()
        .flat_map(|(p, s)| s.ops.iter().map(move |(k, _)| (k.clone(), p)))
        .collect()
}

fn sizes(parts: &[Segment]) -> Vec<usize> {
    parts.iter().map(|p| p.ops.len()).collect()
}

#[test]
fn neighbouring_keys_split_evenly_into_pieces_from_all_over() {
    // One large UPDATE: batches of 10,000 neighbouring keys from anywhere.
    for (n, start) in [(2usize, 3i64), (2, 1_234_567), (3, 0), (4, -5_000)] {
        let mut ranges = KeyRanges::default();
        let parts = split(segment((start..start + 10_000).map(int)), n, &mut ranges);
        let s = sizes(&parts);
        let (lo, hi) = (s.iter().min(), s.iter().max());
        assert!(
            hi.zip(lo).is_some_and(|(h, l)| h - l <= 1),
            "{n} parts from {start}: {s:?}"
        );
        for part in &parts {
            let mut keys: Vec<i64> = part.ops.iter().filter_map(|(k, _)| int_key(k)).collect();
            keys.sort_unstable();
            // Runs of neighbours: none longer than two pieces (the last
            // pieces may follow one another in one part).
            let runs: Vec<usize> = keys
                .chunk_by(|a, b| b - a == 1)
                .map(|run| run.len())
                .collect();
            assert!(runs.len() > 1, "a part mixes pieces from all over");
            assert!(runs.iter().all(|&r| r <= 2 * PIECE), "{runs:?}");
        }
        assert!(
            ranges.by_lo.len() <= 10_000 / PIECE + 2 * n,
            "{}",
            ranges.by_lo.len()
        );
    }
}

#[test]
fn kept_ranges_hold_keys_to_their_part_and_balance_the_rest() {
    let mut ranges = KeyRanges::default();
    let first = split(segment((0..10_000).map(int)), 2, &mut ranges);
    let before = parts_of(&first);
    // Every other key of the first batch again, and 5,000 new ones.
    let again: Vec<Key> = (0..10_000).step_by(2).map(int).collect();
    let second = split(
        segment(again.iter().cloned().chain((20_000..25_000).map(int))),
        2,
        &mut ranges,
    );
    let after = parts_of(&second);
    for k in &again {
        assert_eq!(after.get(k), before.get(k), "{k:?} changed parts");
    }
    assert_eq!(sizes(&second), vec![5_000, 5_000]);
}

#[test]
fn random_batches_never_move_a_key_and_lose_nothing() {
    for seed in 0..20u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = rng.gen_range(2..=4usize);
        let mut ranges = KeyRanges::default();
        let mut seen: HashMap<Key, usize> = HashMap::new();
        for _ in 0..30 {
            let len = rng.gen_range(1..400usize);
            let mut keys: HashSet<Key> = HashSet::new();
            let base: i64 = rng.gen_range(-2_000..2_000);
            while keys.len() < len {
                let k = base + rng.gen_range(-300..300);
                // Text keys whose values are equal as integers.
                keys.insert(match rng.gen_range(0..10) {
                    0 => Key(vec![Some(format!("0{k}"))]),
                    1 => Key(vec![Some(format!("k{k}"))]),
                    _ => int(k),
                });
            }
            let parts = split(segment(keys.iter().cloned()), n, &mut ranges);
            let got = parts_of(&parts);
            assert_eq!(got.len(), keys.len(), "seed {seed}: every key once");
            for (k, p) in got {
                assert!(p < n);
                let was = *seen.entry(k.clone()).or_insert(p);
                assert_eq!(was, p, "seed {seed}: {k:?} moved");
            }
            let spans: Vec<(i64, i64)> = ranges
                .by_lo
                .iter()
                .map(|(lo, (hi, _))| (*lo, *hi))
                .collect();
            assert!(
                spans
                    .windows(2)
                    .all(|w| w[0].0 <= w[0].1 && w[0].1 < w[1].0),
                "seed {seed}: ranges overlap: {spans:?}"
            );
        }
    }
}

#[test]
fn past_the_range_limit_keys_go_by_hash_and_stay_put() {
    let mut ranges = KeyRanges::default();
    for i in 0..MAX_RANGES as i64 {
        ranges.by_lo.insert(i * 10, (i * 10, (i % 2) as usize));
    }
    let keys: Vec<Key> = (0..1_000).map(|i| int(i * 10 + 5)).collect();
    let a = split(segment(keys.iter().cloned()), 2, &mut ranges);
    let b = split(segment(keys.iter().cloned()), 2, &mut ranges);
    assert_eq!(ranges.by_lo.len(), MAX_RANGES, "no range added");
    assert_eq!(parts_of(&a), parts_of(&b));
    for (k, p) in parts_of(&a) {
        assert_eq!(p, part_of(&k, 2));
    }
    // Keys inside the ranges still go by them.
    let covered = split(segment([int(20), int(30)]), 2, &mut ranges);
    assert_eq!(sizes(&covered), vec![1, 1]);
}

#[test]
fn other_keys_spread_key_by_key() {
    let text: HashSet<usize> = (0..64)
        .map(|i| part_of(&Key(vec![Some(format!("k{i}"))]), 4))
        .collect();
    assert_eq!(text.len(), 4, "text keys spread key by key");
    let pairs: HashSet<usize> = (0..64)
        .map(|i| part_of(&Key(vec![Some("1".into()), Some(i.to_string())]), 4))
        .collect();
    assert_eq!(pairs.len(), 4, "composite keys spread key by key");
    let keys = (0..64).map(|i| Key(vec![Some(format!("k{i}"))]));
    let parts = split(segment(keys), 4, &mut KeyRanges::default());
    assert!(parts.iter().all(|p| !p.ops.is_empty()));
}

#[test]
fn integer_runs_by_hash_split_evenly_and_strides_spread() {
    for run in [0i64, 64, -64, 6400] {
        let part = part_of(&int(run), 4);
        assert!((run..run + 64).all(|i| part_of(&int(i), 4) == part));
    }
    for (n, start) in [(2usize, 3i64), (2, 1_234_567), (3, 0), (4, 999_936)] {
        let mut s = vec![0usize; n];
        for k in start..start + 10_000 {
            s[part_of(&int(k), n)] += 1;
        }
        let (lo, hi) = (s.iter().min(), s.iter().max());
        assert!(
            hi.zip(lo).is_some_and(|(h, l)| h - l <= 3 * 64),
            "{n} parts from {start}: {s:?}"
        );
    }
    // Keys 128 apart (every other run) still reach both of two parts.
    let parts: HashSet<usize> = (0..100).map(|i| part_of(&int(i * 128), 2)).collect();
    assert_eq!(parts.len(), 2);
}

#[test]
fn one_part_is_the_segment_as_it_came() {
    let keys: Vec<Key> = [5, 3, 9, 1].into_iter().map(int).collect();
    let mut ranges = KeyRanges::default();
    let parts = split(segment(keys.iter().cloned()), 1, &mut ranges);
    assert_eq!(parts, vec![segment(keys)]);
    assert!(ranges.by_lo.is_empty());
}
