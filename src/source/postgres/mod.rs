//! PostgreSQL as a source: connections, introspection and the logical
//! replication reader. This module only reads the source (gh-ost's
//! "inspector" and "streamer" roles); every write is the sink's or the
//! runtime's.

pub mod introspect;
pub mod replication;
pub mod restream;
pub mod streamed;
pub mod visibility;

use crate::error::{Error, Result};
use tokio_postgres::{Client, NoTls};

/// Opens a regular connection; the connection task is spawned and its error
/// (if any) is logged without the DSN.
/// Every connection names itself `rowshift:<purpose>` in `pg_stat_activity`
/// unless the DSN sets an application name.
pub async fn connect(dsn: &str, purpose: &'static str) -> Result<Client> {
    let mut config: tokio_postgres::Config =
        dsn.parse().map_err(Error::db("parse the source DSN"))?;
    if config.get_application_name().is_none() {
        config.application_name(format!("rowshift:{purpose}"));
    }
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(Error::db(format!("connect ({purpose})")))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(purpose, error = %e, "connection closed");
        }
    });
    Ok(client)
}

/// The DSN with `replication=database` added, for the walsender connection.
pub fn replication_dsn(dsn: &str) -> String {
    let name = if dsn.contains("application_name") {
        ""
    } else {
        "application_name=rowshift:replication"
    };
    if dsn.starts_with("postgres://") || dsn.starts_with("postgresql://") {
        let sep = if dsn.contains('?') { '&' } else { '?' };
        let name = if name.is_empty() {
            String::new()
        } else {
            format!("&{name}")
        };
        format!("{dsn}{sep}replication=database{name}")
    } else {
        format!("{dsn} replication=database {name}")
            .trim_end()
            .to_string()
    }
}

/// The DSN with a server setting for the session (`options=-c name=value`),
/// unless the DSN already sets options (the operator's win).
pub fn with_setting(dsn: &str, name: &str, value: &str) -> String {
    if dsn.contains("options=") {
        return dsn.to_string();
    }
    if dsn.starts_with("postgres://") || dsn.starts_with("postgresql://") {
        let sep = if dsn.contains('?') { '&' } else { '?' };
        format!("{dsn}{sep}options=-c%20{name}%3D{value}")
    } else {
        format!("{dsn} options='-c {name}={value}'")
    }
}

/// Hides the password of a DSN for messages and debug output.
pub fn redact_dsn(dsn: &str) -> String {
    let mut out = Vec::new();
    for part in dsn.split_whitespace() {
        if part.starts_with("password=") {
            out.push("password=***".to_string());
        } else {
            out.push(part.to_string());
        }
    }
    let joined = out.join(" ");
    // URL form: scheme://user:secret@host
    if let (Some(scheme_end), Some(at)) = (joined.find("://"), joined.find('@')) {
        let userinfo = &joined[scheme_end + 3..at];
        if let Some(colon) = userinfo.find(':') {
            return format!(
                "{}{}:***{}",
                &joined[..scheme_end + 3],
                &userinfo[..colon],
                &joined[at..]
            );
        }
    }
    joined
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_dsn_for_both_forms() {
        assert_eq!(
            replication_dsn("host=x port=5"),
            "host=x port=5 replication=database application_name=rowshift:replication"
        );
        assert_eq!(
            replication_dsn("postgres://u@h/db"),
            "postgres://u@h/db?replication=database&application_name=rowshift:replication"
        );
        assert_eq!(
            replication_dsn("postgres://u@h/db?sslmode=disable"),
            "postgres://u@h/db?sslmode=disable&replication=database&application_name=rowshift:replication"
        );
        assert_eq!(
            replication_dsn("host=x application_name=app"),
            "host=x application_name=app replication=database"
        );
    }

    #[test]
    fn settings_are_added_unless_options_are_set() {
        assert_eq!(
            with_setting("host=x replication=database", "a_b", "4kB"),
            "host=x replication=database options='-c a_b=4kB'"
        );
        assert_eq!(
            with_setting("postgres://u@h/db?replication=database", "a_b", "4kB"),
            "postgres://u@h/db?replication=database&options=-c%20a_b%3D4kB"
        );
        assert_eq!(
            with_setting("host=x options='-c x=1'", "a_b", "4kB"),
            "host=x options='-c x=1'"
        );
    }

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(
            redact_dsn("host=x password=hunter2 user=u"),
            "host=x password=*** user=u"
        );
        assert_eq!(
            redact_dsn("postgres://u:hunter2@h/db"),
            "postgres://u:***@h/db"
        );
    }
}
