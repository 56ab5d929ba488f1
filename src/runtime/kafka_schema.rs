//! The Avro shape of a kafka pipeline's source table, and how it follows
//! the source: a column added to the source table while the pipeline runs
//! is appended to the value schema as an optional field (`["null", T]`,
//! default null), which is a backward-compatible change; the encoder
//! registers it as the subject's next version on its first record. Columns
//! are only ever appended, so every earlier record stays readable with the
//! new schema, and the appliers, which read fields by name, go on.

use crate::error::{Error, Result};
use crate::preflight::Checked;
use crate::spec::Pipeline;
use crate::transport::kafka::envelope::{ColumnType, TableSchema};
use tokio_postgres::Client;

/// The Avro shape of the pipeline's source table (refuses unmappable types).
pub async fn table_schema(p: &Pipeline, checked: &Checked, client: &Client) -> Result<TableSchema> {
    let db: String = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(Error::db("read database name"))?
        .get(0);
    crate::preflight::kafka_schema(p, checked, &db)
        .map_err(|problems| Error::Preflight { problems })
}

/// `schema` with the source columns `added` appended, typed from the
/// catalog. A column whose type has no Avro mapping stops the pipeline
/// with the reason (it cannot be carried, and leaving it out silently
/// would publish an incomplete row).
pub async fn with_added(
    p: &Pipeline,
    client: &Client,
    schema: &TableSchema,
    added: &[String],
) -> Result<TableSchema> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), t.typtype = 'e' \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = $1::text::regclass AND a.attname = ANY($2) AND NOT a.attisdropped",
            &[&p.source_table.quoted(), &added],
        )
        .await
        .map_err(Error::db("read added source columns"))?;
    let mut found: Vec<(String, String, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    // In the order the stream carries them.
    found.sort_by_key(|(name, _, _)| added.iter().position(|a| a == name));
    if found.len() != added.len() {
        return Err(Error::Replication(format!(
            "columns {} were added to {} and are gone again; restart the pipeline",
            added.join(", "),
            p.source_table
        )));
    }
    let columns: Vec<ColumnType<'_>> = found
        .iter()
        .map(|(name, sql_type, is_enum)| ColumnType {
            name,
            sql_type,
            is_enum: *is_enum,
        })
        .collect();
    schema
        .with_columns(&columns)
        .map_err(|problems| Error::Preflight {
            problems: problems
                .into_iter()
                .map(|p| format!("{p} (added to the source while the pipeline ran)"))
                .collect(),
        })
}
