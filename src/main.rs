//! The `rowshift` command line: a thin layer over the library.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use rowshift::runtime::control;
use rowshift::state::Desired;
use rowshift::{cutover, spec, Error};

mod migrate_cmd;
mod run_cmd;

/// mimalloc rather than glibc's allocator: the kafka path allocates and
/// frees a few small objects per change (Avro values, records), and glibc's
/// `malloc`/`free` were a fifth of both kafka processes' profiles. Built
/// with `no_thp` (Cargo.toml): with transparent huge pages, every first touch
/// of fresh memory zeroed 2 MB, over a third of rowshift's CPU while early
/// apply held a large transaction (docs/benchmarks.md, issue 2, session 12).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "rowshift",
    version,
    about = "Zero-downtime PostgreSQL table rewrites driven by change data capture"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Output {
    Text,
    Json,
    Csv,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
enum MigrateAction {
    Status,
    Up,
    Undo,
    Validate,
    Repair,
    Baseline,
    History,
    Lint,
    Approve,
}

#[derive(clap::Args)]
struct MigrateArgs {
    /// The migrations folder: one subfolder per service.
    #[arg(long, default_value = "migrations")]
    dir: PathBuf,
    /// Only this service.
    #[arg(long)]
    service: Option<String>,
    /// The environment (selects environment-specific migrations and the approval policy).
    #[arg(long)]
    env: Option<String>,
    /// Up to (up), down to (undo) or at (baseline) this version.
    #[arg(long)]
    target: Option<String>,
    /// Show what would run; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Schema of the history tables.
    #[arg(long, default_value = "public")]
    schema: String,
    /// Policy and hooks (default: config/migrate.yaml when present).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Affirms that a maintenance window is open.
    #[arg(long)]
    maintenance_window: bool,
    /// Who approves (approve) or runs (default $USER).
    #[arg(long)]
    by: Option<String>,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Environment variable holding the database DSN.
    #[arg(long, default_value = "ROWSHIFT_SOURCE_DSN")]
    dsn_env: String,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a pipeline file, preflight the source, print every step and its SQL.
    Plan { file: PathBuf },
    /// Expand, then backfill and stream until caught up; keeps streaming until stopped.
    Run {
        file: PathBuf,
        /// Exit once the target is caught up instead of streaming on.
        #[arg(long)]
        exit_when_caught_up: bool,
    },
    /// Phase, progress, ETA, lag and slot of one or all pipelines.
    Status {
        /// A pipeline name, or a pipeline file (its dsn_env is used).
        name: Option<String>,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        #[command(flatten)]
        dsn: DsnArg,
    },
    /// Stop the backfill (the stream keeps applying).
    Pause {
        name: String,
        #[command(flatten)]
        dsn: DsnArg,
    },
    /// Continue a paused backfill.
    Resume {
        name: String,
        #[command(flatten)]
        dsn: DsnArg,
    },
    /// Stop the pipeline and remove everything rowshift created for it.
    Abort {
        name: String,
        #[command(flatten)]
        dsn: DsnArg,
    },
    /// Row counts and chunked checksums of the old and the new table.
    Verify {
        /// A pipeline name or file.
        name: String,
        /// Re-copy chunks that still differ (through the running pipeline), then check them again.
        #[arg(long)]
        repair: bool,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        #[command(flatten)]
        dsn: DsnArg,
    },
    /// Readiness gate, then swap the new table in under a short write pause.
    Cutover {
        name: String,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        #[command(flatten)]
        dsn: DsnArg,
    },
    /// Swap the old table back in (the reverse stream kept it current).
    Rollback {
        name: String,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        #[command(flatten)]
        dsn: DsnArg,
    },
    /// Versioned SQL migrations: status, up, undo, validate, repair, baseline, history, lint, approve.
    Migrate {
        action: MigrateAction,
        /// The version (approve).
        version: Option<String>,
        #[command(flatten)]
        args: MigrateArgs,
    },
    /// Apply a kafka pipeline's topic as one more member of its consumer group.
    Apply {
        /// A pipeline name or file.
        name: String,
        #[command(flatten)]
        dsn: DsnArg,
    },
    /// After a cut-over: drop the old table, the slots and the publications.
    Contract {
        name: String,
        /// Contract before the reverse window has passed.
        #[arg(long)]
        confirm: bool,
        #[command(flatten)]
        dsn: DsnArg,
    },
}

#[derive(clap::Args)]
struct DsnArg {
    /// Environment variable holding the source DSN (when NAME is not a pipeline file).
    #[arg(long, default_value = "ROWSHIFT_SOURCE_DSN")]
    dsn_env: String,
}

/// A pipeline named directly, or through its file (which names the DSN variable).
fn resolve(name: &str, dsn: &DsnArg) -> anyhow::Result<(String, String)> {
    let path = PathBuf::from(name);
    let (name, var) = if name.ends_with(".yaml") || name.ends_with(".yml") || path.is_file() {
        let p = spec::load(&path).map_err(Error::from)?;
        (p.name, p.source_dsn_env)
    } else {
        (name.to_string(), dsn.dsn_env.clone())
    };
    let value = std::env::var(&var)
        .with_context(|| format!("environment variable {var} (the source DSN) is not set"))?;
    Ok((name, value))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,pg_walstream=warn"));
    // Colours only on a terminal: a log file or a collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // `run FILE` is read once, here: its transport picks the worker count.
    let run_file = match &cli.command {
        Command::Run { file, .. } => Some(spec::load(file)),
        _ => None,
    };
    let kafka = matches!(cli.command, Command::Apply { .. })
        || matches!(&run_file, Some(Ok(p)) if p.transport.kafka.is_some());
    let runtime = match runtime(kafka) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(dispatch(cli.command, run_file)) {
        match e.downcast_ref::<Error>() {
            Some(err) => eprintln!("error: {err}\nhint: {}", err.hint()),
            None => eprintln!("error: {e:#}"),
        }
        std::process::exit(1);
    }
}

/// The async runtime: `TOKIO_WORKER_THREADS=N` workers if set, otherwise:
///
/// - One worker thread (plus tokio's blocking threads). rowshift mostly
///   waits on PostgreSQL; its own CPU work (decoding pgoutput, building a
///   batch's arrays) fits in one core, and on one thread the replication
///   reader hands each message to the applier without waking a parked
///   thread: 200k single-row transactions applied at 40–51k tx/s, against
///   30k with two workers on 2 cores (docs/benchmarks.md).
/// - The kafka transport's `run` and `apply`: a current-thread runtime
///   (librdkafka has threads of its own); a `run` that also applies runs
///   its applier on a thread of its own (`runtime::own_thread`). Waking
///   worker threads for delivery reports took 29 % of a multi-thread
///   `run`'s profile (docs/benchmarks.md, sessions 6 and 7).
///
/// Blocking calls (libpq's connect in the replication reader, a consumer's
/// seek) go through `rowshift::blocking`.
fn runtime(kafka: bool) -> std::io::Result<tokio::runtime::Runtime> {
    let workers = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0);
    let mut builder = match (workers, kafka) {
        (None, true) => tokio::runtime::Builder::new_current_thread(),
        (Some(n), _) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        (None, false) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(1);
            b
        }
    };
    builder.enable_all().build()
}

