//! SQL for the PostgreSQL sink.
//!
//! The apply loop is the only writer of the target, and it never runs a
//! chunk copy and an apply at the same time (see [`crate::backfill`]). So a
//! key that is not in the target when a statement starts cannot appear
//! before it ends, and new rows can be written with a plain `INSERT`:
//! `ON CONFLICT` (speculative insertion) costs about twice as much per row. Every statement binds values as `text[]`
//! arrays (one per column) and casts them to the source column types inside
//! the server, so a batch of any size is one round trip per statement and no
//! type needs client-side code.

use super::typed::Bind;
use crate::spec::{quote_ident, TableName};
use crate::transform::{unnest_arrays, Mapping};

/// The array types of `binds`, for [`Mapping::unnest_source_as`].
fn arrays(binds: &[Bind]) -> Vec<&'static str> {
    binds.iter().map(|b| b.array_sql()).collect()
}

/// Whole rows (a batch's upserts, keys unique) are written by two
/// statements, [`update_rows`] and [`insert_missing`]. The sink runs the one
/// its batch most likely needs, and the other only when the first's row
/// count shows some rows were left over (see `PgSink::write_rows`). One
/// combined statement (a CTE feeding both) cost 25–35 % more per row than the
/// one that suffices: it probes every key twice and materialises the batch.
///
/// `UPDATE ... FROM <batch>`: rewrites the rows the target has. `None` when
/// the target has only key columns (nothing to update).
///
/// `binds` (one per source column) say how each column's array is bound.
pub fn update_rows(m: &Mapping, target: &TableName, binds: &[Bind]) -> Option<String> {
    let non_key = non_key_columns(m);
    if non_key.is_empty() {
        return None;
    }
    let all: Vec<usize> = (0..m.source_columns.len()).collect();
    let sets: Vec<String> = non_key
        .iter()
        .map(|&i| format!("{0} = v.{0}", quote_ident(&m.target_columns[i].name)))
        .collect();
    Some(format!(
        "UPDATE {} AS t SET {} FROM (SELECT {} FROM {}) AS v WHERE {}",
        target.quoted(),
        sets.join(", "),
        m.select_list(),
        m.unnest_source_as(&all, 1, &arrays(binds)),
        target_key_match(m)
    ))
}

/// Positions of the target's non-key columns (none: [`update_rows`] has
/// nothing to update).
pub fn non_key_columns(m: &Mapping) -> Vec<usize> {
    (0..m.target_columns.len())
        .filter(|i| !m.key_pairs.iter().any(|(t, _)| t == i))
        .collect()
}

