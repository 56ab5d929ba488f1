//! Cut-over and rollback: the readiness gate, the lock, the fence, the swap.
//!
//! Both directions run the same procedure (invariant 5):
//!
//! 1. **Gate** — the pipeline's runner is alive, the active stream lags less
//!    than `cutover.max_lag_ms`, (cut-over only) a clean verification is
//!    younger than `cutover.verify_max_age_s`, names are free. Printed as a
//!    checklist; any "not ready" stops here with its reason.
//! 2. **Prepare** — the stream that will run after the swap gets its
//!    publication and slot *now*, before the lock: creating a slot waits for
//!    running transactions, which would include the lock holder.
//! 3. **Lock** — `LOCK TABLE live IN EXCLUSIVE MODE` under `lock_timeout`,
//!    retried `lock_attempts` times with doubling, jittered backoff; each
//!    failure names the sessions holding locks on the table. EXCLUSIVE stops
//!    every write and still lets reads through, so the applier can re-read
//!    rows of the live table while it drains (a re-read blocked by the lock
//!    would never reach the fence); the swap upgrades to ACCESS EXCLUSIVE.
//! 4. **Fence** — with the lock held no write to the live table can commit,
//!    and every write that did is below the WAL position of a message
//!    written now (flushed at once). The runner's stream confirms it applied
//!    up to that message (its heartbeat handling); only then is everything
//!    the live table ever committed in the other table.
//! 5. **Swap** — in the locked transaction: renames, sequences, views,
//!    foreign keys (`NOT VALID`), grants, owner, carried triggers (see
//!    [`swap`]); publication membership moves from the old stream to the new
//!    one; the pipeline row records the new direction and the WAL position
//!    the new stream starts from. One commit: after a crash either nothing
//!    happened or all of it, so exactly one table carries the live name.
//!    The write pause (lock acquired → commit returned) is stored.
//! 6. **After** — the referencing foreign keys are validated (this does not
//!    block writes); the runner notices the new direction and switches
//!    streams.
//!
//! The stream that was switched off cannot echo the other's writes back:
//! its publication no longer contains its table (publication membership is
//! read with the decoding snapshot), its checkpoints name the direction, and
//! the stream that takes over starts at the swap's WAL position, so it skips
//! every transaction that committed before the swap.

mod contract;
mod gate;
mod lock;
pub mod reverse;
mod swap;

pub use contract::contract;
use gate::gate;
pub use gate::{render_checklist, Check};
use lock::lock_timed_out;

use crate::error::{Error, Result};
use crate::failpoint;
use crate::model::{now_us, Lsn};
use crate::runtime::heartbeat_prefix;
use crate::source::postgres::connect;
use crate::spec::{quote_ident, Pipeline, Source, TableName};
use crate::state::{self, Phase, PipelineRecord};
use crate::verify::wait_applied;
use serde::Serialize;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Which way the swap goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Old table live → new table live.
    Cutover,
    /// New table live → old table live.
    Rollback,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Cutover => "cutover",
            Kind::Rollback => "rollback",
        }
    }
}

/// What a cut-over or rollback did.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub checklist: Vec<Check>,
    pub attempts: u32,
    pub pause_ms: f64,
    pub fence_lsn: String,
    pub swap_lsn: String,
    pub notes: Vec<String>,
}

/// The tables in play for a swap of `kind`.
fn names(p: &Pipeline, kind: Kind) -> swap::Names {
    match kind {
        Kind::Cutover => swap::Names {
            leaving: p.source_table.clone(),
            leaving_to: p.cutover.old_table.clone(),
            incoming: p.target_table.clone(),
            live: p.source_table.clone(),
        },
        Kind::Rollback => swap::Names {
            leaving: p.source_table.clone(),
            leaving_to: p.target_table.clone(),
            incoming: p.cutover.old_table.clone(),
            live: p.source_table.clone(),
        },
    }
}

/// (new table, old table) names while `reverse` is (not) active.
pub fn new_and_old(p: &Pipeline, reverse: bool) -> (TableName, TableName) {
    if reverse {
        (p.source_table.clone(), p.cutover.old_table.clone())
    } else {
        (p.target_table.clone(), p.source_table.clone())
    }
}

