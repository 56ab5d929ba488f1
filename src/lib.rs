//! rowshift: zero-downtime PostgreSQL table rewrites driven by change data
//! capture.
//!
//! Layers, lowest first (a module only uses the ones above it in this list):
//! `spec`, `model`, `error`, `blocking` → `transform` → `source`, `sink`, `transport`,
//! `state` → `backfill`, `preflight` → `verify` → `runtime`, `cutover`, `plan`. Sources,
//! transports and sinks never import the runtime.

pub mod backfill;
pub mod blocking;
pub mod calendar;
pub mod cutover;
pub mod error;
pub mod failpoint;
pub mod migrate;
pub mod model;
pub mod plan;
pub mod preflight;
pub mod runtime;
pub mod sink;
pub mod source;
pub mod spec;
pub mod state;
pub mod transform;
pub mod transport;
pub mod verify;

pub use error::{Error, Result};
