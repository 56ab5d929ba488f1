//! The checksum statements. Both sides hash the same thing: the row of
//! target values in target column order, as text. The source side computes
//! it through the mapping (each expression cast to its target column's
//! type), the target side reads the stored columns; so a chunk's pair of
//! (count, checksum) is equal exactly when the chunks hold the same rows
//! (up to 64-bit hash collisions of a differing row).

use crate::sink::postgres::sql::{range_conds, source_key_row, target_key_row, where_clause};
use crate::spec::{quote_ident, TableName};
use crate::transform::Mapping;

/// The target-shaped values of a source row: each mapping expression cast
/// to its target column's type.
fn source_values(m: &Mapping) -> Vec<String> {
    m.target_columns
        .iter()
        .map(|c| format!("CAST({} AS {})", c.expr, c.sql_type))
        .collect()
}

/// The mapped columns of a target row, in the same order.
fn target_values(m: &Mapping) -> Vec<String> {
    m.target_columns
        .iter()
        .map(|c| format!("t.{}", quote_ident(&c.name)))
        .collect()
}

/// `count(*), bit_xor(hash)` of the mapped source rows with `lo < key <= hi`.
pub fn source_checksum(m: &Mapping, source: &TableName, has_lo: bool, has_hi: bool) -> String {
    let values = source_values(m);
    checksum(
        &values,
        source,
        "src",
        &range_conds(m, &source_key_row(m), has_lo, has_hi),
    )
}

/// `count(*), bit_xor(hash)` of the target rows with `lo < key <= hi`.
pub fn target_checksum(m: &Mapping, target: &TableName, has_lo: bool, has_hi: bool) -> String {
    let values = target_values(m);
    checksum(
        &values,
        target,
        "t",
        &range_conds(m, &target_key_row(m), has_lo, has_hi),
    )
}

/// Each mapped source row's key (as `text[]`) and hash, for the key-level recheck.
pub fn source_rows(m: &Mapping, source: &TableName, has_lo: bool, has_hi: bool) -> String {
    let values = source_values(m);
    let key = format!("ARRAY[{}]", key_texts(&source_key_row(m)));
    rows(
        &key,
        &values,
        source,
        "src",
        &range_conds(m, &source_key_row(m), has_lo, has_hi),
    )
}

/// Each target row's key (as `text[]`, source key order) and hash.
pub fn target_rows(m: &Mapping, target: &TableName, has_lo: bool, has_hi: bool) -> String {
    let values = target_values(m);
    let key = format!("ARRAY[{}]", key_texts(&target_key_row(m)));
    rows(
        &key,
        &values,
        target,
        "t",
        &range_conds(m, &target_key_row(m), has_lo, has_hi),
    )
}

/// `(a, b)` → `a::text, b::text`.
fn key_texts(row: &str) -> String {
    row.trim_start_matches('(')
        .trim_end_matches(')')
        .split(", ")
        .map(|c| format!("{c}::text"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn rows(key: &str, values: &[String], table: &TableName, alias: &str, conds: &[String]) -> String {
    format!(
        "SELECT {key}, hashtextextended(ROW({})::text, 0) FROM ONLY {} AS {alias} {}",
        values.join(", "),
        table.quoted(),
        where_clause(conds)
    )
}

fn checksum(values: &[String], table: &TableName, alias: &str, conds: &[String]) -> String {
    format!(
        "SELECT count(*), coalesce(bit_xor(hashtextextended(ROW({})::text, 0)), 0) FROM ONLY {} AS {alias} {}",
        values.join(", "),
        table.quoted(),
        where_clause(conds)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{ColumnMapping, Source};
    use crate::transform::Column;

    fn col(name: &str, ty: &str) -> Column {
        Column {
            name: name.into(),
            sql_type: ty.into(),
            not_null: true,
            has_default: false,
        }
    }

    #[test]
    fn both_sides_hash_target_values_in_the_same_order() {
        let m = Mapping::new(
            vec![col("id", "bigint"), col("amount", "numeric(12,2)")],
            vec![0],
            &[col("id", "bigint"), col("cents", "bigint")],
            &["id".to_string()],
            &[
                ColumnMapping {
                    target: "id".into(),
                    source: Source::Column("id".into()),
                },
                ColumnMapping {
                    target: "cents".into(),
                    source: Source::Expr("amount * 100".into()),
                },
            ],
        )
        .unwrap();
        let t = TableName::parse("public.t").unwrap();
        let s = source_checksum(&m, &t, true, true);
        assert!(
            s.contains(r#"ROW(CAST("id" AS bigint), CAST((amount * 100) AS bigint))::text"#),
            "{s}"
        );
        assert!(s.contains(r#"(src."id") > ($1::text::bigint)"#), "{s}");
        assert!(s.contains(r#"(src."id") <= ($2::text::bigint)"#), "{s}");
        let t2 = target_checksum(&m, &t, false, true);
        assert!(t2.contains(r#"ROW(t."id", t."cents")::text"#), "{t2}");
        assert!(t2.contains(r#"(t."id") <= ($1::text::bigint)"#), "{t2}");
        let r = target_rows(&m, &t, false, false);
        assert!(
            r.starts_with(r#"SELECT ARRAY[t."id"::text], hashtextextended"#),
            "{r}"
        );
    }
}
