//! Sources of change: only PostgreSQL for now.
pub mod postgres;
