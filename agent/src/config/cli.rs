//! The command line: the clap types of every subcommand, and how they turn
//! into the plain values the pipeline and the control plane take.

use crate::control::commands::ShowOptions;
use crate::control::control_block::{Change, EngineSelection};
use crate::control::inflight::InflightOptions;
use crate::control::status::StatusOptions;
use crate::control::top::TopOptions;
use crate::pipeline::spans::AttributeSet;
use clap::{Args, Parser, Subcommand, ValueEnum};
use ringside_shm_protocol::Detail;
use std::path::PathBuf;

/// `ringside-agent`: attaches to running ringside engines and exports their
/// requests as OpenTelemetry gen_ai spans and metrics.
#[derive(Debug, Parser)]
#[command(name = "ringside-agent", version, about, args_override_self = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The agent's subcommands.
// Parsed once per process: the size of the `run` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to engines and export their requests until SIGTERM / Ctrl-C.
    Run(RunArgs),
    /// Switch engines' tracing on or off, or show it (writes the engine's
    /// control block directly; no agent daemon needed).
    Tracing(TracingArgs),
    /// Change engines' span detail and sampling in their control blocks.
    Set(SetArgs),
    /// Every engine found: identity, tracing, ring, and the accounting of
    /// the running agent (written = exported + sampled out + lost).
    Status(StatusArgs),
    /// A live view per engine, refreshing in place: requests/s, tokens/s,
    /// queue, running, latency percentiles, drops (q or Ctrl-C quits).
    Top(TopArgs),
    /// The requests each engine holds now (queued, prefill, decode), from
    /// its in-flight table; works while the engine is stopped, hung or dead.
    Inflight(InflightArgs),
    /// Export every request record the engines' rings still hold from the
    /// last DURATION, at full detail and whatever the sampling, each span
    /// marked `ringside.capture.reason=manual` (incident capture).
    Snapshot(SnapshotArgs),
}

/// Flags of `ringside-agent inflight`.
#[derive(Debug, Args, Clone)]
pub struct InflightArgs {
    /// Which engines.
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Print one JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
    /// A request with no progress for this long is stalled (e.g. 500ms,
    /// 10s, 2m).
    #[arg(long, default_value = "10s", value_name = "DURATION",
          value_parser = crate::duration::parse_duration)]
    pub stall_after: std::time::Duration,
}

impl InflightArgs {
    /// What `inflight` shows.
    pub fn options(&self) -> InflightOptions {
        InflightOptions {
            selection: self.selection.selection(),
            json: self.json,
            stall_after: self.stall_after,
        }
    }
}

/// Flags of `ringside-agent top`.
#[derive(Debug, Args, Clone)]
pub struct TopArgs {
    /// Which engines.
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Refresh interval in milliseconds.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub interval_ms: u64,
    /// Sliding window of the rates and percentiles, in seconds.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub window_s: u64,
    /// Stop after this many refreshes (default: until q / Ctrl-C).
    #[arg(long, value_name = "N")]
    pub iterations: Option<u64>,
    /// An in-flight request with no progress for this long is shown stalled.
    #[arg(long, default_value = "10s", value_name = "DURATION",
          value_parser = crate::duration::parse_duration)]
    pub stall_after: std::time::Duration,
}

/// Flags of `ringside-agent status`.
#[derive(Debug, Args, Default, Clone)]
pub struct StatusArgs {
    /// Which engines.
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The running agent's state file (as given to `run --state-file`);
    /// default: every `agent-<pid>.json` in `$RUNTIME_DIRECTORY` or
    /// `/run/ringside`, matched to each engine by its agent's pid.
    #[arg(long, value_name = "PATH")]
    pub state_file: Option<PathBuf>,
}

/// Which engines an operator command acts on.
#[derive(Debug, Args, Default, Clone)]
pub struct SelectionArgs {
    /// Engine instance (repeatable); default: every segment under /dev/shm.
    #[arg(long = "engine", value_name = "NAME")]
    pub engines: Vec<String>,
    /// Uids whose segments are trusted besides our own, root and the
    /// `ringside-engine` user's (repeatable).
    #[arg(long = "trusted-uid", value_name = "UID")]
    pub trusted_uids: Vec<u32>,
}

/// `ringside-agent tracing on|off|status`.
#[derive(Debug, Args)]
pub struct TracingArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: TracingAction,
}

/// The `tracing` actions.
#[derive(Debug, Subcommand)]
pub enum TracingAction {
    /// Switch tracing on: the engine writes records from its next request.
    On(SelectionArgs),
    /// Switch tracing off: the engine writes nothing from its next request.
    Off(SelectionArgs),
    /// Show tracing, detail and sampling per engine.
    Status(ShowArgs),
}

