//! The `kafka` transport: change events as Avro records in Kafka topics
//! (Confluent wire format, Debezium-compatible envelope).
//!
//! Built so far, each tested against both test brokers (tansu, noida-db):
//! - [`avro`]: PostgreSQL types → Avro types and text values → Avro values
//!   (refusing the types it cannot carry);
//! - [`envelope`]: per-table key/value schemas and the records of every kind
//!   of change (a key change is a delete plus a create; deletes are followed
//!   by a tombstone; unchanged TOAST columns are listed in `unavailable`);
//! - [`codec`]: Confluent wire-format encoding through
//!   `schema_registry_converter` (schemas registered under `<topic>-key` and
//!   `<topic>-value`);
//! - [`producer`]: idempotent, `acks=all`; a send returns after the broker's
//!   acknowledgement;
//! - [`decode`] and [`consumer`]: a consumer-group member that turns records
//!   back into change events and commits offsets only when told.
//!
//! Not wired into pipelines yet (`transport.kind: kafka` is still refused by
//! the pipeline reader). The plan for the rest:
//! - The producer runs in `rowshift run`: replication reader → records →
//!   sends in flight in stream order; the slot is confirmed up to the newest
//!   position whose every earlier send was acknowledged.
//! - The backfill moves to the producer as DBLog watermarks (the design's
//!   invariant 1): a low watermark message, the chunk's select, a high
//!   watermark message; rows of the chunk whose keys change between the two
//!   are dropped, the rest are produced as `op: r` right at the high
//!   watermark. Every write of the target then goes through the partitioned
//!   stream in per-key order, so any number of appliers can share it.
//! - Appliers (`rowshift run` and `rowshift apply NAME`) apply polled events
//!   with the PostgreSQL sink and record per-partition positions in the
//!   state store in the same transaction; heartbeats and the cut-over fence
//!   are produced to every partition, so "applied past X" is the minimum
//!   over partitions.

pub mod avro;
pub mod codec;
pub mod consumer;
pub mod decode;
pub mod envelope;
pub mod producer;
pub mod snapshot;
