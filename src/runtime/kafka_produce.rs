//! `rowshift run` with the kafka transport: the producer.
//!
//! ```text
//!  slot ─▶ reader ─▶ batches ─▶ encode + queue ─▶ acker ─▶ slot confirmed, chunk cursor, marks
//!                        ▲                                        │
//!            backfill chunks (watermarks)          applied LSN ◀── marks vs kafka_applied
//! ```
//!
//! The main loop turns each batch of changes into Avro records and queues
//! them with the idempotent producer, in stream order, without waiting. The
//! acker task awaits the broker's acknowledgements batch by batch, in order;
//! only then is the batch's position confirmed to the slot (invariant 3) and
//! a backfill chunk whose rows it carried recorded as copied.
//!
//! Each confirmed position becomes a *mark*: the LSN and, per partition, the
//! end offset of everything produced up to it. The appliers store how far
//! each partition is applied (`rowshift.kafka_applied`, in the transaction
//! of the rows), so the pipeline's applied LSN, which `verify`, `cutover`
//! and `status` read as with `direct`, is the newest mark every partition
//! has passed. Heartbeats make marks while the table is idle, so the applied
//! LSN, and with it the cut-over's drain, keep moving.
//!
//! The backfill is the DBLog chunking of
//! [`crate::transport::kafka::snapshot`]; `verify --repair` ranges go the
//! same way, with deletes for target rows the source lacks.

use super::apply_loop::{batch_lag, control_tick, estimated, start_source, stop_source, Stream};
use super::kafka_chunks::{next_repair, read_chunk, Open, MAX_OPEN};
use super::progress::Progress;
use super::{kafka_apply, kafka_schema, Exit, RunOptions};
use crate::backfill::throttle::Throttler;
use crate::error::{Error, Result};
use crate::model::{now_us, Change, ChangeEvent, Key, Lsn};
use crate::source::postgres::connect;
use crate::source::postgres::visibility::RecentXids;
use crate::spec::Pipeline;
use crate::state::{self, apply_checkpoint, chunk_checkpoint, Phase, PipelineRecord};
use crate::transport::kafka::codec::Encoder;
use crate::transport::kafka::envelope::TableSchema;
use crate::transport::kafka::frame::Frames;
use crate::transport::kafka::producer::{ensure_topic, Batch, Pending, Producer};
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// What a confirmed batch carried besides its records.
#[derive(Debug, Clone, Default)]
struct Carried {
    ack: Option<Lsn>,
    /// Source time of the batch's newest change or heartbeat (µs).
    ts_us: Option<i64>,
    events: usize,
    /// A backfill chunk ended in this batch: its cursor, whether it ended
    /// the range, and the rows produced.
    chunk: Option<(Option<Key>, bool, usize)>,
    /// The repair chunks this batch carried, in the order they closed
    /// (several can: a repair range's chunks are read ahead): each one's
    /// request, the rows written and deleted, and the range's next `lo`
    /// (`None`: the range is done).
    repair: Vec<(i64, usize, usize, Option<Key>)>,
}

struct Inflight {
    /// The batch's records (`None`: it had none).
    pending: Option<Pending>,
    carried: Carried,
}

/// A batch the broker acknowledged: what it carried, the end offset of
/// each partition, and the partitions whose offsets went back (the broker
/// lost acknowledged records): (partition, first offset reused).
struct Acked {
    carried: Carried,
    ends: Vec<i64>,
    lost: Vec<(i32, i64)>,
}

