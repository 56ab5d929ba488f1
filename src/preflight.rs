//! Preflight: everything that can be refused is refused before the first
//! write (invariant 6). The expand DDL and every mapping expression are tried
//! inside a transaction that is always rolled back, so a typo in the DDL or
//! a mapping that does not type-check is reported by PostgreSQL itself,
//! attributed to its field, with nothing changed.

use crate::backfill::indexes;
use crate::error::{db_text, Error, Result};
use crate::source::postgres::introspect::{self, ServerInfo, TableInfo};
use crate::spec::{quote_ident, Pipeline, Source};
use crate::state::PipelineRecord;
use crate::transform::{referenced_columns, Mapping};
use crate::transport::kafka::envelope::{ColumnType, TableSchema};
use tokio_postgres::{Client, GenericClient};

/// What preflight found: the compiled mapping and notes for the operator.
#[derive(Debug, Clone)]
pub struct Checked {
    pub server: ServerInfo,
    pub source: TableInfo,
    pub mapping: Mapping,
    /// Informational findings: triggers, foreign keys, sequences and what rowshift does with each.
    pub notes: Vec<String>,
}

/// Runs every check; `record` is the stored state when the pipeline was run before.
pub async fn check(
    client: &mut Client,
    p: &Pipeline,
    record: Option<&PipelineRecord>,
) -> Result<Checked> {
    let mut problems: Vec<String> = Vec::new();
    let server = introspect::server_info(client).await?;
    if server.wal_level != "logical" {
        problems.push(format!(
            "wal_level is {:?}; logical replication needs wal_level = logical (ALTER SYSTEM SET wal_level = logical, then restart)",
            server.wal_level
        ));
    }
    if server.version_num < 100000 {
        problems.push("PostgreSQL 10 or newer is required".into());
    }
    if !server.can_replicate {
        problems
            .push("the role needs the REPLICATION attribute (ALTER ROLE ... REPLICATION)".into());
    }
    if !server.is_superuser {
        problems.push("the role must be a superuser: replayed rows are written with session_replication_role = replica".into());
    }
    if !server.can_create_in_db {
        problems.push(
            "the role needs CREATE on the database (for the rowshift schema and the publication)"
                .into(),
        );
    }

    let Some(source) = introspect::table_info(&*client, &p.source_table).await? else {
        problems.push(format!("source.table {} does not exist", p.source_table));
        return Err(Error::Preflight { problems });
    };
    check_source(p, &source, &mut problems);
    if !introspect::can_select(&*client, &p.source_table).await? {
        problems.push(format!("the role cannot SELECT from {}", p.source_table));
    }
    let ours = record.is_some();
    let slot_exists = exists(
        &*client,
        "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
        &p.slot_name(),
    )
    .await?;
    let publication_exists = exists(
        &*client,
        "SELECT 1 FROM pg_publication WHERE pubname = $1",
        &p.publication_name(),
    )
    .await?;
    if !ours && slot_exists {
        problems.push(format!(
            "a replication slot named {} already exists and rowshift has no record of creating it",
            p.slot_name()
        ));
    }
    if !ours && publication_exists {
        problems.push(format!(
            "a publication named {} already exists and rowshift has no record of creating it",
            p.publication_name()
        ));
    }
    if !ours && server.max_replication_slots as i64 <= server.slots_in_use {
        problems.push(format!(
            "all {} replication slots are in use (max_replication_slots)",
            server.max_replication_slots
        ));
    }

    let target_exists = introspect::table_info(&*client, &p.target_table)
        .await?
        .is_some();
    let created_by_us = record.map(|r| r.created_target).unwrap_or(false);
    if target_exists && !created_by_us {
        problems.push(format!(
            "target.table {} already exists; rowshift only writes into a table its own expand step created",
            p.target_table
        ));
    }

    // Dry-run the expand DDL and the mapping in a transaction that is rolled back.
    let mut mapping = None;
    if problems.is_empty() || !target_exists {
        let tx = client
            .transaction()
            .await
            .map_err(Error::db("begin preflight"))?;
        tx.batch_execute("SET LOCAL lock_timeout = '2s'")
            .await
            .map_err(Error::db("preflight"))?;
        let mut ddl_ok = true;
        if !target_exists {
            for (i, stmt) in p.target_ddl.iter().enumerate() {
                if let Err(e) = tx.batch_execute(stmt).await {
                    problems.push(format!("target.ddl[{i}] failed: {}", db_text(&e)));
                    ddl_ok = false;
                    break;
                }
            }
        }
        if ddl_ok {
            match introspect::table_info(&tx, &p.target_table).await? {
                None => problems.push(format!(
                    "target.ddl does not create target.table {}",
                    p.target_table
                )),
                Some(mut target) => {
                    // A target rowshift created may wait for its primary key
                    // (built after the copy, see `backfill::indexes`).
                    if target_exists && target.primary_key.is_empty() {
                        if let Some(key) = indexes::deferred_primary_key(&tx, &p.name).await? {
                            target.primary_key = key;
                        }
                    }
                    mapping = check_mapping(&tx, p, &source, &target, &mut problems).await?
                }
            }
        }
        tx.rollback()
            .await
            .map_err(Error::db("roll back preflight"))?;
    }
    if !problems.is_empty() {
        return Err(Error::Preflight { problems });
    }
    let mapping = mapping.ok_or_else(|| Error::Preflight {
        problems: vec!["mapping could not be compiled".into()],
    })?;
    let checked = Checked {
        notes: notes(&source),
        server,
        source,
        mapping,
    };
    if p.transport.kafka.is_some() {
        kafka_schema(p, &checked, "").map_err(|problems| Error::Preflight { problems })?;
    }
    Ok(checked)
}

