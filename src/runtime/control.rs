//! Operator commands on a stored pipeline: status, pause, resume, abort.

use crate::error::{Error, Result};
use crate::source::postgres::{connect, introspect::slot_lag};
use crate::spec::{quote_ident, TableName};
use crate::state::{self, Desired};
use serde::Serialize;
use std::time::{Duration, Instant};

/// What `rowshift status` shows for one pipeline.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub name: String,
    pub phase: String,
    pub desired: String,
    pub source_table: String,
    pub target_table: String,
    pub rows_copied: i64,
    pub rows_estimated: i64,
    pub chunks_done: i64,
    pub ranges_done: i64,
    pub ranges: i64,
    pub rows_per_s: f64,
    pub eta_s: Option<f64>,
    pub events_applied: i64,
    pub applied_lsn: Option<String>,
    pub lag_ms: Option<i64>,
    pub slot_lag_bytes: Option<i64>,
    pub slot_retained_wal_bytes: Option<i64>,
    pub slot_active: Option<bool>,
    pub runner: Option<String>,
    pub runner_seen_s_ago: Option<f64>,
    pub throttled: Option<String>,
    pub failure: Option<String>,
    pub hint: Option<String>,
    /// Which table carries the live name.
    pub live: String,
    pub verification: Option<VerificationStatus>,
    pub last_swap: Option<SwapStatus>,
    /// Kafka transport: per partition, produced and applied offsets.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kafka: Vec<state::kafka::PartitionStatus>,
}

/// The latest verification report.
#[derive(Debug, Clone, Serialize)]
pub struct VerificationStatus {
    pub finished_s_ago: Option<f64>,
    pub chunks: i64,
    pub rows_source: i64,
    pub rows_target: i64,
    pub mismatches: i64,
    pub repaired: i64,
    pub duration_ms: Option<i64>,
    pub rows_per_s: Option<f64>,
    pub mismatched_ranges: String,
}

/// The latest cut-over or rollback.
#[derive(Debug, Clone, Serialize)]
pub struct SwapStatus {
    pub kind: String,
    pub outcome: String,
    pub attempts: i32,
    pub pause_ms: Option<f64>,
    pub blockers: String,
}

