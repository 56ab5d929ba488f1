//! Running a pipeline process (`rowshift run`, `rowshift apply`) until it
//! is stopped: transient failures are retried with a growing pause, a
//! definite failure is recorded on the pipeline's state row, and Ctrl-C or
//! SIGTERM ends it cleanly with its state saved.

use rowshift::runtime::{self, kafka_apply, kafka_schema, RunOptions};
use rowshift::{spec, Error};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Runs with retries for transient failures; records definite ones.
pub async fn run(p: &spec::Pipeline, exit_when_caught_up: bool) -> anyhow::Result<()> {
    let cancel = stop_on_signal();
    let opts = RunOptions {
        exit_when_caught_up,
        progress: true,
    };
    let result = with_retries(p, "`rowshift run` resumes", &cancel, || {
        runtime::run(p, &opts, cancel.clone())
    })
    .await;
    if let Err(e) = &result {
        record_failure(p, e).await;
    }
    Ok(result?)
}

/// `rowshift apply`: a kafka applier until a stop signal, resuming after
/// transient failures (the stored positions say where).
pub async fn apply(p: &spec::Pipeline) -> anyhow::Result<()> {
    if p.transport.kafka.is_none() {
        anyhow::bail!(
            "pipeline {} uses the direct transport: `rowshift run` applies it",
            p.name
        );
    }
    let cancel = stop_on_signal();
    let dsn = p.source_dsn()?;
    let once = || async {
        let mut client = rowshift::source::postgres::connect(&dsn, "apply").await?;
        let record = rowshift::state::load(&client, &p.name)
            .await?
            .ok_or_else(|| Error::Config {
                reason: format!("no pipeline named {}: start it with `rowshift run`", p.name),
            })?;
        if record.reverse() {
            return Err(Error::State(format!(
                "pipeline {} is cut over: the forward stream is off, there is nothing to apply",
                p.name
            )));
        }
        let checked = rowshift::preflight::check(&mut client, p, Some(&record)).await?;
        let schema = kafka_schema::table_schema(p, &checked, &client).await?;
        kafka_apply::run(p, &dsn, Arc::new(checked.mapping), &schema, cancel.clone()).await
    };
    Ok(with_retries(p, "`rowshift apply` resumes", &cancel, once).await?)
}

/// A token cancelled by Ctrl-C or SIGTERM.
fn stop_on_signal() -> CancellationToken {
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        wait_for_stop_signal().await;
        on_signal.cancel();
    });
    cancel
}

/// Runs `once` until it ends: a stop (signal, abort, takeover) is a clean
/// end; a transient failure is retried with a growing pause (up to 20 in a
/// row; a try that lasted a minute made progress, so the count starts
/// afresh); any other failure is returned. `resumes` names who goes on.
async fn with_retries<F, Fut>(
    p: &spec::Pipeline,
    resumes: &str,
    cancel: &CancellationToken,
    mut once: F,
) -> Result<(), Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), Error>>,
{
    let mut attempt = 0u32;
    loop {
        let started = std::time::Instant::now();
        let result = once().await;
        if started.elapsed() > Duration::from_secs(60) {
            attempt = 0;
        }
        match result {
            Ok(()) => return Ok(()),
            Err(Error::Stopped(reason)) => {
                tracing::info!(pipeline = %p.name, %reason, "stopped; state is saved, {resumes}");
                return Ok(());
            }
            Err(e)
                if e.retry() == rowshift::error::Retry::Transient
                    && attempt < 20
                    && !cancel.is_cancelled() =>
            {
                attempt += 1;
                let wait = Duration::from_millis(250 * 2u64.pow(attempt.min(6)));
                tracing::warn!(pipeline = %p.name, error = %e, attempt, wait_ms = wait.as_millis() as u64, "transient failure; {resumes}");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn record_failure(p: &spec::Pipeline, e: &Error) {
    if matches!(
        e,
        Error::Preflight { .. } | Error::Spec(_) | Error::Config { .. }
    ) {
        return;
    }
    let Ok(dsn) = p.source_dsn() else { return };
    if let Ok(client) = rowshift::source::postgres::connect(&dsn, "record failure").await {
        if rowshift::state::load(&client, &p.name)
            .await
            .ok()
            .flatten()
            .is_some()
        {
            let _ =
                rowshift::state::record_failure(&client, &p.name, &e.to_string(), e.hint()).await;
        }
    }
}

/// Ctrl-C or SIGTERM (what service managers send): stop cleanly.
async fn wait_for_stop_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
