//! SIGHUP: the command line, its config file and its env file read again, and what of
//! the new configuration the running daemon can apply without a restart
//! (the exporter's transport and batching, the head sampler, the stall
//! threshold).

use crate::config::{self, Command, EnvFile, Settings};
use crate::export::{self, Transport};

/// Re-reads the command line and its config file (SIGHUP): the exporter
/// settings and the head sampler for the running agent, and the new
/// settings; `None` (logged) if the new configuration cannot be used, and
/// the agent goes on as it was.
pub(super) fn reload(
    current: &Settings,
    env_file_at_start: &EnvFile,
) -> Option<(export::ExporterUpdate, Settings)> {
    let cli = match config::parse_command_line(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: configuration not reloaded");
            return None;
        }
    };
    let Command::Run(args) = cli.command else {
        return None;
    };
    // The service manager read the environment file only at start: read it again.
    let env_file = match &args.env_file {
        Some(path) => match EnvFile::read(path) {
            Ok(file) => file,
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: configuration not reloaded");
                return None;
            }
        },
        None => EnvFile::default(),
    };
    let process_env = |name: &str| std::env::var(name).ok();
    let env = |name: &str| env_file.lookup(env_file_at_start, &process_env, name);
    let new = match Settings::resolve(&args, &env) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: configuration not reloaded");
            return None;
        }
    };
    let transport = match Transport::new(&new.target) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: configuration not reloaded");
            return None;
        }
    };
    let mut fixed = Vec::new();
    if new.engines != current.engines {
        fixed.push("engine");
    }
    if new.queue_max_items != current.queue_max_items
        || new.queue_max_bytes != current.queue_max_bytes
    {
        fixed.push("queue-max-*");
    }
    if new.admin != current.admin {
        fixed.push("admin-*");
    }
    if new.state_file != current.state_file {
        fixed.push("state-file");
    }
    if new.capture != current.capture {
        fixed.push("capture-*");
    }
    if !fixed.is_empty() {
        tracing::warn!(settings = ?fixed, "SIGHUP: these settings take effect only on restart");
    }
    tracing::info!(
        exporter = %new.target.describe(),
        sampler = ?new.sampler,
        stall_after_ms = new.stall_after.as_millis() as u64,
        batch_size = new.batch_size,
        batch_delay_ms = new.batch_delay.as_millis() as u64,
        "SIGHUP: configuration reloaded"
    );
    let update = export::ExporterUpdate {
        transport,
        batch_size: new.batch_size,
        batch_delay: new.batch_delay,
        max_in_flight: new.max_in_flight,
        retry_max_elapsed: new.retry_max_elapsed,
        metrics_interval: new.metrics_interval,
        export_metrics: new.export_metrics,
    };
    Some((update, new))
}
