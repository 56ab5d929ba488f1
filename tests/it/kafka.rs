//! The kafka transport's record format against real Kafka-protocol brokers
//! (tansu and noida-db, started by scripts/test.sh) and the fixture
//! registry: rowshift encodes and produces change events of every kind and
//! many types; a stock consumer (Python `confluent-kafka`) reads them and
//! `fastavro` decodes every key and value with the schemas fetched from the
//! registry. The decoded rows must be the source rows.

use crate::registry::Registry;
use rowshift::model::{Cell, Change, ChangeEvent, Key, Lsn, Row};
use rowshift::spec::TableName;
use rowshift::transport::kafka::codec::Encoder;
use rowshift::transport::kafka::envelope::{ColumnType, TableSchema};
use rowshift::transport::kafka::producer::Producer;
use serde_json::{json, Value};

const BROKERS: &[(&str, &str)] = &[
    ("tansu", "ROWSHIFT_TEST_KAFKA_TANSU"),
    ("noida", "ROWSHIFT_TEST_KAFKA_NOIDA"),
];

fn python() -> String {
    std::env::var("ROWSHIFT_TEST_PYTHON")
        .unwrap_or_else(|_| format!("{}/target/py/bin/python", env!("CARGO_MANIFEST_DIR")))
}

fn cell(v: &str) -> Cell {
    Cell::Present(Some(v.to_string()))
}

fn columns() -> Vec<ColumnType<'static>> {
    [
        ("id", "bigint"),
        ("body", "text"),
        ("price", "numeric(10,2)"),
        ("doc", "jsonb"),
        ("tags", "integer[]"),
        ("blob", "bytea"),
        ("seen", "timestamp with time zone"),
        ("day", "date"),
        ("ref", "uuid"),
        ("ok", "boolean"),
    ]
    .into_iter()
    .map(|(name, sql_type)| ColumnType {
        name,
        sql_type,
        is_enum: false,
    })
    .collect()
}

