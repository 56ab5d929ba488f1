//! Issue 5's benchmark: `rowshift migrate validate`, `status` and `lint`
//! over 2,000 migration files in 20 services, all applied (so every file is
//! read, checksummed and compared with its history row). Each command is
//! timed as a whole process (start-up included), median of 5 runs.
//!
//! Run: `bash scripts/bench.sh migrate`.

mod common;

use anyhow::{bail, Result};
use common::*;
use std::path::Path;
use std::time::Instant;

const SERVICES: usize = 20;
const PER_SERVICE: usize = 100;

fn write_tree(dir: &Path) -> Result<()> {
    for s in 0..SERVICES {
        let sdir = dir.join(format!("svc{s:02}"));
        std::fs::create_dir_all(&sdir)?;
        for v in 1..=PER_SERVICE {
            let depends = if s > 0 && v == 1 {
                format!("-- depends_on: svc{:02}:1.1\n", s - 1)
            } else {
                String::new()
            };
            let sql = format!(
                "-- service {s}, step {v}: a table with an index and a comment\n{depends}\
                 -- risk: low\n-- estimated_duration: 1s\n\
                 SET lock_timeout = '2s';\n\
                 CREATE TABLE public.s{s}_t{v} (\n  id bigint PRIMARY KEY,\n  owner_id bigint NOT NULL,\n  \
                 label text NOT NULL DEFAULT '',\n  created_at timestamptz NOT NULL DEFAULT now()\n);\n\
                 CREATE INDEX s{s}_t{v}_owner ON public.s{s}_t{v} (owner_id);\n\
                 COMMENT ON TABLE public.s{s}_t{v} IS 'created by migration {v} of service {s}';\n"
            );
            std::fs::write(sdir.join(format!("V1.{v}__table_{v}.sql")), sql)?;
        }
    }
    Ok(())
}

fn time(dsn: &str, dir: &Path, action: &str) -> Result<f64> {
    let mut runs = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rowshift"))
            .args(["migrate", action, "--dir"])
            .arg(dir)
            .args(["--config", "/dev/null"])
            .env("ROWSHIFT_SOURCE_DSN", dsn)
            .output()?;
        runs.push(t.elapsed().as_secs_f64());
        if !out.status.success() {
            bail!(
                "migrate {action} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    runs.sort_by(|a, b| a.total_cmp(b));
    Ok(runs[runs.len() / 2])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    std::env::set_current_dir(env!("CARGO_MANIFEST_DIR"))?;
    let work = std::env::temp_dir().join(format!("rowshift-bench-mig-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let cluster = Cluster::start(work.join("pg"), free_port()?)?;
    let admin = connect(&cluster.dsn("postgres")).await?;
    admin.batch_execute("CREATE DATABASE bench").await?;
    let dsn = cluster.dsn("bench");
    let dir = work.join("migrations");
    write_tree(&dir)?;
    println!("applying {} migrations ...", SERVICES * PER_SERVICE);
    let t = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rowshift"))
        .args(["migrate", "up", "--dir"])
        .arg(&dir)
        .args(["--config", "/dev/null"])
        .env("ROWSHIFT_SOURCE_DSN", &dsn)
        .output()?;
    if !out.status.success() {
        bail!(
            "migrate up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!("applied in {:.1} s", t.elapsed().as_secs_f64());
    let mut results = Results { rows: Vec::new() };
    for (action, limit) in [
        ("validate", "< 1 s"),
        ("status", "< 1 s"),
        ("lint", "< 5 s"),
    ] {
        let secs = time(&dsn, &dir, action)?;
        results.add(
            &format!("migrate {action}, 2,000 files in 20 services (all applied)"),
            limit,
            "-".into(),
            format!("{:.3} s (median of 5, whole process)", secs),
        );
    }
    print_table(&results);
    drop(cluster);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
