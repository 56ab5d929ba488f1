//! What a kafka applier keeps an eye on besides applying: a consumer that
//! stopped delivering a partition (the watchdog), and its periodic report.
//!
//! # The watchdog
//! A consumer was once seen to stop delivering without an error after a
//! broker that had lost acknowledged records came back (noida-db), and
//! librdkafka's issue tracker reports the same of single partitions after
//! broker restarts and leader changes: the partition stays assigned, its
//! records are never delivered, the other partitions may go on, and the
//! same consumer's watermark queries can time out, so the broker cannot be
//! asked.
//!
//! The evidence therefore comes from the database, not the broker: the
//! producer records how far the broker acknowledged each partition
//! (`rowshift.kafka_produced`), the appliers how far it is applied
//! (`rowshift.kafka_applied`). A partition assigned to this consumer that
//! has had acknowledged records past its applied position at every check
//! for [`STALL_AFTER`], with none of its records delivered meanwhile, is
//! stalled: the applier fails with a transient error and the retry makes a
//! new consumer, which rejoins the group and starts at the stored
//! positions, so nothing is skipped or applied twice. A partition being
//! delivered, or one with nothing past its position, is never suspect; nor
//! is any while polls come back full, since records then wait in the
//! consumer's own queue (a broker that answers a fetch with a whole backlog
//! queues one partition's records after another's, and the last can wait
//! longer than the stall limit to be delivered).
//! While the broker is down the check fires too (nothing can be delivered);
//! the new consumer then waits for the broker like the old one would have.
//!
//! A consumer left with no partition at all is suspect only when records
//! wait that nobody applies (see [`Watchdog::unassigned`]): a group with
//! more appliers than partitions leaves some with none, and rightly.

use crate::error::{Error, Result};
use crate::state::kafka::Position;
use crate::transport::kafka::consumer::{Consumer, Polled};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// How long a partition may hold acknowledged records past its applied
/// position without this consumer delivering any of its records.
pub const STALL_AFTER: Duration = Duration::from_secs(30);

/// How often the watchdog reads the positions (one small query).
const CHECK_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Watchdog {
    /// Partition → since when every check found records waiting for it
    /// and none of its records was delivered.
    waiting: HashMap<i32, Instant>,
    /// Since when this consumer has had no partition, and, per partition
    /// with records waiting, its applied position and since when it has
    /// not moved (see [`Watchdog::unassigned`]).
    unassigned_since: Option<Instant>,
    unmoved: HashMap<i32, (i64, Instant)>,
    checked: Instant,
}

impl Watchdog {
    pub fn new() -> Watchdog {
        Watchdog {
            waiting: HashMap::new(),
            unassigned_since: None,
            unmoved: HashMap::new(),
            checked: Instant::now(),
        }
    }

    /// A partition delivered (any record, applied before or not) is moving.
    /// A full poll (`max` records) means records wait in the consumer's own
    /// queue, and a partition's may be among them: every clock restarts.
    pub fn read(&mut self, polled: &Polled, max: usize) {
        if self.waiting.is_empty() {
            return;
        }
        if polled.items.len() >= max {
            self.waiting.clear();
            return;
        }
        for item in &polled.items {
            self.waiting.remove(&item.partition);
        }
    }

    /// Not applying (the stream is switched off): nothing is expected.
    pub fn idle(&mut self) {
        *self = Watchdog {
            checked: self.checked,
            ..Watchdog::new()
        };
    }