pub async fn status(dsn: &str, name: Option<&str>) -> Result<Vec<Status>> {
    let client = connect(dsn, "status").await?;
    if !state::schema_exists(&client).await? {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT p.name, p.phase, p.desired, p.source_table, p.target_table, \
                    coalesce(sum(r.rows_copied), 0)::int8, coalesce(p.rows_estimated, 0), coalesce(sum(r.chunks_done), 0)::int8, \
                    count(r.*) FILTER (WHERE r.done), count(r.*), \
                    extract(epoch FROM (coalesce(p.backfill_finished_at, now()) - p.backfill_started_at))::float8, \
                    p.events_applied, p.applied_lsn::text, p.lag_ms, p.owner, \
                    extract(epoch FROM now() - p.runner_seen_at)::float8, p.throttled, p.failure, p.hint \
             FROM rowshift.pipelines p LEFT JOIN rowshift.backfill_ranges r ON r.pipeline = p.name \
             WHERE $1::text IS NULL OR p.name = $1 GROUP BY p.name ORDER BY p.name",
            &[&name],
        )
        .await
        .map_err(Error::db("read status"))?;
    let mut out = Vec::new();
    for r in rows {
        let name: String = r.get(0);
        let copied: i64 = r.get(5);
        let estimated: i64 = r.get(6);
        let secs: Option<f64> = r.get(10);
        let rate = match secs {
            Some(s) if s > 0.0 => copied as f64 / s,
            _ => 0.0,
        };
        let phase: String = r.get(1);
        let eta = (phase == "backfilling" && rate > 0.0)
            .then(|| ((estimated - copied).max(0)) as f64 / rate);
        let seen: Option<f64> = r.get(15);
        let direction: String = client
            .query_one(
                "SELECT direction FROM rowshift.pipelines WHERE name = $1",
                &[&name],
            )
            .await
            .map_err(Error::db("read direction"))?
            .get(0);
        let slot_name = if direction == "reverse" {
            format!("rowshift_{name}_rev")
        } else {
            format!("rowshift_{name}")
        };
        let slot = slot_lag(&client, &slot_name).await?;
        let source_table: String = r.get(3);
        let target_table: String = r.get(4);
        let live = if direction == "reverse" {
            format!("the new table (built as {target_table}) carries the name {source_table}")
        } else {
            format!("the old table {source_table} (the new one is {target_table})")
        };
        let verification = client
            .query_opt(
                "SELECT extract(epoch FROM now() - finished_at)::float8, chunks, rows_source, rows_target, \
                        mismatches, repaired, duration_ms, rows_per_s, mismatched_ranges \
                 FROM rowshift.verifications WHERE pipeline = $1 ORDER BY id DESC LIMIT 1",
                &[&name],
            )
            .await
            .map_err(Error::db("read verification"))?
            .map(|v| VerificationStatus {
                finished_s_ago: v.get::<_, Option<f64>>(0).map(|s| s.round()),
                chunks: v.get(1),
                rows_source: v.get(2),
                rows_target: v.get(3),
                mismatches: v.get(4),
                repaired: v.get(5),
                duration_ms: v.get(6),
                rows_per_s: v.get(7),
                mismatched_ranges: v.get(8),
            });
        let last_swap = client
            .query_opt(
                "SELECT kind, outcome, attempts, pause_ms, blockers FROM rowshift.cutovers \
                 WHERE pipeline = $1 ORDER BY id DESC LIMIT 1",
                &[&name],
            )
            .await
            .map_err(Error::db("read cut-over"))?
            .map(|c| SwapStatus {
                kind: c.get(0),
                outcome: c.get(1),
                attempts: c.get(2),
                pause_ms: c
                    .get::<_, Option<f64>>(3)
                    .map(|p| (p * 10.0).round() / 10.0),
                blockers: c.get(4),
            });
        // Empty for direct pipelines (and before the state schema has the
        // kafka tables).
        let kafka = state::kafka::status(&client, &name)
            .await
            .unwrap_or_default();
        out.push(Status {
            kafka,
            live,
            verification,
            last_swap,
            name,
            phase,
            desired: r.get(2),
            source_table,
            target_table,
            rows_copied: copied,
            rows_estimated: estimated,
            chunks_done: r.get(7),
            ranges_done: r.get(8),
            ranges: r.get(9),
            rows_per_s: (rate * 10.0).round() / 10.0,
            eta_s: eta.map(|e| e.round()),
            events_applied: r.get(11),
            applied_lsn: r.get(12),
            lag_ms: r.get(13),
            slot_lag_bytes: slot.map(|s| s.0),
            slot_retained_wal_bytes: slot.map(|s| s.1),
            slot_active: slot.map(|s| s.2),
            runner: r.get(14),
            runner_seen_s_ago: seen.map(|s| (s * 10.0).round() / 10.0),
            throttled: r.get(16),
            failure: r.get(17),
            hint: r.get(18),
        });
    }
    Ok(out)
}

