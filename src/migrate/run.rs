//! The commands that change the database: up, undo, repair, baseline,
//! approve. All of them run under the migration lock.

use super::files::{Catalog, Migration};
use super::graph::Graph;
use super::history::{self, Applied, Record};
use super::{
    catalog, drift, failed, histories, in_effect, is_pending, lint, policy, selected, Options,
};
use crate::error::{db_text, Error, Result};
use std::time::Instant;
use tokio_postgres::Client;

/// Takes the database-wide migration lock on `client` (a second runner
/// waits here, up to 5 minutes), and settles who is running.
async fn lock(client: &Client, opts: &mut Options) -> Result<()> {
    client
        .batch_execute("SET lock_timeout = '300s'; SELECT pg_advisory_lock(hashtext('rowshift:migrate')); SET lock_timeout = 0")
        .await
        .map_err(Error::db("take the migration lock (another runner holds it)"))?;
    if opts.by.is_none() {
        let user: String = match std::env::var("USER") {
            Ok(u) => u,
            Err(_) => client
                .query_one("SELECT current_user::text", &[])
                .await
                .map_err(Error::db("read current user"))?
                .get(0),
        };
        opts.by = Some(user);
    }
    Ok(())
}

async fn unlock(client: &Client) {
    let _ = client
        .batch_execute("SELECT pg_advisory_unlock(hashtext('rowshift:migrate'))")
        .await;
}

/// What `up` did (or, with `--dry-run`, would do).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Step {
    pub service: String,
    pub version: String,
    pub description: String,
    pub transactional: bool,
    pub execution_ms: i64,
    pub outcome: String,
}

/// Whether a migration runs in a transaction: the header decides when it
/// says `transactional: false`, otherwise the statements do.
fn transactional(m: &Migration) -> bool {
    if m.meta.transactional == Some(false) {
        return false;
    }
    match lint::parse(&m.sql) {
        Ok(parsed) => !lint::statements(&m.sql, &parsed)
            .iter()
            .any(|s| s.node.is_some_and(lint::non_transactional)),
        Err(_) => true,
    }
}

pub async fn up(client: &mut Client, opts: &Options) -> Result<Vec<Step>> {
    let catalog = catalog(opts)?;
    let services = selected(opts, &catalog)?;
    let opts = &mut opts.clone();
    lock(client, opts).await?;
    let result = up_locked(client, opts, &catalog, &services).await;
    unlock(client).await;
    result
}

