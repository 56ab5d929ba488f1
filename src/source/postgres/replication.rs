//! The logical replication reader (pgoutput through `pg_walstream`).
//!
//! ```text
//!  walsender ──pgoutput──▶ reader task ──events──▶ batcher ──Batch──▶ transport
//!      ▲                                                                 │
//!      └──── standby status (confirmed = last durable ack) ◀── AckFn ◀───┘
//! ```
//!
//! Positions. A batch's `ack` is the end LSN of the last *complete*
//! transaction it holds, or the LSN of a heartbeat message that arrived
//! outside any transaction. The slot is confirmed up to an ack only after the
//! sink reports the batch durable (invariant 3). Confirming a heartbeat's
//! position is safe for the same reason pg_recvlogical's keepalive stop is:
//! the walsender decodes WAL in order, so every transaction that committed
//! below the heartbeat was sent before it, and one still open commits above it
//! and will be sent again after a restart.
//!
//! On PostgreSQL 14 and later the walsender streams large transactions while
//! they are in progress; the reader keeps them until they commit and passes
//! them on whole (see [`super::streamed`]), so positions and everything
//! downstream are the same as without streaming.
//!
//! Heartbeats are non-transactional logical messages
//! (`pg_logical_emit_message(false, prefix, now)`) written once a second by
//! the runtime. They keep the slot moving when the table is idle (other
//! tables' WAL would otherwise pile up behind it) and measure end-to-end lag.

use super::restream::Watch;
use super::streamed::{Streams, Unstream};
use crate::error::{Error, Result};
use crate::model::{Cell, Change, ChangeEvent, Lsn, Row, SourceMsg};
use pg_walstream::{
    CancellationToken, ColumnValue, EventStream, EventType, LogicalReplicationStream,
    ReplicationStreamConfig, RowData, SharedLsnFeedback, StreamingMode,
};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Called by the sink side when everything up to the position is durable.
pub type AckFn = Arc<dyn Fn(Lsn) + Send + Sync>;

/// Settings of one replication reader.
#[derive(Debug, Clone)]
pub struct ReaderConfig {
    pub dsn: String,
    pub slot: String,
    pub publication: String,
    /// Source column names in table order; rows are aligned to them.
    pub columns: Arc<Vec<String>>,
    pub key_positions: Vec<usize>,
    /// Prefix of this pipeline's heartbeat messages.
    pub heartbeat_prefix: String,
    /// Prefix of this pipeline's watermark messages (transactional; the
    /// kafka transport's backfill, see [`crate::transport::kafka::snapshot`]).
    pub watermark_prefix: String,
    /// Skip transactions that committed before this position (the server
    /// starts at the slot's confirmed position when that is later).
    pub start_lsn: Option<Lsn>,
    /// Carry columns added to the source after `columns` (appended to the
    /// rows, announced by [`SourceMsg::ColumnsAdded`]); otherwise they are
    /// left out.
    pub carry_added_columns: bool,
    /// Pass one large transaction at a time on while it is still in
    /// progress, whenever this is true (see [`super::streamed`]); `None`:
    /// never.
    pub early: Option<Arc<AtomicBool>>,
}

/// How much streamed, uncommitted change data the reader keeps in memory
/// before it gives streaming up (see [`super::streamed`]).
const STREAM_BUFFER_BYTES: usize = 256 << 20;

