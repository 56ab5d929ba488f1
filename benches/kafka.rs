//! Issue 4's benchmarks (the kafka transport), each next to its reference,
//! in one run, against a real broker (noida-db by default, the one that
//! keeps its log on disk; `BENCH_BROKER=tansu` for the other) and the
//! fixture schema registry:
//!
//! 1. end-to-end apply (source → broker → target) of a backlog of 200,000
//!    single-row transactions, vs the same pipeline on the `direct`
//!    transport consuming the same backlog, back to back (the kafka side
//!    is `rowshift run` producing and one `rowshift apply`, which joins the
//!    consumer group before the producer starts);
//! 2. the producer alone (source → broker, no applier) for a backlog of one
//!    200,000-row transaction, next to PostgreSQL decoding that backlog
//!    (`pg_logical_slot_get_binary_changes` with pgoutput on a slot of its
//!    own);
//! 3. replication lag under a steady 2,000 writes/s through Kafka, next to
//!    the direct transport under the same load.
//!
//! The backlogs are built while every consumer is stopped; rates are timed
//! between a start and an end marker becoming visible (in the target, or
//! for the producer in the broker's log end offsets), so start-up is not
//! counted. Run: `bash scripts/bench.sh kafka`.

mod common;
#[path = "common/kafka_broker.rs"]
mod kafka_broker;
#[path = "../tests/support/registry.rs"]
mod registry;

use anyhow::{bail, Context, Result};
use common::*;
use kafka_broker::{Broker, LogEnds};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

const ROWS: i64 = 200_000;
const BACKLOG: i64 = 200_000;
const PARTITIONS: i32 = 6;

/// The bench topic's partitions: `BENCH_PARTITIONS`, or [`PARTITIONS`].
fn partitions() -> i32 {
    std::env::var("BENCH_PARTITIONS")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(PARTITIONS)
}

const ORDERS_DDL: &str =
    "CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id bigint NOT NULL, \
    amount numeric(12,2) NOT NULL, status text NOT NULL, note text, legacy_flag boolean, \
    created_at timestamptz NOT NULL DEFAULT now())";

const TARGET_DDL: &str = "CREATE TABLE public.orders_v2 (id bigint PRIMARY KEY, customer_id bigint NOT NULL, \
    amount_cents bigint NOT NULL, state text NOT NULL, note text, total_with_tax numeric(14,2) NOT NULL, \
    created_at timestamptz NOT NULL)";

/// The demo mapping into `table`, on `transport`.
fn pipeline(name: &str, table: &str, transport: &str) -> String {
    orders_pipeline(
        name,
        &TARGET_DDL.replace("orders_v2", table),
        &format!("transport: {transport}"),
    )
    .replace("public.orders_v2", &format!("public.{table}"))
}

