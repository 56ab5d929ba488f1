//! Pipeline state, stored in a `rowshift` schema of the source database (no
//! extra infrastructure). rowshift creates and upgrades the schema itself.
//!
//! Persisted: the pipeline row (phase, what rowshift created, the applied
//! position, counters, the operator's wish: run / pause / abort), one row per
//! backfill key range with its cursor, and an audit log. In memory only: the
//! stream's received position, batches in flight, throttle decisions.
//!
//! Checkpoints are written in the *same transaction* as the target writes
//! they describe (the target lives in the same database), so "chunk copied"
//! and "cursor advanced" can never disagree after a crash.
//!
//! The lease is a session-level advisory lock held by the running process:
//! a second process gets a one-line refusal, and a killed process loses the
//! lock with its connection.

pub mod kafka;
mod schema;

use crate::backfill::indexes::Expand;
use crate::error::{Error, Result};
use crate::model::{Checkpoint, Key, Lsn};
use tokio_postgres::Client;

pub use schema::ensure_schema;

/// Phases of a pipeline (see DESIGN.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Planned,
    Expanding,
    Backfilling,
    CaughtUp,
    Verified,
    CuttingOver,
    CutOver,
    RollingBack,
    RolledBack,
    Contracting,
    Contracted,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Planned => "planned",
            Phase::Expanding => "expanding",
            Phase::Backfilling => "backfilling",
            Phase::CaughtUp => "caught_up",
            Phase::Verified => "verified",
            Phase::CuttingOver => "cutting_over",
            Phase::CutOver => "cut_over",
            Phase::RollingBack => "rolling_back",
            Phase::RolledBack => "rolled_back",
            Phase::Contracting => "contracting",
            Phase::Contracted => "contracted",
            Phase::Failed => "failed",
        }
    }
}

/// What the operator asked for (`rowshift pause|resume|abort`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Desired {
    Run,
    Pause,
    Abort,
}

/// The stored pipeline row.
#[derive(Debug, Clone)]
pub struct PipelineRecord {
    pub name: String,
    pub spec_hash: String,
    pub source_table: String,
    pub target_table: String,
    pub phase: String,
    pub desired: Desired,
    pub created_target: bool,
    pub created_publication: bool,
    pub created_slot: bool,
    pub ranges_planned: bool,
    pub applied_lsn: Option<Lsn>,
    /// `forward` (old table live, new table kept current) or `reverse`
    /// (after cut-over: new table live, old table kept current).
    pub direction: String,
    /// Where the active direction's stream starts (set at each swap).
    pub start_lsn: Option<Lsn>,
    pub rev_applied_lsn: Option<Lsn>,
    /// The kafka topic rowshift created for this pipeline, if it did.
    pub created_topic: Option<String>,
}

impl PipelineRecord {
    pub fn reverse(&self) -> bool {
        self.direction == "reverse"
    }
}

/// One key range of the backfill: keys in `(lo, hi]`, copied up to `cursor`.
#[derive(Debug, Clone, PartialEq)]
pub struct RangeRecord {
    pub range_no: i32,
    pub lo: Option<Key>,
    pub hi: Option<Key>,
    pub cursor: Option<Key>,
    pub done: bool,
    pub rows_copied: i64,
    pub chunks_done: i64,
}

pub fn key_to_array(key: &Option<Key>) -> Option<Vec<Option<String>>> {
    key.as_ref().map(|k| k.0.clone())
}

fn array_to_key(a: Option<Vec<Option<String>>>) -> Option<Key> {
    a.map(Key)
}

pub async fn schema_exists(client: &Client) -> Result<bool> {
    let r = client
        .query_one("SELECT to_regclass('rowshift.pipelines') IS NOT NULL", &[])
        .await
        .map_err(Error::db("look for the rowshift schema"))?;
    Ok(r.get(0))
}

pub async fn load(client: &Client, name: &str) -> Result<Option<PipelineRecord>> {
    if !schema_exists(client).await? {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT name, spec_hash, source_table, target_table, phase, desired, created_target, \
                    created_publication, created_slot, ranges_planned, applied_lsn::text, \
                    direction, start_lsn::text, rev_applied_lsn::text, created_topic \
             FROM rowshift.pipelines WHERE name = $1",
            &[&name],
        )
        .await
        .map_err(Error::db("load pipeline state"))?;
    Ok(row.map(|r| PipelineRecord {
        name: r.get(0),
        spec_hash: r.get(1),
        source_table: r.get(2),
        target_table: r.get(3),
        phase: r.get(4),
        desired: match r.get::<_, String>(5).as_str() {
            "pause" => Desired::Pause,
            "abort" => Desired::Abort,
            _ => Desired::Run,
        },
        created_target: r.get(6),
        created_publication: r.get(7),
        created_slot: r.get(8),
        ranges_planned: r.get(9),
        applied_lsn: r.get::<_, Option<String>>(10).and_then(|s| Lsn::parse(&s)),
        direction: r.get(11),
        start_lsn: r.get::<_, Option<String>>(12).and_then(|s| Lsn::parse(&s)),
        rev_applied_lsn: r.get::<_, Option<String>>(13).and_then(|s| Lsn::parse(&s)),
        created_topic: r.get(14),
    }))
}

