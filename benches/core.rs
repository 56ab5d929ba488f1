//! Issue 2's benchmarks, each next to the reference it names, in one run:
//!
//! 1. backfill of a 2,000,000-row `orders` table vs one `INSERT INTO target
//!    SELECT <mapping> FROM orders` (the server's own ceiling), back to back;
//!    peak RSS of the rowshift process during that backfill;
//! 2. stream apply of a backlog of 200,000 single-row transactions, and of one
//!    200,000-row transaction, vs PostgreSQL's built-in logical replication
//!    (a subscription in a second cluster) applying the same backlog;
//! 3. replication lag (p50/p99/max) under a steady 2,000 writes/s pgbench load
//!    (70 % updates, 20 % inserts, 10 % deletes) after the backfill.
//!
//! `BENCH_ROUNDS=N` (default 1) repeats each pair N times and reports the
//! round with the median ratio, with every round's ratio. The order within a
//! pair alternates: the reference first in odd rounds, rowshift first in
//! even ones.
//!
//! Apply rates are timed between a start marker and an end marker becoming
//! visible in each target (so neither side's start-up is counted). Lag is
//! timed by probe updates: commit on the source, poll until visible.
//!
//! `BENCH_PERF=DIR` records `perf` over each side's apply window (the whole
//! machine), `BENCH_PERF_DWARF=DIR` over rowshift's alone, with call stacks.
//!
//! Run: `bash scripts/bench.sh` (installs PostgreSQL if needed). Results are
//! printed as a Markdown table for docs/benchmarks.md.

mod common;

use anyhow::{bail, Context, Result};
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

const ROWS: i64 = 2_000_000;
const BACKLOG: i64 = 200_000;

const ORDERS_DDL: &str =
    "CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id bigint NOT NULL, \
    amount numeric(12,2) NOT NULL, status text NOT NULL, note text, legacy_flag boolean, \
    created_at timestamptz NOT NULL DEFAULT now())";

const TARGET_DDL: &str = "CREATE TABLE public.orders_v2 (id bigint PRIMARY KEY, customer_id bigint NOT NULL, \
    amount_cents bigint NOT NULL, state text NOT NULL, note text, total_with_tax numeric(14,2) NOT NULL, \
    created_at timestamptz NOT NULL)";

const MAPPED: &str = "SELECT id, customer_id, round(amount * 100)::bigint, status, note, round(amount * 1.2, 2), created_at FROM orders";

/// The bench's pipeline; `BENCH_TRANSPORT` adds transport settings (for
/// trials, e.g. `queue_batches: 1`).
fn pipeline(apply_workers: usize) -> String {
    let extra = std::env::var("BENCH_TRANSPORT")
        .map(|t| format!(", {t}"))
        .unwrap_or_default();
    orders_pipeline(
        "bench_orders",
        TARGET_DDL,
        &format!(
            "transport: {{ kind: direct, batch_events: 10000, apply_workers: {apply_workers}{extra} }}"
        ),
    )
}

