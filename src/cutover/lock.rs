//! Taking the live table's lock: what to do when `lock_timeout` expires
//! (name the sessions in the way, back off with jitter, give up after the
//! configured attempts).

use crate::error::{Error, Result};
use crate::spec::{Pipeline, TableName};
use rand::Rng;
use std::time::Duration;
use tokio_postgres::Client;

/// After a failed lock statement: anything but a lock timeout fails the
/// swap; a timeout records who held the table, fails once the attempts are
/// used up, and otherwise waits the backoff before the next attempt.
#[allow(clippy::too_many_arguments)]
pub(super) async fn lock_timed_out(
    e: tokio_postgres::Error,
    what: &'static str,
    control: &Client,
    p: &Pipeline,
    id: i64,
    attempt: u32,
    table: &TableName,
    lock_pid: i32,
    seen: &mut Vec<String>,
) -> Result<()> {
    if e.code() != Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
        return Err(Error::db(what)(e));
    }
    let blockers = lock_holders(control, table, lock_pid).await?;
    tracing::warn!(pipeline = %p.name, attempt, blockers = %blockers.join("; "), "lock not granted within lock_timeout");
    for b in blockers {
        if !seen.contains(&b) {
            seen.push(b);
        }
    }
    control
        .execute(
            "UPDATE rowshift.cutovers SET attempts = $2, blockers = $3 WHERE id = $1",
            &[&id, &(attempt as i32), &seen.join("; ")],
        )
        .await
        .map_err(Error::db("record lock attempt"))?;
    if attempt >= p.cutover.lock_attempts {
        return Err(Error::State(format!(
            "could not lock {table} in {attempt} attempts of {} ms; nothing was changed. Blocked by: {}",
            p.cutover.lock_timeout_ms,
            if seen.is_empty() {
                "sessions that have finished since".to_string()
            } else {
                seen.join("; ")
            }
        )));
    }
    tokio::time::sleep(backoff(attempt, p.cutover.backoff_max_ms)).await;
    Ok(())
}

/// Sessions holding a lock on `table` (other than ours), described without
/// their queries (which may carry row values).
async fn lock_holders(control: &Client, table: &TableName, ours: i32) -> Result<Vec<String>> {
    Ok(control
        .query(
            "SELECT DISTINCT a.pid, coalesce(a.application_name, ''), coalesce(a.usename::text, ''), \
                    coalesce(a.state, ''), coalesce(extract(epoch FROM now() - a.xact_start)::int8, 0), l.mode \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'relation' AND l.relation = $1::text::regclass AND l.granted \
               AND l.pid <> pg_backend_pid() AND l.pid <> $2 ORDER BY 1",
            &[&table.quoted(), &ours],
        )
        .await
        .map_err(Error::db("find blocking sessions"))?
        .iter()
        .map(|r| {
            let (pid, app, user, st, age, mode): (i32, String, String, String, i64, String) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
            format!("pid {pid} (application {app:?}, user {user}, {st}, transaction open {age} s, holds {mode})")
        })
        .collect())
}

/// Doubling backoff from 50 ms up to `max_ms`, with jitter (half to full).
fn backoff(attempt: u32, max_ms: u64) -> Duration {
    let ceiling = (50u64 << attempt.min(16)).min(max_ms).max(1);
    let ms = rand::thread_rng().gen_range(ceiling / 2..=ceiling);
    Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_ceiling() {
        for _ in 0..100 {
            let b = backoff(1, 2_000);
            assert!(b >= Duration::from_millis(50) && b <= Duration::from_millis(100));
            let c = backoff(10, 2_000);
            assert!(c >= Duration::from_millis(1_000) && c <= Duration::from_millis(2_000));
        }
    }
}