pub async fn register(
    client: &Client,
    name: &str,
    spec_hash: &str,
    source: &str,
    target: &str,
    file: &str,
) -> Result<()> {
    client
        .execute(
            "INSERT INTO rowshift.pipelines (name, spec_hash, source_table, target_table, file, phase) \
             VALUES ($1, $2, $3, $4, $5, 'planned') ON CONFLICT (name) DO NOTHING",
            &[&name, &spec_hash, &source, &target, &file],
        )
        .await
        .map_err(Error::db("register pipeline"))?;
    audit(client, name, "registered", "").await
}

pub async fn set_phase(
    client: &Client,
    name: &str,
    phase: Phase,
    failure: Option<(&str, &str)>,
) -> Result<()> {
    let (reason, hint) = failure.unzip();
    client
        .execute(
            "UPDATE rowshift.pipelines SET phase = $2, failure = $3, hint = $4, updated_at = now(), \
                    backfill_started_at = CASE WHEN $2 = 'backfilling' THEN coalesce(backfill_started_at, now()) ELSE backfill_started_at END, \
                    caught_up_at = CASE WHEN $2 = 'caught_up' THEN coalesce(caught_up_at, now()) ELSE caught_up_at END \
             WHERE name = $1",
            &[&name, &phase.as_str(), &reason, &hint],
        )
        .await
        .map_err(Error::db("set phase"))?;
    audit(
        client,
        name,
        &format!("phase {}", phase.as_str()),
        reason.unwrap_or(""),
    )
    .await
}

/// Records a failure of the runner. The phase becomes `failed` only while
/// the old table is live and no swap or contract is under way: those phases
/// say which table carries the live name and must survive a failed run.
pub async fn record_failure(client: &Client, name: &str, reason: &str, hint: &str) -> Result<()> {
    client
        .execute(
            "UPDATE rowshift.pipelines SET failure = $2, hint = $3, updated_at = now(), \
             phase = CASE WHEN direction = 'forward' AND phase NOT IN ('cutting_over', 'contracting', 'contracted') \
                          THEN 'failed' ELSE phase END WHERE name = $1",
            &[&name, &reason, &hint],
        )
        .await
        .map_err(Error::db("record failure"))?;
    audit(client, name, "failed", reason).await
}

fn created_column(what: &str) -> Result<&'static str> {
    Ok(match what {
        "target" => "created_target",
        "publication" => "created_publication",
        "slot" => "created_slot",
        "ranges" => "ranges_planned",
        other => return Err(Error::State(format!("unknown created object {other}"))),
    })
}

/// Marks one of the objects rowshift created: `target`, `publication`, `slot`, `ranges`.
pub async fn mark_created(client: &Client, name: &str, what: &str) -> Result<()> {
    let column = created_column(what)?;
    client
        .execute(
            &format!(
                "UPDATE rowshift.pipelines SET {column} = true, updated_at = now() WHERE name = $1"
            ),
            &[&name],
        )
        .await
        .map_err(Error::db("record created object"))?;
    audit(client, name, &format!("created {what}"), "").await
}

/// Runs `statements` (DDL) and records `what` as created, in one transaction:
/// after a crash either both happened or neither did.
pub async fn create_recorded(
    client: &mut Client,
    name: &str,
    what: &str,
    statements: &[String],
    defer_indexes_of: Option<&crate::spec::TableName>,
) -> Result<()> {
    let column = created_column(what)?;
    let tx = client
        .transaction()
        .await
        .map_err(Error::db(format!("begin create {what}")))?;
    for stmt in statements {
        tx.batch_execute(stmt)
            .await
            .map_err(Error::db(format!("create {what}")))?;
    }
    let mut detail = String::new();
    if let Some(target) = defer_indexes_of {
        detail = match crate::backfill::indexes::defer(&tx, name, target).await? {
            Expand::Deferred(names) if names.is_empty() => String::new(),
            Expand::Deferred(names) => {
                tracing::info!(pipeline = name, indexes = %names.join(", "), "the target's indexes are built after the copy");
                format!("indexes built after the copy: {}", names.join(", "))
            }
            Expand::Kept(reason) => {
                tracing::info!(pipeline = name, reason = %reason, "the target keeps its indexes during the copy");
                format!("indexes kept during the copy: {reason}")
            }
        };
    }
    tx.execute(
        &format!(
            "UPDATE rowshift.pipelines SET {column} = true, updated_at = now() WHERE name = $1"
        ),
        &[&name],
    )
    .await
    .map_err(Error::db(format!("record {what}")))?;
    tx.commit()
        .await
        .map_err(Error::db(format!("commit create {what}")))?;
    audit(client, name, &format!("created {what}"), &detail).await
}

