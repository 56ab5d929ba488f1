//! Integration tests against a real PostgreSQL (see scripts/test.sh).

mod bad_input;
mod consistency;
mod cutover;
mod cutover_crash;
mod kafka;
mod kafka_cutover;
mod kafka_faults;
mod kafka_pipeline;
mod migrate;
#[path = "../support/registry.rs"]
mod registry;
mod sink;
mod streamed;
mod support;
mod typed;
mod visibility;
mod workload;