/// Runs the gate and, if it passes, the swap.
pub async fn switch(p: &Pipeline, kind: Kind) -> Result<Outcome> {
    let dsn = p.source_dsn()?;
    let mut control = connect(&dsn, "cutover").await?;
    let record = state::load(&control, &p.name)
        .await?
        .ok_or_else(|| Error::State(format!("pipeline {} has not been run", p.name)))?;
    if record.spec_hash != crate::preflight::spec_hash(p) {
        return Err(Error::State(format!(
            "the pipeline file {} changed since pipeline {} started",
            p.file.display(),
            p.name
        )));
    }
    let checklist = gate(&control, p, &record, kind).await?;
    if checklist.iter().any(|c| !c.ok) {
        return Err(Error::State(format!(
            "{} of {} is not ready:\n{}",
            kind.as_str(),
            p.name,
            render_checklist(&checklist)
        )));
    }
    // A cut-over killed mid-way left its row "running".
    control
        .execute(
            "UPDATE rowshift.cutovers SET outcome = 'interrupted' WHERE pipeline = $1 AND outcome = 'running'",
            &[&p.name],
        )
        .await
        .map_err(Error::db("close interrupted cut-overs"))?;
    let previous_phase = record.phase.clone();
    let busy = match kind {
        Kind::Cutover => Phase::CuttingOver,
        Kind::Rollback => Phase::RollingBack,
    };
    state::set_phase(&control, &p.name, busy, None).await?;
    let created_slot = prepare_stream(&control, p, kind).await?;
    let id: i64 = control
        .query_one(
            "INSERT INTO rowshift.cutovers (pipeline, kind) VALUES ($1, $2) RETURNING id",
            &[&p.name, &kind.as_str()],
        )
        .await
        .map_err(Error::db("record cut-over"))?
        .get(0);
    failpoint::hit("cutover:before-lock").await;
    let result = attempt_swap(&mut control, p, &record, kind, id).await;
    match result {
        Ok(mut outcome) => {
            outcome.checklist = checklist;
            after_commit(&control, p, id, &mut outcome).await?;
            Ok(outcome)
        }
        Err(e) => {
            let reason = e.to_string();
            control
                .execute(
                    "UPDATE rowshift.cutovers SET outcome = $2, finished_at = now() WHERE id = $1",
                    &[&id, &format!("failed: {reason}")],
                )
                .await
                .map_err(Error::db("record cut-over failure"))?;
            control
                .execute(
                    "UPDATE rowshift.pipelines SET phase = $2, updated_at = now() WHERE name = $1 AND phase = $3",
                    &[&p.name, &previous_phase, &busy.as_str()],
                )
                .await
                .map_err(Error::db("restore phase"))?;
            if created_slot {
                let slot = incoming_slot(p, kind);
                crate::runtime::control::drop_slot(&control, &slot).await?;
            }
            state::audit(
                &control,
                &p.name,
                &format!("{} failed", kind.as_str()),
                &reason,
            )
            .await?;
            Err(e)
        }
    }
}

fn incoming_slot(p: &Pipeline, kind: Kind) -> String {
    match kind {
        Kind::Cutover => p.reverse_slot_name(),
        Kind::Rollback => p.slot_name(),
    }
}

/// Creates the publication and slot of the stream that runs after the swap.
/// Returns whether a slot was created (dropped again if the swap fails).
async fn prepare_stream(control: &Client, p: &Pipeline, kind: Kind) -> Result<bool> {
    if kind == Kind::Cutover {
        let exists = control
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&p.reverse_publication_name()],
            )
            .await
            .map_err(Error::db("look up publication"))?
            .is_some();
        if !exists {
            // Empty until the swap adds the new table to it.
            control
                .batch_execute(&format!(
                    "CREATE PUBLICATION {}",
                    quote_ident(&p.reverse_publication_name())
                ))
                .await
                .map_err(Error::db("create reverse publication"))?;
        }
    }
    let slot = incoming_slot(p, kind);
    let exists = control
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(Error::db("look up slot"))?
        .is_some();
    if !exists {
        control
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
            .map_err(Error::db("create slot for the stream after the swap"))?;
    }
    Ok(!exists)
}

