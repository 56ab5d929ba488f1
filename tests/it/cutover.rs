//! Verification, cut-over, rollback and contract against a real PostgreSQL,
//! with clients writing through the original table name the whole time.

use crate::support::*;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Client;

pub(crate) const MAIN: &str = "ROWSHIFT_TEST_PG_PORT";
pub(crate) const ROWS: i64 = 20_000;

/// `orders` with a serial key, a view, a referencing table and a grant.
pub(crate) async fn create_orders(c: &Client, role: &str) {
    c.batch_execute(&format!(
        "CREATE TABLE orders (
            id bigserial PRIMARY KEY,
            customer_id bigint NOT NULL,
            amount numeric(12,2) NOT NULL DEFAULT 0,
            status text NOT NULL DEFAULT 'new',
            note text,
            legacy_flag boolean);
         INSERT INTO orders (customer_id, amount, status, note, legacy_flag)
         SELECT g % 500, (g % 1000) * 1.25, (ARRAY['new','paid','shipped'])[1 + g % 3],
                CASE WHEN g % 4 = 0 THEN NULL ELSE 'note ' || g END, g % 2 = 0
         FROM generate_series(1, {ROWS}) g;
         CREATE VIEW orders_by_customer AS SELECT id, customer_id, note FROM orders;
         CREATE TABLE order_lines (id serial PRIMARY KEY, order_id bigint NOT NULL REFERENCES orders(id) ON DELETE CASCADE);
         INSERT INTO order_lines (order_id) SELECT g FROM generate_series(1, 200) g;
         DO $$ BEGIN CREATE ROLE {role}; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         GRANT SELECT ON orders TO {role};
         CREATE FUNCTION orders_abs() RETURNS trigger LANGUAGE plpgsql AS
           'BEGIN NEW.customer_id := abs(NEW.customer_id); RETURN NEW; END';
         CREATE TRIGGER orders_abs BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION orders_abs();
         ANALYZE orders;"
    ))
    .await
    .expect("create orders");
}

pub(crate) fn orders_pipeline(name: &str, extra: &str) -> String {
    format!(
        r#"
name: {name}
source: {{ dsn_env: ROWSHIFT_SOURCE_DSN, table: public.orders }}
target:
  table: public.orders_v2
  ddl: |
    CREATE TABLE public.orders_v2 (
      id bigint PRIMARY KEY,
      customer_id bigint NOT NULL,
      amount_cents bigint NOT NULL DEFAULT 0,
      state text NOT NULL DEFAULT 'new',
      note text)
mapping:
  columns:
    - id
    - customer_id
    - {{ target: amount_cents, expr: "round(amount * 100)::bigint" }}
    - {{ target: state, from: status }}
    - note
  drop: [legacy_flag]
  inverse:
    amount: "amount_cents / 100.0"
backfill: {{ chunk_rows: 2000 }}
verify: {{ chunk_rows: 1000 }}
{extra}
"#
    )
}

pub(crate) const OLD_MAPPED: &str =
    "SELECT id, customer_id, round(amount * 100)::bigint, status, note FROM orders_old";
pub(crate) const NEW_AS_TABLE: &str =
    "(SELECT id, customer_id, amount_cents, state, note FROM orders) n";

/// Clients writing through the name `orders` with columns both shapes have.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    handles: Vec<tokio::task::JoinHandle<Result<u64, String>>>,
}

pub(crate) async fn start_load(db: &TestDb, clients: u64) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for i in 0..clients {
        let c = db.client().await;
        let stop = stop.clone();
        handles.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(i);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id: i64 = rng.gen_range(1..ROWS);
                let r = match rng.gen_range(0..10) {
                    0..=4 => {
                        c.execute(
                            "UPDATE orders SET note = $2 WHERE id = $1",
                            &[&id, &format!("upd {n}")],
                        )
                        .await
                    }
                    5..=8 => {
                        c.execute(
                            "INSERT INTO orders (customer_id, note) VALUES ($1, 'ins')",
                            &[&id],
                        )
                        .await
                    }
                    _ => c.execute("DELETE FROM orders WHERE id = $1", &[&id]).await,
                };
                r.map_err(|e| format!("client {i}: {e:?}"))?;
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok(n)
        }));
    }
    Load { stop, handles }
}

impl Load {
    pub(crate) async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for h in self.handles {
            match h.await.expect("client task") {
                Ok(n) => total += n,
                Err(e) => panic!("a client saw an error: {e}"),
            }
        }
        total
    }
}

