//! The `kafka` transport: change events as Avro records (Confluent wire
//! format, Debezium-compatible envelope) in Kafka topics.

pub mod avro;
pub mod codec;
pub mod consumer;
pub mod decode;
pub mod envelope;
pub mod producer;
