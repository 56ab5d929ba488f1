//! The reverse mapping: new-table row → old-table row, so that after the
//! swap the old table can be kept current for a rollback.
//!
//! Each old column gets its value from, in order: `mapping.inverse` (an SQL
//! expression over the new table's columns); the new column it was copied
//! to by plain reference (a rename reverses itself); nothing, if the column
//! was dropped and may be left to its default or NULL. A column that fed a
//! computed target column without an inverse would go stale in the old
//! table, so it makes rollback impossible, as does a dropped NOT NULL
//! column without a default.

use crate::error::{db_text, Error, Result};
use crate::sink::postgres::sql;
use crate::source::postgres::introspect;
use crate::spec::{ColumnMapping, Pipeline, Source, TableName};
use crate::transform::{referenced_columns, Mapping};
use tokio_postgres::GenericClient;

/// The reverse mapping, or why there is none.
#[derive(Debug, Clone)]
pub enum Reverse {
    Ready {
        mapping: Mapping,
        /// Old columns the reverse stream leaves alone (dropped by the pipeline).
        not_carried: Vec<String>,
    },
    Refused(Vec<String>),
}

/// Builds the reverse mapping between `new` (its source) and `old` (its
/// target) and has PostgreSQL type-check its upsert (nothing is executed).
pub async fn reverse_mapping<C: GenericClient>(
    client: &C,
    p: &Pipeline,
    new: &TableName,
    old: &TableName,
) -> Result<Reverse> {
    let (Some(new_info), Some(old_info)) = (
        introspect::table_info(client, new).await?,
        introspect::table_info(client, old).await?,
    ) else {
        return Err(Error::State(format!(
            "tables {new} and {old} must both exist to build the reverse mapping"
        )));
    };
    let old_cols = old_info.plain_columns();
    let mut spec = Vec::new();
    let mut reasons = Vec::new();
    let mut not_carried = Vec::new();
    for c in old_info.columns.iter().filter(|c| !c.generated) {
        let name = &c.column.name;
        if let Some((_, expr)) = p.inverse.iter().find(|(col, _)| col == name) {
            spec.push(ColumnMapping {
                target: name.clone(),
                source: Source::Expr(expr.clone()),
            });
            continue;
        }
        let plain = p
            .mapping
            .iter()
            .find(|m| m.source == Source::Column(name.clone()));
        if let Some(m) = plain {
            spec.push(ColumnMapping {
                target: name.clone(),
                source: Source::Column(m.target.clone()),
            });
            continue;
        }
        let feeds_expression = p.mapping.iter().any(|m| match &m.source {
            Source::Expr(e) => !referenced_columns(e, std::slice::from_ref(&c.column)).is_empty(),
            Source::Column(_) => false,
        });
        if feeds_expression {
            reasons.push(format!(
                "old column {name} feeds a computed column and has no inverse: add mapping.inverse.{name} (an SQL expression over the new table's columns)"
            ));
        } else if c.column.not_null && !c.column.has_default {
            reasons.push(format!(
                "old column {name} was dropped and is NOT NULL without a default: add mapping.inverse.{name} so rows written after cut-over can be carried back"
            ));
        } else {
            not_carried.push(name.clone());
        }
    }
    for (col, _) in &p.inverse {
        if !old_cols.iter().any(|c| &c.name == col) {
            reasons.push(format!(
                "mapping.inverse.{col}: the old table has no column {col}"
            ));
        }
    }
    if !reasons.is_empty() {
        return Ok(Reverse::Refused(reasons));
    }
    let mapping = match Mapping::new(
        new_info.plain_columns(),
        new_info.key_positions(),
        &old_cols,
        &old_info.primary_key,
        &spec,
    ) {
        Ok(m) => m,
        Err(list) => return Ok(Reverse::Refused(list)),
    };
    // Type-check the statement the reverse stream will run.
    let binds = crate::sink::postgres::typed::binds(&mapping);
    let statements = sql::update_rows(&mapping, old, &binds)
        .into_iter()
        .chain([sql::insert_missing(&mapping, old, &binds)]);
    for text in statements {
        if let Err(e) = client.prepare(&text).await {
            return Ok(Reverse::Refused(vec![format!(
                "the inverse mapping does not type-check: {}",
                db_text(&e)
            )]));
        }
    }
    Ok(Reverse::Ready {
        mapping,
        not_carried,
    })
}