/// The Avro shape of the source table's change events on the kafka
/// transport; every column whose type has no Avro mapping is a problem.
pub fn kafka_schema(
    p: &Pipeline,
    checked: &Checked,
    db: &str,
) -> std::result::Result<TableSchema, Vec<String>> {
    let m = &checked.mapping;
    let columns: Vec<ColumnType<'_>> = m
        .source_columns
        .iter()
        .map(|c| ColumnType {
            name: &c.name,
            sql_type: &c.sql_type,
            is_enum: checked
                .source
                .columns
                .iter()
                .any(|s| s.column.name == c.name && s.typtype == "e"),
        })
        .collect();
    TableSchema::new(
        &p.kafka_topic(),
        &p.name,
        db,
        &p.source_table,
        &columns,
        m.source_key.clone(),
    )
}

async fn exists<C: GenericClient>(client: &C, sql: &str, name: &str) -> Result<bool> {
    Ok(client
        .query_opt(sql, &[&name])
        .await
        .map_err(Error::db("preflight lookup"))?
        .is_some())
}

fn check_source(p: &Pipeline, source: &TableInfo, problems: &mut Vec<String>) {
    let t = &p.source_table;
    match source.relkind.as_str() {
        "r" => {}
        "p" => problems.push(format!(
            "{t} is a partitioned table; partitioned sources are not supported yet"
        )),
        other => problems.push(format!("{t} is not a table (relkind {other})")),
    }
    if source.persistence != "p" {
        problems.push(format!("{t} is unlogged or temporary; its changes are not in the WAL, so they cannot be streamed"));
    }
    if source.primary_key.is_empty() {
        problems.push(format!("{t} has no primary key; rowshift needs one to copy in key order and to apply changes by key"));
    }
    if source.replica_identity == "n" {
        problems.push(format!("{t} has REPLICA IDENTITY NOTHING; deletes and updates would arrive without their key (use DEFAULT)"));
    }
    let source_cols = source.plain_columns();
    let mut mentioned: Vec<usize> = Vec::new();
    for (i, m) in p.mapping.iter().enumerate() {
        let used = match &m.source {
            Source::Column(c) => match source_cols.iter().position(|s| &s.name == c) {
                Some(pos) => vec![pos],
                None => {
                    problems.push(format!(
                        "mapping.columns[{i}]: source column {c} does not exist in {t}"
                    ));
                    vec![]
                }
            },
            Source::Expr(e) => referenced_columns(e, &source_cols),
        };
        for pos in &used {
            let col = &source.columns[*pos];
            if col.generated {
                problems.push(format!(
                    "mapping.columns[{i}]: source column {} is a generated column; logical replication does not carry it (compute it in the mapping instead)",
                    col.column.name
                ));
            }
            if col.typtype == "p" {
                problems.push(format!(
                    "source column {} has pseudo-type {}, which cannot be copied",
                    col.column.name, col.column.sql_type
                ));
            }
        }
        mentioned.extend(used);
    }
    for d in &p.dropped {
        match source_cols.iter().position(|s| &s.name == d) {
            Some(pos) => mentioned.push(pos),
            None => problems.push(format!(
                "mapping.drop: source column {d} does not exist in {t}"
            )),
        }
    }
    let unmentioned: Vec<&str> = source
        .columns
        .iter()
        .enumerate()
        .filter(|(i, c)| !mentioned.contains(i) && !c.generated)
        .map(|(_, c)| c.column.name.as_str())
        .collect();
    if !unmentioned.is_empty() {
        problems.push(format!(
            "source columns {} are neither mapped nor listed under mapping.drop (list them to drop them on purpose)",
            unmentioned.join(", ")
        ));
    }
}

