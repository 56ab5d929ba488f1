//! The bench's broker: started and stopped with the bench, and read for
//! its log end offsets (noida-db's are right; tansu's are not), the
//! producer's timestamps on records, and emptied between measurements.

use super::common::free_port;
use super::partitions;
use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// A broker of the bench's own, stopped when dropped.
pub struct Broker {
    dir: PathBuf,
    pub addr: String,
}

impl Broker {
    pub fn start(kind: &str, dir: PathBuf) -> Result<Broker> {
        let port = free_port()?;
        let status = Command::new("scripts/kafka.sh")
            .args(["start", kind])
            .arg(&dir)
            .arg(port.to_string())
            .status()?;
        if !status.success() {
            bail!("could not start {kind}");
        }
        Ok(Broker {
            dir,
            addr: format!("127.0.0.1:{port}"),
        })
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = Command::new("scripts/kafka.sh")
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// The sum of a topic's log end offsets, as the broker reports them.
pub struct LogEnds {
    consumer: BaseConsumer,
    topic: String,
}

impl LogEnds {
    pub fn new(broker: &str, topic: &str) -> Result<LogEnds> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", broker)
            .set("group.id", "rowshift-bench-ends")
            .create()?;
        Ok(LogEnds {
            consumer,
            topic: topic.to_string(),
        })
    }

    pub fn total(&self) -> Result<i64> {
        Ok(self.ends()?.iter().sum())
    }

    /// Each partition's log end offset.
    pub fn ends(&self) -> Result<Vec<i64>> {
        (0..partitions())
            .map(|part| {
                let (_, hi) =
                    self.consumer
                        .fetch_watermarks(&self.topic, part, Duration::from_secs(5))?;
                Ok(hi)
            })
            .collect()
    }

    /// When (unix seconds, the producer's timestamp) the earliest of the
    /// records at `at` (one offset per partition) was produced; `None`
    /// when none is there.
    pub fn first_produced(&self, at: &[i64]) -> Result<Option<f64>> {
        let ends = self.ends()?;
        let mut want = 0;
        let mut tpl = TopicPartitionList::new();
        for (part, (&from, &end)) in at.iter().zip(&ends).enumerate() {
            if end > from {
                tpl.add_partition_offset(&self.topic, part as i32, Offset::Offset(from))?;
                want += 1;
            }
        }
        self.consumer.assign(&tpl)?;
        let mut seen = std::collections::HashSet::new();
        let mut first: Option<i64> = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.len() < want && Instant::now() < deadline {
            let Some(m) = self.consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let m = m?;
            if seen.insert(m.partition()) {
                let ms = m
                    .timestamp()
                    .to_millis()
                    .context("a record without a timestamp")?;
                first = Some(first.map_or(ms, |f| f.min(ms)));
            }
        }
        self.consumer.unassign()?;
        if seen.len() < want {
            bail!(
                "read the first record of only {} of {want} partitions",
                seen.len()
            );
        }
        Ok(first.map(|ms| ms as f64 / 1000.0))
    }

    /// Deletes every record the topic holds (DeleteRecords up to each
    /// partition's end, as retention would once the appliers are past
    /// them). noida-db saves its whole state as one JSON file every few
    /// seconds, so each record kept costs CPU at every save: left alone,
    /// the records of earlier measurements (over a million, 0.8 GB of JSON
    /// by the third round) made its saves take more CPU than rowshift.
    pub async fn trim(&self, broker: &str) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        for part in 0..partitions() {
            let (_, hi) =
                self.consumer
                    .fetch_watermarks(&self.topic, part, Duration::from_secs(5))?;
            tpl.add_partition_offset(&self.topic, part, Offset::Offset(hi))?;
        }
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", broker)
            .create()?;
        for r in admin
            .delete_records(&tpl, &AdminOptions::new())
            .await?
            .elements()
        {
            if let Err(e) = r.error() {
                bail!("delete records of {}/{}: {e}", r.topic(), r.partition());
            }
        }
        Ok(())
    }

    /// When the first record past `before` appeared, and when `n` had,
    /// polling every `every` (blocking the calling thread).
    pub fn wait_for(
        &self,
        before: i64,
        n: i64,
        limit: Duration,
        every: Duration,
    ) -> Result<(Instant, Instant)> {
        let start = Instant::now();
        let mut first = None;
        loop {
            let now = self.total()?;
            if now > before && first.is_none() {
                first = Some(Instant::now());
            }
            if now >= before + n {
                return Ok((first.unwrap_or_else(Instant::now), Instant::now()));
            }
            if start.elapsed() > limit {
                bail!("only {} of {n} records reached the broker", now - before);
            }
            std::thread::sleep(every);
        }
    }
}
