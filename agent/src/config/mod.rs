//! Command line and `OTEL_*` environment: parsed, checked, resolved into one
//! [`Settings`] value. Flags override the environment; anything that cannot
//! be understood is refused with a [`ConfigError`] naming the setting.

use crate::pipeline::sampling::Sampler;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

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
}

/// Flags of `ringside-agent top`.
#[derive(Debug, Args, Clone)]
pub struct TopArgs {
    /// Which engines.
    #[command(flatten)]
    pub selection: EngineSelection,
    /// Refresh interval in milliseconds.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub interval_ms: u64,
    /// Sliding window of the rates and percentiles, in seconds.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub window_s: u64,
    /// Stop after this many refreshes (default: until q / Ctrl-C).
    #[arg(long, value_name = "N")]
    pub iterations: Option<u64>,
}

/// Flags of `ringside-agent status`.
#[derive(Debug, Args, Default, Clone)]
pub struct StatusArgs {
    /// Which engines.
    #[command(flatten)]
    pub selection: EngineSelection,
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
pub struct EngineSelection {
    /// Engine instance (repeatable); default: every segment under /dev/shm.
    #[arg(long = "engine", value_name = "NAME")]
    pub engines: Vec<String>,
    /// Uids whose segments are trusted besides our own and root (repeatable).
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
    On(EngineSelection),
    /// Switch tracing off: the engine writes nothing from its next request.
    Off(EngineSelection),
    /// Show tracing, detail and sampling per engine.
    Status(ShowArgs),
}

/// Flags of `tracing status`.
#[derive(Debug, Args, Default, Clone)]
pub struct ShowArgs {
    /// Which engines.
    #[command(flatten)]
    pub selection: EngineSelection,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `ringside-agent set`.
#[derive(Debug, Args, Default, Clone)]
pub struct SetArgs {
    /// Which engines.
    #[command(flatten)]
    pub selection: EngineSelection,
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

/// Which span attributes to emit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum AttributeSet {
    /// The OpenTelemetry GenAI semantic conventions v1.41.
    Semconv,
    /// The attributes vLLM emits (`gen_ai.latency.*`, deprecated token names).
    Vllm,
    /// Both sets.
    #[default]
    Both,
}

impl AttributeSet {
    /// Whether the semconv set is emitted.
    pub fn semconv(self) -> bool {
        matches!(self, Self::Semconv | Self::Both)
    }
    /// Whether the vLLM set is emitted.
    pub fn vllm(self) -> bool {
        matches!(self, Self::Vllm | Self::Both)
    }
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

/// The OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC.
    Grpc,
    /// OTLP/HTTP with protobuf bodies.
    HttpProtobuf,
    /// OTLP/HTTP with JSON bodies.
    HttpJson,
}

impl Protocol {
    fn parse(value: &str) -> Option<Self> {
        match value.trim() {
            "grpc" => Some(Self::Grpc),
            "http/protobuf" => Some(Self::HttpProtobuf),
            "http/json" => Some(Self::HttpJson),
            _ => None,
        }
    }
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
    #[arg(long, value_enum, default_value_t = AttributeSet::Both)]
    pub attributes: AttributeSet,
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
    /// Uids whose segments are trusted besides our own and root (repeatable).
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
}

/// Default address of the admin API.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";

/// Where the admin API listens and how it authenticates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminSettings {
    /// The address.
    pub listen: std::net::SocketAddr,
    /// Whether the address was given (a taken default is not fatal).
    pub explicit: bool,
    /// The bearer token (required beyond loopback).
    pub token: Option<String>,
}

impl AdminSettings {
    fn resolve(
        args: &RunArgs,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, ConfigError> {
        let (text, explicit) = match args.admin_listen.as_deref() {
            Some(t) => (t.trim(), true),
            None => (DEFAULT_ADMIN_LISTEN, false),
        };
        if text == "off" {
            return Ok(None);
        }
        let listen: std::net::SocketAddr = text
            .parse()
            .map_err(|_| invalid("--admin-listen", text, "expected IP:PORT or off"))?;
        let token = match &args.admin_token_file {
            Some(path) => {
                let t = std::fs::read_to_string(path).map_err(|e| {
                    invalid(
                        "--admin-token-file",
                        &path.display().to_string(),
                        e.to_string(),
                    )
                })?;
                let t = t.trim().to_owned();
                if t.is_empty() {
                    return Err(invalid(
                        "--admin-token-file",
                        &path.display().to_string(),
                        "the file is empty",
                    ));
                }
                Some(t)
            }
            None => env("RINGSIDE_ADMIN_TOKEN").map(|t| t.trim().to_owned()),
        };
        if !listen.ip().is_loopback() && token.is_none() {
            return Err(invalid(
                "--admin-listen",
                text,
                "an admin API beyond loopback requires a bearer token: \
                 give --admin-token-file PATH or set RINGSIDE_ADMIN_TOKEN (or bind 127.0.0.1)",
            ));
        }
        Ok(Some(Self {
            listen,
            explicit,
            token,
        }))
    }
}

/// Why the command line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// clap refused it (or it asked for help / the version).
    #[error(transparent)]
    Clap(#[from] clap::Error),
    /// The config file could not be read.
    #[error("cannot read the config file {path}: {source}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A line of the config file is not `name = value`.
    #[error("config file {path}, line {line}: expected `name = value`")]
    ConfigLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
}

/// Turns config file text into flags: `name = value` becomes
/// `--name value`, `name = true` becomes `--name`, `name = false` is left
/// out. Values may be double-quoted. `None` names the first bad line.
pub fn config_file_args(text: &str) -> Result<Vec<String>, usize> {
    let mut args = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line.split_once('=').ok_or(index + 1)?;
        let name = name.trim().trim_start_matches("--");
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(index + 1);
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        match value {
            "true" => args.push(format!("--{name}")),
            "false" => {}
            v => {
                args.push(format!("--{name}"));
                args.push(v.to_owned());
            }
        }
    }
    Ok(args)
}

/// Parses the command line; with `run --config FILE`, the file's settings
/// are inserted before the command line's own flags so that these win.
pub fn parse_command_line(argv: Vec<std::ffi::OsString>) -> Result<Cli, ParseError> {
    let cli = Cli::try_parse_from(&argv)?;
    let Command::Run(run) = &cli.command else {
        return Ok(cli);
    };
    let Some(path) = run.config.clone() else {
        return Ok(cli);
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ParseError::ConfigFile {
        path: path.clone(),
        source,
    })?;
    let file_args =
        config_file_args(&text).map_err(|line| ParseError::ConfigLine { path, line })?;
    let run_at = argv.iter().position(|a| a == "run").unwrap_or(argv.len());
    let mut merged: Vec<std::ffi::OsString> = argv[..=run_at.min(argv.len() - 1)].to_vec();
    merged.extend(file_args.into_iter().map(Into::into));
    merged.extend(argv.into_iter().skip(run_at + 1));
    Ok(Cli::try_parse_from(merged)?)
}

/// Body compression.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// None.
    None,
    /// gzip.
    Gzip,
}