/// Flags of `tracing status`.
#[derive(Debug, Args, Default, Clone)]
pub struct ShowArgs {
    /// Which engines.
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `ringside-agent set`.
#[derive(Debug, Args, Default, Clone)]
pub struct SetArgs {
    /// Which engines.
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Span detail the agent produces.
    #[arg(long, value_enum)]
    pub detail: Option<DetailArg>,
    /// Head sampling ratio in [0, 1] (applied by the agent on top of
    /// OTEL_TRACES_SAMPLER).
    #[arg(long, value_name = "RATIO")]
    pub head_sample: Option<f64>,
    /// Tail sampling: keep every failed, aborted and rejected request.
    #[arg(long, value_name = "BOOL")]
    pub tail_keep_errors: Option<bool>,
    /// Tail sampling: ratio of the remaining requests kept, in [0, 1].
    #[arg(long, value_name = "RATIO")]
    pub tail_sample: Option<f64>,
    /// Tail sampling: keep requests with a time to first token of at least
    /// this many milliseconds (0 = off).
    #[arg(long, value_name = "MS")]
    pub tail_ttft_ms: Option<f64>,
    /// Tail sampling: keep requests with an end-to-end latency of at least
    /// this many milliseconds (0 = off).
    #[arg(long, value_name = "MS")]
    pub tail_e2e_ms: Option<f64>,
}

/// Which span attributes to emit (`--attributes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum AttributeSetArg {
    /// The OpenTelemetry GenAI semantic conventions v1.41.
    Semconv,
    /// The attributes vLLM emits (`gen_ai.latency.*`, deprecated token names).
    Vllm,
    /// Both sets.
    #[default]
    Both,
}

/// Span detail, overriding the engine's control block when given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DetailArg {
    /// One span per request.
    Request,
    /// The request span plus `queue`, `prefill` and `decode` children.
    Phases,
}

/// Where spans and metrics go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum ExporterKind {
    /// An OTLP collector (gRPC or HTTP).
    #[default]
    Otlp,
    /// A readable span tree per trace on stdout.
    Console,
    /// OTLP JSON lines, one export request per line (`--output`).
    File,
}

/// Where spans go: the exporter and its OTLP settings, shared by `run` and
/// `snapshot`. Every OTLP flag overrides its `OTEL_*` variable.
#[derive(Debug, Args, Default, Clone)]
pub struct ExportArgs {
    /// Exporter.
    #[arg(long, value_enum, default_value_t = ExporterKind::Otlp)]
    pub exporter: ExporterKind,
    /// Output file of the `file` exporter.
    #[arg(long, value_name = "PATH")]
    pub output: Option<PathBuf>,
    /// OTLP base endpoint (OTEL_EXPORTER_OTLP_ENDPOINT).
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// OTLP traces endpoint, used as given (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT).
    #[arg(long, value_name = "URL")]
    pub traces_endpoint: Option<String>,
    /// OTLP metrics endpoint, used as given (OTEL_EXPORTER_OTLP_METRICS_ENDPOINT).
    #[arg(long, value_name = "URL")]
    pub metrics_endpoint: Option<String>,
    /// grpc, http/protobuf or http/json (OTEL_EXPORTER_OTLP_PROTOCOL).
    #[arg(long, value_name = "PROTOCOL")]
    pub protocol: Option<String>,
    /// Extra export header `key=value` (repeatable; OTEL_EXPORTER_OTLP_HEADERS).
    #[arg(long = "header", value_name = "KEY=VALUE")]
    pub headers: Vec<String>,
    /// gzip or none (OTEL_EXPORTER_OTLP_COMPRESSION).
    #[arg(long, value_name = "gzip|none")]
    pub compression: Option<String>,
    /// Export timeout in milliseconds (OTEL_EXPORTER_OTLP_TIMEOUT).
    #[arg(long, value_name = "MS")]
    pub timeout_ms: Option<u64>,
}

