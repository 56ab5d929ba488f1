//! Pipelines on the kafka transport against real brokers (tansu and
//! noida-db) and the fixture registry: the consistency torture test with
//! two appliers on each broker, stock clients reading the pipeline's topic
//! and a column added to the source (a new schema version); the fault tests
//! are in `kafka_faults`. Every check is a full comparison of the target
//! with the mapped source.

use crate::registry::Registry;
use crate::support::*;
use crate::workload::*;
use std::time::Duration;

pub(crate) const MAIN: &str = "ROWSHIFT_TEST_PG_PORT";
pub(crate) const ITEMS: i64 = 20_000;

pub(crate) fn kafka_items_pipeline(
    name: &str,
    brokers: &str,
    registry: &str,
    apply_in_run: bool,
) -> String {
    format!(
        "{}transport:\n  kind: kafka\n  kafka:\n    brokers: \"{brokers}\"\n    registry_url: \"{registry}\"\n    \
         partitions: 4\n    apply_in_run: {apply_in_run}\n    properties: {{ client.id: rowshift-test }}\n",
        items_pipeline(name, 1_000, 20_000, 1)
    )
}

/// Waits until `rowshift run` has set up the topic's partitions.
pub(crate) async fn wait_producing(c: &tokio_postgres::Client, name: &str) {
    wait_for("the pipeline to start", Duration::from_secs(60), || async {
        c.query_opt(
            "SELECT 1 FROM rowshift.kafka_applied WHERE pipeline = $1 LIMIT 1",
            &[&name],
        )
        .await
        .ok()
        .flatten()
        .is_some()
    })
    .await;
}

pub(crate) async fn assert_same(c: &tokio_postgres::Client, target: &str) {
    if let Some(d) = diff(c, ITEMS_MAPPED, target).await {
        panic!("target {target} differs from the mapped source:\n{d}");
    }
    let n: i64 = c
        .query_one(&format!("SELECT count(*) FROM {target}"), &[])
        .await
        .expect("count")
        .get(0);
    assert!(n > ITEMS / 2, "compared a nearly empty table ({n} rows)");
}

