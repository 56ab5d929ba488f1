//! Test harness: the PostgreSQL clusters are started by scripts/test.sh
//! (ports in ROWSHIFT_TEST_PG_PORT and ROWSHIFT_TEST_PG_REPLICA_PORT); each
//! test gets its own database with a random name, and runs the real
//! `rowshift` binary as a child process (so it can be killed with SIGKILL).

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

pub fn port(var: &str) -> u16 {
    std::env::var(var)
        .unwrap_or_else(|_| {
            panic!(
                "{var} is not set: run the tests through scripts/test.sh, which starts PostgreSQL"
            )
        })
        .parse()
        .expect("port number")
}

pub fn dsn(port: u16, db: &str) -> String {
    format!("host=127.0.0.1 port={port} user=postgres dbname={db}")
}

pub async fn connect(dsn: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(dsn, NoTls).await.expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A fresh database on the cluster at `port_var`.
pub struct TestDb {
    /// Random per-test suffix: slots are cluster-wide, so names must be unique.
    pub tag: String,
    pub dsn: String,
    pub dir: PathBuf,
}

impl TestDb {
    pub async fn new(port_var: &str) -> TestDb {
        let port = port(port_var);
        let tag = format!("{:08x}", rand::random::<u32>());
        let name = format!("t_{tag}");
        let admin = connect(&dsn(port, "postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        let dir = std::env::temp_dir().join(format!("rowshift-{name}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TestDb {
            dsn: dsn(port, &name),
            dir,
            tag,
        }
    }

    pub async fn client(&self) -> Client {
        connect(&self.dsn).await
    }

    /// Writes a pipeline file for this database.
    pub fn pipeline(&self, file: &str, yaml: &str) -> PathBuf {
        let path = self.dir.join(file);
        std::fs::write(&path, yaml).expect("write pipeline");
        path
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_rowshift"));
        c.args(args)
            .env("ROWSHIFT_SOURCE_DSN", &self.dsn)
            // ROWSHIFT_TEST_LOG: the spawned processes' log filter, when
            // a test needs more (e.g. `info,librdkafka=debug`).
            .env(
                "RUST_LOG",
                std::env::var("ROWSHIFT_TEST_LOG")
                    .unwrap_or_else(|_| "info,pg_walstream=warn".into()),
            );
        c
    }

    /// Runs rowshift to completion.
    pub fn rowshift(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run rowshift")
    }

    /// Starts `rowshift run FILE` in the background (logs to a file in the test dir).
    pub fn spawn_run(&self, file: &std::path::Path, tag: &str) -> Proc {
        self.spawn(&["run", file.to_str().expect("utf-8 path")], tag)
    }

    /// Starts `rowshift ARGS` in the background (logs to a file in the test dir).
    pub fn spawn(&self, args: &[&str], tag: &str) -> Proc {
        self.spawn_with(args, tag, &[])
    }

    /// As [`Self::spawn`], with extra environment variables.
    pub fn spawn_with(&self, args: &[&str], tag: &str, env: &[(&str, &str)]) -> Proc {
        let log = std::fs::File::create(self.dir.join(format!("run-{tag}.log"))).expect("log file");
        self.command(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .map(Proc)
            .expect("spawn rowshift")
    }
}

/// A passing test's directory (pipeline files, process logs) goes, unless
/// `ROWSHIFT_TEST_KEEP_LOGS` is set; a failing test's stays for its logs,
/// its path is printed and so are the logs' last lines.
impl Drop for TestDb {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("logs kept in {}", self.dir.display());
            print_log_tails(&self.dir);
        } else if std::env::var_os("ROWSHIFT_TEST_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The last lines of each process log in `dir`, for a failed test's
/// output (CI keeps nothing else).
fn print_log_tails(dir: &std::path::Path) {
    const LINES: usize = 30;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut logs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!(
            "--- last {} of {} lines of {}",
            LINES.min(lines.len()),
            lines.len(),
            log.display()
        );
        for line in &lines[lines.len().saturating_sub(LINES)..] {
            eprintln!("{line}");
        }
    }
}

/// Polls `probe` until it returns true; panics with `what` after `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !probe().await {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the pipeline has applied everything written so far: its
/// applied position passes the source's current WAL insert position. (Not
/// `pg_current_wal_lsn()`, the *write* position: the test clusters commit
/// asynchronously, so that can still be short of the last commit.)
pub async fn wait_caught_up(c: &Client, pipeline: &str, limit: Duration) {
    let target: String = c
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    wait_for(&format!("{pipeline} to apply up to {target}"), limit, || async {
        let row = c
            .query_opt(
                "SELECT applied_lsn >= $2::text::pg_lsn AND phase = 'caught_up' FROM rowshift.pipelines WHERE name = $1",
                &[&pipeline, &target],
            )
            .await
            .ok()
            .flatten();
        row.and_then(|r| r.get::<_, Option<bool>>(0)).unwrap_or(false)
    })
    .await;
}

/// Full comparison: the mapped source and the target hold exactly the same
/// rows (as multisets). Returns a description of the first differences.
pub async fn diff(c: &Client, mapped_source: &str, target: &str) -> Option<String> {
    let sql = format!(
        "SELECT 'missing in target' AS side, x::text FROM (({mapped_source}) EXCEPT ALL (SELECT * FROM {target})) x \
         UNION ALL SELECT 'extra in target', y::text FROM ((SELECT * FROM {target}) EXCEPT ALL ({mapped_source})) y LIMIT 6"
    );
    let rows = c.query(&sql, &[]).await.expect("compare");
    if rows.is_empty() {
        return None;
    }
    Some(
        rows.iter()
            .map(|r| {
                let side: String = r.get(0);
                let text: String = r.get(1);
                format!("{side}: {}", text.chars().take(160).collect::<String>())
            })
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// A running rowshift process; killed (SIGKILL) when dropped, so a failing
/// test does not leave it behind.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        kill(self);
    }
}

pub fn kill(p: &mut Proc) {
    let _ = p.0.kill(); // SIGKILL
    let _ = p.0.wait();
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts that rowshift left nothing on the server for this database: no
/// replication slot, no publication, and no table `target`.
pub async fn assert_no_leftovers(c: &Client, target: &str) {
    let slots: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
            &[],
        )
        .await
        .expect("slots")
        .get(0);
    assert_eq!(slots, 0, "a replication slot was left behind");
    let publication = c
        .query_opt("SELECT 1 FROM pg_publication", &[])
        .await
        .expect("publications");
    assert!(publication.is_none(), "a publication was left behind");
    let table: Option<String> = c
        .query_one("SELECT to_regclass($1)::text", &[&target])
        .await
        .expect("q")
        .get(0);
    assert!(table.is_none(), "the table {target} was left behind");
}

/// The mapped source and the target hold the same rows (full comparison),
/// and not none.
pub async fn assert_equal(c: &tokio_postgres::Client, mapped: &str, target: &str) {
    if let Some(d) = diff(c, mapped, target).await {
        panic!("target {target} differs from the mapped source:\n{d}");
    }
    let a: i64 = c
        .query_one(&format!("SELECT count(*) FROM ({mapped}) s"), &[])
        .await
        .expect("count")
        .get(0);
    let b: i64 = c
        .query_one(&format!("SELECT count(*) FROM {target}"), &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(a, b, "row counts");
    assert!(a > 0, "compared an empty table");
}

/// The pipeline's backfill has finished.
pub async fn backfill_finished(c: &Client, name: &str) -> bool {
    c.query_opt(
        "SELECT 1 FROM rowshift.pipelines WHERE name = $1 AND backfill_finished_at IS NOT NULL",
        &[&name],
    )
    .await
    .ok()
    .flatten()
    .is_some()
}

/// The single bigint a query returns (`SELECT count(*) ...`).
pub async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.expect(sql).get(0)
}