/// Starts streaming from the slot's confirmed position. Returns the receiver
/// of source messages and the acknowledgement function.
pub async fn start(
    config: ReaderConfig,
    cancel: CancellationToken,
    capacity: usize,
) -> Result<(
    mpsc::Receiver<SourceMsg>,
    AckFn,
    tokio::task::JoinHandle<()>,
)> {
    let streaming = streams_large_transactions(&config.dsn, config.early.is_some()).await?;
    // One feedback for every connection of this reader, so an
    // acknowledgement reaches whichever is open.
    let feedback = Arc::new(SharedLsnFeedback::new());
    let first = open(&config, streaming, config.start_lsn, &feedback, &cancel).await?;
    let ack_to = feedback.clone();
    let ack: AckFn = Arc::new(move |lsn: Lsn| ack_to.update_applied_lsn(lsn.0));
    let (tx, rx) = mpsc::channel(capacity);
    let handle = tokio::spawn(async move {
        let mut decoder = Decoder::new(config.clone(), streaming.on);
        let mut events = first;
        let mut out = Vec::new();
        // Set while streaming is given up: says when it may come back.
        let mut watch: Option<Watch> = None;
        loop {
            let switch = pump(&mut events, &mut decoder, &tx, &mut out, watch.as_ref()).await;
            if let Err(e) = events.shutdown().await {
                tracing::debug!(error = %e, "replication stream shutdown");
            }
            // Dropping the stream closes its connection; the walsender then
            // exits and lets go of the slot.
            drop(events);
            // Either way the walsender sends every transaction committed
            // after the last one passed on again (see `streamed`).
            let mode = match switch {
                None => break,
                Some(Switch::Unstream(Unstream(reason))) => {
                    tracing::info!(
                        slot = %config.slot,
                        reason = %reason,
                        "large transactions are no longer streamed while in progress; reconnecting"
                    );
                    let xids = decoder.streams.xids();
                    if let Some(end) = decoder.unstream() {
                        if tx.send(end).await.is_err() {
                            break;
                        }
                    }
                    watch = Some(Watch::start(config.dsn.clone(), config.slot.clone(), xids));
                    Streaming {
                        on: false,
                        work_mem_kb: None,
                    }
                }
                Some(Switch::Restream) => {
                    tracing::info!(
                        slot = %config.slot,
                        "the transactions that ended streaming are over; streaming large transactions again"
                    );
                    watch = None;
                    streaming
                }
            };
            events = match reopen(&config, mode, decoder.resume, &feedback, &cancel).await {
                Ok(e) => e,
                Err(e) => {
                    let _ = tx.send(SourceMsg::Failed(e.to_string())).await;
                    break;
                }
            };
        }
    });
    Ok((rx, ack, handle))
}

/// Whether the source can stream transactions in progress (14 and later),
/// and with which `logical_decoding_work_mem` (`None`: the server's).
async fn streams_large_transactions(dsn: &str, early: bool) -> Result<Streaming> {
    let client = super::connect(dsn, "version").await?;
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, \
                    pg_size_bytes(current_setting('logical_decoding_work_mem'))",
            &[],
        )
        .await
        .map_err(Error::db("read the server version"))?;
    let version: i32 = row.get(0);
    let work_mem: i64 = row.get(1);
    Ok(Streaming {
        on: version >= 140_000,
        work_mem_kb: (early && work_mem > EARLY_WORK_MEM_KB * 1024).then_some(EARLY_WORK_MEM_KB),
    })
}

/// The walsender's `logical_decoding_work_mem` when transactions are
/// applied early: the walsender streams a transaction once its changes
/// outgrow it, so the applier starts on a large transaction after its
/// first 4 MB instead of its first 64 MB (the default). Measured on a
/// 200,000-row UPDATE: first streamed byte after 0.09 s instead of 0.45 s,
/// the whole transaction in the same 1.0-1.2 s (docs/benchmarks.md, issue 2).
const EARLY_WORK_MEM_KB: i64 = 4096;

#[derive(Debug, Clone, Copy)]
struct Streaming {
    on: bool,
    work_mem_kb: Option<i64>,
}