/// `t.k = v.k AND ...` over the target's key columns.
fn target_key_match(m: &Mapping) -> String {
    m.key_pairs
        .iter()
        .map(|(t, _)| {
            let k = quote_ident(&m.target_columns[*t].name);
            format!("t.{k} = v.{k}")
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// `INSERT ... WHERE NOT EXISTS`: adds the rows whose keys the target lacks.
pub fn insert_missing(m: &Mapping, target: &TableName, binds: &[Bind]) -> String {
    let all: Vec<usize> = (0..m.source_columns.len()).collect();
    format!(
        "INSERT INTO {} ({}) SELECT {} FROM (SELECT {} FROM {}) AS v \
         WHERE NOT EXISTS (SELECT 1 FROM {} AS t WHERE {})",
        target.quoted(),
        m.target_list(),
        m.target_list(),
        m.select_list(),
        m.unnest_source_as(&all, 1, &arrays(binds)),
        target.quoted(),
        target_key_match(m)
    )
}

/// Join condition between the target `t` and key columns exposed as `src`.
fn key_join(m: &Mapping, src_alias: &str) -> String {
    m.key_pairs
        .iter()
        .map(|(t, s)| {
            format!(
                "t.{} = {src_alias}.{}",
                quote_ident(&m.target_columns[*t].name),
                quote_ident(&m.source_columns[*s].name)
            )
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// `DELETE ... USING <key arrays>`; `binds` are the key columns'.
pub fn delete(m: &Mapping, target: &TableName, binds: &[Bind]) -> String {
    format!(
        "DELETE FROM {} AS t USING {} WHERE {}",
        target.quoted(),
        m.unnest_source_as(&m.source_key, 1, &arrays(binds)),
        key_join(m, "src")
    )
}

/// Re-reads rows by key from the source table (same database) and upserts
/// them. Used for the backfill's key ranges too (see [`copy_range`]).
pub fn refetch(m: &Mapping, source: &TableName, target: &TableName) -> String {
    let keys: Vec<String> = m
        .source_key
        .iter()
        .map(|&p| format!("src.{}", quote_ident(&m.source_columns[p].name)))
        .collect();
    let casts: Vec<String> = m
        .source_key
        .iter()
        .enumerate()
        .map(|(i, &p)| format!("u.c{i}::{}", m.source_columns[p].sql_type))
        .collect();
    format!(
        "INSERT INTO {} ({}) SELECT {} FROM ONLY {} AS src WHERE ({}) IN (SELECT {} FROM {}) {}",
        target.quoted(),
        m.target_list(),
        m.select_list(),
        source.quoted(),
        keys.join(", "),
        casts.join(", "),
        unnest_arrays(m.source_key.len(), 1),
        m.on_conflict()
    )
}

/// Key columns of the source as a row value, e.g. `(src."a", src."b")`.
pub fn source_key_row(m: &Mapping) -> String {
    let cols: Vec<String> = m
        .source_key
        .iter()
        .map(|&p| format!("src.{}", quote_ident(&m.source_columns[p].name)))
        .collect();
    format!("({})", cols.join(", "))
}

/// `lo < row <= hi` (either bound optional) for a key row value; the
/// parameters are the `lo` key columns, then the `hi` key columns.
pub fn range_conds(m: &Mapping, row: &str, has_lo: bool, has_hi: bool) -> Vec<String> {
    let mut conds = Vec::new();
    if has_lo {
        conds.push(format!("{row} > {}", key_params(m, 1)));
    }
    if has_hi {
        let first = if has_lo { m.source_key.len() + 1 } else { 1 };
        conds.push(format!("{row} <= {}", key_params(m, first)));
    }
    conds
}

/// Re-copies the source rows with `lo < key <= hi` over the target (a
/// verification repair): the upsert half; [`repair_delete`] is the other.
pub fn repair_upsert(
    m: &Mapping,
    source: &TableName,
    target: &TableName,
    has_lo: bool,
    has_hi: bool,
) -> String {
    let conds = range_conds(m, &source_key_row(m), has_lo, has_hi);
    format!(
        "INSERT INTO {} ({}) SELECT {} FROM ONLY {} AS src {} {}",
        target.quoted(),
        m.target_list(),
        m.select_list(),
        source.quoted(),
        where_clause(&conds),
        m.on_conflict()
    )
}

/// Deletes the target rows in `lo < key <= hi` whose key the source lacks.
pub fn repair_delete(
    m: &Mapping,
    source: &TableName,
    target: &TableName,
    has_lo: bool,
    has_hi: bool,
) -> String {
    let mut conds = range_conds(m, &target_key_row(m), has_lo, has_hi);
    conds.push(format!(
        "NOT EXISTS (SELECT 1 FROM ONLY {} AS src WHERE {})",
        source.quoted(),
        key_join(m, "src")
    ));
    format!(
        "DELETE FROM ONLY {} AS t {}",
        target.quoted(),
        where_clause(&conds)
    )
}

/// `WHERE a AND b`, or nothing for no conditions.
pub fn where_clause(conds: &[String]) -> String {
    if conds.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conds.join(" AND "))
    }
}

/// The target's key columns as a row value `(t."a", t."b")`, in the order
/// of the source key (so it compares with [`key_params`]).
pub fn target_key_row(m: &Mapping) -> String {
    let cols: Vec<String> = m
        .source_key
        .iter()
        .filter_map(|p| m.key_pairs.iter().find(|(_, s)| s == p))
        .map(|(t, _)| format!("t.{}", quote_ident(&m.target_columns[*t].name)))
        .collect();
    format!("({})", cols.join(", "))
}

/// Parameters `$first..` cast to the key types, as a row value.
pub fn key_params(m: &Mapping, first: usize) -> String {
    let ps: Vec<String> = m
        .source_key
        .iter()
        .enumerate()
        .map(|(i, &p)| format!("${}::text::{}", first + i, m.source_columns[p].sql_type))
        .collect();
    format!("({})", ps.join(", "))
}

/// Copies the source rows with `lo < key <= hi` (either bound optional) into
/// the target, those it lacks when `probe` is set. Parameters: the `lo` key
/// columns, then the `hi` key columns.
pub fn copy_range(
    m: &Mapping,
    source: &TableName,
    target: &TableName,
    has_lo: bool,
    has_hi: bool,
    probe: bool,
) -> String {
    let mut conds = range_conds(m, &source_key_row(m), has_lo, has_hi);
    if probe {
        // The same bounds on the source and, for the "already there" probe,
        // on the target: an unbounded probe may be planned as a scan of the
        // whole (growing) target for every chunk.
        let mut probe = vec![key_join(m, "src")];
        probe.extend(range_conds(m, &target_key_row(m), has_lo, has_hi));
        // Rows the target already has were written by the stream from a full
        // row image or a refetch and converge on their own; the copy adds
        // the rest.
        conds.push(format!(
            "NOT EXISTS (SELECT 1 FROM {} AS t WHERE {})",
            target.quoted(),
            probe.join(" AND ")
        ));
    }
    if conds.is_empty() {
        conds.push("true".into());
    }
    format!(
        "INSERT INTO {} ({}) SELECT {} FROM ONLY {} AS src WHERE {}",
        target.quoted(),
        m.target_list(),
        m.select_list(),
        source.quoted(),
        conds.join(" AND ")
    )
}

/// The key `$offset` keys after `lo` (and not past `hi`), in key order: the
/// upper bound of the next chunk, as text. Parameters: `lo` key columns,
/// `hi` key columns, then the offset.
pub fn next_bound(m: &Mapping, source: &TableName, has_lo: bool, has_hi: bool) -> String {
    let n = m.source_key.len();
    let cols: Vec<String> = m
        .source_key
        .iter()
        .map(|&p| format!("src.{}::text", quote_ident(&m.source_columns[p].name)))
        .collect();
    let order: Vec<String> = m
        .source_key
        .iter()
        .map(|&p| format!("src.{}", quote_ident(&m.source_columns[p].name)))
        .collect();
    let mut conds = Vec::new();
    let mut next = 1;
    if has_lo {
        conds.push(format!("{} > {}", source_key_row(m), key_params(m, next)));
        next += n;
    }
    if has_hi {
        conds.push(format!("{} <= {}", source_key_row(m), key_params(m, next)));
        next += n;
    }
    let filter = where_clause(&conds);
    format!(
        "SELECT {} FROM ONLY {} AS src {filter} ORDER BY {} OFFSET ${next}::int8 LIMIT 1",
        cols.join(", "),
        source.quoted(),
        order.join(", ")
    )
}

/// Partial update for rows carrying only `carried` columns, recomputing
/// `update` target columns. Returns the keys it found (as text).
pub fn partial_update(
    m: &Mapping,
    target: &TableName,
    carried: &[usize],
    update: &[usize],
) -> String {
    let keys: Vec<String> = m
        .source_key
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            format!(
                "src.{} AS \"__k{i}\"",
                quote_ident(&m.source_columns[p].name)
            )
        })
        .collect();
    let key_text: Vec<String> = (0..m.source_key.len())
        .map(|i| format!("v.\"__k{i}\"::text"))
        .collect();
    let join: Vec<String> = m
        .key_pairs
        .iter()
        .map(|(t, s)| {
            let i = m.source_key.iter().position(|k| k == s).unwrap_or(0);
            format!(
                "t.{} = v.\"__k{i}\"",
                quote_ident(&m.target_columns[*t].name)
            )
        })
        .collect();
    let unnest = m.unnest_source(carried, 1);
    if update.is_empty() {
        return format!(
            "SELECT {} FROM (SELECT {} FROM {unnest}) AS v WHERE EXISTS (SELECT 1 FROM {} AS t WHERE {})",
            key_text.join(", "),
            keys.join(", "),
            target.quoted(),
            join.join(" AND ")
        );
    }
    let values: Vec<String> = update
        .iter()
        .map(|&i| {
            format!(
                "{} AS {}",
                m.target_columns[i].expr,
                quote_ident(&m.target_columns[i].name)
            )
        })
        .collect();
    let sets: Vec<String> = update
        .iter()
        .map(|&i| format!("{0} = v.{0}", quote_ident(&m.target_columns[i].name)))
        .collect();
    format!(
        "UPDATE {} AS t SET {} FROM (SELECT {}, {} FROM {unnest}) AS v WHERE {} RETURNING {}",
        target.quoted(),
        sets.join(", "),
        keys.join(", "),
        values.join(", "),
        join.join(" AND "),
        key_text.join(", ")
    )
}

/// The source rows with `lo < key <= hi`, every column (the mapping's,
/// then `added`) as text, in key order, at most `$n` of them when `limited`
/// (the parameter after the key bounds). The kafka transport's backfill
/// chunks read these.
pub fn source_rows(
    m: &Mapping,
    added: &[String],
    source: &TableName,
    has_lo: bool,
    has_hi: bool,
    limited: bool,
) -> String {
    let cols: Vec<String> = m
        .source_columns
        .iter()
        .map(|c| &c.name)
        .chain(added)
        .map(|c| format!("src.{}::text", quote_ident(c)))
        .collect();
    let order: Vec<String> = m
        .source_key
        .iter()
        .map(|&p| format!("src.{}", quote_ident(&m.source_columns[p].name)))
        .collect();
    let conds = range_conds(m, &source_key_row(m), has_lo, has_hi);
    let bounds = [has_lo, has_hi].iter().filter(|b| **b).count();
    let limit = if limited {
        format!(" LIMIT ${}::text::int8", bounds * m.source_key.len() + 1)
    } else {
        String::new()
    };
    format!(
        "SELECT {} FROM ONLY {} AS src {} ORDER BY {}{limit}",
        cols.join(", "),
        source.quoted(),
        where_clause(&conds),
        order.join(", ")
    )
}

/// The keys (source key order, as text) of target rows with
/// `lo < key <= hi` that the source lacks.
pub fn orphan_keys(
    m: &Mapping,
    source: &TableName,
    target: &TableName,
    has_lo: bool,
    has_hi: bool,
) -> String {
    let cols: Vec<String> = m
        .source_key
        .iter()
        .filter_map(|p| m.key_pairs.iter().find(|(_, s)| s == p))
        .map(|(t, _)| format!("t.{}::text", quote_ident(&m.target_columns[*t].name)))
        .collect();
    let mut conds = range_conds(m, &target_key_row(m), has_lo, has_hi);
    conds.push(format!(
        "NOT EXISTS (SELECT 1 FROM ONLY {} AS src WHERE {})",
        source.quoted(),
        key_join(m, "src")
    ));
    format!(
        "SELECT {} FROM ONLY {} AS t {}",
        cols.join(", "),
        target.quoted(),
        where_clause(&conds)
    )
}
