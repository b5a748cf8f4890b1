//! `serve`: bind, load the model in the background (503 until ready), serve until a signal.
//!
//! In three phases, each handing its state to the next (the shape of vector's `src/app.rs`):
//!
//! 1. **Start-up** — `Application::prepare` resolves the model, binds the socket, creates
//!    the telemetry segment and starts the companion agent; `Application::start` then starts
//!    the heartbeat, the HTTP server (503 until ready) and the model load in the background,
//!    which starts the scheduler's inference thread and tells systemd `READY=1`.
//! 2. **Run** — `StartedApplication::run` serves until SIGINT/SIGTERM or until loading fails.
//! 3. **Shutdown** — `FinishedApplication::shutdown` tells systemd `STOPPING=1`, drains the
//!    HTTP server, drops the scheduler so the inference thread ends and joins it (the
//!    telemetry segment's name goes with the last handle), then stops the companion agent.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::admission::{PromptBound, WorkGate};
use crate::api::{AppState, Ready, router};
use crate::cli::ServeArgs;
use crate::companion::{self, Companion};
use crate::http_server::{self, HttpLimits};
use crate::metrics::Metrics;
use crate::model::{self, LoadModelError};
use crate::scheduler::{self, SchedulerConfig, StartError};
use crate::telemetry::rejections::RejectionLimiter;
use crate::telemetry::{Telemetry, TelemetryError};

