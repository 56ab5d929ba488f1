//! `rowshift migrate lint`: dangerous statements, found by PostgreSQL's own
//! parser (`pg_query`), each with a rule id, file, line, severity and fix.
//!
//! A finding is suppressed by a comment in the lines just before its
//! statement naming the rule and a reason:
//! `-- lint:allow index-not-concurrent the table is created empty above`.
//! A suppression without a reason is itself a finding.

use pg_query::protobuf::{AlterTableType, ConstrType, DropBehavior, ObjectType, RangeVar};
use pg_query::NodeEnum;
use serde::Serialize;
use std::collections::HashSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
}

/// One finding.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub rule: &'static str,
    pub file: String,
    pub line: usize,
    pub severity: Severity,
    pub message: String,
    pub fix: String,
}

/// Every rule: id, severity, and the fix it suggests.
pub const RULES: &[(&str, Severity, &str)] = &[
    ("index-not-concurrent", Severity::Error, "use CREATE INDEX CONCURRENTLY (in a migration of its own, `-- transactional: false`); a plain CREATE INDEX blocks every write to the table while it builds"),
    ("add-column-not-null", Severity::Error, "add the column nullable (or with a constant DEFAULT), backfill it, then add a CHECK (col IS NOT NULL) NOT VALID, VALIDATE it, and SET NOT NULL"),
    ("table-rewrite", Severity::Error, "this rewrites the whole table under an ACCESS EXCLUSIVE lock; run it online as a rowshift pipeline (pipelines/*.yaml: the new shape as target.ddl, the conversion as the mapping), then cut over"),
    ("constraint-not-valid", Severity::Error, "add the constraint NOT VALID (no full-table check under the lock), then ALTER TABLE ... VALIDATE CONSTRAINT in a later statement (which allows writes)"),
    ("drop-cascade", Severity::Error, "drop the dependent objects explicitly; CASCADE removes whatever happens to depend on the object, including things you did not mean to drop"),
    ("unbounded-dml", Severity::Error, "add a WHERE clause; to change every row of a large table, batch it (or use a rowshift pipeline)"),
    ("breaking-change", Severity::Warning, "running code still uses the old name: expand first (add the new column/table and write both), move readers over, and drop or rename in a later release"),
    ("no-lock-timeout", Severity::Warning, "start the file with SET lock_timeout = '2s' so the DDL gives up instead of queueing every other query behind its lock"),
    ("unqualified-name", Severity::Warning, "qualify the table with its schema (e.g. public.orders); an unqualified name depends on the search_path of whoever runs the migration"),
    ("mixed-transactional", Severity::Error, "put statements that cannot run in a transaction (CREATE INDEX CONCURRENTLY, VACUUM, ...) in a migration of their own marked `-- transactional: false`"),
    ("parse-error", Severity::Error, "fix the SQL: PostgreSQL's parser rejects it"),
    ("suppression-without-reason", Severity::Warning, "say why: -- lint:allow <rule> <reason>"),
];

fn rule(id: &'static str) -> (&'static str, Severity, &'static str) {
    RULES
        .iter()
        .copied()
        .find(|r| r.0 == id)
        .unwrap_or((id, Severity::Error, ""))
}

/// One statement of a file: its text, first line, and the comments before it.
pub struct Statement<'a> {
    pub node: Option<&'a NodeEnum>,
    pub text: &'a str,
    pub line: usize,
    pub leading_comments: Vec<&'a str>,
}

/// Parses a file into statements; `Err` carries the parser's message.
pub fn parse(sql: &str) -> Result<pg_query::ParseResult, String> {
    pg_query::parse(sql, 0).map_err(|e| e.to_string())
}