/// Connects and starts replication at `start_lsn` (or the slot's confirmed
/// position, whichever is later).
async fn open(
    config: &ReaderConfig,
    streaming: Streaming,
    start_lsn: Option<Lsn>,
    feedback: &Arc<SharedLsnFeedback>,
    cancel: &CancellationToken,
) -> Result<EventStream> {
    let (protocol, mode) = if streaming.on {
        (2, StreamingMode::On)
    } else {
        (1, StreamingMode::Off)
    };
    let stream_config =
        ReplicationStreamConfig::builder(config.slot.clone(), config.publication.clone())
            .with_protocol_version(protocol)
            .with_streaming_mode(mode)
            .with_messages(true)
            .with_feedback_interval(Duration::from_millis(200))
            .with_connection_timeout(Duration::from_secs(15));
    // libpq connects and starts replication with blocking calls: keep them
    // off the runtime's worker (the process runs one, see main.rs).
    let mut dsn = super::replication_dsn(&config.dsn);
    if let (true, Some(kb)) = (streaming.on, streaming.work_mem_kb) {
        dsn = super::with_setting(&dsn, "logical_decoding_work_mem", &format!("{kb}kB"));
    }
    let feedback = feedback.clone();
    let stream = crate::blocking::run(async {
        let mut stream = LogicalReplicationStream::new(&dsn, stream_config)
            .await
            .map_err(|e| Error::Replication(format!("connect: {e}")))?;
        stream.shared_lsn_feedback = feedback;
        stream.start(start_lsn.map(|l| l.0)).await.map_err(|e| {
            Error::Replication(format!("START_REPLICATION on slot {}: {e}", config.slot))
        })?;
        Ok::<_, Error>(stream)
    })
    .await?;
    // A child token: shutting this stream down cancels its token, and must
    // not cancel the reader (which may reconnect).
    Ok(stream.into_stream(cancel.child_token()))
}

