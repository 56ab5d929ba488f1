//! Each service's history table, `<schema>.<service>_schema_history`: one
//! row per applied, failed, undone or baselined version, with its checksum,
//! who applied it, when, how long it took, and in which environment.

use super::files::Version;
use crate::error::{Error, Result};
use crate::spec::quote_ident;
use serde::Serialize;
use tokio_postgres::GenericClient;

/// One history row.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    pub installed_rank: i32,
    pub service: String,
    pub version: String,
    pub description: String,
    /// `SQL`, `UNDO` or `BASELINE`.
    pub kind: String,
    pub script: String,
    pub checksum: Option<String>,
    pub applied_by: String,
    pub applied_at: String,
    pub execution_ms: i64,
    pub success: bool,
    pub environment: Option<String>,
    pub undone_at: Option<String>,
    pub error: Option<String>,
}

impl Applied {
    pub fn version(&self) -> Option<Version> {
        Version::parse(&self.version)
    }
    /// A successful, not undone migration (or a baseline).
    pub fn in_effect(&self) -> bool {
        self.success && self.undone_at.is_none() && self.kind != "UNDO"
    }
}

/// `"schema"."service_schema_history"`.
pub fn table(schema: &str, service: &str) -> String {
    format!(
        "{}.{}",
        quote_ident(schema),
        quote_ident(&format!("{}_schema_history", service.replace('-', "_")))
    )
}

pub async fn ensure<C: GenericClient>(client: &C, schema: &str, service: &str) -> Result<()> {
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema_q};
             CREATE TABLE IF NOT EXISTS {t} (
                installed_rank serial PRIMARY KEY,
                version text NOT NULL,
                description text NOT NULL,
                type text NOT NULL,
                script text NOT NULL,
                checksum text,
                applied_by text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now(),
                execution_ms int8 NOT NULL DEFAULT 0,
                success boolean NOT NULL,
                environment text,
                undone_at timestamptz,
                error text)",
            schema_q = quote_ident(schema),
            t = table(schema, service)
        ))
        .await
        .map_err(Error::db(format!("create the history table of {service}")))
}

/// The service's history, oldest first (empty when the table does not
/// exist). Not for use inside a transaction (a missing table aborts it).
pub async fn load<C: GenericClient>(
    client: &C,
    schema: &str,
    service: &str,
) -> Result<Vec<Applied>> {
    let rows = client
        .query(
            &format!(
                "SELECT installed_rank, version, description, type, script, checksum, applied_by, \
                        to_char(applied_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), execution_ms, success, environment, \
                        to_char(undone_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), error \
                 FROM {} ORDER BY installed_rank",
                table(schema, service)
            ),
            &[],
        )
        .await;
    // One query per service: a missing table is an empty history.
    let rows = match rows {
        Err(e)
            if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
                || e.code() == Some(&tokio_postgres::error::SqlState::INVALID_SCHEMA_NAME) =>
        {
            return Ok(Vec::new())
        }
        other => other.map_err(Error::db(format!("read the history of {service}")))?,
    };
    Ok(rows
        .iter()
        .map(|r| Applied {
            installed_rank: r.get(0),
            service: service.to_string(),
            version: r.get(1),
            description: r.get(2),
            kind: r.get(3),
            script: r.get(4),
            checksum: r.get(5),
            applied_by: r.get(6),
            applied_at: r.get(7),
            execution_ms: r.get(8),
            success: r.get(9),
            environment: r.get(10),
            undone_at: r.get(11),
            error: r.get(12),
        })
        .collect())
}

/// A row to insert.
pub struct Record<'a> {
    pub version: &'a str,
    pub description: &'a str,
    pub kind: &'a str,
    pub script: &'a str,
    pub checksum: Option<&'a str>,
    pub applied_by: &'a str,
    pub execution_ms: i64,
    pub success: bool,
    pub environment: Option<&'a str>,
    pub error: Option<&'a str>,
}

pub async fn insert<C: GenericClient>(
    client: &C,
    schema: &str,
    service: &str,
    r: &Record<'_>,
) -> Result<()> {
    client
        .execute(
            &format!(
                "INSERT INTO {} (version, description, type, script, checksum, applied_by, execution_ms, success, environment, error) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                table(schema, service)
            ),
            &[
                &r.version,
                &r.description,
                &r.kind,
                &r.script,
                &r.checksum,
                &r.applied_by,
                &r.execution_ms,
                &r.success,
                &r.environment,
                &r.error,
            ],
        )
        .await
        .map_err(Error::db("record migration"))?;
    Ok(())
}

/// Marks the in-effect row of `version` undone.
pub async fn mark_undone<C: GenericClient>(
    client: &C,
    schema: &str,
    service: &str,
    version: &str,
) -> Result<()> {
    client
        .execute(
            &format!(
                "UPDATE {} SET undone_at = now() WHERE version = $1 AND type IN ('SQL', 'BASELINE') AND success AND undone_at IS NULL",
                table(schema, service)
            ),
            &[&version],
        )
        .await
        .map_err(Error::db("record undo"))?;
    Ok(())
}