/// Why `serve` failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The model could not be found or loaded.
    #[error(transparent)]
    Model(#[from] LoadModelError),
    /// The inference thread could not start.
    #[error(transparent)]
    Scheduler(#[from] StartError),
    /// The telemetry segment could not be created.
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    /// `--otlp-traces-endpoint` was given but the companion agent could not be started.
    #[error(transparent)]
    Companion(#[from] crate::companion::CompanionError),
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("HTTP server error: {0}")]
    Http(#[source] std::io::Error),
    /// `--api-key-file` is unusable.
    #[error(transparent)]
    ApiKey(#[from] crate::cli::ApiKeyError),
    /// The descriptor limit leaves no room for connections.
    #[error(transparent)]
    Descriptors(#[from] http_server::NoDescriptorsError),
    /// The loading task panicked or was cancelled.
    #[error("model loading task failed: {0}")]
    LoadTask(String),
}

/// Served model names: the given ones, else the file name without `.gguf`.
fn model_names(args: &ServeArgs, path: &std::path::Path) -> Vec<String> {
    let given: Vec<String> = args
        .served_model_name
        .iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    if !given.is_empty() {
        return given;
    }
    let stem = path
        .file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "model".to_owned());
    vec![stem]
}

/// SIGINT and SIGTERM, installed once at start so that a second one is caught too.
struct Signals {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Self {
        Self {
            #[cfg(unix)]
            terminate: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(|e| tracing::warn!(error = %e, "cannot catch SIGTERM"))
                .ok(),
        }
    }

    /// The next SIGINT or SIGTERM.
    async fn next(&mut self) {
        #[cfg(unix)]
        let terminate = async {
            match self.terminate.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = terminate => {}
        }
    }
}

/// Tells systemd (`$NOTIFY_SOCKET`, set for `Type=notify` units) the engine's state; does
/// nothing elsewhere. A failure only costs the notification.
fn notify_systemd(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd ($NOTIFY_SOCKET)");
    }
}

/// Runs the server until SIGINT/SIGTERM, or until loading fails.
///
/// # Errors
/// See [`ServeError`].
pub async fn serve(args: ServeArgs) -> Result<(), ServeError> {
    let application = Application::prepare(args).await?;
    let finished = application.start().run().await;
    finished.shutdown().await
}

/// Start-up, first half: everything that can refuse to start before anything runs.
struct Application {
    args: ServeArgs,
    /// The model file.
    path: PathBuf,
    /// Served model names (the telemetry segment's model table).
    names: Vec<String>,
    addr: SocketAddr,
    listener: tokio::net::TcpListener,
    telemetry: Telemetry,
    companion: Option<Companion>,
    /// The API key, read once.
    api_key: Option<String>,
    /// `--max-connections`, lowered to what RLIMIT_NOFILE allows.
    max_connections: usize,
}

impl Application {
    /// Resolves the model file, binds the socket, creates the telemetry segment and starts the
    /// companion agent (when one is wanted).
    async fn prepare(args: ServeArgs) -> Result<Self, ServeError> {
        let api_key = args.effective_api_key()?;
        let path = model::resolve_model_path(args.model.as_deref())?;
        let names = model_names(&args, &path);
        let addr = SocketAddr::new(args.host, args.port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        let telemetry = Telemetry::create(
            &args.instance_name(),
            &names,
            args.ring_capacity,
            inflight_capacity(args.parallel, args.max_queue),
            args.step_ring_capacity,
            args.tracing == crate::cli::Switch::On,
            // The bound port: `--port 0` picks one.
            listener.local_addr().map_or(args.port, |a| a.port()),
        )?;
        if let Some(segment) = telemetry.segment_path() {
            tracing::info!(%segment, tracing = ?args.tracing, capacity = args.ring_capacity,
                step_capacity = args.step_ring_capacity, "telemetry ring created");
        }
        // What is open by now stays open; before the companion, which an error would orphan.
        let max_connections = http_server::fit_connection_cap(args.max_connections as usize)?;
        let companion = match companion::wanted(&args, |name| std::env::var(name).ok()) {
            None => None,
            Some(target) => match Companion::start(&args.instance_name(), &target) {
                Ok(companion) => Some(companion),
                // Asked for on the command line: refuse to run without it.
                Err(e) if matches!(target, companion::Target::Endpoint(_)) => {
                    return Err(e.into());
                }
                Err(e) => {
                    tracing::warn!("OTEL_EXPORTER_OTLP_* is set but {e}; not exporting");
                    None
                }
            },
        };
        Ok(Self {
            args,
            path,
            names,
            addr,
            listener,
            telemetry,
            companion,
            api_key,
            max_connections,
        })
    }

    /// Start-up, second half: starts the heartbeat, the model load in the background (which
    /// starts the scheduler and tells systemd `READY=1`) and the HTTP server.
    fn start(self) -> StartedApplication {
        let Self {
            args,
            path,
            names,
            addr,
            listener,
            telemetry,
            companion,
            api_key,
            max_connections,
        } = self;
        let threads = args.effective_threads();
        let metrics = Arc::new(Metrics::default());
        let heartbeat = telemetry.clone();
        let heartbeat_metrics = Arc::clone(&metrics);
        let state = Arc::new(AppState {
            model_names: names.clone(),
            api_key,
            max_request_bytes: args.max_request_bytes,
            body_read_timeout: args.body_read_timeout,
            max_queue: args.max_queue,
            metrics: Arc::clone(&metrics),
            telemetry: telemetry.clone(),
            ready: OnceLock::new(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            rejections: Arc::new(RejectionLimiter::new(args.rejection_records_per_second)),
            // Half the cores at most each: parsing large bodies and tokenizing must not starve
            // decoding or the HTTP workers (more runnable threads than cores stretch every
            // thread's wait for a turn, /health's too).
            tokenizer: WorkGate::new(crate::cli::available_threads() as usize / 2, args.max_queue),
            parser: WorkGate::new(crate::cli::available_threads() as usize / 2, args.max_queue),
        });
        // Not the state itself: its last handle must go at shutdown (it ends the scheduler).
        let rejections = Arc::clone(&state.rejections);
        // Also notices a removed telemetry segment and re-creates it (Telemetry::heartbeat),
        // and says what the rejection-record limit dropped, at most every REPORT_EVERY.
        let heartbeat_task = tokio::spawn(async move {
            const REPORT_EVERY: u32 = 10;
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            let mut ticks = 0u32;
            loop {
                tick.tick().await;
                heartbeat.heartbeat();
                heartbeat_metrics
                    .records_lost_segment_removed
                    .store(heartbeat.records_lost_segment_removed(), Ordering::Relaxed);
                ticks = ticks.wrapping_add(1);
                if ticks.is_multiple_of(REPORT_EVERY) {
                    let report = rejections.take_suppressed_report();
                    if !report.is_empty() {
                        tracing::warn!(suppressed = ?report, per_second = rejections.per_second(),
                            "rejection records rate-limited (ringside_rejection_records_suppressed_total)");
                    }
                }
            }
        });

        tracing::info!(%addr, model = %path.display(), names = ?names, threads,
            parallel = args.parallel, ctx_size = args.ctx_size.get(), instance = %args.instance_name(),
            "listening; loading model");

        let config = SchedulerConfig {
            parallel: args.parallel,
            ctx_size: args.ctx_size,
            batch_size: args.batch_size,
            threads,
            max_queue: args.max_queue,
            prompt_cache: !args.no_prompt_cache,
        };
        let (fatal_tx, fatal_rx) = oneshot::channel::<ServeError>();
        let load_watch = load_in_background(
            path,
            args.n_gpu_layers,
            args.chat_template.clone(),
            config,
            Arc::clone(&state),
            telemetry,
            fatal_tx,
        );

        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let limits = HttpLimits {
            max_connections,
            header_read_timeout: args.header_read_timeout,
            idle_timeout: args.idle_timeout,
        };
        let server = tokio::spawn(http_server::serve(
            listener,
            router(Arc::clone(&state)),
            limits,
            Arc::clone(&metrics),
            async move {
                let _ = stop_rx.await;
            },
        ));

        StartedApplication {
            state,
            heartbeat_task,
            companion,
            load_watch,
            fatal_rx,
            stop_tx,
            server,
            shutdown_timeout: args.shutdown_timeout,
        }
    }
}

/// Loads the model and starts the scheduler on a blocking thread; once it is ready, marks the
/// state ready and tells systemd `READY=1`. The returned task yields the inference thread, or
/// `None` after sending the load's error to `fatal_tx`.
fn load_in_background(
    path: PathBuf,
    n_gpu_layers: u32,
    chat_template: Option<String>,
    config: SchedulerConfig,
    state: Arc<AppState>,
    telemetry: Telemetry,
    fatal_tx: oneshot::Sender<ServeError>,
) -> JoinHandle<Option<std::thread::JoinHandle<()>>> {
    let loader = tokio::task::spawn_blocking(move || -> Result<_, ServeError> {
        let started = std::time::Instant::now();
        let loaded = model::load(&path, n_gpu_layers, chat_template.as_deref())?;
        let model = Arc::clone(&loaded.model);
        let prompt_bound = PromptBound::of(&model.llama);
        let (scheduler, thread) =
            scheduler::start(loaded, config, Arc::clone(&state.metrics), telemetry)?;
        tracing::info!(
            seconds = started.elapsed().as_secs_f32(),
            architecture = %model.architecture,
            chat_template = %model.template.describe(),
            n_ctx_per_sequence = scheduler.n_ctx_seq,
            max_token_bytes = prompt_bound.max_token_bytes().map_or(0, NonZeroUsize::get),
            tokenizers = state.tokenizer.concurrency(),
            "model loaded; serving"
        );
        let _ = state.ready.set(Ready {
            model,
            scheduler,
            prompt_bound,
        });
        state.metrics.loaded.store(1, Ordering::Relaxed);
        // Under systemd (Type=notify) the unit is started only now; dependants wait for
        // the model, not the socket.
        notify_systemd(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("serving"),
        ]);
        Ok(thread)
    });
    tokio::spawn(async move {
        let result = match loader.await {
            Ok(r) => r,
            Err(e) => Err(ServeError::LoadTask(e.to_string())),
        };
        match result {
            Ok(thread) => Some(thread),
            Err(e) => {
                let _ = fatal_tx.send(e);
                None
            }
        }
    })
}

/// Serving: the HTTP server, the model load (or the loaded scheduler) and the heartbeat run.
struct StartedApplication {
    state: Arc<AppState>,
    heartbeat_task: JoinHandle<()>,
    companion: Option<Companion>,
    /// Yields the inference thread once the model is loaded (`None` if loading failed).
    load_watch: JoinHandle<Option<std::thread::JoinHandle<()>>>,
    /// Loading's error; dropped unsent when loading succeeds.
    fatal_rx: oneshot::Receiver<ServeError>,
    /// Starts the HTTP server's graceful shutdown.
    stop_tx: oneshot::Sender<()>,
    /// Ends once every connection has.
    server: JoinHandle<()>,
    /// `--shutdown-timeout`.
    shutdown_timeout: Duration,
}

impl StartedApplication {
    /// Serves until SIGINT/SIGTERM, or until loading fails.
    async fn run(mut self) -> FinishedApplication {
        let mut signals = Signals::install();
        let fatal = tokio::select! {
            () = signals.next() => {
                tracing::info!(shutdown_timeout = ?self.shutdown_timeout, "shutting down");
                None
            }
            // A dropped sender means loading succeeded: keep serving until a signal.
            Ok(e) = &mut self.fatal_rx => Some(e),
        };
        // From here a second signal ends the process at once, whatever shutdown is waiting on.
        // A weak handle: the state's last strong one ends the scheduler at teardown.
        let state = Arc::downgrade(&self.state);
        tokio::spawn(async move {
            signals.next().await;
            exit_now(state.upgrade().as_deref()).await;
        });
        FinishedApplication {
            started: self,
            fatal,
        }
    }
}

/// Stopped serving, by a signal or because loading failed (`fatal`).
struct FinishedApplication {
    started: StartedApplication,
    fatal: Option<ServeError>,
}

impl FinishedApplication {
    /// Tells systemd `STOPPING=1`, drains the requests in flight, joins the inference thread
    /// and stops the companion agent last. After a failed load: the error, once the heartbeat
    /// and the companion are stopped.
    async fn shutdown(self) -> Result<(), ServeError> {
        let Self { started, fatal } = self;
        let StartedApplication {
            state,
            heartbeat_task,
            companion,
            load_watch,
            fatal_rx: _,
            stop_tx,
            mut server,
            shutdown_timeout,
        } = started;
        notify_systemd(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("draining requests in flight"),
        ]);
        let _ = stop_tx.send(());
        if let Some(e) = fatal {
            heartbeat_task.abort();
            stop_companion(companion).await;
            return Err(e);
        }
        let served = drain(&state, &mut server, shutdown_timeout).await;
        // Orderly teardown, so the telemetry segment's name is removed: the scheduler handle
        // goes with the state, the inference thread then drains and ends, and the last
        // telemetry clone (the heartbeat's) is dropped.
        let thread = load_watch.await.ok().flatten();
        drop(state);
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        heartbeat_task.abort();
        let _ = heartbeat_task.await;
        // Last: the companion drains what the engine wrote, flushes, and exits.
        stop_companion(companion).await;
        served
    }
}

/// How long the requests aborted at the shutdown deadline have to send their 503.
const ABORT_GRACE: Duration = Duration::from_secs(2);

/// Waits for the HTTP server to drain, up to `timeout`; then aborts what is left in the
/// scheduler (recorded as 503), gives the responses [`ABORT_GRACE`] and closes the rest.
async fn drain(
    state: &AppState,
    server: &mut JoinHandle<()>,
    timeout: Duration,
) -> Result<(), ServeError> {
    let joined = |r: Result<(), tokio::task::JoinError>| {
        r.or_else(|e| {
            if e.is_cancelled() {
                Ok(())
            } else {
                Err(ServeError::Http(std::io::Error::other(e.to_string())))
            }
        })
    };
    if let Ok(r) = tokio::time::timeout(timeout, &mut *server).await {
        return joined(r);
    }
    let in_flight = state.ready.get().map_or(0, |r| r.scheduler.in_flight());
    tracing::warn!(
        in_flight,
        ?timeout,
        "shutdown deadline: aborting the requests still in flight (recorded as 503)"
    );
    if let Some(ready) = state.ready.get() {
        ready.scheduler.abort_all();
    }
    if let Ok(r) = tokio::time::timeout(ABORT_GRACE, &mut *server).await {
        return joined(r);
    }
    tracing::warn!("closing the connections still open");
    server.abort();
    joined((&mut *server).await)
}

/// The second signal: abort what is in flight, give the inference thread a moment to record
/// it, and exit without the orderly teardown (the in-flight table keeps what is left for the
/// agent).
async fn exit_now(state: Option<&AppState>) -> ! {
    const RECORD_GRACE: Duration = Duration::from_millis(300);
    let ready = state.and_then(|s| s.ready.get());
    let in_flight = ready.map_or(0, |r| r.scheduler.in_flight());
    tracing::warn!(in_flight, "second signal: exiting now");
    if let Some(ready) = ready {
        ready.scheduler.abort_all();
        let until = tokio::time::Instant::now() + RECORD_GRACE;
        while ready.scheduler.in_flight() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    std::process::exit(EXIT_SECOND_SIGNAL)
}

/// Exit status after a second SIGTERM/SIGINT (128 + SIGTERM, as a shell reports it).
const EXIT_SECOND_SIGNAL: i32 = 143;

/// Stops the companion agent, if there is one, off the async threads.
async fn stop_companion(companion: Option<Companion>) {
    if let Some(companion) = companion {
        let _ = tokio::task::spawn_blocking(move || companion.stop()).await;
    }
}

/// One in-flight entry per request the engine can hold at once: every slot and every queue
/// place (the ABI bounds the table; beyond that, requests are counted untracked).
fn inflight_capacity(parallel: u32, max_queue: usize) -> u32 {
    let wanted = u64::from(parallel).saturating_add(max_queue as u64);
    u32::try_from(wanted.min(u64::from(ringside_shm_protocol::MAX_INFLIGHT))).unwrap_or(0)
}
