//! When the reader may stream large transactions again after giving
//! streaming up (see [`super::streamed`]).
//!
//! The reader gives streaming up because of particular transactions: one
//! rolled back to a savepoint, or several held more than the memory limit.
//! Streaming them again would end the same way, so the reader stays without
//! streaming until none of them can be sent again:
//!
//! 1. none of those transactions is still running (each has committed or
//!    rolled back), checked against the server's current snapshot; then
//! 2. the slot's restart position has passed the WAL position read at that
//!    moment. A new connection decodes from the restart position, so every
//!    record of those transactions (their commits or aborts included) lies
//!    before where the walsender will begin, and none is streamed again.
//!
//! Only then does [`Watch::ready`] say yes, and the reader reconnects with
//! streaming at its next transaction boundary. The restart position moves
//! when the server logs its running transactions (every 15 s while WAL is
//! written, and at each checkpoint) and the slot is confirmed past that, so
//! streaming comes back some seconds after the last of those transactions
//! ended. A later transaction with the same trouble gives it up again.

use crate::model::Lsn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the watch asks the server.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// A background check of when streaming may come back; stops when dropped.
#[derive(Debug)]
pub struct Watch {
    ready: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watch {
    /// Watches the transactions `xids` (32-bit, as pgoutput names them) on
    /// the source, for the slot `slot`.
    pub fn start(dsn: String, slot: String, xids: Vec<u32>) -> Watch {
        let ready = Arc::new(AtomicBool::new(false));
        let flag = ready.clone();
        let task = tokio::spawn(async move {
            let xids: Vec<i64> = xids.into_iter().map(i64::from).collect();
            let mut ended_at: Option<Lsn> = None;
            let mut client = None;
            loop {
                tokio::time::sleep(CHECK_EVERY).await;
                if client.is_none() {
                    match super::connect(&dsn, "restream").await {
                        Ok(c) => client = Some(c),
                        Err(e) => {
                            tracing::debug!(error = %e, "restream watch: connect");
                            continue;
                        }
                    }
                }
                let Some(c) = client.as_ref() else { continue };
                match check(c, &slot, &xids, &mut ended_at).await {
                    Ok(true) => {
                        flag.store(true, Ordering::Relaxed);
                        return;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "restream watch: query");
                        client = None;
                    }
                }
            }
        });
        Watch { ready, task }
    }

    /// Whether none of the watched transactions can be streamed again.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// One step of the two in the module docs; true once both hold.
async fn check(
    c: &tokio_postgres::Client,
    slot: &str,
    xids: &[i64],
    ended_at: &mut Option<Lsn>,
) -> Result<bool, tokio_postgres::Error> {
    let Some(at) = *ended_at else {
        // In-progress transactions of the current snapshot, as 32-bit ids;
        // prepared transactions are among them.
        let running: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_snapshot_xip(pg_current_snapshot()) x \
                 WHERE (x::text::bigint & 4294967295) = ANY($1)",
                &[&xids],
            )
            .await?
            .get(0);
        if running == 0 {
            // Read after the snapshot, in a statement of its own: every
            // commit or abort record of those transactions lies below it
            // (insert position: an abort is not flushed at once).
            let lsn: String = c
                .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
                .await?
                .get(0);
            *ended_at = Lsn::parse(&lsn);
        }
        return Ok(false);
    };
    let passed: Option<bool> = c
        .query_opt(
            "SELECT restart_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
            &[&at.to_string(), &slot],
        )
        .await?
        .and_then(|r| r.get(0));
    Ok(passed == Some(true))
}