pub async fn set_desired(client: &Client, name: &str, desired: Desired) -> Result<bool> {
    let text = match desired {
        Desired::Run => "run",
        Desired::Pause => "pause",
        Desired::Abort => "abort",
    };
    let n = client
        .execute(
            "UPDATE rowshift.pipelines SET desired = $2, updated_at = now() WHERE name = $1",
            &[&name, &text],
        )
        .await
        .map_err(Error::db("set desired state"))?;
    if n > 0 {
        audit(client, name, &format!("operator: {text}"), "").await?;
    }
    Ok(n > 0)
}

pub async fn audit(client: &Client, name: &str, event: &str, detail: &str) -> Result<()> {
    client
        .execute(
            "INSERT INTO rowshift.audit_log (pipeline, event, detail) VALUES ($1, $2, $3)",
            &[&name, &event, &detail],
        )
        .await
        .map_err(Error::db("write audit log"))?;
    Ok(())
}

pub async fn save_ranges(client: &mut Client, name: &str, ranges: &[RangeRecord]) -> Result<()> {
    let tx = client
        .transaction()
        .await
        .map_err(Error::db("begin ranges"))?;
    for r in ranges {
        tx.execute(
            "INSERT INTO rowshift.backfill_ranges (pipeline, range_no, lo, hi) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (pipeline, range_no) DO NOTHING",
            &[&name, &r.range_no, &key_to_array(&r.lo), &key_to_array(&r.hi)],
        )
        .await
        .map_err(Error::db("save ranges"))?;
    }
    tx.execute(
        "UPDATE rowshift.pipelines SET ranges_planned = true WHERE name = $1",
        &[&name],
    )
    .await
    .map_err(Error::db("save ranges"))?;
    tx.commit().await.map_err(Error::db("commit ranges"))
}

pub async fn load_ranges(client: &Client, name: &str) -> Result<Vec<RangeRecord>> {
    Ok(client
        .query(
            "SELECT range_no, lo, hi, cursor, done, rows_copied, chunks_done FROM rowshift.backfill_ranges \
             WHERE pipeline = $1 ORDER BY range_no",
            &[&name],
        )
        .await
        .map_err(Error::db("load ranges"))?
        .iter()
        .map(|r| RangeRecord {
            range_no: r.get(0),
            lo: array_to_key(r.get(1)),
            hi: array_to_key(r.get(2)),
            cursor: array_to_key(r.get(3)),
            done: r.get(4),
            rows_copied: r.get(5),
            chunks_done: r.get(6),
        })
        .collect())
}

/// The checkpoint of one copied chunk: the copy's row count is bound last.
pub fn chunk_checkpoint(
    name: &str,
    epoch: i64,
    range_no: i32,
    cursor: &Option<Key>,
    done: bool,
) -> Checkpoint {
    let width = cursor.as_ref().map(|k| k.0.len()).unwrap_or(0);
    let cursor_sql = match cursor {
        None => "cursor".to_string(),
        Some(_) => {
            let ps: Vec<String> = (0..width).map(|i| format!("${}::text", i + 5)).collect();
            format!("ARRAY[{}]::text[]", ps.join(", "))
        }
    };
    let mut params = vec![
        Some(name.to_string()),
        Some(range_no.to_string()),
        Some(done.to_string()),
        Some(epoch.to_string()),
    ];
    if let Some(k) = cursor {
        params.extend(k.0.iter().cloned());
    }
    let count_param = params.len() + 1;
    Checkpoint {
        // FOR SHARE: parallel chunks do not block each other, but a newer
        // process's epoch bump waits for this transaction (see `bump_epoch`).
        sql: format!(
            "UPDATE rowshift.backfill_ranges SET cursor = {cursor_sql}, done = $3::text::bool, \
             rows_copied = rows_copied + ${count_param}::text::int8, chunks_done = chunks_done + 1, updated_at = now() \
             WHERE pipeline = $1::text AND range_no = $2::text::int4 \
               AND (SELECT epoch FROM rowshift.pipelines WHERE name = $1::text FOR SHARE) = $4::text::int8"
        ),
        params,
        fenced: true,
    }
}