async fn up_locked(
    client: &mut Client,
    opts: &Options,
    catalog: &Catalog,
    services: &[&str],
) -> Result<Vec<Step>> {
    let env = opts.env.as_deref();
    let all: Vec<&str> = catalog.services.keys().map(|s| s.as_str()).collect();
    let hist = histories(client, opts, &all).await?;
    let problems: Vec<String> = drift(catalog, services, &hist, env)
        .into_iter()
        .map(|d| format!("{}: {}", d.kind, d.message))
        .collect();
    if !problems.is_empty() {
        return Err(Error::Migrate(format!(
            "validate found {} problem(s); nothing was applied:\n  {}",
            problems.len(),
            problems.join("\n  ")
        )));
    }
    let graph = Graph::new(catalog);
    let order = graph
        .order()
        .ok_or_else(|| Error::Migrate("the dependency graph has a cycle".into()))?;
    let empty: Vec<Applied> = Vec::new();
    let applied_of = |s: &str| hist.get(s).unwrap_or(&empty);
    let pending = |m: &Migration| is_pending(applied_of(&m.service), m, env);
    let mut plan: Vec<&Migration> = order
        .into_iter()
        .filter(|m| services.contains(&m.service.as_str()) && pending(m))
        .collect();
    if let Some(t) = &opts.target {
        plan.retain(|m| &m.version <= t);
    }
    // Prerequisites outside the selection must already be applied.
    for m in &plan {
        for (s, v) in graph.prerequisites(m) {
            let Some(dep) = catalog
                .services
                .get(&s)
                .and_then(|ms| ms.iter().find(|d| d.version == v))
            else {
                continue;
            };
            let planned = plan.iter().any(|p| p.service == s && p.version == v);
            if !planned && pending(dep) {
                return Err(Error::Migrate(format!(
                    "{} depends on {s}:{v}, which is not applied; run `rowshift migrate up` for {s} first (or without --service)",
                    m.id()
                )));
            }
        }
    }
    // Lint errors in what is about to run refuse the run (suppress a finding
    // with `-- lint:allow <rule> <reason>` where it is intended).
    let lint_errors: Vec<String> = plan
        .iter()
        .flat_map(|m| lint::lint(&m.path.display().to_string(), &m.sql))
        .filter(|f| f.severity == lint::Severity::Error)
        .map(|f| {
            format!(
                "{}:{}: [{}] {}; fix: {}",
                f.file, f.line, f.rule, f.message, f.fix
            )
        })
        .collect();
    if !lint_errors.is_empty() {
        return Err(Error::Migrate(format!(
            "lint found {} error(s) in pending migrations; nothing was applied:\n  {}",
            lint_errors.len(),
            lint_errors.join("\n  ")
        )));
    }
    let config = policy::load(opts.config.as_deref())?;
    let mut refusals = Vec::new();
    for m in &plan {
        if let Some(r) = policy::refusal(
            &*client,
            &opts.schema,
            &config,
            m,
            env,
            opts.maintenance_window,
        )
        .await?
        {
            refusals.push(r);
        }
    }
    if !refusals.is_empty() {
        return Err(Error::Migrate(format!(
            "the approval policy of {} refuses; nothing was applied:\n  {}",
            env.unwrap_or("-"),
            refusals.join("\n  ")
        )));
    }
    let mut steps = Vec::new();
    for m in plan {
        let tx = transactional(m);
        let mut step = Step {
            service: m.service.clone(),
            version: m.version.text.clone(),
            description: m.description.clone(),
            transactional: tx,
            execution_ms: 0,
            outcome: "would apply".into(),
        };
        if opts.dry_run {
            steps.push(step);
            continue;
        }
        policy::run_hooks(&config, "pre", m, env, "pending")?;
        history::ensure(&*client, &opts.schema, &m.service).await?;
        let started = Instant::now();
        let result = execute(client, opts, m, tx).await;
        step.execution_ms = started.elapsed().as_millis() as i64;
        match result {
            Ok(()) => {
                step.outcome = "applied".into();
                policy::run_hooks(&config, "post", m, env, "success")?;
                steps.push(step);
            }
            Err(reason) => {
                history::insert(
                    &*client,
                    &opts.schema,
                    &m.service,
                    &Record {
                        version: &m.version.text,
                        description: &m.description,
                        kind: "SQL",
                        script: &file_name(m),
                        checksum: Some(&m.checksum),
                        applied_by: &opts.who(),
                        execution_ms: step.execution_ms,
                        success: false,
                        environment: env,
                        error: Some(&reason),
                    },
                )
                .await?;
                let _ = policy::run_hooks(&config, "post", m, env, "failed");
                return Err(Error::Migrate(format!(
                    "{} failed: {reason}{}; recorded as failed: fix the file and run `rowshift migrate repair`",
                    m.id(),
                    if tx { " (rolled back)" } else { " (not transactional: earlier statements stay applied)" }
                )));
            }
        }
    }
    Ok(steps)
}

