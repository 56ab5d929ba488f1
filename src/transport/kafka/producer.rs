//! The producing side: idempotent, `acks=all`; a send returns only once the
//! broker acknowledged the record, which is what lets the slot's confirmed
//! position advance past it (invariant 3).

use crate::error::{Error, Result};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::Duration;

/// Settings passed to librdkafka as they are (SASL/TLS and the like), on top
/// of rowshift's own (`enable.idempotence`, `acks`).
pub type Passthrough = Vec<(String, String)>;

pub struct Producer {
    inner: FutureProducer,
}

impl Producer {
    pub fn new(brokers: &str, passthrough: &Passthrough) -> Result<Producer> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "300000");
        for (k, v) in passthrough {
            cfg.set(k, v);
        }
        let inner = cfg.create().map_err(|e| Error::Config {
            reason: format!("kafka producer: {e}"),
        })?;
        Ok(Producer { inner })
    }

    /// Sends one record and waits for the broker's acknowledgement; returns
    /// (partition, offset).
    pub async fn send(&self, topic: &str, key: &[u8], value: Option<&[u8]>) -> Result<(i32, i64)> {
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).key(key);
        if let Some(v) = value {
            record = record.payload(v);
        }
        self.inner
            .send(record, Duration::from_secs(300))
            .await
            .map(|d| (d.partition, d.offset))
            .map_err(|(e, _)| Error::Replication(format!("kafka produce to {topic}: {e}")))
    }
}
