//! Versioned migrations: `rowshift migrate status|up|undo|validate|repair|
//! baseline|history|lint|approve`.
//!
//! Files and their metadata are described in [`files`], the run order in
//! [`graph`], the history tables in [`history`], lint rules in [`lint`],
//! approvals and hooks in [`policy`]. Decisions:
//!
//! - `up` first validates (any drift refuses the run, listing every finding),
//!   then checks the approval policy for every migration it is about to run
//!   (refusing, with the reasons, before running any), then runs them in the
//!   graph's order, each in its own transaction with its history row, unless
//!   it cannot run in one (a statement such as `CREATE INDEX CONCURRENTLY`,
//!   or `-- transactional: false`): then statement by statement. The first
//!   failure is recorded (`success = false`) and stops the run; further runs
//!   are refused until `repair` removes the failed row.
//! - One session-level advisory lock per database serialises runners: a
//!   second `up` waits, then reads the history afresh and finds nothing left.
//! - A migration limited to other environments is skipped, not pending.

pub mod files;
pub mod graph;
pub mod history;
pub mod lint;
pub mod policy;
mod run;

pub use run::{approve, baseline, repair, undo, up};

use crate::error::{Error, Result};
use files::{Catalog, Migration, Version};
use graph::{render_cycle, Graph};
use history::Applied;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tokio_postgres::Client;

/// Options shared by the subcommands.
#[derive(Debug, Clone)]
pub struct Options {
    /// The migrations folder (one subfolder per service).
    pub dir: PathBuf,
    pub service: Option<String>,
    pub env: Option<String>,
    pub target: Option<Version>,
    pub dry_run: bool,
    /// Schema of the history tables.
    pub schema: String,
    pub config: Option<PathBuf>,
    /// Affirms that a maintenance window is open (for risks that need one).
    pub maintenance_window: bool,
    /// Who runs or approves (defaults to `$USER`).
    pub by: Option<String>,
}

impl Options {
    fn who(&self) -> String {
        self.by
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "unknown".into())
    }
}

/// Reads the migration files of the selected services. Dependencies on
/// other services need those services' files, so all are read and the
/// selection is applied by the callers.
pub fn catalog(opts: &Options) -> Result<Catalog> {
    files::load(&opts.dir, None).map_err(|e| Error::Config {
        reason: format!("cannot read migrations in {}: {e}", opts.dir.display()),
    })
}

fn selected<'a>(opts: &'a Options, catalog: &'a Catalog) -> Result<Vec<&'a str>> {
    match &opts.service {
        Some(s) if !catalog.services.contains_key(s) => Err(Error::Config {
            reason: format!("no service {s} in {}", opts.dir.display()),
        }),
        Some(s) => Ok(vec![s.as_str()]),
        None => Ok(catalog.services.keys().map(|s| s.as_str()).collect()),
    }
}

/// Histories of the given services (one query each).
async fn histories(
    client: &Client,
    opts: &Options,
    services: &[&str],
) -> Result<BTreeMap<String, Vec<Applied>>> {
    let mut out = BTreeMap::new();
    for s in services {
        out.insert(s.to_string(), history::load(client, &opts.schema, s).await?);
    }
    Ok(out)
}

/// The state of one version in one service.
#[derive(Debug, Clone, Serialize)]
pub struct StatusRow {
    pub service: String,
    pub version: String,
    pub description: String,
    /// applied, pending, failed, undone (pending again), baseline, below baseline,
    /// skipped (other environment), missing (applied, file gone), changed (checksum)
    pub state: String,
    pub applied_at: Option<String>,
    pub risk: String,
}

fn baseline_of(applied: &[Applied]) -> Option<Version> {
    applied
        .iter()
        .filter(|a| a.kind == "BASELINE" && a.in_effect())
        .filter_map(|a| a.version())
        .max()
}

/// The row of `m` in effect, if any.
fn in_effect<'a>(applied: &'a [Applied], m: &Migration) -> Option<&'a Applied> {
    applied
        .iter()
        .rev()
        .find(|a| a.kind == "SQL" && a.in_effect() && a.version().as_ref() == Some(&m.version))
}