/// The check that ends each part of a batch applied in parallel: the
/// pipeline row still carries this process's epoch (held `FOR SHARE` until
/// commit, so a newer process's bump waits for the part).
pub fn fence_checkpoint(name: &str, epoch: i64) -> Checkpoint {
    Checkpoint {
        sql: "SELECT 1 FROM rowshift.pipelines WHERE name = $1::text AND epoch = $2::text::int8 FOR SHARE".to_string(),
        params: vec![Some(name.to_string()), Some(epoch.to_string())],
        fenced: true,
    }
}

/// The checkpoint of one applied batch.
/// It also checks that the batch's direction is still the active one: after
/// a swap, the stream that was just switched off can write nothing more.
pub fn apply_checkpoint(
    name: &str,
    epoch: i64,
    reverse: bool,
    ack: Option<Lsn>,
    events: usize,
    lag_ms: Option<i64>,
) -> Checkpoint {
    let (column, direction) = if reverse {
        ("rev_applied_lsn", "reverse")
    } else {
        ("applied_lsn", "forward")
    };
    Checkpoint {
        sql: format!(
            "UPDATE rowshift.pipelines SET \
              {column} = CASE WHEN $2::text IS NULL THEN {column} ELSE greatest(coalesce({column}, '0/0'), $2::text::pg_lsn) END, \
              applied_at = now(), events_applied = events_applied + $3::text::int8, \
              lag_ms = coalesce($4::text::int8, lag_ms) WHERE name = $1::text AND epoch = $5::text::int8 \
              AND direction = '{direction}'"
        ),
        params: vec![
            Some(name.to_string()),
            ack.map(|l| l.to_string()),
            Some(events.to_string()),
            lag_ms.map(|l| l.to_string()),
            Some(epoch.to_string()),
        ],
        fenced: true,
    }
}

/// Fences out every earlier process: increments the pipeline's epoch and
/// returns the new one. Every write transaction rowshift makes checks, in
/// its checkpoint, the epoch it started under, and rolls back when it has
/// changed; and this UPDATE waits for any such transaction still holding
/// the pipeline row. So when it returns, no write of an earlier (killed)
/// process can still commit — without it, a transaction whose COMMIT was in
/// flight when its process died could land after this process had already
/// applied newer changes to the same rows.
pub async fn bump_epoch(client: &Client, name: &str) -> Result<i64> {
    let row = client
        .query_one(
            "UPDATE rowshift.pipelines SET epoch = epoch + 1 WHERE name = $1 RETURNING epoch",
            &[&name],
        )
        .await
        .map_err(Error::db("fence earlier processes"))?;
    Ok(row.get(0))
}

/// Takes the pipeline's lease on `client` (held until the connection closes).
pub async fn acquire_lease(client: &Client, name: &str) -> Result<()> {
    let got: bool = client
        .query_one(
            "SELECT pg_try_advisory_lock(hashtext('rowshift:pipeline:' || $1))",
            &[&name],
        )
        .await
        .map_err(Error::db("take lease"))?
        .get(0);
    if !got {
        let owner = client
            .query_opt(
                "SELECT coalesce(owner, '?') FROM rowshift.pipelines WHERE name = $1",
                &[&name],
            )
            .await
            .ok()
            .flatten()
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_else(|| "another process".into());
        return Err(Error::State(format!(
            "pipeline {name} is already being run by {owner}; only one process may run it"
        )));
    }
    let me = format!("pid {} on {}", std::process::id(), hostname());
    client
        .execute(
            "UPDATE rowshift.pipelines SET owner = $2, owner_since = now() WHERE name = $1",
            &[&name, &me],
        )
        .await
        .map_err(Error::db("record lease owner"))?;
    Ok(())
}

/// Whether some process holds the pipeline's lease right now.
pub async fn lease_held(client: &Client, name: &str) -> Result<bool> {
    let r = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
               AND objid = (hashtext('rowshift:pipeline:' || $1)::int8 & 4294967295)::oid AND database = \
               (SELECT oid FROM pg_database WHERE datname = current_database()))",
            &[&name],
        )
        .await
        .map_err(Error::db("check lease"))?;
    Ok(r.get(0))
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

pub async fn delete_pipeline(client: &Client, name: &str) -> Result<()> {
    client
        .execute("DELETE FROM rowshift.pipelines WHERE name = $1", &[&name])
        .await
        .map_err(Error::db("delete pipeline state"))?;
    audit(client, name, "aborted", "state removed").await
}