/// The statements of a parse result, located in `sql`. The comments of a
/// statement are the comment lines between the previous statement and it.
pub fn statements<'a>(sql: &'a str, parsed: &'a pg_query::ParseResult) -> Vec<Statement<'a>> {
    let mut prev_end = 0usize;
    let mut out = Vec::new();
    for raw in &parsed.protobuf.stmts {
        let start = (raw.stmt_location.max(0) as usize).min(sql.len());
        let end = if raw.stmt_len > 0 {
            (start + raw.stmt_len as usize).min(sql.len())
        } else {
            sql.len()
        };
        let gap_start = prev_end.min(start);
        let chunk = sql.get(gap_start..end).unwrap_or("");
        // Skip blank lines, comment lines and the `;` of the previous statement.
        let mut offset = 0;
        let mut comments = Vec::new();
        for l in chunk.split_inclusive('\n') {
            let t = l.trim().trim_start_matches(';').trim();
            if t.is_empty() || t.starts_with("--") {
                if t.starts_with("--") {
                    comments.push(t);
                }
                offset += l.len();
            } else {
                break;
            }
        }
        let body = chunk.get(offset..).unwrap_or("");
        let body_start = gap_start + offset + (body.len() - body.trim_start().len());
        out.push(Statement {
            node: raw.stmt.as_ref().and_then(|n| n.node.as_ref()),
            text: body.trim(),
            line: 1 + sql[..body_start.min(sql.len())].matches('\n').count(),
            leading_comments: comments,
        });
        prev_end = end;
    }
    out
}

/// Whether a statement cannot run inside a transaction block.
pub fn non_transactional(node: &NodeEnum) -> bool {
    match node {
        NodeEnum::IndexStmt(i) => i.concurrent,
        NodeEnum::DropStmt(d) => d.concurrent,
        NodeEnum::ReindexStmt(r) => r
            .params
            .iter()
            .any(|p| matches!(&p.node, Some(NodeEnum::DefElem(d)) if d.defname == "concurrently")),
        NodeEnum::VacuumStmt(_)
        | NodeEnum::CreatedbStmt(_)
        | NodeEnum::DropdbStmt(_)
        | NodeEnum::AlterSystemStmt(_)
        | NodeEnum::CreateTableSpaceStmt(_)
        | NodeEnum::DropTableSpaceStmt(_) => true,
        _ => false,
    }
}

/// Lints one file's text.
pub fn lint(file: &str, sql: &str) -> Vec<Finding> {
    let mut out = Vec::new();
    let finding = |id: &'static str, line: usize, message: String| {
        let (rule, severity, fix) = rule(id);
        Finding {
            rule,
            file: file.to_string(),
            line,
            severity,
            message,
            fix: fix.to_string(),
        }
    };
    let parsed = match parse(sql) {
        Ok(p) => p,
        Err(e) => return vec![finding("parse-error", 1, e)],
    };
    let stmts = statements(sql, &parsed);
    let mut created: HashSet<String> = HashSet::new();
    let mut lock_timeout_set = false;
    let (mut tx_lines, mut non_tx_lines) = (Vec::new(), Vec::new());
    for s in &stmts {
        let Some(node) = s.node else { continue };
        let mut found: Vec<(&'static str, String)> = Vec::new();
        if non_transactional(node) {
            non_tx_lines.push(s.line);
        } else if !matches!(
            node,
            NodeEnum::VariableSetStmt(_) | NodeEnum::TransactionStmt(_)
        ) {
            tx_lines.push(s.line);
        }
        check(node, &created, &mut found);
        if let NodeEnum::VariableSetStmt(v) = node {
            if v.name == "lock_timeout" {
                lock_timeout_set = true;
            }
        }
        if takes_strong_lock(node, &created) && !lock_timeout_set {
            found.push((
                "no-lock-timeout",
                "locking DDL runs without a lock_timeout set earlier in the file".into(),
            ));
        }
        if let NodeEnum::CreateStmt(c) = node {
            if let Some(r) = &c.relation {
                created.insert(r.relname.clone());
            }
        }
        for (id, message) in found {
            match suppression(&s.leading_comments, id) {
                Some(true) => {}
                Some(false) => {
                    out.push(finding(
                        "suppression-without-reason",
                        s.line,
                        format!("the suppression of {id} gives no reason"),
                    ));
                }
                None => out.push(finding(id, s.line, message)),
            }
        }
    }
    if !tx_lines.is_empty() && !non_tx_lines.is_empty() {
        out.push(finding(
            "mixed-transactional",
            non_tx_lines[0],
            format!(
                "the statement on line {} cannot run in a transaction, and the file also has transactional statements (line {})",
                non_tx_lines[0], tx_lines[0]
            ),
        ));
    }
    out
}

