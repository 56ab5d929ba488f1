//! The `kafka` transport: change events as Avro records in Kafka topics
//! (Confluent wire format, Debezium-compatible envelope).
//!
//! The parts, each tested against both test brokers (tansu, noida-db):
//! - [`avro`]: PostgreSQL types → Avro types and text values → Avro values
//!   (refusing the types it cannot carry);
//! - [`envelope`]: per-table key/value schemas and the records of every kind
//!   of change (a key change is a delete plus a create; deletes are followed
//!   by a tombstone; unchanged TOAST columns are listed in `unavailable`);
//! - [`codec`]: Confluent wire-format encoding through
//!   `schema_registry_converter` (schemas registered under `<topic>-key` and
//!   `<topic>-value`); [`frame`] writes the producer's records straight
//!   into framed bytes, the same bytes [`wire`] writes for the values
//!   [`envelope`] builds;
//! - [`producer`]: idempotent, `acks=all`; acknowledgements are counted per
//!   batch ([`delivery`]), and each batch is awaited in stream order before
//!   the slot is confirmed past it;
//! - [`snapshot`]: the DBLog-style backfill chunks and why they are correct;
//! - [`decode`] and [`consumer`]: a consumer-group member that turns records
//!   back into change events (values read back into PostgreSQL's text by
//!   [`pgtext`]), starts newly assigned partitions at the stored
//!   positions and commits offsets only when told; [`idle`]: the pause
//!   that keeps a caught-up consumer from fetching in a loop.
//!
//! - [`logs`]: librdkafka's own log lines and errors, forwarded to tracing.
//!
//! The pipeline side (producer loop, appliers, marks that give the applied
//! LSN) lives in `crate::runtime` (`kafka_produce`, `kafka_apply`,
//! `kafka_chunks`, `kafka_schema`).

pub mod avro;
mod binary;
pub mod codec;
pub mod consumer;
pub mod decode;
mod delivery;
pub mod envelope;
pub mod frame;
mod idle;
pub mod logs;
mod pgtext;
pub mod producer;
pub mod snapshot;
pub mod wire;
