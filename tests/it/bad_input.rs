//! Bad input: clear errors, and nothing created on the server.

use crate::support::*;

async fn nothing_created(db: &TestDb, target: &str) {
    let c = db.client().await;
    let schema = c
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = 'rowshift'", &[])
        .await
        .expect("q");
    assert!(schema.is_none(), "the rowshift schema was created");
    assert_no_leftovers(&c, target).await;
}

fn pipeline(table: &str, ddl: &str, mapping: &str) -> String {
    format!(
        "name: bad\nsource: {{ dsn_env: ROWSHIFT_SOURCE_DSN, table: {table} }}\n\
         target: {{ table: public.bad_v2, ddl: \"{ddl}\" }}\nmapping:\n  columns: {mapping}\n"
    )
}

/// Both `plan` and `run` refuse; the message contains every `expected` text.
async fn refused(db: &TestDb, yaml: &str, expected: &[&str]) {
    let file = db.pipeline("bad.yaml", yaml);
    for cmd in ["plan", "run"] {
        let out = db.rowshift(&[cmd, file.to_str().expect("path")]);
        let err = stderr(&out);
        assert!(!out.status.success(), "{cmd} accepted a bad pipeline");
        for e in expected {
            assert!(err.contains(e), "{cmd}: expected {e:?} in:\n{err}");
        }
        assert!(err.contains("hint:"), "{cmd}: no operator hint in:\n{err}");
    }
    nothing_created(db, "public.bad_v2").await;
}

#[tokio::test]
async fn invalid_file_lists_every_problem() {
    let db = TestDb::new("ROWSHIFT_TEST_PG_PORT").await;
    let yaml = "name: Bad Name\nsource: { table: x.y.z }\ntarget: { table: t }\nmapping: { columns: [] }\nbackfill: { chunk_rows: -1, speed: 3 }\n";
    refused(
        &db,
        yaml,
        &[
            "bad.yaml: name:",
            "source.dsn_env: is required",
            "source.table:",
            "target.ddl: is required",
            "mapping.columns:",
            "backfill.chunk_rows:",
            "backfill.speed: unknown field",
        ],
    )
    .await;
}

#[tokio::test]
async fn table_without_primary_key_is_refused() {
    let db = TestDb::new("ROWSHIFT_TEST_PG_PORT").await;
    db.client()
        .await
        .batch_execute("CREATE TABLE nokey (a int, b text)")
        .await
        .expect("setup");
    let yaml = pipeline(
        "public.nokey",
        "CREATE TABLE public.bad_v2 (a int PRIMARY KEY, b text)",
        "[a, b]",
    );
    refused(&db, &yaml, &["has no primary key", "nothing was changed"]).await;
}

#[tokio::test]
async fn missing_table_is_refused() {
    let db = TestDb::new("ROWSHIFT_TEST_PG_PORT").await;
    let yaml = pipeline(
        "public.nowhere",
        "CREATE TABLE public.bad_v2 (a int PRIMARY KEY)",
        "[a]",
    );
    refused(&db, &yaml, &["source.table public.nowhere does not exist"]).await;
}

#[tokio::test]
async fn wal_level_replica_is_refused() {
    let db = TestDb::new("ROWSHIFT_TEST_PG_REPLICA_PORT").await;
    db.client()
        .await
        .batch_execute("CREATE TABLE t (a int PRIMARY KEY)")
        .await
        .expect("setup");
    let yaml = pipeline(
        "public.t",
        "CREATE TABLE public.bad_v2 (a int PRIMARY KEY)",
        "[a]",
    );
    refused(
        &db,
        &yaml,
        &["wal_level is \"replica\"", "wal_level = logical"],
    )
    .await;
}

#[tokio::test]
async fn ddl_mapping_and_column_problems_are_reported_together() {
    let db = TestDb::new("ROWSHIFT_TEST_PG_PORT").await;
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE src (id int PRIMARY KEY, amount numeric, note text, extra int)",
        )
        .await
        .expect("setup");
    // A mapping expression that does not type-check, a missing source column,
    // an unmentioned source column, and an unmapped NOT NULL target column.
    let yaml = pipeline(
        "public.src",
        "CREATE TABLE public.bad_v2 (id int PRIMARY KEY, cents bigint, note text, must text NOT NULL)",
        "[id, { target: cents, expr: \"amount || now()\" }, { target: note, from: nope }]",
    );
    refused(
        &db,
        &yaml,
        &[
            "source column nope does not exist",
            "neither mapped nor listed",
            "(target column cents)",
            "must is NOT NULL",
        ],
    )
    .await;

    let yaml = pipeline(
        "public.src",
        "CREATE TABLE public.bad_v2 (id int PRIMARY KEY, oops)",
        "[id]",
    );
    refused(&db, &yaml, &["target.ddl[0] failed"]).await;
}
