//! Integration tests against a real PostgreSQL (see scripts/test.sh).

mod bad_input;
mod consistency;
mod cutover;
mod migrate;
mod support;
mod workload;
