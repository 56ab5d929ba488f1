//! `rowshift plan`: validate, preflight, and print every step with its SQL.
//! Changes nothing (the preflight's dry run is rolled back).

use crate::cutover::reverse::{reverse_mapping, Reverse};
use crate::error::{Error, Result};
use crate::preflight::{self, Checked};
use crate::runtime::{publication_sql, slot_sql};
use crate::sink::postgres::sql;
use crate::source::postgres::connect;
use crate::spec::Pipeline;
use crate::state;
use std::fmt::Write;

pub async fn plan(p: &Pipeline) -> Result<String> {
    let dsn = p.source_dsn()?;
    let mut client = connect(&dsn, "plan").await?;
    let record = state::load(&client, &p.name).await?;
    let checked = preflight::check(&mut client, p, record.as_ref()).await?;
    let reverse = rollback_plan(&mut client, p, record.as_ref()).await?;
    let mut out = render(p, &checked, record.is_some());
    render_swap(&mut out, p, &reverse);
    Ok(out)
}

/// Whether a rollback will be possible, found in a transaction that creates
/// the new table (if it does not exist yet) and is rolled back.
async fn rollback_plan(
    client: &mut tokio_postgres::Client,
    p: &Pipeline,
    record: Option<&state::PipelineRecord>,
) -> Result<Reverse> {
    let reverse_now = record.is_some_and(|r| r.reverse());
    let (new, old) = crate::cutover::new_and_old(p, reverse_now);
    let tx = client
        .transaction()
        .await
        .map_err(Error::db("begin plan"))?;
    let exists: bool = tx
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&new.quoted()])
        .await
        .map_err(Error::db("plan"))?
        .get(0);
    if !exists {
        for stmt in &p.target_ddl {
            tx.batch_execute(stmt)
                .await
                .map_err(Error::db("plan: dry-run DDL"))?;
        }
    }
    let reverse = reverse_mapping(&tx, p, &new, &old).await?;
    tx.rollback().await.map_err(Error::db("roll back plan"))?;
    Ok(reverse)
}

fn render_swap(out: &mut String, p: &Pipeline, reverse: &Reverse) {
    let c = &p.cutover;
    let _ = writeln!(
        out,
        "8. verify: counts and checksums of {} keys per chunk on both sides, {} worker(s), differing chunks re-read up to {} times after the stream passes them",
        p.verify.chunk_rows, p.verify.workers, p.verify.rechecks
    );
    let _ = writeln!(
        out,
        "9. cutover: gate (lag < {} ms, clean verification younger than {} s); LOCK TABLE {} IN ACCESS EXCLUSIVE MODE \
         (lock_timeout {} ms, {} attempts, backoff up to {} ms); fence; drain; in one transaction rename {} -> {} and {} -> {}, \
         sequences, views, referencing foreign keys (NOT VALID, validated after), grants{}; reverse stream on",
        c.max_lag_ms,
        c.verify_max_age_s,
        p.source_table,
        c.lock_timeout_ms,
        c.lock_attempts,
        c.backoff_max_ms,
        p.source_table,
        c.old_table,
        p.target_table,
        p.source_table,
        if c.carry_triggers.is_empty() {
            String::new()
        } else {
            format!(", triggers {}", c.carry_triggers.join(", "))
        }
    );
    match reverse {
        Reverse::Ready {
            mapping,
            not_carried,
        } => {
            let _ = writeln!(
                out,
                "10. rollback: possible; the reverse stream writes the old table as:"
            );
            for t in &mapping.target_columns {
                let _ = writeln!(out, "     {} <- {}", t.name, t.expr);
            }
            if !not_carried.is_empty() {
                let _ = writeln!(
                    out,
                    "     not carried back (dropped; rows written after cut-over get the default): {}",
                    not_carried.join(", ")
                );
            }
        }
        Reverse::Refused(reasons) => {
            let _ = writeln!(out, "10. rollback: REFUSED after cut-over:");
            for r in reasons {
                let _ = writeln!(out, "     - {r}");
            }
        }
    }
    let _ = writeln!(
        out,
        "11. contract: after {} s (or --confirm): drop {}, the slots and the publications",
        c.reverse_window_s, c.old_table
    );
}