/// Waits until the active stream applied everything written so far.
/// (The insert position: see `wait_caught_up`.)
pub(crate) async fn wait_applied(c: &Client, name: &str) {
    let target: String = c
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    wait_for("the active stream to catch up", Duration::from_secs(60), || async {
        c.query_opt(
            "SELECT 1 FROM rowshift.pipelines WHERE name = $1 AND \
             CASE WHEN direction = 'forward' THEN applied_lsn ELSE rev_applied_lsn END >= $2::text::pg_lsn \
             AND lag_ms IS NOT NULL",
            &[&name, &target],
        )
        .await
        .ok()
        .flatten()
        .is_some()
    })
    .await;
}

pub(crate) async fn phase(c: &Client, name: &str) -> String {
    c.query_one(
        "SELECT phase FROM rowshift.pipelines WHERE name = $1",
        &[&name],
    )
    .await
    .expect("phase")
    .get(0)
}

pub(crate) async fn wait_phase(c: &Client, name: &str, want: &[&str]) {
    wait_for(
        &format!("phase {want:?}"),
        Duration::from_secs(120),
        || async {
            c.query_opt(
                "SELECT phase FROM rowshift.pipelines WHERE name = $1",
                &[&name],
            )
            .await
            .ok()
            .flatten()
            .is_some_and(|r| want.contains(&r.get::<_, String>(0).as_str()))
        },
    )
    .await;
}

pub(crate) async fn exists(c: &Client, table: &str) -> bool {
    c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .expect("to_regclass")
        .get(0)
}

/// Which shape the table named `orders` has: "old" or "new".
pub(crate) async fn live_shape(c: &Client) -> &'static str {
    let has_amount: bool = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'orders'::regclass AND attname = 'amount')",
            &[],
        )
        .await
        .expect("shape")
        .get(0);
    if has_amount {
        "old"
    } else {
        "new"
    }
}

/// Ends a test: the pipeline is contracted (when cut over) or aborted, so no
/// slot is left on the shared test cluster, and nothing of rowshift remains.
pub(crate) async fn finish(db: &TestDb, c: &Client, name: &str) {
    let (out, gone) = if live_shape(c).await == "new" {
        (db.rowshift(&["contract", name, "--confirm"]), "orders_old")
    } else {
        (db.rowshift(&["abort", name]), "orders_v2")
    };
    ok(&out, "clean up");
    assert_no_leftovers(c, gone).await;
}

/// A changed, a deleted and an extra row in the target `orders_v2`.
pub(crate) async fn corrupt_target(c: &Client) {
    c.batch_execute(
        "UPDATE orders_v2 SET note = 'corrupt' WHERE id = 1500; \
         DELETE FROM orders_v2 WHERE id = 7500; \
         INSERT INTO orders_v2 (id, customer_id, amount_cents, state) VALUES (10000000, 1, 1, 'x')",
    )
    .await
    .expect("corrupt the target");
}

/// `rowshift cutover` while `load` writes; then the load stops (it must
/// have run `min` statements) and the new table carries the name.
/// A fresh database with the `orders` table, a pipeline `<prefix>_<tag>`
/// (with `extra` YAML added) run by `rowshift run` (log tag `run`), caught
/// up. Returns the database, a client, the pipeline's name and the runner.
pub(crate) async fn caught_up_orders(prefix: &str, extra: &str) -> (TestDb, Client, String, Proc) {
    let db = TestDb::new(MAIN).await;
    let c = db.client().await;
    create_orders(&c, &format!("reader_{}", db.tag)).await;
    let name = format!("{prefix}_{}", db.tag);
    let file = db.pipeline("orders.yaml", &orders_pipeline(&name, extra));
    let run = db.spawn_run(&file, "run");
    wait_phase(&c, &name, &["caught_up"]).await;
    (db, c, name, run)
}

/// Starts a write load, repairs the three rows [`corrupt_target`] broke
/// (`verify --repair`), and verifies again under the load: zero
/// mismatches. Returns the load, still running.
pub(crate) async fn repair_under_load(db: &TestDb, name: &str) -> Load {
    let load = start_load(db, 2).await;
    let fixed = ok(
        &db.rowshift(&["verify", name, "--repair"]),
        "verify --repair",
    );
    assert!(fixed.contains("3 repaired"), "{fixed}");
    let again = ok(&db.rowshift(&["verify", name]), "verify under load");
    assert!(again.contains("0 mismatched"), "{again}");
    load
}

pub(crate) async fn cut_over_under(db: &TestDb, c: &Client, name: &str, load: Load, min: u64) {
    let out = ok(&db.rowshift(&["cutover", name]), "cutover");
    assert!(out.contains("write pause"), "{out}");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let statements = load.stop().await;
    assert!(
        statements > min,
        "the load ran only {statements} statements"
    );
    assert_eq!(live_shape(c).await, "new");
}