pub fn render(s: &Status) -> String {
    let mut lines = vec![
        format!(
            "pipeline   {}  ({} -> {})",
            s.name, s.source_table, s.target_table
        ),
        format!(
            "phase      {}{}",
            s.phase,
            if s.desired != "run" {
                format!("  (operator: {})", s.desired)
            } else {
                String::new()
            }
        ),
    ];
    let pct = if s.rows_estimated > 0 {
        s.rows_copied as f64 * 100.0 / s.rows_estimated as f64
    } else {
        0.0
    };
    lines.push(format!(
        "backfill   {}/{} rows ({:.1}%), {} chunks, {}/{} ranges done, {:.0} rows/s{}",
        s.rows_copied,
        s.rows_estimated,
        pct.min(100.0),
        s.chunks_done,
        s.ranges_done,
        s.ranges,
        s.rows_per_s,
        s.eta_s
            .map(|e| format!(", ETA {e:.0} s"))
            .unwrap_or_default()
    ));
    lines.push(format!(
        "stream     {} events applied, applied position {}, lag {}",
        s.events_applied,
        s.applied_lsn.as_deref().unwrap_or("-"),
        s.lag_ms
            .map(|l| format!("{:.2} s", l as f64 / 1000.0))
            .unwrap_or_else(|| "-".into())
    ));
    lines.push(
        match (s.slot_lag_bytes, s.slot_retained_wal_bytes, s.slot_active) {
            (Some(l), Some(r), Some(a)) => format!(
                "slot       {l} bytes behind, retains {r} bytes of WAL, {}",
                if a { "active" } else { "inactive" }
            ),
            _ => "slot       (none)".to_string(),
        },
    );
    let runner = match (&s.runner, s.runner_seen_s_ago) {
        (Some(o), Some(ago)) if ago < 5.0 => format!("{o}, seen {ago:.1} s ago"),
        (Some(o), Some(ago)) => format!("not running (last: {o}, {ago:.0} s ago)"),
        _ => "not running".into(),
    };
    lines.push(format!("runner     {runner}"));
    if !s.kafka.is_empty() {
        let produced: i64 = s.kafka.iter().map(|k| k.produced).sum();
        let lag: i64 = s.kafka.iter().map(|k| k.consumer_lag).sum();
        lines.push(format!(
            "kafka      {} partitions, {produced} records produced, consumer lag {lag} records",
            s.kafka.len()
        ));
        for k in &s.kafka {
            lines.push(format!(
                "  p{:<3} produced to {}, applied to {} (lag {} records{}){}",
                k.partition,
                k.produced,
                k.applied,
                k.consumer_lag,
                k.lag_ms
                    .map(|l| format!(", last batch {l} ms behind the source"))
                    .unwrap_or_default(),
                k.applier
                    .as_deref()
                    .map(|a| format!(" by {a}"))
                    .unwrap_or_default()
            ));
        }
    }
    if let Some(t) = &s.throttled {
        lines.push(format!("throttled  {t}"));
    }
    lines.push(format!("live       {}", s.live));
    if let Some(v) = &s.verification {
        lines.push(match v.finished_s_ago {
            None => "verified   (running)".to_string(),
            Some(ago) => format!(
                "verified   {ago:.0} s ago: {} chunks, {}/{} rows, {} mismatched, {} repaired, {:.0} rows/s{}",
                v.chunks,
                v.rows_source,
                v.rows_target,
                v.mismatches,
                v.repaired,
                v.rows_per_s.unwrap_or(0.0),
                if v.mismatched_ranges.is_empty() { String::new() } else { format!(" [{}]", v.mismatched_ranges) }
            ),
        });
    }
    if let Some(c) = &s.last_swap {
        lines.push(format!(
            "last swap  {} {}: write pause {}, {} lock attempt(s){}",
            c.kind,
            c.outcome,
            c.pause_ms
                .map(|p| format!("{p:.1} ms"))
                .unwrap_or("-".into()),
            c.attempts,
            if c.blockers.is_empty() {
                String::new()
            } else {
                format!(", blocked by {}", c.blockers)
            }
        ));
    }
    if let Some(f) = &s.failure {
        lines.push(format!("failure    {f}"));
        if let Some(h) = &s.hint {
            lines.push(format!("hint       {h}"));
        }
    }
    lines.join("\n")
}

pub async fn set_desired(dsn: &str, name: &str, desired: Desired) -> Result<()> {
    let client = connect(dsn, "control").await?;
    if !state::schema_exists(&client).await? || !state::set_desired(&client, name, desired).await? {
        return Err(Error::Config {
            reason: format!("no pipeline named {name}"),
        });
    }
    Ok(())
}