/// Resolved OTLP exporter settings.
#[derive(Clone, Debug, PartialEq)]
pub struct OtlpSettings {
    /// Transport.
    pub protocol: Protocol,
    /// Full URL traces are sent to (for gRPC: the server's base URL).
    pub traces_endpoint: String,
    /// Full URL metrics are sent to.
    pub metrics_endpoint: String,
    /// Extra headers, values percent-decoded.
    pub headers: Vec<(String, String)>,
    /// Body compression.
    pub compression: Compression,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// Where exports go.
#[derive(Clone, Debug, PartialEq)]
pub enum ExportTarget {
    /// An OTLP collector.
    Otlp(OtlpSettings),
    /// Span trees on stdout.
    Console,
    /// OTLP JSON lines into a file.
    File(PathBuf),
}

impl ExportTarget {
    /// A one-line description for logs: never the header values (they may
    /// hold credentials).
    pub fn describe(&self) -> String {
        match self {
            Self::Otlp(o) => format!(
                "otlp {:?} traces={} metrics={} compression={:?} headers={:?}",
                o.protocol,
                o.traces_endpoint,
                o.metrics_endpoint,
                o.compression,
                o.headers
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>()
            ),
            Self::Console => "console".to_owned(),
            Self::File(path) => format!("file {}", path.display()),
        }
    }
}

/// Everything `run` needs, checked.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Instances to attach to (empty: all).
    pub engines: Vec<String>,
    /// Export what the ring holds when attaching without a stored cursor.
    pub backfill: bool,
    /// Detail override.
    pub detail: Option<DetailArg>,
    /// Attribute set.
    pub attributes: AttributeSet,
    /// Exporter.
    pub target: ExportTarget,
    /// Spans per batch.
    pub batch_size: usize,
    /// Batch delay.
    pub batch_delay: Duration,
    /// OTLP export requests in flight at once.
    pub max_in_flight: usize,
    /// Queue limit in requests.
    pub queue_max_items: usize,
    /// Queue memory cap in bytes.
    pub queue_max_bytes: usize,
    /// Retry budget per batch.
    pub retry_max_elapsed: Duration,
    /// Metrics interval.
    pub metrics_interval: Duration,
    /// Ring poll interval.
    pub poll_interval: Duration,
    /// Discovery interval.
    pub discover_interval: Duration,
    /// Shutdown flush budget.
    pub shutdown_timeout: Duration,
    /// Trusted segment owners.
    pub trusted_uids: Vec<u32>,
    /// Head sampler.
    pub sampler: Sampler,
    /// Keep requests above the live p99 (tail sampling).
    pub tail_above_p99: bool,
    /// Half the window of the live p99.
    pub tail_window: Duration,
    /// The published state file.
    pub state_file: PathBuf,
    /// Whether it is the default one (removed at exit).
    pub state_file_default: bool,
    /// The admin API, if on.
    pub admin: Option<AdminSettings>,
}

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