/// A position with the end offset of each partition up to it.
struct Mark {
    lsn: Lsn,
    ends: Vec<i64>,
    ts_us: Option<i64>,
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    p: &Pipeline,
    dsn: &str,
    control: Client,
    stream: Stream,
    schema: TableSchema,
    epoch: i64,
    record: &PipelineRecord,
    opts: &RunOptions,
    cancel: CancellationToken,
) -> Result<Exit> {
    let k = p
        .transport
        .kafka
        .clone()
        .ok_or_else(|| Error::State("not a kafka pipeline".into()))?;
    let brokers = k.brokers.resolve("transport.kafka.brokers")?;
    let registry = k.registry_url.resolve("transport.kafka.registry_url")?;
    let props = k.client_properties()?;
    let topic = p.kafka_topic();
    if ensure_topic(&brokers, &props, &topic, k.partitions, k.replication_factor).await? {
        // (A crash right here leaves the topic unrecorded: abort then keeps it.)
        state::kafka::record_topic(&control, &p.name, &topic).await?;
    }
    let producer = Producer::new(&brokers, &props)?;
    let partitions = producer.partitions(&topic).await?;
    state::kafka::init(&control, &p.name, partitions).await?;
    let incarnation = state::kafka::incarnation(&control, &p.name).await?;
    let mut schema = schema;
    let mut encoder = Encoder::new(&registry, &schema);
    // Source columns added while running, carried after the mapping's.
    let mut added: Vec<String> = Vec::new();
    let mapping = stream.mapping.clone();
    let key = mapping.source_key.clone();

    let stop = cancel.child_token();
    let _stop_guard = stop.clone().drop_guard();
    let mut applier = if k.apply_in_run {
        let (p2, d2, m2, s2, c2) = (
            p.clone(),
            dsn.to_string(),
            mapping.clone(),
            schema.clone(),
            stop.clone(),
        );
        // On a thread of its own: `run` is a current-thread process (see
        // `main.rs`), and the producer must not wait on the applier's work.
        Some(super::own_thread("rowshift-apply", async move {
            kafka_apply::run(&p2, &d2, m2, &s2, c2).await
        })?)
    } else {
        None
    };

    let (mut rx, ack, reader) = start_source(p, dsn, &stream, stop.clone(), None).await?;

    // The acker: awaits acknowledgements in order. It starts from the ends
    // recorded before the slot was last confirmed, so everything the slot
    // will not send again lies below them (see `marks`).
    let (inflight_tx, mut inflight_rx) = mpsc::channel::<Inflight>(64);
    let (done_tx, mut done_rx) = mpsc::channel::<Result<Acked>>(64);
    let acker_topic = topic.clone();
    let mut ends_now = state::kafka::produced(&control, &p.name, partitions).await?;
    let mut ends = ends_now.clone();
    tokio::spawn(async move {
        while let Some(batch) = inflight_rx.recv().await {
            let mut lost = Vec::new();
            let acked = match batch.pending {
                Some(p) => p.wait(&acker_topic).await,
                None => Ok(Vec::new()),
            };
            let out = acked.map(|acked| {
                for (part, offset) in acked {
                    if let Some(e) = ends.get_mut(part as usize) {
                        // One idempotent producer: a partition's offsets
                        // only grow, unless the broker lost its log.
                        if offset < *e {
                            lost.push((part, offset));
                        }
                        *e = offset + 1;
                    }
                }
                Acked {
                    carried: batch.carried,
                    ends: ends.clone(),
                    lost,
                }
            });
            if done_tx.send(out).await.is_err() {
                break;
            }
        }
    });

    let snap_client = connect(dsn, "snapshot").await?;
    let mut range = state::load_ranges(&control, &p.name)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| Error::State("the backfill range vanished".into()))?;
    if !range.done && record.phase != Phase::Backfilling.as_str() {
        state::set_phase(&control, &p.name, Phase::Backfilling, None).await?;
    }

    let mut progress = Progress::new(opts.progress, &p.name, estimated(&control, &p.name).await?);
    progress.backfill(range.rows_copied, range.chunks_done);
    let mut caught_up = !matches!(
        record.phase.as_str(),
        "planned" | "expanding" | "backfilling" | "rolled_back" | "failed"
    );
    let mut backfill_done: Option<Option<Lsn>> =
        (range.done && !state::kafka::resync_pending(&control, &p.name).await?).then_some(None);
    let mut throttler = Throttler::new(p.throttle.clone(), p.slot_name());
    let mut throttled: Option<String> = None;
    let mut paused = record.desired == state::Desired::Pause;
    let mut open: Vec<Open> = Vec::new();
    let mut last_repair_check = Instant::now();
    let mut chunk_seq = 0u64;
    let mut cursor = range.cursor.clone();
    let mut recent = RecentXids::default();
    let mut marks: VecDeque<Mark> = VecDeque::new();
    let mut frames = Frames::default();
    let mut unconfirmed: Option<Lsn> = None;
    let mut confirmed_events = 0usize;
    let mut not_before = Instant::now();
    let mut last_control = Instant::now();
    let mut last_refresh = Instant::now();
    let mut last_lsn = Lsn::ZERO;
    let mut repairs_open = 0usize;
    // The repair range being read, and the cursor after its last open chunk.
    let mut repair_next: Option<(i64, Key)> = None;
    tracing::info!(pipeline = %p.name, %topic, partitions, "producing to kafka");

    let result: Result<Exit> = async {
        loop {
            // Start chunks while fewer than MAX_OPEN wait for their
            // watermarks (a queued repair first).
            if open.len() < MAX_OPEN && Instant::now() >= not_before {
                if repair_next.is_some()
                    || (repairs_open == 0 && last_repair_check.elapsed() >= Duration::from_millis(500))
                {
                    last_repair_check = Instant::now();
                    if let Some(o) =
                        next_repair(p, &control, &snap_client, (&mapping, &added), &recent, chunk_seq, repair_next.as_ref()).await?
                    {
                        chunk_seq += 1;
                        repairs_open += 1;
                        repair_next = match (o.repair, &o.chunk.cursor, o.chunk.done) {
                            (Some(id), Some(c), false) => Some((id, c.clone())),
                            _ => None,
                        };
                        open.push(o);
                    }
                }
                if !range.done && !paused {
                    throttled = throttler.check(&control).await?;
                    if throttled.is_none() {
                        let o = read_chunk(p, &snap_client, (&mapping, &added), (&cursor, &range.hi), &recent, chunk_seq)
                            .await?;
                        chunk_seq += 1;
                        if let Some(o) = o {
                            cursor = o.chunk.cursor.clone();
                            if o.chunk.done {
                                range.done = true;
                            }
                            if let Some(rate) = p.backfill.rate_limit_rows_per_s {
                                let secs = o.chunk.read as f64 / rate.max(1) as f64;
                                not_before = Instant::now() + Duration::from_secs_f64(secs);
                            }
                            open.push(o);
                        }
                    }
                }
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(Error::Stopped("interrupted".into())),
                done = done_rx.recv() => {
                    let Acked { carried, ends, lost } = done.ok_or_else(|| Error::Replication("the kafka acker stopped".into()))??;
                    if !lost.is_empty() {
                        let open_repairs: Vec<i64> = open.iter().filter_map(|o| o.repair).collect();
                        for (part, at) in &lost {
                            state::kafka::rewind(&control, &p.name, *part, *at, &open_repairs).await?;
                            let detail = format!("partition {part} reuses offsets from {at}; positions moved back, whole table queued for repair");
                            tracing::error!(pipeline = %p.name, partition = part, offset = at, "the kafka broker lost records it had acknowledged; {detail}");
                            state::audit(&control, &p.name, "kafka broker lost records", &detail).await?;
                        }
                        // Marks made before hold offsets the broker reuses.
                        marks.clear();
                        resync_started(&control, &p.name, &mut caught_up, &mut backfill_done).await?;
                    }
                    if carried.ack.is_some() {
                        unconfirmed = carried.ack;
                    }
                    confirmed_events += carried.events;
                    if let Some((c, finished, rows)) = &carried.chunk {
                        let mut ckpt = chunk_checkpoint(&p.name, epoch, 0, c, *finished);
                        ckpt.params.push(Some(rows.to_string()));
                        state::kafka::execute(&control, &ckpt).await?;
                        range.rows_copied += *rows as i64;
                        range.chunks_done += 1;
                        progress.backfill(range.rows_copied, range.chunks_done);
                        if *finished {
                            backfill_done = Some(carried.ack);
                            control
                                .execute("UPDATE rowshift.pipelines SET backfill_finished_at = now() WHERE name = $1", &[&p.name])
                                .await
                                .map_err(Error::db("record backfill end"))?;
                            state::audit(&control, &p.name, "backfill finished", &format!("{} rows", range.rows_copied)).await?;
                            tracing::info!(pipeline = %p.name, rows = range.rows_copied, "backfill produced; waiting for the appliers to catch up");
                        }
                    }
                    for (id, written, deleted, next) in &carried.repair {
                        repairs_open = repairs_open.saturating_sub(1);
                        control
                            .execute(
                                "UPDATE rowshift.repairs SET done_at = CASE WHEN $4::text[] IS NULL THEN now() END, \
                                 lo = coalesce($4, lo), rows_written = coalesce(rows_written, 0) + $2, \
                                 rows_deleted = coalesce(rows_deleted, 0) + $3 WHERE id = $1",
                                &[id, &(*written as i64), &(*deleted as i64), &next.as_ref().map(|k| &k.0)],
                            )
                            .await
                            .map_err(Error::db("record repair"))?;
                        if next.is_none() && backfill_done.is_none() && range.done && !state::kafka::resync_pending(&control, &p.name).await? {
                            backfill_done = Some(None);
                        }
                    }
                    if backfill_done == Some(None) {
                        backfill_done = Some(carried.ack);
                    }
                    if let Some(lsn) = carried.ack {
                        marks.push_back(Mark { lsn, ends: ends.clone(), ts_us: carried.ts_us });
                    }
                    ends_now = ends;
                }
                next = rx.next() => {
                    let batch = next?.ok_or_else(|| Error::Replication("the replication stream ended".into()))?;
                    recent.push_committed(&batch.xids, batch.events.last().map(|e| e.commit_ts_us));
                    let mut out = Out { producer: &producer, topic: &topic, incarnation: &incarnation, batch: Batch::default(), frames: std::mem::take(&mut frames) };
                    let mut carried = Carried {
                        ack: batch.ack,
                        ts_us: batch.events.last().map(|e| e.commit_ts_us).or(batch.heartbeat_us),
                        events: batch.events.len(),
                        ..Carried::default()
                    };
                    let now_ms = now_us() / 1000;
                    let mut marks_at = batch.watermarks.iter().peekable();
                    let mut added_at = batch.columns_added.iter().peekable();
                    for i in 0..=batch.events.len() {
                        while let Some((_, names)) = added_at.next_if(|(at, _)| *at <= i) {
                            schema = kafka_schema::with_added(p, &control, &schema, names).await?;
                            encoder = Encoder::new(&registry, &schema);
                            added.extend(names.iter().cloned());
                            tracing::info!(pipeline = %p.name, columns = %names.join(", "), "columns added to the source; the next records carry them (a new value schema version)");
                            state::audit(&control, &p.name, "source columns added", &names.join(", ")).await?;
                        }
                        while let Some((_, id)) = marks_at.next_if(|(at, _)| *at <= i) {
                            if let Some(at) = open.iter().position(|o| &o.chunk.id == id) {
                                let o = open.remove(at);
                                close_chunk(o, (&schema, &encoder), last_lsn, &mut out, &mut carried).await?;
                            }
                        }
                        let Some(e) = batch.events.get(i) else { break };
                        last_lsn = e.commit_lsn;
                        for o in open.iter_mut() {
                            o.chunk.observe(e, &key);
                        }
                        produce(e, false, now_ms, (&schema, &encoder), &mut out).await?;
                    }
                    if let Some(l) = batch_lag(&batch) {
                        progress.stream(batch.events.len(), Some(l));
                    }
                    frames = out.frames;
                    let pending = producer.close(out.batch);
                    if pending.is_some() || carried.ack.is_some() || carried.chunk.is_some() || !carried.repair.is_empty() {
                        inflight_tx
                            .send(Inflight { pending, carried })
                            .await
                            .map_err(|_| Error::Replication("the kafka acker stopped".into()))?;
                    }
                }
                joined = async { match applier.as_mut() { Some(h) => h.await, None => std::future::pending().await } } => {
                    applier = None;
                    match joined {
                        Ok(Ok(())) => return Err(Error::Stopped("the applier stopped".into())),
                        Ok(Err(e)) => return Err(e),
                        Err(_) => return Err(Error::Replication("the applier thread failed".into())),
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            if !marks.is_empty() && last_refresh.elapsed() >= Duration::from_millis(10) {
                last_refresh = Instant::now();
                if let Some(m) = passed_marks(&control, &p.name, &mut marks).await? {
                    let lag = m.ts_us.map(|ts| ((now_us() - ts) / 1000).max(0));
                    let ckpt = apply_checkpoint(&p.name, epoch, false, Some(m.lsn), confirmed_events, lag);
                    confirmed_events = 0;
                    state::kafka::execute(&control, &ckpt).await?;
                    let past_backfill = matches!(backfill_done, Some(Some(done)) if m.lsn >= done);
                    if past_backfill {
                        if !caught_up {
                            caught_up = true;
                            state::set_phase(&control, &p.name, Phase::CaughtUp, None).await?;
                            tracing::info!(pipeline = %p.name, "caught up; streaming continues");
                        }
                        if opts.exit_when_caught_up {
                            progress.finish();
                            return Ok(Exit::Done);
                        }
                    }
                }
            }
            if last_control.elapsed() >= Duration::from_millis(500) {
                last_control = Instant::now();
                // The ends first, then the slot: a restart starts its acker
                // from ends covering all the slot will not send again.
                state::kafka::save_produced(&control, &p.name, &ends_now).await?;
                if let Some(lsn) = unconfirmed.take() {
                    ack(lsn);
                }
                let (exit, note) = control_tick(p, &control, false, &mut paused, throttled.as_deref()).await?;
                if let Some(exit) = exit {
                    return Ok(exit);
                }
                progress.draw(note.as_deref());
            }
        }
    }
    .await;
    stop.cancel();
    if let Some(h) = applier {
        let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
    }
    stop_source(&p.name, rx, reader).await;
    result
}

/// The whole table is being read again after the broker lost records: not
/// caught up until that is done.
async fn resync_started(
    control: &Client,
    name: &str,
    caught_up: &mut bool,
    backfill_done: &mut Option<Option<Lsn>>,
) -> Result<()> {
    *backfill_done = None;
    if *caught_up {
        *caught_up = false;
        state::set_phase(
            control,
            name,
            Phase::Backfilling,
            Some((
                "the kafka broker lost acknowledged records",
                "the whole table is being read again through the topic",
            )),
        )
        .await?;
    }
    Ok(())
}

/// Pops the marks every partition has applied; returns the newest.
async fn passed_marks(
    control: &Client,
    name: &str,
    marks: &mut VecDeque<Mark>,
) -> Result<Option<Mark>> {
    let applied = state::kafka::applied(control, name).await?;
    let mut newest = None;
    while let Some(m) = marks.front() {
        let passed = m
            .ends
            .iter()
            .enumerate()
            .all(|(part, end)| *end <= applied.get(&(part as i32)).map_or(0, |a| a.next));
        if !passed {
            break;
        }
        newest = marks.pop_front();
    }
    Ok(newest)
}

/// Where a batch's records go: the producer and its topic, the batch being
/// filled, and the buffers an event's records are written into.
struct Out<'a> {
    producer: &'a Producer,
    topic: &'a str,
    incarnation: &'a str,
    batch: Batch,
    frames: Frames,
}

/// Encodes one event and queues its records.
async fn produce(
    e: &ChangeEvent,
    snapshot: bool,
    now_ms: i64,
    (schema, encoder): (&TableSchema, &Encoder),
    out: &mut Out<'_>,
) -> Result<()> {
    if matches!(e.change, Change::Truncate) {
        return Err(Error::Replication(format!(
            "{} was truncated: a TRUNCATE cannot travel through the kafka transport (the change \
             envelope has no row for it); `rowshift abort {}` and start the pipeline again",
            schema.table, schema.name
        )));
    }
    let ids = encoder.ids().await?;
    schema
        .write_records(e, snapshot, now_ms, ids, &mut out.frames)
        .map_err(|r| {
            Error::Replication(format!("cannot encode a change of {}: {r}", schema.table))
        })?;
    for (k, v) in out.frames.iter() {
        out.producer
            .queue(&mut out.batch, out.topic, k, v, out.incarnation)
            .await?;
    }
    Ok(())
}

/// Produces a chunk's remaining rows (op `r`) and deletes at its watermark.
async fn close_chunk(
    o: Open,
    codec: (&TableSchema, &Encoder),
    lsn: Lsn,
    out: &mut Out<'_>,
    carried: &mut Carried,
) -> Result<()> {
    let now = now_us();
    let (cursor, done) = (o.chunk.cursor.clone(), o.chunk.done);
    let (rows, deletes) = o.chunk.into_parts();
    let n = rows.len();
    for row in rows {
        let e = ChangeEvent {
            change: Change::Insert { new: row },
            commit_lsn: lsn,
            commit_ts_us: now,
            xid: 0,
        };
        produce(&e, true, now / 1000, codec, out).await?;
    }
    let deleted = deletes.len();
    for key in deletes {
        let e = ChangeEvent {
            change: Change::Delete { key },
            commit_lsn: lsn,
            commit_ts_us: now,
            xid: 0,
        };
        produce(&e, false, now / 1000, codec, out).await?;
    }
    match o.repair {
        Some(id) => carried
            .repair
            .push((id, n, deleted, if done { None } else { cursor })),
        None => {
            // Chunks close in the order they were read: the last one's
            // cursor covers the earlier ones of this batch.
            let before = carried
                .chunk
                .take()
                .map(|c| (c.1, c.2))
                .unwrap_or((false, 0));
            carried.chunk = Some((cursor, done || before.0, n + before.1));
        }
    }
    Ok(())
}
