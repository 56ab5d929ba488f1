//! Integration tests against a real PostgreSQL (see scripts/test.sh).

mod bad_input;
mod consistency;
mod support;
mod workload;
