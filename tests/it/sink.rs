//! The PostgreSQL sink against a target that does not hold what a batch
//! expects: a batch of mostly inserts whose keys are partly there already (a
//! chunk copy got there first), and a batch of mostly updates whose keys are
//! partly missing (rows not copied yet). The sink writes whole rows with the
//! statement the batch most likely needs and the other only when rows are
//! left over; either way every key must end up holding its row.

use crate::support::*;
use rowshift::model::{Cell, Change, ChangeEvent, Checkpoint, Lsn, Row};
use rowshift::sink::postgres::parallel::ParallelSink;
use rowshift::sink::postgres::{PgSink, Role};
use rowshift::spec::{ColumnMapping, Source, TableName};
use rowshift::state::{self, kafka::PartBatch};
use rowshift::transform::{Column, Mapping};
use std::sync::Arc;

const MAIN: &str = "ROWSHIFT_TEST_PG_PORT";

fn col(name: &str, ty: &str) -> Column {
    Column {
        name: name.into(),
        sql_type: ty.into(),
        not_null: false,
        has_default: false,
    }
}

fn row(id: i64, v: &str) -> Row {
    Row {
        cells: vec![
            Cell::Present(Some(id.to_string())),
            Cell::Present(Some(v.to_string())),
        ],
    }
}

fn event(change: Change) -> ChangeEvent {
    ChangeEvent {
        change,
        commit_lsn: Lsn(1),
        commit_ts_us: 0,
    }
}