fn invalid(setting: &str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting: setting.to_owned(),
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// Decodes `%XX` escapes; `None` on a malformed escape or invalid UTF-8.
pub fn percent_decode(input: &str) -> Option<String> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let text = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(text, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Parses a W3C-baggage-like `k=v,k2=v2` list with percent-encoded values;
/// `None` if any member is malformed. Empty members are skipped.
pub fn parse_key_values(input: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    for member in input.split(',') {
        let member = member.trim();
        if member.is_empty() {
            continue;
        }
        let (key, value) = member.split_once('=')?;
        let key = percent_decode(key.trim())?;
        if key.is_empty() {
            return None;
        }
        out.push((key, percent_decode(value.trim())?));
    }
    Some(out)
}

fn check_url(setting: &str, url: &str) -> Result<(), ConfigError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| invalid(setting, url, "must start with http:// or https://"))?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() {
        return Err(invalid(setting, url, "has no host"));
    }
    if let Some((_, port)) = authority.rsplit_once(':')
        && !port.ends_with(']')
        && port.parse::<u16>().is_err()
    {
        return Err(invalid(setting, url, "the port is not a number"));
    }
    if url.chars().any(char::is_whitespace) {
        return Err(invalid(setting, url, "contains whitespace"));
    }
    Ok(())
}

fn join_signal_path(base: &str, signal: &str) -> String {
    let base = base.trim_end_matches('/');
    format!("{base}/v1/{signal}")
}

