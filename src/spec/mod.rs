//! Pipeline files: parsed from YAML, then compiled into a checked [`Pipeline`].
//!
//! Every problem is collected and reported at once with the file, the field
//! path and the reason; unknown fields are errors. Checks that need the
//! source database (do the columns exist, does the DDL run, do the mapping
//! expressions type-check) live in [`crate::preflight`].
//!
//! ```yaml
//! name: orders_v2
//! source: { dsn_env: ROWSHIFT_SOURCE_DSN, table: public.orders }
//! target:
//!   table: public.orders_v2
//!   ddl: |
//!     CREATE TABLE public.orders_v2 (id bigint PRIMARY KEY, amount_cents bigint NOT NULL)
//! mapping:
//!   columns:
//!     - id                                   # same name, same value
//!     - { target: amount_cents, expr: "round(amount * 100)::bigint" }
//!     - { target: state, from: status }      # rename
//!   drop: [legacy_flag]
//! backfill: { chunk_rows: 5000, target_chunk_ms: 500, rate_limit_rows_per_s: 50000, workers: 2, defer_indexes: true }
//! throttle: { max_slot_lag_bytes: 1GB, max_retained_wal_bytes: 4GB, query: "SELECT false" }
//! transport: { kind: direct }                # or kind: kafka with a `kafka:` section
//! ```

mod reader;
mod sections;

pub use reader::{parse_byte_size, Problem};
use reader::{Fields, Problems};
use sections::{
    backfill_field, cutover_field, inverse_field, throttle_field, transport_field, verify_field,
};
use serde_yaml::Value;
use std::fmt;
use std::path::{Path, PathBuf};

/// A schema-qualified table name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    /// Parses `schema.table` or `table` (schema `public`).
    pub fn parse(text: &str) -> Option<TableName> {
        let parts: Vec<&str> = text.split('.').collect();
        let valid = |s: &str| !s.is_empty() && s.len() <= 63 && !s.contains('"');
        match parts.as_slice() {
            [t] if valid(t) => Some(TableName {
                schema: "public".into(),
                name: t.to_string(),
            }),
            [s, t] if valid(s) && valid(t) => Some(TableName {
                schema: s.to_string(),
                name: t.to_string(),
            }),
            _ => None,
        }
    }

    /// The name quoted for SQL: `"schema"."table"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Quotes an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Where a target column's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A source column, copied as is (possibly renamed).
    Column(String),
    /// An SQL expression over source columns, evaluated by PostgreSQL.
    Expr(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMapping {
    pub target: String,
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Backfill {
    pub chunk_rows: u32,
    /// When set, the chunk size adapts so one chunk takes about this long.
    pub target_chunk_ms: Option<u64>,
    pub rate_limit_rows_per_s: Option<u32>,
    pub workers: u32,
    /// Build the target's indexes after the copy instead of maintaining them
    /// row by row during it (see [`crate::backfill::indexes`]). Default: on
    /// for the `direct` transport; the kafka transport cannot.
    pub defer_indexes: bool,
    /// With `defer_indexes`: how many changes may wait for the indexes
    /// before they are built, copy finished or not.
    pub hold_changes: u32,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Throttle {
    pub max_slot_lag_bytes: Option<u64>,
    pub max_retained_wal_bytes: Option<u64>,
    pub max_replica_lag_ms: Option<u64>,
    /// A query returning one boolean: `true` means "throttle now".
    pub query: Option<String>,
    pub check_interval_ms: u64,
}

/// How changes travel from the replication reader to the appliers.
///
/// `batch_events`: most changes in one applied batch; `queue_batches`: how
/// many batches' worth of changes may wait between reader and applier;
/// `linger_ms`: how long a batch may wait for more changes once it has one;
/// `apply_workers`: connections a batch is applied on, split by key (direct).
/// `kafka`: set with `kind: kafka`; `None` is the in-process `direct` queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Transport {
    pub batch_events: usize,
    pub queue_batches: usize,
    pub linger_ms: u64,
    pub apply_workers: usize,
    pub kafka: Option<Kafka>,
}

/// `transport.kafka`: where the change topic lives and how to reach it.
/// Secrets never sit in the file: `secret_properties` names, for each
/// librdkafka setting, the environment variable that holds its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Kafka {
    /// `host:port,...`, or read from `brokers_env`.
    pub brokers: Setting,
    pub registry_url: Setting,
    /// Default `rowshift.<pipeline>`.
    pub topic: Option<String>,
    pub partitions: i32,
    pub replication_factor: i32,
    /// Consumer group of the appliers; default `rowshift-<pipeline>`.
    pub group: Option<String>,
    /// librdkafka settings passed as they are (`security.protocol`, `sasl.mechanism`, ...).
    pub properties: Vec<(String, String)>,
    /// librdkafka setting → environment variable holding its value.
    pub secret_properties: Vec<(String, String)>,
    /// `rowshift run` applies too (false: only `rowshift apply` processes do).
    pub apply_in_run: bool,
    /// How long an applier stops fetching a partition read to its end
    /// (see `transport::kafka::idle`); 0: it does not.
    pub idle_fetch_pause_ms: u64,
}

/// A setting given in the file or read from an environment variable.
#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    Value(String),
    Env(String),
}

