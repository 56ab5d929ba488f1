//! The `rowshift` schema and its upgrades. Each step runs once, in order,
//! recorded in `rowshift.schema_version`, under a transaction-level advisory
//! lock so two processes starting at once do not race.

use crate::error::{Error, Result};
use tokio_postgres::Client;

const STEPS: &[&str] = &[
    // 1: initial layout
    "CREATE TABLE rowshift.pipelines (
        name text PRIMARY KEY,
        spec_hash text NOT NULL,
        file text NOT NULL,
        source_table text NOT NULL,
        target_table text NOT NULL,
        phase text NOT NULL,
        desired text NOT NULL DEFAULT 'run',
        failure text,
        hint text,
        created_target bool NOT NULL DEFAULT false,
        created_publication bool NOT NULL DEFAULT false,
        created_slot bool NOT NULL DEFAULT false,
        ranges_planned bool NOT NULL DEFAULT false,
        applied_lsn pg_lsn,
        applied_at timestamptz,
        events_applied int8 NOT NULL DEFAULT 0,
        lag_ms int8,
        rows_estimated int8,
        throttled text,
        owner text,
        owner_since timestamptz,
        runner_seen_at timestamptz,
        backfill_started_at timestamptz,
        backfill_finished_at timestamptz,
        caught_up_at timestamptz,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
     );
     CREATE TABLE rowshift.backfill_ranges (
        pipeline text NOT NULL REFERENCES rowshift.pipelines(name) ON DELETE CASCADE,
        range_no int4 NOT NULL,
        lo text[],
        hi text[],
        cursor text[],
        done bool NOT NULL DEFAULT false,
        rows_copied int8 NOT NULL DEFAULT 0,
        chunks_done int8 NOT NULL DEFAULT 0,
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (pipeline, range_no)
     );
     CREATE TABLE rowshift.audit_log (
        id bigserial PRIMARY KEY,
        pipeline text NOT NULL,
        at timestamptz NOT NULL DEFAULT now(),
        event text NOT NULL,
        detail text NOT NULL DEFAULT ''
     );",
    // 2: the fencing epoch (see state::bump_epoch)
    "ALTER TABLE rowshift.pipelines ADD COLUMN epoch int8 NOT NULL DEFAULT 0;",
    // 3: verification, repairs, cut-over and the reverse stream
    "ALTER TABLE rowshift.pipelines
        ADD COLUMN direction text NOT NULL DEFAULT 'forward',
        ADD COLUMN start_lsn pg_lsn,
        ADD COLUMN rev_applied_lsn pg_lsn,
        ADD COLUMN cut_over_at timestamptz;
     CREATE TABLE rowshift.verifications (
        id bigserial PRIMARY KEY,
        pipeline text NOT NULL REFERENCES rowshift.pipelines(name) ON DELETE CASCADE,
        started_at timestamptz NOT NULL DEFAULT now(),
        finished_at timestamptz,
        chunks int8 NOT NULL DEFAULT 0,
        rows_source int8 NOT NULL DEFAULT 0,
        rows_target int8 NOT NULL DEFAULT 0,
        rechecked int8 NOT NULL DEFAULT 0,
        mismatches int8 NOT NULL DEFAULT 0,
        repaired int8 NOT NULL DEFAULT 0,
        duration_ms int8,
        rows_per_s float8,
        mismatched_ranges text NOT NULL DEFAULT ''
     );
     CREATE TABLE rowshift.repairs (
        id bigserial PRIMARY KEY,
        pipeline text NOT NULL REFERENCES rowshift.pipelines(name) ON DELETE CASCADE,
        lo text[],
        hi text[],
        requested_at timestamptz NOT NULL DEFAULT now(),
        done_at timestamptz,
        rows_deleted int8,
        rows_written int8
     );
     CREATE TABLE rowshift.cutovers (
        id bigserial PRIMARY KEY,
        pipeline text NOT NULL REFERENCES rowshift.pipelines(name) ON DELETE CASCADE,
        kind text NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now(),
        finished_at timestamptz,
        outcome text NOT NULL DEFAULT 'running',
        attempts int4 NOT NULL DEFAULT 0,
        blockers text NOT NULL DEFAULT '',
        pause_ms float8,
        fence_lsn pg_lsn,
        swap_lsn pg_lsn,
        to_validate text[] NOT NULL DEFAULT '{}'
     );",
    // 4: the kafka transport: per-partition positions (applied: by the
    // appliers, with each batch; produced: by the producer) and the
    // incarnation that tells this pipeline's records from a previous one's
    // in a reused topic
    "ALTER TABLE rowshift.pipelines ADD COLUMN incarnation text NOT NULL \
        DEFAULT md5(random()::text || clock_timestamp()::text);
     CREATE TABLE rowshift.kafka_applied (
        pipeline text NOT NULL REFERENCES rowshift.pipelines(name) ON DELETE CASCADE,
        part int4 NOT NULL,
        next_offset int8 NOT NULL DEFAULT 0,
        events int8 NOT NULL DEFAULT 0,
        lag_ms int8,
        applied_at timestamptz,
        applier text,
        PRIMARY KEY (pipeline, part)
     );
     CREATE TABLE rowshift.kafka_produced (
        pipeline text NOT NULL REFERENCES rowshift.pipelines(name) ON DELETE CASCADE,
        part int4 NOT NULL,
        next_offset int8 NOT NULL DEFAULT 0,
        produced_at timestamptz,
        PRIMARY KEY (pipeline, part)
     );",
    // 5: a broker that lost acknowledged records: the partitions' rewinds
    // (appliers seek back to the position), and why a repair was queued
    "ALTER TABLE rowshift.kafka_applied ADD COLUMN rewinds int8 NOT NULL DEFAULT 0;
     ALTER TABLE rowshift.repairs ADD COLUMN reason text NOT NULL DEFAULT 'verify';",
    // 6: the kafka topic rowshift created for the pipeline (abort deletes it)
    "ALTER TABLE rowshift.pipelines ADD COLUMN created_topic text;",
    // 7: the target's indexes and index-backed constraints, dropped when
    // the target was created and built again after the copy, in `seq`
    // order (each row is deleted with its build)
    "CREATE TABLE rowshift.deferred_indexes (
        pipeline text NOT NULL REFERENCES rowshift.pipelines(name) ON DELETE CASCADE,
        seq int4 NOT NULL,
        name text NOT NULL,
        create_sql text NOT NULL,
        primary_key text[],
        PRIMARY KEY (pipeline, seq)
     );",
];

