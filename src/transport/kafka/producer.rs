//! The producing side: idempotent, `acks=all`; a record counts as produced
//! only once the broker acknowledged it, which is what lets the slot's
//! confirmed position advance past it (invariant 3).
//!
//! Records are keyed by the Avro-encoded primary key and partitioned with
//! `murmur2_random`, the Java client's partitioner, so other producers and
//! tools agree on which partition a key lives in, and one key's changes stay
//! in one partition, in order.
//!
//! Acknowledgements are counted per batch of records
//! ([`super::delivery`]): the caller queues a batch's records, closes it,
//! and awaits the batch as a whole.

use super::delivery::Deliveries;
use super::logs::Logs;
use crate::error::{Error, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer as _, ThreadedProducer};
use std::sync::Arc;
use std::time::Duration;

/// Settings passed to librdkafka as they are (SASL/TLS and the like), on top
/// of rowshift's own (`enable.idempotence`, `acks`).
pub type Passthrough = Vec<(String, String)>;

/// The producer's compression unless `properties` set `compression.type`.
/// zstd: the bench's change records take 41 bytes each in the broker's log,
/// against 60 with lz4 (batches of a few dozen records, where lz4 finds
/// little to match), for a little more of the producer's CPU.
pub const DEFAULT_COMPRESSION: &str = "zstd";

/// How long librdkafka gathers a partition's records into one batch unless
/// `properties` set `linger.ms`. 50 ms, not librdkafka's 5: a backlog of
/// single-row transactions then travels in batches of about 400 records
/// instead of 85, so the broker handles a fifth of the batches, zstd
/// starts a fifth of the frames (each a fresh compression context) and the
/// producer's threads wake less. It adds at most 50 ms to the lag.
pub const DEFAULT_LINGER_MS: &str = "50";

/// Header carrying the pipeline's incarnation (see `state::kafka::incarnation`).
pub const INCARNATION_HEADER: &str = "rowshift.incarnation";

pub struct Producer {
    inner: ThreadedProducer<Deliveries>,
}

/// A client of `brokers` with `defaults`, then the pipeline's `passthrough`
/// over them.
fn config(brokers: &str, defaults: &[(&str, &str)], passthrough: &Passthrough) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set_log_level(super::logs::level());
    for (k, v) in defaults {
        cfg.set(*k, *v);
    }
    for (k, v) in passthrough {
        cfg.set(k, v);
    }
    cfg
}

/// Records being queued to be acknowledged together (see
/// [`super::delivery`]); registered with the producer at its first record.
#[derive(Debug, Default)]
pub struct Batch {
    n: Option<u64>,
    queued: usize,
}

/// A closed batch's acknowledgements, still to come.
pub struct Pending {
    n: u64,
    deliveries: Arc<Deliveries>,
}

impl Pending {
    /// Each record's `(partition, offset)`, in the order the broker
    /// acknowledged them (per partition, the order they were queued).
    pub async fn wait(self, topic: &str) -> Result<Vec<(i32, i64)>> {
        self.deliveries
            .wait(self.n)
            .await
            .map_err(|e| Error::Replication(format!("kafka produce to {topic}: {e}")))
    }
}

/// rowshift's producer settings. Its tuning defaults come first, so the
/// pipeline's `properties` can override them (`linger.ms`, compression and
/// the like); the delivery guarantees come last, so nothing overrides them
/// (the spec refuses them in `properties` as well).
fn producer_config(brokers: &str, passthrough: &Passthrough) -> ClientConfig {
    let mut defaults = vec![
        ("partitioner", "murmur2_random"),
        ("linger.ms", DEFAULT_LINGER_MS),
        ("batch.num.messages", "10000"),
        ("queue.buffering.max.messages", "1000000"),
        ("queue.buffering.max.kbytes", "1048576"),
        ("message.timeout.ms", "0"),
    ];
    // Compressed unless the pipeline chose otherwise: the note-like text
    // columns of a table compress several times over, which the broker
    // stores and sends the appliers as they are.
    if !passthrough
        .iter()
        .any(|(k, _)| k == "compression.type" || k == "compression.codec")
    {
        defaults.push(("compression.type", DEFAULT_COMPRESSION));
    }
    let mut cfg = config(brokers, &defaults, passthrough);
    cfg.set("enable.idempotence", "true").set("acks", "all");
    cfg
}

impl Producer {
    pub fn new(brokers: &str, passthrough: &Passthrough) -> Result<Producer> {
        let inner = producer_config(brokers, passthrough)
            .create_with_context(Deliveries::default())
            .map_err(|e| Error::Config {
                reason: format!("kafka producer: {e}"),
            })?;
        Ok(Producer { inner })
    }

    /// Ends `batch`: its acknowledgements to await (`None`: it is empty).
    pub fn close(&self, batch: Batch) -> Option<Pending> {
        let n = batch.n?;
        let deliveries = self.inner.context().clone();
        deliveries.close(n, batch.queued);
        Some(Pending { n, deliveries })
    }

