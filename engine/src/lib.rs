//! ringside-engine: an OpenAI-compatible llama.cpp server with continuous batching whose only
//! telemetry work is one wait-free record per request into the ringside shared-memory ring.
//!
//! Modules, in request order: [`api`] (HTTP) parses with [`openai`], stamps with [`clock`],
//! reads [`trace_context`], bounds the work before admission with [`admission`], tokenizes
//! with [`model`]/[`chat_template`] and hands a job to the
//! [`scheduler`], whose inference thread samples with [`sampling`], cuts text with [`stop`],
//! and at the end records a [`telemetry::RequestOutcome`]. [`metrics`] backs `/metrics`;
//! [`server`] wires it together from the [`cli`] arguments and [`http_server`] is its front
//! door (connection cap, timeouts, lingering close).

#![forbid(unsafe_code)]

pub mod admission;
pub mod api;
pub mod chat_template;
pub mod cli;
pub mod clock;
pub mod companion;
pub mod http_server;
pub mod metrics;
pub mod model;
pub mod omp;
pub mod openai;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod stop;
pub mod telemetry;
pub mod trace_context;
