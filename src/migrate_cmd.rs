//! `rowshift migrate ...`: argument handling and output for the migration
//! commands (the logic is in `rowshift::migrate`).

use crate::{MigrateAction, MigrateArgs, Output};
use anyhow::Context;
use rowshift::migrate::{self, files::Version, lint::Severity, Options};
use serde::Serialize;

/// Runs one migrate action; `Ok(false)` means "findings, exit 1".
pub async fn run(
    action: MigrateAction,
    version: Option<String>,
    a: &MigrateArgs,
) -> anyhow::Result<bool> {
    let target = match &a.target {
        Some(t) => {
            Some(Version::parse(t).with_context(|| format!("--target {t:?} is not a version"))?)
        }
        None => None,
    };
    let opts = Options {
        dir: a.dir.clone(),
        service: a.service.clone(),
        env: a.env.clone(),
        target,
        dry_run: a.dry_run,
        schema: a.schema.clone(),
        config: a.config.clone(),
        maintenance_window: a.maintenance_window,
        by: a.by.clone(),
    };
    if action == MigrateAction::Lint {
        let findings = migrate::lint_all(&opts)?;
        let errors = findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .count();
        emit(a.output, &findings, |f| {
            format!(
                "{}:{}: {:?} [{}] {}\n    fix: {}",
                f.file, f.line, f.severity, f.rule, f.message, f.fix
            )
        })?;
        if a.output == Output::Text {
            println!("{} finding(s), {errors} error(s)", findings.len());
        }
        return Ok(errors == 0);
    }
    let dsn = std::env::var(&a.dsn_env).with_context(|| {
        format!(
            "environment variable {} (the database DSN) is not set",
            a.dsn_env
        )
    })?;
    let mut client = rowshift::source::postgres::connect(&dsn, "migrate").await?;
    match action {
        MigrateAction::Status => {
            let rows = migrate::status(&client, &opts).await?;
            emit(a.output, &rows, |r| {
                format!(
                    "{:<12} {:<8} {:<28} {:<6} {} {}",
                    r.service,
                    r.version,
                    r.state,
                    r.risk,
                    r.description,
                    r.applied_at.as_deref().unwrap_or("")
                )
            })?;
        }
        MigrateAction::Validate => {
            let drift = migrate::validate(&client, &opts).await?;
            emit(a.output, &drift, |d| format!("{}: {}", d.kind, d.message))?;
            if a.output == Output::Text {
                println!("{} finding(s)", drift.len());
            }
            return Ok(drift.is_empty());
        }
        MigrateAction::History => {
            let rows = migrate::history_rows(&client, &opts).await?;
            emit(a.output, &rows, |r| {
                format!(
                    "{:<12} {:<8} {:<8} {:<5} {} by {} at {} ({} ms){}{}",
                    r.service,
                    r.version,
                    r.kind,
                    if r.success { "ok" } else { "FAIL" },
                    r.description,
                    r.applied_by,
                    r.applied_at,
                    r.execution_ms,
                    r.undone_at
                        .as_deref()
                        .map(|u| format!(", undone at {u}"))
                        .unwrap_or_default(),
                    r.error
                        .as_deref()
                        .map(|e| format!(", error: {e}"))
                        .unwrap_or_default()
                )
            })?;
        }
        MigrateAction::Up | MigrateAction::Undo => {
            let steps = if action == MigrateAction::Up {
                migrate::up(&mut client, &opts).await?
            } else {
                migrate::undo(&mut client, &opts).await?
            };
            emit(a.output, &steps, |s| {
                format!(
                    "{}:{} {} — {} ({} ms{})",
                    s.service,
                    s.version,
                    s.description,
                    s.outcome,
                    s.execution_ms,
                    if s.transactional {
                        ""
                    } else {
                        ", not transactional"
                    }
                )
            })?;
            if a.output == Output::Text && steps.is_empty() {
                println!("nothing to do");
            }
        }
        MigrateAction::Repair => {
            let done = migrate::repair(&mut client, &opts).await?;
            for line in &done {
                println!("{line}");
            }
            if done.is_empty() {
                println!("nothing to repair");
            }
        }
        MigrateAction::Baseline => println!("{}", migrate::baseline(&mut client, &opts).await?),
        MigrateAction::Approve => {
            let v = version.context("approve needs the VERSION argument")?;
            println!("{}", migrate::approve(&client, &opts, &v).await?);
        }
        MigrateAction::Lint => {}
    }
    Ok(true)
}

fn emit<T: Serialize>(
    output: Output,
    rows: &[T],
    text: impl Fn(&T) -> String,
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(rows)?),
        Output::Csv => print!("{}", migrate::to_csv(rows)?),
        Output::Text => {
            for r in rows {
                println!("{}", text(r));
            }
        }
    }
    Ok(())
}
