//! The consistency torture test and the crash test: concurrent writes of
//! every kind during and after the backfill; the target must equal the
//! mapped source, compared row by row.

use crate::support::*;
use crate::workload::*;
use std::time::Duration;

const MAIN: &str = "ROWSHIFT_TEST_PG_PORT";
const ITEMS: i64 = 50_000;

async fn phase(c: &tokio_postgres::Client, name: &str) -> (String, i64, bool) {
    let r = c
        .query_one(
            "SELECT p.phase, coalesce(sum(r.chunks_done), 0)::int8, coalesce(bool_and(r.done), false) \
             FROM rowshift.pipelines p LEFT JOIN rowshift.backfill_ranges r ON r.pipeline = p.name WHERE p.name = $1 GROUP BY p.phase",
            &[&name],
        )
        .await
        .expect("phase");
    (r.get(0), r.get(1), r.get(2))
}

async fn exists(c: &tokio_postgres::Client) -> bool {
    c.query_opt("SELECT 1 FROM pg_namespace WHERE nspname = 'rowshift'", &[])
        .await
        .map(|r| r.is_some())
        .unwrap_or(false)
}

/// How the items target's indexes are expected to be built.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Indexes {
    /// Deferred, built when the copy ends (the default).
    AfterCopy,
    /// Deferred, built early because changes waited (`hold_changes`).
    WhileCopying,
    /// Kept during the copy (`defer_indexes: false`).
    Kept,
}