impl Settings {
    /// Resolves flags over the environment (`env` reads one variable).
    pub fn resolve(
        args: &RunArgs,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        for engine in &args.engines {
            ringside_shm_protocol::validate_instance(engine)
                .map_err(|e| invalid("--engine", engine, e.reason))?;
        }
        let target = match args.exporter {
            ExporterKind::Console => ExportTarget::Console,
            ExporterKind::File => {
                ExportTarget::File(args.output.clone().ok_or(ConfigError::Missing {
                    setting: "--output",
                    when: "with --exporter file",
                })?)
            }
            ExporterKind::Otlp => ExportTarget::Otlp(Self::resolve_otlp(args, &env)?),
        };
        if args.batch_size == 0 {
            return Err(invalid("--batch-size", "0", "must be at least 1"));
        }
        if !(1..=64).contains(&args.max_in_flight) {
            return Err(invalid(
                "--max-in-flight",
                &args.max_in_flight.to_string(),
                "must be between 1 and 64",
            ));
        }
        if args.queue_max_items == 0 {
            return Err(invalid("--queue-max-items", "0", "must be at least 1"));
        }
        if args.queue_max_mib == 0 {
            return Err(invalid("--queue-max-mib", "0", "must be at least 1"));
        }
        if args.poll_interval_ms == 0 {
            return Err(invalid("--poll-interval-ms", "0", "must be at least 1"));
        }
        let metrics_interval_ms = match args.metrics_interval_ms {
            Some(ms) => ms,
            None => match env("OTEL_METRIC_EXPORT_INTERVAL") {
                Some(v) => v
                    .trim()
                    .parse()
                    .map_err(|_| invalid("OTEL_METRIC_EXPORT_INTERVAL", &v, "not milliseconds"))?,
                None => 60_000,
            },
        };
        if metrics_interval_ms == 0 {
            return Err(invalid("--metrics-interval-ms", "0", "must be at least 1"));
        }
        let (sampler_setting, sampler) = match &args.sampler {
            Some(s) => ("--sampler", Some(s.clone())),
            None => ("OTEL_TRACES_SAMPLER", env("OTEL_TRACES_SAMPLER")),
        };
        let (arg_setting, sampler_arg) = match &args.sampler_arg {
            Some(s) => ("--sampler-arg", Some(s.clone())),
            None => ("OTEL_TRACES_SAMPLER_ARG", env("OTEL_TRACES_SAMPLER_ARG")),
        };
        let sampler = Sampler::parse(sampler.as_deref(), sampler_arg.as_deref())
            .map_err(|e| e.into_config(sampler_setting, arg_setting))?;
        let admin = AdminSettings::resolve(args, &env)?;
        Ok(Self {
            engines: args.engines.clone(),
            backfill: args.backfill,
            detail: args.detail,
            attributes: args.attributes,
            target,
            batch_size: args.batch_size,
            batch_delay: Duration::from_millis(args.batch_delay_ms),
            max_in_flight: args.max_in_flight,
            queue_max_items: args.queue_max_items,
            queue_max_bytes: args.queue_max_mib.saturating_mul(1 << 20),
            retry_max_elapsed: Duration::from_millis(args.retry_max_elapsed_ms),
            metrics_interval: Duration::from_millis(metrics_interval_ms),
            poll_interval: Duration::from_millis(args.poll_interval_ms),
            discover_interval: Duration::from_millis(args.discover_interval_ms.max(1)),
            shutdown_timeout: Duration::from_millis(args.shutdown_timeout_ms),
            trusted_uids: args.trusted_uids.clone(),
            sampler,
            tail_above_p99: args.tail_above_p99,
            tail_window: Duration::from_secs(args.tail_window_s.max(1)),
            state_file: args
                .state_file
                .clone()
                .unwrap_or_else(|| crate::control::published_state::default_path(&env, std::process::id())),
            state_file_default: args.state_file.is_none(),
            admin,
        })
    }

