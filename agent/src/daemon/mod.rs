//! `ringside-agent run`: the daemon, in three phases, each handing the next
//! the state it needs (as vector's `Application` → `StartedApplication` →
//! `FinishedApplication`):
//!
//! 1. [`Application::prepare`]: the configuration resolved into
//!    [`Settings`], the resource read from the environment; nothing started.
//! 2. [`Application::start`] → [`StartedApplication`]: the exporter's
//!    transport, the signal handlers, the export queue, the admin API, the
//!    reader thread, the export task and the state-file publisher running;
//!    systemd told `READY=1`. [`StartedApplication::run`] serves until
//!    SIGTERM / SIGINT, applying SIGHUP reloads (`reload`) and asking the
//!    reader for an incident capture on SIGUSR1 (`crate::capture`).
//! 3. [`FinishedApplication::shutdown`]: the reader stopped and joined (its
//!    final drain queued), the queue flushed within `--shutdown-timeout-ms`,
//!    then the cursors committed past everything the flush settled
//!    (exported or counted failed: a cursor never moves past a record still
//!    queued), the final counters published, the admin API stopped, and the
//!    accounting logged with what could not be delivered.
//!
//! This is where configuration meets the pipeline, the exporter and the
//! control plane: they take plain values, and only this module (with
//! [`crate::config`] itself) reads [`Settings`].

mod reload;

use crate::RunError;
use crate::config::{EnvFile, RunArgs, Settings};
use crate::control::{admin_api, published_state};
use crate::export::{ExportQueue, Exporter, ExporterUpdate, Transport};
use crate::pipeline::accounting::EngineHandle;
use crate::pipeline::attach;
use crate::pipeline::metrics::{ExportCounters, Metrics, unix_now_ns};
use crate::pipeline::resource::{self, ResourceEnv};
use crate::pipeline::sampling::Sampler;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::task::JoinHandle;

/// The engines attached so far, for the accounting and the state file.
type Registry = Arc<Mutex<Vec<Arc<EngineHandle>>>>;

/// `ringside-agent run`: attach, export, and on SIGTERM / SIGINT flush and
/// report what could not be delivered.
pub fn run(args: &RunArgs) -> Result<(), RunError> {
    let app = Application::prepare(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|source| RunError::Runtime {
            what: "starting the async runtime",
            source,
        })?;
    runtime.block_on(async move { app.start().await?.run().await.shutdown().await })
}

/// Phase 1: the resolved configuration; nothing is running yet.
#[derive(Debug)]
pub struct Application {
    settings: Settings,
    resource_env: ResourceEnv,
    /// `--env-file` as read at start (empty without one).
    env_file: EnvFile,
}

impl Application {
    /// Resolves the flags over the environment and reads the resource.
    pub fn prepare(args: &RunArgs) -> Result<Self, RunError> {
        // Where the kernel backs every large anonymous mapping with transparent
        // huge pages (`always`), each 2 MiB page of a heap of a few MiB counts
        // whole in RSS and in a container's memory limit; a small sidecar has no
        // use for them. Best effort: a kernel without the flag keeps them.
        let _ = rustix::thread::disable_transparent_huge_pages(true);
        let env_file = match &args.env_file {
            Some(path) => EnvFile::read(path)?,
            None => EnvFile::default(),
        };
        let process_env = |name: &str| std::env::var(name).ok();
        let env = |name: &str| env_file.lookup(&env_file, &process_env, name);
        let settings = Settings::resolve(args, &env)?;
        let resource_env = ResourceEnv::from_env(&env, resource::host_name());
        Ok(Self {
            settings,
            resource_env,
            env_file,
        })
    }