pub(crate) fn ok(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Cut-over under a write load, writes on the new table, rollback, writes
/// on the old table, a second cut-over, contract: full comparisons between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_rollback_and_contract_under_load() {
    let db = TestDb::new(MAIN).await;
    let c = db.client().await;
    let role = format!("reader_{}", db.tag);
    create_orders(&c, &role).await;
    let name = format!("co_{}", db.tag);
    let file = db.pipeline(
        "orders.yaml",
        &orders_pipeline(
            &name,
            "cutover: { lock_timeout_ms: 1000, carry_triggers: [orders_abs] }",
        ),
    );
    let file_s = file.to_str().expect("path");
    let plan = ok(&db.rowshift(&["plan", file_s]), "plan");
    assert!(
        plan.contains("rollback"),
        "plan should say whether rollback is possible:\n{plan}"
    );
    let _run = db.spawn_run(&file, "run");
    wait_phase(&c, &name, &["caught_up"]).await;

    // Not ready before a verification: the gate says why and changes nothing.
    let early = db.rowshift(&["cutover", &name]);
    assert!(!early.status.success());
    assert!(
        stderr(&early).contains("never verified"),
        "{}",
        stderr(&early)
    );
    assert_eq!(live_shape(&c).await, "old");

    let load = start_load(&db, 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let verified = ok(&db.rowshift(&["verify", &name]), "verify under load");
    assert!(verified.contains("0 mismatched"), "{verified}");
    cut_over_under(&db, &c, &name, load, 200).await;
    assert!(exists(&c, "orders_old").await && !exists(&c, "orders_v2").await);

    // Every committed write is in the live table; the reverse stream kept
    // the old table equal through the inverse mapping.
    wait_applied(&c, &name).await;
    if let Some(d) = diff(&c, OLD_MAPPED, NEW_AS_TABLE).await {
        panic!("old and new differ after the cut-over:\n{d}");
    }
    // Sequence, view, foreign key and grant follow the name.
    let next: i64 = c
        .query_one("SELECT nextval('orders_id_seq')", &[])
        .await
        .expect("seq")
        .get(0);
    let max: i64 = c
        .query_one("SELECT max(id) FROM orders", &[])
        .await
        .expect("max")
        .get(0);
    assert!(
        next > max,
        "the sequence ({next}) must be past the highest id ({max})"
    );
    let view_on_new: bool = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid \
             WHERE r.ev_class = 'orders_by_customer'::regclass AND d.refobjid = 'orders'::regclass)",
            &[],
        )
        .await
        .expect("view")
        .get(0);
    assert!(view_on_new, "the view must read the live table");
    let fk: (bool, bool) = c
        .query_one(
            "SELECT confrelid = 'orders'::regclass, convalidated FROM pg_constraint \
             WHERE conrelid = 'order_lines'::regclass AND contype = 'f'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("fk");
    assert_eq!(
        fk,
        (true, true),
        "the foreign key must reference the live table, validated"
    );
    let granted: bool = c
        .query_one(
            "SELECT has_table_privilege($1, 'orders', 'SELECT')",
            &[&role],
        )
        .await
        .expect("grant")
        .get(0);
    assert!(granted, "the grant must follow the name");
    let trigger: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'orders'::regclass AND tgname = 'orders_abs'",
            &[],
        )
        .await
        .expect("trigger")
        .get(0);
    assert_eq!(trigger, 1, "the carried trigger must be on the live table");
    let abs: i64 = c
        .query_one(
            "INSERT INTO orders (customer_id) VALUES (-5) RETURNING customer_id",
            &[],
        )
        .await
        .expect("insert")
        .get(0);
    assert_eq!(abs, 5, "the carried trigger fires on the new table");
    let status = ok(&db.rowshift(&["status", &name]), "status");
    assert!(
        status.contains("last swap  cutover done: write pause"),
        "{status}"
    );
    assert!(
        status.contains("carries the name public.orders"),
        "{status}"
    );

    // Writes on the new table, including the computed column, then rollback.
    c.batch_execute(
        "UPDATE orders SET amount_cents = amount_cents + 150 WHERE id % 7 = 0; \
         DELETE FROM orders WHERE id % 11 = 0; \
         INSERT INTO orders (customer_id, amount_cents, state) VALUES (1, 12345, 'paid')",
    )
    .await
    .expect("writes on the new table");
    let contract_early = db.rowshift(&["contract", &name]);
    assert!(
        !contract_early.status.success(),
        "contract must wait for the reverse window or --confirm"
    );
    let load = start_load(&db, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ok(&db.rowshift(&["rollback", &name]), "rollback");
    tokio::time::sleep(Duration::from_millis(500)).await;
    load.stop().await;
    assert_eq!(live_shape(&c).await, "old");
    wait_applied(&c, &name).await;
    let old_live = "SELECT id, customer_id, round(amount * 100)::bigint, status, note FROM orders";
    let new_shadow = "(SELECT id, customer_id, amount_cents, state, note FROM orders_v2) n";
    if let Some(d) = diff(&c, old_live, new_shadow).await {
        panic!("writes made after the cut-over are missing after the rollback:\n{d}");
    }
    let cents: i64 = c
        .query_one("SELECT count(*) FROM orders WHERE amount = 123.45", &[])
        .await
        .expect("q")
        .get(0);
    assert_eq!(
        cents, 1,
        "the row inserted on the new table is in the old one"
    );
    // The sequence belongs to the live table again, so dropping the new
    // table (abort) could not take it along.
    let owned: Option<String> = c
        .query_one("SELECT pg_get_serial_sequence('orders', 'id')", &[])
        .await
        .expect("sequence")
        .get(0);
    assert!(
        owned.is_some(),
        "the sequence must be owned by the live table after rollback"
    );

    // Forward again: writes on the old table reach the new one; cut over
    // once more and contract.
    c.batch_execute("UPDATE orders SET amount = amount + 1 WHERE id % 13 = 0")
        .await
        .expect("writes on the old table");
    wait_applied(&c, &name).await;
    if let Some(d) = diff(&c, old_live, new_shadow).await {
        panic!("the forward stream did not resume after the rollback:\n{d}");
    }
    ok(&db.rowshift(&["cutover", &name]), "second cutover");
    assert_eq!(live_shape(&c).await, "new");
    let done = ok(&db.rowshift(&["contract", &name, "--confirm"]), "contract");
    assert!(done.contains("contracted"), "{done}");
    assert_eq!(phase(&c, &name).await, "contracted");
    assert!(
        !exists(&c, "orders_old").await,
        "the old table must be dropped"
    );
    assert_no_leftovers(&c, "orders_old").await;
    let rows: i64 = c
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .expect("q")
        .get(0);
    assert!(rows > ROWS / 2);
}

