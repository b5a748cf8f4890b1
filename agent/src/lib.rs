//! `ringside-agent`: attaches to running ringside engines through their
//! shared-memory segments and exports every request as OpenTelemetry gen_ai
//! spans and metrics over OTLP.
//!
//! ```text
//!  /dev/shm/ringside.*  ──poll──►  pipeline::attach (reader thread)
//!                                   │ decode + validate, metrics, head and tail
//!                                   │ sampling; commits the cursor past what is
//!                                   │ settled (exported / sampled out / lost)
//!                                   ▼
//!                                 export::queue of validated records (bounded,
//!                                   │ memory cap, oldest dropped)
//!                                   ▼
//!                                 export (tokio): batch → spans::encode straight into
//!                                   one protobuf request (wire) → gRPC / HTTP (up to
//!                                   --max-in-flight at once) / console / file, with OTLP
//!                                   retry classification and backoff
//! ```
//!
//! Modules, by concern:
//! * [`config`]: the command line (clap) and `OTEL_*` resolution into
//!   [`Settings`];
//! * [`daemon`]: `run`'s start-up, run loop and shutdown, the glue between
//!   the configuration and everything below;
//! * [`pipeline`]: attaching to engines and reading their rings, records to
//!   spans, metrics, sampling, the resource, per-engine accounting;
//! * [`export`]: the queue, batching, the OTLP gRPC and HTTP transports, the
//!   console and file exporters, retry and backoff;
//! * [`capture`]: incident capture: `snapshot`, and the daemon's captures
//!   on a death, an error burst, a TTFT p99 breach or SIGUSR1;
//! * [`control`]: the control plane: control-block writes, the operator
//!   commands (`tracing`, `set`), `status` with the daemon's published
//!   state, `top`, `inflight`, the admin HTTP API with its Prometheus exposition;
//! * [`key_values`]: the `k=v,k2=v2` lists of the `OTEL_*` variables;
//! * [`duration`]: durations as operators write them (`500ms`, `10s`).
//!
//! Imports point one way: `config` and `daemon` use the plain value types
//! of `pipeline`, `export` and `control`, which never import `config`.

#![forbid(unsafe_code)]

pub mod capture;
pub mod config;
pub mod control;
pub mod daemon;
pub mod duration;
pub mod export;
pub mod key_values;
pub mod pipeline;

pub use config::{Cli, Command, ConfigError, ParseError, RunArgs, Settings, parse_command_line};
pub use export::{
    Compression, ExportQueue, ExportSetupError, ExportTarget, Exporter, Item, OtlpSettings,
    Protocol, Transport, encode_trace_request,
};
pub use pipeline::accounting::{EngineHandle, EngineStats};
pub use pipeline::attach::{Reader, ReaderSettings};
pub use pipeline::metrics::{ExportCounters, Metrics};
pub use pipeline::resource::ResourceEnv;
pub use pipeline::spans::{AttributeSet, SpanContext};

use config::TracingAction;
use control::{commands, inflight, status, top};

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration was refused; nothing was started.
    #[error("configuration: {0}")]
    Config(#[from] config::ConfigError),
    /// The exporter could not be set up; nothing was attached.
    #[error("exporter: {0}")]
    Export(#[from] export::ExportSetupError),
    /// The async runtime or a signal handler could not be set up.
    #[error("{what}: {source}")]
    Runtime {
        /// What was being set up.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The reader thread panicked; cursors were committed up to the last
    /// records settled (a successor re-reads the rest).
    #[error("the reader thread panicked")]
    ReaderPanicked,
    /// The export task panicked; what was queued was not flushed.
    #[error("the export task panicked")]
    ExporterPanicked,
    /// The admin API could not start.
    #[error(transparent)]
    Admin(#[from] control::admin_api::AdminError),
    /// `top` failed.
    #[error(transparent)]
    Top(#[from] control::top::TopError),
    /// `status` failed.
    #[error(transparent)]
    Status(#[from] control::status::StatusError),
    /// `inflight` failed.
    #[error(transparent)]
    Inflight(#[from] control::inflight::InflightError),
    /// An operator command (`tracing`, `set`) failed.
    #[error(transparent)]
    Operator(#[from] control::commands::OperatorError),
    /// `snapshot` failed.
    #[error(transparent)]
    Snapshot(#[from] capture::snapshot::SnapshotError),
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

/// Runs the command line.
pub fn run(cli: Cli) -> Result<(), RunError> {
    match cli.command {
        Command::Run(args) => daemon::run(&args),
        Command::Tracing(args) => Ok(match &args.action {
            TracingAction::On(selection) => commands::switch_tracing(&selection.selection(), true),
            TracingAction::Off(selection) => {
                commands::switch_tracing(&selection.selection(), false)
            }
            TracingAction::Status(show) => commands::show(&show.options()),
        }?),
        Command::Set(args) => Ok(commands::set(&args.selection.selection(), &args.change())?),
        Command::Status(args) => Ok(status::run(&args.options())?),
        Command::Top(args) => Ok(top::run(&args.options())?),
        Command::Inflight(args) => Ok(inflight::run(&args.options())?),
        Command::Snapshot(args) => {
            let options = args.options(&|name| std::env::var(name).ok())?;
            Ok(capture::snapshot::run(&options)?)
        }
    }
}