    /// Starts everything (inside the tokio runtime): the transport, the
    /// signal handlers, the queue, the admin API, the reader thread, the
    /// export task and the state-file publisher; then tells systemd the
    /// agent is ready.
    pub async fn start(self) -> Result<StartedApplication, RunError> {
        let Self {
            settings,
            resource_env,
            env_file,
        } = self;
        let transport = Transport::new(&settings.target)?;
        let sigterm = install(SignalKind::terminate(), "installing the SIGTERM handler")?;
        let sigint = install(SignalKind::interrupt(), "installing the SIGINT handler")?;
        let queue = Arc::new(ExportQueue::new(
            settings.queue_max_items,
            settings.queue_max_bytes,
            settings.batch_size,
        ));
        let metrics = Arc::new(Mutex::new(Metrics::new(unix_now_ns())));
        let counters = Arc::new(ExportCounters::default());
        let registry: Registry = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        tracing::info!(exporter = %settings.target.describe(), engines = ?settings.engines, backfill = settings.backfill, "ringside-agent starting");

        let (admin_stop_tx, admin_stop_rx) = tokio::sync::watch::channel(false);
        let admin_task = match &settings.admin {
            None => None,
            Some(admin_settings) => match admin_token(admin_settings, &settings.state_file) {
                Err(e) if !admin_settings.explicit => {
                    tracing::warn!(error = %e, "admin API not started (no token file could be written; give --admin-token-file)");
                    None
                }
                Err(e) => return Err(e.into()),
                Ok(token) => {
                    let state = admin_api::AdminState {
                        registry: Arc::clone(&registry),
                        metrics: Arc::clone(&metrics),
                        counters: Arc::clone(&counters),
                        queue: Arc::clone(&queue),
                        engines: settings.engines.clone(),
                        trusted_uids: settings.trusted_uids.clone(),
                        token: Arc::from(token),
                        loopback: admin_settings.listen.ip().is_loopback(),
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
            },
        };
        let sighup = install(SignalKind::hangup(), "installing the SIGHUP handler")?;
        let sigusr1 = install(
            SignalKind::user_defined1(),
            "installing the SIGUSR1 handler",
        )?;
        let (update_tx, update_rx) = tokio::sync::mpsc::channel(1);
        let sampler_update;
        let stall_after_update;
        let capture_signal;
        let reader_thread = {
            let mut reader = attach::Reader::new(
                settings.reader(),
                resource_env,
                Arc::clone(&queue),
                Arc::clone(&metrics),
                Arc::clone(&registry),
            );
            sampler_update = reader.sampler_update();
            stall_after_update = reader.stall_after_update();
            capture_signal = reader.capture_signal();
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("ringside-reader".into())
                .spawn(move || {
                    reader.run(&stop);
                    // Handed back: its cursors are committed after the flush.
                    reader
                })
                .map_err(|source| RunError::Runtime {
                    what: "starting the reader thread",
                    source,
                })?
        };
        let (export_stop_tx, export_stop_rx) = tokio::sync::watch::channel(false);
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
        exporter.export_metrics = settings.export_metrics;
        exporter.max_in_flight = settings.max_in_flight;
        let export_task = tokio::spawn(async move {
            exporter.run_with_updates(export_stop_rx, update_rx).await;
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
        Ok(StartedApplication {
            signals: Signals {
                sigterm,
                sigint,
                sighup,
                sigusr1,
            },
            capture_signal,
            update_tx,
            sampler_update,
            stall_after_update,
            env_file_at_start: env_file,
            running: Running {
                settings,
                registry,
                stop,
                reader_thread,
                export_stop_tx,
                export_task,
                state_task,
                admin_stop_tx,
                admin_task,
            },
        })
    }
}

/// The signals the daemon serves.
#[derive(Debug)]
struct Signals {
    sigterm: Signal,
    sigint: Signal,
    sighup: Signal,
    /// Capture every attached engine's window (incident capture).
    sigusr1: Signal,
}

/// What runs, and what the shutdown stops: handed from
/// [`StartedApplication`] to [`FinishedApplication`].
#[derive(Debug)]
struct Running {
    /// The settings the agent started with (those a reload cannot change
    /// among them: the state file, the shutdown timeout).
    settings: Settings,
    registry: Registry,
    /// Tells the reader thread to drain and stop.
    stop: Arc<AtomicBool>,
    /// Returns the reader (for the final cursor commit) when it stops.
    reader_thread: std::thread::JoinHandle<attach::Reader>,
    export_stop_tx: tokio::sync::watch::Sender<bool>,
    /// Returns the exporter (for the flush) when it stops.
    export_task: JoinHandle<Exporter>,
    state_task: JoinHandle<()>,
    admin_stop_tx: tokio::sync::watch::Sender<bool>,
    admin_task: Option<JoinHandle<()>>,
}

/// Phase 2: everything running; [`run`](Self::run) serves the signals.
#[derive(Debug)]
pub struct StartedApplication {
    signals: Signals,
    /// New exporter settings on SIGHUP.
    update_tx: tokio::sync::mpsc::Sender<ExporterUpdate>,
    /// New head sampler on SIGHUP (taken by the reader thread).
    sampler_update: Arc<Mutex<Option<Sampler>>>,
    /// New stall threshold (ns) on SIGHUP (read by the reader thread).
    stall_after_update: Arc<std::sync::atomic::AtomicU64>,
    /// Set on SIGUSR1: the reader thread captures every attached engine.
    capture_signal: Arc<AtomicBool>,
    /// `--env-file` as read at start: what a reload may find removed.
    env_file_at_start: EnvFile,
    running: Running,
}

impl StartedApplication {
    /// Serves until SIGTERM or SIGINT; a SIGHUP re-reads the configuration
    /// and hands the exporter and the reader what they can apply.
    pub async fn run(mut self) -> FinishedApplication {
        let mut current = self.running.settings.clone();
        loop {
            tokio::select! {
                _ = self.signals.sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
                _ = self.signals.sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
                _ = self.signals.sigusr1.recv() => {
                    tracing::info!("SIGUSR1: capturing every attached engine's window");
                    self.capture_signal.store(true, Ordering::Relaxed);
                }
                _ = self.signals.sighup.recv() => {
                    if let Some((update, new)) = reload::reload(&current, &self.env_file_at_start) {
                        if let Ok(mut slot) = self.sampler_update.lock() {
                            *slot = Some(new.sampler.clone());
                        }
                        self.stall_after_update.store(
                            u64::try_from(new.stall_after.as_nanos()).unwrap_or(u64::MAX),
                            std::sync::atomic::Ordering::Relaxed,
                        );
                        if self.update_tx.send(update).await.is_err() {
                            tracing::warn!("reload: the exporter has stopped");
                        }
                        current = new;
                    }
                }
            }
        }
        FinishedApplication {
            running: self.running,
        }
    }
}

/// Phase 3: a stop was asked for; [`shutdown`](Self::shutdown) flushes and
/// reports.
#[derive(Debug)]
pub struct FinishedApplication {
    running: Running,
}

impl FinishedApplication {
    /// Stops the reader (its final drain), flushes the queue within the
    /// shutdown timeout, commits the cursors past what the flush settled,
    /// publishes the final counters (or
    /// removes the default state file), stops the admin API and logs the
    /// accounting. An error if the reader or the exporter panicked.
    pub async fn shutdown(self) -> Result<(), RunError> {
        let Running {
            settings,
            registry,
            stop,
            reader_thread,
            export_stop_tx,
            export_task,
            state_task,
            admin_stop_tx,
            admin_task,
        } = self.running;
        notify_systemd(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("flushing"),
        ]);
        let deadline = Instant::now() + settings.shutdown_timeout;
        stop.store(true, Ordering::Relaxed);
        let reader_result = tokio::task::spawn_blocking(move || reader_thread.join()).await;
        let _ = export_stop_tx.send(true);
        let mut exporter = export_task.await.map_err(|_| RunError::ExporterPanicked)?;
        let flush = exporter.flush(deadline).await;
        // Only now is everything the reader handed on exported or counted
        // failed (and dropped): the cursors may move past all of it.
        let reader_result = match reader_result {
            Ok(Ok(mut reader)) => {
                let unsettled = reader.commit_settled_cursors();
                if unsettled > 0 {
                    tracing::warn!(
                        engines = unsettled,
                        "shutdown: records still unsettled; their cursors stay (a successor re-reads them)"
                    );
                }
                Ok(())
            }
            _ => Err(RunError::ReaderPanicked),
        };
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
        if settings.admin.as_ref().is_some_and(|a| a.token.is_none()) {
            // The generated token dies with the agent.
            let _ = std::fs::remove_file(admin_api::generated_token_path(&settings.state_file));
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
        reader_result
    }
}

fn install(kind: SignalKind, what: &'static str) -> Result<Signal, RunError> {
    signal(kind).map_err(|source| RunError::Runtime { what, source })
}

/// Tells systemd (`$NOTIFY_SOCKET`) the agent's state; nothing without it.
fn notify_systemd(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd ($NOTIFY_SOCKET)");
    }
}

/// Writes the state file; the first failure is logged, later ones only at
/// debug level.
/// The admin API's token: the operator's, or a generated one written beside
/// the state file (`<stem>.admin-token`, 0600) for `curl` and scrapers.
fn admin_token(
    admin: &admin_api::AdminSettings,
    state_file: &std::path::Path,
) -> Result<String, admin_api::AdminError> {
    if let Some(token) = &admin.token {
        return Ok(token.clone());
    }
    let path = admin_api::generated_token_path(state_file);
    let group = admin_api::own_group_gid(admin_api::TOKEN_GROUP);
    let token = admin_api::generate_token()
        .and_then(|token| admin_api::write_token_file(&path, &token, group).map(|()| token))
        .map_err(|source| admin_api::AdminError::TokenFile {
            path: path.clone(),
            source,
        })?;
    let readers = if group.is_some() {
        "this user, root and group ringside"
    } else {
        "this user and root"
    };
    tracing::info!(path = %path.display(), readable_by = readers, "admin API: generated its bearer token");
    Ok(token)
}

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
