//! The apply loop: one task that applies stream batches in order and, between
//! batches, runs backfill rounds (the sequencing the backfill's correctness
//! argument relies on), polls the operator's wishes, and reports progress.

use super::early::{EarlyApply, Outcome};
use super::held::Held;
use super::progress::Progress;
use super::{Exit, RunOptions};
use crate::backfill::throttle::Throttler;
use crate::backfill::{indexes, Backfill};
use crate::error::{Error, Result};
use crate::model::{now_us, Batch, Checkpoint, Early, EarlyEnd, Key, Lsn};
use crate::sink::postgres::parallel::ParallelSink;
use crate::sink::postgres::tentative::Tentative;
use crate::sink::postgres::{PgSink, Role};
use crate::source::postgres::connect;
use crate::source::postgres::replication::{self, AckFn, ReaderConfig};
use crate::source::postgres::visibility::Commits;
use crate::spec::{Pipeline, TableName};
use crate::state::{self, apply_checkpoint, fence_checkpoint, Desired, Phase, PipelineRecord};
use crate::transform::Mapping;
use crate::transport::direct;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// Prefix of the pipeline's heartbeat messages in the WAL.
pub fn heartbeat_prefix(name: &str) -> String {
    format!("rowshift.heartbeat.{name}")
}

/// Prefix of the pipeline's watermark messages (kafka transport backfill).
pub fn watermark_prefix(name: &str) -> String {
    format!("rowshift.watermark.{name}")
}

/// One direction of streaming: which slot, which tables, which mapping.
pub struct Stream {
    /// The reverse stream (new table → old table, after cut-over).
    pub reverse: bool,
    pub slot: String,
    pub publication: String,
    pub source: TableName,
    pub target: TableName,
    pub mapping: Arc<Mapping>,
    /// Transactions that committed before this position are skipped (set at
    /// each swap; the stream that starts there must not replay older ones).
    pub start_lsn: Option<Lsn>,
}