/// Stops the runner (if any) and removes everything rowshift created.
pub async fn abort(dsn: &str, name: &str) -> Result<Vec<String>> {
    let client = connect(dsn, "abort").await?;
    let record = state::load(&client, name)
        .await?
        .ok_or_else(|| Error::Config {
            reason: format!("no pipeline named {name}"),
        })?;
    if record.reverse()
        || matches!(
            record.phase.as_str(),
            "cutting_over" | "rolling_back" | "contracting"
        )
    {
        return Err(Error::State(format!(
            "pipeline {name} is {}: the new table carries (or is about to carry) the live name, so abort would drop live data. \
             Use `rowshift rollback {name}` first, or `rowshift contract {name}` to finish",
            record.phase
        )));
    }
    state::set_desired(&client, name, Desired::Abort).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while state::lease_held(&client, name).await? {
        if Instant::now() > deadline {
            return Err(Error::State(format!(
                "the process running {name} did not stop within 30 s; stop it and abort again"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut done = Vec::new();
    let slot = format!("rowshift_{name}");
    for s in [slot.clone(), format!("{slot}_rev")] {
        if drop_slot(&client, &s).await? {
            done.push(format!("dropped replication slot {s}"));
        }
    }
    if record.created_publication {
        client
            .batch_execute(&format!(
                "DROP PUBLICATION IF EXISTS {}; DROP PUBLICATION IF EXISTS {}",
                quote_ident(&slot),
                quote_ident(&format!("{slot}_rev"))
            ))
            .await
            .map_err(Error::db("drop publication"))?;
        done.push(format!("dropped publication {slot}"));
    }
    if record.created_target && record.phase != "contracted" {
        if let Some(t) = TableName::parse(&record.target_table) {
            client
                .batch_execute(&format!("DROP TABLE IF EXISTS {}", t.quoted()))
                .await
                .map_err(Error::db("drop target"))?;
            done.push(format!("dropped target table {t}"));
        }
    }
    if let Some(topic) = &record.created_topic {
        done.push(match delete_topic(dsn, name, topic).await {
            Ok(()) => format!("deleted kafka topic {topic}"),
            Err(e) => format!("left kafka topic {topic} in place: {e}"),
        });
    }
    state::delete_pipeline(&client, name).await?;
    done.push(format!("removed the state of pipeline {name}"));
    Ok(done)
}

/// Deletes the topic rowshift created, with the broker settings of the
/// pipeline's file (secrets from their environment variables).
async fn delete_topic(dsn: &str, name: &str, topic: &str) -> Result<()> {
    let file = pipeline_file(dsn, name).await?;
    let p = crate::spec::load(&file).map_err(|e| Error::Config {
        reason: format!("read {} for the broker settings: {e}", file.display()),
    })?;
    let k = p.transport.kafka.as_ref().ok_or_else(|| Error::Config {
        reason: format!("{} no longer names a kafka transport", file.display()),
    })?;
    let brokers = k.brokers.resolve("transport.kafka.brokers")?;
    crate::transport::kafka::producer::delete_topic(&brokers, &k.client_properties()?, topic).await
}

/// Drops a replication slot if it exists, ending a walsender that still
/// holds it (a killed runner's can linger until the server notices).
/// Returns whether a slot was dropped.
pub async fn drop_slot(client: &tokio_postgres::Client, slot: &str) -> Result<bool> {
    for _ in 0..100 {
        let active: Option<Option<i32>> = client
            .query_opt(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(Error::db("look up slot"))?
            .map(|r| r.get(0));
        match active {
            None => return Ok(false),
            Some(None) => {
                match client
                    .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                    .await
                {
                    Ok(_) => return Ok(true),
                    // Taken again in between (55006 object_in_use): retry.
                    Err(e) if e.code().map(|c| c.code()) == Some("55006") => {}
                    Err(e) => return Err(Error::db("drop slot")(e)),
                }
            }
            Some(Some(pid)) => {
                client
                    .execute("SELECT pg_terminate_backend($1)", &[&pid])
                    .await
                    .map_err(Error::db("stop walsender"))?;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(Error::State(format!(
        "replication slot {slot} stayed in use; drop it by hand"
    )))
}

/// The pipeline file a stored pipeline was started from.
pub async fn pipeline_file(dsn: &str, name: &str) -> Result<std::path::PathBuf> {
    let client = connect(dsn, "control").await?;
    if !state::schema_exists(&client).await? {
        return Err(Error::Config {
            reason: format!("no pipeline named {name}"),
        });
    }
    let row = client
        .query_opt(
            "SELECT file FROM rowshift.pipelines WHERE name = $1",
            &[&name],
        )
        .await
        .map_err(Error::db("look up pipeline file"))?
        .ok_or_else(|| Error::Config {
            reason: format!("no pipeline named {name}"),
        })?;
    Ok(std::path::PathBuf::from(row.get::<_, String>(0)))
}
