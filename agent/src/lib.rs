//! `ringside-agent`: attaches to running ringside engines through their
//! shared-memory segments and exports every request as OpenTelemetry gen_ai
//! spans and metrics over OTLP.
//!
//! ```text
//!  /dev/shm/ringside.*  ──poll──►  attach (reader thread)
//!                                   │ decode + validate, metrics, head and tail
//!                                   │ sampling, commit cursor
//!                                   ▼
//!                                 queue of validated records (bounded, memory cap,
//!                                   │ oldest dropped)
//!                                   ▼
//!                                 export (tokio): batch → spans::encode straight into
//!                                   one protobuf request → gRPC / HTTP (up to
//!                                   --max-in-flight at once) / console / file, with OTLP
//!                                   retry classification and backoff
//! ```
//!
//! Modules: [`config`] (flags over `OTEL_*`), [`attach`] (discovery and the
//! reader), [`spans`] (record → spans), [`resource`], [`sampling`],
//! [`metrics`], [`queue`], [`export`], [`retry`], [`console`], [`stats`]
//! (per-engine accounting); the control plane: [`control`] (control-block
//! settings), [`operator`] (`tracing`, `set`), [`status`] with [`state`]
//! (the daemon's published counters), [`top`], [`admin`] (HTTP API) with
//! [`prometheus`], and [`table`].

pub mod config;
pub mod control;
pub mod export;
pub mod pipeline;

