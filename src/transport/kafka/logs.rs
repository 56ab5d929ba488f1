//! librdkafka's own log lines and client errors, forwarded to `tracing`
//! (target `librdkafka`), so that what the Kafka client sees (a broker down,
//! a fetch it could not parse, the lines of a `debug` property passed
//! through) shows up in rowshift's logs. Without this they go to the `log`
//! crate, which rowshift does not read. librdkafka masks the values of its
//! sensitive settings (`sasl.password`, `ssl.key.password`, ...) itself,
//! and no debug context it has prints record payloads.

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::ClientContext;

/// The client context of rowshift's producers and admin clients.
#[derive(Debug, Clone, Copy, Default)]
pub struct Logs;

impl ClientContext for Logs {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        forward(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        client_error(&error, reason);
    }
}

/// Writes one librdkafka log line at the matching level.
pub fn forward(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", facility = fac, "{message}")
        }
        RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", facility = fac, "{message}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", facility = fac, "{message}")
        }
        RDKafkaLogLevel::Debug => {
            tracing::debug!(target: "librdkafka", facility = fac, "{message}")
        }
    }
}

/// A client-wide error (a broker down, all brokers down, ...). The client
/// retries these itself; what rowshift must act on reaches it through the
/// call that failed, so these are warnings. A partition read to its end
/// (`enable.partition.eof`, which the appliers' idle pause relies on) is
/// reported here too; it is no trouble, so it is a debug line.
pub fn client_error(error: &KafkaError, reason: &str) {
    if matches!(error, KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
        tracing::debug!(target: "librdkafka", error = %error, "{reason}");
    } else {
        tracing::warn!(target: "librdkafka", error = %error, "{reason}");
    }
}

/// The most detailed librdkafka level the log filter lets through (the
/// client drops finer lines before they are formatted): `debug` when
/// `RUST_LOG` enables it for the target `librdkafka`, as for the lines of a
/// `debug` property.
pub fn level() -> RDKafkaLogLevel {
    if tracing::enabled!(target: "librdkafka", tracing::Level::DEBUG) {
        RDKafkaLogLevel::Debug
    } else if tracing::enabled!(target: "librdkafka", tracing::Level::INFO) {
        RDKafkaLogLevel::Info
    } else {
        RDKafkaLogLevel::Warning
    }
}
