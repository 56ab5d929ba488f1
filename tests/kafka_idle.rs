//! With `idle_fetch_pause_ms`, a caught-up applier's consumer pauses each
//! partition it has read to its end (see `transport::kafka::idle`): noida-db
//! answers a fetch at the end of the log at once, empty, and librdkafka
//! would fetch again at once, keeping a core busy. The pause must not cost
//! a record: records produced in bursts while the consumer waits arrive once
//! each, in order, on both brokers, and a record produced after a quiet
//! spell is read within a small part of a second (librdkafka's fetcher,
//! asleep with every partition paused, is woken on resume).
//!
//! A test binary of its own: it compares the CPU time of this process, which
//! the tests of a shared binary would add to.

#[path = "support/registry.rs"]
mod registry;

use registry::Registry;
use rowshift::model::{Cell, Change, ChangeEvent, Lsn, Row};
use rowshift::spec::TableName;
use rowshift::transport::kafka::codec::Encoder;
use rowshift::transport::kafka::consumer::{Consumer, Fetching};
use rowshift::transport::kafka::decode::Layout;
use rowshift::transport::kafka::envelope::{ColumnType, TableSchema};
use rowshift::transport::kafka::producer::{ensure_topic, Producer};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BROKERS: &[(&str, &str)] = &[
    ("tansu", "ROWSHIFT_TEST_KAFKA_TANSU"),
    ("noida", "ROWSHIFT_TEST_KAFKA_NOIDA"),
];

const RECORDS: i64 = 300;
/// Records produced one at a time after quiet spells.
const LATE: i64 = 5;

fn insert(id: i64) -> ChangeEvent {
    ChangeEvent {
        change: Change::Insert {
            new: Row {
                cells: vec![
                    Cell::Present(Some(id.to_string())),
                    Cell::Present(Some(format!("body {id}"))),
                ],
            },
        },
        commit_lsn: Lsn(0x1000 + id as u64),
        commit_ts_us: 1_700_000_000_000_000,
        xid: 0,
    }
}

fn id_of(e: &ChangeEvent) -> i64 {
    match &e.change {
        Change::Insert { new } => match &new.cells[0] {
            Cell::Present(Some(v)) => v.parse().expect("an id"),
            other => panic!("no id in {other:?}"),
        },
        other => panic!("not an insert: {other:?}"),
    }
}

/// CPU time this process has used (user + system).
fn cpu_used() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .expect("stat format")
        .1
        .split(' ')
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 10)
}