/// Lock (with retries), fence, drain, swap, commit.
async fn attempt_swap(
    control: &mut Client,
    p: &Pipeline,
    record: &PipelineRecord,
    kind: Kind,
    id: i64,
) -> Result<Outcome> {
    let dsn = p.source_dsn()?;
    let mut conn = connect(&dsn, "cutover-lock").await?;
    let fence_conn = connect(&dsn, "cutover-fence").await?;
    fence_conn
        .batch_execute("SET synchronous_commit = on")
        .await
        .map_err(Error::db("prepare fence session"))?;
    let names = names(p, kind);
    let column_pairs: Vec<(String, String)> = p
        .mapping
        .iter()
        .filter_map(|m| match &m.source {
            Source::Column(c) => Some(match kind {
                Kind::Cutover => (c.clone(), m.target.clone()),
                Kind::Rollback => (m.target.clone(), c.clone()),
            }),
            Source::Expr(_) => None,
        })
        .collect();
    let lock_pid: i32 = conn
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .map_err(Error::db("read backend pid"))?
        .get(0);
    let mut blockers_seen: Vec<String> = Vec::new();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let tx = conn
            .build_transaction()
            .start()
            .await
            .map_err(Error::db("begin swap"))?;
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = '{}ms'",
            p.cutover.lock_timeout_ms
        ))
        .await
        .map_err(Error::db("set lock_timeout"))?;
        // EXCLUSIVE stops every write but lets reads through, including the
        // applier's re-reads of the live table while it drains to the fence;
        // the swap upgrades it to ACCESS EXCLUSIVE.
        let locked = tx
            .batch_execute(&format!(
                "LOCK TABLE {} IN EXCLUSIVE MODE",
                names.leaving.quoted()
            ))
            .await;
        if let Err(e) = locked {
            drop(tx);
            lock_timed_out(
                e,
                "lock the live table",
                control,
                p,
                id,
                attempt,
                &names.leaving,
                lock_pid,
                &mut blockers_seen,
            )
            .await?;
            continue;
        }
        let locked_at = Instant::now();
        failpoint::hit("cutover:locked").await;
        // The fence: a heartbeat of this pipeline, flushed by a commit.
        let fence_row = fence_conn
            .query_one(
                "WITH f AS (SELECT pg_logical_emit_message(false, $1, $2) AS lsn) \
                 SELECT lsn::text, txid_current() FROM f",
                &[&heartbeat_prefix(&p.name), &now_us().to_string()],
            )
            .await
            .map_err(Error::db("write the fence"))?;
        let fence = Lsn::parse(&fence_row.get::<_, String>(0)).unwrap_or(Lsn::ZERO);
        let drained = wait_applied(
            control,
            &p.name,
            fence,
            Duration::from_millis(p.cutover.drain_timeout_ms),
        )
        .await;
        if let Err(e) = drained {
            return Err(Error::State(format!(
                "the stream did not apply up to the fence under the lock ({e}); nothing was changed"
            )));
        }
        if !state::lease_held(control, &p.name).await? {
            return Err(Error::State(
                "the runner stopped before the fence was applied; nothing was changed".into(),
            ));
        }
        failpoint::hit("cutover:drained").await;
        let upgraded = tx
            .batch_execute(&format!(
                "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE; LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
                names.leaving.quoted(),
                names.incoming.quoted()
            ))
            .await;
        if let Err(e) = upgraded {
            drop(tx);
            lock_timed_out(
                e,
                "lock both tables for the swap",
                control,
                p,
                id,
                attempt,
                &names.leaving,
                lock_pid,
                &mut blockers_seen,
            )
            .await?;
            continue;
        }
        let plan = swap::build(&tx, &names, &column_pairs, &p.cutover.carry_triggers).await?;
        for stmt in &plan.statements {
            tx.batch_execute(stmt)
                .await
                .map_err(Error::db(format!("swap: {stmt}")))?;
        }
        let (switch_off, switch_on, on_table) = match kind {
            Kind::Cutover => (
                p.publication_name(),
                p.reverse_publication_name(),
                &names.leaving_to,
            ),
            Kind::Rollback => (
                p.reverse_publication_name(),
                p.publication_name(),
                &names.leaving_to,
            ),
        };
        // The leaving table (now under its new name) leaves the stream that
        // fed the other table; the table that is now live joins the other.
        tx.batch_execute(&format!(
            "ALTER PUBLICATION {} DROP TABLE {}; ALTER PUBLICATION {} ADD TABLE {}",
            quote_ident(&switch_off),
            on_table.quoted(),
            quote_ident(&switch_on),
            names.live.quoted()
        ))
        .await
        .map_err(Error::db("move publication membership"))?;
        let (phase, direction) = match kind {
            Kind::Cutover => (Phase::CutOver, "reverse"),
            Kind::Rollback => (Phase::RolledBack, "forward"),
        };
        let swap_lsn: String = tx
            .query_one(
                "UPDATE rowshift.pipelines SET phase = $2, direction = $3, \
                 start_lsn = pg_current_wal_insert_lsn(), updated_at = now(), \
                 cut_over_at = CASE WHEN $3 = 'reverse' THEN now() ELSE cut_over_at END \
                 WHERE name = $1 RETURNING start_lsn::text",
                &[&p.name, &phase.as_str(), &direction],
            )
            .await
            .map_err(Error::db("record the swap"))?
            .get(0);
        let to_validate: Vec<String> = plan
            .to_validate
            .iter()
            .map(|f| format!("{}|{}", f.table, f.name))
            .collect();
        tx.execute(
            "UPDATE rowshift.cutovers SET attempts = $2, fence_lsn = $3::text::pg_lsn, swap_lsn = $4::text::pg_lsn, \
             to_validate = $5, blockers = $6 WHERE id = $1",
            &[&id, &(attempt as i32), &fence.to_string(), &swap_lsn, &to_validate, &blockers_seen.join("; ")],
        )
        .await
        .map_err(Error::db("record the swap"))?;
        failpoint::hit("cutover:before-commit").await;
        tx.commit().await.map_err(Error::db("commit the swap"))?;
        let pause = locked_at.elapsed();
        let _ = record;
        return Ok(Outcome {
            checklist: Vec::new(),
            attempts: attempt,
            pause_ms: pause.as_secs_f64() * 1000.0,
            fence_lsn: fence.to_string(),
            swap_lsn,
            notes: plan.notes,
        });
    }
}

