//! The readiness gate of a cut-over or rollback: every condition is
//! checked and reported, so the operator sees all reasons at once.

use super::reverse::{reverse_mapping, Reverse};
use super::{names, new_and_old, Kind};
use crate::error::{Error, Result};
use crate::spec::Pipeline;
use crate::state::{self, PipelineRecord};
use serde::Serialize;
use tokio_postgres::Client;

/// One line of the readiness checklist.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub item: String,
    pub ok: bool,
    pub detail: String,
}

/// Renders the checklist, one line per item.
pub fn render_checklist(checks: &[Check]) -> String {
    checks
        .iter()
        .map(|c| {
            format!(
                "  [{}] {}: {}",
                if c.ok { "x" } else { " " },
                c.item,
                c.detail
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The readiness checklist.
pub(super) async fn gate(
    control: &Client,
    p: &Pipeline,
    record: &PipelineRecord,
    kind: Kind,
) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let mut check = |item: &str, ok: bool, detail: String| {
        checks.push(Check {
            item: item.to_string(),
            ok,
            detail,
        })
    };
    let (allowed, direction_ok): (&[&str], bool) = match kind {
        Kind::Cutover => (
            &["caught_up", "verified", "rolled_back", "cutting_over"],
            !record.reverse(),
        ),
        Kind::Rollback => (&["cut_over", "rolling_back"], record.reverse()),
    };
    let phase_ok = direction_ok && allowed.contains(&record.phase.as_str());
    check(
        "phase",
        phase_ok,
        if phase_ok {
            record.phase.clone()
        } else {
            format!(
                "{} (a {} needs one of: {})",
                record.phase,
                kind.as_str(),
                allowed.join(", ")
            )
        },
    );
    let runner = state::lease_held(control, &p.name).await?;
    check(
        "runner",
        runner,
        if runner {
            "running; it applies the stream up to the fence".into()
        } else {
            format!(
                "not running: start `rowshift run {}` first (it applies the stream up to the fence)",
                p.file.display()
            )
        },
    );
    let lag = control
        .query_one(
            "SELECT lag_ms, extract(epoch FROM now() - applied_at)::float8 FROM rowshift.pipelines WHERE name = $1",
            &[&p.name],
        )
        .await
        .map_err(Error::db("read lag"))?;
    let (lag_ms, applied_ago): (Option<i64>, Option<f64>) = (lag.get(0), lag.get(1));
    let lag_ok = matches!((lag_ms, applied_ago), (Some(l), Some(a)) if l as u64 <= p.cutover.max_lag_ms && a < 5.0);
    check(
        "lag",
        lag_ok,
        format!(
            "{} ms (limit {} ms), last batch applied {}",
            lag_ms.map(|l| l.to_string()).unwrap_or("-".into()),
            p.cutover.max_lag_ms,
            applied_ago
                .map(|a| format!("{a:.1} s ago"))
                .unwrap_or("never".into())
        ),
    );
    if kind == Kind::Cutover {
        let v = control
            .query_opt(
                "SELECT extract(epoch FROM now() - finished_at)::float8, mismatches - repaired, chunks \
                 FROM rowshift.verifications WHERE pipeline = $1 AND finished_at IS NOT NULL ORDER BY id DESC LIMIT 1",
                &[&p.name],
            )
            .await
            .map_err(Error::db("read verification"))?;
        let (ok, detail) = match v {
            None => (
                false,
                format!("never verified: run `rowshift verify {}`", p.name),
            ),
            Some(r) => {
                let (age, bad, chunks): (f64, i64, i64) = (r.get(0), r.get(1), r.get(2));
                if bad > 0 {
                    (false, format!("the last verification found {bad} mismatched chunks: `rowshift verify {} --repair`", p.name))
                } else if age > p.cutover.verify_max_age_s as f64 {
                    (false, format!("the last clean verification is {age:.0} s old (limit {} s): verify again", p.cutover.verify_max_age_s))
                } else {
                    (true, format!("clean, {chunks} chunks, {age:.0} s ago"))
                }
            }
        };
        check("verification", ok, detail);
        let same_schema = p.target_table.schema == p.source_table.schema;
        check(
            "schema",
            same_schema,
            if same_schema {
                format!(
                    "{} and {} share schema {}",
                    p.source_table, p.target_table, p.source_table.schema
                )
            } else {
                format!(
                    "the new table must be in schema {} to take the name {}",
                    p.source_table.schema, p.source_table
                )
            },
        );
    }
    let names = names(p, kind);
    let free = control
        .query_one(
            "SELECT to_regclass($1) IS NULL",
            &[&names.leaving_to.quoted()],
        )
        .await
        .map_err(Error::db("check name"))?
        .get::<_, bool>(0);
    check(
        "names",
        free,
        if free {
            format!("{} is free for the leaving table", names.leaving_to)
        } else {
            format!(
                "{} exists; the leaving table cannot take that name",
                names.leaving_to
            )
        },
    );
    let matviews: Vec<String> = control
        .query(
            "SELECT DISTINCT v.oid::regclass::text FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid \
             JOIN pg_class v ON v.oid = r.ev_class WHERE d.classid = 'pg_rewrite'::regclass \
             AND d.refobjid = $1::text::regclass AND v.relkind = 'm'",
            &[&names.leaving.quoted()],
        )
        .await
        .map_err(Error::db("read materialized views"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    check(
        "dependents",
        matviews.is_empty(),
        if matviews.is_empty() {
            "views, foreign keys, grants and sequences are carried in the swap".into()
        } else {
            format!(
                "materialized views {} depend on the table; rowshift cannot re-point them",
                matviews.join(", ")
            )
        },
    );
    let (new, old) = new_and_old(p, record.reverse());
    let reverse = reverse_mapping(control, p, &new, &old).await?;
    match (kind, reverse) {
        (Kind::Cutover, Reverse::Ready { not_carried, .. }) => {
            check(
                "rollback",
                true,
                if not_carried.is_empty() {
                    "possible: the reverse stream carries every old column".into()
                } else {
                    format!("possible; dropped columns {} get their default in rows written after cut-over", not_carried.join(", "))
                },
            )
        }
        (Kind::Cutover, Reverse::Refused(r)) => check(
            "rollback",
            true,
            format!("NOT possible after this cut-over: {}", r.join("; ")),
        ),
        (Kind::Rollback, Reverse::Ready { .. }) => check(
            "inverse mapping",
            true,
            "the old table is kept current".into(),
        ),
        (Kind::Rollback, Reverse::Refused(r)) => check(
            "inverse mapping",
            false,
            format!("rollback refused: {}", r.join("; ")),
        ),
    }
    Ok(checks)
}
