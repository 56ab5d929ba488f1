//! State of the kafka transport: per-partition positions.
//!
//! `kafka_applied.next_offset` is the next offset of a partition the target
//! has not applied. It is written in the same transaction as the target rows
//! (see [`claim`]), so it is exact whatever happened to the consumer group's
//! committed offsets; `kafka_produced.next_offset` is the end of what the
//! producer has had acknowledged, for `status`.

use crate::error::{Error, Result};
use crate::model::Checkpoint;
use std::collections::HashMap;
use tokio_postgres::Client;

/// One partition's batch in an applier transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartBatch {
    pub part: i32,
    /// The stored position the applier read before this batch.
    pub expected: i64,
    /// The position after this batch.
    pub next: i64,
    pub events: i64,
}

/// Creates the position rows of `partitions` partitions (existing rows stay).
pub async fn init(client: &Client, name: &str, partitions: i32) -> Result<()> {
    for table in ["kafka_applied", "kafka_produced"] {
        client
            .execute(
                &format!(
                    "INSERT INTO rowshift.{table} (pipeline, part) \
                     SELECT $1, g FROM generate_series(0, $2 - 1) g ON CONFLICT DO NOTHING"
                ),
                &[&name, &partitions],
            )
            .await
            .map_err(Error::db("create kafka positions"))?;
    }
    Ok(())
}

/// Records that rowshift created the pipeline's topic (abort deletes it).
pub async fn record_topic(client: &Client, name: &str, topic: &str) -> Result<()> {
    client
        .execute(
            "UPDATE rowshift.pipelines SET created_topic = $2 WHERE name = $1",
            &[&name, &topic],
        )
        .await
        .map_err(Error::db("record the kafka topic"))?;
    Ok(())
}

/// The pipeline's incarnation: records carrying another one are a previous
/// pipeline's of the same name, left in a reused topic, and are skipped.
pub async fn incarnation(client: &Client, name: &str) -> Result<String> {
    let row = client
        .query_one(
            "SELECT incarnation FROM rowshift.pipelines WHERE name = $1",
            &[&name],
        )
        .await
        .map_err(Error::db("read incarnation"))?;
    Ok(row.get(0))
}

/// A partition's applied position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The next offset the target has not applied.
    pub next: i64,
    /// How often the position was moved back (see [`rewind`]): an applier
    /// that sees the count change seeks its consumer back to `next`.
    pub rewinds: i64,
}

/// Applied positions by partition.
pub async fn applied(client: &Client, name: &str) -> Result<HashMap<i32, Position>> {
    let rows = client
        .query(
            "SELECT part, next_offset, rewinds FROM rowshift.kafka_applied WHERE pipeline = $1",
            &[&name],
        )
        .await
        .map_err(Error::db("read kafka positions"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let p = Position {
                next: r.get(1),
                rewinds: r.get(2),
            };
            (r.get(0), p)
        })
        .collect())
}

/// How far each partition was produced (acknowledged), by partition number.
pub async fn produced(client: &Client, name: &str, partitions: i32) -> Result<Vec<i64>> {
    let rows = client
        .query(
            "SELECT part, next_offset FROM rowshift.kafka_produced WHERE pipeline = $1",
            &[&name],
        )
        .await
        .map_err(Error::db("read kafka positions"))?;
    let mut ends = vec![0i64; partitions.max(0) as usize];
    for r in &rows {
        let part: i32 = r.get(0);
        if let Some(e) = ends.get_mut(part as usize) {
            *e = r.get(1);
        }
    }
    Ok(ends)
}

/// A whole-table repair after lost records is queued or under way.
pub async fn resync_pending(client: &Client, name: &str) -> Result<bool> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM rowshift.repairs WHERE pipeline = $1 AND done_at IS NULL \
                AND reason = 'broker lost records')",
            &[&name],
        )
        .await
        .map_err(Error::db("read repair requests"))?;
    Ok(row.get(0))
}

/// The broker acknowledged a record of partition `part` at `at`, below
/// records it had acknowledged before: it lost the log from `at` on (a
/// broker that acknowledges writes it has not made durable, restarted).
/// Offsets from `at` are being reused, so the partition's positions move
/// back to `at` (an applier past it would skip the new records), and, as
/// the lost records' changes can never be read again, the whole table is
/// queued to be read once more through the topic (a repair of every key,
/// with deletes for target rows the source lacks), unless such a repair
/// is already queued and not started (`open`: the repairs being read).
pub async fn rewind(client: &Client, name: &str, part: i32, at: i64, open: &[i64]) -> Result<()> {
    client
        .execute(
            &format!(
                "WITH a AS (UPDATE rowshift.kafka_applied SET next_offset = $3, rewinds = rewinds + 1 \
                    WHERE pipeline = $1 AND part = $2 AND next_offset > $3 RETURNING 1), \
                 p AS (UPDATE rowshift.kafka_produced SET next_offset = $3, produced_at = now() \
                    WHERE pipeline = $1 AND part = $2 RETURNING 1) \
                 {QUEUE_RESYNC}"
            ),
            &[&name, &part, &at, &open],
        )
        .await
        .map_err(Error::db("rewind kafka positions"))?;
    Ok(())
}