/// `run_file`: the pipeline file of `run`, already read by `main`.
async fn dispatch(
    command: Command,
    run_file: Option<Result<spec::Pipeline, spec::SpecError>>,
) -> anyhow::Result<()> {
    match command {
        Command::Plan { file } => {
            let p = spec::load(&file).map_err(Error::from)?;
            print!("{}", rowshift::plan::plan(&p).await?);
        }
        Command::Run {
            file,
            exit_when_caught_up,
        } => {
            let p = run_file
                .unwrap_or_else(|| spec::load(&file))
                .map_err(Error::from)?;
            run_cmd::run(&p, exit_when_caught_up).await?;
        }
        Command::Status { name, output, dsn } => {
            let (name, dsn_value) = match name {
                Some(n) => {
                    let (n, d) = resolve(&n, &dsn)?;
                    (Some(n), d)
                }
                None => (
                    None,
                    std::env::var(&dsn.dsn_env).with_context(|| {
                        format!("environment variable {} is not set", dsn.dsn_env)
                    })?,
                ),
            };
            let list = control::status(&dsn_value, name.as_deref()).await?;
            if let Some(n) = &name {
                if list.is_empty() {
                    anyhow::bail!("no pipeline named {n}");
                }
            }
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no pipelines");
            } else {
                println!(
                    "{}",
                    list.iter()
                        .map(control::render)
                        .collect::<Vec<_>>()
                        .join("\n\n")
                );
            }
        }
        Command::Pause { name, dsn } => {
            let (name, d) = resolve(&name, &dsn)?;
            control::set_desired(&d, &name, Desired::Pause).await?;
            println!(
                "pipeline {name}: pause requested (the backfill stops; the stream keeps applying)"
            );
        }
        Command::Resume { name, dsn } => {
            let (name, d) = resolve(&name, &dsn)?;
            control::set_desired(&d, &name, Desired::Run).await?;
            println!("pipeline {name}: resume requested");
        }
        Command::Abort { name, dsn } => {
            let (name, d) = resolve(&name, &dsn)?;
            for line in control::abort(&d, &name).await? {
                println!("{line}");
            }
        }
        Command::Verify {
            name,
            repair,
            output,
            dsn,
        } => {
            let p = pipeline(&name, &dsn).await?;
            let report = rowshift::verify::verify(&p, rowshift::verify::Options { repair }).await?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "verified {}: {} chunks, {} source rows, {} target rows, {} rechecked after lag, {} mismatched, {} repaired, {:.1} s ({:.0} rows/s)",
                    p.name,
                    report.chunks,
                    report.rows_source,
                    report.rows_target,
                    report.rechecked,
                    report.mismatches.len(),
                    report.repaired,
                    report.duration_ms as f64 / 1000.0,
                    report.rows_per_s
                );
                for m in &report.mismatches {
                    println!(
                        "  mismatch {}: source {} rows, target {} rows, {} key(s) differ{}",
                        m.range,
                        m.source_rows,
                        m.target_rows,
                        m.differing_keys,
                        if m.repaired { " (repaired)" } else { "" }
                    );
                }
            }
            if report.unresolved() > 0 {
                anyhow::bail!(
                    "{} chunk(s) differ; `rowshift verify {} --repair` re-copies them",
                    report.unresolved(),
                    p.name
                );
            }
        }
        Command::Cutover { name, output, dsn } => {
            let p = pipeline(&name, &dsn).await?;
            let outcome = cutover::switch(&p, cutover::Kind::Cutover).await?;
            print_outcome(&p, "cut over", &outcome, output)?;
        }
        Command::Rollback { name, output, dsn } => {
            let p = pipeline(&name, &dsn).await?;
            let outcome = cutover::switch(&p, cutover::Kind::Rollback).await?;
            print_outcome(&p, "rolled back", &outcome, output)?;
        }
        Command::Migrate {
            action,
            version,
            args,
        } => {
            if !migrate_cmd::run(action, version, &args).await? {
                std::process::exit(1);
            }
        }
        Command::Apply { name, dsn } => {
            let p = pipeline(&name, &dsn).await?;
            run_cmd::apply(&p).await?;
        }
        Command::Contract { name, confirm, dsn } => {
            let p = pipeline(&name, &dsn).await?;
            for line in cutover::contract(&p, confirm).await? {
                println!("{line}");
            }
        }
    }
    Ok(())
}

/// A pipeline named directly (its file is found through the stored state) or by its file.
async fn pipeline(name: &str, dsn: &DsnArg) -> anyhow::Result<spec::Pipeline> {
    if name.ends_with(".yaml") || name.ends_with(".yml") || PathBuf::from(name).is_file() {
        return Ok(spec::load(&PathBuf::from(name)).map_err(Error::from)?);
    }
    let (name, d) = resolve(name, dsn)?;
    let file = control::pipeline_file(&d, &name).await?;
    Ok(spec::load(&file).map_err(Error::from)?)
}

fn print_outcome(
    p: &spec::Pipeline,
    what: &str,
    o: &cutover::Outcome,
    output: Output,
) -> anyhow::Result<()> {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(o)?);
        return Ok(());
    }
    println!("readiness:\n{}", cutover::render_checklist(&o.checklist));
    println!(
        "{} {what}: write pause {:.1} ms (lock attempts {}, fence {}, swap at {})",
        p.name, o.pause_ms, o.attempts, o.fence_lsn, o.swap_lsn
    );
    for n in &o.notes {
        println!("  {n}");
    }
    Ok(())
}
