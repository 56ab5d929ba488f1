//! The consuming side: a member of the pipeline's consumer group that turns
//! records back into change events, in partition order, and commits a
//! partition's offset only after the caller reports the events before it
//! applied (invariant 3). Per key, order is the producer's order (one
//! partition per key); across keys the sink needs none.

use super::decode::{self, Layout, Plan};
use super::idle::IdlePause;
use super::logs;
use super::producer::{Passthrough, INCARNATION_HEADER};
use crate::error::{Error, Result};
use crate::model::ChangeEvent;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use schema_registry_converter::async_impl::schema_registry::{get_schema_by_id, SrSettings};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One record read: where it is, and its change (`None`: a tombstone, or
/// another incarnation's record; skipped, but its offset is consumed).
#[derive(Debug, Clone)]
pub struct Item {
    pub partition: i32,
    pub offset: i64,
    pub event: Option<ChangeEvent>,
}

/// Records read since the last commit, and the offsets to commit once they
/// are applied.
#[derive(Debug, Default)]
pub struct Polled {
    pub items: Vec<Item>,
    /// (topic, partition) → next offset to read.
    pub next: BTreeMap<(String, i32), i64>,
}

impl Polled {
    pub fn events(&self) -> impl Iterator<Item = &ChangeEvent> {
        self.items.iter().filter_map(|i| i.event.as_ref())
    }
}

/// Starts each newly assigned partition at the caller's stored position
/// (not the group's committed offset, which can point past a broker's log
/// after it lost records) and notes the partitions assigned, which the
/// caller checks against its positions once they are read.
#[derive(Default)]
struct Assignments {
    assigned: Arc<Mutex<Vec<i32>>>,
    /// Partition → the offset to start at (see [`Consumer::set_starts`]).
    starts: Arc<Mutex<HashMap<i32, i64>>>,
    /// librdkafka's line about the last response it refused as too large.
    oversized: Arc<Mutex<Option<String>>>,
}

impl ClientContext for Assignments {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if message.contains("Invalid response size") {
            if let Ok(mut o) = self.oversized.lock() {
                *o = Some(message.to_string());
            }
        }
        logs::forward(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        logs::client_error(&error, reason);
    }
}

impl ConsumerContext for Assignments {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS
                if crate::failpoint::once("kafka:assignment-ignored") =>
            {
                // Named stand-in for a group that never finished assigning:
                // the partitions the coordinator gave are not taken up.
                let none = TopicPartitionList::new();
                if cooperative {
                    consumer.incremental_assign(&none)
                } else {
                    consumer.assign(&none)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let parts: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                if let Ok(starts) = self.starts.lock() {
                    for (topic, part) in &parts {
                        if let Some(&at) = starts.get(part) {
                            let _ = tpl.set_partition_offset(topic, *part, Offset::Offset(at));
                        }
                    }
                }
                if let Ok(mut assigned) = self.assigned.lock() {
                    assigned.extend(tpl.elements().iter().map(|e| e.partition()));
                }
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS if cooperative => {
                consumer.incremental_unassign(tpl)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => consumer.unassign(),
            other => {
                tracing::warn!(error = ?other, "kafka rebalance error");
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "kafka rebalance: (un)assign failed");
        }
    }
}

/// The largest fetch response the consumer accepts, unless the pipeline's
/// `properties` set `receive.message.max.bytes`. A broker that honours the
/// fetch's size limits (`fetch.max.bytes`, 50 MB by default) never comes
/// near it; one that does not (noida-db 0.2.3 answers a fetch with
/// everything from the offset to the log end) would otherwise leave an
/// applier that fell more than librdkafka's default of 100 MB behind unable
/// to read at all. It bounds the memory such a response can take.
const RECEIVE_MAX_BYTES: &str = "1073741824";

/// How a consumer paces its fetches.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fetching {
    /// A partition read to its end is not fetched again for this long (0:
    /// no pause; see [`super::idle`]).
    pub idle_pause: Duration,
    /// Records per partition librdkafka keeps ready before it stops
    /// fetching that partition (`queued.min.messages`; 0: librdkafka's
    /// default of 100,000), unless the pipeline's `properties` set it.
    pub prefetch: usize,
}

/// How long a partition with `prefetch` records ready waits before it is
/// looked at again (`fetch.queue.backoff.ms`; librdkafka's default is a
/// second, far longer than an applier takes to apply them).
const PREFETCH_BACKOFF_MS: &str = "10";

pub struct Consumer {
    /// Before `inner`: its wake thread holds the consumer, and is joined
    /// when this is dropped.
    idle: IdlePause,
    /// Set by the failpoints `kafka:consumer-stops` (every partition) and
    /// `kafka:partition-stops` (one) only: see [`Stopped`].
    stopped: Mutex<Stopped>,
    inner: Arc<StreamConsumer<Assignments>>,
    assigned: Arc<Mutex<Vec<i32>>>,
    starts: Arc<Mutex<HashMap<i32, i64>>>,
    oversized: Arc<Mutex<Option<String>>>,
    topic: String,
    registry: SrSettings,
    plans: Mutex<Plans>,
}

/// A consumer a failpoint stopped: after `kafka:consumer-stops` every poll
/// comes back empty; after `kafka:partition-stops` the records of the
/// partition of the first record polled are never delivered again (as
/// librdkafka was seen to do after a broker outage), while the others are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    No,
    All,
    Partition(i32),
}