/// Opens a connection again after one was shut down: the old walsender
/// holds the slot until it has exited, which takes a moment.
async fn reopen(
    config: &ReaderConfig,
    mode: Streaming,
    start_lsn: Option<Lsn>,
    feedback: &Arc<SharedLsnFeedback>,
    cancel: &CancellationToken,
) -> Result<EventStream> {
    let mut attempt = 0;
    loop {
        match open(config, mode, start_lsn, feedback, cancel).await {
            Ok(events) => return Ok(events),
            Err(e) if attempt < 40 && !cancel.is_cancelled() => {
                attempt += 1;
                tracing::debug!(error = %e, attempt, "replication reconnect");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Why the reader reconnects.
enum Switch {
    /// Streaming must be given up.
    Unstream(Unstream),
    /// Streaming may come back (`watch` is ready).
    Restream,
}

/// Decodes events and passes the messages on until the stream ends
/// (`None`), streaming must be given up, or (between transactions) `watch`
/// says it may come back.
async fn pump(
    events: &mut EventStream,
    decoder: &mut Decoder,
    tx: &mpsc::Sender<SourceMsg>,
    out: &mut Vec<SourceMsg>,
    watch: Option<&Watch>,
) -> Option<Switch> {
    loop {
        let event = match events.next_event().await {
            Ok(e) => e,
            Err(pg_walstream::ReplicationError::Cancelled(_)) => return None,
            Err(e) => {
                let _ = tx.send(SourceMsg::Failed(e.to_string())).await;
                return None;
            }
        };
        if let Err(halt) = decoder.decode(event.event_type, out) {
            match halt {
                Halt::Unstream(u) => return Some(Switch::Unstream(u)),
                Halt::Failed(reason) => out.push(SourceMsg::Failed(reason)),
            }
        }
        for msg in out.drain(..) {
            let failed = matches!(msg, SourceMsg::Failed(_));
            if tx.send(msg).await.is_err() || failed {
                return None;
            }
        }
        // Only between transactions: everything up to `decoder.resume` has
        // been passed on, and nothing after it.
        if !decoder.in_transaction && watch.is_some_and(Watch::ready) {
            return Some(Switch::Restream);
        }
    }
}

/// Why decoding stopped.
enum Halt {
    Failed(String),
    Unstream(Unstream),
}

impl From<String> for Halt {
    fn from(reason: String) -> Halt {
        Halt::Failed(reason)
    }
}

impl From<Unstream> for Halt {
    fn from(u: Unstream) -> Halt {
        Halt::Unstream(u)
    }
}

/// Turns pgoutput events into source messages, tracking the open transaction.
struct Decoder {
    config: ReaderConfig,
    /// `config.columns`, then the added columns carried.
    columns: Vec<String>,
    commit_lsn: Lsn,
    commit_ts_us: i64,
    xid: u32,
    /// Between a `Begin` and its `Commit` (transactions sent whole).
    in_transaction: bool,
    /// Transactions streamed in progress, kept until they commit.
    streams: Streams,
    /// Where a new connection starts: after the last commit (or heartbeat)
    /// passed on, so nothing is passed on twice.
    resume: Option<Lsn>,
}

impl Decoder {
    fn new(config: ReaderConfig, streaming: bool) -> Decoder {
        let limit = if streaming { STREAM_BUFFER_BYTES } else { 0 };
        let allow = config.early.clone();
        Decoder {
            columns: config.columns.to_vec(),
            resume: config.start_lsn,
            config,
            commit_lsn: Lsn::ZERO,
            commit_ts_us: 0,
            xid: 0,
            in_transaction: false,
            streams: Streams::new(limit, allow),
        }
    }

    /// Before reconnecting without streaming: what was buffered will come
    /// again, whole. Returns the end of a transaction passed on early.
    fn unstream(&mut self) -> Option<SourceMsg> {
        self.streams.clear()
    }

    /// Decodes one event into `out`: nothing, one message, or (at the commit
    /// of a streamed transaction) all of that transaction's messages.
    fn decode(&mut self, event: EventType, out: &mut Vec<SourceMsg>) -> Result<(), Halt> {
        match event {
            EventType::StreamStart {
                transaction_id,
                first_segment,
            } => self.streams.start(transaction_id, first_segment, out),
            EventType::StreamStop => self.streams.stop(),
            EventType::StreamCommit {
                transaction_id,
                commit_lsn,
                end_lsn,
                commit_timestamp,
            } => {
                self.streams.commit(
                    transaction_id,
                    Lsn(commit_lsn.value()),
                    commit_timestamp.timestamp_micros(),
                    Lsn(end_lsn.value()),
                    out,
                );
                self.resume = Some(Lsn(end_lsn.value()));
            }
            EventType::StreamAbort {
                transaction_id,
                subtransaction_xid,
                ..
            } => self
                .streams
                .abort(transaction_id, subtransaction_xid, out)?,
            event => match self.decode_one(event)? {
                None => {}
                // Messages of a streamed block wait for its commit; columns
                // added apply from now on, and heartbeats are never inside.
                Some(msg @ (SourceMsg::Change(_) | SourceMsg::Watermark(_)))
                    if self.streams.receiving() =>
                {
                    self.streams.push(msg, out)?
                }
                Some(msg) => {
                    match &msg {
                        SourceMsg::Commit { lsn, .. } => self.resume = Some(*lsn),
                        SourceMsg::Heartbeat { lsn, .. } => {
                            self.resume = self.resume.max(Some(*lsn))
                        }
                        _ => {}
                    }
                    out.push(msg);
                }
            },
        }
        Ok(())
    }

    fn decode_one(&mut self, event: EventType) -> Result<Option<SourceMsg>, String> {
        let change = match event {
            EventType::Begin {
                final_lsn,
                commit_timestamp,
                transaction_id,
                ..
            } => {
                self.commit_lsn = Lsn(final_lsn.value());
                self.commit_ts_us = commit_timestamp.timestamp_micros();
                self.xid = transaction_id;
                self.in_transaction = true;
                return Ok(None);
            }
            EventType::Commit { end_lsn, .. } => {
                self.in_transaction = false;
                return Ok(Some(SourceMsg::Commit {
                    lsn: Lsn(end_lsn.value()),
                    xid: self.xid,
                }));
            }
            EventType::Message {
                prefix,
                content,
                message_lsn,
                flags,
            } => {
                if flags & 1 == 1 && *prefix == *self.config.watermark_prefix {
                    return Ok(Some(SourceMsg::Watermark(
                        String::from_utf8_lossy(&content).into_owned(),
                    )));
                }
                if *prefix != *self.config.heartbeat_prefix {
                    return Ok(None);
                }
                let emitted_us = std::str::from_utf8(&content)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                return Ok(Some(SourceMsg::Heartbeat {
                    lsn: Lsn(message_lsn.value()),
                    emitted_us,
                }));
            }
            EventType::Insert { data, .. } => Change::Insert {
                new: self.row(&data),
            },
            EventType::Update {
                old_data, new_data, ..
            } => {
                let new = self.row(&new_data);
                let old_key = old_data
                    .map(|o| self.row(&o))
                    .and_then(|o| o.key(&self.config.key_positions));
                let new_key = new.key(&self.config.key_positions);
                let old_key = match (old_key, new_key) {
                    (Some(old), Some(new)) if old == new => None,
                    (old, _) => old,
                };
                Change::Update { old_key, new }
            }
            EventType::Delete { old_data, .. } => {
                let key = self
                    .row(&old_data)
                    .key(&self.config.key_positions)
                    .ok_or_else(|| {
                        "a DELETE arrived without its key columns (check REPLICA IDENTITY)"
                            .to_string()
                    })?;
                Change::Delete { key }
            }
            EventType::Truncate { .. } => Change::Truncate,
            EventType::Relation { columns, .. } => {
                let names: Vec<&str> = columns.iter().map(|c| c.name.as_ref()).collect();
                for needed in self.config.columns.iter() {
                    if !names.contains(&needed.as_str()) {
                        return Err(format!(
                            "source column {needed} disappeared from the replicated table; the pipeline cannot continue"
                        ));
                    }
                }
                if !self.config.carry_added_columns {
                    return Ok(None);
                }
                let added: Vec<String> = names
                    .iter()
                    .filter(|n| !self.columns.iter().any(|c| c == *n))
                    .map(|n| n.to_string())
                    .collect();
                if added.is_empty() {
                    return Ok(None);
                }
                self.columns.extend(added.iter().cloned());
                return Ok(Some(SourceMsg::ColumnsAdded(added)));
            }
            _ => return Ok(None),
        };
        Ok(Some(SourceMsg::Change(ChangeEvent {
            change,
            commit_lsn: self.commit_lsn,
            commit_ts_us: self.commit_ts_us,
            xid: self.xid,
        })))
    }

    /// Aligns a pgoutput tuple to the source column list. Columns pgoutput
    /// skipped (unchanged TOAST) stay `Absent`.
    fn row(&self, data: &RowData) -> Row {
        let n = self.columns.len();
        let mut cells = vec![Cell::Absent; n];
        let mut cursor = 0;
        for (name, value) in data.iter() {
            let pos = (0..n)
                .map(|i| (cursor + i) % n)
                .find(|&i| *self.columns[i] == **name);
            if let Some(pos) = pos {
                cells[pos] = Cell::Present(text_value(value));
                cursor = pos + 1;
            }
        }
        Row { cells }
    }
}

fn text_value(value: &ColumnValue) -> Option<String> {
    match value {
        ColumnValue::Null => None,
        // `from_utf8` checks ASCII a word at a time; the lossy variant,
        // only needed for bytes that are not UTF-8, goes byte by byte.
        ColumnValue::Text(b) | ColumnValue::Binary(b) => Some(match std::str::from_utf8(b) {
            Ok(s) => s.to_owned(),
            Err(_) => String::from_utf8_lossy(b).into_owned(),
        }),
    }
}
