//! The control plane: [`control_block`] (reading and writing engines'
//! control blocks), the operator [`commands`] (`tracing`, `set`), the
//! incident [`snapshot`],
//! [`status`] with the daemon's [`published_state`], [`top`], [`inflight`], the
//! [`admin_api`] with its [`prometheus`] exposition, and [`table`].
//! Commands take plain option values; the clap types stay in `config`.

pub mod admin_api;
pub mod commands;
pub mod control_block;
pub mod inflight;
pub mod prometheus;
pub mod published_state;
pub mod snapshot;
pub mod status;
pub mod table;
pub mod top;
