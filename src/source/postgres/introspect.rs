//! Reads what rowshift needs to know about a table and the server: columns
//! and types, the primary key, replica identity, triggers, foreign keys and
//! sequences, `wal_level` and the current role's privileges.

use crate::error::{Error, Result};
use crate::spec::TableName;
use crate::transform::Column;
use tokio_postgres::GenericClient;

/// A source or target table as found in the catalog.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub oid: u32,
    /// `r` table, `p` partitioned, `v` view, ...
    pub relkind: String,
    /// `p` permanent, `u` unlogged, `t` temporary
    pub persistence: String,
    /// `d` default, `n` nothing, `f` full, `i` index
    pub replica_identity: String,
    pub columns: Vec<ColumnInfo>,
    /// Primary key column names in key order (empty when there is none).
    pub primary_key: Vec<String>,
    pub estimated_rows: i64,
    pub triggers: Vec<String>,
    pub foreign_keys_out: Vec<String>,
    pub foreign_keys_in: Vec<String>,
    /// (column, sequence) pairs for sequences the table's columns own or default from.
    pub sequences: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct ColumnInfo {
    pub column: Column,
    /// `b` base, `d` domain, `e` enum, `p` pseudo, `c` composite, `r` range, `m` multirange
    pub typtype: String,
    pub generated: bool,
}

impl TableInfo {
    pub fn plain_columns(&self) -> Vec<Column> {
        self.columns.iter().map(|c| c.column.clone()).collect()
    }

    pub fn key_positions(&self) -> Vec<usize> {
        self.primary_key
            .iter()
            .filter_map(|k| self.columns.iter().position(|c| &c.column.name == k))
            .collect()
    }
}

/// Reads a table's description; `None` when it does not exist.
pub async fn table_info<C: GenericClient>(
    client: &C,
    table: &TableName,
) -> Result<Option<TableInfo>> {
    let row = client
        .query_opt(
            "SELECT c.oid, c.relkind::text, c.relpersistence::text, c.relreplident::text, \
                    greatest(c.reltuples, 0)::int8 \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(Error::db("read table"))?;
    let Some(row) = row else { return Ok(None) };
    let oid: u32 = row.get(0);
    let columns = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
                    a.atthasdef, t.typtype::text, a.attgenerated <> '' \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(Error::db("read columns"))?
        .iter()
        .map(|r| ColumnInfo {
            column: Column {
                name: r.get(0),
                sql_type: r.get(1),
                not_null: r.get(2),
                has_default: r.get(3),
            },
            typtype: r.get(4),
            generated: r.get(5),
        })
        .collect();
    let primary_key = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord",
            &[&oid],
        )
        .await
        .map_err(Error::db("read primary key"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let triggers = names(client, "SELECT tgname::text || ' (' || pg_get_triggerdef(oid) || ')' FROM pg_trigger WHERE tgrelid = $1 AND NOT tgisinternal ORDER BY 1", oid).await?;
    let foreign_keys_out = names(client, "SELECT conname::text || ': ' || pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = $1 AND contype = 'f' ORDER BY 1", oid).await?;
    let foreign_keys_in = names(client, "SELECT conrelid::regclass::text || '.' || conname::text || ': ' || pg_get_constraintdef(oid) FROM pg_constraint WHERE confrelid = $1 AND contype = 'f' ORDER BY 1", oid).await?;
    let sequences = client
        .query(
            "SELECT a.attname::text, pg_get_serial_sequence(c.oid::regclass::text, a.attname) \
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
               AND pg_get_serial_sequence(c.oid::regclass::text, a.attname) IS NOT NULL",
            &[&oid],
        )
        .await
        .map_err(Error::db("read sequences"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(Some(TableInfo {
        oid,
        relkind: row.get(1),
        persistence: row.get(2),
        replica_identity: row.get(3),
        columns,
        primary_key,
        estimated_rows: row.get(4),
        triggers,
        foreign_keys_out,
        foreign_keys_in,
        sequences,
    }))
}

async fn names<C: GenericClient>(client: &C, sql: &str, oid: u32) -> Result<Vec<String>> {
    Ok(client
        .query(sql, &[&oid])
        .await
        .map_err(Error::db("read catalog"))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Server settings and the current role's rights that preflight checks.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub version_num: i32,
    pub wal_level: String,
    pub max_replication_slots: i32,
    pub slots_in_use: i64,
    pub is_superuser: bool,
    pub can_replicate: bool,
    pub can_create_in_db: bool,
}

pub async fn server_info<C: GenericClient>(client: &C) -> Result<ServerInfo> {
    let r = client
        .query_one(
            "SELECT current_setting('server_version_num')::int4, current_setting('wal_level'), \
                    current_setting('max_replication_slots')::int4, \
                    (SELECT count(*) FROM pg_replication_slots), \
                    r.rolsuper, r.rolreplication OR r.rolsuper, \
                    has_database_privilege(current_database(), 'CREATE') \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .map_err(Error::db("read server settings"))?;
    Ok(ServerInfo {
        version_num: r.get(0),
        wal_level: r.get(1),
        max_replication_slots: r.get(2),
        slots_in_use: r.get(3),
        is_superuser: r.get(4),
        can_replicate: r.get(5),
        can_create_in_db: r.get(6),
    })
}

/// Whether the current role may read the table.
pub async fn can_select<C: GenericClient>(client: &C, table: &TableName) -> Result<bool> {
    let r = client
        .query_one(
            "SELECT has_table_privilege($1, 'SELECT')",
            &[&table.quoted()],
        )
        .await
        .map_err(Error::db("check privileges"))?;
    Ok(r.get(0))
}

/// Slot positions for status and throttling: (lag bytes behind the current
/// WAL position, WAL bytes the slot retains, active).
pub async fn slot_lag<C: GenericClient>(
    client: &C,
    slot: &str,
) -> Result<Option<(i64, i64, bool)>> {
    let row = client
        .query_opt(
            "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::int8, \
                    coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::int8, active \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(Error::db("read slot"))?;
    Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
}
