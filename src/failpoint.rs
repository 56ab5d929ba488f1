//! Named points where a test can freeze the process, to kill it there.
//!
//! With `ROWSHIFT_FAILPOINT=<name>` set, reaching the point `<name>` prints
//! `failpoint <name> reached` on stderr and blocks forever (the test then
//! kills the process with SIGKILL). Unset, a point costs one environment
//! lookup. This is the only way to stop a process *between two exact steps*;
//! the kill itself is real.

/// Blocks forever if the failpoint `name` is armed.
pub async fn hit(name: &str) {
    if std::env::var("ROWSHIFT_FAILPOINT").as_deref() == Ok(name) {
        eprintln!("failpoint {name} reached");
        std::future::pending::<()>().await;
    }
}
