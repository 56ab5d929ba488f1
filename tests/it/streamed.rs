//! Large transactions that the walsender streams while they are still in
//! progress (`logical_decoding_work_mem` is set to its minimum, 64 kB, for
//! the test database, so that ordinary transactions here are streamed).
//! Only committed work may land, whole; a rollback to a savepoint inside a
//! streamed transaction makes the reader reconnect without streaming, and
//! nothing is lost or applied twice across that switch.
//!
//! Once the backfill is done, one streamed transaction at a time is applied
//! while in progress, into target transactions held open until its commit
//! (`runtime::early`): the test checks that both that path and its fallback
//! (applying at the commit) ran, and kills rowshift while such a
//! transaction is open.

use crate::support::*;
use crate::workload::*;
use std::time::Duration;

const MAIN: &str = "ROWSHIFT_TEST_PG_PORT";

async fn streamed_txns(c: &tokio_postgres::Client, slot: &str) -> i64 {
    c.query_opt(
        "SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .expect("slot stats")
    .map(|r| r.get(0))
    .unwrap_or(0)
}

/// The items table (3,000 rows) in a fresh database whose transactions the
/// walsender streams once past 64 kB, and a pipeline `<prefix>_<tag>` run
/// until its backfill is done. Returns the database, a client, the
/// pipeline's name and file, and the run.
async fn streaming_items(
    prefix: &str,
) -> (
    TestDb,
    tokio_postgres::Client,
    String,
    std::path::PathBuf,
    Proc,
) {
    let db = TestDb::new(MAIN).await;
    let c = db.client().await;
    create_tables(&c, 3_000, 10).await;
    c.batch_execute(&format!(
        "ALTER DATABASE t_{} SET logical_decoding_work_mem = '64kB'",
        db.tag
    ))
    .await
    .expect("work mem");
    let name = format!("{prefix}_{}", db.tag);
    let items = db.pipeline("items.yaml", &items_pipeline(&name, 1_000, 50_000, 1));
    let run = db.spawn_run(&items, "1");
    wait_for("the backfill", Duration::from_secs(60), || async {
        backfill_finished(&c, &name).await
    })
    .await;
    (db, c, name, items, run)
}

/// Waits until one of rowshift's sink sessions holds a transaction open
/// between writes: a transaction applied early.
async fn wait_early_open(c: &tokio_postgres::Client, db: &TestDb) {
    let holding = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = 't_{}' \
         AND application_name = 'rowshift:sink' AND state = 'idle in transaction'",
        db.tag
    );
    wait_for(
        "an early apply transaction",
        Duration::from_secs(30),
        || async { count(c, &holding).await > 0 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_streamed_in_progress_land_whole_and_only_when_committed() {
    let (db, c, name, items, mut run) = streaming_items("stream").await;
    let slot = format!("rowshift_{name}");

    // One large transaction of every kind of change.
    c.batch_execute(
        "BEGIN;
         UPDATE items SET small = small + 1, legacy = 'x';
         INSERT INTO items (id, small, body, price) SELECT g, 1, repeat('n', 300), g / 7.0
           FROM generate_series(10001, 14000) g;
         DELETE FROM items WHERE id % 10 = 3;
         UPDATE items SET id = id + 100000 WHERE id BETWEEN 2001 AND 2100;
         COMMIT",
    )
    .await
    .expect("large transaction");
    // One rolled back: none of it may land.
    c.batch_execute(
        "BEGIN;
         UPDATE items SET small = -1;
         INSERT INTO items (id) SELECT g FROM generate_series(20001, 24000) g;
         ROLLBACK",
    )
    .await
    .expect("rolled back transaction");
    // Two at once, committed in the other order than they began, with small
    // transactions committing in between.
    let c2 = db.client().await;
    c.batch_execute("BEGIN; UPDATE items SET body = 'first ' || id WHERE id <= 1500")
        .await
        .expect("first");
    c2.batch_execute(
        "BEGIN; UPDATE items SET body = 'second ' || id WHERE id BETWEEN 1501 AND 3000",
    )
    .await
    .expect("second");
    c.batch_execute(
        "INSERT INTO items (id, small, body) SELECT g, 2, repeat('m', 200) FROM generate_series(30001, 33000) g",
    )
    .await
    .expect("first, more");
    let small = db.client().await;
    for i in 0..20 {
        small
            .execute("UPDATE items SET small = $1 WHERE id = 10001", &[&i])
            .await
            .expect("small transaction");
    }
    c2.batch_execute("COMMIT").await.expect("commit second");
    c.batch_execute("COMMIT").await.expect("commit first");
    wait_caught_up(&c, &name, Duration::from_secs(60)).await;
    assert_equal(&c, ITEMS_MAPPED, &name).await;
    assert!(
        streamed_txns(&c, &slot).await >= 3,
        "the walsender streamed none of the large transactions"
    );

    // A rollback to a savepoint inside a streamed transaction.
    c.batch_execute(
        "BEGIN;
         UPDATE items SET small = 7 WHERE id <= 2000;
         SAVEPOINT s;
         UPDATE items SET small = -7;
         INSERT INTO items (id, small) SELECT g, -7 FROM generate_series(40001, 44000) g;
         ROLLBACK TO SAVEPOINT s;
         UPDATE items SET legacy = 'after' WHERE id > 2000;
         COMMIT",
    )
    .await
    .expect("savepoint transaction");
    wait_caught_up(&c, &name, Duration::from_secs(60)).await;
    assert_equal(&c, ITEMS_MAPPED, &name).await;
    // And after the switch, one more large transaction.
    c.batch_execute("UPDATE items SET small = small + 100")
        .await
        .expect("one more large transaction");
    wait_caught_up(&c, &name, Duration::from_secs(60)).await;
    assert_equal(&c, ITEMS_MAPPED, &name).await;
    let rolled_back = count(
        &c,
        &format!(
            "SELECT count(*) FROM {name} WHERE small IN (-7, 93) OR id BETWEEN 40001 AND 44000"
        ),
    )
    .await;
    assert_eq!(rolled_back, 0, "rows of the rolled back savepoint landed");

    // Once those transactions are over and the slot's restart position has
    // passed them, the reader streams again (a CHECKPOINT logs the running
    // transactions the restart position moves to).
    let streaming_walsender = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender' \
         AND query LIKE '%{slot}%' AND query LIKE '%streaming%'"
    );
    wait_for("streaming again", Duration::from_secs(90), || async {
        c.batch_execute("CHECKPOINT").await.expect("checkpoint");
        count(&c, &streaming_walsender).await > 0
    })
    .await;
    let streamed_before = streamed_txns(&c, &slot).await;
    c.batch_execute("UPDATE items SET small = small + 1000")
        .await
        .expect("a large transaction after streaming came back");
    wait_caught_up(&c, &name, Duration::from_secs(60)).await;
    assert_equal(&c, ITEMS_MAPPED, &name).await;
    assert!(
        streamed_txns(&c, &slot).await > streamed_before,
        "the large transaction after streaming came back was not streamed"
    );
    let log = std::fs::read_to_string(db.dir.join("run-1.log")).unwrap_or_default();
    assert!(
        log.contains("no longer streamed"),
        "the savepoint rollback was not streamed, so this test did not cover it"
    );
    for (line, what) in [
        (
            "large transaction applied while in progress",
            "applied early",
        ),
        (
            "large transaction applied at its commit",
            "given up and applied at its commit",
        ),
    ] {
        assert!(log.contains(line), "no transaction was {what}: not covered");
    }
    assert!(
        run.0.try_wait().expect("status").is_none(),
        "rowshift exited instead of reconnecting"
    );
    kill(&mut run);

    // Killed while a transaction applied early is open on the target.
    let mut run = db.spawn_run(&items, "2");
    wait_caught_up(&c, &name, Duration::from_secs(60)).await;
    // Rows with short bodies: an update of a row whose body is stored out
    // of line would need the row read back (the mapping uses the body), and
    // that makes the transaction wait for its commit.
    c.batch_execute(
        "BEGIN; UPDATE items SET small = small + 1000 WHERE id BETWEEN 10001 AND 40000",
    )
    .await
    .expect("open transaction");
    let other = db.client().await;
    wait_early_open(&other, &db).await;
    assert_equal(&other, ITEMS_MAPPED, &name).await;
    kill(&mut run);
    c.batch_execute("UPDATE items SET legacy = 'late' WHERE id % 3 = 0; COMMIT")
        .await
        .expect("commit after the kill");
    let mut run = db.spawn_run(&items, "3");
    wait_caught_up(&c, &name, Duration::from_secs(60)).await;
    assert_equal(&c, ITEMS_MAPPED, &name).await;
    kill(&mut run);
    assert!(db.rowshift(&["abort", &name]).status.success());
}

/// An ordinary write that waits on a lock while a transaction is being
/// applied early (here a lock held on a target row by another session, the
/// stand-in for any wait the source's locks do not rule out): after the
/// lock timeout the early writes are given up, the ordinary write goes
/// through once the lock is released, and the large transaction is applied
/// whole at its commit. Nothing is lost or applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordinary_write_that_waits_makes_an_early_transaction_wait_for_its_commit() {
    let (db, c, name, _items, mut run) = streaming_items("wait").await;
    wait_caught_up(&c, &name, Duration::from_secs(60)).await;

    // Another session locks target row 3 (a short body: no read-back).
    let blocker = db.client().await;
    blocker
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM {name} WHERE id = 3 FOR UPDATE"
        ))
        .await
        .expect("lock a target row");
    // A large transaction, in progress: applied early (rows without long
    // bodies, so nothing needs reading back).
    let large = db.client().await;
    large
        .batch_execute("BEGIN; UPDATE items SET small = small + 1 WHERE id % 20 <> 0 AND id > 10")
        .await
        .expect("large transaction");
    wait_early_open(&c, &db).await;
    // An ordinary transaction on the locked row: its write waits.
    c.batch_execute("UPDATE items SET legacy = 'ordinary' WHERE id = 3")
        .await
        .expect("ordinary transaction");
    tokio::time::sleep(Duration::from_secs(4)).await;
    blocker.batch_execute("ROLLBACK").await.expect("release");
    large
        .batch_execute("UPDATE items SET legacy = 'large' WHERE id = 5; COMMIT")
        .await
        .expect("commit the large transaction");
    wait_caught_up(&c, &name, Duration::from_secs(60)).await;
    assert_equal(&c, ITEMS_MAPPED, &name).await;
    let log = std::fs::read_to_string(db.dir.join("run-1.log")).unwrap_or_default();
    assert!(
        log.contains("an ordinary write waited on it"),
        "the lock timeout did not give the early writes up: not covered"
    );
    assert!(
        run.0.try_wait().expect("status").is_none(),
        "rowshift exited"
    );
    kill(&mut run);
    assert!(db.rowshift(&["abort", &name]).status.success());
}