fn failed<'a>(applied: &'a [Applied], m: &Migration) -> Option<&'a Applied> {
    applied
        .iter()
        .rev()
        .find(|a| a.kind == "SQL" && !a.success && a.version().as_ref() == Some(&m.version))
}

/// Whether `m` still has to run here.
fn is_pending(applied: &[Applied], m: &Migration, env: Option<&str>) -> bool {
    let below_baseline = baseline_of(applied).is_some_and(|b| m.version <= b);
    !below_baseline
        && m.runs_in(env)
        && in_effect(applied, m).is_none()
        && failed(applied, m).is_none()
}

pub async fn status(client: &Client, opts: &Options) -> Result<Vec<StatusRow>> {
    let catalog = catalog(opts)?;
    let services = selected(opts, &catalog)?;
    let hist = histories(client, opts, &services).await?;
    let env = opts.env.as_deref();
    let mut rows = Vec::new();
    for s in &services {
        let applied = hist.get(*s).map(|v| v.as_slice()).unwrap_or(&[]);
        let baseline = baseline_of(applied);
        for m in catalog.services.get(*s).into_iter().flatten() {
            let row = in_effect(applied, m);
            let state = if let Some(a) = row {
                if a.checksum.as_deref() != Some(m.checksum.as_str()) {
                    "changed"
                } else {
                    "applied"
                }
            } else if failed(applied, m).is_some() {
                "failed"
            } else if baseline.as_ref().is_some_and(|b| &m.version <= b) {
                if baseline.as_ref() == Some(&m.version) {
                    "baseline"
                } else {
                    "below baseline"
                }
            } else if !m.runs_in(env) {
                "skipped (other environment)"
            } else if applied
                .iter()
                .any(|a| a.version().as_ref() == Some(&m.version) && a.undone_at.is_some())
            {
                "undone"
            } else {
                "pending"
            };
            rows.push(StatusRow {
                service: s.to_string(),
                version: m.version.text.clone(),
                description: m.description.clone(),
                state: state.into(),
                applied_at: row.map(|a| a.applied_at.clone()),
                risk: m.meta.risk.as_str().into(),
            });
        }
        for a in applied.iter().filter(|a| a.kind == "SQL" && a.in_effect()) {
            let known = a.version().is_some_and(|v| {
                catalog
                    .services
                    .get(*s)
                    .is_some_and(|ms| ms.iter().any(|m| m.version == v))
            });
            if !known {
                rows.push(StatusRow {
                    service: s.to_string(),
                    version: a.version.clone(),
                    description: a.description.clone(),
                    state: "missing".into(),
                    applied_at: Some(a.applied_at.clone()),
                    risk: String::new(),
                });
            }
        }
    }
    Ok(rows)
}

/// One `validate` finding.
#[derive(Debug, Clone, Serialize)]
pub struct Drift {
    pub kind: &'static str,
    pub service: String,
    pub version: Option<String>,
    pub message: String,
}

/// Every drift between files and histories, and every problem of the files.
pub async fn validate(client: &Client, opts: &Options) -> Result<Vec<Drift>> {
    let catalog = catalog(opts)?;
    let services = selected(opts, &catalog)?;
    let hist = histories(client, opts, &services).await?;
    Ok(drift(&catalog, &services, &hist, opts.env.as_deref()))
}