impl Stream {
    /// The forward stream: old table (live) → new table.
    pub fn forward(p: &Pipeline, mapping: Arc<Mapping>, start_lsn: Option<Lsn>) -> Stream {
        Stream {
            reverse: false,
            slot: p.slot_name(),
            publication: p.publication_name(),
            source: p.source_table.clone(),
            target: p.target_table.clone(),
            mapping,
            start_lsn,
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    p: &Pipeline,
    dsn: &str,
    mut control: Client,
    stream: Stream,
    mut backfill: Backfill,
    epoch: i64,
    record: &PipelineRecord,
    opts: &RunOptions,
    cancel: CancellationToken,
) -> Result<Exit> {
    let mapping = stream.mapping.clone();
    let direction = if stream.reverse { "reverse" } else { "forward" };
    let apply_workers = p.transport.apply_workers;
    let stop = cancel.child_token();
    let _stop_guard = stop.clone().drop_guard();

    // Large transactions are applied while in progress on the forward
    // stream, once the backfill is done (see `early`).
    let mut early = (!stream.reverse).then(|| {
        EarlyApply::new(
            Tentative::new(
                dsn,
                mapping.clone(),
                stream.source.clone(),
                stream.target.clone(),
                apply_workers,
            ),
            mapping.source_key.clone(),
        )
    });
    // Early mode once the backfill is done: here, before the reader starts,
    // for a run that resumes after it (a transaction whose first block came
    // before this would be kept to its commit), and where the last chunk
    // lands for one that finishes it (a backfill never becomes unfinished
    // again).
    if let (true, Some(e)) = (backfill.finished(), &early) {
        e.allow();
    }
    let allow = early.as_ref().map(|e| e.allow.clone());
    let (mut rx, ack, reader) = start_source(p, dsn, &stream, stop.clone(), allow).await?;

    // The transactions received: every read of the source (a chunk, a
    // refetch, a repair) waits until they are visible to it.
    let commits = Commits::default();
    backfill.watch_commits(&commits);
    let mut sinks = Vec::new();
    for _ in 0..apply_workers.max(1) {
        let mut s = PgSink::connect(
            dsn,
            mapping.clone(),
            stream.source.clone(),
            stream.target.clone(),
            Role::Stream,
        )
        .await?;
        s.watch_commits(commits.clone());
        sinks.push(s);
    }
    let mut sink = ParallelSink::new(sinks, mapping.source_key.clone());
    let fence = fence_checkpoint(&p.name, epoch);
    let mut throttler = Throttler::new(p.throttle.clone(), p.slot_name());
    let mut progress = Progress::new(opts.progress, &p.name, estimated(&control, &p.name).await?);
    progress.backfill(backfill.rows_copied(), backfill.chunks_done());
    let mut caught_up = stream.reverse
        || !matches!(
            record.phase.as_str(),
            "planned" | "expanding" | "backfilling" | "rolled_back" | "failed"
        );
    let mut repair_sink: Option<PgSink> = None;
    let mut backfill_done_us: Option<i64> = backfill.finished().then(now_us);
    let mut paused = record.desired == Desired::Pause;
    let mut throttled: Option<String> = None;
    let mut last_control = Instant::now();
    let mut lag_ms: Option<i64> = None;
    tracing::info!(pipeline = %p.name, direction, source = %stream.source, target = %stream.target, "streaming");

    // The target's indexes, if deferred, are built when the copy ends (or
    // earlier, when too many changes wait for them); a run that resumes
    // after the copy builds what is left before it applies anything.
    let mut deferred = match stream.reverse {
        true => Vec::new(),
        false => indexes::load(&control, &p.name).await?,
    };
    backfill.set_indexes_deferred(!deferred.is_empty());
    let mut held = Held::new(p.backfill.hold_changes);
    if backfill.finished() {
        build_indexes(&mut control, &p.name, epoch, &mut deferred, &mut backfill).await?;
    }

    // Ordered shutdown: leave the loop, stop the heartbeat, the batcher and
    // the reader, and wait for the reader to release the slot, so that an
    // in-process retry can start streaming from it again.
    let result: Result<Exit> = async {
        loop {
            // No chunk while held batches wait to be applied after an early
            // index build (they are older than any chunk to come).
            let replaying = deferred.is_empty() && !held.is_empty();
            if !backfill.finished() && !paused && !replaying {
                throttled = throttler.check(&control).await?;
                if throttled.is_none() && backfill.due() {
                    // A round lasts until a change batch waits, the
                    // throttle is due another look, or a stop is asked.
                    let round_started = Instant::now();
                    let round_for = Duration::from_millis(p.throttle.check_interval_ms);
                    backfill
                        .round(|| !rx.ready() && !cancel.is_cancelled() && round_started.elapsed() < round_for)
                        .await?;
                    progress.backfill(backfill.rows_copied(), backfill.chunks_done());
                    if backfill.finished() {
                        // The end of the copy includes the indexes' build.
                        build_indexes(&mut control, &p.name, epoch, &mut deferred, &mut backfill).await?;
                        // Before the end is recorded, so a transaction
                        // begun after `backfill_finished_at` is set can be
                        // applied while in progress.
                        if let Some(e) = &early {
                            e.allow();
                        }
                        backfill_done_us = Some(now_us());
                        control
                            .execute("UPDATE rowshift.pipelines SET backfill_finished_at = now() WHERE name = $1", &[&p.name])
                            .await
                            .map_err(Error::db("record backfill end"))?;
                        state::audit(
                            &control,
                            &p.name,
                            "backfill finished",
                            &format!("{} rows", backfill.rows_copied()),
                        )
                        .await?;
                        tracing::info!(pipeline = %p.name, rows = backfill.rows_copied(), "backfill finished; waiting to catch up");
                    }
                }
            }
            let backfilling = !backfill.finished() && !paused && throttled.is_none();
            let wait = if backfilling {
                backfill
                    .not_before()
                    .saturating_duration_since(Instant::now())
            } else {
                Duration::from_millis(250)
            };
            let replay = if deferred.is_empty() { held.next() } else { None };
            if replay.is_some() && cancel.is_cancelled() {
                return Err(Error::Stopped("interrupted".into()));
            }
            let next = match replay {
                Some(b) => Some(b),
                None => tokio::select! {
                    biased;
                    _ = cancel.cancelled() => {
                        return Err(Error::Stopped("interrupted".into()));
                    }
                    next = rx.next() => match next? {
                        Some(b) => {
                            commits.push_committed(&b.xids, b.events.last().map(|e| e.commit_ts_us));
                            held.admit(!deferred.is_empty(), b)
                        }
                        None => return Err(Error::Replication("the replication stream ended".into())),
                    },
                    _ = tokio::time::sleep(wait) => None,
                },
            };
            if !deferred.is_empty() && held.full() {
                tracing::info!(pipeline = %p.name, held = held.changes(), "changes wait for the target's indexes: building them before the copy ends");
                build_indexes(&mut control, &p.name, epoch, &mut deferred, &mut backfill).await?;
            }
            if let Some(mut batch) = next {
                    if let Some(l) = batch_lag(&batch) {
                        lag_ms = Some(l);
                    }
                    let events = batch.events.len();
                    match (early.as_mut(), &batch.early) {
                        (Some(e), Some(_)) => {
                            let ack_at = batch.ack;
                            let checkpoint = |n| apply_checkpoint(&p.name, epoch, stream.reverse, ack_at, n, lag_ms);
                            if let Outcome::Committed { ack: lsn, .. } = e.batch(batch, &mut sink, &fence, checkpoint).await? {
                                ack(lsn);
                            }
                            progress.stream(events, lag_ms);
                        }
                        (None, Some(_)) => {
                            return Err(Error::State("changes of a transaction in progress reached a stream that cannot hold them".into()));
                        }
                        (_, None) => {
                            let checkpoint = apply_checkpoint(
                                &p.name,
                                epoch, stream.reverse, batch.ack, events, lag_ms);
                            let started = Instant::now();
                            let events_now = std::mem::take(&mut batch.events);
                            // While an early transaction holds rows, a lock timeout
                            // gives it up and the batch is applied again (see `early`).
                            let again = early.as_ref().is_some_and(EarlyApply::holds_rows).then(|| events_now.clone());
                            let applied = match (sink.apply(events_now, &fence, &checkpoint).await, again, early.as_mut()) {
                                (Err(e), Some(events_again), Some(ea)) if e.is_lock_timeout() => {
                                    ea.give_up(&mut sink, Some("an ordinary write waited on it")).await?;
                                    sink.apply(events_again, &fence, &checkpoint).await?
                                }
                                (result, _, _) => result?,
                            };
                            tracing::debug!(
                                events,
                                upserts = applied.upserts,
                                deletes = applied.deletes,
                                partials = applied.partials,
                                refetches = applied.refetches,
                                apply_us = started.elapsed().as_micros() as u64,
                                ack = ?batch.ack,
                                "batch applied"
                            );
                            if let Some(lsn) = batch.ack {
                                ack(lsn);
                            }
                            progress.stream(events, lag_ms);
                            let passed_done = matches!((batch.heartbeat_us, backfill_done_us), (Some(hb), Some(done)) if hb > done);
                            if passed_done {
                                if !caught_up {
                                    caught_up = true;
                                    state::set_phase(&control, &p.name, Phase::CaughtUp, None).await?;
                                    tracing::info!(pipeline = %p.name, lag_ms = lag_ms.unwrap_or(0), "caught up; streaming continues");
                                }
                                if opts.exit_when_caught_up {
                                    progress.finish();
                                    return Ok(Exit::Done);
                                }
                            }
                        }
                    }
            }
            if last_control.elapsed() >= Duration::from_millis(500) {
                last_control = Instant::now();
                // Repairs read the source, which does not show an early
                // transaction: they wait until it has ended.
                // Nor are they run on a target without its indexes.
                if !stream.reverse && deferred.is_empty() && !early.as_ref().is_some_and(EarlyApply::holds_rows) {
                    run_repairs(p, dsn, &control, (&mapping, &commits), epoch, &mut repair_sink).await?;
                }
                let (exit, note) =
                    control_tick(p, &control, stream.reverse, &mut paused, throttled.as_deref()).await?;
                if let Some(exit) = exit {
                    return Ok(exit);
                }
                progress.draw(note.as_deref());
            }
        }
    }
    .await;
    stop.cancel();
    stop_source(&p.name, rx, reader).await;
    result
}

/// Builds the deferred indexes, if any; chunks probe the target from then on.
async fn build_indexes(
    control: &mut Client,
    name: &str,
    epoch: i64,
    deferred: &mut Vec<indexes::Deferred>,
    backfill: &mut Backfill,
) -> Result<()> {
    if !deferred.is_empty() {
        let when = match backfill.finished() {
            true => "after the copy",
            false => "while copying (changes waited)",
        };
        indexes::build(control, name, epoch, deferred, when).await?;
    }
    backfill.set_indexes_deferred(false);
    Ok(())
}

/// Waits for a cancelled source to let go of the slot. Its queue goes
/// first: a reader blocked on a full queue stops once nobody reads it.
pub(super) async fn stop_source(
    name: &str,
    rx: direct::Receiver,
    reader: tokio::task::JoinHandle<()>,
) {
    drop(rx);
    if tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .is_err()
    {
        tracing::warn!(pipeline = %name, "the replication reader did not stop within 10 s");
    }
}

/// Starts a stream's source side: the heartbeat writer, the replication
/// reader and the batching queue behind it (at most `queue_batches`
/// batches' worth of changes wait in it).
pub(super) async fn start_source(
    p: &Pipeline,
    dsn: &str,
    stream: &Stream,
    stop: CancellationToken,
    early: Option<Arc<AtomicBool>>,
) -> Result<(direct::Receiver, AckFn, tokio::task::JoinHandle<()>)> {
    spawn_heartbeat(dsn, heartbeat_prefix(&p.name), stop.clone()).await?;
    let mapping = &stream.mapping;
    let reader = ReaderConfig {
        dsn: dsn.to_string(),
        slot: stream.slot.clone(),
        publication: stream.publication.clone(),
        start_lsn: stream.start_lsn,
        columns: Arc::new(
            mapping
                .source_columns
                .iter()
                .map(|c| c.name.clone())
                .collect(),
        ),
        key_positions: mapping.source_key.clone(),
        heartbeat_prefix: heartbeat_prefix(&p.name),
        watermark_prefix: watermark_prefix(&p.name),
        // The kafka topic is the source's change stream, for other
        // consumers too: it follows columns added to the source.
        carry_added_columns: p.transport.kafka.is_some() && !stream.reverse,
        early,
    };
    let t = &p.transport;
    let capacity = t.batch_events.saturating_mul(t.queue_batches).max(1);
    let (source_rx, ack, reader) = replication::start(reader, stop, capacity).await?;
    let rx = direct::Receiver::new(
        source_rx,
        t.batch_events,
        Duration::from_millis(t.linger_ms),
    );
    Ok((rx, ack, reader))
}

/// The twice-a-second look at the operator's wishes: a direction switch or
/// the end of the pipeline stops the stream; abort stops the process;
/// pause/resume toggle `paused`. Reports liveness and returns the note to
/// show (paused, or why the backfill is throttled).
pub(super) async fn control_tick(
    p: &Pipeline,
    control: &Client,
    reverse: bool,
    paused: &mut bool,
    throttled: Option<&str>,
) -> Result<(Option<Exit>, Option<String>)> {
    let now = state::load(control, &p.name).await?;
    if let Some(r) = &now {
        if r.reverse() != reverse || matches!(r.phase.as_str(), "contracting" | "contracted") {
            return Ok((Some(Exit::Switched), None));
        }
    }
    match now.map(|r| r.desired).unwrap_or(Desired::Abort) {
        Desired::Abort => {
            return Err(Error::Stopped(format!(
                "pipeline {} is being aborted",
                p.name
            )));
        }
        Desired::Pause if !*paused => {
            *paused = true;
            tracing::info!(pipeline = %p.name, "paused: backfill stopped, stream keeps applying");
        }
        Desired::Run if *paused => {
            *paused = false;
            tracing::info!(pipeline = %p.name, "resumed");
        }
        _ => {}
    }
    let note = if *paused {
        Some("paused by operator".to_string())
    } else {
        throttled.map(str::to_string)
    };
    control
        .execute(
            "UPDATE rowshift.pipelines SET runner_seen_at = now(), throttled = $2 WHERE name = $1",
            &[&p.name, &note],
        )
        .await
        .map_err(Error::db("report liveness"))?;
    Ok((None, note))
}

/// Re-copies the key ranges `rowshift verify --repair` queued (between two
/// batches, like a backfill chunk; see [`crate::verify`]).
async fn run_repairs(
    p: &Pipeline,
    dsn: &str,
    control: &Client,
    (mapping, commits): (&Arc<Mapping>, &Commits),
    epoch: i64,
    sink: &mut Option<PgSink>,
) -> Result<()> {
    let queued = control
        .query(
            "SELECT id, lo, hi FROM rowshift.repairs WHERE pipeline = $1 AND done_at IS NULL ORDER BY id LIMIT 16",
            &[&p.name],
        )
        .await
        .map_err(Error::db("read repair requests"))?;
    for r in queued {
        let id: i64 = r.get(0);
        let lo: Option<Key> = r.get::<_, Option<Vec<Option<String>>>>(1).map(Key);
        let hi: Option<Key> = r.get::<_, Option<Vec<Option<String>>>>(2).map(Key);
        if sink.is_none() {
            let mut s = PgSink::for_pipeline(dsn, p, mapping.clone(), Role::Copy).await?;
            s.watch_commits(commits.clone());
            *sink = Some(s);
        }
        let Some(s) = sink.as_mut() else { continue };
        let done = Checkpoint {
            sql: "UPDATE rowshift.repairs SET done_at = now() WHERE id = $1::text::int8 \
                  AND (SELECT epoch FROM rowshift.pipelines WHERE name = $2::text FOR SHARE) = $3::text::int8"
                .into(),
            params: vec![Some(id.to_string()), Some(p.name.clone()), Some(epoch.to_string())],
            fenced: true,
        };
        let (deleted, written) = s.repair_range(lo.as_ref(), hi.as_ref(), &done).await?;
        control
            .execute(
                "UPDATE rowshift.repairs SET rows_deleted = $2, rows_written = $3 WHERE id = $1",
                &[&id, &(deleted as i64), &(written as i64)],
            )
            .await
            .map_err(Error::db("record repair"))?;
        tracing::info!(pipeline = %p.name, request = id, deleted, written, "key range re-copied");
    }
    Ok(())
}

/// End-to-end lag of a batch: from the source commit (or heartbeat) to now.
pub(super) fn batch_lag(batch: &Batch) -> Option<i64> {
    let from = match &batch.early {
        Some(Early {
            end: Some(EarlyEnd::Commit { ts_us, .. }),
            ..
        }) => *ts_us,
        // Its changes carry no commit time yet.
        Some(_) => return None,
        None => batch
            .events
            .last()
            .map(|e| e.commit_ts_us)
            .or(batch.heartbeat_us)?,
    };
    Some(((now_us() - from) / 1000).max(0))
}

pub(super) async fn estimated(control: &Client, name: &str) -> Result<i64> {
    let row = control
        .query_one(
            "SELECT coalesce(rows_estimated, 0) FROM rowshift.pipelines WHERE name = $1",
            &[&name],
        )
        .await
        .map_err(Error::db("read estimate"))?;
    Ok(row.get(0))
}

/// Writes a heartbeat message into the WAL every second (see
/// [`crate::source::postgres::replication`]).
pub(super) async fn spawn_heartbeat(
    dsn: &str,
    prefix: String,
    stop: CancellationToken,
) -> Result<()> {
    let client = connect(dsn, "heartbeat").await?;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1000));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = now_us().to_string();
            if let Err(e) = client
                .execute(
                    "SELECT pg_logical_emit_message(false, $1, $2)",
                    &[&prefix, &now],
                )
                .await
            {
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
    });
    Ok(())
}
