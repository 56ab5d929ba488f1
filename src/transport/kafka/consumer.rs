//! The consuming side: a member of the pipeline's consumer group that turns
//! records back into change events, in partition order, and commits a
//! partition's offset only after the caller reports the events before it
//! applied (invariant 3). Per key, order is the producer's order (one
//! partition per key); across keys the sink needs none.

use super::decode::Layout;
use super::producer::{Passthrough, INCARNATION_HEADER};
use crate::error::{Error, Result};
use crate::model::ChangeEvent;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use schema_registry_converter::async_impl::avro::AvroDecoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use std::collections::BTreeMap;
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

/// Notes the partitions each rebalance assigns: a newly assigned partition
/// starts at the group's committed offset, which the caller checks against
/// its own stored position.
#[derive(Default)]
struct Assignments(Arc<Mutex<Vec<i32>>>);

impl ClientContext for Assignments {}

impl ConsumerContext for Assignments {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let (Rebalance::Assign(tpl), Ok(mut assigned)) = (rebalance, self.0.lock()) {
            assigned.extend(tpl.elements().iter().map(|e| e.partition()));
        }
    }
}

pub struct Consumer {
    inner: StreamConsumer<Assignments>,
    assigned: Arc<Mutex<Vec<i32>>>,
    topic: String,
    decoder: AvroDecoder<'static>,
}

impl Consumer {
    pub fn new(
        brokers: &str,
        group: &str,
        topic: &str,
        registry_url: &str,
        passthrough: &Passthrough,
    ) -> Result<Consumer> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("fetch.wait.max.ms", "20")
            .set("isolation.level", "read_committed");
        for (k, v) in passthrough {
            cfg.set(k, v);
        }
        let assigned = Arc::new(Mutex::new(Vec::new()));
        let inner: StreamConsumer<Assignments> = cfg
            .create_with_context(Assignments(assigned.clone()))
            .map_err(|e| Error::Config {
                reason: format!("kafka consumer: {e}"),
            })?;
        inner
            .subscribe(&[topic])
            .map_err(|e| Error::Replication(format!("subscribe to {topic}: {e}")))?;
        Ok(Consumer {
            inner,
            assigned,
            topic: topic.to_string(),
            decoder: AvroDecoder::new(SrSettings::new(registry_url.to_string())),
        })
    }

    /// Waits for at least one record (or `wait`), then takes what else is
    /// ready, up to `max` records. With `incarnation`, records whose header
    /// names another incarnation are returned without their event.
    pub async fn poll(
        &self,
        layout: &Layout<'_>,
        max: usize,
        wait: Duration,
        incarnation: Option<&str>,
    ) -> Result<Polled> {
        let mut out = Polled::default();
        let mut deadline = tokio::time::Instant::now() + wait;
        while out.items.len() < max {
            let msg = match tokio::time::timeout_at(deadline, self.inner.recv()).await {
                Err(_) => break,
                Ok(Err(e)) => return Err(Error::Replication(format!("kafka consume: {e}"))),
                Ok(Ok(m)) => m,
            };
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
            if let (true, Some(payload)) = (ours, msg.payload()) {
                let decoded = self
                    .decoder
                    .decode(Some(payload))
                    .await
                    .map_err(|e| Error::Replication(format!("decode record: {e}")))?;
                item.event = layout.event(&decoded.value).map_err(|e| {
                    Error::Replication(format!(
                        "record at {}/{}: {e}",
                        msg.partition(),
                        msg.offset()
                    ))
                })?;
            }
            out.items.push(item);
        }
        Ok(out)
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
        self.inner
            .seek(
                &self.topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(10),
            )
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