fn drift(
    catalog: &Catalog,
    services: &[&str],
    hist: &BTreeMap<String, Vec<Applied>>,
    env: Option<&str>,
) -> Vec<Drift> {
    let mut out: Vec<Drift> = catalog
        .problems
        .iter()
        .map(|p| Drift {
            kind: "bad file",
            service: String::new(),
            version: None,
            message: format!("{}: {}", p.file, p.reason),
        })
        .collect();
    let g = Graph::new(catalog);
    for (m, dep) in &g.unknown {
        if services.contains(&m.service.as_str()) {
            out.push(Drift {
                kind: "unknown dependency",
                service: m.service.clone(),
                version: Some(m.version.text.clone()),
                message: format!("{} depends on {dep}, which does not exist", m.id()),
            });
        }
    }
    for cycle in g.cycles() {
        if cycle.iter().any(|(s, _)| services.contains(&s.as_str())) {
            out.push(Drift {
                kind: "dependency cycle",
                service: cycle[0].0.clone(),
                version: Some(cycle[0].1.text.clone()),
                message: render_cycle(&cycle),
            });
        }
    }
    for s in services {
        let applied = hist.get(*s).map(|v| v.as_slice()).unwrap_or(&[]);
        let files = catalog
            .services
            .get(*s)
            .map(|v| v.as_slice())
            .unwrap_or(&[]);
        let newest = applied
            .iter()
            .filter(|a| a.kind == "SQL" && a.in_effect())
            .filter_map(|a| a.version())
            .max();
        for m in files {
            if let Some(a) = in_effect(applied, m) {
                if a.checksum.as_deref() != Some(m.checksum.as_str()) {
                    out.push(Drift {
                        kind: "checksum mismatch",
                        service: s.to_string(),
                        version: Some(m.version.text.clone()),
                        message: format!(
                            "{} changed after it was applied (applied {}, file now {})",
                            m.path.display(),
                            a.checksum
                                .as_deref()
                                .map(|c| &c[..12.min(c.len())])
                                .unwrap_or("-"),
                            &m.checksum[..12]
                        ),
                    });
                }
            } else if let Some(f) = failed(applied, m) {
                out.push(Drift {
                    kind: "failed",
                    service: s.to_string(),
                    version: Some(m.version.text.clone()),
                    message: format!(
                        "{} failed on {}: {}; fix it and run `rowshift migrate repair`",
                        m.id(),
                        f.applied_at,
                        f.error.as_deref().unwrap_or("?")
                    ),
                });
            } else if is_pending(applied, m, env) && newest.as_ref().is_some_and(|n| &m.version < n)
            {
                out.push(Drift {
                    kind: "out of order",
                    service: s.to_string(),
                    version: Some(m.version.text.clone()),
                    message: format!(
                        "{} is pending but older than the newest applied version {}",
                        m.id(),
                        newest.as_ref().map(|v| v.text.as_str()).unwrap_or("")
                    ),
                });
            }
        }
        for a in applied.iter().filter(|a| a.kind == "SQL" && a.in_effect()) {
            if !files
                .iter()
                .any(|m| Some(&m.version) == a.version().as_ref())
            {
                out.push(Drift {
                    kind: "missing file",
                    service: s.to_string(),
                    version: Some(a.version.clone()),
                    message: format!("{s}:{} is applied but its file is gone", a.version),
                });
            }
        }
    }
    out
}

/// Lints every selected file (no database needed).
pub fn lint_all(opts: &Options) -> Result<Vec<lint::Finding>> {
    let catalog = catalog(opts)?;
    let services = selected(opts, &catalog)?;
    let mut out = Vec::new();
    for s in services {
        for m in catalog.services.get(s).into_iter().flatten() {
            out.extend(lint::lint(&m.path.display().to_string(), &m.sql));
        }
    }
    Ok(out)
}

/// The history rows of the selected services (audit export).
pub async fn history_rows(client: &Client, opts: &Options) -> Result<Vec<Applied>> {
    let catalog = catalog(opts)?;
    let services: Vec<&str> = match &opts.service {
        Some(s) => vec![s.as_str()],
        None => catalog.services.keys().map(|s| s.as_str()).collect(),
    };
    Ok(histories(client, opts, &services)
        .await?
        .into_values()
        .flatten()
        .collect())
}

/// CSV of serialisable rows (header from the first row's fields).
pub fn to_csv<T: Serialize>(rows: &[T]) -> Result<String> {
    let mut out = String::new();
    let values: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| serde_json::to_value(r).map_err(|e| Error::Migrate(e.to_string())))
        .collect::<Result<_>>()?;
    let Some(serde_json::Value::Object(first)) = values.first() else {
        return Ok(out);
    };
    let keys: Vec<String> = first.keys().cloned().collect();
    out.push_str(&keys.join(","));
    out.push('\n');
    for v in &values {
        let cells: Vec<String> = keys
            .iter()
            .map(|k| {
                let cell = match v.get(k) {
                    None | Some(serde_json::Value::Null) => String::new(),
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                };
                if cell.contains([',', '"', '\n']) {
                    format!("\"{}\"", cell.replace('"', "\"\""))
                } else {
                    cell
                }
            })
            .collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    Ok(out)
}
