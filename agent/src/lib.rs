//! Placeholder; the real crate is being written.