use crate::config::{Cli, Command, ConfigError, RunArgs, Settings};
use crate::export::{ExportSetupError, Exporter, Transport};
use crate::pipeline::metrics::{ExportCounters, Metrics};
use crate::export::queue::ExportQueue;
use crate::pipeline::resource::ResourceEnv;
use crate::pipeline::accounting::EngineHandle;
use crate::control::{admin_api, commands, published_state, status, top};
use crate::pipeline::{attach, resource};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration was refused; nothing was started.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// The exporter could not be set up; nothing was attached.
    #[error("exporter: {0}")]
    Export(#[from] ExportSetupError),
    /// The async runtime or a signal handler could not be set up.
    #[error("{what}: {source}")]
    Runtime {
        /// What was being set up.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The reader thread panicked; cursors were committed up to the last
    /// batch it handed on.
    #[error("the reader thread panicked")]
    ReaderPanicked,
    /// The export task panicked; what was queued was not flushed.
    #[error("the export task panicked")]
    ExporterPanicked,
    /// The admin API could not start.
    #[error(transparent)]
    Admin(#[from] admin_api::AdminError),
    /// `top` failed.
    #[error(transparent)]
    Top(#[from] top::TopError),
    /// `status` failed.
    #[error(transparent)]
    Status(#[from] status::StatusError),
    /// An operator command (`tracing`, `set`) failed.
    #[error(transparent)]
    Operator(#[from] commands::OperatorError),
}

impl RunError {
    /// The process exit code for this error: 2 for configuration, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) => 2,
            _ => 1,
        }
    }
}

/// Tells systemd (`$NOTIFY_SOCKET`) the agent's state; nothing without it.
fn notify_systemd(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd ($NOTIFY_SOCKET)");
    }
}

/// Runs the command line.
pub fn run(cli: Cli) -> Result<(), RunError> {
    match cli.command {
        Command::Run(args) => run_agent(&args),
        Command::Tracing(args) => Ok(commands::tracing(&args)?),
        Command::Set(args) => Ok(commands::set(&args)?),
        Command::Status(args) => Ok(status::run(&args)?),
        Command::Top(args) => Ok(top::run(&args)?),
    }
}

/// Re-reads the command line and its config file (SIGHUP): the exporter
/// settings and the head sampler for the running agent, and the new
/// settings; `None` (logged) if the new configuration cannot be used, and
/// the agent goes on as it was.
fn reload(current: &Settings) -> Option<(export::ExporterUpdate, Settings)> {
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
    let env = |name: &str| std::env::var(name).ok();
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
    if !fixed.is_empty() {
        tracing::warn!(settings = ?fixed, "SIGHUP: these settings take effect only on restart");
    }
    tracing::info!(
        exporter = %new.target.describe(),
        sampler = ?new.sampler,
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
    };
    Some((update, new))
}

/// Writes the state file; the first failure is logged, later ones only at
/// debug level.
fn publish_state(
    registry: &Mutex<Vec<Arc<EngineHandle>>>,
    path: &std::path::Path,
    warned: &mut bool,
) {
    let state = {
        let registry = registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        published_state::collect(&registry, unix_now_ns() / 1_000_000)
    };
    match published_state::write(path, &state) {
        Ok(()) => *warned = false,
        Err(e) if !*warned => {
            tracing::warn!(error = %e, "cannot publish the agent state; `ringside-agent status` will lack the agent's counters (set --state-file)");
            *warned = true;
        }
        Err(e) => tracing::debug!(error = %e, "cannot publish the agent state"),
    }
}

pub(crate) fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// `ringside-agent run`: attach, export, and on SIGTERM / SIGINT flush and
/// report what could not be delivered.
pub fn run_agent(args: &RunArgs) -> Result<(), RunError> {
    // Where the kernel backs every large anonymous mapping with transparent
    // huge pages (`always`), each 2 MiB page of a heap of a few MiB counts
    // whole in RSS and in a container's memory limit; a small sidecar has no
    // use for them. Best effort: a kernel without the flag keeps them.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    let env = |name: &str| std::env::var(name).ok();
    let settings = Settings::resolve(args, &env)?;
    let resource_env = ResourceEnv::from_env(&env, resource::host_name());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|source| RunError::Runtime {
            what: "starting the async runtime",
            source,
        })?;
    runtime.block_on(serve(settings, resource_env))
}

async fn serve(settings: Settings, resource_env: ResourceEnv) -> Result<(), RunError> {
    use tokio::signal::unix::{SignalKind, signal};
    let transport = Transport::new(&settings.target)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(|source| RunError::Runtime {
        what: "installing the SIGTERM handler",
        source,
    })?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|source| RunError::Runtime {
        what: "installing the SIGINT handler",
        source,
    })?;
    let queue = Arc::new(ExportQueue::new(
        settings.queue_max_items,
        settings.queue_max_bytes,
        settings.batch_size,
    ));
    let metrics = Arc::new(Mutex::new(Metrics::new(unix_now_ns())));
    let counters = Arc::new(ExportCounters::default());
    let registry: Arc<Mutex<Vec<Arc<EngineHandle>>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    tracing::info!(exporter = %settings.target.describe(), engines = ?settings.engines, backfill = settings.backfill, "ringside-agent starting");

    let (admin_stop_tx, admin_stop_rx) = tokio::sync::watch::channel(false);
    let admin_task = match &settings.admin {
        None => None,
        Some(admin_settings) => {
            let state = admin_api::AdminState {
                registry: Arc::clone(&registry),
                metrics: Arc::clone(&metrics),
                counters: Arc::clone(&counters),
                queue: Arc::clone(&queue),
                engines: settings.engines.clone(),
                trusted_uids: settings.trusted_uids.clone(),
                token: admin_settings.token.as_deref().map(Arc::from),
            };
            match admin_api::serve(admin_settings.listen, state, admin_stop_rx).await {
                Ok(task) => Some(task),
                Err(e) if !admin_settings.explicit => {
                    tracing::warn!(error = %e, "admin API not started (the default address is taken; give --admin-listen)");
                    None
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    let mut sighup = signal(SignalKind::hangup()).map_err(|source| RunError::Runtime {
        what: "installing the SIGHUP handler",
        source,
    })?;
    let (update_tx, update_rx) = tokio::sync::mpsc::channel(1);
    let sampler_update;
    let reader_thread = {
        let mut reader = attach::Reader::new(
            settings.clone(),
            resource_env,
            Arc::clone(&queue),
            Arc::clone(&metrics),
            Arc::clone(&registry),
        );
        sampler_update = reader.sampler_update();
        let stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("ringside-reader".into())
            .spawn(move || reader.run(&stop))
            .map_err(|source| RunError::Runtime {
                what: "starting the reader thread",
                source,
            })?
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut exporter = Exporter::new(
        transport,
        Arc::clone(&queue),
        Arc::clone(&metrics),
        Arc::clone(&counters),
        settings.batch_size,
        settings.batch_delay,
        settings.retry_max_elapsed,
        settings.metrics_interval,
    );
    exporter.shutdown_timeout = settings.shutdown_timeout;
    exporter.max_in_flight = settings.max_in_flight;
    let export_task = tokio::spawn(async move {
        exporter.run_with_updates(stop_rx, update_rx).await;
        exporter
    });
    let state_task = {
        let registry = Arc::clone(&registry);
        let path = settings.state_file.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            let mut warned = false;
            loop {
                tick.tick().await;
                publish_state(&registry, &path, &mut warned);
            }
        })
    };
    tracing::info!(path = %settings.state_file.display(), "publishing counters for `ringside-agent status`");
    // Type=notify units: up once the exporter, the reader and the admin API run.
    notify_systemd(&[sd_notify::NotifyState::Ready]);

    let mut current = settings.clone();
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = sighup.recv() => {
                if let Some((update, new)) = reload(&current) {
                    if let Ok(mut slot) = sampler_update.lock() {
                        *slot = Some(new.sampler.clone());
                    }
                    if update_tx.send(update).await.is_err() {
                        tracing::warn!("reload: the exporter has stopped");
                    }
                    current = new;
                }
            }
        }
    }
    notify_systemd(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("flushing"),
    ]);
    let deadline = Instant::now() + settings.shutdown_timeout;
    stop.store(true, Ordering::Relaxed);
    let reader_result = tokio::task::spawn_blocking(move || reader_thread.join()).await;
    let _ = stop_tx.send(true);
    let mut exporter = export_task.await.map_err(|_| RunError::ExporterPanicked)?;
    let flush = exporter.flush(deadline).await;
    state_task.abort();
    if settings.state_file_default {
        // Nobody is left to vouch for these counters.
        let _ = std::fs::remove_file(&settings.state_file);
    } else {
        // The final counters, for whoever asked for this file.
        publish_state(&registry, &settings.state_file, &mut false);
    }
    let _ = admin_stop_tx.send(true);
    if let Some(task) = admin_task {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), task).await;
    }
    let not_delivered = flush.left_in_queue + flush.failed;
    let mut total_failed = 0;
    if let Ok(registry) = registry.lock() {
        for engine in registry.iter() {
            let s = engine.stats.snapshot();
            total_failed += s.export_failed + s.queue_dropped;
            tracing::info!(
                engine = %engine.instance,
                pid = engine.pid,
                written = engine.stats.engine_written.load(Ordering::Relaxed),
                before_attach = s.skipped_at_attach,
                read = s.read,
                exported = s.exported,
                sampled_out = s.sampled_out,
                invalid = s.invalid,
                lost_overwritten = s.lost_overwritten,
                lost_abandoned = s.lost_abandoned,
                queue_dropped = s.queue_dropped,
                export_failed = s.export_failed,
                pending = s.pending(),
                spans_exported = s.spans_exported,
                "accounting"
            );
        }
    }
    if not_delivered > 0 {
        tracing::warn!(
            requests = not_delivered,
            left_in_queue = flush.left_in_queue,
            failed_during_flush = flush.failed,
            "shutdown: requests could not be delivered"
        );
    } else {
        tracing::info!(
            not_delivered = 0,
            dropped_or_failed_since_start = total_failed,
            "shutdown: everything queued was delivered"
        );
    }
    match reader_result {
        Ok(Ok(())) => Ok(()),
        _ => Err(RunError::ReaderPanicked),
    }
}
