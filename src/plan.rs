//! `rowshift plan`: validate, preflight, and print every step with its SQL.
//! Changes nothing (the preflight's dry run is rolled back).

use crate::error::Result;
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
    Ok(render(p, &checked, record.is_some()))
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
        sql::copy_range(m, &p.source_table, &p.target_table, true, true)
    );
    let _ = writeln!(out, "6. stream (from the slot, batched, session_replication_role = replica, one transaction per batch):");
    let _ = writeln!(out, "   upsert: {};", sql::upsert(m, &p.target_table));
    let _ = writeln!(out, "   delete: {};", sql::delete(m, &p.target_table));
    let _ = writeln!(
        out,
        "   refetch (partial updates of rows not yet copied): {};",
        sql::refetch(m, &p.source_table, &p.target_table)
    );
    let _ = writeln!(out, "7. caught up: the stream passed a heartbeat written after the last chunk; streaming continues until stopped");
    out
}
