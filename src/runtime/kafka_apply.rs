//! The kafka transport's appliers: members of the pipeline's consumer group
//! (`rowshift apply`, and `rowshift run` unless `apply_in_run: false`).
//!
//! Each poll's records are applied in one target transaction that first
//! claims the partitions' stored positions (`rowshift.kafka_applied`, see
//! [`state::kafka::claim`]) and then writes the rows; the consumer group's
//! offsets are committed afterwards, for tooling and to start near the right
//! place after a rebalance. The stored positions are what counts: records
//! below them are skipped, so a redelivery after a crash or a rebalance is
//! not applied twice, and two processes that briefly hold the same partition
//! cannot both apply it (the second finds the position moved, reloads it and
//! goes on from there). Per key, order is the partition's order.
//!
//! Skipping what lies below a stored position is only right if this
//! consumer has read the partition without a gap from at or below that
//! position. A newly assigned partition starts at the stored position as
//! this applier last read it (not at the group's committed offset, which
//! after a *rewind*, when a broker lost acknowledged records and reuses
//! their offsets, see [`state::kafka::rewind`], can lie past the broker's
//! log). That position can be stale, so each applier also tracks, per
//! partition, the offset from which its consumer has read without a gap
//! ([`Reach`]), and seeks back to the stored position when that lies
//! higher, or when the position's rewind count changed since.
//!
//! # The poll ahead
//! While the target writes one poll's records, the consumer polls the next
//! ones (decoding them is most of this process's work), so the two overlap.
//! That poll is screened and applied exactly as if it had been made after:
//! [`Reach`] sees the polls in the order the consumer returned them, and
//! sees each one only when it is about to be applied. Its starts may be
//! older than the positions the write moved forward, which only means more
//! records are decoded and then skipped as applied; a rewind moves a
//! position back only with a new rewind count, which makes the partition be
//! read again. When a partition is sought back, whatever the poll ahead
//! holds of it is dropped with the rest of the partition's records, since
//! the consumer returns them again from the stored position.
//!
//! # The watchdog
//! A consumer that stops delivering a partition without an error is made
//! again; see [`super::kafka_watch`].

use super::kafka_watch::{Report, Watchdog};
use super::Exit;
use crate::error::{Error, Result};
use crate::model::{now_us, ChangeEvent};
use crate::sink::postgres::{PgSink, Role};
use crate::source::postgres::connect;
use crate::source::postgres::visibility::Commits;
use crate::spec::Pipeline;
use crate::state::kafka::{PartBatch, Position};
use crate::state::{self, Desired};
use crate::transform::Mapping;
use crate::transport::kafka::consumer::{Consumer, Fetching, Polled};
use crate::transport::kafka::decode::Layout;
use crate::transport::kafka::envelope::TableSchema;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// The fewest records per partition an applier keeps ready (see
/// [`Fetching::prefetch`]).
const MIN_PREFETCH: usize = 500;

