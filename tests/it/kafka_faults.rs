//! The kafka transport's fault tests, against real brokers: an applier
//! killed (-9), the broker stopped for 20 s (noida-db, which loses the
//! records it acknowledged last), and consumers that stop delivering
//! without an error (named failpoints standing in for librdkafka's stuck
//! fetches). Every check is a full comparison of the target with the
//! mapped source.

use crate::kafka_pipeline::{
    abort_deletes_topic, assert_same, kafka_items_pipeline, wait_producing, ITEMS, MAIN,
};
use crate::registry::Registry;
use crate::support::*;
use crate::workload::*;
use std::time::Duration;

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
    stalled_consumer("kafka:consumer-stops", 17, false).await;
}

/// As above, but only one partition stops (`kafka:partition-stops`: the
/// records of the partition first polled are never delivered again, as
/// librdkafka's issue tracker reports of single partitions after broker
/// restarts and leader changes) while the writers go on, so the other
/// partitions keep being delivered and the polls never come back empty.
/// The watchdog watches each partition, and replaces the consumer before
/// the writers stop. (While it waited for every poll to come back empty
/// for 30 s, it could only do so after they stopped.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_reading_one_partition_is_made_again() {
    let log = stalled_consumer("kafka:partition-stops", 19, true).await;
    // The others were applied while the partition was stalled.
    let stalled = &log[log
        .find("failpoint kafka:partition-stops reached")
        .expect("failpoint")
        ..log.find("it is made again").expect("watchdog")];
    assert!(
        stalled
            .lines()
            .any(|l| l.contains("kafka applier") && !l.contains(" events=0 ")),
        "no events were applied while one partition was stalled:\n{stalled}"
    );
}

/// An applier whose group never finishes assigning (named stand-in: after
/// the failpoint `kafka:assignment-ignored` its consumer does not take up
/// the partitions the coordinator gave it, as both members of a group on
/// noida-db were once left with none for minutes) is made again by the
/// watchdog, since records wait that nobody applies, and joins anew; the
/// target ends equal to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_left_without_partitions_joins_again() {
    let log = stalled_consumer("kafka:assignment-ignored", 23, true).await;
    assert!(log.contains("joins the group anew"), "{log}");
}

/// An applier started with `failpoint`; the writers stop 5 s after it is
/// reached, or with `while_writing` once the watchdog has replaced the
/// consumer. The target must end equal to the source, with the watchdog's
/// replacement of the consumer in the applier's log (returned).
async fn stalled_consumer(failpoint: &str, seed: u64, while_writing: bool) -> String {
    let registry = Registry::start();
    let brokers = std::env::var("ROWSHIFT_TEST_KAFKA_TANSU").expect("ROWSHIFT_TEST_KAFKA_TANSU");
    let Producing {
        db,
        c,
        name,
        file,
        writers,
        mut run,
    } = producing("kstall", &brokers, &registry, seed).await;
    let path = file.to_str().expect("path");
    let mut apply = db.spawn_with(
        &["apply", path],
        "apply",
        &[("ROWSHIFT_FAILPOINT", failpoint)],
    );
    let log = db.dir.join("run-apply.log");
    let reached = format!("failpoint {failpoint} reached");
    wait_for("the consumer to stop", Duration::from_secs(120), || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(&reached)
    })
    .await;
    if while_writing {
        wait_for(
            "the watchdog to replace the consumer while the writers go on",
            Duration::from_secs(90),
            || async {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("it is made again")
            },
        )
        .await;
    } else {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
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
    text
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

/// Two whole-table reads queued as after a broker lost records twice (the
/// second while the first is being read, as the rewind of a later partition
/// queues it; here queued directly, as `state::kafka::rewind` does): both
/// are read to the end, each through every row. A repair range's chunks
/// are read ahead, so several can close in one batch; the producer once
/// kept only the last of them, lost count of the open ones and never
/// started the second read (a CI run of `a_stopped_broker_loses_nothing`
/// then waited forever for the pipeline to catch up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_table_reads_queued_back_to_back_both_finish() {
    let registry = Registry::start();
    let brokers = std::env::var("ROWSHIFT_TEST_KAFKA_TANSU").expect("ROWSHIFT_TEST_KAFKA_TANSU");
    let db = TestDb::new(MAIN).await;
    let c = db.client().await;
    create_tables(&c, ITEMS, 10).await;
    let name = format!("kresync_{}", db.tag);
    let file = db.pipeline(
        "items.yaml",
        &kafka_items_pipeline(&name, &brokers, &registry.url, true),
    );
    let mut run = db.spawn_run(&file, "run");
    wait_caught_up(&c, &name, Duration::from_secs(120)).await;
    c.execute(
        "INSERT INTO rowshift.repairs (pipeline, reason) VALUES ($1, 'broker lost records'), ($1, 'broker lost records')",
        &[&name],
    )
    .await
    .expect("queue two whole-table reads");
    wait_for("both reads to finish", Duration::from_secs(120), || async {
        c.query_one(
            "SELECT count(*) FILTER (WHERE done_at IS NULL) = 0 FROM rowshift.repairs WHERE pipeline = $1",
            &[&name],
        )
        .await
        .is_ok_and(|r| r.get(0))
    })
    .await;
    let rows: i64 = c
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .expect("count")
        .get(0);
    let written: Vec<i64> = c
        .query(
            "SELECT rows_written FROM rowshift.repairs WHERE pipeline = $1 ORDER BY id",
            &[&name],
        )
        .await
        .expect("repairs")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        written,
        vec![rows, rows],
        "rows written by each whole-table read"
    );
    wait_caught_up(&c, &name, Duration::from_secs(120)).await;
    assert_same(&c, &name).await;
    kill(&mut run);
    abort_deletes_topic(&db, &brokers, &name);
}