fn file_name(m: &Migration) -> String {
    m.path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Runs one migration and records it; `Err` carries the reason.
async fn execute(
    client: &mut Client,
    opts: &Options,
    m: &Migration,
    tx: bool,
) -> std::result::Result<(), String> {
    let record = |ms: i64| Record {
        version: &m.version.text,
        description: &m.description,
        kind: "SQL",
        script: "",
        checksum: Some(&m.checksum),
        applied_by: "",
        execution_ms: ms,
        success: true,
        environment: opts.env.as_deref(),
        error: None,
    };
    let who = opts.who();
    let script = file_name(m);
    let started = Instant::now();
    if tx {
        let t = client.transaction().await.map_err(|e| db_text(&e))?;
        t.batch_execute(&m.sql).await.map_err(|e| message(&e))?;
        let r = Record {
            script: &script,
            applied_by: &who,
            ..record(started.elapsed().as_millis() as i64)
        };
        history::insert(&t, &opts.schema, &m.service, &r)
            .await
            .map_err(|e| e.to_string())?;
        t.commit().await.map_err(|e| db_text(&e))?;
    } else {
        let statements = pg_query::split_with_parser(&m.sql).map_err(|e| e.to_string())?;
        let n = statements.len();
        for (i, s) in statements.iter().enumerate() {
            client
                .batch_execute(s)
                .await
                .map_err(|e| format!("statement {} of {n}: {}", i + 1, message(&e)))?;
        }
        let r = Record {
            script: &script,
            applied_by: &who,
            ..record(started.elapsed().as_millis() as i64)
        };
        history::insert(&*client, &opts.schema, &m.service, &r)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The server's message without its detail (which can quote row values).
fn message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} ({})", d.message(), d.code().code()),
        None => e.to_string(),
    }
}

/// Undoes the newest applied migration of the service (or everything above
/// `--target`), newest first, with its U file. Refuses before running
/// anything when one of them has no undo file.
pub async fn undo(client: &mut Client, opts: &Options) -> Result<Vec<Step>> {
    let Some(service) = opts.service.clone() else {
        return Err(Error::Config {
            reason: "undo needs --service".into(),
        });
    };
    let catalog = catalog(opts)?;
    selected(opts, &catalog)?;
    let opts = &mut opts.clone();
    lock(client, opts).await?;
    let result = undo_locked(client, opts, &catalog, &service).await;
    unlock(client).await;
    result
}

