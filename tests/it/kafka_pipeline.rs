//! Pipelines on the kafka transport against real brokers (tansu and
//! noida-db) and the fixture registry: the consistency torture test with
//! two appliers on each broker, stock clients reading the pipeline's topic,
//! a column added to the source (a new schema version), and the fault
//! tests (an applier killed, the broker stopped for 20 s). Every check is a
//! full comparison of the target with the mapped source.

use crate::registry::Registry;
use crate::support::*;
use crate::workload::*;
use std::time::Duration;

const MAIN: &str = "ROWSHIFT_TEST_PG_PORT";
const ITEMS: i64 = 20_000;

fn kafka_items_pipeline(name: &str, brokers: &str, registry: &str, apply_in_run: bool) -> String {
    format!(
        "{}transport:\n  kind: kafka\n  kafka:\n    brokers: \"{brokers}\"\n    registry_url: \"{registry}\"\n    \
         partitions: 4\n    apply_in_run: {apply_in_run}\n    properties: {{ client.id: rowshift-test }}\n",
        items_pipeline(name, 1_000, 20_000, 1)
    )
}

/// Waits until `rowshift run` has set up the topic's partitions.
async fn wait_producing(c: &tokio_postgres::Client, name: &str) {
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

async fn assert_same(c: &tokio_postgres::Client, target: &str) {
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

fn kafka_sh(args: &[&str]) {
    let out = std::process::Command::new("bash")
        .arg(format!("{}/scripts/kafka.sh", env!("CARGO_MANIFEST_DIR")))
        .args(args)
        .output()
        .expect("kafka.sh");
    assert!(out.status.success(), "kafka.sh {args:?}: {}", stderr(&out));
}

/// A broker of this test's own (noida-db keeps its log on disk, so it can
/// be stopped and started again); stopped when dropped.
struct Broker {
    dir: String,
    port: String,
}

impl Broker {
    fn start() -> Broker {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port()
            .to_string();
        let dir = std::env::temp_dir()
            .join(format!("rowshift-broker-{port}"))
            .display()
            .to_string();
        kafka_sh(&["start", "noida", &dir, &port]);
        Broker { dir, port }
    }

    fn stop(&self) {
        kafka_sh(&["stop", &self.dir]);
    }

    fn restart(&self) {
        kafka_sh(&["start", "noida", &self.dir, &self.port]);
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Two `rowshift apply` processes share the stream; one is killed (-9) in
/// the middle of it: the other takes its partitions over and the target
/// ends equal to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_applier_loses_nothing() {
    fault(false).await;
}

/// As above, and then the broker is stopped for 20 s while the writes go
/// on. The slot must not confirm changes the broker never acknowledged,
/// and at the end the target must equal the source. noida-db loses the
/// producer state and the last records it acknowledged when it stops; the
/// producer fails (OutOfOrderSequence), restarts from the slot, finds the
/// offsets reused, moves the appliers back and reads the table again.
/// The applier that was backing off meanwhile falls some hundred MB behind
/// (the table read again through the topic), and noida-db answers its next
/// fetch with all of it in one response, ignoring the fetch size limits:
/// this is what rowshift's default `receive.message.max.bytes` is for (see
/// `a_fetch_response_over_the_client_limit_is_named`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_broker_loses_nothing() {
    fault(true).await;
}

/// A kafka pipeline over the items tables (no applier in `run`), two
/// writers under way, `rowshift run` producing.
struct Producing {
    db: TestDb,
    c: tokio_postgres::Client,
    name: String,
    file: std::path::PathBuf,
    writers: Writers,
    run: Proc,
}

async fn producing(prefix: &str, brokers: &str, registry: &Registry, seed: u64) -> Producing {
    let db = TestDb::new(MAIN).await;
    let c = db.client().await;
    create_tables(&c, ITEMS, 10).await;
    let name = format!("{prefix}_{}", db.tag);
    let file = db.pipeline(
        "items.yaml",
        &kafka_items_pipeline(&name, brokers, &registry.url, false),
    );
    let writers = start_writers(&db, seed, 2, ITEMS).await;
    let run = db.spawn_run(&file, "run");
    wait_producing(&c, &name).await;
    Producing {
        db,
        c,
        name,
        file,
        writers,
        run,
    }
}

/// An applier whose consumer stops delivering without an error (named
/// stand-in: after the failpoint `kafka:consumer-stops`, reached at its
/// first records, every poll comes back empty, as a consumer was once seen
/// to behave after a broker outage) is replaced by the watchdog: the
/// target ends equal to the source. Without the watchdog the applier waits
/// forever (checked: the test then times out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_reading_is_made_again() {
    let registry = Registry::start();
    let brokers = std::env::var("ROWSHIFT_TEST_KAFKA_TANSU").expect("ROWSHIFT_TEST_KAFKA_TANSU");
    let Producing {
        db,
        c,
        name,
        file,
        writers,
        mut run,
    } = producing("kstall", &brokers, &registry, 17).await;
    let path = file.to_str().expect("path");
    let mut apply = db.spawn_with(
        &["apply", path],
        "apply",
        &[("ROWSHIFT_FAILPOINT", "kafka:consumer-stops")],
    );
    let log = db.dir.join("run-apply.log");
    wait_for("the consumer to stop", Duration::from_secs(120), || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("failpoint kafka:consumer-stops reached")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let statements = writers.stop().await;
    assert!(
        statements > 100,
        "the writers ran only {statements} statements"
    );
    wait_caught_up(&c, &name, Duration::from_secs(180)).await;
    assert_same(&c, &name).await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("it is made again"),
        "caught up without the watchdog replacing the stopped consumer"
    );
    kill(&mut apply);
    kill(&mut run);
    abort_deletes_topic(&db, &brokers, &name);
    assert_no_leftovers(&c, &name).await;
}

async fn fault(stop_broker: bool) {
    let registry = Registry::start();
    // The outage needs a broker of the test's own that keeps its log on
    // disk (noida-db); the applier kill runs on tansu, whose group
    // coordinator expires a killed member after its session timeout.
    let broker = stop_broker.then(Broker::start);
    let brokers = match &broker {
        Some(b) => format!("127.0.0.1:{}", b.port),
        None => std::env::var("ROWSHIFT_TEST_KAFKA_TANSU").expect("ROWSHIFT_TEST_KAFKA_TANSU"),
    };
    let Producing {
        db,
        c,
        name,
        file,
        writers,
        mut run,
    } = producing("kfault", &brokers, &registry, 11).await;
    let path = file.to_str().expect("path");
    let mut first = db.spawn(&["apply", path], "apply-1");
    let mut second = db.spawn(&["apply", path], "apply-2");
    wait_for("the backfill to finish", Duration::from_secs(180), || {
        backfill_finished(&c, &name)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    kill(&mut first);
    tokio::time::sleep(Duration::from_secs(3)).await;

    if let Some(b) = &broker {
        broker_outage(&c, b, &name).await;
    }
    let statements = writers.stop().await;
    assert!(
        statements > 300,
        "the writers ran only {statements} statements"
    );
    wait_caught_up(&c, &name, Duration::from_secs(240)).await;
    assert_same(&c, &name).await;
    kill(&mut second);
    kill(&mut run);
    abort_deletes_topic(&db, &brokers, &name);
    assert_no_leftovers(&c, &name).await;
}

/// Stops the broker for 20 s; the slot must not pass what was written then.
async fn broker_outage(c: &tokio_postgres::Client, broker: &Broker, name: &str) {
    broker.stop();
    let stopped_at: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    tokio::time::sleep(Duration::from_secs(20)).await;
    let within: bool = c
        .query_one(
            "SELECT confirmed_flush_lsn <= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
            &[&stopped_at, &format!("rowshift_{name}")],
        )
        .await
        .expect("slot")
        .get(0);
    assert!(
        within,
        "the slot confirmed changes made while the broker was down (past {stopped_at})"
    );
    broker.restart();
    tokio::time::sleep(Duration::from_secs(3)).await;
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
fn abort_deletes_topic(db: &TestDb, brokers: &str, name: &str) {
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