/// `BENCH_IDLE_PAUSE=N` sets the appliers' `idle_fetch_pause_ms` (unset:
/// the pipeline default).
fn kafka_transport(broker: &str, registry: &str, apply_in_run: bool) -> String {
    let pause = std::env::var("BENCH_IDLE_PAUSE")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|ms| format!(", idle_fetch_pause_ms: {ms}"))
        .unwrap_or_default();
    let partitions = partitions();
    let props = std::env::var("BENCH_PROPS")
        .map(|p| format!(", properties: {{ {p} }}"))
        .unwrap_or_default();
    format!(
        "{{ kind: kafka, batch_events: 10000, kafka: {{ brokers: \"{broker}\", registry_url: \"{registry}\", \
         partitions: {partitions}, apply_in_run: {apply_in_run}{pause}{props} }} }}"
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    std::env::set_current_dir(env!("CARGO_MANIFEST_DIR"))?;
    let work = std::env::temp_dir().join(format!("rowshift-bench-kafka-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let kind = std::env::var("BENCH_BROKER").unwrap_or_else(|_| "noida".into());
    let status = Command::new("scripts/kafka.sh").arg("install").status()?;
    if !status.success() {
        bail!("could not install the brokers");
    }
    let source = Cluster::start(work.join("source"), free_port()?)?;
    let broker = Broker::start(&kind, work.join("broker"))?;
    let registry = registry::Registry::start();
    let mut results = Results { rows: Vec::new() };
    let outcome = run(&source, &broker, &kind, &registry.url, &work, &mut results).await;
    print_table(&results);
    drop(broker);
    drop(source);
    match &outcome {
        Ok(()) if std::env::var("BENCH_KEEP").is_err() => {
            let _ = std::fs::remove_dir_all(&work);
        }
        _ => eprintln!("logs kept in {}", work.display()),
    }
    outcome
}

struct Files {
    direct: String,
    kafka: String,
    produce_only: String,
}

/// What every measurement works with.
struct Ctx<'a> {
    source: &'a Cluster,
    broker: &'a Broker,
    kind: &'a str,
    dsn: String,
    files: Files,
    work: &'a Path,
    src: Client,
}

fn write(work: &Path, name: &str, text: &str) -> Result<String> {
    let path = work.join(name);
    std::fs::write(&path, text)?;
    Ok(path.to_str().context("utf-8 path")?.to_string())
}

async fn run(
    source: &Cluster,
    broker: &Broker,
    kind: &str,
    registry: &str,
    work: &Path,
    results: &mut Results,
) -> Result<()> {
    let admin = connect(&source.dsn("postgres")).await?;
    // Durable commits, as in the core benches (a walsender sends flushed WAL only).
    admin
        .batch_execute("ALTER SYSTEM SET synchronous_commit = on")
        .await?;
    admin.batch_execute("SELECT pg_reload_conf()").await?;
    admin.batch_execute("CREATE DATABASE bench").await?;
    let dsn = source.dsn("bench");
    let src = connect(&dsn).await?;
    load_orders(&src, ORDERS_DDL, ROWS).await?;
    src.batch_execute("ALTER TABLE orders SET (autovacuum_enabled = false)")
        .await?;
    let files = Files {
        direct: write(
            work,
            "direct.yaml",
            &pipeline(
                "bench_direct",
                "orders_direct",
                "{ kind: direct, batch_events: 10000 }",
            ),
        )?,
        kafka: write(
            work,
            "kafka.yaml",
            &pipeline(
                "bench_kafka",
                "orders_kafka",
                &kafka_transport(&broker.addr, registry, true),
            ),
        )?,
        produce_only: write(
            work,
            "produce.yaml",
            &pipeline(
                "bench_kafka",
                "orders_kafka",
                &kafka_transport(&broker.addr, registry, false),
            ),
        )?,
    };
    for (file, log) in [
        (&files.direct, "backfill-direct.log"),
        (&files.kafka, "backfill-kafka.log"),
    ] {
        println!("backfilling {file} ...");
        let mut child = rowshift(
            &dsn,
            &["run", file, "--exit-when-caught-up"],
            &work.join(log),
        )?;
        if !child.0.wait()?.success() {
            bail!(
                "rowshift run {file} failed; see {}",
                work.join(log).display()
            );
        }
    }
    src.batch_execute(
        "ALTER TABLE orders_direct SET (autovacuum_enabled = false); \
         ALTER TABLE orders_kafka SET (autovacuum_enabled = false)",
    )
    .await?;

    let c = Ctx {
        source,
        broker,
        kind,
        dsn,
        files,
        work,
        src,
    };
    // BENCH_ONLY=e2e, producer or lag: that figure alone.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "e2e" {
        end_to_end(&c, results).await?;
    }
    if only.is_empty() || only == "producer" {
        producer_alone(&c, results).await?;
    }
    if only.is_empty() || only == "lag" {
        lag(&c, results).await?;
    }
    Ok(())
}