/// After the commit: store the pause, validate re-pointed foreign keys.
async fn after_commit(
    control: &Client,
    p: &Pipeline,
    id: i64,
    outcome: &mut Outcome,
) -> Result<()> {
    control
        .execute(
            "UPDATE rowshift.cutovers SET pause_ms = $2, outcome = 'done', finished_at = now() WHERE id = $1",
            &[&id, &outcome.pause_ms],
        )
        .await
        .map_err(Error::db("record the write pause"))?;
    failpoint::hit("cutover:committed").await;
    outcome
        .notes
        .extend(validate_pending(control, &p.name).await?);
    state::audit(
        control,
        &p.name,
        "swap",
        &format!(
            "write pause {:.1} ms after {} lock attempt(s)",
            outcome.pause_ms, outcome.attempts
        ),
    )
    .await
}

/// Validates foreign keys a swap re-created `NOT VALID` (also after a crash
/// between the commit and this step: the next cutover/rollback/status call
/// finishes it).
pub async fn validate_pending(control: &Client, name: &str) -> Result<Vec<String>> {
    let rows = control
        .query(
            "SELECT id, to_validate FROM rowshift.cutovers WHERE pipeline = $1 AND cardinality(to_validate) > 0 \
             AND outcome = 'done' ORDER BY id",
            &[&name],
        )
        .await
        .map_err(Error::db("read pending validations"))?;
    let mut notes = Vec::new();
    for r in rows {
        let id: i64 = r.get(0);
        for item in r.get::<_, Vec<String>>(1) {
            let Some((table, constraint)) = item.split_once('|') else {
                continue;
            };
            let sql = format!(
                "ALTER TABLE {table} VALIDATE CONSTRAINT {}",
                quote_ident(constraint)
            );
            match control.batch_execute(&sql).await {
                Ok(()) => notes.push(format!("validated foreign key {constraint} on {table}")),
                Err(e) => notes.push(format!(
                    "foreign key {constraint} on {table} stays NOT VALID: {}",
                    crate::error::db_text(&e)
                )),
            }
        }
        control
            .execute(
                "UPDATE rowshift.cutovers SET to_validate = '{}' WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(Error::db("clear pending validations"))?;
    }
    Ok(notes)
}