impl Setting {
    pub fn resolve(&self, what: &str) -> Result<String, crate::Error> {
        match self {
            Setting::Value(v) => Ok(v.clone()),
            Setting::Env(var) => std::env::var(var).map_err(|_| crate::Error::Config {
                reason: format!("environment variable {var} ({what}) is not set"),
            }),
        }
    }
}

impl Kafka {
    /// Every librdkafka setting: the plain ones and the secrets, resolved.
    pub fn client_properties(&self) -> Result<Vec<(String, String)>, crate::Error> {
        let mut out = self.properties.clone();
        for (key, var) in &self.secret_properties {
            let value = std::env::var(var).map_err(|_| crate::Error::Config {
                reason: format!(
                    "environment variable {var} (transport.kafka.secret_properties.{key}) is not set"
                ),
            })?;
            out.push((key.clone(), value));
        }
        Ok(out)
    }
}

/// A checked pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    pub file: PathBuf,
    pub name: String,
    pub source_dsn_env: String,
    pub source_table: TableName,
    pub target_table: TableName,
    pub target_ddl: Vec<String>,
    pub mapping: Vec<ColumnMapping>,
    pub dropped: Vec<String>,
    /// For source columns the reverse stream cannot derive by itself: an SQL
    /// expression over the new table's columns (`mapping.inverse`).
    pub inverse: Vec<(String, String)>,
    pub backfill: Backfill,
    pub throttle: Throttle,
    pub transport: Transport,
    pub verify: Verify,
    pub cutover: Cutover,
}

/// How `rowshift verify` reads the tables.
#[derive(Debug, Clone, PartialEq)]
pub struct Verify {
    /// Keys per checksummed chunk.
    pub chunk_rows: u32,
    /// Connections checksumming chunks at once.
    pub workers: u32,
    /// How often a differing chunk is read again (after the stream passed
    /// the position of the previous read) before it counts as a mismatch.
    pub rechecks: u32,
}

/// How `rowshift cutover` / `rollback` / `contract` behave.
#[derive(Debug, Clone, PartialEq)]
pub struct Cutover {
    /// The name the old table gets at cut-over (same schema as the source).
    pub old_table: TableName,
    /// `lock_timeout` of each attempt to lock the live table.
    pub lock_timeout_ms: u64,
    pub lock_attempts: u32,
    /// Upper bound of the (jittered, doubling) wait between attempts.
    pub backoff_max_ms: u64,
    /// The gate: the stream's lag must be below this.
    pub max_lag_ms: u64,
    /// The gate: a clean verification must be younger than this.
    pub verify_max_age_s: u64,
    /// Longest wait, under the lock, for the applier to reach the fence.
    pub drain_timeout_ms: u64,
    /// Triggers of the live table re-created on the table that takes its name.
    pub carry_triggers: Vec<String>,
    /// `contract` without `--confirm` is refused until this long after cut-over.
    pub reverse_window_s: u64,
}

impl Pipeline {
    pub fn slot_name(&self) -> String {
        format!("rowshift_{}", self.name)
    }
    pub fn publication_name(&self) -> String {
        format!("rowshift_{}", self.name)
    }
    /// The reverse stream's slot (new table → old table, after cut-over).
    pub fn reverse_slot_name(&self) -> String {
        format!("rowshift_{}_rev", self.name)
    }
    pub fn reverse_publication_name(&self) -> String {
        format!("rowshift_{}_rev", self.name)
    }
    /// Reads the source DSN from the environment variable the file names.
    /// The change topic of a kafka pipeline.
    pub fn kafka_topic(&self) -> String {
        self.transport
            .kafka
            .as_ref()
            .and_then(|k| k.topic.clone())
            .unwrap_or_else(|| format!("rowshift.{}", self.name))
    }