/// `BENCH_ROUNDS` rounds (default 3) of: a fresh backlog, the direct
/// pipeline on it, then the kafka pipeline on it. This machine's speed
/// swings between runs by more than the effect measured, so the figure is
/// the round with the median ratio, and every round is printed.
async fn end_to_end(c: &Ctx<'_>, results: &mut Results) -> Result<()> {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let mut seen: Vec<(f64, f64)> = Vec::new();
    for round in 1..=rounds {
        let (direct, kafka) = e2e_round(c, round).await?;
        let (d, k) = (BACKLOG as f64 / direct, BACKLOG as f64 / kafka);
        println!(
            "round {round}: direct {d:.0} tx/s, kafka {k:.0} tx/s = {:.2}×",
            k / d
        );
        seen.push((d, k));
    }
    seen.sort_by(|a, b| (a.1 / a.0).total_cmp(&(b.1 / b.0)));
    let all: Vec<String> = seen.iter().map(|(d, k)| format!("{:.2}", k / d)).collect();
    let (d, k) = seen[seen.len() / 2];
    results.add(
        &format!(
            "end to end, 200k single-row transactions, through {} (median of {rounds} rounds: {})",
            c.kind,
            all.join(", ")
        ),
        "≥ 0.8× direct",
        format!("direct transport {d:.0} tx/s"),
        format!("{k:.0} tx/s = {:.2}×", k / d),
    );
    Ok(())
}

/// One round of [`end_to_end`]: the seconds each pipeline took.
async fn e2e_round(c: &Ctx<'_>, round: usize) -> Result<(f64, f64)> {
    let files = &c.files;
    settle(
        &c.dsn,
        &[
            (&files.direct, "rowshift_bench_direct"),
            (&files.kafka, "rowshift_bench_kafka"),
        ],
        c.work,
        &c.src,
    )
    .await?;
    trim(c).await?;
    let marks = (format!("start-e2e-{round}"), format!("end-e2e-{round}"));
    let marks = (marks.0.as_str(), marks.1.as_str());
    single_row_backlog(&c.src, c.source.port, ROWS, BACKLOG, marks).await?;
    let (t0, t1) = apply_time(c, &files.direct, "orders_direct", "bench_direct", marks).await?;
    let direct = t1 - t0;
    // The applier joins the consumer group first (a join takes seconds, and
    // would otherwise let the backlog pile up in the topic, untimed).
    let applier = rowshift(
        &c.dsn,
        &["apply", &files.produce_only],
        &c.work.join(format!("applier-{round}.log")),
    )?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    // BENCH_TRACE=1: where the time goes: when the broker had the whole
    // backlog (the producer's side), next to when the target had it
    // (noida-db only: tansu misreports log ends). Polling the log ends
    // costs the run some speed, so it is off by default.
    let trace = std::env::var("BENCH_TRACE").is_ok() && c.kind != "tansu";
    let produced = trace.then(|| {
        let addr = c.broker.addr.clone();
        std::thread::spawn(move || -> Result<f64> {
            let ends = LogEnds::new(&addr, "rowshift.bench_kafka")?;
            let before = ends.total()?;
            let (first, all) = ends.wait_for(
                before,
                BACKLOG,
                Duration::from_secs(600),
                Duration::from_millis(100),
            )?;
            Ok((all - first).as_secs_f64())
        })
    });
    // The kafka window starts when the first record of the backlog was
    // produced, if that is before the target had the start marker: an
    // applier that starts late would otherwise be timed on a backlog
    // already in the broker (and beat `direct`, as it did in some rounds).
    // tansu misreports log ends: there, the start marker.
    let ends = (c.kind != "tansu")
        .then(|| LogEnds::new(&c.broker.addr, "rowshift.bench_kafka"))
        .transpose()?;
    let before = ends.as_ref().map(|e| e.ends()).transpose()?;
    let (t0, t1) = apply_time(c, &files.produce_only, "orders_kafka", "bench_kafka", marks).await?;
    // And it ends when every record is applied: the end marker's partition
    // can be applied before others are.
    let t1 = match &ends {
        Some(e) => {
            let all = all_applied(&c.src, e.total()?).await?;
            println!(
                "every record was applied {:.3} s after the end marker",
                all - t1
            );
            all.max(t1)
        }
        None => t1,
    };
    drop(applier);
    let first = match (&ends, &before) {
        (Some(e), Some(at)) => e.first_produced(at)?,
        _ => None,
    };
    if let Some(f) = first {
        println!(
            "the first record was produced {:.3} s before the target had the start marker",
            t0 - f
        );
    }
    let kafka = t1 - first.map_or(t0, |f| f.min(t0));
    let produced = produced.map(|h| h.join());
    if let Some(Ok(Err(e))) = &produced {
        println!("BENCH_TRACE: {e:#}");
    }
    if let Some(Ok(Ok(secs))) = produced {
        println!(
            "the broker had the whole backlog {secs:.2} s after its first record ({:.0} records/s); \
             the target had it {kafka:.2} s after the window started",
            BACKLOG as f64 / secs
        );
    }
    Ok((direct, kafka))
}

