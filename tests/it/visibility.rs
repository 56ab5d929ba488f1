//! Reads of the source that stand for "the row after every change received"
//! (a refetch, a chunk copy) wait until the transactions received are
//! visible. PostgreSQL can stream a commit a moment before other sessions
//! see it; here the moment is held open for real by a transaction that is
//! not committed yet, whose id the test hands to the sink as if its commit
//! had been received. That id, and the change event built for it, are the
//! only stand-ins: the snapshots, the reads and the writes are the server's.

use crate::support::*;
use rowshift::model::{Cell, Change, ChangeEvent, Checkpoint, Lsn, Row};
use rowshift::sink::postgres::{PgSink, Role};
use rowshift::source::postgres::visibility::Commits;
use rowshift::spec::{ColumnMapping, Source, TableName};
use rowshift::transform::{Column, Mapping};
use std::sync::Arc;
use std::time::Duration;

const MAIN: &str = "ROWSHIFT_TEST_PG_PORT";

fn mapping() -> Arc<Mapping> {
    let col = |name: &str, ty: &str| Column {
        name: name.into(),
        sql_type: ty.into(),
        not_null: false,
        has_default: false,
    };
    let columns = vec![
        col("id", "bigint"),
        col("small", "int"),
        col("body", "text"),
    ];
    let spec: Vec<ColumnMapping> = ["id", "small", "body"]
        .iter()
        .map(|n| ColumnMapping {
            target: n.to_string(),
            source: Source::Column(n.to_string()),
        })
        .collect();
    Arc::new(
        Mapping::new(columns.clone(), vec![0], &columns, &["id".into()], &spec).expect("mapping"),
    )
}

async fn sink(db: &TestDb, role: Role, commits: Option<&Commits>) -> PgSink {
    let table = |n: &str| TableName::parse(n).expect("name");
    let mut s = PgSink::connect(&db.dsn, mapping(), table("vis_s"), table("vis_t"), role)
        .await
        .expect("sink");
    if let Some(c) = commits {
        s.watch_commits(c.clone());
    }
    s
}

async fn target(c: &tokio_postgres::Client) -> Vec<(i64, i32, String)> {
    c.query("SELECT id, small, body FROM vis_t ORDER BY id", &[])
        .await
        .expect("read target")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Opens a transaction on `w` that runs `sql` and stays open; returns its
/// id as pgoutput would name it (32 bits).
async fn open_writer(w: &tokio_postgres::Client, sql: &str) -> u32 {
    w.batch_execute(&format!("BEGIN; {sql}"))
        .await
        .expect("writer");
    let xid: String = w
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .expect("xid")
        .get(0);
    (xid.parse::<u64>().expect("xid8") & 0xffff_ffff) as u32
}

/// Checks that `task` (a read of the source) is still waiting while the
/// writer on `w` is open, commits the writer, and returns the task's result.
async fn waits_for_writer<T>(
    task: tokio::task::JoinHandle<T>,
    w: &tokio_postgres::Client,
    what: &str,
) -> T {
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!task.is_finished(), "the {what} did not wait");
    w.batch_execute("COMMIT").await.expect("commit");
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap_or_else(|_| panic!("the {what} still waits after the commit"))
        .expect("task")
}

/// A partial update (the TOASTed `body` left out) of row 1.
fn partial_update() -> Vec<ChangeEvent> {
    vec![ChangeEvent {
        change: Change::Update {
            old_key: None,
            new: Row {
                cells: vec![
                    Cell::Present(Some("1".into())),
                    Cell::Present(Some("801".into())),
                    Cell::Absent,
                ],
            },
        },
        commit_lsn: Lsn(1),
        commit_ts_us: 0,
        xid: 0,
    }]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_the_source_wait_until_received_commits_are_visible() {
    let db = TestDb::new(MAIN).await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE vis_s (id bigint PRIMARY KEY, small int, body text);
         CREATE TABLE vis_t (id bigint PRIMARY KEY, small int, body text);
         INSERT INTO vis_s SELECT g, 800, 'body ' || g FROM generate_series(1, 3) g;",
    )
    .await
    .expect("tables");
    let w = db.client().await;
    let row = |id: i64, small: i32| (id, small, format!("body {id}"));

    // Without the wait, the refetch of a row the target lacks reads it
    // from before the change that asked for it: the update is lost.
    let xid = open_writer(&w, "UPDATE vis_s SET small = 801 WHERE id = 1").await;
    let mut blind = sink(&db, Role::Stream, None).await;
    blind
        .apply(partial_update(), &Checkpoint::default())
        .await
        .expect("apply");
    assert_eq!(
        target(&c).await,
        vec![row(1, 800)],
        "the hazard the wait prevents"
    );
    c.batch_execute("TRUNCATE vis_t").await.expect("truncate");

    // Watching the commits received, the refetch waits for the writer.
    let commits = Commits::default();
    commits.push(&[xid]);
    let mut watching = sink(&db, Role::Stream, Some(&commits)).await;
    let apply = tokio::spawn(async move {
        watching
            .apply(partial_update(), &Checkpoint::default())
            .await
            .map(|_| watching)
    });
    let watching = waits_for_writer(apply, &w, "refetch").await.expect("apply");
    assert_eq!(target(&c).await, vec![row(1, 801)]);
    drop(watching);

    // A chunk copy waits too: a row deleted by a transaction already
    // received is not brought back.
    c.batch_execute("TRUNCATE vis_t").await.expect("truncate");
    let xid = open_writer(&w, "DELETE FROM vis_s WHERE id = 2").await;
    commits.push(&[xid]);
    let mut copy = sink(&db, Role::Copy, Some(&commits)).await;
    let copied = tokio::spawn(async move {
        copy.copy_range(None, None, &Checkpoint::default(), true)
            .await
    });
    let n = waits_for_writer(copied, &w, "copy").await.expect("copy");
    assert_eq!(n, 2);
    assert_eq!(target(&c).await, vec![row(1, 801), row(3, 800)]);
}