async fn undo_locked(
    client: &mut Client,
    opts: &Options,
    catalog: &Catalog,
    service: &str,
) -> Result<Vec<Step>> {
    let applied = history::load(&*client, &opts.schema, service).await?;
    let files = catalog.services.get(service).cloned().unwrap_or_default();
    let mut todo: Vec<&Migration> = files
        .iter()
        .filter(|m| in_effect(&applied, m).is_some())
        .collect();
    todo.sort_by(|a, b| b.version.cmp(&a.version));
    match &opts.target {
        Some(t) => todo.retain(|m| &m.version > t),
        None => todo.truncate(1),
    }
    if todo.is_empty() {
        return Ok(Vec::new());
    }
    let missing: Vec<String> = todo
        .iter()
        .filter(|m| m.undo.is_none())
        .map(|m| m.id())
        .collect();
    if !missing.is_empty() {
        return Err(Error::Migrate(format!(
            "no undo file (U<version>__<description>.sql) for {}; nothing was undone",
            missing.join(", ")
        )));
    }
    let mut steps = Vec::new();
    for m in todo {
        let Some(path) = &m.undo else { continue };
        let sql = std::fs::read_to_string(path).map_err(|e| Error::Config {
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        let mut step = Step {
            service: m.service.clone(),
            version: m.version.text.clone(),
            description: m.description.clone(),
            transactional: true,
            execution_ms: 0,
            outcome: "would undo".into(),
        };
        if !opts.dry_run {
            let started = Instant::now();
            let t = client
                .transaction()
                .await
                .map_err(Error::db("begin undo"))?;
            t.batch_execute(&sql).await.map_err(|e| {
                Error::Migrate(format!(
                    "undo of {} failed (rolled back): {}",
                    m.id(),
                    message(&e)
                ))
            })?;
            history::mark_undone(&t, &opts.schema, service, &m.version.text).await?;
            let script = path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            history::insert(
                &t,
                &opts.schema,
                service,
                &Record {
                    version: &m.version.text,
                    description: &m.description,
                    kind: "UNDO",
                    script: &script,
                    checksum: Some(&super::files::checksum(&sql)),
                    applied_by: &opts.who(),
                    execution_ms: started.elapsed().as_millis() as i64,
                    success: true,
                    environment: opts.env.as_deref(),
                    error: None,
                },
            )
            .await?;
            t.commit().await.map_err(Error::db("commit undo"))?;
            step.execution_ms = started.elapsed().as_millis() as i64;
            step.outcome = "undone".into();
        }
        steps.push(step);
    }
    Ok(steps)
}

/// Removes failed rows and re-aligns the checksums of applied files that
/// changed; returns what it did.
pub async fn repair(client: &mut Client, opts: &Options) -> Result<Vec<String>> {
    let catalog = catalog(opts)?;
    let services = selected(opts, &catalog)?;
    let opts = &mut opts.clone();
    lock(client, opts).await?;
    let mut done = Vec::new();
    let result: Result<()> = async {
        for s in services {
            let applied = history::load(&*client, &opts.schema, s).await?;
            let table = history::table(&opts.schema, s);
            for m in catalog.services.get(s).into_iter().flatten() {
                if failed(&applied, m).is_some() {
                    client
                        .execute(&format!("DELETE FROM {table} WHERE version = $1 AND type = 'SQL' AND NOT success"), &[&m.version.text])
                        .await
                        .map_err(Error::db("remove failed rows"))?;
                    done.push(format!("{}: removed the failed record; `up` will run it again", m.id()));
                }
                if let Some(a) = in_effect(&applied, m) {
                    if a.checksum.as_deref() != Some(m.checksum.as_str()) {
                        client
                            .execute(&format!("UPDATE {table} SET checksum = $2 WHERE installed_rank = $1"), &[&a.installed_rank, &m.checksum])
                            .await
                            .map_err(Error::db("re-align checksum"))?;
                        done.push(format!("{}: checksum re-aligned to the file", m.id()));
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    unlock(client).await;
    result.map(|_| done)
}

/// Marks versions up to `--target` as applied without running them (an
/// existing database adopting migrations). Refused when the service has
/// history already.
pub async fn baseline(client: &mut Client, opts: &Options) -> Result<String> {
    let (Some(service), Some(target)) = (&opts.service, &opts.target) else {
        return Err(Error::Config {
            reason: "baseline needs --service and --target VERSION".into(),
        });
    };
    let opts = &mut opts.clone();
    lock(client, opts).await?;
    let result = async {
        if !history::load(&*client, &opts.schema, service)
            .await?
            .is_empty()
        {
            return Err(Error::Migrate(format!(
                "{service} already has history; baseline is only for a service without one"
            )));
        }
        history::ensure(&*client, &opts.schema, service).await?;
        history::insert(
            &*client,
            &opts.schema,
            service,
            &Record {
                version: &target.text,
                description: "baseline",
                kind: "BASELINE",
                script: "",
                checksum: None,
                applied_by: &opts.who(),
                execution_ms: 0,
                success: true,
                environment: opts.env.as_deref(),
                error: None,
            },
        )
        .await?;
        Ok(format!(
            "{service}: baselined at {target}; versions up to it count as applied"
        ))
    }
    .await;
    unlock(client).await;
    result
}

/// Records an approval of `--service`'s `version` by `--by`.
pub async fn approve(client: &Client, opts: &Options, version: &str) -> Result<String> {
    let catalog = catalog(opts)?;
    let Some(service) = &opts.service else {
        return Err(Error::Config {
            reason: "approve needs --service".into(),
        });
    };
    let Some(by) = &opts.by else {
        return Err(Error::Config {
            reason: "approve needs --by NAME".into(),
        });
    };
    let m = catalog
        .services
        .get(service)
        .and_then(|ms| {
            ms.iter().find(|m| {
                m.version.text == version
                    || Some(&m.version) == super::files::Version::parse(version).as_ref()
            })
        })
        .ok_or_else(|| Error::Config {
            reason: format!("no migration {service}:{version}"),
        })?;
    policy::approve(client, &opts.schema, m, by, opts.env.as_deref()).await?;
    let all = policy::approvers(client, &opts.schema, m, opts.env.as_deref()).await?;
    Ok(format!(
        "{} (risk {}) approved by {by}; approvals of this file: {}",
        m.id(),
        m.meta.risk.as_str(),
        all.join(", ")
    ))
}