/// Polls `consumer` for `secs` with nothing to read; the CPU it took.
async fn idle_cpu(consumer: &Consumer, layout: &Layout<'_>, secs: u64) -> Duration {
    let before = cpu_used();
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        let p = consumer
            .poll(layout, 100, Duration::from_millis(200), None)
            .await
            .expect("poll");
        assert!(p.items.is_empty(), "nothing was produced: {:?}", p.items);
    }
    cpu_used() - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_consumer_pauses_at_the_end_and_misses_nothing() {
    let registry = Registry::start();
    let cols: Vec<ColumnType> = [("id", "bigint"), ("body", "text")]
        .into_iter()
        .map(|(name, sql_type)| ColumnType {
            name,
            sql_type,
            is_enum: false,
        })
        .collect();
    let table = TableName::parse("public.items").expect("name");
    for (name, var) in BROKERS {
        let brokers = std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set"));
        let topic = format!("idle_{name}_{:08x}", rand::random::<u32>());
        ensure_topic(&brokers, &Vec::new(), &topic, 3, 1)
            .await
            .expect("topic");
        let schema = TableSchema::new(&topic, "p", "shop", &table, &cols, vec![0]).expect("schema");
        let layout = Layout {
            columns: &schema.columns,
            key: &schema.key,
        };
        // A member of `group` with the idle pause `pause`.
        let member = |group: String, pause: Duration| {
            Consumer::new(
                &brokers,
                &group,
                &topic,
                &registry.url,
                &Vec::new(),
                Fetching {
                    idle_pause: pause,
                    prefetch: 0,
                },
            )
            .expect("consumer")
        };
        let consumer = member(format!("g_{topic}"), Duration::from_millis(10));
        // Join the group and read every partition to its (empty) end.
        idle_cpu(&consumer, &layout, 6).await;

        // Bursts with gaps around the pause, produced while the consumer polls.
        let producer = Arc::new(Producer::new(&brokers, &Vec::new()).expect("producer"));
        let encoder = Arc::new(Encoder::new(&registry.url, &schema));
        let produce = {
            let (producer, encoder, t, s) = (
                producer.clone(),
                encoder.clone(),
                topic.clone(),
                schema.clone(),
            );
            move |id: i64| {
                let (producer, encoder, t, s) =
                    (producer.clone(), encoder.clone(), t.clone(), s.clone());
                async move {
                    for r in s.records(&insert(id), false, 0).expect("records") {
                        let (k, v) = encoder.encode(&r).await.expect("encode");
                        producer.send(&t, &k, v.as_deref()).await.expect("produce");
                    }
                }
            }
        };
        let burst = produce.clone();
        let writer = tokio::spawn(async move {
            for id in 1..=RECORDS {
                burst(id).await;
                if id % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 25)).await;
                }
            }
        });
        let mut seen: Vec<i64> = Vec::new();
        let mut last: BTreeMap<i32, i64> = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(90);
        while (seen.len() as i64) < RECORDS && Instant::now() < deadline {
            let p = consumer
                .poll(&layout, 100, Duration::from_millis(200), None)
                .await
                .expect("poll");
            for item in &p.items {
                let before = last.insert(item.partition, item.offset);
                assert!(
                    before.is_none_or(|b| item.offset == b + 1),
                    "{name}: partition {} went from offset {before:?} to {}",
                    item.partition,
                    item.offset
                );
                seen.push(id_of(item.event.as_ref().expect("an event")));
            }
        }
        writer.await.expect("writer");
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (1..=RECORDS).collect::<Vec<_>>(),
            "{name}: every record once"
        );

        // After a quiet spell (every partition paused, librdkafka's fetcher
        // asleep), a new record is read within a small part of a second,
        // not at the fetcher's next timed wake-up (up to 1 s).
        let mut delays = Vec::new();
        for id in RECORDS + 1..=RECORDS + LATE {
            idle_cpu(&consumer, &layout, 1).await;
            let sent = Instant::now();
            produce(id).await;
            let mut got = Vec::new();
            while got.is_empty() && sent.elapsed() < Duration::from_secs(10) {
                got = consumer
                    .poll(&layout, 100, Duration::from_millis(50), None)
                    .await
                    .expect("poll")
                    .items;
            }
            delays.push(sent.elapsed());
            let ids: Vec<i64> = got
                .iter()
                .filter_map(|i| i.event.as_ref())
                .map(id_of)
                .collect();
            assert_eq!(ids, vec![id], "{name}: the record after a quiet spell");
        }
        delays.sort_unstable();
        assert!(
            delays[2] < Duration::from_millis(250),
            "{name}: records after a quiet spell were read late: {delays:?}"
        );

        // Waiting at the end costs little CPU on noida-db, which answers
        // empty fetches at once: less than half of it with the pause off.
        // (Paused: 0.26 s of 3 s on a fast day, 0.41-0.49 s on a slow one,
        // while spinning stays near 1.5 s, bounded by the broker's round
        // trips; without the pause the two are the same.)
        if *name == "noida" {
            let paused = idle_cpu(&consumer, &layout, 3).await;
            let spinning = member(format!("g2_{topic}"), Duration::ZERO);
            // Read what is there, then wait at the end.
            let end = Instant::now() + Duration::from_secs(30);
            let mut n = 0;
            while n < RECORDS + LATE && Instant::now() < end {
                n += spinning
                    .poll(&layout, 1000, Duration::from_millis(500), None)
                    .await
                    .expect("poll")
                    .items
                    .len() as i64;
            }
            assert_eq!(n, RECORDS + LATE, "the second group reads everything");
            let unpaused = idle_cpu(&spinning, &layout, 3).await;
            println!("waiting 3 s at the end: {paused:?} of CPU paused, {unpaused:?} spinning");
            assert!(
                paused * 2 < unpaused,
                "waiting at the end took {paused:?} of CPU with the idle pause, {unpaused:?} without"
            );
        }
    }
}
