//! The boundary between the source and the sink.
//!
//! The source hands [`Batch`]es (change events plus the position that is
//! safe to confirm once they are durable) to a transport; the applier side
//! receives them in order and, after the target commit, reports the batch's
//! position through the source's [`AckFn`]. The source never learns how the
//! batch travelled: `direct` is an in-process bounded channel (back-pressure:
//! a slow sink stops the reader, and the slot keeps the WAL); a Kafka
//! transport will report durability when the broker acknowledged a batch and
//! commit consumer offsets after the target write, with the same two ends.
//!
//! [`Batch`]: crate::model::Batch
//! [`AckFn`]: crate::source::postgres::replication::AckFn

pub mod direct;
pub mod kafka;