/// Creates or upgrades the schema. Two processes creating it at the same
/// moment can collide in the catalog; the loser retries once and then finds
/// the schema in place.
pub async fn ensure_schema(client: &mut Client) -> Result<()> {
    match try_ensure(client).await {
        Err(Error::Db { source, .. }) if source.code().map(|c| c.code()) == Some("23505") => {
            try_ensure(client).await
        }
        other => other,
    }
}

async fn try_ensure(client: &mut Client) -> Result<()> {
    let tx = client
        .transaction()
        .await
        .map_err(Error::db("begin schema upgrade"))?;
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(hashtext('rowshift:schema'));
         CREATE SCHEMA IF NOT EXISTS rowshift;
         CREATE TABLE IF NOT EXISTS rowshift.schema_version (version int4 NOT NULL);",
    )
    .await
    .map_err(Error::db("create rowshift schema"))?;
    let current: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM rowshift.schema_version",
            &[],
        )
        .await
        .map_err(Error::db("read schema version"))?
        .get(0);
    for (i, step) in STEPS.iter().enumerate().skip(current as usize) {
        tx.batch_execute(step)
            .await
            .map_err(Error::db(format!("upgrade rowshift schema to {}", i + 1)))?;
        tx.execute(
            "INSERT INTO rowshift.schema_version VALUES ($1)",
            &[&(i as i32 + 1)],
        )
        .await
        .map_err(Error::db("record schema version"))?;
    }
    tx.commit()
        .await
        .map_err(Error::db("commit schema upgrade"))
}