fn events() -> Vec<ChangeEvent> {
    let full = |id: &str, body: Cell| Row {
        cells: vec![
            cell(id),
            body,
            cell("12.50"),
            cell(r#"{"k": [1, "x"]}"#),
            cell("{1,NULL,3}"),
            cell("\\x00ff"),
            cell("2024-01-01 00:00:00.25+00"),
            cell("2024-02-29"),
            cell("0b8f6c7e-8f3a-4a7e-9a51-2c1a3e0d9f10"),
            cell("t"),
        ],
    };
    let at = |change| ChangeEvent {
        change,
        commit_lsn: Lsn(0x1000),
        commit_ts_us: 1_700_000_000_000_000,
        xid: 0,
    };
    vec![
        at(Change::Insert {
            new: full("1", cell("o'brien")),
        }),
        at(Change::Update {
            old_key: None,
            new: full("1", Cell::Absent),
        }),
        at(Change::Update {
            old_key: Some(Key(vec![Some("1".into())])),
            new: full("2", Cell::Present(None)),
        }),
        at(Change::Delete {
            key: Key(vec![Some("2".into())]),
        }),
    ]
}

/// A member of `group` with no pass-through settings and no idle pause.
fn plain_consumer(
    brokers: &str,
    group: &str,
    topic: &str,
    registry: &str,
) -> rowshift::transport::kafka::consumer::Consumer {
    use rowshift::transport::kafka::consumer::{Consumer, Fetching};
    Consumer::new(
        brokers,
        group,
        topic,
        registry,
        &Vec::new(),
        Fetching::default(),
    )
    .expect("consumer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_clients_decode_every_record() {
    let registry = Registry::start();
    let cols = columns();
    for (name, var) in BROKERS {
        let brokers = std::env::var(var).unwrap_or_else(|_| {
            panic!(
                "{var} is not set: run the tests through scripts/test.sh, which starts the brokers"
            )
        });
        let topic = format!("interop_{name}_{:08x}", rand::random::<u32>());
        let table = TableName::parse("public.items").expect("name");
        let schema =
            TableSchema::new(&topic, "interop", "shop", &table, &cols, vec![0]).expect("schema");
        let encoder = Encoder::new(&registry.url, &schema);
        let producer = Producer::new(&brokers, &Vec::new()).expect("producer");
        let mut sent = 0;
        for e in events() {
            for r in schema
                .records(&e, false, 1_700_000_000_123)
                .expect("records")
            {
                let (k, v) = encoder.encode(&r).await.expect("encode");
                producer
                    .send(&topic, &k, v.as_deref())
                    .await
                    .expect("produce");
                sent += 1;
            }
        }
        assert_eq!(
            sent, 7,
            "c, u, d+tombstone+c for the key change, d+tombstone"
        );
        let out = std::process::Command::new(python())
            .arg(format!(
                "{}/tests/python/decode_topic.py",
                env!("CARGO_MANIFEST_DIR")
            ))
            .args([
                brokers.as_str(),
                topic.as_str(),
                registry.url.as_str(),
                &sent.to_string(),
            ])
            .output()
            .expect("run the python consumer");
        assert!(
            out.status.success(),
            "{name}: python consumer failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let records: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        // Order holds per key (one partition per key), not across keys.
        let per_key = |id: i64| -> Vec<Value> {
            records
                .iter()
                .filter(|r| r["key"]["id"] == json!(id))
                .map(|r| r["value"].get("op").cloned().unwrap_or(Value::Null))
                .collect()
        };
        assert_eq!(
            per_key(1),
            [json!("c"), json!("u"), json!("d"), Value::Null],
            "{name}"
        );
        assert_eq!(per_key(2), [json!("c"), json!("d"), Value::Null], "{name}");
        let of = |id: i64, op: &str| -> &Value {
            records
                .iter()
                .find(|r| r["key"]["id"] == json!(id) && r["value"]["op"] == json!(op))
                .map(|r| &r["value"])
                .unwrap_or(&Value::Null)
        };
        let after = &of(1, "c")["after"];
        assert_eq!(
            after,
            &json!({
                "id": 1, "body": "o'brien", "price": "12.50", "doc": r#"{"k": [1, "x"]}"#,
                "tags": [1, null, 3], "blob": "00ff", "seen": "2024-01-01T00:00:00.250000+00:00",
                "day": "2024-02-29", "ref": "0b8f6c7e-8f3a-4a7e-9a51-2c1a3e0d9f10", "ok": true
            }),
            "{name}: the decoded row must be the source row"
        );
        // The partial update says which column it did not carry.
        assert_eq!(of(1, "u")["unavailable"], json!(["body"]));
        assert_eq!(of(1, "u")["after"]["body"], Value::Null);
        let source = &of(1, "c")["source"];
        assert_eq!(source["table"], json!("items"));
        assert_eq!(source["lsn"], json!(0x1000));
        assert_eq!(source["ts_ms"], json!(1_700_000_000_000i64));
        assert_eq!(of(2, "d")["before"]["id"], json!(2));
        assert_eq!(
            of(2, "c")["after"]["body"],
            Value::Null,
            "a NULL stays NULL"
        );
    }
}

/// A column added on the source registers a new, backward-compatible
/// version of `<topic>-value`; a change that old data cannot be read with is
/// refused by the registry's BACKWARD check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_column_is_a_backward_compatible_new_version() {
    let registry = Registry::start();
    let table = TableName::parse("public.items").expect("name");
    let topic = "evolve";
    let v1: Vec<ColumnType> = columns().into_iter().take(3).collect();
    let mut v2 = columns().into_iter().take(3).collect::<Vec<_>>();
    v2.push(ColumnType {
        name: "added",
        sql_type: "text",
        is_enum: false,
    });
    let insert = |n: usize| ChangeEvent {
        change: Change::Insert {
            new: Row {
                cells: (0..n)
                    .map(|i| {
                        if i == 0 {
                            cell("1")
                        } else if i == 2 {
                            cell("1.00")
                        } else {
                            cell("x")
                        }
                    })
                    .collect(),
            },
        },
        commit_lsn: Lsn(1),
        commit_ts_us: 0,
        xid: 0,
    };
    let mut ids = Vec::new();
    for (cols, n) in [(&v1, 3), (&v2, 4)] {
        let schema = TableSchema::new(topic, "p", "db", &table, cols, vec![0]).expect("schema");
        let records = schema.records(&insert(n), false, 0).expect("records");
        let (_, value) = Encoder::new(&registry.url, &schema)
            .encode(&records[0])
            .await
            .expect("encode");
        let value = value.expect("value");
        assert_eq!(value[0], 0, "magic byte");
        ids.push(u32::from_be_bytes([value[1], value[2], value[3], value[4]]));
    }
    assert_ne!(ids[0], ids[1], "a new schema version");
    // price as text cannot read the decimal data written before.
    let mut v3 = columns().into_iter().take(3).collect::<Vec<_>>();
    v3[2] = ColumnType {
        name: "price",
        sql_type: "bigint",
        is_enum: false,
    };
    let schema = TableSchema::new(topic, "p", "db", &table, &v3, vec![0]).expect("schema");
    let records = schema.records(&insert(3), false, 0);
    let refused = match records {
        Ok(r) => Encoder::new(&registry.url, &schema)
            .encode(&r[0])
            .await
            .is_err(),
        Err(_) => true,
    };
    assert!(refused, "an incompatible change must be refused");
}

/// rowshift's consumer turns the records back into the events they were
/// made from (per key, in order); committed offsets are not delivered to
/// the group again, and a new group starts from the beginning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_returns_the_events_and_resumes_after_its_commit() {
    use rowshift::transport::kafka::decode::Layout;
    use std::time::Duration;
    let registry = Registry::start();
    let cols = columns();
    for (name, var) in BROKERS {
        let brokers = std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set"));
        let topic = format!("consume_{name}_{:08x}", rand::random::<u32>());
        let table = TableName::parse("public.items").expect("name");
        let schema = TableSchema::new(&topic, "p", "shop", &table, &cols, vec![0]).expect("schema");
        let encoder = Encoder::new(&registry.url, &schema);
        let producer = Producer::new(&brokers, &Vec::new()).expect("producer");
        let sent = events();
        for e in &sent {
            for r in schema.records(e, false, 0).expect("records") {
                let (k, v) = encoder.encode(&r).await.expect("encode");
                producer
                    .send(&topic, &k, v.as_deref())
                    .await
                    .expect("produce");
            }
        }
        let layout = Layout {
            columns: &schema.columns,
            key: &schema.key,
        };
        let group = format!("g_{topic}");
        let consumer = plain_consumer(&brokers, &group, &topic, &registry.url);
        let mut got = Vec::new();
        let mut polls = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while got.len() < 5 && std::time::Instant::now() < deadline {
            let p = consumer
                .poll(&layout, 100, Duration::from_secs(1), None)
                .await
                .expect("poll");
            got.extend(p.events().cloned());
            polls.push(p);
        }
        // The key change is a delete of key 1 and a create of key 2.
        let expected: Vec<Change> = vec![
            sent[0].change.clone(),
            sent[1].change.clone(),
            Change::Delete {
                key: Key(vec![Some("1".into())]),
            },
            match &sent[2].change {
                Change::Update { new, .. } => Change::Insert { new: new.clone() },
                other => other.clone(),
            },
            sent[3].change.clone(),
        ];
        let key_of = |c: &Change| match c {
            Change::Insert { new } | Change::Update { new, .. } => new.cells[0].clone(),
            Change::Delete { key } => Cell::Present(key.0[0].clone()),
            Change::Truncate => Cell::Absent,
        };
        // Values come back in PostgreSQL's text format, not always spelled
        // the same ("0.25" / "0.250000"): compare them as Avro values.
        let canonical = |c: &Change| {
            let e = ChangeEvent {
                change: c.clone(),
                commit_lsn: Lsn(0x1000),
                commit_ts_us: 0,
                xid: 0,
            };
            schema.records(&e, false, 0).expect("re-encode")
        };
        for k in ["1", "2"] {
            let want: Vec<_> = expected
                .iter()
                .filter(|c| key_of(c) == cell(k))
                .map(canonical)
                .collect();
            let have: Vec<_> = got
                .iter()
                .map(|e| &e.change)
                .filter(|c| key_of(c) == cell(k))
                .map(canonical)
                .collect();
            assert_eq!(have, want, "{name}: key {k}");
        }
        for p in &polls {
            consumer.commit(&p.next, true).expect("commit");
        }
        drop(consumer);
        let again = plain_consumer(&brokers, &group, &topic, &registry.url);
        let p = again
            .poll(&layout, 100, Duration::from_secs(8), None)
            .await
            .expect("poll");
        assert!(
            p.items.is_empty(),
            "{name}: committed records came back: {:?}",
            p.items
        );
        let fresh = plain_consumer(&brokers, &format!("{group}_new"), &topic, &registry.url);
        let mut n = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while n < 5 && std::time::Instant::now() < deadline {
            n += fresh
                .poll(&layout, 100, Duration::from_secs(1), None)
                .await
                .expect("poll")
                .events()
                .count();
        }
        assert_eq!(n, 5, "{name}: a new group reads from the beginning");
    }
}

/// noida-db 0.2.3 answers a fetch with everything from the offset to the log
/// end, whatever its size limits say; tansu honours them. With a small
/// `receive.message.max.bytes` the consumer must say so clearly (not retry a
/// "bad message" forever); with rowshift's default it reads everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_response_over_the_client_limit_is_named() {
    use rowshift::error::Error;
    use rowshift::transport::kafka::consumer::{Consumer, Fetching};
    use rowshift::transport::kafka::decode::Layout;
    use std::time::{Duration, Instant};
    let registry = Registry::start();
    let cols = columns();
    let table = TableName::parse("public.items").expect("name");
    let schema = TableSchema::new("t", "p", "shop", &table, &cols, vec![0]).expect("schema");
    let layout = Layout {
        columns: &schema.columns,
        key: &schema.key,
    };
    let small: Vec<(String, String)> = [
        ("receive.message.max.bytes", "2000000"),
        ("fetch.max.bytes", "1000000"),
        ("max.partition.fetch.bytes", "1000000"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    const RECORDS: usize = 40;
    for (name, var) in BROKERS {
        let brokers = std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set"));
        let topic = format!("big_{name}_{:08x}", rand::random::<u32>());
        let producer = Producer::new(&brokers, &Vec::new()).expect("producer");
        // Random bytes: the producer compresses, and this must stay large.
        let value: Vec<u8> = (0..100_000).map(|_| rand::random::<u8>()).collect();
        for i in 0..RECORDS {
            producer
                .send(&topic, format!("k{i}").as_bytes(), Some(&value))
                .await
                .expect("produce");
        }
        // Records without rowshift's incarnation header are read, not decoded.
        let read_all = |props: Vec<(String, String)>, group: String| {
            let (brokers, topic, registry) = (brokers.clone(), topic.clone(), registry.url.clone());
            let layout = &layout;
            async move {
                let consumer = Consumer::new(
                    &brokers,
                    &group,
                    &topic,
                    &registry,
                    &props,
                    Fetching::default(),
                )
                .expect("consumer");
                let mut n = 0;
                let deadline = Instant::now() + Duration::from_secs(30);
                while n < RECORDS && Instant::now() < deadline {
                    n += consumer
                        .poll(layout, 100, Duration::from_secs(1), Some("none"))
                        .await?
                        .items
                        .len();
                }
                Ok::<usize, Error>(n)
            }
        };
        let limited = read_all(small.clone(), format!("g1_{topic}")).await;
        if *name == "noida" {
            match limited {
                Err(Error::Config { reason }) => assert!(
                    reason.contains("receive.message.max.bytes")
                        && reason.contains("ignores the fetch size limits"),
                    "{name}: {reason}"
                ),
                other => {
                    panic!("{name}: expected the oversized response to be named, got {other:?}")
                }
            }
        } else {
            assert_eq!(
                limited.expect("tansu honours fetch.max.bytes"),
                RECORDS,
                "{name}"
            );
        }
        let n = read_all(Vec::new(), format!("g2_{topic}"))
            .await
            .expect("read");
        assert_eq!(n, RECORDS, "{name}: the default limit reads everything");
    }
}
