//! The runtime: takes a pipeline through expand → backfill (+ stream) →
//! caught up, resuming from stored state after any stop.
//!
//! Order of a run, each step idempotent and recorded before the next:
//! preflight (read-only) → state schema → lease → expand (DDL and its
//! record in one transaction) → publication → slot (before any chunk is
//! read) → key ranges → stream + backfill loop.
//!
//! Shutdown order: stop the loop (no new chunk, no new batch), drop the
//! reader (its last feedback already carries the last durable position); the
//! stored state already describes everything that committed.

mod apply_loop;
pub mod control;
pub mod early;
mod held;
pub mod kafka_apply;
mod kafka_chunks;
mod kafka_produce;
pub mod kafka_schema;
mod kafka_watch;
mod progress;

pub use apply_loop::Stream;

use crate::backfill::{plan_ranges, Backfill, Settings};
use crate::cutover::reverse::{reverse_mapping, Reverse};
use crate::error::{Error, Result};
use crate::preflight::{self, spec_hash, Checked};
use crate::sink::postgres::{PgSink, Role};
use crate::source::postgres::connect;
use crate::spec::{quote_literal, Pipeline};
use crate::state::{self, Desired, Phase, PipelineRecord};
use control::drop_slot;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

pub use apply_loop::heartbeat_prefix;

/// How `rowshift run` behaves.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Return once the pipeline is caught up (demo, tests, scripts).
    pub exit_when_caught_up: bool,
    /// Draw a progress line on the terminal.
    pub progress: bool,
}

/// Runs a pipeline until it is stopped (or caught up, with the option).
///
/// The process runs whichever stream is active: forward (old table live,
/// new table kept current, with the backfill) or, after a cut-over, reverse
/// (new table live, old table kept current for a rollback). When a swap
/// changes the direction, the running stream ends and the other starts.
pub async fn run(p: &Pipeline, opts: &RunOptions, cancel: CancellationToken) -> Result<()> {
    let dsn = p.source_dsn()?;
    let mut control = connect(&dsn, "control").await?;
    let record = state::load(&control, &p.name).await?;
    if let Some(r) = &record {
        if r.spec_hash != spec_hash(p) {
            return Err(Error::State(format!(
                "the pipeline file {} changed (tables, DDL or mapping) since pipeline {} started; \
                 restore it, or `rowshift abort {}` and run again",
                p.file.display(),
                p.name,
                p.name
            )));
        }
        if r.desired == Desired::Abort {
            return Err(Error::Stopped(format!(
                "pipeline {} is being aborted",
                p.name
            )));
        }
        if finished(&r.phase) {
            return Err(Error::State(format!(
                "pipeline {} is {}; there is nothing left to run",
                p.name, r.phase
            )));
        }
    }
    let mut forward_mapping = None;
    if !record.as_ref().is_some_and(|r| r.reverse()) {
        let checked = preflight::check(&mut control, p, record.as_ref()).await?;
        tracing::info!(pipeline = %p.name, notes = checked.notes.len(), "preflight passed");
        forward_mapping = Some(checked);
    }
    state::ensure_schema(&mut control).await?;
    if record.is_none() {
        let file = std::fs::canonicalize(&p.file)
            .unwrap_or_else(|_| p.file.clone())
            .display()
            .to_string();
        state::register(
            &control,
            &p.name,
            &spec_hash(p),
            &p.source_table.to_string(),
            &p.target_table.to_string(),
            &file,
        )
        .await?;
    }
    state::acquire_lease(&control, &p.name).await?;
    let epoch = state::bump_epoch(&control, &p.name).await?;
    loop {
        let record = state::load(&control, &p.name)
            .await?
            .ok_or_else(|| Error::State("pipeline state vanished".into()))?;
        if finished(&record.phase) {
            tracing::info!(pipeline = %p.name, phase = %record.phase, "the pipeline is being contracted; stopping");
            return Ok(());
        }
        let exit = if record.reverse() {
            run_reverse(p, &dsn, &mut control, epoch, &record, opts, cancel.clone()).await
        } else {
            let checked = match forward_mapping.take() {
                Some(c) => c,
                None => preflight::check(&mut control, p, Some(&record)).await?,
            };
            let exit =
                run_forward(p, &dsn, &mut control, &checked, epoch, opts, cancel.clone()).await;
            forward_mapping = Some(checked);
            exit
        };
        let now = state::load(&control, &p.name).await?;
        let switched = now
            .as_ref()
            .is_some_and(|n| n.direction != record.direction || finished(&n.phase));
        match exit {
            Ok(Exit::Done) => return Ok(()),
            Ok(Exit::Switched) => {}
            // A checkpoint of the stream that was just switched off is refused.
            Err(Error::Stopped(_)) if switched && !cancel.is_cancelled() => {}
            Err(e) => return Err(e),
        }
        tracing::info!(pipeline = %p.name, "the active stream changed direction");
    }
}