    fn resolve_otlp(
        args: &RunArgs,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<OtlpSettings, ConfigError> {
        let pick = |flag: &Option<String>, flag_name: &'static str, var: &'static str| {
            flag.clone()
                .map(|v| (flag_name, v))
                .or_else(|| env(var).map(|v| (var, v)))
        };
        let protocol = match pick(
            &args.protocol,
            "--protocol",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        )
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL").map(|v| ("OTEL_EXPORTER_OTLP_PROTOCOL", v)))
        {
            Some((setting, value)) => Protocol::parse(&value).ok_or_else(|| {
                invalid(setting, &value, "expected grpc, http/protobuf or http/json")
            })?,
            None => Protocol::Grpc,
        };
        let base = pick(&args.endpoint, "--endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT");
        if let Some((setting, url)) = &base {
            check_url(setting, url)?;
        }
        let default_base = match protocol {
            Protocol::Grpc => "http://localhost:4317",
            Protocol::HttpProtobuf | Protocol::HttpJson => "http://localhost:4318",
        };
        let base_url = base.map_or_else(|| default_base.to_owned(), |(_, url)| url);
        let signal_endpoint = |flag: &Option<String>,
                               flag_name: &'static str,
                               var: &'static str,
                               signal: &str|
         -> Result<String, ConfigError> {
            match pick(flag, flag_name, var) {
                Some((setting, url)) => {
                    check_url(setting, &url)?;
                    Ok(url)
                }
                None => Ok(match protocol {
                    Protocol::Grpc => base_url.clone(),
                    Protocol::HttpProtobuf | Protocol::HttpJson => {
                        join_signal_path(&base_url, signal)
                    }
                }),
            }
        };
        let traces_endpoint = signal_endpoint(
            &args.traces_endpoint,
            "--traces-endpoint",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "traces",
        )?;
        let metrics_endpoint = signal_endpoint(
            &args.metrics_endpoint,
            "--metrics-endpoint",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            "metrics",
        )?;
        let mut headers: Vec<(String, String)> = Vec::new();
        // General headers first; the traces-specific ones replace same-named ones.
        for var in [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        ] {
            if let Some(value) = env(var) {
                let parsed = parse_key_values(&value).ok_or_else(|| {
                    invalid(
                        var,
                        &value,
                        "expected key=value,key2=value2 with percent-encoded values",
                    )
                })?;
                for (key, value) in parsed {
                    headers.retain(|(k, _)| !k.eq_ignore_ascii_case(&key));
                    headers.push((key, value));
                }
            }
        }
        for header in &args.headers {
            let parsed = parse_key_values(header)
                .filter(|kv| kv.len() == 1)
                .ok_or_else(|| invalid("--header", header, "expected key=value"))?;
            for (key, value) in parsed {
                headers.retain(|(k, _)| !k.eq_ignore_ascii_case(&key));
                headers.push((key, value));
            }
        }
        for (key, value) in &headers {
            let valid_key = key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !valid_key || value.bytes().any(|b| b < 0x20 || b == 0x7f) {
                return Err(invalid(
                    "OTEL_EXPORTER_OTLP_HEADERS / --header",
                    &format!("{key}={value}"),
                    "not a valid HTTP header",
                ));
            }
        }
        let compression = match pick(
            &args.compression,
            "--compression",
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
        )
        .or_else(|| {
            env("OTEL_EXPORTER_OTLP_COMPRESSION").map(|v| ("OTEL_EXPORTER_OTLP_COMPRESSION", v))
        }) {
            None => Compression::None,
            Some((setting, value)) => match value.trim() {
                "gzip" => Compression::Gzip,
                "none" => Compression::None,
                _ => return Err(invalid(setting, &value, "expected gzip or none")),
            },
        };
        let timeout_var = [
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ]
        .into_iter()
        .find_map(|var| env(var).map(|v| (var, v)));
        let timeout_ms = match (args.timeout_ms, timeout_var) {
            (Some(ms), _) => ms,
            (None, Some((var, v))) => v
                .trim()
                .parse()
                .map_err(|_| invalid(var, &v, "expected milliseconds"))?,
            (None, None) => 10_000,
        };
        if timeout_ms == 0 {
            return Err(invalid("--timeout-ms", "0", "must be at least 1"));
        }
        Ok(OtlpSettings {
            protocol,
            traces_endpoint,
            metrics_endpoint,
            headers,
            compression,
            timeout: Duration::from_millis(timeout_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve(args: &[&str], env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let mut argv = vec!["ringside-agent", "run"];
        argv.extend_from_slice(args);
        let Command::Run(run) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not run")
        };
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::resolve(&run, &|name| env.get(name).cloned())
    }

    fn otlp(settings: &Settings) -> &OtlpSettings {
        match &settings.target {
            ExportTarget::Otlp(o) => o,
            other => panic!("not otlp: {other:?}"),
        }
    }

    #[test]
    fn defaults_are_grpc_on_localhost_4317() {
        let s = resolve(&[], &[]).unwrap();
        let o = otlp(&s);
        assert_eq!(o.protocol, Protocol::Grpc);
        assert_eq!(o.traces_endpoint, "http://localhost:4317");
        assert_eq!(o.timeout, Duration::from_secs(10));
        assert_eq!(o.compression, Compression::None);
        assert_eq!(s.attributes, AttributeSet::Both);
        assert_eq!(s.sampler, Sampler::ParentBased(Box::new(Sampler::AlwaysOn)));
    }

    #[test]
    fn http_appends_signal_paths_to_the_base_but_not_to_per_signal_endpoints() {
        let s = resolve(
            &[],
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
                ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://m:9/custom"),
            ],
        )
        .unwrap();
        let o = otlp(&s);
        assert_eq!(o.traces_endpoint, "http://collector:4318/v1/traces");
        assert_eq!(o.metrics_endpoint, "http://m:9/custom");
        let s = resolve(&[], &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).unwrap();
        assert_eq!(otlp(&s).traces_endpoint, "http://localhost:4318/v1/traces");
        assert_eq!(otlp(&s).protocol, Protocol::HttpJson);
    }

    #[test]
    fn flags_override_the_environment() {
        let s = resolve(
            &[
                "--endpoint",
                "http://flag:1",
                "--compression",
                "gzip",
                "--timeout-ms",
                "250",
                "--header",
                "x-api-key=flag",
            ],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:2"),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "9"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "X-Api-Key=env,tenant=a%20b"),
            ],
        )
        .unwrap();
        let o = otlp(&s);
        assert_eq!(o.traces_endpoint, "http://flag:1");
        assert_eq!(o.compression, Compression::Gzip);
        assert_eq!(o.timeout, Duration::from_millis(250));
        assert_eq!(
            o.headers,
            vec![
                ("tenant".to_owned(), "a b".to_owned()),
                ("x-api-key".to_owned(), "flag".to_owned())
            ]
        );
    }

    #[test]
    fn bad_settings_are_refused_naming_the_setting() {
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case<'_>] = &[
            (
                &[],
                &[("OTEL_EXPORTER_OTLP_PROTOCOL", "udp")],
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ),
            (&["--protocol", "thrift"], &[], "--protocol"),
            (
                &[],
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")],
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (&["--endpoint", "http://host:port"], &[], "--endpoint"),
            (
                &[],
                &[("OTEL_EXPORTER_OTLP_HEADERS", "novalue")],
                "OTEL_EXPORTER_OTLP_HEADERS",
            ),
            (
                &[],
                &[("OTEL_EXPORTER_OTLP_HEADERS", "k=%zz")],
                "OTEL_EXPORTER_OTLP_HEADERS",
            ),
            (&["--header", "a"], &[], "--header"),
            (
                &[],
                &[("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")],
                "OTEL_EXPORTER_OTLP_COMPRESSION",
            ),
            (
                &[],
                &[("OTEL_EXPORTER_OTLP_TIMEOUT", "10s")],
                "OTEL_EXPORTER_OTLP_TIMEOUT",
            ),
            (
                &[],
                &[("OTEL_TRACES_SAMPLER", "sometimes")],
                "OTEL_TRACES_SAMPLER",
            ),
            (
                &[],
                &[
                    ("OTEL_TRACES_SAMPLER", "traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", "2"),
                ],
                "OTEL_TRACES_SAMPLER_ARG",
            ),
            (&["--exporter", "file"], &[], "--output"),
            (&["--engine", "../etc"], &[], "--engine"),
            (&["--batch-size", "0"], &[], "--batch-size"),
            (&["--max-in-flight", "0"], &[], "--max-in-flight"),
            (&["--max-in-flight", "65"], &[], "--max-in-flight"),
        ];
        for (args, env, setting) in cases {
            let err = resolve(args, env).expect_err(setting).to_string();
            assert!(err.contains(setting), "{err:?} does not name {setting}");
        }
    }

    #[test]
    fn traces_specific_variables_win_over_the_general_ones() {
        let s = resolve(
            &[],
            &[
                ("OTEL_EXPORTER_OTLP_HEADERS", "a=general,b=general"),
                ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "A=traces"),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
                ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000"),
                ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "2000"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
            ],
        )
        .unwrap();
        let o = otlp(&s);
        assert_eq!(
            o.headers,
            vec![
                ("b".to_owned(), "general".to_owned()),
                ("A".to_owned(), "traces".to_owned())
            ]
        );
        assert_eq!(o.compression, Compression::Gzip);
        assert_eq!(o.timeout, Duration::from_secs(2));
        assert_eq!(o.protocol, Protocol::HttpJson);
        let err = resolve(&[], &[("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "x")]).unwrap_err();
        assert!(
            err.to_string()
                .contains("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
        );
    }

    #[test]
    fn the_target_description_never_shows_header_values() {
        let s = resolve(&["--header", "authorization=Bearer%20s3cret"], &[]).unwrap();
        let text = s.target.describe();
        assert!(text.contains("authorization"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }

    #[test]
    fn empty_variables_count_as_unset() {
        let s = resolve(&[], &[("OTEL_EXPORTER_OTLP_PROTOCOL", " ")]).unwrap();
        assert_eq!(otlp(&s).protocol, Protocol::Grpc);
    }

    #[test]
    fn config_files_become_flags_and_the_command_line_wins() {
        assert_eq!(
            config_file_args("# c\n\nendpoint = \"http://c:1\"\nbackfill = true\nx = false\n"),
            Ok(vec![
                "--endpoint".to_owned(),
                "http://c:1".to_owned(),
                "--backfill".to_owned()
            ])
        );
        assert_eq!(config_file_args("endpoint http://c"), Err(1));
        assert_eq!(config_file_args("ok = 1\nbad name = 2"), Err(2));
        let path = std::env::temp_dir().join(format!("ringside-agent-cfg-{}", std::process::id()));
        std::fs::write(&path, "endpoint = http://file:1\ncompression = gzip\n").unwrap();
        let argv = [
            "ringside-agent",
            "run",
            "--config",
            path.to_str().unwrap(),
            "--endpoint",
            "http://flag:2",
        ];
        let cli = parse_command_line(argv.iter().map(Into::into).collect()).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.endpoint.as_deref(), Some("http://flag:2"));
        assert_eq!(run.compression.as_deref(), Some("gzip"));
        std::fs::write(&path, "endpoint\n").unwrap();
        let argv = ["ringside-agent", "run", "--config", path.to_str().unwrap()];
        let err = parse_command_line(argv.iter().map(Into::into).collect()).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn key_value_lists_decode_percent_escapes() {
        assert_eq!(
            parse_key_values("a=1, b = x%2Cy ,,c=%E2%9C%93"),
            Some(vec![
                ("a".into(), "1".into()),
                ("b".into(), "x,y".into()),
                ("c".into(), "\u{2713}".into())
            ])
        );
        assert_eq!(parse_key_values("a"), None);
        assert_eq!(parse_key_values("=v"), None);
        assert_eq!(parse_key_values("a=%4"), None);
        assert_eq!(parse_key_values("a=%ff"), None);
    }
}