/// Every record of the pipeline's topic (`produced` of them), decoded by
/// a stock consumer (`confluent-kafka` and `fastavro`, with the schemas
/// from the registry): `{"key": .., "value": .. or null}`.
fn decode_topic(
    brokers: &str,
    name: &str,
    registry: &Registry,
    produced: i64,
) -> Vec<serde_json::Value> {
    let topic = format!("rowshift.{name}");
    let out = std::process::Command::new(
        std::env::var("ROWSHIFT_TEST_PYTHON").expect("ROWSHIFT_TEST_PYTHON"),
    )
    .arg(format!(
        "{}/tests/python/decode_topic.py",
        env!("CARGO_MANIFEST_DIR")
    ))
    .args([
        brokers,
        topic.as_str(),
        registry.url.as_str(),
        &produced.to_string(),
    ])
    .output()
    .expect("python consumer");
    assert!(out.status.success(), "python consumer: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect()
}

/// The records the appliers have passed (every record of the topic, once
/// the pipeline is caught up).
fn applied(db: &TestDb, name: &str) -> i64 {
    status_json(db, name)["kafka"]
        .as_array()
        .expect("kafka partitions in status")
        .iter()
        .map(|p| p["applied"].as_i64().unwrap_or(0))
        .sum()
}

fn status_json(db: &TestDb, name: &str) -> serde_json::Value {
    let out = db.rowshift(&["status", name, "--output", "json"]);
    assert!(out.status.success(), "status: {}", stderr(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    list[0].clone()
}

/// The torture test through Kafka, with `rowshift run` and one more
/// `rowshift apply` sharing the partitions; then `verify`, `status` and a
/// stock consumer reading the whole topic. On tansu, with 3 writers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torture_through_kafka_with_two_appliers() {
    torture("ROWSHIFT_TEST_KAFKA_TANSU", 7, 3).await;
}

/// The same on noida-db, with another seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torture_through_kafka_on_noida() {
    torture("ROWSHIFT_TEST_KAFKA_NOIDA", 13, 2).await;
}

async fn torture(broker_var: &str, seed: u64, writers: u64) {
    let registry = Registry::start();
    let brokers = std::env::var(broker_var).expect(broker_var);
    let db = TestDb::new(MAIN).await;
    let c = db.client().await;
    create_tables(&c, ITEMS, 10).await;
    let name = format!("kitems_{}", db.tag);
    let file = db.pipeline(
        "items.yaml",
        &kafka_items_pipeline(&name, &brokers, &registry.url, true),
    );
    let plan = db.rowshift(&["plan", file.to_str().expect("path")]);
    assert!(plan.status.success(), "plan: {}", stderr(&plan));
    let writers = start_writers(&db, seed, writers, ITEMS).await;
    let mut run = db.spawn_run(&file, "run");
    wait_producing(&c, &name).await;
    let mut apply = db.spawn(&["apply", file.to_str().expect("path")], "apply");
    wait_for("the backfill to finish", Duration::from_secs(180), || {
        backfill_finished(&c, &name)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let statements = writers.stop().await;
    assert!(
        statements > 300,
        "the writers ran only {statements} statements"
    );
    wait_caught_up(&c, &name, Duration::from_secs(120)).await;
    assert_same(&c, &name).await;

    // Both processes applied some of the stream.
    let appliers: i64 = c
        .query_one(
            "SELECT count(DISTINCT applier) FROM rowshift.kafka_applied WHERE pipeline = $1",
            &[&name],
        )
        .await
        .expect("appliers")
        .get(0);
    assert!(appliers >= 1, "no applier recorded");

    let verify = db.rowshift(&["verify", &name]);
    assert!(
        verify.status.success(),
        "verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        stderr(&verify)
    );

    let status = status_json(&db, &name);
    let parts = status["kafka"]
        .as_array()
        .expect("kafka partitions in status");
    assert_eq!(parts.len(), 4);
    let produced: i64 = parts
        .iter()
        .map(|p| p["produced"].as_i64().unwrap_or(0))
        .sum();
    assert!(produced as f64 >= ITEMS as f64 * 0.9, "produced {produced}");

    // A stock consumer decodes every record of the pipeline's topic; the
    // last record of each key is the key's current row (or its deletion).
    let records = decode_topic(&brokers, &name, &registry, applied(&db, &name));
    let mut last: std::collections::HashMap<i64, serde_json::Value> = Default::default();
    let mut ops = std::collections::BTreeSet::new();
    for rec in records {
        let id = rec["key"]["id"].as_i64().expect("key id");
        if let Some(op) = rec["value"]["op"].as_str() {
            ops.insert(op.to_string());
        }
        last.insert(id, rec["value"].clone());
    }
    for op in ["r", "c", "u", "d"] {
        assert!(ops.contains(op), "no {op} record in the topic: {ops:?}");
    }
    let rows = c
        .query("SELECT id, small FROM items", &[])
        .await
        .expect("rows");
    let live: std::collections::HashMap<i64, Option<i32>> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for (id, value) in &last {
        match live.get(id) {
            Some(small) => {
                assert_eq!(
                    value["after"]["small"].as_i64(),
                    small.map(i64::from),
                    "key {id}: the topic's last record is not the row"
                );
            }
            None => assert!(
                value.is_null(),
                "key {id} is deleted but its last record is {value}"
            ),
        }
    }
    assert_eq!(
        last.values().filter(|v| !v.is_null()).count(),
        live.len(),
        "every live row has a record"
    );

    kill(&mut apply);
    kill(&mut run);
    abort_deletes_topic(&db, &brokers, &name);
    assert_no_leftovers(&c, &name).await;
}

/// A column added to the source while the pipeline streams (noida-db):
/// the records carry it from then on under a new, backward-compatible
/// value schema version, a stock consumer decodes records of both versions,
/// and the pipeline goes on (the target, which does not map the column,
/// still equals the mapped source).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_on_the_source_registers_a_new_version() {
    let registry = Registry::start();
    let brokers = std::env::var("ROWSHIFT_TEST_KAFKA_NOIDA").expect("ROWSHIFT_TEST_KAFKA_NOIDA");
    let db = TestDb::new(MAIN).await;
    let c = db.client().await;
    create_tables(&c, 3_000, 10).await;
    let name = format!("kevolve_{}", db.tag);
    let file = db.pipeline(
        "items.yaml",
        &kafka_items_pipeline(&name, &brokers, &registry.url, true),
    );
    let mut run = db.spawn_run(&file, "run");
    wait_caught_up(&c, &name, Duration::from_secs(120)).await;
    c.batch_execute(
        "ALTER TABLE items ADD COLUMN note text;
         UPDATE items SET note = 'note ' || id WHERE id % 7 = 0;
         INSERT INTO items (id, small, body, note) SELECT 900000 + g, g, 'b', 'new ' || g FROM generate_series(1, 50) g;
         UPDATE items SET small = small + 1 WHERE id % 13 = 0;
         DELETE FROM items WHERE id % 11 = 0;",
    )
    .await
    .expect("alter and write");
    wait_caught_up(&c, &name, Duration::from_secs(120)).await;
    assert!(
        run.0.try_wait().expect("run state").is_none(),
        "rowshift run stopped after the column was added"
    );
    if let Some(d) = diff(&c, ITEMS_MAPPED, &name).await {
        panic!("target {name} differs from the mapped source:\n{d}");
    }

    let subject = format!("rowshift.{name}-value");
    let versions = http_get(&format!("{}/subjects/{subject}/versions", registry.url));
    assert_eq!(versions, serde_json::json!([1, 2]), "value schema versions");
    let latest = http_get(&format!(
        "{}/subjects/{subject}/versions/latest",
        registry.url
    ));
    let schema: serde_json::Value =
        serde_json::from_str(latest["schema"].as_str().expect("schema text")).expect("schema");
    let fields = schema["fields"][0]["type"][1]["fields"]
        .as_array()
        .expect("Value fields");
    let note = fields
        .iter()
        .find(|f| f["name"] == "note")
        .expect("note in the new version");
    assert_eq!(note["type"], serde_json::json!(["null", "string"]));
    assert!(note["default"].is_null() && note.get("default").is_some());

    // The last record of every key is the live row, note included (absent
    // in records written before the column existed, where it is NULL).
    let records = decode_topic(&brokers, &name, &registry, applied(&db, &name));
    let mut last: std::collections::HashMap<i64, serde_json::Value> = Default::default();
    for rec in records {
        last.insert(
            rec["key"]["id"].as_i64().expect("key id"),
            rec["value"].clone(),
        );
    }
    let rows = c
        .query("SELECT id, small, note FROM items", &[])
        .await
        .expect("rows");
    assert!(rows.len() > 2_000);
    for r in &rows {
        let id: i64 = r.get(0);
        let after = &last.get(&id).unwrap_or_else(|| panic!("no record of {id}"))["after"];
        assert_eq!(
            after["small"].as_i64(),
            r.get::<_, Option<i32>>(1).map(i64::from),
            "key {id}"
        );
        assert_eq!(
            after["note"].as_str(),
            r.get::<_, Option<&str>>(2),
            "key {id}: note"
        );
    }
    let deleted = last.iter().filter(|(_, v)| v.is_null()).count();
    assert_eq!(
        last.len() - deleted,
        rows.len(),
        "every live row has a record"
    );
    assert!(deleted > 200, "the deletes reached the topic");

    kill(&mut run);
    abort_deletes_topic(&db, &brokers, &name);
}

/// `rowshift abort` removes the topic rowshift created, with the rest.
pub(crate) fn abort_deletes_topic(db: &TestDb, brokers: &str, name: &str) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let out = db.rowshift(&["abort", name]);
    assert!(out.status.success(), "abort: {}", stderr(&out));
    let topic = format!("rowshift.{name}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("deleted kafka topic {topic}")),
        "{said}"
    );
    let client: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("kafka client");
    let md = client
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata");
    assert!(
        md.topics().iter().all(|t| t.name() != topic),
        "topic {topic} is still there after abort"
    );
}

/// The JSON body of a GET (HTTP/1.0, for the fixture registry).
fn http_get(url: &str) -> serde_json::Value {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest.split_once('/').expect("path");
    let mut s = std::net::TcpStream::connect(host).expect("connect");
    write!(s, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").expect("request");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("reply");
    let (head, body) = reply.split_once("\r\n\r\n").expect("http reply");
    assert!(head.contains(" 200 "), "GET {url}: {head}");
    serde_json::from_str(body).expect("json body")
}