/// Verification catches a changed, a deleted and an extra target row;
/// `--repair` re-copies them through the running pipeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_and_repairs_corruption() {
    let (db, c, name, _run) = caught_up_orders("vr", "").await;
    corrupt_target(&c).await;
    let bad = db.rowshift(&["verify", &name, "--output", "json"]);
    assert!(
        !bad.status.success(),
        "verify must fail on a corrupted target"
    );
    let report: serde_json::Value = serde_json::from_slice(&bad.stdout).expect("json report");
    assert_eq!(
        report["mismatches"].as_array().map(|a| a.len()),
        Some(3),
        "{report}"
    );
    let status = ok(&db.rowshift(&["status", &name]), "status");
    assert!(status.contains("3 mismatched"), "{status}");

    let load = repair_under_load(&db, &name).await;
    load.stop().await;
    wait_applied(&c, &name).await;
    let old = "SELECT id, customer_id, round(amount * 100)::bigint, status, note FROM orders";
    if let Some(d) = diff(
        &c,
        old,
        "(SELECT id, customer_id, amount_cents, state, note FROM orders_v2) n",
    )
    .await
    {
        panic!("the repaired target differs:\n{d}");
    }
    finish(&db, &c, &name).await;
}

/// A long transaction holds the table: cut-over retries within its budget,
/// gives up naming the blocker, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_contention_gives_up_cleanly() {
    let (db, c, name, _run) = caught_up_orders(
        "lk",
        "cutover: { lock_timeout_ms: 100, lock_attempts: 3, backoff_max_ms: 200 }",
    )
    .await;
    ok(&db.rowshift(&["verify", &name]), "verify");
    let blocker = connect(&format!("{} application_name=long_report", db.dsn)).await;
    blocker
        .batch_execute("BEGIN; SELECT count(*) FROM orders")
        .await
        .expect("hold a lock");
    let out = db.rowshift(&["cutover", &name]);
    assert!(!out.status.success(), "cut-over must give up");
    let err = stderr(&out);
    assert!(
        err.contains("in 3 attempts") && err.contains("long_report"),
        "{err}"
    );
    assert_eq!(live_shape(&c).await, "old");
    assert!(exists(&c, "orders_v2").await && !exists(&c, "orders_old").await);
    assert_eq!(phase(&c, &name).await, "verified");
    let rev_slot: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&format!("rowshift_{name}_rev")],
        )
        .await
        .expect("slots")
        .get(0);
    assert_eq!(
        rev_slot, 0,
        "the slot made for the reverse stream must be dropped again"
    );
    blocker.batch_execute("COMMIT").await.expect("commit");
    // Once the blocker is gone the same cut-over goes through.
    ok(
        &db.rowshift(&["cutover", &name]),
        "cutover after the blocker left",
    );
    assert_eq!(live_shape(&c).await, "new");
    finish(&db, &c, &name).await;
}