fn finished(phase: &str) -> bool {
    matches!(phase, "contracting" | "contracted")
}

/// Why a stream stopped without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Caught up (with `exit_when_caught_up`), or contracted.
    Done,
    /// A swap changed the active direction.
    Switched,
}

/// The forward stream: expand, slot, backfill, stream into the new table.
async fn run_forward(
    p: &Pipeline,
    dsn: &str,
    control: &mut Client,
    checked: &Checked,
    epoch: i64,
    opts: &RunOptions,
    cancel: CancellationToken,
) -> Result<Exit> {
    let record = state::load(control, &p.name)
        .await?
        .ok_or_else(|| Error::State("pipeline state vanished".into()))?;
    prepare(control, p, &record).await?;
    if !matches!(record.phase.as_str(), "cutting_over") {
        drop_slot(control, &p.reverse_slot_name()).await?;
    }
    let record = state::load(control, &p.name)
        .await?
        .ok_or_else(|| Error::State("pipeline state vanished".into()))?;
    let dsn = dsn.to_string();
    let dsn = dsn.as_str();

    let mapping = Arc::new(checked.mapping.clone());
    if p.transport.kafka.is_some() {
        let schema = kafka_schema::table_schema(p, checked, control).await?;
        if !record.ranges_planned {
            store_estimate(control, p, checked).await?;
            kafka_chunks::plan_range(control, p, &mapping).await?;
        }
        let stream = Stream::forward(p, mapping, record.start_lsn);
        let control = connect(dsn, "control").await?;
        return kafka_produce::run(
            p, dsn, control, stream, schema, epoch, &record, opts, cancel,
        )
        .await;
    }
    if !record.ranges_planned {
        let mut sink = PgSink::for_pipeline(dsn, p, mapping.clone(), Role::Copy).await?;
        let estimate = store_estimate(control, p, checked).await?;
        let ranges = plan_ranges(&mut sink, p.backfill.workers, estimate).await?;
        state::save_ranges(control, &p.name, &ranges).await?;
    }
    let ranges = state::load_ranges(control, &p.name).await?;
    let mut sinks = Vec::new();
    for _ in 0..ranges
        .iter()
        .filter(|r| !r.done)
        .count()
        .min(p.backfill.workers as usize)
    {
        sinks.push(PgSink::for_pipeline(dsn, p, mapping.clone(), Role::Copy).await?);
    }
    let settings = Settings {
        chunk_rows: p.backfill.chunk_rows,
        target_chunk: p.backfill.target_chunk_ms.map(Duration::from_millis),
        rate_limit_rows_per_s: p.backfill.rate_limit_rows_per_s,
    };
    let backfill = Backfill::new(&p.name, epoch, ranges, sinks, settings);
    if !backfill.finished() && record.phase != Phase::Backfilling.as_str() {
        state::set_phase(control, &p.name, Phase::Backfilling, None).await?;
    }
    let stream = Stream::forward(p, mapping, record.start_lsn);
    let control = connect(dsn, "control").await?;
    apply_loop::run(
        p, dsn, control, stream, backfill, epoch, &record, opts, cancel,
    )
    .await
}

/// The reverse stream after a cut-over: new table (live) → old table.
async fn run_reverse(
    p: &Pipeline,
    dsn: &str,
    control: &mut Client,
    epoch: i64,
    record: &PipelineRecord,
    opts: &RunOptions,
    cancel: CancellationToken,
) -> Result<Exit> {
    if record.phase != "rolling_back" {
        drop_slot(control, &p.slot_name()).await?;
    }
    let old = p.cutover.old_table.clone();
    let mapping = match reverse_mapping(&*control, p, &p.source_table, &old).await? {
        Reverse::Ready { mapping, .. } => Arc::new(mapping),
        Reverse::Refused(reasons) => {
            tracing::warn!(pipeline = %p.name, reasons = %reasons.join("; "), "no reverse stream: the old table is not kept current and rollback is refused");
            return idle_until_switch(p, control, cancel).await;
        }
    };
    let stream = Stream {
        reverse: true,
        slot: p.reverse_slot_name(),
        publication: p.reverse_publication_name(),
        source: p.source_table.clone(),
        target: old,
        mapping,
        start_lsn: record.start_lsn,
    };
    let backfill = Backfill::new(
        &p.name,
        epoch,
        Vec::new(),
        Vec::new(),
        Settings {
            chunk_rows: 1,
            target_chunk: None,
            rate_limit_rows_per_s: None,
        },
    );
    let control = connect(dsn, "control").await?;
    apply_loop::run(
        p, dsn, control, stream, backfill, epoch, record, opts, cancel,
    )
    .await
}

