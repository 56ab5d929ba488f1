//! Blocking calls made from async code (libpq's connect, a Kafka consumer's
//! seek). rowshift runs one runtime worker (see `main.rs`): a call that
//! blocks it would stop every other task, so on a multi-thread runtime the
//! call runs under `block_in_place`, which hands the worker's other tasks
//! to a fresh thread. On a current-thread runtime (some tests) it just runs.

use tokio::runtime::{Handle, RuntimeFlavor};

/// Runs `f`, which may block, without stalling the runtime's other tasks.
pub fn call<R>(f: impl FnOnce() -> R) -> R {
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Awaits `fut`, whose polls may block (libpq under `pg_walstream`), without
/// stalling the runtime's other tasks.
pub async fn run<F: std::future::Future>(fut: F) -> F::Output {
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => {
            tokio::task::block_in_place(|| Handle::current().block_on(fut))
        }
        _ => fut.await,
    }
}