/// Applies the topic until cancelled, the pipeline ends or it is aborted.
pub async fn run(
    p: &Pipeline,
    dsn: &str,
    mapping: Arc<Mapping>,
    schema: &TableSchema,
    cancel: CancellationToken,
) -> Result<()> {
    let k = p
        .transport
        .kafka
        .clone()
        .ok_or_else(|| Error::State("not a kafka pipeline".into()))?;
    let brokers = k.brokers.resolve("transport.kafka.brokers")?;
    let registry = k.registry_url.resolve("transport.kafka.registry_url")?;
    let props = k.client_properties()?;
    let control = connect(dsn, "applier").await?;
    let incarnation = state::kafka::incarnation(&control, &p.name).await?;
    let consumer = Consumer::new(
        &brokers,
        &p.kafka_group(),
        &p.kafka_topic(),
        &registry,
        &props,
        Fetching {
            idle_pause: Duration::from_millis(k.idle_fetch_pause_ms),
            // About one poll's worth ready across the partitions.
            prefetch: (p.transport.batch_events / k.partitions.max(1) as usize).max(MIN_PREFETCH),
        },
    )?;
    let layout = Layout {
        columns: &schema.columns,
        key: &schema.key,
    };
    let mut sink = PgSink::for_pipeline(dsn, p, mapping, Role::Stream).await?;
    // A row read back from the source must show the change that asked for
    // it; the records name their transactions (`source.txId`).
    sink.watch_commits(Commits::default());
    let me = format!("pid {}", std::process::id());
    let mut positions = state::kafka::applied(&control, &p.name).await?;
    let mut reach = Reach::default();
    let mut last_check: Option<Instant> = None;
    let mut forward = true;
    // The next poll, made while the previous one was being applied.
    let mut ahead: Option<Polled> = None;
    let mut watchdog = Watchdog::new();
    let mut report = Report::new();
    tracing::info!(pipeline = %p.name, topic = %p.kafka_topic(), group = %p.kafka_group(), "applying from kafka");
    loop {
        if last_check.is_none_or(|t| t.elapsed() >= Duration::from_millis(500)) {
            last_check = Some(Instant::now());
            match wanted(&control, &p.name).await? {
                Some(Exit::Done) => return Ok(()),
                Some(Exit::Switched) => forward = false,
                None => forward = true,
            }
        }
        if !forward {
            watchdog.idle();
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
            }
        }
        // A partition assigned during the poll starts at its stored position,
        // and records below it come back undecoded. `behind` below screens
        // the poll against these same positions before `apply` reloads
        // them, so a rewind that lowers one makes the partition be read
        // again (its undecoded records dropped), never applied as empty.
        let polling = Instant::now();
        let mut polled = match ahead.take() {
            Some(polled) => polled,
            None => {
                consumer.set_starts(positions.iter().map(|(part, p)| (*part, p.next)));
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    r = consumer.poll(&layout, p.transport.batch_events, Duration::from_millis(200), Some(&incarnation)) => r?,
                }
            }
        };
        reach.assigned(&consumer.take_assigned());
        reach.read(&polled);
        report.due(&p.name, &consumer, &positions);
        watchdog.read(&polled, p.transport.batch_events);
        watchdog.check(&control, &p.name, &consumer).await?;
        let mut first_attempt = true;
        loop {
            for (part, at) in reach.behind(&polled, &positions) {
                tracing::info!(pipeline = %p.name, partition = part, offset = at, "reading the partition again from its stored position");
                consumer.seek(part, at)?;
                reach.sought(part, at, positions.get(&part).map_or(0, |p| p.rewinds));
                polled.items.retain(|i| i.partition != part);
                polled.next.retain(|(_, q), _| *q != part);
                // The consumer reads the partition again from `at`: what the
                // poll ahead holds of it comes again.
                if let Some(a) = ahead.as_mut() {
                    a.items.retain(|i| i.partition != part);
                    a.next.retain(|(_, q), _| *q != part);
                }
            }
            if polled.items.is_empty() {
                break;
            }
            let applying = Instant::now();
            // The first attempt polls the next records while the target
            // writes these (see the module docs, "The poll ahead").
            let applied = if std::mem::take(&mut first_attempt) {
                consumer.set_starts(positions.iter().map(|(part, p)| (*part, p.next)));
                let (applied, next) = tokio::join!(
                    apply(p, &control, &mut sink, &me, &polled, &mut positions, &reach),
                    async {
                        tokio::select! {
                            _ = cancel.cancelled() => None,
                            r = consumer.poll(&layout, p.transport.batch_events, Duration::from_millis(200), Some(&incarnation)) => Some(r),
                        }
                    }
                );
                if let Some(next) = next {
                    ahead = Some(next?);
                }
                applied?
            } else {
                apply(p, &control, &mut sink, &me, &polled, &mut positions, &reach).await?
            };
            if let Some(events) = applied {
                report.events += events;
                consumer.commit(&polled.next, false)?;
                tracing::debug!(
                    pipeline = %p.name,
                    records = polled.items.len(),
                    poll_ms = (applying - polling).as_millis() as u64,
                    apply_ms = applying.elapsed().as_millis() as u64,
                    "applied a poll"
                );
                break;
            }
        }
        if cancel.is_cancelled() {
            return Ok(());
        }
    }
}

/// Per partition, the offset from which this consumer has read without a
/// gap, the next offset it expects, and the stored position's rewind count
/// when that offset was established.
#[derive(Debug, Default)]
struct Reach {
    from: HashMap<i32, (i64, Option<i64>)>,
    next: HashMap<i32, i64>,
}

impl Reach {
    /// Newly assigned partitions start wherever the group's offset says.
    fn assigned(&mut self, parts: &[i32]) {
        for part in parts {
            self.from.remove(part);
            self.next.remove(part);
        }
    }

    /// Follows a poll: a partition read for the first time, or read from an
    /// earlier offset than expected (the consumer reset), starts anew.
    fn read(&mut self, polled: &Polled) {
        for item in &polled.items {
            let contiguous = self
                .next
                .get(&item.partition)
                .is_some_and(|&n| item.offset >= n);
            if !contiguous {
                self.from.insert(item.partition, (item.offset, None));
            }
            self.next.insert(item.partition, item.offset + 1);
        }
    }