    /// Queues one record into `batch` (waiting while librdkafka's queue is
    /// full). Records queued in order are written in order per partition
    /// (idempotent producer).
    pub async fn queue(
        &self,
        batch: &mut Batch,
        topic: &str,
        key: &[u8],
        value: Option<&[u8]>,
        incarnation: &str,
    ) -> Result<()> {
        let n = *batch.n.get_or_insert_with(|| self.inner.context().open());
        loop {
            let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
                key: INCARNATION_HEADER,
                value: Some(incarnation.as_bytes()),
            });
            let mut record = BaseRecord::<[u8], [u8], usize>::with_opaque_to(topic, n as usize)
                .key(key)
                .headers(headers);
            if let Some(v) = value {
                record = record.payload(v);
            }
            match self.inner.send(record) {
                Ok(()) => {
                    batch.queued += 1;
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, _)) => {
                    return Err(Error::Replication(format!("kafka produce to {topic}: {e}")))
                }
            }
        }
    }

    /// Sends one record and waits for the broker's acknowledgement; returns
    /// (partition, offset).
    pub async fn send(&self, topic: &str, key: &[u8], value: Option<&[u8]>) -> Result<(i32, i64)> {
        let mut batch = Batch::default();
        self.queue(&mut batch, topic, key, value, "").await?;
        let acked = match self.close(batch) {
            Some(p) => p.wait(topic).await?,
            None => Vec::new(),
        };
        acked.first().copied().ok_or_else(|| {
            Error::Replication(format!("kafka produce to {topic}: no acknowledgement"))
        })
    }

    /// The topic's partition count (asks the broker).
    pub async fn partitions(&self, topic: &str) -> Result<i32> {
        let producer = self.inner.clone();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || {
            let md = producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(15))
                .map_err(|e| Error::Replication(format!("kafka metadata of {topic}: {e}")))?;
            let n = md
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .map(|t| t.partitions().len() as i32)
                .unwrap_or(0);
            if n == 0 {
                return Err(Error::Replication(format!(
                    "kafka topic {topic} has no partitions (does it exist?)"
                )));
            }
            Ok(n)
        })
        .await
        .map_err(|e| Error::Replication(format!("kafka metadata: {e}")))?
    }
}

/// Creates the topic unless it exists.
pub async fn ensure_topic(
    brokers: &str,
    passthrough: &Passthrough,
    topic: &str,
    partitions: i32,
    replication: i32,
) -> Result<bool> {
    let admin = admin(brokers, passthrough)?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
    let results = admin
        .create_topics(
            &[new],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .map_err(|e| Error::Replication(format!("create kafka topic {topic}: {e}")))?;
    let mut created = false;
    for r in results {
        match r {
            Ok(_) => created = true,
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => {
                return Err(Error::Replication(format!(
                    "create kafka topic {t}: {code}"
                )))
            }
        }
    }
    Ok(created)
}

/// Deletes `topic` (gone already is fine).
pub async fn delete_topic(brokers: &str, passthrough: &Passthrough, topic: &str) -> Result<()> {
    let results = admin(brokers, passthrough)?
        .delete_topics(
            &[topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .map_err(|e| Error::Replication(format!("delete kafka topic {topic}: {e}")))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((t, code)) => {
                return Err(Error::Replication(format!(
                    "delete kafka topic {t}: {code}"
                )))
            }
        }
    }
    Ok(())
}

fn admin(brokers: &str, passthrough: &Passthrough) -> Result<AdminClient<Logs>> {
    config(brokers, &[], passthrough)
        .create_with_context(Logs)
        .map_err(|e| Error::Config {
            reason: format!("kafka admin client: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_compressed_unless_the_pipeline_says_otherwise() {
        let cfg = producer_config("b:9092", &Vec::new());
        assert_eq!(cfg.get("compression.type"), Some(DEFAULT_COMPRESSION));
        assert_eq!(cfg.get("acks"), Some("all"));
        let own = vec![("compression.type".to_string(), "gzip".to_string())];
        assert_eq!(
            producer_config("b:9092", &own).get("compression.type"),
            Some("gzip")
        );
        let old_name = vec![("compression.codec".to_string(), "none".to_string())];
        let cfg = producer_config("b:9092", &old_name);
        assert_eq!(cfg.get("compression.type"), None);
        assert_eq!(cfg.get("compression.codec"), Some("none"));
    }

    #[test]
    fn properties_override_tuning_but_never_the_delivery_guarantees() {
        let cfg = producer_config("b:9092", &Vec::new());
        assert_eq!(cfg.get("linger.ms"), Some(DEFAULT_LINGER_MS));
        let own = vec![
            ("linger.ms".to_string(), "40".to_string()),
            ("batch.num.messages".to_string(), "500".to_string()),
            // Refused by the spec; were one to get here, it loses.
            ("acks".to_string(), "1".to_string()),
            ("enable.idempotence".to_string(), "false".to_string()),
        ];
        let cfg = producer_config("b:9092", &own);
        assert_eq!(cfg.get("linger.ms"), Some("40"));
        assert_eq!(cfg.get("batch.num.messages"), Some("500"));
        assert_eq!(cfg.get("acks"), Some("all"));
        assert_eq!(cfg.get("enable.idempotence"), Some("true"));
        assert_eq!(cfg.get("bootstrap.servers"), Some("b:9092"));
    }
}
