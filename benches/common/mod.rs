//! Helpers shared by the benchmark harnesses: throwaway clusters, child
//! processes killed on drop, pgbench, and the results table.

#![allow(dead_code)]

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
}

impl Cluster {
    pub fn start(dir: PathBuf, port: u16) -> Result<Cluster> {
        let status = Command::new("scripts/pg.sh")
            .arg("start")
            .arg(&dir)
            .arg(port.to_string())
            .arg("logical")
            .status()?;
        if !status.success() {
            bail!("could not start PostgreSQL in {}", dir.display());
        }
        Ok(Cluster { dir, port })
    }
    pub fn dsn(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db}",
            self.port
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("scripts/pg.sh")
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

pub async fn connect(dsn: &str) -> Result<Client> {
    let (client, conn) = tokio_postgres::connect(dsn, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A child process killed when dropped, so a failing bench leaves none behind.
/// A `perf record` for profiling a measured window, when `var` names an
/// output directory (`BENCH_PERF=DIR`: the whole machine, both sides;
/// `BENCH_PERF_DWARF=DIR`: rowshift alone, with DWARF call stacks). It stops
/// (SIGINT, so perf writes its file) when dropped.
pub struct Profile(Child);

pub fn profile(var: &str, name: &str, target: &[&str]) -> Option<Profile> {
    let dir = std::env::var(var).ok()?;
    let child = Command::new("perf")
        .arg("record")
        .args(target)
        .arg("-o")
        .arg(format!("{dir}/{name}.data"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| eprintln!("{var}: perf did not start ({e}); not profiling {name}"))
        .ok()?;
    // perf needs a moment before it records.
    std::thread::sleep(std::time::Duration::from_millis(300));
    Some(Profile(child))
}

impl Drop for Profile {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

pub struct Proc(pub Child);

impl Proc {
    pub fn id(&self) -> u32 {
        self.0.id()
    }
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.0.try_wait()
    }
}

impl Drop for Proc {
    /// Stops the process as an operator would (SIGTERM: rowshift leaves its
    /// consumer group and releases the slot), and kills it after 15 s.
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.0.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let until = Instant::now() + Duration::from_secs(15);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn rowshift(dsn: &str, args: &[&str], log: &Path) -> Result<Proc> {
    let log = std::fs::File::create(log)?;
    Ok(Command::new(env!("CARGO_BIN_EXE_rowshift"))
        .args(args)
        .env("ROWSHIFT_SOURCE_DSN", dsn)
        .env(
            "RUST_LOG",
            std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .map(Proc)?)
}

/// pgbench on the `bench` database; the scripts pick ids up to `max_id`.
pub fn pgbench(port: u16, max_id: i64, args: &[&str]) -> Result<Proc> {
    Ok(Command::new("/usr/lib/postgresql/15/bin/pgbench")
        .args([
            "-n",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "bench",
            "-D",
            &format!("maxid={max_id}"),
        ])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Proc)?)
}

pub struct Results {
    pub rows: Vec<(String, String, String, String)>,
}

impl Results {
    pub fn add(&mut self, what: &str, target: &str, reference: String, ours: String) {
        println!("{what}: rowshift {ours}; reference {reference} (target {target})");
        self.rows
            .push((what.into(), target.into(), reference, ours));
    }
}

/// Prints the results as a Markdown table (for docs/benchmarks.md).
pub fn print_table(results: &Results) {
    println!("\n| measure | target | reference | rowshift |\n|---|---|---|---|");
    for (what, target, reference, ours) in &results.rows {
        println!("| {what} | {target} | {reference} | {ours} |");
    }
}

/// The benchmarks' pipeline over `orders`: the demo's mapping (numeric to
/// cents, a rename, a dropped column, a computed column) with its inverse;
/// `extra` adds top-level sections; `BENCH_BACKFILL` adds backfill settings
/// (for trials, e.g. `defer_indexes: false`).
pub fn orders_pipeline(name: &str, target_ddl: &str, extra: &str) -> String {
    let backfill = std::env::var("BENCH_BACKFILL")
        .map(|b| format!(", {b}"))
        .unwrap_or_default();
    format!(
        r#"name: {name}
source: {{ dsn_env: ROWSHIFT_SOURCE_DSN, table: public.orders }}
target:
  table: public.orders_v2
  ddl: "{target_ddl}"
mapping:
  columns:
    - id
    - customer_id
    - {{ target: amount_cents, expr: "round(amount * 100)::bigint" }}
    - {{ target: state, from: status }}
    - note
    - {{ target: total_with_tax, expr: "round(amount * 1.2, 2)" }}
    - created_at
  drop: [legacy_flag]
  inverse:
    amount: "amount_cents / 100.0"
backfill: {{ chunk_rows: 20000, workers: 2{backfill} }}
{extra}
"#
    )
}

/// Creates `orders` with `ddl` and fills it with `rows` rows of about 240
/// bytes (the benchmarks' table), then vacuums and analyzes it.
pub async fn load_orders(src: &Client, ddl: &str, rows: i64) -> Result<()> {
    println!("loading {rows} rows ...");
    src.batch_execute(&format!(
        "{ddl};
         INSERT INTO orders (customer_id, amount, status, note, legacy_flag, created_at)
         SELECT g % 10000, (g % 100000) / 100.0, (ARRAY['new','paid','shipped'])[1 + g % 3],
                rpad('order ' || g || ' ', 170, 'lorem ipsum dolor sit amet '), g % 2 = 0, now() - g * interval '1 second'
         FROM generate_series(1, {rows}) g;"
    ))
    .await?;
    src.batch_execute("VACUUM ANALYZE orders").await?;
    Ok(())
}

/// Polls until `SELECT note FROM <table> WHERE id = <id>` equals `want`.
pub async fn wait_note(
    c: &Client,
    table: &str,
    id: i64,
    want: &str,
    limit: Duration,
) -> Result<Instant> {
    let sql = format!("SELECT note FROM {table} WHERE id = $1");
    let stmt = c.prepare(&sql).await?;
    let start = Instant::now();
    loop {
        let row = c.query_opt(&stmt, &[&id]).await?;
        if row.and_then(|r| r.get::<_, Option<String>>(0)).as_deref() == Some(want) {
            return Ok(Instant::now());
        }
        if start.elapsed() > limit {
            bail!("{table}: id {id} did not become {want:?} within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn wait_slot_inactive(src: &Client, slot: &str) -> Result<()> {
    let t = Instant::now();
    loop {
        let active: bool = src
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?
            .map(|r| r.get(0))
            .unwrap_or(false);
        if !active {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("slot {slot} stayed active");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Replication lag of the pipeline in `file` into `target_table`: probe
/// updates every 20 ms while pgbench writes 2,000 statements/s (70 %
/// updates, 20 % inserts, 10 % deletes); (p50, p99, max, probes) in ms.
pub async fn measure_lag(
    dsn: &str,
    file: &str,
    target_table: &str,
    max_id: i64,
    work: &Path,
    port: u16,
    src: &Client,
) -> Result<(f64, f64, f64, usize)> {
    let target = connect(dsn).await?;
    let child = rowshift(dsn, &["run", file], &work.join("lag.log"))?;
    src.batch_execute("UPDATE orders SET note = 'lag-ready' WHERE id = 1")
        .await?;
    wait_note(
        &target,
        target_table,
        1,
        "lag-ready",
        Duration::from_secs(300),
    )
    .await?;
    let mut load = pgbench(
        port,
        max_id,
        &[
            "-c",
            "4",
            "-j",
            "2",
            "-R",
            "2000",
            "-T",
            "32",
            "-f",
            "benches/sql/update.sql@7",
            "-f",
            "benches/sql/insert.sql@2",
            "-f",
            "benches/sql/delete.sql@1",
        ],
    )?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut samples = Vec::new();
    let until = Instant::now() + Duration::from_secs(28);
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        let note = format!("probe-{n}");
        src.execute("UPDATE orders SET note = $1 WHERE id = 1", &[&note])
            .await?;
        let committed = Instant::now();
        let seen = wait_note(&target, target_table, 1, &note, Duration::from_secs(30)).await?;
        samples.push((seen - committed).as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = load.0.wait();
    drop(child);
    samples.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
    Ok((pct(0.5), pct(0.99), pct(1.0), samples.len()))
}

/// A backlog of `n` single-row `UPDATE`s (pgbench, 2 clients, ids up to
/// `max_id`) between two markers: note `start` on id 2, then `end` on id 1.
pub async fn single_row_backlog(
    src: &Client,
    port: u16,
    max_id: i64,
    n: i64,
    (start, end): (&str, &str),
) -> Result<()> {
    println!("building a backlog of {n} single-row transactions ...");
    src.execute("UPDATE orders SET note = $1 WHERE id = 2", &[&start])
        .await?;
    let per_client = (n / 2).to_string();
    let mut load = pgbench(
        port,
        max_id,
        &[
            "-c",
            "2",
            "-j",
            "2",
            "-t",
            &per_client,
            "-f",
            "benches/sql/update.sql",
        ],
    )?;
    if !load.0.wait()?.success() {
        bail!("pgbench failed");
    }
    src.execute("UPDATE orders SET note = $1 WHERE id = 1", &[&end])
        .await?;
    Ok(())
}