/// Writer schemas compiled by registry id, for the layout's columns.
#[derive(Default)]
struct Plans {
    columns: Vec<String>,
    by_id: HashMap<u32, Arc<Plan>>,
}

impl Plans {
    /// Drops the plans if they were compiled for other columns.
    fn retarget(&mut self, layout: &Layout) {
        if !self
            .columns
            .iter()
            .eq(layout.columns.iter().map(|(n, _)| n))
        {
            self.columns = layout.columns.iter().map(|(n, _)| n.clone()).collect();
            self.by_id.clear();
        }
    }
}

impl Consumer {
    /// A member of `group` reading `topic`, fetching as `fetching` says.
    pub fn new(
        brokers: &str,
        group: &str,
        topic: &str,
        registry_url: &str,
        passthrough: &Passthrough,
        fetching: Fetching,
    ) -> Result<Consumer> {
        let idle_pause = fetching.idle_pause;
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("fetch.wait.max.ms", "20")
            .set("isolation.level", "read_committed")
            .set("receive.message.max.bytes", RECEIVE_MAX_BYTES)
            .set("enable.partition.eof", (!idle_pause.is_zero()).to_string())
            .set_log_level(logs::level());
        // Without a limit librdkafka fetches until 100,000 records per
        // partition wait to be applied; against a broker that answers at
        // once (noida-db ignores `fetch.wait.max.ms` and `fetch.min.bytes`)
        // that is a fetch every round trip, each bringing the few records
        // produced since, for as long as the applier is busy: most of an
        // applier's CPU, and the broker's.
        if fetching.prefetch > 0 {
            cfg.set("queued.min.messages", fetching.prefetch.to_string())
                .set("fetch.queue.backoff.ms", PREFETCH_BACKOFF_MS);
        }
        for (k, v) in passthrough {
            cfg.set(k, v);
        }
        let ctx = Assignments::default();
        let (assigned, starts, oversized) = (
            ctx.assigned.clone(),
            ctx.starts.clone(),
            ctx.oversized.clone(),
        );
        let inner: Arc<StreamConsumer<Assignments>> =
            Arc::new(cfg.create_with_context(ctx).map_err(|e| Error::Config {
                reason: format!("kafka consumer: {e}"),
            })?);
        inner
            .subscribe(&[topic])
            .map_err(|e| Error::Replication(format!("subscribe to {topic}: {e}")))?;
        Ok(Consumer {
            idle: IdlePause::new(idle_pause, topic, &inner),
            stopped: Mutex::new(Stopped::No),
            inner,
            assigned,
            starts,
            oversized,
            topic: topic.to_string(),
            registry: SrSettings::new(registry_url.to_string()),
            plans: Mutex::default(),
        })
    }

    /// Waits for at least one record (or `wait`), then takes what else is
    /// ready, up to `max` records. With `incarnation`, records whose header
    /// names another incarnation are returned without their event, and so
    /// are records below their partition's start (see [`Self::set_starts`]):
    /// the caller skips those as applied, so they are not decoded (after a
    /// reset to the log's beginning that is most of what is read).
    /// A partition read to its end pauses for the idle pause (see
    /// [`super::idle`]).
    pub async fn poll(
        &self,
        layout: &Layout<'_>,
        max: usize,
        wait: Duration,
        incarnation: Option<&str>,
    ) -> Result<Polled> {
        let mut out = Polled::default();
        let stopped = self.stopped.lock().map(|s| *s).unwrap_or(Stopped::No);
        if stopped == Stopped::All {
            tokio::time::sleep(wait).await;
            return Ok(out);
        }
        let starts: HashMap<i32, i64> = self.starts.lock().map(|s| s.clone()).unwrap_or_default();
        if let Ok(mut plans) = self.plans.lock() {
            plans.retarget(layout);
        }
        let mut deadline = tokio::time::Instant::now() + wait;
        while out.items.len() < max {
            let resume = self.idle.resume_due(&self.inner);
            let until = resume.map_or(deadline, |r| r.min(deadline));
            let msg = match tokio::time::timeout_at(until, self.inner.recv()).await {
                Err(_) if until < deadline => continue,
                Err(_) => break,
                Ok(Err(KafkaError::PartitionEOF(partition))) => {
                    self.idle.at_end(&self.inner, partition);
                    continue;
                }
                Ok(Err(e)) => return Err(self.consume_error(e)),
                Ok(Ok(m)) => m,
            };
            if stopped == Stopped::Partition(msg.partition()) {
                continue;
            }
            out.next
                .insert((msg.topic().to_string(), msg.partition()), msg.offset() + 1);
            if out.items.is_empty() {
                // Something arrived: take what follows without waiting long.
                deadline = tokio::time::Instant::now() + Duration::from_millis(5);
            }
            let mut item = Item {
                partition: msg.partition(),
                offset: msg.offset(),
                event: None,
            };
            let ours = match incarnation {
                None => true,
                Some(want) => msg.headers().is_some_and(|h| {
                    h.iter()
                        .any(|h| h.key == INCARNATION_HEADER && h.value == Some(want.as_bytes()))
                }),
            };
            let applied = starts
                .get(&msg.partition())
                .is_some_and(|&at| msg.offset() < at);
            if let (true, false, Some(payload)) = (ours, applied, msg.payload()) {
                item.event = Some(self.decode(payload, layout).await.map_err(|e| {
                    Error::Replication(format!(
                        "record at {}/{}: {e}",
                        msg.partition(),
                        msg.offset()
                    ))
                })?);
            }
            out.items.push(item);
        }
        if let Some(first) = out.items.first() {
            // Named stand-ins for a consumer that stops delivering without
            // an error (see `runtime::kafka_watch`).
            let stop = if crate::failpoint::once("kafka:consumer-stops") {
                Some(Stopped::All)
            } else if crate::failpoint::once("kafka:partition-stops") {
                Some(Stopped::Partition(first.partition))
            } else {
                None
            };
            if let (Some(stop), Ok(mut s)) = (stop, self.stopped.lock()) {
                *s = stop;
            }
        }
        Ok(out)
    }

