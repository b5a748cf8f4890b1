//! The control plane.

pub mod admin_api;
pub mod commands;
pub mod control_block;
pub mod prometheus;
pub mod published_state;
pub mod status;
pub mod table;
pub mod top;