async fn check_mapping<C: GenericClient>(
    tx: &C,
    p: &Pipeline,
    source: &TableInfo,
    target: &TableInfo,
    problems: &mut Vec<String>,
) -> Result<Option<Mapping>> {
    if target.primary_key.is_empty() {
        problems.push(format!("target.ddl: {} has no primary key", p.target_table));
        return Ok(None);
    }
    for (i, m) in p.mapping.iter().enumerate() {
        let expr = match &m.source {
            Source::Column(c) => quote_ident(c),
            Source::Expr(e) => format!("({e})"),
        };
        if !target.columns.iter().any(|c| c.column.name == m.target) {
            problems.push(format!(
                "mapping.columns[{i}]: target column {} does not exist in {}",
                m.target, p.target_table
            ));
            continue;
        }
        let sql = format!(
            "EXPLAIN INSERT INTO {} ({}) SELECT {expr} FROM ONLY {} AS src",
            p.target_table.quoted(),
            quote_ident(&m.target),
            p.source_table.quoted()
        );
        tx.batch_execute("SAVEPOINT mapping_check")
            .await
            .map_err(Error::db("preflight savepoint"))?;
        if let Err(e) = tx.batch_execute(&sql).await {
            problems.push(format!(
                "mapping.columns[{i}] (target column {}): {}",
                m.target,
                db_text(&e)
            ));
        }
        tx.batch_execute("ROLLBACK TO SAVEPOINT mapping_check")
            .await
            .map_err(Error::db("preflight savepoint"))?;
    }
    for c in &target.columns {
        let mapped = p.mapping.iter().any(|m| m.target == c.column.name);
        if !mapped && c.column.not_null && !c.column.has_default && !c.generated {
            problems.push(format!(
                "target column {} is NOT NULL without a default and not mapped; map it (mapping.columns) or give it a default",
                c.column.name
            ));
        }
    }
    let target_cols = target.plain_columns();
    match Mapping::new(
        source.plain_columns(),
        source.key_positions(),
        &target_cols,
        &target.primary_key,
        &p.mapping,
    ) {
        Ok(m) => Ok(Some(m)),
        Err(list) => {
            problems.extend(list);
            Ok(None)
        }
    }
}

fn notes(source: &TableInfo) -> Vec<String> {
    let mut notes = Vec::new();
    for t in &source.triggers {
        notes.push(format!("trigger {t}: stays on the source; replayed rows do not fire triggers on the target (session_replication_role = replica)"));
    }
    for f in &source.foreign_keys_out {
        notes.push(format!("foreign key {f}: not enforced for replayed rows; declare it in target.ddl to have it on the new table"));
    }
    for f in &source.foreign_keys_in {
        notes.push(format!(
            "referenced by {f}: the reference stays on the old table until cut-over re-points it"
        ));
    }
    for (col, seq) in &source.sequences {
        notes.push(format!("sequence {seq} feeds column {col}: values are copied as they are; cut-over moves the sequence past the highest value"));
    }
    notes
}

/// A stable fingerprint of what a run depends on; a resumed run refuses a
/// pipeline file whose tables, DDL or mapping changed since it started.
pub fn spec_hash(p: &Pipeline) -> String {
    let canonical = format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}",
        p.source_table, p.target_table, p.target_ddl, p.mapping, p.dropped
    );
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in canonical.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}
