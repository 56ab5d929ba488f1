//! Sinks: apply batches of change events to a target, idempotently.
//!
//! Delivery contract: **at least once**. A batch can arrive again after a
//! crash, so applying it twice must change nothing; batches arrive in source
//! commit order, and per key the sink preserves that order.

pub mod fold;
pub mod postgres;
