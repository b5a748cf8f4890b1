//! Command line and `OTEL_*` environment: parsed ([`cli`], with the
//! `--config` file in [`file`](mod@file), the `--env-file` in [`env_file`]), checked and resolved into one [`Settings`]
//! value ([`settings`], the OTLP settings in [`otlp`]). Flags override the
//! environment; anything that cannot be understood is refused with a
//! [`ConfigError`] naming the setting.
//!
//! Resolved settings are the plain value types of the modules that own
//! them ([`ExportTarget`](crate::export::ExportTarget),
//! [`Sampler`](crate::pipeline::sampling::Sampler),
//! [`AttributeSet`](crate::pipeline::spans::AttributeSet),
//! [`AdminSettings`](crate::control::admin_api::AdminSettings), …): this
//! module depends on them, never the reverse.

pub mod capture;
pub mod cli;
pub mod env_file;
pub mod file;
pub mod otlp;
pub mod settings;
#[cfg(test)]
mod tests;
pub mod trust;

pub use cli::{
    AttributeSetArg, CaptureArgs, Cli, Command, DetailArg, ExportArgs, ExporterKind, RunArgs,
    SelectionArgs, SetArgs, ShowArgs, SnapshotArgs, StatusArgs, TopArgs, TracingAction,
    TracingArgs,
};
pub use env_file::EnvFile;
pub use file::{ParseError, config_file_args, parse_command_line};
pub use settings::{DEFAULT_ADMIN_LISTEN, Settings};

/// A setting that cannot be used. The agent does not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The value of a setting is not understood.
    #[error("invalid {setting}: {value:?}: {reason}")]
    Invalid {
        /// The flag or variable.
        setting: String,
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// A setting another one requires is missing.
    #[error("{setting} is required {when}")]
    Missing {
        /// The flag or variable.
        setting: &'static str,
        /// When it is required.
        when: &'static str,
    },
}

pub(crate) fn invalid(setting: &str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting: setting.to_owned(),
        value: value.to_owned(),
        reason: reason.into(),
    }
}
