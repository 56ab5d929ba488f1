//! Contract: after a cut-over, drop the old side for good.
//!
//! Refused before `cutover.reverse_window_s` has passed since the cut-over
//! unless the operator confirms. Steps, each idempotent, so a crash anywhere
//! is finished by running `contract` again: phase `contracting` (the runner
//! sees it and stops) → both replication slots → both publications → the
//! old table → backfill and repair bookkeeping → phase `contracted`.

use crate::error::{Error, Result};
use crate::runtime::control::drop_slot;
use crate::source::postgres::connect;
use crate::spec::{quote_ident, Pipeline};
use crate::state::{self, Phase};
use std::time::{Duration, Instant};

/// Contracts a cut-over pipeline; returns what was removed.
pub async fn contract(p: &Pipeline, confirm: bool) -> Result<Vec<String>> {
    let dsn = p.source_dsn()?;
    let control = connect(&dsn, "contract").await?;
    let record = state::load(&control, &p.name)
        .await?
        .ok_or_else(|| Error::State(format!("pipeline {} has not been run", p.name)))?;
    match record.phase.as_str() {
        "contracted" => return Ok(vec![format!("pipeline {} is already contracted", p.name)]),
        "contracting" => {}
        "cut_over" => {
            let since: f64 = control
                .query_one(
                    "SELECT coalesce(extract(epoch FROM now() - cut_over_at)::float8, 0) FROM rowshift.pipelines WHERE name = $1",
                    &[&p.name],
                )
                .await
                .map_err(Error::db("read cut-over time"))?
                .get(0);
            let window = p.cutover.reverse_window_s as f64;
            if !confirm && since < window {
                return Err(Error::State(format!(
                    "the reverse window is open for another {:.0} s (cutover.reverse_window_s = {}); \
                     contract drops the old table for good, so confirm with --confirm or wait",
                    window - since,
                    p.cutover.reverse_window_s
                )));
            }
        }
        other => {
            return Err(Error::State(format!(
                "pipeline {} is {other}; contract follows a cut-over (`rowshift cutover {}`)",
                p.name, p.name
            )))
        }
    }
    state::set_phase(&control, &p.name, Phase::Contracting, None).await?;
    let mut done = Vec::new();
    // The runner stops when it sees `contracting`; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(15);
    while state::lease_held(&control, &p.name).await? && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for slot in [p.slot_name(), p.reverse_slot_name()] {
        if drop_slot(&control, &slot).await? {
            done.push(format!("dropped replication slot {slot}"));
        }
    }
    for publication in [p.publication_name(), p.reverse_publication_name()] {
        control
            .batch_execute(&format!(
                "DROP PUBLICATION IF EXISTS {}",
                quote_ident(&publication)
            ))
            .await
            .map_err(Error::db("drop publication"))?;
    }
    done.push("dropped the publications".into());
    let old = &p.cutover.old_table;
    control
        .batch_execute(&format!("DROP TABLE IF EXISTS {}", old.quoted()))
        .await
        .map_err(|e| Error::State(format!(
            "could not drop the old table {old}: {} (drop or re-point what depends on it, then run contract again)",
            crate::error::db_text(&e)
        )))?;
    done.push(format!("dropped the old table {old}"));
    control
        .execute(
            "DELETE FROM rowshift.backfill_ranges WHERE pipeline = $1",
            &[&p.name],
        )
        .await
        .map_err(Error::db("clear ranges"))?;
    control
        .execute(
            "DELETE FROM rowshift.repairs WHERE pipeline = $1",
            &[&p.name],
        )
        .await
        .map_err(Error::db("clear repairs"))?;
    state::set_phase(&control, &p.name, Phase::Contracted, None).await?;
    done.push(format!("pipeline {} is contracted", p.name));
    Ok(done)
}