async fn lag(c: &Ctx<'_>, results: &mut Results) -> Result<()> {
    let Ctx {
        source,
        kind,
        dsn,
        files,
        work,
        src,
        ..
    } = c;
    // 3. Lag under 2,000 writes/s, through kafka and (reference) direct.
    settle_kafka(c).await?;
    let (p50, p99, max, n) = measure_lag(
        dsn,
        &files.kafka,
        "orders_kafka",
        ROWS,
        work,
        source.port,
        src,
    )
    .await?;
    wait_slot_inactive(src, "rowshift_bench_kafka").await?;
    let (d50, d99, _, _) = measure_lag(
        dsn,
        &files.direct,
        "orders_direct",
        ROWS,
        work,
        source.port,
        src,
    )
    .await?;
    results.add(
        &format!(
            "replication lag at 2,000 writes/s through {kind} (70/20/10 update/insert/delete)"
        ),
        "p99 < 500 ms",
        format!("direct transport: p50 {d50:.0} ms, p99 {d99:.0} ms"),
        format!("p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms ({n} probes)"),
    );
    Ok(())
}

/// The producer alone (`apply_in_run: false`) on one 200k-row transaction,
/// timed by the broker's log end offsets (which tansu misreports: not
/// measured there); next to it, PostgreSQL decoding the same backlog from a
/// slot of its own.
async fn producer_alone(c: &Ctx<'_>, results: &mut Results) -> Result<()> {
    let Ctx {
        broker,
        kind,
        dsn,
        files,
        work,
        src,
        ..
    } = c;
    if *kind == "tansu" {
        results.add(
            "producer alone, one 200k-row transaction",
            "≥ 50,000 events/s",
            "-".into(),
            "not measured on tansu (its log end offsets are wrong)".into(),
        );
        return Ok(());
    }
    settle_kafka(c).await?;
    src.batch_execute("CREATE PUBLICATION ref_decode FOR TABLE orders")
        .await?;
    src.batch_execute("SELECT pg_create_logical_replication_slot('ref_decode', 'pgoutput')")
        .await?;
    let ends = LogEnds::new(&broker.addr, "rowshift.bench_kafka")?;
    let before = ends.total()?;
    src.batch_execute(&format!(
        "UPDATE orders SET amount = amount + 1 WHERE id BETWEEN 1 AND {BACKLOG}"
    ))
    .await?;
    let child = rowshift(
        dsn,
        &["run", &files.produce_only],
        &work.join("produce.log"),
    )?;
    let (t0, t1) = ends.wait_for(
        before,
        BACKLOG,
        Duration::from_secs(300),
        Duration::from_millis(5),
    )?;
    drop(child);
    wait_slot_inactive(src, "rowshift_bench_kafka").await?;
    let produced = (BACKLOG - 1) as f64 / (t1 - t0).as_secs_f64();
    let t = Instant::now();
    let decoded: i64 = src
        .query_one(
            "SELECT count(*) FROM pg_logical_slot_get_binary_changes('ref_decode', NULL, NULL, \
             'proto_version', '1', 'publication_names', 'ref_decode')",
            &[],
        )
        .await?
        .get(0);
    let decode_rate = BACKLOG as f64 / t.elapsed().as_secs_f64();
    src.batch_execute("SELECT pg_drop_replication_slot('ref_decode')")
        .await?;
    src.batch_execute("DROP PUBLICATION ref_decode").await?;
    if decoded < BACKLOG {
        bail!("the reference slot decoded only {decoded} messages");
    }
    results.add(
        &format!("producer alone (source → {kind}), one 200k-row transaction"),
        "≥ 50,000 events/s",
        format!("PostgreSQL decodes it (pgoutput, no client) at {decode_rate:.0} changes/s"),
        format!("{produced:.0} events/s"),
    );

    Ok(())
}

