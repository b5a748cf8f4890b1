//! From the engines' rings to validated, sampled records on the export queue.

pub mod accounting;
pub mod attach;
pub mod metrics;
pub mod resource;
pub mod sampling;
pub mod spans;