/// Without a reverse stream there is nothing to apply: wait for contract.
async fn idle_until_switch(
    p: &Pipeline,
    control: &Client,
    cancel: CancellationToken,
) -> Result<Exit> {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Err(Error::Stopped("interrupted".into())),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let r = state::load(control, &p.name).await?;
        match r {
            Some(r) if r.reverse() && !finished(&r.phase) => {}
            _ => return Ok(Exit::Switched),
        }
    }
}

/// Expand, publication, slot: each created once and recorded.
async fn prepare(control: &mut Client, p: &Pipeline, record: &PipelineRecord) -> Result<()> {
    if !record.created_target {
        state::set_phase(control, &p.name, Phase::Expanding, None).await?;
        let defer = p.backfill.defer_indexes.then_some(&p.target_table);
        state::create_recorded(control, &p.name, "target", &p.target_ddl, defer).await?;
    }
    if !record.created_publication {
        // Preflight refused a publication of this name that rowshift did not
        // record, and the record commits with the publication: it is absent.
        state::create_recorded(control, &p.name, "publication", &[publication_sql(p)], None)
            .await?;
    }
    let slot_exists = control
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&p.slot_name()],
        )
        .await
        .map_err(Error::db("look up slot"))?
        .is_some();
    if !slot_exists {
        if record.created_slot {
            return Err(Error::State(format!(
                "replication slot {} was dropped by someone else; changes made since then are lost to rowshift. \
                 Run `rowshift abort {}` and start the pipeline again",
                p.slot_name(),
                p.name
            )));
        }
        control
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&p.slot_name()],
            )
            .await
            .map_err(Error::db("create replication slot"))?;
        state::mark_created(control, &p.name, "slot").await?;
    }
    Ok(())
}

pub fn publication_sql(p: &Pipeline) -> String {
    format!(
        "CREATE PUBLICATION {} FOR TABLE {}",
        crate::spec::quote_ident(&p.publication_name()),
        p.source_table.quoted()
    )
}

pub fn slot_sql(p: &Pipeline) -> String {
    format!(
        "SELECT pg_create_logical_replication_slot({}, 'pgoutput')",
        quote_literal(&p.slot_name())
    )
}

/// Estimates the source's rows (for progress and ETA) and stores the figure.
async fn store_estimate(control: &Client, p: &Pipeline, checked: &Checked) -> Result<i64> {
    let estimate = estimate_rows(control, checked, &p.source_table).await?;
    control
        .execute(
            "UPDATE rowshift.pipelines SET rows_estimated = $2 WHERE name = $1",
            &[&p.name, &estimate],
        )
        .await
        .map_err(Error::db("store estimate"))?;
    Ok(estimate)
}

async fn estimate_rows(
    client: &Client,
    checked: &Checked,
    table: &crate::spec::TableName,
) -> Result<i64> {
    if checked.source.estimated_rows > 0 {
        return Ok(checked.source.estimated_rows);
    }
    let sql = format!("SELECT count(*) FROM ONLY {}", table.quoted());
    Ok(client
        .query_one(&sql, &[])
        .await
        .map_err(Error::db("count source rows"))?
        .get(0))
}

/// Runs `fut` on a thread of its own, on a current-thread runtime of its
/// own; the receiver gets its result (an error if the thread panicked).
fn own_thread<F>(name: &str, fut: F) -> Result<tokio::sync::oneshot::Receiver<Result<()>>>
where
    F: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Replication(format!("start a runtime for {name}: {e}")))?;
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let _ = tx.send(runtime.block_on(fut));
        })
        .map_err(|e| Error::Replication(format!("start a thread for {name}: {e}")))?;
    Ok(rx)
}