/// Peak resident set (VmHWM) of a running process, in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    std::env::set_current_dir(env!("CARGO_MANIFEST_DIR"))?;
    let work = std::env::temp_dir().join(format!("rowshift-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let source = Cluster::start(work.join("source"), free_port()?)?;
    let subscriber = Cluster::start(work.join("subscriber"), free_port()?)?;
    let mut results = Results { rows: Vec::new() };
    let outcome = run(&source, &subscriber, &work, &mut results).await;
    print_table(&results);
    drop(subscriber);
    drop(source);
    match &outcome {
        Ok(()) if std::env::var("BENCH_KEEP").is_err() => {
            let _ = std::fs::remove_dir_all(&work);
        }
        Ok(()) => eprintln!("logs kept in {}", work.display()),
        Err(_) => eprintln!("logs kept in {}", work.display()),
    }
    outcome
}

async fn run(
    source: &Cluster,
    subscriber: &Cluster,
    work: &Path,
    results: &mut Results,
) -> Result<()> {
    let admin = connect(&source.dsn("postgres")).await?;
    // The test clusters run with synchronous_commit = off for speed; a logical
    // walsender only sends flushed WAL, so that would add up to the WAL
    // writer's 200 ms to every change. Measure with the durable default.
    for cluster in [source, subscriber] {
        let c = connect(&cluster.dsn("postgres")).await?;
        c.batch_execute("ALTER SYSTEM SET synchronous_commit = on")
            .await?;
        c.batch_execute("SELECT pg_reload_conf()").await?;
    }
    admin.batch_execute("CREATE DATABASE bench").await?;
    let src = connect(&source.dsn("bench")).await?;
    let dsn = source.dsn("bench");
    load_orders(&src, ORDERS_DDL, ROWS).await?;
    // Autovacuum after the backlogs would steal CPU from whichever consumer runs first.
    src.batch_execute("ALTER TABLE orders SET (autovacuum_enabled = false)")
        .await?;
    let bytes: i64 = src
        .query_one(
            "SELECT pg_relation_size('orders') / count(*) FROM orders",
            &[],
        )
        .await?
        .get(0);
    println!("orders: {ROWS} rows, ~{bytes} bytes a row on disk");

    // `BENCH_ONLY=large`: one backfill round, then the one-transaction apply
    // measures alone (for trials of that figure).
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let large_only = only == "large";

    // 1. Backfill vs INSERT ... SELECT, back to back, `BENCH_ROUNDS` times.
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let file = work.join("bench.yaml");
    std::fs::write(&file, pipeline(1))?;
    let file_arg = file.to_str().context("path")?;
    // One untimed pass of the reference first: the first 2M-row write after
    // the load ran up to 1.5x slower than later ones (new WAL segments,
    // cold caches), and it fell on the reference, which opens round 1.
    reference_insert(&src).await?;
    // No autovacuum during the backfill rounds: a vacuum of the table one
    // side just wrote ran into the other side's timed window.
    set_autovacuum(&src, false).await?;
    let mut backfills = Vec::new();
    let mut peak = 0.0f64;
    for round in 1..=if large_only { 1 } else { rounds } {
        let (ours, theirs, round_peak) =
            measure_backfill(&src, &dsn, file_arg, work, round).await?;
        peak = peak.max(round_peak);
        backfills.push((ours, theirs));
    }
    set_autovacuum(&src, true).await?;
    if only != "backfill" {
        // The apply and lag measures run on a backfilled pipeline (untimed).
        rowshift_backfill(&src, &dsn, file_arg, work, 0, false).await?;
    }
    let (secs, reference, all) = median_round(&backfills);
    results.add(
        &format!("backfill, 2M rows, unthrottled{all}"),
        "≥ 0.9× reference",
        format!(
            "INSERT … SELECT {reference:.2} s ({:.0} rows/s)",
            ROWS as f64 / reference
        ),
        format!(
            "{secs:.2} s ({:.0} rows/s) = {:.2}×",
            ROWS as f64 / secs,
            reference / secs
        ),
    );
    results.add(
        "peak RSS during the 2M-row backfill",
        "< 150 MB",
        "-".into(),
        format!("{peak:.1} MiB"),
    );
    // `BENCH_ONLY=backfill`: the backfill rounds alone.
    if only == "backfill" {
        return Ok(());
    }

    // The built-in reference: a subscription in the second cluster (initial copy not timed).
    let sub_admin = connect(&subscriber.dsn("postgres")).await?;
    sub_admin.batch_execute("CREATE DATABASE bench").await?;
    let sub = connect(&subscriber.dsn("bench")).await?;
    sub.batch_execute(ORDERS_DDL).await?;
    sub.batch_execute("ALTER TABLE orders SET (autovacuum_enabled = false)")
        .await?;
    src.batch_execute("ALTER TABLE orders_v2 SET (autovacuum_enabled = false)")
        .await?;
    src.batch_execute("CREATE PUBLICATION ref_pub FOR TABLE orders")
        .await?;
    sub.batch_execute(&format!(
        "CREATE SUBSCRIPTION ref_sub CONNECTION '{dsn}' PUBLICATION ref_pub"
    ))
    .await?;
    let t = Instant::now();
    loop {
        let pending: i64 = sub
            .query_one(
                "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'",
                &[],
            )
            .await?
            .get(0);
        if pending == 0 {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("the subscription's initial copy did not finish");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sub.batch_execute("ALTER SUBSCRIPTION ref_sub DISABLE")
        .await?;
    wait_slot_inactive(&src, "ref_sub").await?;

    // 2. Apply rates, with one apply connection and with two (the default is
    //    half the cores: on 2 cores a second applier competes with the walsender).
    for workers in [1usize, 2] {
        let wfile = work.join(format!("bench-{workers}.yaml"));
        std::fs::write(&wfile, pipeline(workers))?;
        let wfile = wfile.to_str().context("path")?;

        // Each measure `BENCH_ROUNDS` times (default 1); the median round by
        // ratio is reported, with every round's ratio.
        let mut single = Vec::new();
        let mut large = Vec::new();
        for round in 1..=rounds {
            let tag = |n: u32| format!("{n}w{workers}r{round}");
            // 2a. A backlog of single-row transactions, built while both consumers are stopped.
            if !large_only {
                settle_slots(&dsn, wfile, work, &src, &sub).await?;
                single_row_backlog(
                    &src,
                    source.port,
                    ROWS,
                    BACKLOG,
                    (&format!("start-{}", tag(1)), &format!("end-{}", tag(1))),
                )
                .await?;
                single.push(
                    measure_apply(&dsn, wfile, work, &src, &sub, &tag(1), round % 2 == 1).await?,
                );
            }

            // 2b. One transaction of 200k rows (bracketed by markers).
            settle_slots(&dsn, wfile, work, &src, &sub).await?;
            src.batch_execute(&format!(
                "UPDATE orders SET note = 'start-{}' WHERE id = 2",
                tag(2)
            ))
            .await?;
            src.batch_execute(&format!(
                "BEGIN; UPDATE orders SET amount = amount + 1 WHERE id BETWEEN 3 AND {}; \
                 UPDATE orders SET note = 'end-{}' WHERE id = 1; COMMIT",
                BACKLOG + 1,
                tag(2)
            ))
            .await?;
            large
                .push(measure_apply(&dsn, wfile, work, &src, &sub, &tag(2), round % 2 == 1).await?);
        }
        if !large_only {
            let (ours, theirs, all) = median_round(&single);
            results.add(
                &format!(
                    "stream apply, 200k single-row transactions, apply_workers {workers}{all}"
                ),
                "≥ 1.2× reference",
                format!(
                    "built-in logical replication {:.0} tx/s",
                    BACKLOG as f64 / theirs
                ),
                format!("{:.0} tx/s = {:.2}×", BACKLOG as f64 / ours, theirs / ours),
            );
        }
        let (ours, theirs, all) = median_round(&large);
        results.add(
            &format!("stream apply, one 200k-row transaction, apply_workers {workers}{all}"),
            "≥ 1.5× reference",
            format!(
                "built-in logical replication {:.0} rows/s",
                BACKLOG as f64 / theirs
            ),
            format!(
                "{:.0} rows/s = {:.2}×",
                BACKLOG as f64 / ours,
                theirs / ours
            ),
        );
    }

    // 3. Lag under a steady 2,000 writes/s after the backfill.
    if large_only {
        return Ok(());
    }
    let (p50, p99, max, n) =
        measure_lag(&dsn, file_arg, "orders_v2", ROWS, work, source.port, &src).await?;
    results.add(
        "replication lag at 2,000 writes/s (70/20/10 update/insert/delete)",
        "p99 < 200 ms",
        "-".into(),
        format!("p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms ({n} probes)"),
    );
    Ok(())
}

/// One round of the backfill measure: `INSERT ... SELECT` into a scratch
/// table and rowshift's backfill of the same rows, each after a CHECKPOINT;
/// the reference goes first in odd rounds and second in even ones, so that
/// neither side always inherits the other's dirty buffers. Returns
/// (rowshift's seconds, the reference's seconds, rowshift's peak RSS in MiB).
async fn measure_backfill(
    src: &Client,
    dsn: &str,
    file: &str,
    work: &Path,
    round: usize,
) -> Result<(f64, f64, f64)> {
    let (secs, reference, peak) = if round % 2 == 1 {
        let reference = reference_insert(src).await?;
        let (secs, peak) = rowshift_backfill(src, dsn, file, work, round, true).await?;
        (secs, reference, peak)
    } else {
        let (secs, peak) = rowshift_backfill(src, dsn, file, work, round, true).await?;
        (secs, reference_insert(src).await?, peak)
    };
    println!("backfill round {round}: rowshift {secs:.2} s, INSERT … SELECT {reference:.2} s");
    Ok((secs, reference, peak))
}

/// rowshift's backfill, after a CHECKPOINT, timed by the server. Returns
/// (its seconds, the process's peak RSS in MiB). With `abort` the pipeline
/// is removed after (target, slot, publication, state), as the reference
/// drops its table: a slot left behind holds the WAL it wrote, so the other
/// side could not reuse those segments and had to create new ones.
async fn rowshift_backfill(
    src: &Client,
    dsn: &str,
    file: &str,
    work: &Path,
    round: usize,
    abort: bool,
) -> Result<(f64, f64)> {
    quiesce(src).await?;
    let log = work.join(format!("backfill-{round}.log"));
    let mut child = rowshift(dsn, &["run", file, "--exit-when-caught-up"], &log)?;
    let mut peak = 0.0f64;
    let status = loop {
        if let Some(p) = peak_rss_mib(child.id()) {
            peak = peak.max(p);
        }
        if let Some(s) = child.try_wait()? {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if !status.success() {
        bail!("rowshift run failed; see {}", log.display());
    }
    let secs: f64 = src
        .query_one(
            "SELECT extract(epoch FROM backfill_finished_at - backfill_started_at)::float8 FROM rowshift.pipelines WHERE name = 'bench_orders'",
            &[],
        )
        .await?
        .get(0);
    if abort {
        let log = work.join(format!("abort-{round}.log"));
        if !rowshift(dsn, &["abort", "bench_orders"], &log)?
            .0
            .wait()?
            .success()
        {
            bail!("rowshift abort failed; see {}", log.display());
        }
    }
    Ok((secs, peak))
}

/// The reference: after a CHECKPOINT, one `INSERT ... SELECT` of the
/// mapped rows into a scratch table, which is dropped after. Returns the
/// INSERT's seconds.
async fn reference_insert(src: &Client) -> Result<f64> {
    quiesce(src).await?;
    src.batch_execute(&TARGET_DDL.replace("public.orders_v2", "ref_v2"))
        .await?;
    let t = Instant::now();
    src.batch_execute(&format!("INSERT INTO ref_v2 {MAPPED}"))
        .await?;
    let secs = t.elapsed().as_secs_f64();
    src.batch_execute("DROP TABLE ref_v2").await?;
    Ok(secs)
}

/// Before each timed backfill side: a CHECKPOINT, then `sync`, so neither
/// side inherits the other's dirty buffers or the kernel's writeback of them
/// (the clusters run with `fsync = off`, so a CHECKPOINT alone leaves the
/// pages dirty in the page cache).
async fn quiesce(src: &Client) -> Result<()> {
    src.batch_execute("CHECKPOINT").await?;
    if !std::process::Command::new("sync").status()?.success() {
        bail!("sync failed");
    }
    Ok(())
}

/// Turns the source cluster's autovacuum on or off.
async fn set_autovacuum(src: &Client, on: bool) -> Result<()> {
    // ALTER SYSTEM cannot share a multi-statement query (an implicit transaction).
    src.batch_execute(&format!(
        "ALTER SYSTEM SET autovacuum = {}",
        if on { "on" } else { "off" }
    ))
    .await?;
    src.batch_execute("SELECT pg_reload_conf()").await?;
    Ok(())
}

/// The round with the median ratio (reference seconds over rowshift's), as
/// (rowshift's seconds, the reference's seconds, a note listing every
/// round's ratio when there was more than one).
fn median_round(rounds: &[(f64, f64)]) -> (f64, f64, String) {
    let mut sorted = rounds.to_vec();
    sorted.sort_by(|a, b| (a.1 / a.0).total_cmp(&(b.1 / b.0)));
    // The lower middle for an even count.
    let (ours, theirs) = sorted[(sorted.len() - 1) / 2];
    let note = if sorted.len() > 1 {
        let all: Vec<String> = sorted
            .iter()
            .map(|(o, t)| format!("{:.2}", t / o))
            .collect();
        format!(" (median of {} rounds: {})", sorted.len(), all.join(", "))
    } else {
        String::new()
    };
    (ours, theirs, note)
}

/// Runs both consumers until both slots' restart positions pass a fresh
/// CHECKPOINT (which logs the running transactions that restart positions
/// move on), then stops both. Without it the slot whose restart position lags
/// re-decodes old WAL on start, which measures history instead of apply.
async fn settle_slots(
    dsn: &str,
    file: &str,
    work: &Path,
    src: &Client,
    sub: &Client,
) -> Result<()> {
    let child = rowshift(dsn, &["run", file], &work.join("settle.log"))?;
    sub.batch_execute("ALTER SUBSCRIPTION ref_sub ENABLE")
        .await?;
    // One fixed mark, taken first: the CHECKPOINTs' running-transactions
    // records, which restart positions move to, then lie after it.
    let mark: String = src
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let t = Instant::now();
    loop {
        src.batch_execute("CHECKPOINT").await?;
        // A built-in subscriber confirms only commit positions it applied.
        src.batch_execute("UPDATE orders SET note = 'settle' WHERE id = 3")
            .await?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let behind: i64 = src
            .query_one(
                "SELECT count(*) FROM pg_replication_slots \
                 WHERE slot_name IN ('ref_sub', 'rowshift_bench_orders') AND restart_lsn < $1::text::pg_lsn",
                &[&mark],
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
    drop(child);
    sub.batch_execute("ALTER SUBSCRIPTION ref_sub DISABLE")
        .await?;
    wait_slot_inactive(src, "ref_sub").await?;
    wait_slot_inactive(src, "rowshift_bench_orders").await?;
    src.batch_execute("CHECKPOINT").await?;
    Ok(())
}

/// Seconds from the start marker to the end marker, for rowshift and for
/// the subscription, consuming the same backlog back to back: rowshift
/// first when `ours_first`, else the subscription first (the rounds
/// alternate, so that neither side always runs second on a source cluster
/// the other has just written to).
async fn measure_apply(
    dsn: &str,
    file: &str,
    work: &Path,
    src: &Client,
    sub: &Client,
    tag: &str,
    ours_first: bool,
) -> Result<(f64, f64)> {
    let start = format!("start-{tag}");
    let end = format!("end-{tag}");
    let target = connect(dsn).await?;
    let mut ours = 0.0;
    let mut theirs = 0.0;
    for turn in [ours_first, !ours_first] {
        let side = if turn { "ours" } else { "ref" };
        let _machine = profile(
            "BENCH_PERF",
            &format!("{side}-{tag}"),
            &["-a", "-g", "-F", "999"],
        );
        if turn {
            let child = rowshift(dsn, &["run", file], &work.join(format!("apply-{tag}.log")))?;
            let pid = child.id().to_string();
            let ours_only = profile(
                "BENCH_PERF_DWARF",
                &format!("dwarf-{tag}"),
                &["--call-graph", "dwarf,16384", "-F", "499", "-p", &pid],
            );
            let t0 = wait_note(&target, "orders_v2", 2, &start, Duration::from_secs(300)).await?;
            let t1 = wait_note(&target, "orders_v2", 1, &end, Duration::from_secs(600)).await?;
            drop(ours_only);
            drop(child);
            wait_slot_inactive(src, "rowshift_bench_orders").await?;
            ours = (t1 - t0).as_secs_f64();
        } else {
            sub.batch_execute("ALTER SUBSCRIPTION ref_sub ENABLE")
                .await?;
            let s0 = wait_note(sub, "orders", 2, &start, Duration::from_secs(300)).await?;
            let s1 = wait_note(sub, "orders", 1, &end, Duration::from_secs(900)).await?;
            sub.batch_execute("ALTER SUBSCRIPTION ref_sub DISABLE")
                .await?;
            wait_slot_inactive(src, "ref_sub").await?;
            theirs = (s1 - s0).as_secs_f64();
        }
    }
    println!("apply {tag}: rowshift {ours:.2} s, built-in {theirs:.2} s");
    Ok((ours, theirs))
}
