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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// On a multi-thread runtime with one worker, a task keeps running while
    /// another blocks its thread inside `run`.
    #[test]
    fn a_blocking_future_does_not_stall_the_other_tasks() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let ticker = tokio::spawn(async {
                let mut ticks = 0;
                for _ in 0..10 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    ticks += 1;
                }
                ticks
            });
            tokio::task::yield_now().await;
            let blocked = tokio::spawn(async {
                run(async { std::thread::sleep(Duration::from_millis(400)) }).await;
                std::time::Instant::now()
            });
            let ticked = ticker.await.expect("ticker");
            let ticked_at = std::time::Instant::now();
            let unblocked_at = blocked.await.expect("blocked");
            assert_eq!(ticked, 10);
            assert!(
                ticked_at < unblocked_at,
                "the ticker waited for the blocked task"
            );
        });
    }

    /// A current-thread runtime (tests) runs the call in place.
    #[tokio::test]
    async fn current_thread_runs_in_place() {
        assert_eq!(run(async { 7 }).await, 7);
        assert_eq!(call(|| 8), 8);
    }
}
