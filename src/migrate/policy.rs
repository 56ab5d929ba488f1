//! Approval policy and hooks, from `config/migrate.yaml`:
//!
//! ```yaml
//! environments:
//!   prod:
//!     approvals: { low: 0, medium: 1, high: 2 }   # distinct approvers needed per risk
//!     maintenance_window: [high]                   # these risks need --maintenance-window
//! hooks:
//!   pre: [config/hooks/notify.sh]    # run before each migration; failing stops it
//!   post: [config/hooks/notify.sh]   # run after each migration, with its outcome
//! ```
//!
//! Hooks get `ROWSHIFT_SERVICE`, `ROWSHIFT_VERSION`, `ROWSHIFT_DESCRIPTION`,
//! `ROWSHIFT_ENV`, `ROWSHIFT_HOOK` (pre/post) and `ROWSHIFT_OUTCOME`
//! (pending, success, failed) in their environment. Approvals are stored per
//! file checksum: editing an approved file voids its approvals.

use super::files::{Migration, Risk};
use crate::error::{Error, Result};
use crate::spec::quote_ident;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokio_postgres::GenericClient;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub environments: BTreeMap<String, EnvPolicy>,
    #[serde(default)]
    pub hooks: Hooks,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvPolicy {
    #[serde(default)]
    pub approvals: BTreeMap<Risk, u32>,
    #[serde(default)]
    pub maintenance_window: Vec<Risk>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    #[serde(default)]
    pub pre: Vec<PathBuf>,
    #[serde(default)]
    pub post: Vec<PathBuf>,
}

impl<'de> Deserialize<'de> for Risk {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Risk, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "low" => Ok(Risk::Low),
            "medium" => Ok(Risk::Medium),
            "high" => Ok(Risk::High),
            other => Err(serde::de::Error::custom(format!(
                "{other:?} is not a risk (low, medium, high)"
            ))),
        }
    }
}

/// Reads the config file; a missing default file means "no policy".
pub fn load(path: Option<&Path>) -> Result<Config> {
    let (path, required) = match path {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from("config/migrate.yaml"), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(_) if !required => return Ok(Config::default()),
        Err(e) => {
            return Err(Error::Config {
                reason: format!("cannot read {}: {e}", path.display()),
            })
        }
    };
    if text.trim().is_empty() {
        return Ok(Config::default());
    }
    serde_yaml::from_str(&text).map_err(|e| Error::Config {
        reason: format!("{}: {e}", path.display()),
    })
}

fn approvals_table(schema: &str) -> String {
    format!("{}.rowshift_migration_approvals", quote_ident(schema))
}

async fn ensure_approvals<C: GenericClient>(client: &C, schema: &str) -> Result<()> {
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {};
             CREATE TABLE IF NOT EXISTS {} (
                service text NOT NULL, version text NOT NULL, checksum text NOT NULL,
                environment text, approved_by text NOT NULL, approved_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (service, version, checksum, approved_by))",
            quote_ident(schema),
            approvals_table(schema)
        ))
        .await
        .map_err(Error::db("create the approvals table"))
}

/// Records an approval of the migration's current file.
pub async fn approve<C: GenericClient>(
    client: &C,
    schema: &str,
    m: &Migration,
    by: &str,
    env: Option<&str>,
) -> Result<()> {
    ensure_approvals(client, schema).await?;
    client
        .execute(
            &format!(
                "INSERT INTO {} (service, version, checksum, environment, approved_by) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (service, version, checksum, approved_by) DO UPDATE SET environment = EXCLUDED.environment, approved_at = now()",
                approvals_table(schema)
            ),
            &[&m.service, &m.version.text, &m.checksum, &env, &by],
        )
        .await
        .map_err(Error::db("record approval"))?;
    Ok(())
}

/// Who approved the migration's current file (for `env`, or for any).
pub async fn approvers<C: GenericClient>(
    client: &C,
    schema: &str,
    m: &Migration,
    env: Option<&str>,
) -> Result<Vec<String>> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&approvals_table(schema)],
        )
        .await
        .map_err(Error::db("look up approvals"))?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    Ok(client
        .query(
            &format!(
                "SELECT DISTINCT approved_by FROM {} WHERE service = $1 AND version = $2 AND checksum = $3 \
                 AND (environment IS NULL OR environment = $4) ORDER BY 1",
                approvals_table(schema)
            ),
            &[&m.service, &m.version.text, &m.checksum, &env],
        )
        .await
        .map_err(Error::db("read approvals"))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Why `m` may not run in `env` under the policy (`None`: it may).
pub async fn refusal<C: GenericClient>(
    client: &C,
    schema: &str,
    config: &Config,
    m: &Migration,
    env: Option<&str>,
    maintenance_window: bool,
) -> Result<Option<String>> {
    let Some(policy) = env.and_then(|e| config.environments.get(e)) else {
        return Ok(None);
    };
    let env = env.unwrap_or_default();
    let risk = m.meta.risk;
    let mut reasons = Vec::new();
    let needed = policy.approvals.get(&risk).copied().unwrap_or(0);
    if needed > 0 {
        let have = approvers(client, schema, m, Some(env)).await?;
        if (have.len() as u32) < needed {
            reasons.push(format!(
                "needs {needed} approval(s) for risk {} in {env}, has {}{}",
                risk.as_str(),
                have.len(),
                if have.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", have.join(", "))
                }
            ));
        }
    }
    if policy.maintenance_window.contains(&risk) && !maintenance_window {
        reasons.push(format!(
            "risk {} runs in {env} only in a maintenance window (pass --maintenance-window)",
            risk.as_str()
        ));
    }
    Ok((!reasons.is_empty()).then(|| format!("{}: {}", m.id(), reasons.join("; "))))
}

/// Runs the `pre` or `post` hooks for a migration; the first failing one is
/// an error.
pub fn run_hooks(
    config: &Config,
    which: &str,
    m: &Migration,
    env: Option<&str>,
    outcome: &str,
) -> Result<()> {
    let hooks = if which == "pre" {
        &config.hooks.pre
    } else {
        &config.hooks.post
    };
    for hook in hooks {
        let status = std::process::Command::new(hook)
            .env("ROWSHIFT_SERVICE", &m.service)
            .env("ROWSHIFT_VERSION", &m.version.text)
            .env("ROWSHIFT_DESCRIPTION", &m.description)
            .env("ROWSHIFT_ENV", env.unwrap_or(""))
            .env("ROWSHIFT_HOOK", which)
            .env("ROWSHIFT_OUTCOME", outcome)
            .status()
            .map_err(|e| Error::Config {
                reason: format!("{which}-hook {}: {e}", hook.display()),
            })?;
        if !status.success() {
            return Err(Error::Migrate(format!(
                "{which}-hook {} failed ({status}) for {}",
                hook.display(),
                m.id()
            )));
        }
    }
    Ok(())
}