async fn contents(c: &tokio_postgres::Client) -> Vec<(i64, String)> {
    c.query("SELECT id, v FROM sink_t ORDER BY id", &[])
        .await
        .expect("read target")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// `sink_s` → `sink_t` (id, v), both plain.
fn identity_mapping() -> Mapping {
    let columns = vec![col("id", "bigint"), col("v", "text")];
    let spec: Vec<ColumnMapping> = ["id", "v"]
        .iter()
        .map(|n| ColumnMapping {
            target: n.to_string(),
            source: Source::Column(n.to_string()),
        })
        .collect();
    Mapping::new(columns.clone(), vec![0], &columns, &["id".into()], &spec).expect("mapping")
}

async fn sink_on(db: &TestDb, mapping: Arc<Mapping>) -> PgSink {
    let table = |n: &str| TableName::parse(n).expect("name");
    PgSink::connect(
        &db.dsn,
        mapping,
        table("sink_s"),
        table("sink_t"),
        Role::Stream,
    )
    .await
    .expect("sink")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_rows_land_whatever_the_target_already_holds() {
    let db = TestDb::new(MAIN).await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE sink_s (id bigint PRIMARY KEY, v text);
         CREATE TABLE sink_t (id bigint PRIMARY KEY, v text NOT NULL);
         INSERT INTO sink_t SELECT g, 'seed' FROM generate_series(1, 10) g;",
    )
    .await
    .expect("tables");
    let mut sink = sink_on(&db, Arc::new(identity_mapping())).await;
    let mut expected: std::collections::BTreeMap<i64, String> =
        (1..=10).map(|i| (i, "seed".to_string())).collect();

    // Mostly inserts, keys 5..=20: 5..=10 are there already.
    let inserts: Vec<ChangeEvent> = (5..=20)
        .map(|i| {
            event(Change::Insert {
                new: row(i, "inserted"),
            })
        })
        .collect();
    sink.apply(inserts, &Checkpoint::default())
        .await
        .expect("apply inserts");
    expected.extend((5..=20).map(|i| (i, "inserted".to_string())));
    assert_eq!(
        contents(&c).await,
        expected.clone().into_iter().collect::<Vec<_>>()
    );

    // Mostly updates, keys 15..=30: 21..=30 are missing.
    let updates: Vec<ChangeEvent> = (15..=30)
        .map(|i| {
            event(Change::Update {
                old_key: None,
                new: row(i, "updated"),
            })
        })
        .collect();
    sink.apply(updates, &Checkpoint::default())
        .await
        .expect("apply updates");
    expected.extend((15..=30).map(|i| (i, "updated".to_string())));
    assert_eq!(
        contents(&c).await,
        expected.clone().into_iter().collect::<Vec<_>>()
    );

    // The plain cases: all new rows, then all present.
    for (range, v) in [(31..=40, "fresh"), (1..=40, "again")] {
        let events: Vec<ChangeEvent> = range
            .clone()
            .map(|i| {
                let new = row(i, v);
                event(if v == "fresh" {
                    Change::Insert { new }
                } else {
                    Change::Update { old_key: None, new }
                })
            })
            .collect();
        sink.apply(events, &Checkpoint::default())
            .await
            .expect("apply");
        expected.extend(range.map(|i| (i, v.to_string())));
        assert_eq!(
            contents(&c).await,
            expected.clone().into_iter().collect::<Vec<_>>()
        );
    }
}

async fn positions(c: &tokio_postgres::Client) -> Vec<i64> {
    c.query(
        "SELECT next_offset FROM rowshift.kafka_applied WHERE pipeline = 'kp' ORDER BY part",
        &[],
    )
    .await
    .expect("positions")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// A kafka applier's poll split over two connections: each part ends with
/// the guard on the partitions' stored positions, the claim follows. When
/// another applier moved a partition meanwhile, or the stream was switched
/// off, no part of the poll may land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_poll_lands_only_while_its_positions_are_its_own() {
    let db = TestDb::new(MAIN).await;
    let mut c = db.client().await;
    c.batch_execute(
        "CREATE TABLE sink_s (id bigint PRIMARY KEY, v text);
         CREATE TABLE sink_t (id bigint PRIMARY KEY, v text NOT NULL);",
    )
    .await
    .expect("tables");
    state::ensure_schema(&mut c).await.expect("state schema");
    state::register(&c, "kp", "h", "sink_s", "sink_t", "kp.yaml")
        .await
        .expect("register");
    state::kafka::init(&c, "kp", 2).await.expect("positions");
    let mapping = Arc::new(identity_mapping());
    let sinks = vec![
        sink_on(&db, mapping.clone()).await,
        sink_on(&db, mapping.clone()).await,
    ];
    let mut sink = ParallelSink::new(sinks, vec![0]);
    let poll = |v: &str| -> Vec<ChangeEvent> {
        (1..=40)
            .map(|i| {
                event(Change::Update {
                    old_key: None,
                    new: row(i, v),
                })
            })
            .collect()
    };
    let parts = |expected: i64| -> Vec<PartBatch> {
        (0..2)
            .map(|part| PartBatch {
                part,
                expected,
                next: expected + 20,
                events: 20,
            })
            .collect()
    };
    let everything = |v: &str| (1..=40).map(|i| (i, v.to_string())).collect::<Vec<_>>();

    // Positions as read: the poll lands, the claim moves them.
    let (guard, claim) = (
        state::kafka::guard("kp", &parts(0)),
        state::kafka::claim("kp", "me", &parts(0), None),
    );
    sink.apply_claimed(poll("a"), &guard, &claim)
        .await
        .expect("a poll at its positions");
    assert_eq!(contents(&c).await, everything("a"));
    assert_eq!(positions(&c).await, vec![20, 20]);

    // Another applier took partition 1 further: a poll from the old
    // positions writes nothing.
    state::kafka::execute(
        &c,
        &state::kafka::claim("kp", "other", &parts(20)[1..], None),
    )
    .await
    .expect("the other applier's claim");
    let (guard, claim) = (
        state::kafka::guard("kp", &parts(20)[..1]),
        state::kafka::claim("kp", "me", &parts(20)[..1], None),
    );
    // (Partition 0 alone is still ours.)
    sink.apply_claimed(poll("b"), &guard, &claim)
        .await
        .expect("a poll of the partition still at its position");
    assert_eq!(contents(&c).await, everything("b"));
    let (guard, claim) = (
        state::kafka::guard("kp", &parts(20)),
        state::kafka::claim("kp", "me", &parts(20), None),
    );
    let moved = sink.apply_claimed(poll("c"), &guard, &claim).await;
    assert!(moved.is_err(), "a poll from moved positions must fail");
    assert_eq!(contents(&c).await, everything("b"), "no part of it landed");
    assert_eq!(positions(&c).await, vec![40, 40]);

    // The stream switched off (a cut-over): nothing lands either.
    c.execute(
        "UPDATE rowshift.pipelines SET direction = 'reverse' WHERE name = 'kp'",
        &[],
    )
    .await
    .expect("switch");
    let (guard, claim) = (
        state::kafka::guard("kp", &parts(40)),
        state::kafka::claim("kp", "me", &parts(40), None),
    );
    let switched = sink.apply_claimed(poll("d"), &guard, &claim).await;
    assert!(switched.is_err(), "a poll after the switch must fail");
    assert_eq!(contents(&c).await, everything("b"));
    assert_eq!(positions(&c).await, vec![40, 40]);
}
