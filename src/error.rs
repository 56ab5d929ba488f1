//! Library errors. Kinds are few; each maps to a retry decision and an
//! operator hint (the supabase/etl table, kept small).

use crate::spec::SpecError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline file is invalid (every problem listed).
    #[error("{0}")]
    Spec(#[from] SpecError),
    /// Missing environment variable, bad flag, unknown pipeline.
    #[error("configuration: {reason}")]
    Config { reason: String },
    /// The source refused preflight; nothing was changed.
    #[error("preflight refused the pipeline; nothing was changed:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Preflight { problems: Vec<String> },
    /// A database statement failed.
    #[error("database: {context}: {}", db_text(.source))]
    Db {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The replication stream failed.
    #[error("replication stream: {0}")]
    Replication(String),
    /// Another process holds the pipeline, or the stored state forbids the step.
    #[error("state: {0}")]
    State(String),
    /// The run was stopped on purpose (abort, signal).
    #[error("stopped: {0}")]
    Stopped(String),
    /// A versioned migration was refused or failed.
    #[error("migrate: {0}")]
    Migrate(String),
}

impl Error {
    /// A statement gave up waiting for a lock (`lock_timeout`).
    pub fn is_lock_timeout(&self) -> bool {
        matches!(self, Error::Db { source, .. }
            if source.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE))
    }
}

/// PostgreSQL's own message (and detail) rather than tokio-postgres' "db error".
pub fn db_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => match d.detail() {
            Some(detail) => format!("{} ({}; {detail})", d.message(), d.code().code()),
            None => format!("{} ({})", d.message(), d.code().code()),
        },
        None => e.to_string(),
    }
}

/// What a caller should do with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Transient: reconnect and resume from stored state.
    Transient,
    /// Definite: record it, surface it, do not retry.
    Definite,
}

impl Error {
    /// A write refused because a newer process holds the pipeline's epoch.
    pub fn fenced() -> Error {
        Error::Stopped(
            "another rowshift process took this pipeline over (fenced); this one stops without writing"
                .into(),
        )
    }

    pub fn db(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Error {
        let context = context.into();
        move |source| Error::Db { context, source }
    }

    pub fn retry(&self) -> Retry {
        match self {
            Error::Db { source, .. } => {
                let transient = source.is_closed()
                    || source.code().map(|c| {
                        let code = c.code();
                        // connection exceptions, serialization failures, deadlocks,
                        // lock_not_available, admin shutdown / cannot connect now
                        code.starts_with("08")
                            || code == "40001"
                            || code == "40P01"
                            || code == "55P03"
                            || code.starts_with("57P")
                    }) == Some(true)
                    || source.code().is_none();
                if transient {
                    Retry::Transient
                } else {
                    Retry::Definite
                }
            }
            Error::Replication(_) => Retry::Transient,
            _ => Retry::Definite,
        }
    }

    /// A one-line suggestion for the operator.
    pub fn hint(&self) -> &'static str {
        match self {
            Error::Spec(_) => "fix the listed fields in the pipeline file, then run `rowshift plan` again",
            Error::Config { .. } => "check the environment variables and command-line arguments",
            Error::Preflight { .. } => "fix the source as listed (nothing was changed), then run `rowshift plan` again",
            Error::Db { .. } => match self.retry() {
                Retry::Transient => "the database connection failed; `rowshift run` resumes from stored state",
                Retry::Definite => "a statement was rejected; see the message, fix the cause, then run again",
            },
            Error::Replication(_) => "the replication connection failed; `rowshift run` resumes from the slot's confirmed position",
            Error::State(_) => "see `rowshift status` for the pipeline's phase and owner",
            Error::Stopped(_) => "run `rowshift run` again to resume, or `rowshift abort` to remove everything",
            Error::Migrate(_) => "see `rowshift migrate validate` and `rowshift migrate history`",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