    /// The appliers' consumer group of a kafka pipeline.
    pub fn kafka_group(&self) -> String {
        self.transport
            .kafka
            .as_ref()
            .and_then(|k| k.group.clone())
            .unwrap_or_else(|| format!("rowshift-{}", self.name))
    }

    pub fn source_dsn(&self) -> Result<String, crate::Error> {
        std::env::var(&self.source_dsn_env).map_err(|_| crate::Error::Config {
            reason: format!(
                "environment variable {} (source.dsn_env in {}) is not set",
                self.source_dsn_env,
                self.file.display()
            ),
        })
    }
}

/// All problems of one pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} problem(s)",
            self.file.display(),
            self.problems.len()
        )?;
        for p in &self.problems {
            writeln!(f, "  {}: {}: {}", self.file.display(), p.field, p.reason)?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecError {}

/// Reads and compiles a pipeline file.
pub fn load(path: &Path) -> Result<Pipeline, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|e| SpecError {
        file: path.to_path_buf(),
        problems: vec![Problem {
            field: "(file)".into(),
            reason: format!("cannot read: {e}"),
        }],
    })?;
    parse(path, &text)
}

/// Compiles pipeline YAML text; `file` is used in messages.
pub fn parse(file: &Path, text: &str) -> Result<Pipeline, SpecError> {
    let fail = |problems: Vec<Problem>| SpecError {
        file: file.to_path_buf(),
        problems,
    };
    let root: Value = serde_yaml::from_str(text).map_err(|e| {
        let field = e
            .location()
            .map(|l| format!("(line {}, column {})", l.line(), l.column()))
            .unwrap_or_else(|| "(file)".into());
        fail(vec![Problem {
            field,
            reason: format!("not valid YAML: {e}"),
        }])
    })?;
    let mut p = Problems::default();
    let mut top = Fields::new("", Some(&root), &mut p);
    if !top.present() {
        p.push(
            "(file)",
            "must be a mapping with name, source, target and mapping",
        );
    }

    let name = top.required_string("name", &mut p);
    if let Some(n) = &name {
        let ok = n.len() <= 40
            && n.starts_with(|c: char| c.is_ascii_lowercase())
            && n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok {
            p.push("name", "must be 1-40 characters of a-z, 0-9 and _, starting with a letter (it names the replication slot)");
        }
    }

    let mut src = Fields::new("source", top.get("source"), &mut p);
    if !src.present() {
        p.push("source", "is required");
    }
    let dsn_env = src.required_string("dsn_env", &mut p);
    let source_table = table_field(&mut src, "table", &mut p);
    src.finish(&mut p);

    let mut tgt = Fields::new("target", top.get("target"), &mut p);
    if !tgt.present() {
        p.push("target", "is required");
    }
    let target_table = table_field(&mut tgt, "table", &mut p);
    let ddl = ddl_field(&mut tgt, &mut p);
    tgt.finish(&mut p);

    if let (Some(s), Some(t)) = (&source_table, &target_table) {
        if s == t {
            p.push("target.table", "must differ from source.table");
        }
    }

    let mut map = Fields::new("mapping", top.get("mapping"), &mut p);
    if !map.present() {
        p.push("mapping", "is required");
    }
    let mapping = mapping_columns(&mut map, &mut p);
    let dropped = string_list(&mut map, "drop", &mut p);
    let inverse = inverse_field(&mut map, &mut p);
    map.finish(&mut p);
    for d in &dropped {
        if mapping
            .iter()
            .any(|m| m.source == Source::Column(d.clone()))
        {
            p.push(
                "mapping.drop",
                format!("column {d} is both dropped and mapped"),
            );
        }
    }

    let (mut backfill, defer_indexes) = backfill_field(&mut top, &mut p);
    let throttle = throttle_field(&mut top, &mut p);
    let transport = transport_field(&mut top, &mut p);
    backfill.defer_indexes = match (defer_indexes, transport.kafka.is_some()) {
        (Some(true), true) => {
            p.push(
                "backfill.defer_indexes",
                "the kafka transport applies changes in other processes, so it cannot build the target's indexes after the copy; remove the field or set it to false",
            );
            false
        }
        (Some(on), _) => on,
        (None, kafka) => !kafka,
    };
    let verify = verify_field(&mut top, &mut p);
    let cutover = cutover_field(&mut top, source_table.as_ref(), &mut p);
    top.finish(&mut p);

    if !p.0.is_empty() {
        return Err(fail(p.0));
    }
    match (name, dsn_env, source_table, target_table) {
        (Some(name), Some(source_dsn_env), Some(source_table), Some(target_table)) => {
            Ok(Pipeline {
                file: file.to_path_buf(),
                name,
                source_dsn_env,
                source_table,
                target_table,
                target_ddl: ddl,
                mapping,
                dropped,
                inverse,
                backfill,
                throttle,
                transport,
                verify,
                cutover: cutover.ok_or_else(|| {
                    fail(vec![Problem {
                        field: "cutover".into(),
                        reason: "incomplete".into(),
                    }])
                })?,
            })
        }
        _ => Err(fail(vec![Problem {
            field: "(file)".into(),
            reason: "incomplete".into(),
        }])),
    }
}

