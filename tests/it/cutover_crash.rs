//! Crashes around the cut-over: `rowshift cutover` killed at each step, and
//! the runner killed while the reverse stream runs; full comparisons after.

use crate::cutover::*;
use crate::support::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// kill -9 of `rowshift cutover` at each step: exactly one table carries
/// the name, with all the data, and a new cut-over (or rollback) works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_each_cutover_step() {
    let (db, c, name, _run) = caught_up_orders("cc", "").await;
    ok(&db.rowshift(&["verify", &name]), "verify");
    let written = Arc::new(AtomicU64::new(0));
    for step in [
        "cutover:before-lock",
        "cutover:locked",
        "cutover:drained",
        "cutover:before-commit",
        "cutover:committed",
    ] {
        let log = db
            .dir
            .join(format!("cutover-{}.log", step.replace(':', "-")));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rowshift"))
            .args(["cutover", &name])
            .env("ROWSHIFT_SOURCE_DSN", &db.dsn)
            .env("ROWSHIFT_FAILPOINT", step)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .map(Proc)
            .expect("spawn cutover");
        wait_for(
            &format!("failpoint {step}"),
            Duration::from_secs(60),
            || async {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("reached")
            },
        )
        .await;
        kill(&mut child);
        // A write through the name lands wherever the name points.
        c.execute(
            "INSERT INTO orders (customer_id, note) VALUES (7, $1)",
            &[&step],
        )
        .await
        .expect("write after the kill");
        written.fetch_add(1, Ordering::Relaxed);
        let one_named = exists(&c, "orders").await
            && (exists(&c, "orders_old").await != exists(&c, "orders_v2").await);
        assert!(one_named, "{step}: exactly one table must carry the name");
        let swapped = live_shape(&c).await == "new";
        assert_eq!(
            swapped,
            step == "cutover:committed",
            "{step}: unexpected live table"
        );
        wait_applied(&c, &name).await;
        let (live, shadow) = if swapped {
            (
                "SELECT id, customer_id, amount_cents, state, note FROM orders",
                "(SELECT id, customer_id, round(amount * 100)::bigint, status, note FROM orders_old) o",
            )
        } else {
            (
                "SELECT id, customer_id, round(amount * 100)::bigint, status, note FROM orders",
                "(SELECT id, customer_id, amount_cents, state, note FROM orders_v2) n",
            )
        };
        if let Some(d) = diff(&c, live, shadow).await {
            panic!("{step}: the tables differ after the kill:\n{d}");
        }
        let status = ok(&db.rowshift(&["status", &name]), "status");
        assert!(
            status.contains(if swapped {
                "carries the name"
            } else {
                "the old table public.orders"
            }),
            "{step}: status must say which table is live:\n{status}"
        );
        if swapped {
            ok(
                &db.rowshift(&["rollback", &name]),
                "rollback after the crash",
            );
            wait_phase(&c, &name, &["caught_up", "rolled_back"]).await;
        }
    }
    let notes: i64 = c
        .query_one(
            "SELECT count(*) FROM orders WHERE customer_id = 7 AND note LIKE 'cutover:%'",
            &[],
        )
        .await
        .expect("q")
        .get(0);
    assert_eq!(
        notes as u64,
        written.load(Ordering::Relaxed),
        "a write made between the steps was lost"
    );
    ok(&db.rowshift(&["cutover", &name]), "the final cut-over");
    assert_eq!(live_shape(&c).await, "new");
    finish(&db, &c, &name).await;
}

/// kill -9 of the runner while the reverse stream runs: the restarted
/// runner resumes the reverse stream from its slot, and a rollback then
/// carries every write made on the new table, before and after the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_killed_during_the_reverse_stream_resumes_it() {
    let (db, c, name, mut run) = caught_up_orders("rk", "").await;
    ok(&db.rowshift(&["verify", &name]), "verify");
    ok(&db.rowshift(&["cutover", &name]), "cutover");
    c.batch_execute("UPDATE orders SET note = 'before kill' WHERE id % 5 = 0")
        .await
        .expect("write");
    wait_applied(&c, &name).await;
    kill(&mut run);
    c.batch_execute(
        "UPDATE orders SET note = 'while down' WHERE id % 7 = 0; DELETE FROM orders WHERE id % 9 = 0; \
         INSERT INTO orders (customer_id, amount_cents, state) VALUES (3, 999, 'new')",
    )
    .await
    .expect("writes while the runner is down");
    let _run = db.spawn_run(&db.dir.join("orders.yaml"), "2");
    wait_applied(&c, &name).await;
    let new_live = "SELECT id, customer_id, amount_cents, state, note FROM orders";
    let old_shadow =
        "(SELECT id, customer_id, round(amount * 100)::bigint, status, note FROM orders_old) o";
    if let Some(d) = diff(&c, new_live, old_shadow).await {
        panic!("the resumed reverse stream missed writes:\n{d}");
    }
    ok(&db.rowshift(&["rollback", &name]), "rollback");
    assert_eq!(live_shape(&c).await, "old");
    let down: i64 = c
        .query_one("SELECT count(*) FROM orders WHERE note = 'while down'", &[])
        .await
        .expect("q")
        .get(0);
    assert!(
        down > 100,
        "the writes made while the runner was down must be in the old table"
    );
    finish(&db, &c, &name).await;
}