    /// The partitions assigned to this member now (empty while it has none
    /// or the group is rebalancing).
    pub fn assignment(&self) -> Vec<i32> {
        self.inner
            .assignment()
            .map(|a| {
                a.elements_for_topic(&self.topic)
                    .iter()
                    .map(|e| e.partition())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The change event of a record's payload, through the plan of its
    /// writer schema (fetched from the registry and compiled on first use).
    async fn decode(
        &self,
        payload: &[u8],
        layout: &Layout<'_>,
    ) -> std::result::Result<ChangeEvent, String> {
        let (id, datum) = decode::frame(payload)?;
        let cached = self
            .plans
            .lock()
            .ok()
            .and_then(|p| p.by_id.get(&id).cloned());
        let plan = match cached {
            Some(plan) => plan,
            None => {
                let schema = get_schema_by_id(id, &self.registry)
                    .await
                    .map_err(|e| format!("writer schema {id}: {e}"))?;
                let plan = Arc::new(Plan::new(&schema.schema, layout)?);
                if let Ok(mut plans) = self.plans.lock() {
                    plans.by_id.insert(id, plan.clone());
                }
                plan
            }
        };
        plan.event(datum, layout)
    }

    /// A response too large for `receive.message.max.bytes` comes back as
    /// "bad message" on every fetch; retrying cannot help (the response only
    /// grows), so it is reported as what it is, with what to change.
    fn consume_error(&self, e: KafkaError) -> Error {
        let oversized = matches!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::BadMessage))
            .then(|| self.oversized.lock().ok().and_then(|o| o.clone()))
            .flatten();
        match oversized {
            Some(line) => Error::Config {
                reason: format!(
                    "kafka consume from {}: the broker answered a fetch with more than \
                     receive.message.max.bytes ({line}); it ignores the fetch size limits. \
                     Raise transport.kafka.properties.receive.message.max.bytes (at most \
                     2147483647), or use a broker that honours fetch.max.bytes",
                    self.topic
                ),
            },
            None => Error::Replication(format!("kafka consume: {e}")),
        }
    }

    /// Where partitions assigned from now on start (the stored positions);
    /// records below them are not decoded by [`Self::poll`].
    pub fn set_starts(&self, starts: impl Iterator<Item = (i32, i64)>) {
        if let Ok(mut s) = self.starts.lock() {
            s.clear();
            s.extend(starts);
        }
    }

    /// The partitions assigned to this member since the last call.
    pub fn take_assigned(&self) -> Vec<i32> {
        self.assigned
            .lock()
            .map(|mut a| std::mem::take(&mut *a))
            .unwrap_or_default()
    }

    /// Reads `partition` from `offset` on.
    pub fn seek(&self, partition: i32, offset: i64) -> Result<()> {
        // librdkafka waits for the fetcher to take the seek: a blocking call.
        crate::blocking::call(|| {
            self.inner.seek(
                &self.topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(10),
            )
        })
        .map_err(|e| Error::Replication(format!("seek {}/{partition}: {e}", self.topic)))
    }

    /// Commits the offsets of a poll whose events are applied (`wait`: until
    /// the broker has them).
    pub fn commit(&self, next: &BTreeMap<(String, i32), i64>, wait: bool) -> Result<()> {
        if next.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in next {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*next))
                .map_err(|e| Error::Replication(format!("offsets: {e}")))?;
        }
        self.inner
            .commit(
                &tpl,
                if wait {
                    CommitMode::Sync
                } else {
                    CommitMode::Async
                },
            )
            .map_err(|e| Error::Replication(format!("commit offsets: {e}")))
    }
}
