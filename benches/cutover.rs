//! Issue 3's benchmarks, each next to its reference, in one run:
//!
//! 1. verification throughput over a 2,000,000-row table and its rewrite vs
//!    PostgreSQL's own chunked checksum ceiling: a client loop of
//!    `SELECT bit_xor(hashtextextended(t::text, 0))` per 10,000-key chunk
//!    over the source and the target (run before and after ours; the mean
//!    is the reference);
//! 2. the write pause of 20 swaps (10 cut-overs, 10 rollbacks, alternating)
//!    under a steady 2,000 writes/s load through the table name, with the
//!    latency the load's clients saw in the same window.
//!
//! Run: `bash scripts/bench.sh cutover` (installs PostgreSQL if needed).

mod common;

use anyhow::{bail, Context, Result};
use common::*;
use rand::Rng;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

const ROWS: i64 = 2_000_000;
const SWAPS: usize = 20;
const WRITES_PER_S: u64 = 2_000;
const CLIENTS: u64 = 4;

const ORDERS_DDL: &str =
    "CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id bigint NOT NULL, \
    amount numeric(12,2) NOT NULL DEFAULT 0, status text NOT NULL DEFAULT 'new', note text, \
    legacy_flag boolean, created_at timestamptz NOT NULL DEFAULT now())";

const TARGET_DDL: &str = "CREATE TABLE public.orders_v2 (id bigint PRIMARY KEY, customer_id bigint NOT NULL, \
    amount_cents bigint NOT NULL DEFAULT 0, state text NOT NULL DEFAULT 'new', note text, \
    total_with_tax numeric(14,2) NOT NULL DEFAULT 0, created_at timestamptz NOT NULL DEFAULT now())";