/// Flags of `ringside-agent run`. Every OTLP flag overrides its `OTEL_*`
/// variable.
#[derive(Debug, Args, Default, Clone)]
pub struct RunArgs {
    /// A config file of `flag-name = value` lines (`#` comments), read
    /// before the command line: flags override it, and it overrides the
    /// OTEL_* variables.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// An environment file of `NAME=value` lines (`OTEL_*`, …) whose
    /// variables win over the process environment's, read at start and again
    /// on SIGHUP: the unit passes the `EnvironmentFile=` it reads, so that
    /// `systemctl reload` applies an edited file.
    #[arg(long, value_name = "PATH")]
    pub env_file: Option<PathBuf>,
    /// Attach only to these engine instances (repeatable); default: every
    /// segment under /dev/shm.
    #[arg(long = "engine", value_name = "NAME")]
    pub engines: Vec<String>,
    /// On attaching to an engine with no stored cursor, export what its ring
    /// already holds.
    #[arg(long)]
    pub backfill: bool,
    /// Span detail; default: the engine's control block setting.
    #[arg(long, value_enum)]
    pub detail: Option<DetailArg>,
    /// Span attribute set.
    #[arg(long, value_enum, default_value_t = AttributeSetArg::Both)]
    pub attributes: AttributeSetArg,
    /// The exporter and its OTLP settings.
    #[command(flatten)]
    pub export: ExportArgs,
    /// Spans per export request.
    #[arg(long, default_value_t = 512, value_name = "SPANS")]
    pub batch_size: usize,
    /// Longest a span waits for its batch to fill, in milliseconds.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub batch_delay_ms: u64,
    /// OTLP export requests in flight at once (1 to 64). With one, throughput
    /// is one batch per round trip to the collector; while the collector is
    /// down, this many batches are held (retrying) beyond the queue's limits.
    #[arg(long, default_value_t = 8, value_name = "REQUESTS")]
    pub max_in_flight: usize,
    /// Most requests held in the export queue; beyond it the oldest are dropped.
    #[arg(long, default_value_t = 65_536, value_name = "REQUESTS")]
    pub queue_max_items: usize,
    /// Memory cap of the export queue in MiB; beyond it the oldest are dropped.
    #[arg(long, default_value_t = 16, value_name = "MIB")]
    pub queue_max_mib: usize,
    /// Longest time one batch is retried, in milliseconds.
    #[arg(long, default_value_t = 60_000, value_name = "MS")]
    pub retry_max_elapsed_ms: u64,
    /// Where metrics go besides the admin API's /metrics: `otlp` (the
    /// exporter's endpoint) or `none`, for a backend that takes traces only
    /// (OTEL_METRICS_EXPORTER; default otlp).
    #[arg(long, value_name = "otlp|none")]
    pub metrics_exporter: Option<String>,
    /// Metrics export interval in milliseconds (OTEL_METRIC_EXPORT_INTERVAL).
    #[arg(long, value_name = "MS")]
    pub metrics_interval_ms: Option<u64>,
    /// How often the rings are polled, in milliseconds.
    #[arg(long, default_value_t = 20, value_name = "MS")]
    pub poll_interval_ms: u64,
    /// How often /dev/shm is scanned for engines, in milliseconds.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub discover_interval_ms: u64,
    /// Longest the SIGTERM flush may take, in milliseconds.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    pub shutdown_timeout_ms: u64,
    /// Uids whose segments are trusted besides our own, root and the
    /// `ringside-engine` user's (repeatable).
    #[arg(long = "trusted-uid", value_name = "UID")]
    pub trusted_uids: Vec<u32>,
    /// Head sampler (OTEL_TRACES_SAMPLER).
    #[arg(long, value_name = "SAMPLER")]
    pub sampler: Option<String>,
    /// Head sampler argument (OTEL_TRACES_SAMPLER_ARG).
    #[arg(long, value_name = "ARG")]
    pub sampler_arg: Option<String>,
    /// Tail sampling: also keep requests slower than the live p99 of time
    /// to first token or end-to-end latency.
    #[arg(long)]
    pub tail_above_p99: bool,
    /// Where the agent publishes its counters for `ringside-agent status`;
    /// default `agent-<pid>.json` in `$RUNTIME_DIRECTORY`, else in
    /// `/run/ringside` (removed when the agent exits).
    #[arg(long, value_name = "PATH")]
    pub state_file: Option<PathBuf>,
    /// Address of the admin HTTP API (/healthz, /readyz, /metrics,
    /// /v1/tracing), or `off`. Default 127.0.0.1:9464; if that default is
    /// taken the agent runs without it. Beyond loopback a bearer token is
    /// required.
    #[arg(long, value_name = "ADDR|off")]
    pub admin_listen: Option<String>,
    /// File holding the admin API's bearer token (else RINGSIDE_ADMIN_TOKEN).
    #[arg(long, value_name = "PATH")]
    pub admin_token_file: Option<PathBuf>,
    /// Sliding window of the live p99, in seconds (two halves of this).
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub tail_window_s: u64,
    /// A request with no progress (no scheduling, prefill chunk or token) for
    /// this long is stalled: logged once, counted in the stalled gauge, and
    /// marked with a `ringside.stalled` span event. Reloadable (SIGHUP).
    #[arg(long, default_value = "10s", value_name = "DURATION",
          value_parser = crate::duration::parse_duration)]
    pub stall_after: std::time::Duration,
    /// Incident capture.
    #[command(flatten)]
    pub capture: CaptureArgs,
}