fn table_field(f: &mut Fields, key: &str, p: &mut Problems) -> Option<TableName> {
    let text = f.required_string(key, p)?;
    let parsed = TableName::parse(&text);
    if parsed.is_none() {
        p.push(
            f.path_of(key),
            format!("{text:?} is not a table name (use schema.table)"),
        );
    }
    parsed
}

fn ddl_field(f: &mut Fields, p: &mut Problems) -> Vec<String> {
    let path = f.path_of("ddl");
    match f.get("ddl") {
        None => {
            p.push(
                path,
                "is required (the CREATE TABLE statement of the new table)",
            );
            Vec::new()
        }
        Some(Value::String(s)) if !s.trim().is_empty() => vec![s.clone()],
        Some(Value::Sequence(items)) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                match item.as_str() {
                    Some(s) if !s.trim().is_empty() => out.push(s.to_string()),
                    _ => p.push(format!("{path}[{i}]"), "must be a non-empty SQL statement"),
                }
            }
            if out.is_empty() && items.is_empty() {
                p.push(path, "must list at least one statement");
            }
            out
        }
        Some(_) => {
            p.push(path, "must be SQL text or a list of SQL statements");
            Vec::new()
        }
    }
}

fn string_list(f: &mut Fields, key: &str, p: &mut Problems) -> Vec<String> {
    let path = f.path_of(key);
    match f.get(key) {
        None => Vec::new(),
        Some(Value::Sequence(items)) => items
            .iter()
            .enumerate()
            .filter_map(|(i, v)| match v.as_str() {
                Some(s) if !s.is_empty() => Some(s.to_string()),
                _ => {
                    p.push(format!("{path}[{i}]"), "must be a column name");
                    None
                }
            })
            .collect(),
        Some(_) => {
            p.push(path, "must be a list of column names");
            Vec::new()
        }
    }
}

fn mapping_columns(f: &mut Fields, p: &mut Problems) -> Vec<ColumnMapping> {
    let path = f.path_of("columns");
    let items = match f.get("columns") {
        Some(Value::Sequence(items)) if !items.is_empty() => items,
        Some(_) => {
            p.push(path, "must be a non-empty list of column mappings");
            return Vec::new();
        }
        None => {
            p.push(path, "is required");
            return Vec::new();
        }
    };
    let mut out: Vec<ColumnMapping> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let mapped = match item {
            Value::String(name) if !name.is_empty() => Some(ColumnMapping {
                target: name.clone(),
                source: Source::Column(name.clone()),
            }),
            Value::Mapping(_) => {
                let mut m = Fields::new(&at, Some(item), p);
                let target = m.required_string("target", p);
                let from = m.string("from", p);
                let expr = m.string("expr", p);
                m.finish(p);
                let source = match (from, expr) {
                    (Some(c), None) => Some(Source::Column(c)),
                    (None, Some(e)) => Some(Source::Expr(e)),
                    (Some(_), Some(_)) => {
                        p.push(&at, "give either from (a source column) or expr (an SQL expression), not both");
                        None
                    }
                    (None, None) => target.clone().map(Source::Column),
                };
                match (target, source) {
                    (Some(target), Some(source)) => Some(ColumnMapping { target, source }),
                    _ => None,
                }
            }
            _ => {
                p.push(&at, "must be a column name or {target, from | expr}");
                None
            }
        };
        if let Some(m) = mapped {
            if out.iter().any(|o| o.target == m.target) {
                p.push(
                    format!("{at}.target"),
                    format!("target column {} is mapped twice", m.target),
                );
            }
            out.push(m);
        }
    }
    out
}

#[cfg(test)]
mod tests;