fn pipeline(verify_workers: u32) -> String {
    orders_pipeline(
        "bench_cutover",
        TARGET_DDL,
        &format!(
            "verify: {{ chunk_rows: 10000, workers: {verify_workers} }}\n\
             cutover: {{ lock_timeout_ms: 500, max_lag_ms: 2000 }}"
        ),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    std::env::set_current_dir(env!("CARGO_MANIFEST_DIR"))?;
    let work = std::env::temp_dir().join(format!("rowshift-bench-co-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let cluster = Cluster::start(work.join("source"), free_port()?)?;
    let mut results = Results { rows: Vec::new() };
    let outcome = run(&cluster, &work, &mut results).await;
    print_table(&results);
    drop(cluster);
    match &outcome {
        Ok(()) if std::env::var("BENCH_KEEP").is_err() => {
            let _ = std::fs::remove_dir_all(&work);
        }
        _ => eprintln!("logs kept in {}", work.display()),
    }
    outcome
}

async fn run(cluster: &Cluster, work: &Path, results: &mut Results) -> Result<()> {
    let admin = connect(&cluster.dsn("postgres")).await?;
    admin
        .batch_execute("ALTER SYSTEM SET synchronous_commit = on")
        .await?;
    admin.batch_execute("SELECT pg_reload_conf()").await?;
    admin.batch_execute("CREATE DATABASE bench").await?;
    let dsn = cluster.dsn("bench");
    let src = connect(&dsn).await?;
    load_orders(&src, ORDERS_DDL, ROWS).await?;
    for w in [1u32, 2] {
        std::fs::write(work.join(format!("verify-{w}.yaml")), pipeline(w))?;
    }
    let file = work.join("verify-2.yaml");
    let file = file.to_str().context("path")?;
    let _runner = rowshift(&dsn, &["run", file], &work.join("run.log"))?;
    wait_until(
        &src,
        "the backfill to catch up",
        Duration::from_secs(900),
        "SELECT 1 FROM rowshift.pipelines WHERE name = 'bench_cutover' AND phase = 'caught_up'",
    )
    .await?;
    src.batch_execute("VACUUM ANALYZE orders_v2").await?;

    // 1. Verification vs the client checksum loop.
    let ref1 = checksum_loop(&src).await?;
    let mut ours = Vec::new();
    for w in [2u32, 1] {
        let f = work.join(format!("verify-{w}.yaml"));
        let t = Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rowshift"))
            .args(["verify", f.to_str().context("path")?])
            .env("ROWSHIFT_SOURCE_DSN", &dsn)
            .env("RUST_LOG", "warn")
            .output()?;
        let secs = t.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("verify failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        ours.push((w, secs));
    }
    let ref2 = checksum_loop(&src).await?;
    let reference = (ref1 + ref2) / 2.0;
    for (w, secs) in ours {
        results.add(
            &format!("verify 2M rows (source + target), chunks of 10,000, {w} worker(s)"),
            "≥ 0.9× reference",
            format!(
                "client bit_xor(hashtextextended(row::text)) loop {reference:.2} s ({ref1:.2} / {ref2:.2})"
            ),
            format!(
                "{secs:.2} s ({:.0} rows/s) = {:.2}×",
                ROWS as f64 / secs,
                reference / secs
            ),
        );
    }

    // 2. Write pause over 20 alternating swaps under 2,000 writes/s.
    let load = Load::start(&dsn).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let window_start = Instant::now();
    let mut pauses = Vec::new();
    for i in 0..SWAPS {
        wait_stream_current(&src).await?;
        let cmd = if i % 2 == 0 { "cutover" } else { "rollback" };
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rowshift"))
            .args([cmd, file])
            .env("ROWSHIFT_SOURCE_DSN", &dsn)
            .env("RUST_LOG", "warn")
            .output()?;
        if !out.status.success() {
            bail!("{cmd} {i} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let pause: f64 = src
            .query_one(
                "SELECT pause_ms FROM rowshift.cutovers WHERE outcome = 'done' ORDER BY id DESC LIMIT 1",
                &[],
            )
            .await?
            .get(0);
        println!("{cmd} {}: write pause {pause:.1} ms", i / 2 + 1);
        pauses.push(pause);
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let window = window_start.elapsed();
    let (latencies, errors, done) = load.stop().await?;
    if errors > 0 {
        bail!("the load saw {errors} errors during the swaps");
    }
    let in_window: Vec<f64> = latencies
        .iter()
        .filter(|(at, _)| *at >= window_start && *at <= window_start + window)
        .map(|(_, l)| *l)
        .collect();
    let (p50, p99, max) = percentiles(pauses.clone());
    let (l50, l99, lmax) = percentiles(in_window.clone());
    results.add(
        &format!("write pause at cut-over/rollback under {WRITES_PER_S} writes/s ({SWAPS} swaps)"),
        "p99 < 100 ms",
        format!(
            "load clients saw p50 {l50:.1} ms, p99 {l99:.1} ms, max {lmax:.1} ms ({} writes in the window, {done} in all, 0 errors)",
            in_window.len()
        ),
        format!("pause p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms"),
    );
    Ok(())
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    (pct(0.5), pct(0.99), pct(1.0))
}

/// The reference: one client, chunk by chunk, source then target.
async fn checksum_loop(c: &Client) -> Result<f64> {
    let src = c
        .prepare("SELECT bit_xor(hashtextextended(o::text, 0)) FROM orders o WHERE id > $1 AND id <= $1 + 10000")
        .await?;
    let tgt = c
        .prepare("SELECT bit_xor(hashtextextended(t::text, 0)) FROM orders_v2 t WHERE id > $1 AND id <= $1 + 10000")
        .await?;
    let t = Instant::now();
    let mut lo = 0i64;
    while lo < ROWS {
        c.query_one(&src, &[&lo]).await?;
        c.query_one(&tgt, &[&lo]).await?;
        lo += 10_000;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Polls until `sql` returns a row.
async fn wait_until(c: &Client, what: &str, limit: Duration, sql: &str) -> Result<()> {
    let t = Instant::now();
    // Errors count as "not yet" (the state schema appears during the run).
    while c.query_opt(sql, &[]).await.ok().flatten().is_none() {
        if t.elapsed() > limit {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Waits until the active stream applied everything written so far.
async fn wait_stream_current(c: &Client) -> Result<()> {
    let lsn: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let t = Instant::now();
    loop {
        let ok = c
            .query_opt(
                "SELECT 1 FROM rowshift.pipelines WHERE name = 'bench_cutover' AND \
                 CASE WHEN direction = 'forward' THEN applied_lsn ELSE rev_applied_lsn END >= $1::text::pg_lsn",
                &[&lsn],
            )
            .await?
            .is_some();
        if ok {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the active stream did not catch up");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// When a write started and how long it took (ms).
type Sample = (Instant, f64);

/// Clients writing through the table name at a fixed total rate (70 %
/// updates, 20 % inserts, 10 % deletes, on columns both shapes have),
/// recording when each write started and how long it took.
struct Load {
    stop: Arc<AtomicBool>,
    handles: Vec<tokio::task::JoinHandle<Result<Vec<Sample>>>>,
    errors: Arc<AtomicU64>,
    first_error: Arc<Mutex<Option<String>>>,
}

impl Load {
    async fn start(dsn: &str) -> Result<Load> {
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(AtomicU64::new(0));
        let first_error = Arc::new(Mutex::new(None::<String>));
        let mut handles = Vec::new();
        for _ in 0..CLIENTS {
            let c = connect(dsn).await?;
            let (stop, errors, first_error) = (stop.clone(), errors.clone(), first_error.clone());
            handles.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_micros(
                    1_000_000 * CLIENTS / WRITES_PER_S,
                ));
                let mut out = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let (op, id) = {
                        let mut rng = rand::thread_rng();
                        (rng.gen_range(0..10), rng.gen_range(3..ROWS))
                    };
                    let t = Instant::now();
                    let r = match op {
                        0..=6 => {
                            c.execute("UPDATE orders SET note = 'load' WHERE id = $1", &[&id])
                                .await
                        }
                        7 | 8 => {
                            c.execute(
                                "INSERT INTO orders (customer_id, note) VALUES ($1, 'load')",
                                &[&id],
                            )
                            .await
                        }
                        _ => c.execute("DELETE FROM orders WHERE id = $1", &[&id]).await,
                    };
                    if let Err(e) = r {
                        errors.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut f) = first_error.lock() {
                            f.get_or_insert(e.to_string());
                        }
                    }
                    out.push((t, t.elapsed().as_secs_f64() * 1000.0));
                }
                Ok(out)
            }));
        }
        Ok(Load {
            stop,
            handles,
            errors,
            first_error,
        })
    }

    async fn stop(self) -> Result<(Vec<(Instant, f64)>, u64, usize)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(Some(e)) = self.first_error.lock().map(|f| f.clone()) {
            eprintln!("first load error: {e}");
        }
        let mut all = Vec::new();
        for h in self.handles {
            all.extend(h.await??);
        }
        let n = all.len();
        Ok((all, self.errors.load(Ordering::Relaxed), n))
    }
}