    /// The partitions of `polled` to read again from their stored position.
    fn behind(&mut self, polled: &Polled, positions: &HashMap<i32, Position>) -> Vec<(i32, i64)> {
        let mut out: Vec<(i32, i64)> = Vec::new();
        for item in &polled.items {
            let Some(stored) = positions.get(&item.partition) else {
                continue;
            };
            let Some((from, rewinds)) = self.from.get_mut(&item.partition) else {
                continue;
            };
            let seen = *rewinds.get_or_insert(stored.rewinds);
            let behind = *from > stored.next || seen != stored.rewinds;
            if behind && !out.iter().any(|(p, _)| *p == item.partition) {
                out.push((item.partition, stored.next));
            }
        }
        out
    }

    /// A position this consumer read from was moved back since.
    fn rewound(&self, positions: &HashMap<i32, Position>) -> bool {
        self.from.iter().any(|(part, (_, seen))| {
            matches!((seen, positions.get(part)), (Some(seen), Some(p)) if *seen != p.rewinds)
        })
    }

    fn sought(&mut self, part: i32, at: i64, rewinds: i64) {
        self.from.insert(part, (at, Some(rewinds)));
        self.next.insert(part, at);
    }
}

/// `None`: apply. `Done`: the pipeline is gone or finished. `Switched`: the
/// forward stream is off (cut over); wait.
async fn wanted(control: &Client, name: &str) -> Result<Option<Exit>> {
    let Some(r) = state::load(control, name).await? else {
        return Err(Error::Stopped(format!("pipeline {name} no longer exists")));
    };
    if r.desired == Desired::Abort {
        return Err(Error::Stopped(format!("pipeline {name} is being aborted")));
    }
    if matches!(r.phase.as_str(), "contracting" | "contracted") {
        return Ok(Some(Exit::Done));
    }
    Ok(r.reverse().then_some(Exit::Switched))
}

/// Applies one poll: the records at or past each partition's stored
/// position, with the claim of those positions in the same transaction.
/// Returns the events applied; `None`: a position was rewound meanwhile;
/// screen the poll again.
async fn apply(
    p: &Pipeline,
    control: &Client,
    sink: &mut PgSink,
    me: &str,
    polled: &Polled,
    positions: &mut HashMap<i32, Position>,
    reach: &Reach,
) -> Result<Option<usize>> {
    'attempt: for attempt in 0..20 {
        let mut parts: BTreeMap<i32, PartBatch> = BTreeMap::new();
        let mut events: Vec<ChangeEvent> = Vec::new();
        for item in &polled.items {
            let Some(stored) = positions.get(&item.partition).map(|p| p.next) else {
                // A partition this process has not seen yet (the topic grew,
                // or the producer created its row after we loaded).
                *positions = state::kafka::applied(control, &p.name).await?;
                if reach.rewound(positions) {
                    return Ok(None);
                }
                if !positions.contains_key(&item.partition) {
                    return Err(Error::State(format!(
                        "partition {} of {} has no stored position; has `rowshift run` started producing?",
                        item.partition,
                        p.kafka_topic()
                    )));
                }
                continue 'attempt;
            };
            if item.offset < stored {
                continue; // applied before (a redelivery)
            }
            let part = parts.entry(item.partition).or_insert(PartBatch {
                part: item.partition,
                expected: stored,
                next: stored,
                events: 0,
            });
            part.next = item.offset + 1;
            if let Some(e) = &item.event {
                events.push(e.clone());
                part.events += 1;
            }
        }
        if parts.is_empty() {
            return Ok(Some(0));
        }
        let lag = events
            .last()
            .map(|e| ((now_us() - e.commit_ts_us) / 1000).max(0));
        let applied = events.len();
        let batch: Vec<PartBatch> = parts.values().copied().collect();
        let claim = state::kafka::claim(&p.name, me, &batch, lag);
        sink.received(&events);
        match sink.apply_claimed(events, &claim).await {
            Ok(_) => {
                for b in batch {
                    if let Some(pos) = positions.get_mut(&b.part) {
                        pos.next = b.next;
                    }
                }
                return Ok(Some(applied));
            }
            Err(e) if moved(&e) => {
                // Another applier moved a partition (or the stream was
                // switched off): read the positions again and skip what
                // it applied.
                tracing::debug!(pipeline = %p.name, attempt, "kafka positions moved; reloading");
                *positions = state::kafka::applied(control, &p.name).await?;
                if wanted(control, &p.name).await?.is_some() {
                    return Ok(Some(0));
                }
                if reach.rewound(positions) {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::State(
        "the kafka positions kept moving under this applier".into(),
    ))
}

/// The claim found a position moved, or lost a lock race to another applier.
fn moved(e: &Error) -> bool {
    match e {
        Error::Stopped(_) => true,
        Error::Db { source, .. } => source
            .code()
            .is_some_and(|c| matches!(c.code(), "40P01" | "40001")),
        _ => false,
    }
}