    /// Every [`CHECK_EVERY`]: fails (transient) when an assigned partition
    /// has been stalled for [`STALL_AFTER`], or when this consumer has had
    /// no partition that long while one waits that nobody applies.
    pub async fn check(&mut self, control: &Client, name: &str, consumer: &Consumer) -> Result<()> {
        if self.checked.elapsed() < CHECK_EVERY {
            return Ok(());
        }
        self.checked = Instant::now();
        let assigned = consumer.assignment();
        let applied = crate::state::kafka::applied(control, name).await?;
        let parts = applied
            .keys()
            .chain(assigned.iter())
            .max()
            .map_or(0, |m| m + 1);
        let produced = crate::state::kafka::produced(control, name, parts).await?;
        let waiting = |part: i32| {
            let next = applied.get(&part).map_or(0, |p: &Position| p.next);
            let end = produced.get(part as usize).copied().unwrap_or(0);
            (end > next).then_some((next, end))
        };
        let now = Instant::now();
        if assigned.is_empty() {
            self.waiting.clear();
            return self.unassigned(now, &applied, waiting);
        }
        self.unassigned_since = None;
        self.unmoved.clear();
        self.waiting.retain(|part, _| assigned.contains(part));
        for part in assigned {
            let Some((next, end)) = waiting(part) else {
                self.waiting.remove(&part);
                continue;
            };
            let since = *self.waiting.entry(part).or_insert(now);
            if now.duration_since(since) >= STALL_AFTER {
                return Err(Error::Replication(format!(
                    "the kafka consumer delivered nothing of partition {part} for {} s although the \
                     broker acknowledged records {next}..{end} of it; it is made again",
                    now.duration_since(since).as_secs()
                )));
            }
        }
        Ok(())
    }

    /// A consumer with no partition: right when the group has more members
    /// than partitions, and the others apply them. When it has had none
    /// for [`STALL_AFTER`] and a partition has had records waiting all that
    /// time without its applied position moving, the group never finished
    /// assigning (seen once on noida-db, both members of a group left with
    /// nothing for minutes): the consumer is made again, and joins anew.
    fn unassigned(
        &mut self,
        now: Instant,
        applied: &HashMap<i32, Position>,
        waiting: impl Fn(i32) -> Option<(i64, i64)>,
    ) -> Result<()> {
        let since = *self.unassigned_since.get_or_insert(now);
        let mut parts: Vec<i32> = applied.keys().copied().collect();
        parts.sort_unstable();
        for part in parts {
            let Some((next, end)) = waiting(part) else {
                self.unmoved.remove(&part);
                continue;
            };
            let at = self.unmoved.entry(part).or_insert((next, now));
            if at.0 != next {
                *at = (next, now);
            }
            let unmoved = now.duration_since(at.1);
            if now.duration_since(since) >= STALL_AFTER && unmoved >= STALL_AFTER {
                return Err(Error::Replication(format!(
                    "the kafka consumer has had no partition for {} s while records {next}..{end} of \
                     partition {part} wait and nobody applies them; it is made again and joins the \
                     group anew",
                    now.duration_since(since).as_secs()
                )));
            }
        }
        Ok(())
    }
}

/// How often an applier says what it is doing.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// The applier's periodic log line: events applied since the last one, the
/// partitions assigned and the stored positions, so an operator (or a
/// failed test's log) sees a partition that stopped moving.
pub struct Report {
    since: Instant,
    pub events: usize,
}

impl Report {
    pub fn new() -> Report {
        Report {
            since: Instant::now(),
            events: 0,
        }
    }

    pub fn due(&mut self, name: &str, consumer: &Consumer, positions: &HashMap<i32, Position>) {
        if self.since.elapsed() < REPORT_EVERY {
            return;
        }
        let mut parts: Vec<(&i32, &Position)> = positions.iter().collect();
        parts.sort_unstable_by_key(|(part, _)| **part);
        let positions: Vec<String> = parts
            .iter()
            .map(|(part, pos)| format!("{part}:{}", pos.next))
            .collect();
        tracing::info!(
            pipeline = %name,
            events = self.events,
            per_s = (self.events as f64 / self.since.elapsed().as_secs_f64()) as u64,
            assigned = ?consumer.assignment(),
            positions = %positions.join(" "),
            "kafka applier"
        );
        *self = Report::new();
    }
}