/// Queues a repair of the whole table ($1: pipeline) unless one is queued
/// and not started ($4: the repairs being read).
const QUEUE_RESYNC: &str = "INSERT INTO rowshift.repairs (pipeline, reason) \
    SELECT $1, 'broker lost records' WHERE NOT EXISTS (SELECT 1 FROM rowshift.repairs \
    WHERE pipeline = $1 AND done_at IS NULL AND reason = 'broker lost records' \
    AND lo IS NULL AND id <> ALL($4::int8[]))";

/// Records how far each partition has been produced (acknowledged).
pub async fn save_produced(client: &Client, name: &str, ends: &[i64]) -> Result<()> {
    let parts: Vec<i32> = (0..ends.len() as i32).collect();
    client
        .execute(
            "UPDATE rowshift.kafka_produced k SET next_offset = v.next, produced_at = now() \
             FROM unnest($2::int4[], $3::int8[]) AS v(part, next) \
             WHERE k.pipeline = $1 AND k.part = v.part AND k.next_offset < v.next",
            &[&name, &parts, &ends],
        )
        .await
        .map_err(Error::db("record produced offsets"))?;
    Ok(())
}

fn int_array<T: ToString>(items: impl Iterator<Item = T>) -> String {
    let parts: Vec<String> = items.map(|i| i.to_string()).collect();
    format!("{{{}}}", parts.join(","))
}

/// The claim an applier transaction makes before it writes any row: every
/// partition of the batch moves from the position the applier read to the
/// one after the batch, and only if nobody moved it meanwhile. A second
/// applier holding the same partitions (a rebalance, or a process that was
/// paused past its session) blocks on the same rows and, once the first
/// commits, finds them moved and writes nothing. It also holds the pipeline
/// row `FOR SHARE` while the direction is forward, which is the cut-over's
/// fence: a swap waits for the batch, and after it no forward batch applies.
pub fn claim(name: &str, applier: &str, parts: &[PartBatch], lag_ms: Option<i64>) -> Checkpoint {
    Checkpoint {
        sql: "WITH v AS (SELECT * FROM unnest($2::text::int4[], $3::text::int8[], $4::text::int8[], $5::text::int8[]) \
                AS v(part, expected, next, events)), \
              upd AS (UPDATE rowshift.kafka_applied k SET next_offset = v.next, events = k.events + v.events, \
                lag_ms = coalesce($6::text::int8, k.lag_ms), applied_at = now(), applier = $7::text \
                FROM v WHERE k.pipeline = $1::text AND k.part = v.part AND k.next_offset = v.expected \
                RETURNING 1) \
              SELECT 1 WHERE (SELECT count(*) FROM upd) = (SELECT count(*) FROM v) \
                AND (SELECT direction FROM rowshift.pipelines WHERE name = $1::text FOR SHARE) = 'forward'"
            .into(),
        params: vec![
            Some(name.to_string()),
            Some(int_array(parts.iter().map(|p| p.part))),
            Some(int_array(parts.iter().map(|p| p.expected))),
            Some(int_array(parts.iter().map(|p| p.next))),
            Some(int_array(parts.iter().map(|p| p.events))),
            lag_ms.map(|l| l.to_string()),
            Some(applier.to_string()),
        ],
        fenced: true,
    }
}

/// Runs a checkpoint on its own (autocommit), with its fencing check.
pub async fn execute(client: &Client, checkpoint: &Checkpoint) -> Result<()> {
    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        checkpoint.params.iter().map(|p| p as _).collect();
    let changed = client
        .execute(checkpoint.sql.as_str(), &refs)
        .await
        .map_err(Error::db("write checkpoint"))?;
    if checkpoint.fenced && changed != 1 {
        return Err(Error::Stopped(
            "another rowshift process took this pipeline over (fenced)".into(),
        ));
    }
    Ok(())
}

/// One partition as `status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionStatus {
    pub partition: i32,
    pub produced: i64,
    pub applied: i64,
    /// Records produced and not yet applied.
    pub consumer_lag: i64,
    pub lag_ms: Option<i64>,
    pub applier: Option<String>,
}

pub async fn status(client: &Client, name: &str) -> Result<Vec<PartitionStatus>> {
    let rows = client
        .query(
            "SELECT a.part, coalesce(p.next_offset, 0), a.next_offset, a.lag_ms, a.applier \
             FROM rowshift.kafka_applied a LEFT JOIN rowshift.kafka_produced p USING (pipeline, part) \
             WHERE a.pipeline = $1 ORDER BY a.part",
            &[&name],
        )
        .await
        .map_err(Error::db("read kafka positions"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let produced: i64 = r.get(1);
            let applied: i64 = r.get(2);
            PartitionStatus {
                partition: r.get(0),
                produced,
                applied,
                consumer_lag: (produced - applied).max(0),
                lag_ms: r.get(3),
                applier: r.get(4),
            }
        })
        .collect())
}
