//! The PostgreSQL sink against a target that does not hold what a batch
//! expects: a batch of mostly inserts whose keys are partly there already (a
//! chunk copy got there first), and a batch of mostly updates whose keys are
//! partly missing (rows not copied yet). The sink writes whole rows with the
//! statement the batch most likely needs and the other only when rows are
//! left over; either way every key must end up holding its row.

use crate::support::*;
use rowshift::model::{Cell, Change, ChangeEvent, Checkpoint, Lsn, Row};
use rowshift::sink::postgres::{PgSink, Role};
use rowshift::spec::{ColumnMapping, Source, TableName};
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
        xid: 0,
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
    let columns = vec![col("id", "bigint"), col("v", "text")];
    let spec: Vec<ColumnMapping> = ["id", "v"]
        .iter()
        .map(|n| ColumnMapping {
            target: n.to_string(),
            source: Source::Column(n.to_string()),
        })
        .collect();
    let mapping =
        Mapping::new(columns.clone(), vec![0], &columns, &["id".into()], &spec).expect("mapping");
    let table = |n: &str| TableName::parse(n).expect("name");
    let mut sink = PgSink::connect(
        &db.dsn,
        Arc::new(mapping),
        table("sink_s"),
        table("sink_t"),
        Role::Stream,
    )
    .await
    .expect("sink");
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
