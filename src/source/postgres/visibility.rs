//! Commits that are streamed before other sessions can see them.
//!
//! PostgreSQL writes (and flushes) a transaction's commit record first and
//! removes the transaction from the list of running ones a moment later. In
//! between, the walsender can decode the commit and rowshift can receive it,
//! while a snapshot taken by another session still counts the transaction as
//! running and reads the rows as they were before it. The moment is usually
//! microseconds; a committing backend that is descheduled, or that waits for
//! a synchronous standby (which happens after the commit record is flushed),
//! stretches it to milliseconds or longer.
//!
//! Anything that reads the source to stand for "the row now, after every
//! change received so far" must therefore not use such a snapshot: a backfill
//! chunk copied after a change was applied, or a row re-read because an update
//! left a TOASTed column out. Read too early, the copy writes the row as it was
//! before a change that is never applied again (a lost update, or a deleted
//! row brought back). [`Commits`] keeps the ids of the transactions received
//! recently, and [`Commits::wait_visible`] waits, before such a read, until a
//! fresh snapshot counts none of them as running. Once a transaction has left
//! the running list it stays out, so every later statement sees it too.

use crate::error::{Error, Result};
use crate::model::{now_us, ChangeEvent};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio_postgres::{GenericClient, Statement};

/// Commits older than this are not waited for (see [`Commits::push_committed`]).
pub const OLD_COMMIT: Duration = Duration::from_secs(600);

fn recent(commit_ts_us: i64) -> bool {
    now_us().saturating_sub(commit_ts_us) < OLD_COMMIT.as_micros() as i64
}

/// The known ids of `events` that committed recently, each run of one
/// transaction's events named once.
fn recent_ids(events: &[ChangeEvent]) -> Vec<u32> {
    let mut xids: Vec<u32> = Vec::new();
    for e in events {
        if e.xid != 0 && xids.last() != Some(&e.xid) && recent(e.commit_ts_us) {
            xids.push(e.xid);
        }
    }
    xids
}

/// The statement [`Commits::wait_visible`] runs (prepared by the caller).
pub const SNAPSHOT_SQL: &str = "SELECT pg_current_snapshot()::text";

/// A `pg_snapshot` (`xmin:xmax:xip,...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub xmin: u64,
    pub xmax: u64,
    pub xip: Vec<u64>,
}

impl Snapshot {
    pub fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next() {
            Some("") | None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()?,
        };
        Some(Snapshot { xmin, xmax, xip })
    }

    /// True when the (32-bit, as pgoutput sends it) transaction id was still
    /// running, or not yet started, for this snapshot: its changes are not in it.
    pub fn running(&self, xid: u32) -> bool {
        // Widen to 64 bits in the epoch of xmax (the xid cannot be more than
        // 2^31 transactions away from it).
        let epoch = self.xmax & !0xffff_ffff;
        let mut full = epoch | xid as u64;
        if full > self.xmax + (1 << 31) {
            full = full.saturating_sub(1 << 32);
        } else if full + (1 << 31) < self.xmax {
            full += 1 << 32;
        }
        full >= self.xmax || self.xip.contains(&full)
    }
}

/// Ids of the transactions received in the last minute.
#[derive(Debug, Default)]
pub struct RecentXids {
    seen: VecDeque<(Instant, u32)>,
    /// How many times each id is in `seen` (a replayed batch repeats ids).
    members: HashMap<u32, u32>,
    /// The newest id in `seen`, in the order xids are assigned.
    newest: Option<u32>,
}

impl RecentXids {
    const KEEP: Duration = Duration::from_secs(60);

    pub fn push(&mut self, xids: &[u32]) {
        let now = Instant::now();
        for &x in xids {
            self.seen.push_back((now, x));
            *self.members.entry(x).or_default() += 1;
            // Newer when ahead by less than half the 32-bit circle.
            if self.newest.is_none_or(|n| (x.wrapping_sub(n) as i32) > 0) {
                self.newest = Some(x);
            }
        }
        while let Some(&(at, x)) = self.seen.front() {
            if now.duration_since(at) <= Self::KEEP {
                break;
            }
            self.seen.pop_front();
            if let Some(n) = self.members.get_mut(&x) {
                *n -= 1;
                if *n == 0 {
                    self.members.remove(&x);
                }
            }
        }
        if self.seen.is_empty() {
            self.newest = None;
        }
    }

    /// Adds transactions that committed at `commit_ts_us` (source clock),
    /// unless that is long ago ([`OLD_COMMIT`]) or unknown (a batch without
    /// changes): a batch replayed after a long stop. Such a commit is
    /// visible by now, and its 32-bit id could be read as one not yet
    /// assigned, which would hold reads forever.
    pub fn push_committed(&mut self, xids: &[u32], commit_ts_us: Option<i64>) {
        if commit_ts_us.is_some_and(recent) {
            self.push(xids);
        }
    }

    /// Adds the transactions of `events`: those with a known id and a
    /// recent commit (as [`RecentXids::push_committed`]).
    pub fn push_events(&mut self, events: &[ChangeEvent]) {
        self.push(&recent_ids(events));
    }