/// `Some(true)`: suppressed with a reason; `Some(false)`: without one.
fn suppression(comments: &[&str], id: &str) -> Option<bool> {
    comments.iter().find_map(|c| {
        let rest = c
            .trim_start_matches('-')
            .trim()
            .strip_prefix("lint:allow")?
            .trim();
        let (rule, reason) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        (rule == id).then(|| !reason.trim().is_empty())
    })
}

fn table_name(r: &RangeVar) -> String {
    if r.schemaname.is_empty() {
        r.relname.clone()
    } else {
        format!("{}.{}", r.schemaname, r.relname)
    }
}

fn unqualified(r: &Option<RangeVar>, found: &mut Vec<(&'static str, String)>) {
    if let Some(r) = r {
        if r.schemaname.is_empty() {
            found.push((
                "unqualified-name",
                format!("table {} is not schema-qualified", r.relname),
            ));
        }
    }
}

/// Statements that take a lock blocking reads or writes of an existing table.
fn takes_strong_lock(node: &NodeEnum, created: &HashSet<String>) -> bool {
    let existing = |r: &Option<RangeVar>| r.as_ref().is_some_and(|r| !created.contains(&r.relname));
    match node {
        NodeEnum::AlterTableStmt(a) => existing(&a.relation),
        NodeEnum::IndexStmt(i) => !i.concurrent && existing(&i.relation),
        NodeEnum::DropStmt(d) => !d.concurrent && d.remove_type == ObjectType::ObjectTable as i32,
        NodeEnum::RenameStmt(r) => existing(&r.relation),
        _ => false,
    }
}

fn check(node: &NodeEnum, created: &HashSet<String>, found: &mut Vec<(&'static str, String)>) {
    let existing = |r: &Option<RangeVar>| r.as_ref().is_some_and(|r| !created.contains(&r.relname));
    match node {
        NodeEnum::IndexStmt(i) => {
            if !i.concurrent && existing(&i.relation) {
                let t = i.relation.as_ref().map(table_name).unwrap_or_default();
                found.push((
                    "index-not-concurrent",
                    format!("CREATE INDEX on existing table {t} without CONCURRENTLY"),
                ));
            }
            unqualified(&i.relation, found);
        }
        NodeEnum::CreateStmt(c) => unqualified(&c.relation, found),
        NodeEnum::AlterTableStmt(a) => {
            let t = a.relation.as_ref().map(table_name).unwrap_or_default();
            unqualified(&a.relation, found);
            for cmd in &a.cmds {
                let Some(NodeEnum::AlterTableCmd(cmd)) = &cmd.node else {
                    continue;
                };
                let def = cmd.def.as_deref().and_then(|d| d.node.as_ref());
                match AlterTableType::try_from(cmd.subtype).unwrap_or(AlterTableType::Undefined) {
                    AlterTableType::AtAddColumn => {
                        if let Some(NodeEnum::ColumnDef(col)) = def {
                            add_column(&t, col, found);
                        }
                    }
                    AlterTableType::AtAlterColumnType => found.push((
                        "table-rewrite",
                        format!("ALTER COLUMN {} TYPE on {t} rewrites the table (and its indexes)", cmd.name),
                    )),
                    AlterTableType::AtSetTableSpace | AlterTableType::AtSetLogged | AlterTableType::AtSetUnLogged => {
                        found.push(("table-rewrite", format!("this ALTER TABLE rewrites {t}")))
                    }
                    AlterTableType::AtAddConstraint => {
                        if let Some(NodeEnum::Constraint(c)) = def {
                            let kind = ConstrType::try_from(c.contype).unwrap_or(ConstrType::Undefined);
                            if matches!(kind, ConstrType::ConstrForeign | ConstrType::ConstrCheck)
                                && !c.skip_validation
                                && existing(&a.relation)
                            {
                                found.push((
                                    "constraint-not-valid",
                                    format!("{} constraint added to {t} without NOT VALID scans the table under the lock", if kind == ConstrType::ConstrForeign { "foreign key" } else { "check" }),
                                ));
                            }
                        }
                    }
                    AlterTableType::AtDropColumn => {
                        found.push(("breaking-change", format!("DROP COLUMN {} on {t}", cmd.name)));
                        if cmd.behavior == DropBehavior::DropCascade as i32 {
                            found.push(("drop-cascade", format!("DROP COLUMN {} ... CASCADE", cmd.name)));
                        }
                    }
                    AlterTableType::AtSetNotNull => found.push((
                        "add-column-not-null",
                        format!("SET NOT NULL on {t}.{} scans the whole table under an ACCESS EXCLUSIVE lock", cmd.name),
                    )),
                    _ => {}
                }
            }
        }
        NodeEnum::DropStmt(d) => {
            if d.behavior == DropBehavior::DropCascade as i32 {
                found.push(("drop-cascade", "DROP ... CASCADE".into()));
            }
            if d.remove_type == ObjectType::ObjectTable as i32 {
                found.push(("breaking-change", "DROP TABLE".into()));
            }
        }
        NodeEnum::RenameStmt(r) => {
            let kind = ObjectType::try_from(r.rename_type).unwrap_or(ObjectType::Undefined);
            if matches!(kind, ObjectType::ObjectTable | ObjectType::ObjectColumn) {
                let t = r.relation.as_ref().map(table_name).unwrap_or_default();
                found.push((
                    "breaking-change",
                    format!(
                        "RENAME on {t} ({} -> {})",
                        if r.subname.is_empty() { &t } else { &r.subname },
                        r.newname
                    ),
                ));
            }
            unqualified(&r.relation, found);
        }
        NodeEnum::DeleteStmt(d) if d.where_clause.is_none() => {
            let t = d.relation.as_ref().map(table_name).unwrap_or_default();
            found.push(("unbounded-dml", format!("DELETE FROM {t} without WHERE")));
        }
        NodeEnum::UpdateStmt(u) if u.where_clause.is_none() => {
            let t = u.relation.as_ref().map(table_name).unwrap_or_default();
            found.push(("unbounded-dml", format!("UPDATE {t} without WHERE")));
        }
        NodeEnum::VacuumStmt(v) => {
            let full = v
                .options
                .iter()
                .any(|o| matches!(&o.node, Some(NodeEnum::DefElem(d)) if d.defname == "full"));
            if full {
                found.push((
                    "table-rewrite",
                    "VACUUM FULL rewrites the table under an ACCESS EXCLUSIVE lock".into(),
                ));
            }
        }
        NodeEnum::ClusterStmt(_) => found.push((
            "table-rewrite",
            "CLUSTER rewrites the table under an ACCESS EXCLUSIVE lock".into(),
        )),
        _ => {}
    }
}

fn add_column(
    table: &str,
    col: &pg_query::protobuf::ColumnDef,
    found: &mut Vec<(&'static str, String)>,
) {
    let mut not_null = col.is_not_null;
    let mut default: Option<&NodeEnum> = col.raw_default.as_deref().and_then(|n| n.node.as_ref());
    for c in &col.constraints {
        if let Some(NodeEnum::Constraint(c)) = &c.node {
            match ConstrType::try_from(c.contype).unwrap_or(ConstrType::Undefined) {
                ConstrType::ConstrNotnull => not_null = true,
                ConstrType::ConstrDefault => {
                    default = c.raw_expr.as_deref().and_then(|n| n.node.as_ref())
                }
                _ => {}
            }
        }
    }
    let volatile = default.is_some_and(calls_volatile);
    if volatile {
        found.push((
            "table-rewrite",
            format!(
                "ADD COLUMN {} with a volatile DEFAULT rewrites {table}",
                col.colname
            ),
        ));
    } else if not_null && default.is_none() {
        found.push((
            "add-column-not-null",
            format!("ADD COLUMN {} NOT NULL without a DEFAULT fails on a non-empty {table} (or needs a rewrite)", col.colname),
        ));
    }
}

/// Whether an expression calls a function whose value differs per row.
fn calls_volatile(node: &NodeEnum) -> bool {
    const VOLATILE: &[&str] = &[
        "random",
        "gen_random_uuid",
        "uuid_generate_v4",
        "uuid_generate_v1",
        "clock_timestamp",
        "timeofday",
        "nextval",
        "txid_current",
        "statement_timestamp",
    ];
    node.nodes().iter().any(|(n, _, _, _)| {
        match n {
        pg_query::NodeRef::FuncCall(f) => f.funcname.iter().any(|part| {
            matches!(&part.node, Some(NodeEnum::String(s)) if VOLATILE.contains(&s.sval.as_str()))
        }),
        _ => false,
    }
    })
}

#[cfg(test)]
mod tests;
