//! One fixture per rule: a statement that must be flagged, and a safe
//! variant that must not.

use super::*;

fn rules(sql: &str) -> Vec<&'static str> {
    let mut r: Vec<&'static str> = lint("f.sql", sql).iter().map(|f| f.rule).collect();
    r.sort();
    r.dedup();
    r
}

const PRE: &str = "SET lock_timeout = '2s';\n";

#[test]
fn each_rule_has_a_flagged_and_a_safe_fixture() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "index-not-concurrent",
            "CREATE INDEX orders_c ON public.orders (customer_id);",
            "CREATE INDEX CONCURRENTLY orders_c ON public.orders (customer_id);",
        ),
        (
            "add-column-not-null",
            "ALTER TABLE public.orders ADD COLUMN flag boolean NOT NULL;",
            "ALTER TABLE public.orders ADD COLUMN flag boolean NOT NULL DEFAULT false;",
        ),
        (
            "table-rewrite",
            "ALTER TABLE public.orders ALTER COLUMN amount TYPE bigint;",
            "ALTER TABLE public.orders ALTER COLUMN amount SET STATISTICS 500;",
        ),
        (
            "constraint-not-valid",
            "ALTER TABLE public.lines ADD CONSTRAINT fk FOREIGN KEY (order_id) REFERENCES public.orders (id);",
            "ALTER TABLE public.lines ADD CONSTRAINT fk FOREIGN KEY (order_id) REFERENCES public.orders (id) NOT VALID;",
        ),
        (
            "drop-cascade",
            "DROP VIEW public.v CASCADE;",
            "DROP VIEW public.v;",
        ),
        (
            "unbounded-dml",
            "DELETE FROM public.orders;",
            "DELETE FROM public.orders WHERE id = 1;",
        ),
        (
            "breaking-change",
            "ALTER TABLE public.orders RENAME COLUMN note TO remark;",
            "ALTER TABLE public.orders ADD COLUMN remark text;",
        ),
        (
            "unqualified-name",
            "ALTER TABLE orders ADD COLUMN remark text;",
            "ALTER TABLE public.orders ADD COLUMN remark text;",
        ),
    ];
    for (rule, bad, good) in cases {
        let flagged = rules(&format!("{PRE}{bad}"));
        assert!(
            flagged.contains(rule),
            "{rule}: not flagged in {bad:?}: {flagged:?}"
        );
        let clean = rules(&format!("{PRE}{good}"));
        assert!(
            !clean.contains(rule),
            "{rule}: flagged in the safe {good:?}: {clean:?}"
        );
    }
}

#[test]
fn lock_timeout_mixed_transactional_and_parse_errors() {
    assert!(rules("ALTER TABLE public.orders ADD COLUMN r text;").contains(&"no-lock-timeout"));
    assert!(!rules(&format!(
        "{PRE}ALTER TABLE public.orders ADD COLUMN r text;"
    ))
    .contains(&"no-lock-timeout"));
    let mixed = format!("{PRE}CREATE INDEX CONCURRENTLY i ON public.orders (a);\nALTER TABLE public.orders ADD COLUMN r text;");
    assert!(rules(&mixed).contains(&"mixed-transactional"));
    assert!(!rules("CREATE INDEX CONCURRENTLY i ON public.orders (a);")
        .contains(&"mixed-transactional"));
    assert_eq!(rules("ALTER TABLEE x;"), vec!["parse-error"]);
    // A table created in the same file is new: indexing it needs no CONCURRENTLY.
    let fresh = "CREATE TABLE public.t (id int);\nCREATE INDEX t_id ON public.t (id);";
    assert!(!rules(fresh).contains(&"index-not-concurrent"));
    // Volatile defaults rewrite the table.
    assert!(rules(&format!(
        "{PRE}ALTER TABLE public.orders ADD COLUMN u uuid DEFAULT gen_random_uuid();"
    ))
    .contains(&"table-rewrite"));
}

#[test]
fn suppressions_need_a_reason_and_lines_are_right() {
    let sql = format!(
        "{PRE}\n-- lint:allow unbounded-dml the table is a scratch table emptied on purpose\nDELETE FROM public.scratch;\n\
         -- lint:allow unbounded-dml\nUPDATE public.scratch SET a = 1;\nDELETE FROM public.other;"
    );
    let found = lint("f.sql", &sql);
    let lines: Vec<(&str, usize)> = found.iter().map(|f| (f.rule, f.line)).collect();
    assert!(!lines.contains(&("unbounded-dml", 4)), "{lines:?}");
    assert!(
        lines.contains(&("suppression-without-reason", 6)),
        "{lines:?}"
    );
    assert!(lines.contains(&("unbounded-dml", 7)), "{lines:?}");
}
