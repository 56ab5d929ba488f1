//! Throttle signals: the backfill pauses (the stream keeps applying) while
//! the slot lags too far, retains too much WAL, a standby replays too
//! slowly, or the operator's query says so. Only says yes or no (gh-ost's
//! throttler role); checked at most once per `check_interval_ms`.

use crate::error::{Error, Result};
use crate::source::postgres::introspect::slot_lag;
use crate::spec::Throttle;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

pub struct Throttler {
    spec: Throttle,
    slot: String,
    last_check: Option<Instant>,
    reason: Option<String>,
}

impl Throttler {
    pub fn new(spec: Throttle, slot: String) -> Throttler {
        Throttler {
            spec,
            slot,
            last_check: None,
            reason: None,
        }
    }

    /// The current reason to throttle, re-evaluated when the interval passed.
    pub async fn check(&mut self, client: &Client) -> Result<Option<String>> {
        let due = self
            .last_check
            .map(|t| t.elapsed() >= Duration::from_millis(self.spec.check_interval_ms))
            .unwrap_or(true);
        if due {
            self.last_check = Some(Instant::now());
            self.reason = self.evaluate(client).await?;
        }
        Ok(self.reason.clone())
    }

    async fn evaluate(&self, client: &Client) -> Result<Option<String>> {
        if self.spec.max_slot_lag_bytes.is_some() || self.spec.max_retained_wal_bytes.is_some() {
            if let Some((lag, retained, _)) = slot_lag(client, &self.slot).await? {
                if let Some(max) = self.spec.max_slot_lag_bytes {
                    if lag as u64 > max {
                        return Ok(Some(format!(
                            "slot lag {lag} bytes > max_slot_lag_bytes {max}"
                        )));
                    }
                }
                if let Some(max) = self.spec.max_retained_wal_bytes {
                    if retained as u64 > max {
                        return Ok(Some(format!(
                            "slot retains {retained} bytes of WAL > max_retained_wal_bytes {max}"
                        )));
                    }
                }
            }
        }
        if let Some(max) = self.spec.max_replica_lag_ms {
            let row = client
                .query_one(
                    "SELECT coalesce(max(extract(epoch FROM replay_lag) * 1000), 0)::int8 FROM pg_stat_replication WHERE application_name NOT LIKE 'rowshift%'",
                    &[],
                )
                .await
                .map_err(Error::db("read replica lag"))?;
            let lag: i64 = row.get(0);
            if lag as u64 > max {
                return Ok(Some(format!(
                    "replica lag {lag} ms > max_replica_lag_ms {max}"
                )));
            }
        }
        if let Some(q) = &self.spec.query {
            let row = client
                .query_one(q.as_str(), &[])
                .await
                .map_err(Error::db("run throttle.query"))?;
            let throttle: bool = row
                .try_get(0)
                .map_err(Error::db("throttle.query must return one boolean"))?;
            if throttle {
                return Ok(Some("throttle.query returned true".into()));
            }
        }
        Ok(None)
    }
}