async fn torture(seed: u64, indexes: Indexes) {
    let db = TestDb::new(MAIN).await;
    let c = db.client().await;
    create_tables(&c, ITEMS, 2_000).await;
    let (iname, pname) = (format!("items_{}", db.tag), format!("pairs_{}", db.tag));
    let extra = match indexes {
        Indexes::AfterCopy => ", hold_changes: 5000000",
        Indexes::WhileCopying => ", hold_changes: 200",
        Indexes::Kept => ", defer_indexes: false",
    };
    let items = db.pipeline(
        "items.yaml",
        &items_pipeline_with(&iname, 700, 25_000, 2, extra),
    );
    let pairs = db.pipeline("pairs.yaml", &pairs_pipeline(&pname));
    let writers = start_writers(&db, seed, 3, ITEMS).await;
    let mut run_items = db.spawn_run(&items, "items");
    let mut run_pairs = db.spawn_run(&pairs, "pairs");
    // Writes run during the whole backfill and for a while after it.
    wait_for(
        "items backfill to finish",
        Duration::from_secs(120),
        || async { exists(&c).await && backfill_finished(&c, &iname).await },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let statements = writers.stop().await;
    assert!(
        statements > 500,
        "the writers ran only {statements} statements"
    );
    wait_caught_up(&c, &iname, Duration::from_secs(60)).await;
    wait_caught_up(&c, &pname, Duration::from_secs(60)).await;
    assert_equal(&c, ITEMS_MAPPED, &iname).await;
    assert_equal(&c, PAIRS_MAPPED, &pname).await;
    let built = assert_items_indexes(&c, &iname).await;
    match indexes {
        Indexes::AfterCopy => assert!(
            built
                .as_deref()
                .is_some_and(|d| d.starts_with("3 after the copy")),
            "{built:?}"
        ),
        Indexes::WhileCopying => assert!(
            built
                .as_deref()
                .is_some_and(|d| d.starts_with("3 while copying")),
            "{built:?}"
        ),
        Indexes::Kept => assert_eq!(built, None),
    }
    // Partial (TOAST-unchanged) updates kept the big values.
    let toasted: i64 = c
        .query_one(
            &format!("SELECT count(*) FROM {iname} WHERE length(body) > 4000"),
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert!(
        toasted > 1000,
        "expected TOASTed rows in the target, found {toasted}"
    );
    kill(&mut run_items);
    kill(&mut run_pairs);
    for name in [&iname, &pname] {
        let out = db.rowshift(&["abort", name]);
        assert!(out.status.success(), "abort {name}: {}", stderr(&out));
    }
    assert_no_leftovers(&c, &iname).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torture_seed_1() {
    torture(1, Indexes::AfterCopy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torture_seed_2_indexes_built_while_copying() {
    torture(2, Indexes::WhileCopying).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torture_seed_3_indexes_kept() {
    torture(3, Indexes::Kept).await;
}

/// kill -9 during the backfill and again while streaming; every restart
/// resumes from stored state and the result equals the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_backfill_and_streaming() {
    let db = TestDb::new(MAIN).await;
    let c = db.client().await;
    create_tables(&c, ITEMS, 500).await;
    let name = format!("crash_{}", db.tag);
    // Changes wait for the deferred indexes through the whole backfill.
    let items = db.pipeline(
        "items.yaml",
        &items_pipeline_with(&name, 500, 8_000, 2, ", hold_changes: 5000000"),
    );
    let writers = start_writers(&db, 7, 2, ITEMS).await;

    let mut run = db.spawn_run(&items, "1");
    wait_for("some chunks copied", Duration::from_secs(60), || async {
        exists(&c).await && c.query_opt("SELECT 1 FROM rowshift.backfill_ranges WHERE pipeline = $1 AND chunks_done >= 3 LIMIT 1", &[&name]).await.ok().flatten().is_some()
    })
    .await;
    kill(&mut run);
    let (phase1, chunks1, done1) = phase(&c, &name).await;
    assert_eq!(phase1, "backfilling");
    assert!(!done1, "the kill was meant to land during the backfill");
    assert_eq!(
        index_state(&c, &name).await,
        (0, 3),
        "the target copies without its indexes, which are recorded"
    );

    // A second process cannot run the same pipeline while one holds it.
    let mut run = db.spawn_run(&items, "2");
    wait_for(
        "the restarted run to take over",
        Duration::from_secs(30),
        || async {
            let (_, chunks, _) = phase(&c, &name).await;
            chunks > chunks1
        },
    )
    .await;
    let second = db.rowshift(&[
        "run",
        items.to_str().expect("path"),
        "--exit-when-caught-up",
    ]);
    assert!(!second.status.success());
    assert!(
        stderr(&second).contains("already being run"),
        "{}",
        stderr(&second)
    );

    wait_for(
        "caught up after the first crash",
        Duration::from_secs(120),
        || async { phase(&c, &name).await.0 == "caught_up" },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await; // writers keep streaming changes
    kill(&mut run);

    let mut run = db.spawn_run(&items, "3");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    writers.stop().await;
    wait_caught_up(&c, &name, Duration::from_secs(60)).await;
    assert_equal(&c, ITEMS_MAPPED, &name).await;
    assert!(assert_items_indexes(&c, &name).await.is_some());
    let (_, chunks_end, _) = phase(&c, &name).await;
    assert!(chunks_end >= chunks1, "the chunk cursor went backwards");
    kill(&mut run);
    assert!(db.rowshift(&["abort", &name]).status.success());
}

/// kill -9 between two index builds after the copy: the next run builds
/// the rest before it applies the changes that waited, and the target
/// equals the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_index_builds_resumes() {
    let db = TestDb::new(MAIN).await;
    let c = db.client().await;
    create_tables(&c, 20_000, 100).await;
    let name = format!("ib_{}", db.tag);
    let items = db.pipeline(
        "items.yaml",
        &items_pipeline_with(&name, 2_000, 1_000_000, 2, ", hold_changes: 5000000"),
    );
    let writers = start_writers(&db, 11, 2, 20_000).await;
    let path = items.to_str().expect("path");
    let mut run = db.spawn_with(
        &["run", path],
        "1",
        &[("ROWSHIFT_FAILPOINT", "indexes:one-built")],
    );
    let log = db.dir.join("run-1.log");
    wait_for(
        "the first index built",
        Duration::from_secs(120),
        || async {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("failpoint indexes:one-built reached")
        },
    )
    .await;
    kill(&mut run);
    assert_eq!(
        index_state(&c, &name).await,
        (1, 2),
        "one index built, two left"
    );
    assert!(
        !backfill_finished(&c, &name).await,
        "the copy ends with its indexes"
    );
    let mut run = db.spawn_run(&items, "2");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    writers.stop().await;
    wait_caught_up(&c, &name, Duration::from_secs(60)).await;
    assert_equal(&c, ITEMS_MAPPED, &name).await;
    assert!(assert_items_indexes(&c, &name).await.is_some());
    kill(&mut run);
    assert!(db.rowshift(&["abort", &name]).status.success());
}

/// The server drops every rowshift connection (walsender included) while
/// changes stream: the same process resumes on its own (transient error →
/// retry from stored state) and the target still equals the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_terminated_mid_stream_are_resumed() {
    let db = TestDb::new(MAIN).await;
    let c = db.client().await;
    create_tables(&c, 5_000, 100).await;
    let name = format!("term_{}", db.tag);
    let items = db.pipeline("items.yaml", &items_pipeline(&name, 1_000, 50_000, 1));
    let writers = start_writers(&db, 11, 2, ITEMS).await;
    let mut run = db.spawn_run(&items, "1");
    wait_for("caught up", Duration::from_secs(60), || async {
        // The schema exists a moment before the pipeline's row does.
        exists(&c).await
            && c.query_opt(
                "SELECT 1 FROM rowshift.pipelines WHERE name = $1 AND phase = 'caught_up'",
                &[&name],
            )
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await;
    let before: i64 = pipeline_number(&c, &name, "events_applied").await;
    let killed: i64 = c
        .query_one(
            "SELECT count(pg_terminate_backend(pid))::int8 FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name LIKE 'rowshift:%'",
            &[],
        )
        .await
        .expect("terminate")
        .get(0);
    assert!(killed > 0, "no rowshift connection was terminated");
    // The process keeps running and applies new changes after reconnecting.
    wait_for(
        "events applied after the reconnect",
        Duration::from_secs(60),
        || async {
            let now: i64 = pipeline_number(&c, &name, "events_applied").await;
            now > before + 50
        },
    )
    .await;
    assert!(
        run.0.try_wait().expect("status").is_none(),
        "rowshift exited instead of resuming"
    );
    writers.stop().await;
    wait_caught_up(&c, &name, Duration::from_secs(60)).await;
    assert_equal(&c, ITEMS_MAPPED, &name).await;
    kill(&mut run);
    assert!(db.rowshift(&["abort", &name]).status.success());
}

/// Fencing: a transaction of an earlier process that still holds the
/// pipeline row (a COMMIT in flight when its process was killed) delays the
/// next process until it ends; afterwards, writes under the old epoch match
/// nothing, so a sink rolls them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_fences_out_writes_of_the_old_one() {
    use rowshift::state::{apply_checkpoint, chunk_checkpoint};
    let db = TestDb::new(MAIN).await;
    let c = db.client().await;
    create_tables(&c, 2_000, 10).await;
    let name = format!("fence_{}", db.tag);
    let items = db.pipeline("items.yaml", &items_pipeline(&name, 1_000, 100_000, 1));
    let out = db.rowshift(&[
        "run",
        items.to_str().expect("path"),
        "--exit-when-caught-up",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let old: i64 = pipeline_number(&c, &name, "epoch").await;

    // The "zombie": a write transaction of the old epoch, holding the row.
    let mut zombie = db.client().await;
    let tx = zombie.transaction().await.expect("begin");
    let ck = apply_checkpoint(&name, old, false, None, 0, None);
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        ck.params.iter().map(|p| p as _).collect();
    assert_eq!(
        tx.execute(ck.sql.as_str(), &params)
            .await
            .expect("checkpoint"),
        1
    );

    let mut run = db.spawn_run(&items, "2");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let now: i64 = pipeline_number(&c, &name, "epoch").await;
    assert_eq!(
        now, old,
        "the new process must wait for the old transaction"
    );
    tx.commit().await.expect("zombie commit");
    wait_for(
        "the new process to fence the old one",
        Duration::from_secs(30),
        || async {
            let e: i64 = pipeline_number(&c, &name, "epoch").await;
            e > old
        },
    )
    .await;

    // Writes under the old epoch now change nothing: a sink rolls them back.
    for ck in [
        apply_checkpoint(&name, old, false, None, 0, None),
        chunk_checkpoint(&name, old, 0, &None, true),
    ] {
        let mut params = ck.params.clone();
        params.push(Some("0".into())); // a chunk's row count is bound last
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            [..highest_param(&ck.sql)]
            .iter()
            .map(|p| p as _)
            .collect();
        assert_eq!(
            c.execute(ck.sql.as_str(), &refs)
                .await
                .expect("old-epoch write"),
            0
        );
    }
    kill(&mut run);
    assert!(db.rowshift(&["abort", &name]).status.success());
}

/// One number from the pipeline's state row.
async fn pipeline_number(c: &tokio_postgres::Client, name: &str, column: &str) -> i64 {
    c.query_one(
        &format!("SELECT {column} FROM rowshift.pipelines WHERE name = $1"),
        &[&name],
    )
    .await
    .expect("pipeline state row")
    .get(0)
}

/// The highest `$n` placeholder in an SQL text.
fn highest_param(sql: &str) -> usize {
    sql.split('$')
        .skip(1)
        .filter_map(|s| {
            s.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}
