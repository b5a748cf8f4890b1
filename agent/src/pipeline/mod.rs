//! From the engines' rings to validated, sampled records on the export
//! queue: [`attach`] (discovery and the reader thread), [`spans`] (record →
//! spans), [`steps`] (engine steps joined to requests), [`metrics`],
//! [`sampling`], [`resource`], per-engine
//! [`accounting`] and [`throttle`]d warnings. Settings come in as plain values
//! ([`attach::ReaderSettings`]).

pub mod accounting;
pub mod attach;
pub mod crash;
pub mod metrics;
pub mod resource;
pub mod sampling;
pub mod spans;
pub mod stalls;
pub mod steps;
pub mod throttle;
