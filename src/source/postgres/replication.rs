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
//! Heartbeats are non-transactional logical messages
//! (`pg_logical_emit_message(false, prefix, now)`) written once a second by
//! the runtime. They keep the slot moving when the table is idle (other
//! tables' WAL would otherwise pile up behind it) and measure end-to-end lag.

use crate::error::{Error, Result};
use crate::model::{Cell, Change, ChangeEvent, Lsn, Row, SourceMsg};
use pg_walstream::{
    CancellationToken, ColumnValue, EventType, LogicalReplicationStream, ReplicationStreamConfig,
    RowData, SharedLsnFeedback,
};
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
}

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
    let stream_config =
        ReplicationStreamConfig::builder(config.slot.clone(), config.publication.clone())
            .with_protocol_version(1)
            .with_messages(true)
            .with_feedback_interval(Duration::from_millis(200))
            .with_connection_timeout(Duration::from_secs(15));
    // libpq connects and starts replication with blocking calls: keep them
    // off the runtime's worker (the process runs one, see main.rs).
    let dsn = super::replication_dsn(&config.dsn);
    let stream = crate::blocking::run(async {
        let mut stream = LogicalReplicationStream::new(&dsn, stream_config)
            .await
            .map_err(|e| Error::Replication(format!("connect: {e}")))?;
        stream
            .start(config.start_lsn.map(|l| l.0))
            .await
            .map_err(|e| {
                Error::Replication(format!("START_REPLICATION on slot {}: {e}", config.slot))
            })?;
        Ok::<_, Error>(stream)
    })
    .await?;
    let feedback: Arc<SharedLsnFeedback> = stream.shared_lsn_feedback.clone();
    let ack: AckFn = Arc::new(move |lsn: Lsn| feedback.update_applied_lsn(lsn.0));
    let (tx, rx) = mpsc::channel(capacity);
    let mut events = stream.into_stream(cancel.clone());
    let handle = tokio::spawn(async move {
        let mut decoder = Decoder::new(config);
        loop {
            let event = match events.next_event().await {
                Ok(e) => e,
                Err(pg_walstream::ReplicationError::Cancelled(_)) => break,
                Err(e) => {
                    let _ = tx.send(SourceMsg::Failed(e.to_string())).await;
                    break;
                }
            };
            let msg = match decoder.decode(event.event_type) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(reason) => SourceMsg::Failed(reason),
            };
            let failed = matches!(msg, SourceMsg::Failed(_));
            if tx.send(msg).await.is_err() || failed {
                break;
            }
        }
        if let Err(e) = events.shutdown().await {
            tracing::debug!(error = %e, "replication stream shutdown");
        }
    });
    Ok((rx, ack, handle))
}

/// Turns pgoutput events into source messages, tracking the open transaction.
struct Decoder {
    config: ReaderConfig,
    /// `config.columns`, then the added columns carried.
    columns: Vec<String>,
    commit_lsn: Lsn,
    commit_ts_us: i64,
    xid: u32,
}

impl Decoder {
    fn new(config: ReaderConfig) -> Decoder {
        Decoder {
            columns: config.columns.to_vec(),
            config,
            commit_lsn: Lsn::ZERO,
            commit_ts_us: 0,
            xid: 0,
        }
    }

    fn decode(&mut self, event: EventType) -> Result<Option<SourceMsg>, String> {
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
                return Ok(None);
            }
            EventType::Commit { end_lsn, .. } => {
                return Ok(Some(SourceMsg::Commit {
                    lsn: Lsn(end_lsn.value()),
                    xid: self.xid,
                }))
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
        ColumnValue::Text(b) | ColumnValue::Binary(b) => {
            Some(String::from_utf8_lossy(b).into_owned())
        }
    }
}
