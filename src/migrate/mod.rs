//! Versioned migrations (see the submodules).

pub mod files;
pub mod graph;
pub mod lint;