fn render(p: &Pipeline, c: &Checked, resuming: bool) -> String {
    let m = &c.mapping;
    let mut out = String::new();
    let _ = writeln!(out, "pipeline {} ({})", p.name, p.file.display());
    let _ = writeln!(
        out,
        "source   {}: ~{} rows, primary key ({}), replica identity {}",
        p.source_table,
        c.source.estimated_rows,
        c.source.primary_key.join(", "),
        match c.source.replica_identity.as_str() {
            "d" => "default",
            "f" => "full",
            "i" => "index",
            _ => "nothing",
        }
    );
    let _ = writeln!(out, "target   {}", p.target_table);
    let _ = writeln!(
        out,
        "preflight: ok (wal_level logical, privileges, types, names, DDL and mapping dry-run)"
    );
    if resuming {
        let _ = writeln!(
            out,
            "state: this pipeline has run before; `run` resumes it from stored state"
        );
    }
    if !c.notes.is_empty() {
        let _ = writeln!(out, "\nfound on the source:");
        for n in &c.notes {
            let _ = writeln!(out, "  - {n}");
        }
    }
    let _ = writeln!(out, "\nmapping:");
    for t in &m.target_columns {
        let _ = writeln!(out, "  {} {} <- {}", t.name, t.sql_type, t.expr);
    }
    if !p.dropped.is_empty() {
        let _ = writeln!(out, "  dropped: {}", p.dropped.join(", "));
    }
    let _ = writeln!(out, "\nsteps:");
    let _ = writeln!(
        out,
        "1. state: create schema rowshift if absent, register {}, take its lease",
        p.name
    );
    let _ = writeln!(out, "2. expand (one transaction):");
    for s in &p.target_ddl {
        let _ = writeln!(out, "     {};", s.trim().trim_end_matches(';'));
    }
    if p.backfill.defer_indexes {
        let _ = writeln!(
            out,
            "     then record the target's indexes and index-backed constraints in rowshift.deferred_indexes and drop them (built again after the copy; kept for a partitioned target, an index replica identity or a referenced target)"
        );
    }
    let _ = writeln!(out, "3. publication:\n     {};", publication_sql(p));
    let _ = writeln!(
        out,
        "4. replication slot (before any row is read):\n     {};",
        slot_sql(p)
    );
    let b = &p.backfill;
    let _ = writeln!(
        out,
        "5. backfill: {} worker(s) over key ranges, chunks of {} rows{}{}, each chunk and its checkpoint in one transaction:\n     {};",
        b.workers,
        b.chunk_rows,
        b.target_chunk_ms.map(|t| format!(" (adapting to ~{t} ms)")).unwrap_or_default(),
        b.rate_limit_rows_per_s.map(|r| format!(", at most {r} rows/s")).unwrap_or_default(),
        sql::copy_range(m, &p.source_table, &p.target_table, true, true, !b.defer_indexes)
    );
    if b.defer_indexes {
        let _ = writeln!(
            out,
            "   changes wait (in order, unacknowledged) until the copy ends or {} of them wait; then each deferred index is built in a transaction with its record's deletion, and the changes that waited are applied first",
            b.hold_changes
        );
    }
    let _ = writeln!(out, "6. stream (from the slot, batched, session_replication_role = replica, one transaction per batch):");
    let binds = crate::sink::postgres::typed::binds(m);
    let key_binds: Vec<_> = m.source_key.iter().map(|&i| binds[i]).collect();
    if let Some(update) = sql::update_rows(m, &p.target_table, &binds) {
        let _ = writeln!(out, "   update (rows the target has): {update};");
    }
    let _ = writeln!(
        out,
        "   insert (rows the target lacks): {};",
        sql::insert_missing(m, &p.target_table, &binds)
    );
    let _ = writeln!(
        out,
        "   delete: {};",
        sql::delete(m, &p.target_table, &key_binds)
    );
    let _ = writeln!(
        out,
        "   refetch (partial updates of rows not yet copied): {};",
        sql::refetch(m, &p.source_table, &p.target_table)
    );
    let _ = writeln!(out, "7. caught up: the stream passed a heartbeat written after the last chunk; streaming continues until stopped");
    out
}