/// Lets the kafka pipeline apply all the source holds, then empties its
/// topic: what the producer-alone and lag measurements start from.
async fn settle_kafka(c: &Ctx<'_>) -> Result<()> {
    let pipeline = [(&c.files.kafka, "rowshift_bench_kafka")];
    settle(&c.dsn, &pipeline, c.work, &c.src).await?;
    trim(c).await
}

/// Empties the bench topic (see [`LogEnds::trim`]; on noida-db only, as
/// tansu misreports log ends). Every record in it must be applied already.
async fn trim(c: &Ctx<'_>) -> Result<()> {
    if c.kind == "tansu" {
        return Ok(());
    }
    LogEnds::new(&c.broker.addr, "rowshift.bench_kafka")?
        .trim(&c.broker.addr)
        .await
}

/// Runs the pipelines until their slots' restart positions pass a fresh
/// CHECKPOINT, then stops them (see `settle_slots` in core.rs: otherwise a
/// slot re-decodes old WAL on start and the bench measures history).
async fn settle(dsn: &str, pipelines: &[(&String, &str)], work: &Path, src: &Client) -> Result<()> {
    let children: Vec<Proc> = pipelines
        .iter()
        .map(|(f, slot)| rowshift(dsn, &["run", f], &work.join(format!("settle-{slot}.log"))))
        .collect::<Result<_>>()?;
    let slots: Vec<String> = pipelines.iter().map(|(_, s)| s.to_string()).collect();
    let mark: String = src
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let t = Instant::now();
    loop {
        src.batch_execute("CHECKPOINT").await?;
        src.batch_execute("UPDATE orders SET note = 'settle' WHERE id = 3")
            .await?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let behind: i64 = src
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = ANY($2) \
                 AND restart_lsn < $1::text::pg_lsn",
                &[&mark, &slots],
            )
            .await?
            .get(0);
        if behind == 0 {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("replication slots did not settle past {mark}");
        }
    }
    drop(children);
    for slot in &slots {
        wait_slot_inactive(src, slot).await?;
    }
    src.batch_execute("CHECKPOINT").await?;
    Ok(())
}

/// When (unix seconds) `table` had the start marker and the end marker,
/// with the pipeline in `file` started on the backlog.
async fn apply_time(
    c: &Ctx<'_>,
    file: &str,
    table: &str,
    name: &str,
    (start, end): (&str, &str),
) -> Result<(f64, f64)> {
    let target = connect(&c.dsn).await?;
    let child = rowshift(
        &c.dsn,
        &["run", file],
        &c.work.join(format!("apply-{name}-{start}.log")),
    )?;
    let t0 = wait_note(&target, table, 2, start, Duration::from_secs(300)).await?;
    let t1 = wait_note(&target, table, 1, end, Duration::from_secs(900)).await?;
    drop(child);
    // The window in wall-clock seconds, to match with a CPU sampler's.
    let (t0, t1) = (unix(t0), unix(t1));
    println!("window {name}: unix {t0:.3} .. {t1:.3}");
    wait_slot_inactive(&c.src, &format!("rowshift_{name}")).await?;
    Ok((t0, t1))
}

/// When (unix seconds) the bench pipeline's appliers had applied `records`
/// records in all (their stored positions, written in the transaction that
/// applies the records).
async fn all_applied(src: &Client, records: i64) -> Result<f64> {
    let t = Instant::now();
    loop {
        let applied: i64 = src
            .query_one(
                "SELECT coalesce(sum(next_offset), 0)::bigint FROM rowshift.kafka_applied \
                 WHERE pipeline = 'bench_kafka'",
                &[],
            )
            .await?
            .get(0);
        if applied >= records {
            return Ok(unix(Instant::now()));
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("the appliers applied {applied} of {records} records");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `t` in wall-clock seconds (to match with a CPU sampler's, or with
/// record timestamps).
fn unix(t: Instant) -> f64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(0.0, |n| n.as_secs_f64() - t.elapsed().as_secs_f64())
}
