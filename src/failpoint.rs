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

/// True the first time in this process that the failpoint `name` is
/// reached while armed (it prints `failpoint <name> reached`); false
/// otherwise. For a fault the caller then makes itself, once, where the
/// real one cannot be produced on demand.
pub fn once(name: &str) -> bool {
    use std::sync::atomic::{AtomicBool, Ordering};
    static FIRED: AtomicBool = AtomicBool::new(false);
    if std::env::var("ROWSHIFT_FAILPOINT").as_deref() != Ok(name)
        || FIRED.swap(true, Ordering::SeqCst)
    {
        return false;
    }
    eprintln!("failpoint {name} reached");
    true
}