    /// True when a transaction already received is not visible in `s`: it
    /// is running for `s`, or started after it (then the newest one did too).
    pub fn raced(&self, s: &Snapshot) -> bool {
        self.newest.is_some_and(|n| s.running(n))
            || s.xip
                .iter()
                .any(|&x| self.members.contains_key(&(x as u32)))
    }
}

/// [`RecentXids`] shared by the apply loop, which adds every batch's
/// transactions as it receives it, and the connections that read the source.
#[derive(Debug, Clone, Default)]
pub struct Commits(Arc<Mutex<RecentXids>>);

impl Commits {
    fn lock(&self) -> MutexGuard<'_, RecentXids> {
        // The lock is never held across a panic-prone call; a poisoned one
        // still holds consistent ids.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, xids: &[u32]) {
        if !xids.is_empty() {
            self.lock().push(xids);
        }
    }

    /// See [`RecentXids::push_committed`].
    pub fn push_committed(&self, xids: &[u32], commit_ts_us: Option<i64>) {
        if commit_ts_us.is_some_and(recent) {
            self.push(xids);
        }
    }

    /// See [`RecentXids::push_events`].
    pub fn push_events(&self, events: &[ChangeEvent]) {
        let xids = recent_ids(events);
        self.push(&xids);
    }

    pub fn raced(&self, s: &Snapshot) -> bool {
        self.lock().raced(s)
    }

    /// Waits until a snapshot on `client` (`snapshot`: [`SNAPSHOT_SQL`],
    /// prepared) counts none of the transactions received as running.
    /// Returns how long it waited. It waits as long as it must, logging
    /// every few seconds, because reading earlier could lose a change.
    pub async fn wait_visible<C: GenericClient + Sync>(
        &self,
        client: &C,
        snapshot: &Statement,
    ) -> Result<Duration> {
        let started = Instant::now();
        let mut pause = Duration::from_micros(200);
        let mut told = started;
        loop {
            let text: String = client
                .query_one(snapshot, &[])
                .await
                .map_err(Error::db("read snapshot"))?
                .get(0);
            let s = Snapshot::parse(&text)
                .ok_or_else(|| Error::State(format!("cannot parse snapshot {text}")))?;
            if !self.raced(&s) {
                return Ok(started.elapsed());
            }
            if told.elapsed() >= Duration::from_secs(5) {
                told = Instant::now();
                tracing::warn!(
                    waited_ms = started.elapsed().as_millis() as u64,
                    "a transaction already streamed is not yet visible on the source (a synchronous standby it waits for?); reads of the source wait for it"
                );
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_parse_and_tell_running_transactions() {
        let s = Snapshot::parse("100:105:100,103").unwrap();
        assert!(s.running(100) && s.running(103) && s.running(105) && s.running(4000));
        assert!(!s.running(101) && !s.running(104) && !s.running(99));
        assert_eq!(Snapshot::parse("7:7:").unwrap().xip, Vec::<u64>::new());
        assert!(Snapshot::parse("x:1:").is_none());
        // Across a 32-bit wrap: xmax is in epoch 1, the xid just before it.
        let s = Snapshot::parse("4294967290:4294967300:").unwrap();
        assert!(!s.running(4294967295)); // 2^32 - 1, committed before
        assert!(s.running(4)); // 2^32 + 4 = xmax
    }

    #[test]
    fn recent_ids_race_a_snapshot_that_does_not_see_them() {
        let s = Snapshot::parse("100:105:100,103").unwrap();
        let mut recent = RecentXids::default();
        assert!(!recent.raced(&s));
        recent.push(&[101, 104]);
        assert!(!recent.raced(&s));
        recent.push(&[103]);
        assert!(recent.raced(&s), "103 is running");
        let mut recent = RecentXids::default();
        recent.push(&[104, 105, 102]);
        assert!(recent.raced(&s), "105 is at xmax: not started for s");
        // The newest id across the 32-bit wrap is the one after it.
        let mut recent = RecentXids::default();
        recent.push(&[2, u32::MAX - 1]);
        assert_eq!(recent.newest, Some(2));
        let wrapped = Snapshot::parse("4294967290:4294967300:").unwrap();
        assert!(!recent.raced(&wrapped), "2^32 - 2 and 2^32 + 2 both ended");
        recent.push(&[4]);
        assert!(recent.raced(&wrapped), "2^32 + 4 is xmax");
    }

    #[test]
    fn only_recent_commits_with_known_ids_are_held_for() {
        let s = Snapshot::parse("100:105:100,103").unwrap();
        let commits = Commits::default();
        let now = now_us();
        let old = now - OLD_COMMIT.as_micros() as i64 - 1_000_000;
        commits.push_committed(&[103], Some(old));
        commits.push_committed(&[103], None);
        assert!(
            !commits.raced(&s),
            "a replayed old commit, or no change at all"
        );
        let event = |xid, commit_ts_us| ChangeEvent {
            change: crate::model::Change::Truncate,
            commit_lsn: crate::model::Lsn(1),
            commit_ts_us,
            xid,
        };
        commits.push_events(&[
            event(0, now),
            event(100, old),
            event(101, now),
            event(101, now),
        ]);
        assert!(!commits.raced(&s));
        assert_eq!(commits.lock().seen.len(), 1, "101 once; 0 unknown; 100 old");
        commits.push_committed(&[103], Some(now));
        assert!(commits.raced(&s));
    }
}