/// Flags of the daemon's incident capture (`run`): each over its
/// `RINGSIDE_CAPTURE_*` variable. Values are text so that the flag, the
/// config file and the variable are read (and refused) alike.
#[derive(Debug, Args, Default, Clone)]
pub struct CaptureArgs {
    /// How far back a capture reaches, e.g. 5m (RINGSIDE_CAPTURE_WINDOW;
    /// default 5m). The ring must hold that long to give it all.
    #[arg(long, value_name = "DURATION")]
    pub capture_window: Option<String>,
    /// A trigger fires again only after its condition stayed cleared this
    /// long (RINGSIDE_CAPTURE_COOLDOWN; default 5m).
    #[arg(long, value_name = "DURATION")]
    pub capture_cooldown: Option<String>,
    /// Capture the window before an engine's death: on or off
    /// (RINGSIDE_CAPTURE_ON_CRASH; default on).
    #[arg(long, value_name = "on|off")]
    pub capture_on_crash: Option<String>,
    /// Capture when this many error requests (failed, rejected, invalid)
    /// end within --capture-error-window, or off (RINGSIDE_CAPTURE_ERROR_BURST;
    /// default off).
    #[arg(long, value_name = "N|off")]
    pub capture_error_burst: Option<String>,
    /// The error burst's window (RINGSIDE_CAPTURE_ERROR_WINDOW; default 1m).
    #[arg(long, value_name = "DURATION")]
    pub capture_error_window: Option<String>,
    /// Capture when the p99 time to first token over --capture-ttft-window
    /// goes above this, or off (RINGSIDE_CAPTURE_TTFT_P99; default off).
    #[arg(long, value_name = "DURATION|off")]
    pub capture_ttft_p99: Option<String>,
    /// The TTFT p99's window (RINGSIDE_CAPTURE_TTFT_WINDOW; default 1m).
    #[arg(long, value_name = "DURATION")]
    pub capture_ttft_window: Option<String>,
    /// Fewer requests with a first token in the window never fire the TTFT
    /// trigger (RINGSIDE_CAPTURE_TTFT_MIN_REQUESTS; default 20).
    #[arg(long, value_name = "N")]
    pub capture_ttft_min_requests: Option<String>,
}

/// Flags of `ringside-agent snapshot`.
#[derive(Debug, Args, Clone)]
pub struct SnapshotArgs {
    /// Which engines.
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// The window: requests that ended this long ago or later (e.g. 30s, 5m).
    #[arg(long, value_name = "DURATION", value_parser = crate::duration::parse_duration)]
    pub since: std::time::Duration,
    /// The exporter and its OTLP settings.
    #[command(flatten)]
    pub export: ExportArgs,
}

impl From<AttributeSetArg> for AttributeSet {
    fn from(arg: AttributeSetArg) -> Self {
        match arg {
            AttributeSetArg::Semconv => Self::Semconv,
            AttributeSetArg::Vllm => Self::Vllm,
            AttributeSetArg::Both => Self::Both,
        }
    }
}

impl From<DetailArg> for Detail {
    fn from(arg: DetailArg) -> Self {
        match arg {
            DetailArg::Request => Self::Request,
            DetailArg::Phases => Self::Phases,
        }
    }
}

impl SelectionArgs {
    /// The engines these flags select.
    pub fn selection(&self) -> EngineSelection {
        EngineSelection {
            engines: self.engines.clone(),
            trusted_uids: super::trust::with_engine_user(self.trusted_uids.clone()),
        }
    }
}

impl ShowArgs {
    /// What `tracing status` shows.
    pub fn options(&self) -> ShowOptions {
        ShowOptions {
            selection: self.selection.selection(),
            json: self.json,
        }
    }
}

impl StatusArgs {
    /// What `status` shows.
    pub fn options(&self) -> StatusOptions {
        StatusOptions {
            selection: self.selection.selection(),
            json: self.json,
            state_file: self.state_file.clone(),
        }
    }
}

impl TopArgs {
    /// What `top` shows, and how often.
    pub fn options(&self) -> TopOptions {
        TopOptions {
            selection: self.selection.selection(),
            interval_ms: self.interval_ms,
            window_s: self.window_s,
            iterations: self.iterations,
            stall_after: self.stall_after,
        }
    }
}

impl SetArgs {
    /// The control-block change these flags ask for (empty if none).
    pub fn change(&self) -> Change {
        Change {
            enabled: None,
            detail: self.detail.map(Detail::from),
            head_sample_ratio: self.head_sample,
            tail_keep_errors: self.tail_keep_errors,
            tail_sample_ratio: self.tail_sample,
            tail_ttft_threshold_ms: self.tail_ttft_ms,
            tail_e2e_threshold_ms: self.tail_e2e_ms,
        }
    }
}
