//! `rowshift migrate` against a real PostgreSQL: up/status/history, every
//! validate finding, failure and repair, undo, environments, approvals,
//! hooks, and two runners at once.

use crate::support::*;
use std::path::{Path, PathBuf};

const MAIN: &str = "ROWSHIFT_TEST_PG_PORT";

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, text).expect("write migration");
}

fn migrations(db: &TestDb) -> PathBuf {
    let dir = db.dir.join("migrations");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

fn migrate(db: &TestDb, dir: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["migrate"];
    all.extend_from_slice(&args[..1]);
    let d = dir.to_str().expect("utf-8");
    all.extend_from_slice(&["--dir", d, "--config", "/dev/null"]);
    all.extend_from_slice(&args[1..]);
    db.rowshift(&all)
}

fn out(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(o))
}

fn ok(o: &std::process::Output, what: &str) -> String {
    assert!(o.status.success(), "{what} failed:\n{}", out(o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn base(dir: &Path) {
    write(
        dir,
        "shop/V1__items.sql",
        "SET lock_timeout = '2s';\nCREATE TABLE public.items (id int PRIMARY KEY, name text);\n",
    );
    write(dir, "shop/V1.2__item_price.sql", "-- risk: medium\nSET lock_timeout = '2s';\nALTER TABLE public.items ADD COLUMN price int;\n");
    write(
        dir,
        "shop/U1.2__item_price.sql",
        "ALTER TABLE public.items DROP COLUMN price;\n",
    );
    write(
        dir,
        "shop/V1.10__item_index.sql",
        "-- transactional: false\nCREATE INDEX CONCURRENTLY items_name ON public.items (name);\n",
    );
    write(
        dir,
        "ledger/V1__entries.sql",
        "-- depends_on: shop:1.2\nCREATE TABLE public.entries (id int PRIMARY KEY, item int REFERENCES public.items (id));\n",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_status_history_and_rerun_is_a_noop() {
    let db = TestDb::new(MAIN).await;
    let c = db.client().await;
    let dir = migrations(&db);
    base(&dir);
    let applied = ok(&migrate(&db, &dir, &["up"]), "up");
    // Version order is numeric (1.2 before 1.10) and ledger waits for shop:1.2.
    let order: Vec<&str> = applied
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(
        order,
        ["shop:1", "shop:1.2", "ledger:1", "shop:1.10"],
        "{applied}"
    );
    assert!(applied.contains("not transactional"), "{applied}");
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'items_name'"
        )
        .await,
        1
    );
    let again = ok(&migrate(&db, &dir, &["up"]), "up again");
    assert!(again.contains("nothing to do"), "{again}");
    let status = ok(
        &migrate(&db, &dir, &["status", "--output", "json"]),
        "status",
    );
    let rows: serde_json::Value = serde_json::from_str(&status).expect("json");
    let states: Vec<&str> = rows
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["state"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(states, ["applied"; 4], "{status}");
    let csv = ok(
        &migrate(&db, &dir, &["history", "--output", "csv"]),
        "history",
    );
    assert_eq!(csv.lines().count(), 5, "header + 4 rows:\n{csv}");
    assert!(csv.lines().next().unwrap_or("").contains("checksum"));
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM public.shop_schema_history WHERE success"
        )
        .await,
        3
    );
    // A clean tree validates.
    ok(&migrate(&db, &dir, &["validate"]), "validate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_reports_every_drift() {
    let db = TestDb::new(MAIN).await;
    let dir = migrations(&db);
    base(&dir);
    ok(
        &migrate(&db, &dir, &["up", "--service", "shop", "--target", "1.2"]),
        "up to 1.2",
    );
    // Changed after it was applied; applied file removed; an older version added.
    write(
        &dir,
        "shop/V1__items.sql",
        "SET lock_timeout = '2s';\nCREATE TABLE public.items (id bigint PRIMARY KEY, name text);\n",
    );
    std::fs::remove_file(dir.join("shop/V1.2__item_price.sql")).expect("rm");
    std::fs::remove_file(dir.join("shop/U1.2__item_price.sql")).expect("rm");
    write(&dir, "shop/V1.1__late.sql", "SELECT 1;\n");
    write(
        &dir,
        "ledger/V2__needs_ghost.sql",
        "-- depends_on: ghost:7\nSELECT 1;\n",
    );
    // A cycle across two services.
    write(
        &dir,
        "alpha/V1__a.sql",
        "-- depends_on: beta:1\nSELECT 1;\n",
    );
    write(
        &dir,
        "beta/V1__b.sql",
        "-- depends_on: alpha:1\nSELECT 1;\n",
    );
    let v = migrate(&db, &dir, &["validate"]);
    assert!(!v.status.success(), "validate must fail");
    let text = out(&v);
    for expected in [
        "checksum mismatch: ",
        "missing file: shop:1.2 is applied but its file is gone",
        "out of order: shop:1.1 is pending but older than the newest applied version",
        "unknown dependency: ledger:2 depends on ghost:7",
        "dependency cycle: alpha:1 -> beta:1 -> alpha:1",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    // `up` refuses while there is drift, and changes nothing.
    let drifted = migrate(&db, &dir, &["up", "--service", "shop"]);
    assert!(!drifted.status.success());
    let up = migrate(&db, &dir, &["up"]);
    assert!(!up.status.success());
    assert!(out(&up).contains("nothing was applied"), "{}", out(&up));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_is_recorded_nothing_half_applied_and_repair_allows_a_fix() {
    let db = TestDb::new(MAIN).await;
    let c = db.client().await;
    let dir = migrations(&db);
    write(
        &dir,
        "app/V1__t.sql",
        "CREATE TABLE public.t (id int PRIMARY KEY);\n",
    );
    write(
        &dir,
        "app/V2__broken.sql",
        "CREATE TABLE public.half (id int);\nINSERT INTO public.t VALUES (1), (1);\n",
    );
    let up = migrate(&db, &dir, &["up"]);
    assert!(!up.status.success());
    assert!(out(&up).contains("app:2 failed"), "{}", out(&up));
    assert_eq!(
        count(&c, "SELECT count(*) FROM pg_class WHERE relname = 'half'").await,
        0,
        "half-applied"
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM public.app_schema_history WHERE version = '2' AND NOT success"
        )
        .await,
        1
    );
    let again = migrate(&db, &dir, &["up"]);
    assert!(
        !again.status.success() && out(&again).contains("repair"),
        "{}",
        out(&again)
    );
    write(
        &dir,
        "app/V2__broken.sql",
        "CREATE TABLE public.half (id int);\nINSERT INTO public.t VALUES (1), (2);\n",
    );
    let repaired = ok(&migrate(&db, &dir, &["repair"]), "repair");
    assert!(repaired.contains("removed the failed record"), "{repaired}");
    ok(&migrate(&db, &dir, &["up"]), "up after repair");
    assert_eq!(count(&c, "SELECT count(*) FROM public.t").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undo_environments_approvals_and_hooks() {
    let db = TestDb::new(MAIN).await;
    let c = db.client().await;
    let dir = migrations(&db);
    base(&dir);
    write(
        &dir,
        "shop/V3__prod_only.sql",
        "-- environments: prod\n-- risk: high\nCREATE TABLE public.prod_only (id int);\n",
    );
    // Undo round trip.
    ok(
        &migrate(&db, &dir, &["up", "--service", "shop", "--target", "1.2"]),
        "up",
    );
    let undone = ok(&migrate(&db, &dir, &["undo", "--service", "shop"]), "undo");
    assert!(undone.contains("shop:1.2"), "{undone}");
    assert_eq!(count(&c, "SELECT count(*) FROM pg_attribute WHERE attrelid = 'public.items'::regclass AND attname = 'price'").await, 0);
    let no_undo = migrate(&db, &dir, &["undo", "--service", "shop"]);
    assert!(
        !no_undo.status.success() && out(&no_undo).contains("no undo file"),
        "{}",
        out(&no_undo)
    );
    // Without an environment the prod-only migration is skipped; the undone
    // version runs again (the round trip).
    ok(&migrate(&db, &dir, &["up"]), "up");
    assert_eq!(count(&c, "SELECT count(*) FROM pg_attribute WHERE attrelid = 'public.items'::regclass AND attname = 'price'").await, 1);
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_class WHERE relname = 'prod_only'"
        )
        .await,
        0
    );
    // In prod the policy wants two approvals for high risk, and hooks run.
    let config = db.dir.join("migrate.yaml");
    let log = db.dir.join("hooks.log");
    let hook = db.dir.join("hook.sh");
    std::fs::write(&hook, format!("#!/bin/sh\necho \"$ROWSHIFT_HOOK $ROWSHIFT_SERVICE $ROWSHIFT_VERSION $ROWSHIFT_ENV $ROWSHIFT_OUTCOME\" >> {}\n", log.display())).expect("hook");
    std::process::Command::new("chmod")
        .args(["+x", hook.to_str().expect("path")])
        .status()
        .expect("chmod");
    std::fs::write(
        &config,
        format!(
            "environments:\n  prod:\n    approvals: {{ high: 2 }}\nhooks:\n  pre: [{0}]\n  post: [{0}]\n",
            hook.display()
        ),
    )
    .expect("config");
    let d = dir.to_str().expect("path");
    let cfg = config.to_str().expect("path");
    let up_prod = |extra: &[&str]| {
        let mut args = vec![
            "migrate", "up", "--dir", d, "--config", cfg, "--env", "prod",
        ];
        args.extend_from_slice(extra);
        db.rowshift(&args)
    };
    let refused = up_prod(&[]);
    assert!(!refused.status.success());
    assert!(
        out(&refused).contains("shop:3: needs 2 approval(s) for risk high in prod, has 0"),
        "{}",
        out(&refused)
    );
    for who in ["alice", "alice", "bob"] {
        let o = db.rowshift(&[
            "migrate",
            "approve",
            "3",
            "--dir",
            d,
            "--service",
            "shop",
            "--by",
            who,
            "--env",
            "prod",
        ]);
        ok(&o, "approve");
    }
    ok(&up_prod(&[]), "up in prod after two approvals");
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_class WHERE relname = 'prod_only'"
        )
        .await,
        1
    );
    assert_eq!(count(&c, "SELECT count(*) FROM public.shop_schema_history WHERE version = '3' AND environment = 'prod'").await, 1);
    let hooks = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        hooks.contains("pre shop 3 prod pending") && hooks.contains("post shop 3 prod success"),
        "{hooks}"
    );
    // A failing pre-hook stops the migration.
    write(
        &dir,
        "shop/V4__more.sql",
        "CREATE TABLE public.more (id int);\n",
    );
    std::fs::write(&hook, "#!/bin/sh\nexit 3\n").expect("hook");
    let stopped = up_prod(&[]);
    assert!(
        !stopped.status.success() && out(&stopped).contains("pre-hook"),
        "{}",
        out(&stopped)
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM pg_class WHERE relname = 'more'").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_refuses_lint_errors_unless_suppressed_with_a_reason() {
    let db = TestDb::new(MAIN).await;
    let c = db.client().await;
    let dir = migrations(&db);
    write(
        &dir,
        "app/V1__t.sql",
        "CREATE TABLE public.t (id int PRIMARY KEY, v int);\n",
    );
    write(&dir, "app/V2__wipe.sql", "DELETE FROM public.t;\n");
    ok(&migrate(&db, &dir, &["up", "--target", "1"]), "up to 1");
    let refused = migrate(&db, &dir, &["up"]);
    assert!(!refused.status.success());
    assert!(
        out(&refused).contains("[unbounded-dml]"),
        "{}",
        out(&refused)
    );
    write(
        &dir,
        "app/V2__wipe.sql",
        "-- lint:allow unbounded-dml the table only holds a cache\nDELETE FROM public.t;\n",
    );
    ok(
        &migrate(&db, &dir, &["up"]),
        "up with the finding suppressed",
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM public.app_schema_history").await,
        2
    );
    let lint = migrate(&db, &dir, &["lint", "--output", "json"]);
    let findings: serde_json::Value = serde_json::from_slice(&lint.stdout).expect("json");
    assert!(
        findings
            .as_array()
            .is_some_and(|f| f.iter().all(|x| x["rule"] != "unbounded-dml")),
        "{findings}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runners_at_once_apply_each_version_once() {
    let db = TestDb::new(MAIN).await;
    let c = db.client().await;
    let dir = migrations(&db);
    for i in 1..=5 {
        write(
            &dir,
            &format!("app/V{i}__step.sql"),
            &format!("CREATE TABLE public.s{i} (id int);\nSELECT pg_sleep(0.2);\n"),
        );
    }
    let d = dir.to_str().expect("path").to_string();
    let spawn = |d: String| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_rowshift"));
        cmd.args(["migrate", "up", "--dir", &d, "--config", "/dev/null"])
            .env("ROWSHIFT_SOURCE_DSN", &db.dsn);
        std::thread::spawn(move || cmd.output().expect("run"))
    };
    let (a, b) = (spawn(d.clone()), spawn(d));
    let (a, b) = (a.join().expect("a"), b.join().expect("b"));
    assert!(
        a.status.success() && b.status.success(),
        "{}\n{}",
        out(&a),
        out(&b)
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM public.app_schema_history").await,
        5
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(DISTINCT version) FROM public.app_schema_history"
        )
        .await,
        5
    );
}
